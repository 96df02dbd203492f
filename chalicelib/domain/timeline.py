"""An order's timeline: every payment event, in time order, for the people who
look after the money."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from chalicelib.domain.money import money_str
from chalicelib.domain.order import Order, iso

MAX_DETAIL_VALUE_CHARS = 512  # a received field longer than this is cut on the timeline


class EventType(enum.StrEnum):
    CREATED = "created"
    PAYMENT_LINK = "payment_link"
    NOTIFY = "notify"  # detail: the fields received, verified, and reason when refused
    PAID = "paid"
    QUERY = "query"  # asked the provider; detail: its answer
    TRADE_CLOSED = "trade_closed"
    CLOSED = "closed"
    REFUND_REQUESTED = "refund_requested"
    REFUND_SUCCEEDED = "refund_succeeded"
    REFUND_FAILED = "refund_failed"
    REFUND_PENDING = "refund_pending"  # the provider's answer was not known
    FORGED_MESSAGE = "forged_message"
    OPERATOR = "operator"  # detail: who, what, why


@dataclass(frozen=True)
class TimelineEvent:
    order_id: str
    time: datetime
    type: EventType
    detail: dict[str, Any] = field(default_factory=dict)
    # Set when the same event may be written twice (a redelivered message): the
    # second write replaces the first instead of adding a copy.
    ref: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"time": iso(self.time), "type": self.type.value, "detail": self.detail}


def created(order: Order) -> TimelineEvent:
    """An order's first event, written with the order (in its transaction)."""
    return TimelineEvent(order.id, order.create_time, EventType.CREATED,
                         {"totalMoney": money_str(order.total_fen), "items": len(order.lines)},
                         ref="created")


def clip(fields: dict[str, Any]) -> dict[str, Any]:
    """Received fields as the timeline keeps them: strings cut to a sane length."""
    out: dict[str, Any] = {}
    for key, value in list(fields.items())[:64]:
        text = value if isinstance(value, str) else str(value)
        out[str(key)[:64]] = text[:MAX_DETAIL_VALUE_CHARS]
    return out
