"""Refunds and the orders' timelines.

The rule of refunds is one conditional write each way, on the order and the
refund together:

    reserve   put refund PENDING (new)         order: pending := id,
                                               reserved += amount, count += 1
                                               if status is the expected one,
                                               no refund pending, reserved and
                                               count as read (the caller checked
                                               reserved + amount <= paid)
    settle    refund PENDING -> SUCCEEDED      order: refunded += amount (REFUNDED
                                               when it reaches what was paid),
                                               pending removed, if pending = id
              refund PENDING -> FAILED         order: reserved -= amount, pending
                                               removed, if pending = id
    retry     refund FAILED -> PENDING         order as in reserve

So two operators refunding at once make one PENDING refund and one refusal, and
the sum of succeeded and pending refunds never passes what was paid.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from pynamodb.connection import Connection
from pynamodb.exceptions import TransactWriteError
from pynamodb.transactions import TransactWrite

from chalicelib.domain import (
    REFUNDED,
    EventType,
    Order,
    OrderStatus,
    Refund,
    RefundStatus,
    TimelineEvent,
    Unavailable,
    events,
    iso,
    parse_iso,
)
from chalicelib.domain.reconciliation import bill_day
from chalicelib.store.base import (
    StoreBase,
    dynamo,
    get_item,
    reasons,
    retryable,
    transaction_held,
    write_transaction,
)
from chalicelib.store.models import (
    OPEN_FLAG,
    model_from_refund,
    refund_from_model,
    timeline_item,
)
from chalicelib.store.outbox import put_events

log = logging.getLogger(__name__)


def idempotency_id(order_id: str, key: str) -> str:
    return f"IDEM#{order_id}#{key}"


class RefundStore(StoreBase):
    # --- refunds ----------------------------------------------------------------

    def reserve_refund(self, refund: Refund, order: Order, *,
                       expect_status: OrderStatus) -> bool:
        """The refund PENDING and the order's reservation, both or neither. False
        when the order changed since it was read, another refund is pending, the
        refund exists, or its idempotency key was used."""
        m = self.models
        o = m.Order
        condition = ((o.status == expect_status.value) & o.pending_refund_id.does_not_exist()
                     & _equals_or_absent(o.refund_reserved_fen, order.refund_reserved_fen)
                     & _equals_or_absent(o.refund_count, order.refund_count))

        def build(tx: TransactWrite) -> None:
            tx.save(model_from_refund(m, refund), condition=m.Refund.id.does_not_exist())
            if refund.idempotency_key:
                tx.save(m.Refund(idempotency_id(order.id, refund.idempotency_key),
                                 refund_id=refund.id, order_id=order.id,
                                 create_time=iso(refund.create_time)),
                        condition=m.Refund.id.does_not_exist())
            tx.update(o(order.id), actions=[
                o.pending_refund_id.set(refund.id),
                o.refund_reserved_fen.set(order.refund_reserved_fen + refund.amount_fen),
                o.refund_count.set(order.refund_count + 1),
                o.update_time.set(iso(refund.create_time)),
            ], condition=condition)

        return _written(self.connection, build, f"refund {refund.id}")

    def settle_refund(self, refund: Refund, order: Order, *, status: RefundStatus,
                      now: datetime, failure_code: str | None = None,
                      failure_message: str | None = None,
                      trade_no: str | None = None) -> bool:
        """PENDING -> SUCCEEDED or FAILED, and the order's sums with it. `order` as
        read while this refund is its pending one. A refund that brings the order's
        refunded total to what was paid makes it REFUNDED (`trade_no`: the payment
        it returns, for the refund of money that came after the order closed).
        False when the refund was not PENDING (settled meanwhile)."""
        m = self.models
        o = m.Order
        r = m.Refund
        refund_actions = [r.status.set(status.value), r.finish_time.set(iso(now))]
        if status == RefundStatus.SUCCEEDED:
            refund_actions += [r.open_status.remove(), r.failure_code.remove(),
                               r.failure_message.remove(),
                               r.finish_day.set(bill_day(now).isoformat())]
        else:
            refund_actions += [r.open_status.set(OPEN_FLAG),
                               r.failure_code.set(failure_code or "UNKNOWN"),
                               r.failure_message.set((failure_message or "")[:500])]
        order_actions: list[Any] = [o.pending_refund_id.remove(), o.update_time.set(iso(now))]
        if status == RefundStatus.SUCCEEDED:
            refunded = order.refunded_fen + refund.amount_fen
            order_actions.append(o.refunded_fen.set(refunded))
            if refunded >= order.total_fen:
                order_actions += [o.status.set(REFUNDED.value), o.paid_but_closed.remove(),
                                  o.recheck.remove(), o.end_time.set(iso(now))]
                if trade_no:
                    order_actions += [o.transaction_id.set(trade_no),
                                      o.refund_request_no.set(refund.id)]
        else:
            order_actions.append(
                o.refund_reserved_fen.set(order.refund_reserved_fen - refund.amount_fen))

        def build(tx: TransactWrite) -> None:
            if status == RefundStatus.SUCCEEDED:
                put_events(m, tx, events.refund_settled(
                    order, refund_id=refund.id, amount_fen=refund.amount_fen, now=now,
                    trade_no=trade_no))
            tx.update(r(refund.id), actions=refund_actions,
                      condition=r.status == RefundStatus.PENDING.value)
            tx.update(o(order.id), actions=order_actions,
                      condition=(o.pending_refund_id == refund.id)
                      & _equals_or_absent(o.refunded_fen, order.refunded_fen))

        return transaction_held(self.connection, build,
                                f"refund {refund.id} could not be settled", attempts=3)

    def retry_refund(self, refund: Refund, order: Order, *, now: datetime) -> bool:
        """A FAILED refund PENDING again (the same request number), with the order's
        reservation. False when it was not FAILED or the order changed."""
        m = self.models
        o = m.Order
        r = m.Refund

        def build(tx: TransactWrite) -> None:
            tx.update(r(refund.id), actions=[
                r.status.set(RefundStatus.PENDING.value), r.finish_time.remove(),
                r.failure_code.remove(), r.failure_message.remove(),
                r.open_status.set(OPEN_FLAG), r.create_time.set(iso(now))],
                condition=r.status == RefundStatus.FAILED.value)
            tx.update(o(order.id), actions=[
                o.pending_refund_id.set(refund.id),
                o.refund_reserved_fen.set(order.refund_reserved_fen + refund.amount_fen),
                o.update_time.set(iso(now))],
                condition=(o.status == order.status.value)
                & o.pending_refund_id.does_not_exist()
                & _equals_or_absent(o.refund_reserved_fen, order.refund_reserved_fen))

        return _written(self.connection, build, f"refund {refund.id}")

    def get_refund(self, refund_id: str) -> Refund | None:
        item = get_item(self.models.Refund, refund_id)
        # an idempotency key's item has no status: it is no refund
        return refund_from_model(item) if item is not None and item.status else None

    def refund_for_key(self, order_id: str, key: str) -> Refund | None:
        """The refund an operator's idempotency key made on this order, if any."""
        marker = get_item(self.models.Refund, idempotency_id(order_id, key))
        return self.get_refund(marker.refund_id) if marker is not None else None

    def refunds_of(self, order_id: str) -> list[Refund]:
        m = self.models
        with dynamo():
            return [refund_from_model(x) for x in m.Refund.by_order.query(order_id)
                    if x.status]

    def open_refunds(self, limit: int = 200) -> list[Refund]:
        """PENDING and FAILED refunds, oldest first."""
        m = self.models
        with dynamo():
            return [refund_from_model(x)
                    for x in m.Refund.open_refunds.query(OPEN_FLAG, limit=limit)]

    # --- the timeline -----------------------------------------------------------

    def append_event(self, event: TimelineEvent) -> None:
        m = self.models
        with dynamo():
            timeline_item(m, event).save()

    def timeline(self, order_id: str, limit: int = 1000) -> list[TimelineEvent]:
        m = self.models
        with dynamo():
            return [TimelineEvent(order_id, parse_iso(x.seq.split("#")[0]), EventType(x.type),
                                  json.loads(x.detail))
                    for x in m.Timeline.query(order_id, limit=limit)]


def _written(connection: Connection, build: Callable[[TransactWrite], None], what: str) -> bool:
    """A reservation's transaction: False when a condition failed, or another
    transaction held the order at that moment (the caller reads it again and
    decides again)."""
    try:
        write_transaction(connection, build)
        return True
    except TransactWriteError as exc:
        if "ConditionalCheckFailed" in reasons(exc) or retryable(exc):
            return False
        raise Unavailable(f"{what} could not be written: {reasons(exc)}") from exc


def _equals_or_absent(attribute: Any, value: int) -> Any:
    """attribute = value, where an absent attribute counts as 0 (older items)."""
    return attribute.does_not_exist() | (attribute == value) if value == 0 else (
        attribute == value)
