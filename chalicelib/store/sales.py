"""Flash sales: sales, tickets, the per-user claims and the sale order.

A sale's stock is in one item or split over several ("shards"), in the sales'
table, keyed by id (sale ids hold no `#`):

    <sale>        the sale: goods, name, price, window; `shards` absent (one
                  shard): its `stock` is the sale's, as it always was
    <sale>        with `shards` = N > 1: the description only (`stock` 0) ...
    <sale>#<k>    ... and the stock of shard k, k = 0..N-1, each a full copy of
                  the description with its share of the units

A flash-sale order's `sale_id` names the item its unit came from (`<sale>` or
`<sale>#<k>`): the order's transaction took the unit there, and closing the
order unpaid gives it back there (store/orders.py's `ADD stock` on that item).
One per user stays exact across shards: ORDER#<sale>#<user> is per sale.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import datetime
from typing import Any

from pynamodb.exceptions import TransactWriteError
from pynamodb.transactions import TransactWrite

from chalicelib.domain import (
    TICKET_ORDERED,
    TICKET_QUEUED,
    Conflict,
    Order,
    Sale,
    SeckillOutcome,
    Ticket,
    Unavailable,
    events,
    iso,
    sale_of,
    shard_key,
    split_stock,
)
from chalicelib.store.base import (
    StoreBase,
    conditional,
    dynamo,
    get_item,
    reasons,
    write_transaction,
)
from chalicelib.store.models import (
    model_from_order,
    model_from_ticket,
    sale_from_model,
    ticket_from_model,
)
from chalicelib.store.outbox import put_event

log = logging.getLogger(__name__)

def claim_key(sale_id: str, username: str) -> str:
    """The user holds a live ticket of the sale, or one that ordered (the API's guard)."""
    return f"CLAIM#{sale_id}#{username}"


def bought_key(sale_id: str, username: str) -> str:
    """The user has an order of the sale: the real guard, put in the order's transaction."""
    return f"ORDER#{sale_id}#{username}"


def _shards(item: Any) -> int:
    """A sale item's shard count (absent: one, the item itself)."""
    return int(item.shards or 1)


class SaleStore(StoreBase):
    # --- flash sales (chalicelib/seckill.py) ----------------------------------

    def put_sale(self, sale: Sale, *, shards: int = 1) -> None:
        """The sale, replacing one of the same id. `shards` > 1: its stock split
        over that many items (split_stock), all written in one transaction; a
        sale's shard count is not meant to change while it runs."""
        units = split_stock(sale.stock, shards)
        m = self.models
        described = {"goods_id": sale.goods_id, "name": sale.name,
                     "price_fen": sale.price_fen, "start_time": iso(sale.start_time),
                     "end_time": iso(sale.end_time)}
        if shards == 1:
            with dynamo():
                m.Sale(sale.id, stock=sale.stock, **described).save()
            return

        def build(tx: TransactWrite) -> None:
            tx.save(m.Sale(sale.id, stock=0, shards=shards, **described))
            for k, n in enumerate(units):
                tx.save(m.Sale(shard_key(sale.id, k), stock=n, **described))

        try:
            write_transaction(self.connection, build)
        except TransactWriteError as exc:
            raise Unavailable(f"sale {sale.id} could not be written: {reasons(exc)}") from exc

    def list_sales(self) -> list[Sale]:
        """Every sale, its stock summed over its shards (one scan)."""
        m = self.models
        with dynamo():
            items = list(m.Sale.scan())
        stocks = {x.id: int(x.stock) for x in items}
        sales = []
        for x in items:
            if "#" in x.id:
                continue
            sale = sale_from_model(x)
            n = _shards(x)
            if n > 1:
                sale = replace(sale, stock=sum(stocks.get(shard_key(x.id, k), 0)
                                               for k in range(n)))
            sales.append(sale)
        return sorted(sales, key=lambda s: s.id)

    def get_sale(self, sale_id: str, *, consistent: bool = False) -> Sale | None:
        """The sale, its stock summed over its shards. Eventually consistent by
        default: the API's sold-out fast path only; the order's transaction is
        the real guard. One GetItem; a sale of N > 1 shards one BatchGetItem of
        N items more. (A stock item's id, `<sale>#<k>`, reads that shard.)"""
        found = self.sale_shard_stocks(sale_id, consistent=consistent)
        if found is None:
            return None
        sale, stocks = found
        return replace(sale, stock=sum(stocks))

    def sale_stock_items(self, sale_id: str, *, consistent: bool = False,
                         ) -> tuple[Sale, list[str]] | None:
        """The sale as its own item holds it, and the ids of the items that hold
        its stock, shard 0 first: `[sale_id]` for a sale of one shard (the
        Sale's stock is then the sale's), `[<sale>#0, ...]` for N > 1 (the
        Sale's stock is 0). One GetItem: the drain's read."""
        item = get_item(self.models.Sale, sale_id, consistent=consistent)
        if item is None:
            return None
        n = _shards(item)
        items = [sale_id] if n == 1 else [shard_key(sale_id, k) for k in range(n)]
        return sale_from_model(item), items

    def sale_shard_stocks(self, sale_id: str, *, consistent: bool = False,
                          ) -> tuple[Sale, list[int]] | None:
        """The sale as its own item holds it, and the stock of each shard, shard 0
        first (a shard item that is missing counts 0)."""
        found = self.sale_stock_items(sale_id, consistent=consistent)
        if found is None:
            return None
        sale, items = found
        if items == [sale_id]:
            return sale, [sale.stock]
        m = self.models
        with dynamo():
            got = {x.id: int(x.stock) for x in m.Sale.batch_get(items, consistent_read=consistent)}
        return sale, [got.get(k, 0) for k in items]

    def claim_ticket(self, ticket: Ticket) -> str | None:
        """The user's claim on the sale and the QUEUED ticket, both or neither.

        None when written; otherwise the id of the ticket that holds the claim
        already ("" if it went meanwhile). A user holds one live ticket per sale.
        """
        m = self.models
        claim = m.SeckillMarker(claim_key(ticket.sale_id, ticket.username),
                                ticket_id=ticket.id, create_time=iso(ticket.create_time))

        def build(tx: TransactWrite) -> None:
            tx.save(claim, condition=m.SeckillMarker.id.does_not_exist())
            tx.save(model_from_ticket(m, ticket), condition=m.Ticket.id.does_not_exist())

        try:
            write_transaction(self.connection, build)
            return None
        except TransactWriteError as exc:
            why = reasons(exc)
            if why[:1] == ["ConditionalCheckFailed"]:
                held = get_item(m.SeckillMarker, claim.id)
                return str(held.ticket_id) if held is not None else ""
            if "ConditionalCheckFailed" in why:
                raise Conflict(f"ticket {ticket.id} exists already") from exc
            raise Unavailable(f"the ticket could not be written: {why}") from exc

    def drop_ticket(self, ticket: Ticket) -> None:
        """Undo claim_ticket (its message could not be published)."""
        m = self.models

        def build(tx: TransactWrite) -> None:
            tx.delete(m.SeckillMarker(claim_key(ticket.sale_id, ticket.username)),
                      condition=m.SeckillMarker.ticket_id == ticket.id)
            tx.delete(m.Ticket(ticket.id), condition=m.Ticket.status == TICKET_QUEUED)

        try:
            write_transaction(self.connection, build)
        except (TransactWriteError, Unavailable) as exc:
            log.error("ticket %s could not be dropped after a failed publish: %s", ticket.id, exc)
            raise Unavailable("dynamodb is not answering") from exc

    def get_ticket(self, ticket_id: str) -> Ticket | None:
        item = get_item(self.models.Ticket, ticket_id)
        return ticket_from_model(item) if item is not None else None

    def create_seckill_order(self, order: Order, ticket: Ticket) -> SeckillOutcome:
        """The cart order's transaction for a flash sale, all or nothing:

            put the order              (it does not exist)
            put ORDER#<sale>#<user>    (it does not exist: one order per user and sale)
            stock -= 1                 (stock >= 1) on the item `order.sale_id`
                                       names: the sale, or one shard `<sale>#<k>`
            ticket QUEUED -> ORDERED   (still QUEUED: a redelivery changes nothing)

        Returns TICKET_ORDERED, or why nothing changed: TICKET_DUPLICATE,
        TICKET_SOLD_OUT, or TICKET_QUEUED's absence as "NOT_QUEUED" (decided already).
        """
        m = self.models
        assert order.sale_id and sale_of(order.sale_id) == ticket.sale_id
        assert len(order.lines) == 1
        now = iso(order.create_time)
        bought = m.SeckillMarker(bought_key(ticket.sale_id, ticket.username),
                                 ticket_id=ticket.id, order_id=order.id, create_time=now)

        def build(tx: TransactWrite) -> None:
            # pynamodb sends puts before updates: reasons are in this order.
            tx.save(model_from_order(m, order), condition=m.Order.id.does_not_exist())
            tx.save(bought, condition=m.SeckillMarker.id.does_not_exist())
            put_event(m, tx, events.created(order, order.create_time))
            tx.update(m.Sale(order.sale_id), actions=[m.Sale.stock.add(-order.lines[0].num)],
                      condition=m.Sale.stock >= order.lines[0].num)
            tx.update(m.Ticket(ticket.id),
                      actions=[m.Ticket.status.set(TICKET_ORDERED),
                               m.Ticket.order_id.set(order.id),
                               m.Ticket.update_time.set(now)],
                      condition=m.Ticket.status == TICKET_QUEUED)

        try:
            write_transaction(self.connection, build, attempts=3)
            return SeckillOutcome.ORDERED
        except TransactWriteError as exc:
            # [order, bought, event, sale, ticket]; the event has no condition
            failed = [r == "ConditionalCheckFailed" for r in reasons(exc)] + [False] * 5
            if failed[4]:
                return SeckillOutcome.NOT_QUEUED
            if failed[1]:
                return SeckillOutcome.DUPLICATE
            if failed[3]:
                return SeckillOutcome.SOLD_OUT
            if failed[0]:
                raise Conflict(f"order {order.id} exists already") from exc
            log.warning("flash-sale order %s failed: %s %s", order.id, reasons(exc), exc)
            raise Unavailable("the order could not be written; try again") from exc

    def finish_ticket(self, ticket: Ticket, status: str, *, release_claim: bool,
                      now: datetime) -> bool:
        """QUEUED -> `status` (no order). With `release_claim` the user's claim on the
        sale goes in the same transaction, so that they may ask again. False when
        the ticket was not QUEUED any more."""
        m = self.models
        update = {"actions": [m.Ticket.status.set(status),
                              m.Ticket.update_time.set(iso(now))],
                  "condition": m.Ticket.status == TICKET_QUEUED}
        if release_claim:

            def build(tx: TransactWrite) -> None:
                # deletes go before updates: reasons are [claim, ticket]
                tx.delete(m.SeckillMarker(claim_key(ticket.sale_id, ticket.username)),
                          condition=m.SeckillMarker.ticket_id == ticket.id)
                tx.update(m.Ticket(ticket.id), **update)

            try:
                write_transaction(self.connection, build)
                return True
            except TransactWriteError as exc:
                why = reasons(exc) + [None, None]
                if why[1] == "ConditionalCheckFailed":
                    return False
                if why[0] != "ConditionalCheckFailed":
                    raise Unavailable(f"ticket {ticket.id}: {why[:2]}") from exc
                # the claim is not this ticket's: leave it, finish the ticket alone
        with conditional() as written:
            m.Ticket(ticket.id).update(**update)
        return written.held


