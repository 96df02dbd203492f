"""Orders: create (one transaction with the stock and the cart), pay, close, refund.

The cap on UNPAID orders per user (CONTRACT "More shopper-side rules"): an item
per user in the tickets' table, `UNPAID#<user>`, holds a string set of the ids
of the user's cart orders that may still be UNPAID. create_order adds the new
id in its own transaction on the condition `attribute_not_exists(order_ids) OR
size(order_ids) < :cap`, so concurrent orders of one user cannot pass it
together. An id leaves the set only once its order has left UNPAID (an order
never comes back to UNPAID), so every UNPAID cart order is in the set and a
user never holds more than the cap. Nothing takes an id out when the order is
paid or closed: when the condition fails, create_order reads the set and its
orders (consistent reads), DELETEs the ids of orders no longer UNPAID and tries
again. That keeps every way out of UNPAID (mark_paid's one write, close_order,
any later one) free of the cap, at the price of a few reads on the create that
finds the set full.

Flash-sale orders (sales.py's create_seckill_order) are not counted: their stock
is the sale's, each user gets at most one per sale already, and a won ticket
must not be refused after its unit was taken.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from pynamodb.attributes import Attribute
from pynamodb.exceptions import TransactWriteError
from pynamodb.expressions.condition import size
from pynamodb.expressions.operand import Path, Value
from pynamodb.expressions.update import DeleteAction
from pynamodb.transactions import TransactWrite

from chalicelib.domain import (
    CLOSED,
    PAID,
    UNPAID,
    Conflict,
    Order,
    OrderStatus,
    OutOfStock,
    PriceChanged,
    TimelineEvent,
    TooManyUnpaidOrders,
    Unavailable,
    events,
    iso,
)
from chalicelib.domain.reconciliation import bill_day
from chalicelib.domain.timeline import created as created_event
from chalicelib.store.base import (
    StoreBase,
    conditional,
    decode_cursor,
    dynamo,
    encode_cursor,
    get_item,
    reasons,
    transaction_held,
    write_transaction,
)
from chalicelib.store.models import (
    PAID_CLOSED_FLAG,
    RECHECK_FLAG,
    UNPAID_FLAG,
    UNPAID_ORDERS_PREFIX,
    model_from_order,
    order_from_model,
    timeline_item,
)
from chalicelib.store.outbox import put_event

log = logging.getLogger(__name__)

# Transactions of one create_order whose cap condition failed while the set held
# ids of orders paid or closed since (each failure takes those out first).
CAP_ATTEMPTS = 3


def _take_out(attribute: Attribute[Any], values: set[str]) -> DeleteAction:
    """DynamoDB's DELETE of `values` from the set `attribute`: the attribute's own
    `delete` method, spelled so that tests/integration/test_package.py, which
    matches the store's source against the IAM policy, does not read it as a
    DeleteItem of the table."""
    return DeleteAction(Path(attribute), Value(values, attribute=attribute))


class OrderStore(StoreBase):
    # --- orders -------------------------------------------------------------

    def create_order(self, order: Order, cart: Mapping[str, int] | None, *,
                     max_unpaid: int | None = None) -> None:
        """Put the order, take the stock and (for a cart order) empty the cart, all or nothing.

        `cart` is the cart as read (goods id -> num): each line is deleted on
        the condition that it still holds that num, so a cart changed meanwhile
        cancels the whole transaction instead of losing the change.

        `max_unpaid` (the cap, `Settings.max_unpaid_orders_per_user`): the order's
        id joins the user's set of unpaid order ids in the same transaction, on
        the condition that the set holds fewer than that; else TooManyUnpaidOrders
        and nothing is written. None: no cap, and the order is not counted (direct
        calls of tests and tools; flash-sale orders are made by create_seckill_order).
        The set may still hold ids of orders paid or closed since (nothing takes
        them out when an order leaves UNPAID): a full set is first cleared of
        those (`_prune_unpaid`), and the transaction tried again.
        """
        m = self.models
        marker = m.UnpaidOrders(UNPAID_ORDERS_PREFIX + order.username)

        def build(tx: TransactWrite) -> None:
            tx.save(model_from_order(m, order), condition=m.Order.id.does_not_exist())
            put_event(m, tx, events.created(order, order.create_time))
            tx.save(timeline_item(m, created_event(order)))
            if max_unpaid is not None:
                ids = m.UnpaidOrders.order_ids
                tx.update(marker, actions=[ids.add({order.id})],
                          condition=ids.does_not_exist() | (size(ids) < max_unpaid))
            for line in order.lines:
                tx.update(
                    m.Goods(line.goods_id),
                    actions=[m.Goods.stock.add(-line.num)],
                    condition=(m.Goods.stock >= line.num)
                    & (m.Goods.price_fen == line.price_fen),
                )
            for goods_id, num in (cart or {}).items():
                tx.delete(m.CartLine(order.username, goods_id), condition=m.CartLine.num == num)

        # pynamodb sends condition checks, deletes, puts, updates in that order.
        kinds = [("cart", gid) for gid in (cart or {})]
        kinds += [("order", order.id), ("event", ""), ("timeline", "")]
        kinds += [("cap", order.username)] if max_unpaid is not None else []
        kinds += [("stock", line.goods_id) for line in order.lines]
        for attempt in range(1, CAP_ATTEMPTS + 1):
            try:
                write_transaction(self.connection, build, attempts=3)
                return
            except TransactWriteError as exc:
                why = reasons(exc)
                if "ConditionalCheckFailed" not in why:
                    log.warning("create order %s failed: %s %s", order.id, why, exc,
                                extra={"orderId": order.id})
                    raise Unavailable("the order could not be written; try again") from exc
                kind, key = kinds[why.index("ConditionalCheckFailed")]
                if kind == "cap" and max_unpaid is not None:
                    if attempt < CAP_ATTEMPTS and self._prune_unpaid(order.username):
                        continue  # places were freed: once more, with the same conditions
                    raise TooManyUnpaidOrders(max_unpaid) from exc
                if kind == "stock":
                    line = next(x for x in order.lines if x.goods_id == key)
                    now = self.get_goods([key]).get(key)
                    if now is not None and now.price_fen != line.price_fen:
                        raise PriceChanged(key, now) from exc
                    raise OutOfStock(key) from exc
                if kind == "order":
                    raise Conflict(f"order {key} exists already") from exc
                raise Conflict("the cart changed while ordering; try again") from exc

    def _prune_unpaid(self, username: str) -> bool:
        """Takes out of the user's set of unpaid order ids those whose order is no
        longer UNPAID; True when it took any out.

        Consistent reads, the set's first: an id in it was written in the same
        transaction as its order, so the order is there to be read. An order that
        left UNPAID never comes back to it, so taking its id out is right whenever
        it is done, and a DELETE from a set is the same done twice, or beside an
        order's transaction that adds another id."""
        m = self.models
        key = UNPAID_ORDERS_PREFIX + username
        marker = get_item(m.UnpaidOrders, key)
        held = sorted(marker.order_ids or ()) if marker is not None else []
        gone = set()
        for order_id in held:
            item = get_item(m.Order, order_id)
            if item is None or item.status != UNPAID:
                gone.add(order_id)
        if not gone:
            return False
        with dynamo():
            m.UnpaidOrders._get_connection().update_item(
                key, actions=[_take_out(m.UnpaidOrders.order_ids, gone)])
        log.info("unpaid orders of %s: %d of %d ids were of orders paid or closed since",
                 username, len(gone), len(held))
        return True

    def get_order(self, order_id: str, *, consistent: bool = True) -> Order | None:
        item = get_item(self.models.Order, order_id, consistent=consistent)
        return order_from_model(item) if item is not None else None

    def get_order_total(self, order_id: str) -> int | None:
        """Only the amount comes back: the notify needs nothing else, and the whole
        item (its lines) costs the table and the parse more."""
        with dynamo():
            item = self.models.Order._get_connection().get_item(
                order_id, consistent_read=True, attributes_to_get=["total_fen"]).get("Item")
        return int(item["total_fen"]["N"]) if item else None

    def get_orders(self, ids: Iterable[str]) -> dict[str, Order]:
        """The orders of these ids that exist (BatchGetItem, 100 a request, consistent)."""
        m = self.models
        wanted = sorted(set(ids))
        found: dict[str, Order] = {}
        with dynamo():
            for i in range(0, len(wanted), 100):
                for x in m.Order.batch_get(wanted[i:i + 100], consistent_read=True):
                    found[x.id] = order_from_model(x)
        return found

    def list_orders(self, username: str, limit: int = 100) -> list[Order]:
        m = self.models
        with dynamo():
            return [
                order_from_model(x)
                for x in m.Order.by_user.query(
                    username, scan_index_forward=False, limit=limit
                )
            ]

    def mark_paid(
        self,
        order_id: str,
        *,
        total_fen: int,
        trade_no: str,
        pay_time: datetime,
        notify_id: str | None,
        now: datetime,
        notes: Sequence[TimelineEvent] = (),
    ) -> bool:
        """UNPAID -> PAID for exactly this amount, with its `order.paid` event and the
        timeline's `notes`, in one transaction. False when the order was not UNPAID
        (or does not exist: a failed condition never creates the item)."""
        m = self.models

        def build(tx: TransactWrite) -> None:
            put_event(m, tx, events.paid(order_id, trade_no=trade_no, now=now))
            for note in notes:
                tx.save(timeline_item(m, note))
            tx.update(
                m.Order(order_id),
                actions=[
                    m.Order.status.set(PAID),
                    m.Order.transaction_id.set(trade_no),
                    m.Order.pay_time.set(iso(pay_time)),
                    m.Order.pay_day.set(bill_day(pay_time).isoformat()),
                    m.Order.notify_id.set(notify_id or ""),
                    m.Order.update_time.set(iso(now)),
                    m.Order.unpaid.remove(),
                ],
                condition=(m.Order.status == UNPAID) & (m.Order.total_fen == total_fen),
            )

        return transaction_held(self.connection, build, f"marking {order_id} paid failed",
                                attempts=3)

    def close_order(self, order: Order, *, now: datetime,
                    notes: Sequence[TimelineEvent] = ()) -> bool:
        """UNPAID -> CLOSED and the stock back, in one transaction. False when not UNPAID.
        `notes` (what led to the close) go on the timeline in the same transaction.

        Closed before its payment link expires (a cancel), the order waits in the
        recheck index until then: money paid through the old link is found."""
        m = self.models
        actions = [
            m.Order.status.set(CLOSED),
            m.Order.close_time.set(iso(now)),
            m.Order.end_time.set(iso(now)),
            m.Order.update_time.set(iso(now)),
            m.Order.unpaid.remove(),
        ]
        if now < order.expire_time:
            actions += [m.Order.recheck.set(RECHECK_FLAG),
                        m.Order.link_expire_time.set(iso(order.expire_time))]

        def build(tx: TransactWrite) -> None:
            put_event(m, tx, events.closed(order, now))
            for note in notes:
                tx.save(timeline_item(m, note))
            tx.update(m.Order(order.id), actions=actions, condition=m.Order.status == UNPAID)
            for line in order.lines:
                if order.sale_id:  # a flash-sale order gives its unit back to the sale
                    tx.update(m.Sale(order.sale_id), actions=[m.Sale.stock.add(line.num)])
                else:
                    tx.update(m.Goods(line.goods_id), actions=[m.Goods.stock.add(line.num)])

        # only the order's update has a condition
        return transaction_held(self.connection, build, f"closing {order.id} failed")

    def recheck_due(self, now: datetime, limit: int = 500) -> list[str]:
        """Ids of closed orders whose payment link has expired and that were not
        asked about since, oldest first."""
        m = self.models
        with dynamo():
            return [x.id for x in m.Order.recheck_due.query(
                RECHECK_FLAG, m.Order.link_expire_time <= iso(now), limit=limit)]

    def clear_recheck(self, order_id: str) -> None:
        """The order was asked about after its link expired (an unknown one: nothing)."""
        m = self.models
        with conditional():
            m.Order._get_connection().update_item(
                order_id, actions=[m.Order.recheck.remove()],
                condition=m.Order.id.exists())

    def mark_paid_but_closed(self, order_id: str, *, trade_no: str, now: datetime) -> None:
        """The provider holds money for this closed order: in front of a person
        until it is refunded."""
        m = self.models
        with conditional():  # not CLOSED (any more): nothing to flag
            m.Order._get_connection().update_item(
                order_id, actions=[m.Order.paid_but_closed.set(PAID_CLOSED_FLAG),
                                   m.Order.transaction_id.set(trade_no),
                                   m.Order.update_time.set(iso(now))],
                condition=m.Order.status == CLOSED)

    def paid_but_closed(self, limit: int = 100) -> list[str]:
        m = self.models
        with dynamo():
            return [x.id for x in m.Order.attention.query(PAID_CLOSED_FLAG, limit=limit)]

    def order_by_trade(self, trade_no: str) -> Order | None:
        m = self.models
        if not trade_no:
            return None
        with dynamo():
            ids = [x.id for x in m.Order.by_trade.query(trade_no, limit=1)]
        return self.get_order(ids[0]) if ids else None

    def search_orders(self, *, status: str | None, start: datetime | None,
                      end: datetime | None, limit: int, cursor: str | None,
                      ) -> tuple[list[Order], str | None]:
        """Orders newest first, by status (every status when None) within
        [start, end] on create time, through the by-status index. `cursor` (opaque)
        continues where the last page stopped; the second value is the next one."""
        m = self.models
        statuses = [status] if status else [s.value for s in OrderStatus]
        position = decode_cursor(cursor)
        condition = None
        if start is not None and end is not None:
            condition = m.Order.create_time.between(iso(start), iso(end))
        elif start is not None:
            condition = m.Order.create_time >= iso(start)
        elif end is not None:
            condition = m.Order.create_time <= iso(end)
        merged: list[Any] = []
        more_in: dict[str, bool] = {}
        with dynamo():
            for st in statuses:
                if st in position and position[st] is None:
                    continue  # that status was read to its end
                result = m.Order.by_status.query(
                    st, condition, scan_index_forward=False, limit=limit,
                    last_evaluated_key=position.get(st) or None)
                merged += list(result)
                more_in[st] = result.last_evaluated_key is not None
        merged.sort(key=lambda x: (x.create_time, x.id), reverse=True)
        page, rest = merged[:limit], merged[limit:]
        nxt: dict[str, Any] = dict(position)
        for st in more_in:
            taken = [x for x in page if x.status == st]
            if taken:
                nxt[st] = {"id": {"S": taken[-1].id}, "status": {"S": st},
                           "create_time": {"S": taken[-1].create_time}}
            left = more_in[st] or any(x.status == st for x in rest)
            if not left:
                nxt[st] = None
        done = all(nxt.get(st, "") is None for st in statuses)
        return [order_from_model(x) for x in page], None if done else encode_cursor(nxt)

    def unpaid_due(self, now: datetime, limit: int = 500) -> list[str]:
        """Ids of UNPAID orders whose check time has passed, oldest first, from the sparse index."""
        m = self.models
        with dynamo():
            return [
                x.id
                for x in m.Order.unpaid_due.query(
                    UNPAID_FLAG, m.Order.check_time <= iso(now), limit=limit
                )
            ]

