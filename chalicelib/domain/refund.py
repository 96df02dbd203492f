"""Refunds: records of their own, keyed by the request number sent to Alipay.

A refund is written PENDING before the provider is asked, in a write that keeps
the order's succeeded + pending refunds within what was paid and allows one
pending refund per order; the provider's answer makes it SUCCEEDED or FAILED.
An unknown answer leaves it PENDING, and it is settled by asking (never by
refunding again).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from chalicelib.domain.errors import Conflict
from chalicelib.domain.money import money_str
from chalicelib.domain.order import iso

MAX_REASON_CHARS = 256
SYSTEM_OPERATOR = "system"  # the refunds the service makes itself (money for a closed order)
REFUND_ID_RE = re.compile(r"^REFUND_[A-Za-z0-9_]{1,57}$")  # Alipay: 64 of [A-Za-z0-9_]


class RefundStatus(enum.StrEnum):
    PENDING = "PENDING"  # asked, or about to be; the answer is not known yet
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"  # refused, with the provider's reason


@dataclass(frozen=True)
class Refund:
    id: str  # the out_request_no sent to the provider
    order_id: str
    amount_fen: int
    reason: str
    status: RefundStatus
    operator: str
    create_time: datetime
    finish_time: datetime | None = None
    failure_code: str | None = None
    failure_message: str | None = None
    idempotency_key: str | None = None

    def to_wire(self) -> dict[str, Any]:
        failure = None
        if self.failure_code is not None:
            failure = {"code": self.failure_code, "message": self.failure_message or ""}
        return {
            "refundId": self.id,
            "orderId": self.order_id,
            "amount": money_str(self.amount_fen),
            "reason": self.reason,
            "status": self.status.value,
            "operator": self.operator,
            "createTime": iso(self.create_time),
            "finishTime": iso(self.finish_time),
            "failure": failure,
        }


def refund_id(order_id: str, n: int) -> str:
    """The n-th refund of an order (1, 2, ...): each partial refund has its own number."""
    return f"REFUND_{order_id}_{n}"


def refund_request_no(order_id: str) -> str:
    """The refund of a payment that came after its order closed: derived from the
    order, so that a retried refund is the same refund."""
    return f"REFUND_{order_id}"


class RefundNotAllowed(Conflict):
    """The order is not in a state that can be refunded (not PAID)."""


class RefundInProgress(Conflict):
    """The order has a PENDING refund; one at a time."""


class RefundExceedsPaid(Conflict):
    """More than what is left of the payment."""
