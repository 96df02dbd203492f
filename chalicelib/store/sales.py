"""Flash sales: sales, tickets, the per-user claims and the sale order."""

from __future__ import annotations

import logging
from datetime import datetime

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


class SaleStore(StoreBase):
    # --- flash sales (chalicelib/seckill.py) ----------------------------------

    def put_sale(self, sale: Sale) -> None:
        m = self.models
        m.Sale(sale.id, goods_id=sale.goods_id, name=sale.name, price_fen=sale.price_fen,
               stock=sale.stock, start_time=iso(sale.start_time),
               end_time=iso(sale.end_time)).save()

    def list_sales(self) -> list[Sale]:
        m = self.models
        with dynamo():
            return sorted((sale_from_model(x) for x in m.Sale.scan()), key=lambda s: s.id)

    def get_sale(self, sale_id: str, *, consistent: bool = False) -> Sale | None:
        """Eventually consistent by default: the API's sold-out fast path only; the
        order's transaction is the real guard."""
        item = get_item(self.models.Sale, sale_id, consistent=consistent)
        return sale_from_model(item) if item is not None else None

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
            sale stock -= 1            (stock >= 1)
            ticket QUEUED -> ORDERED   (still QUEUED: a redelivery changes nothing)

        Returns TICKET_ORDERED, or why nothing changed: TICKET_DUPLICATE,
        TICKET_SOLD_OUT, or TICKET_QUEUED's absence as "NOT_QUEUED" (decided already).
        """
        m = self.models
        assert order.sale_id == ticket.sale_id and len(order.lines) == 1
        now = iso(order.create_time)
        bought = m.SeckillMarker(bought_key(ticket.sale_id, ticket.username),
                                 ticket_id=ticket.id, order_id=order.id, create_time=now)

        def build(tx: TransactWrite) -> None:
            # pynamodb sends puts before updates: reasons are in this order.
            tx.save(model_from_order(m, order), condition=m.Order.id.does_not_exist())
            tx.save(bought, condition=m.SeckillMarker.id.does_not_exist())
            put_event(m, tx, events.created(order, order.create_time))
            tx.update(m.Sale(ticket.sale_id), actions=[m.Sale.stock.add(-order.lines[0].num)],
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


