"""Refunds: their states and request numbers (Alipay's out_request_no)."""

from __future__ import annotations

import enum


class RefundStatus(enum.StrEnum):
    PENDING = "PENDING"  # asked; the answer is not known yet
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"  # refused, with the provider's reason


def refund_request_no(order_id: str) -> str:
    """The refund of a payment that came after its order closed: derived from the
    order, so that a retried refund is the same refund."""
    return f"REFUND_{order_id}"
