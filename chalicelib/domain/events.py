"""Order events: what the rest of the shop (logistics, SMS, points) is told.

Each event is written in the same DynamoDB transaction as the change it tells
of (the transactional outbox, chalicelib/store/outbox.py), then published by the
relay (chalicelib/events.py) to the topic exchange `exchange.order.events` with
the type as routing key. A consumer may see an event twice, never zero times,
so every event has an id that is the same each time it is published, and that
names the change, not the write: one change, one id.

What an outbox entry keeps is what the change made (refunded money, the trade,
the refund) and, when its writer had the order in hand, the order's username,
total and lines (`order`), which never change once it is created. The write
that marks an order paid does not read the order (the payment path's one
write), so its event goes without them and the relay joins them when it
publishes, from another event of the order or from the order itself.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from chalicelib.domain.money import money_str
from chalicelib.domain.order import Order, iso


class EventKind(enum.StrEnum):
    CREATED = "order.created"
    PAID = "order.paid"
    CLOSED = "order.closed"
    REFUND_SUCCEEDED = "order.refund.succeeded"
    REFUNDED = "order.refunded"


EVENT_KINDS = tuple(kind.value for kind in EventKind)
EVENT_ID_RE = re.compile(r"EVT_[A-Za-z0-9_]{1,100}")


@dataclass(frozen=True)
class OrderEvent:
    """One change of an order, as the outbox keeps it.

    `seq` orders an order's events: the change's time, then the kind's place in
    an order's life (a refund that completes an order makes two events at once).
    Changes of one order are serialised by their conditional writes, so their
    times follow one another."""

    event_id: str
    kind: EventKind
    order_id: str
    occurred_at: datetime
    data: dict[str, Any] = field(default_factory=dict)
    seq: str = ""
    order: dict[str, Any] | None = None  # order_fields(), when the writer had the order

    def to_wire(self, order: dict[str, Any] | None = None) -> dict[str, Any]:
        """The event as published and POSTed: the change's own fields joined with
        the order's fields that never change (its own, else `order`'s)."""
        fields = self.order or order
        if fields is None:
            raise ValueError(f"event {self.event_id} needs its order's fields")
        return {
            "eventId": self.event_id,
            "type": self.kind.value,
            "orderId": self.order_id,
            "occurredAt": iso(self.occurred_at),
            "data": {**fields, "refundedMoney": "0.00", "transactionId": None, **self.data},
        }


def order_fields(order: Order) -> dict[str, Any]:
    """What of an order never changes once it is made, as events carry it."""
    return {
        "username": order.username,
        "totalMoney": money_str(order.total_fen),
        "items": [{"goodsId": line.goods_id, "name": line.name,
                   "price": money_str(line.price_fen), "num": line.num}
                  for line in order.lines],
    }


# Where a kind comes among an order's events made in one millisecond (a cancel
# right after the create, a refund and the refunded it completes).
_RANK = {EventKind.CREATED: 0, EventKind.PAID: 1, EventKind.CLOSED: 1,
         EventKind.REFUND_SUCCEEDED: 2, EventKind.REFUNDED: 3}


def _event(kind: EventKind, order_id: str, now: datetime, suffix: str,
           order: Order | None = None, **data: Any) -> OrderEvent:
    event_id = f"EVT_{suffix}"
    # the id last: two changes of one millisecond still get two keys
    return OrderEvent(event_id=event_id, kind=kind, order_id=order_id, occurred_at=now,
                      data=data, seq=f"{iso(now)}#{_RANK[kind]}#{event_id}",
                      order=order_fields(order) if order is not None else None)


def created(order: Order, now: datetime) -> OrderEvent:
    return _event(EventKind.CREATED, order.id, now, f"{order.id}_created", order)


def paid(order_id: str, *, trade_no: str, now: datetime) -> OrderEvent:
    """An order leaves UNPAID for PAID once, so the id is the order's."""
    return _event(EventKind.PAID, order_id, now, f"{order_id}_paid", transactionId=trade_no)


def closed(order: Order, now: datetime) -> OrderEvent:
    return _event(EventKind.CLOSED, order.id, now, f"{order.id}_closed", order)


def refund_settled(order: Order, *, refund_id: str, amount_fen: int, now: datetime,
                   trade_no: str | None) -> list[OrderEvent]:
    """A refund that succeeded: its event, and `order.refunded` when it brings the
    refunded money to what was paid (`order` as read before this refund)."""
    refunded = order.refunded_fen + amount_fen
    trade = trade_no or order.transaction_id
    common = {"refundedMoney": money_str(refunded), "transactionId": trade}
    events = [_event(EventKind.REFUND_SUCCEEDED, order.id, now, refund_id, order,
                     refundId=refund_id, amount=money_str(amount_fen), **common)]
    if refunded >= order.total_fen:
        events.append(_event(EventKind.REFUNDED, order.id, now, f"{order.id}_refunded", order,
                             **common))
    return events
