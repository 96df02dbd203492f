"""What the handlers need from the world, in the shop's own terms.

The handlers take these ports; adapters implement them at the edge, each the only
importer of its library: `chalicelib.store` (pynamodb; `chalicelib.memstore` keeps the
same rules in memory), `chalicelib.broker` (pika), `chalicelib.alipay_gateway`
(python-alipay-sdk). The payment types name no provider: Alipay's trade states
and error codes stay in its adapter, which translates at its edge.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol

from chalicelib.domain import CartLine, Goods, Order, Sale, SeckillOutcome, Ticket

# --- payments -------------------------------------------------------------------


class TradeState(enum.StrEnum):
    WAITING = "WAITING"  # opened, not paid
    PAID = "PAID"
    FINISHED = "FINISHED"  # paid, and the refund window is over
    CLOSED = "CLOSED"  # closed unpaid, or refunded in full


PAID_STATES = (TradeState.PAID, TradeState.FINISHED)


@dataclass(frozen=True)
class Trade:
    """The payment provider's record of an order's payment."""

    order_id: str
    trade_no: str | None
    state: TradeState
    amount_fen: int
    paid_at: datetime | None

    @property
    def paid(self) -> bool:
        return self.state in PAID_STATES


@dataclass(frozen=True)
class PaymentNotice:
    """A provider's notification whose signature and merchant ids were verified.
    `amount_fen` is None when the amount was not a well-formed amount."""

    order_id: str
    trade_no: str
    state: TradeState | None  # None: a state the shop does not act on
    amount_fen: int | None
    paid_at: datetime | None
    notice_id: str | None


@dataclass(frozen=True)
class RefundOutcome:
    order_id: str
    trade_no: str
    refunded_fen: int  # the trade's total refunded so far
    moved: bool  # False: a repeated request, the money moved before


class PaymentError(Exception):
    """Base of what a payment gateway raises."""


class PaymentUnavailable(PaymentError):
    """The outcome is unknown (network, timeout, an unsigned or malformed answer):
    nothing can be concluded; try again later."""


class PaymentRefused(PaymentError):
    """The provider answered, signed, and refused (`code` is its reason)."""

    code: str | None = None


class TradeNotFound(PaymentRefused):
    """The provider has no such trade (never opened)."""


class TradeStateConflict(PaymentRefused):
    """The trade's state forbids it (e.g. closing a trade that was just paid)."""


class NoticeRefused(PaymentError):
    """A notification or return that did not verify; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PaymentGateway(Protocol):
    def page_pay_url(self, order_id: str, amount: Decimal, subject: str,
                     time_expire: datetime) -> str: ...

    def read_notice(self, params: Mapping[str, str]) -> PaymentNotice:
        """Verify an async notification; raises NoticeRefused."""
        ...

    def read_return(self, params: Mapping[str, str]) -> str:
        """Verify the browser's return; the order id, or raises NoticeRefused."""
        ...

    def query_trade(self, order_id: str) -> Trade | None:
        """None when the provider has no such trade."""
        ...

    def close_trade(self, order_id: str) -> None:
        """Close an unpaid trade (one that does not exist is fine); TradeStateConflict
        when it was paid meanwhile."""
        ...

    def refund_payment(self, order_id: str, amount: Decimal,
                       request_no: str) -> RefundOutcome: ...


# --- messages -------------------------------------------------------------------


class Publisher(Protocol):
    def publish_check(self, order_id: str) -> None: ...

    def publish_pay(self, msg: Mapping[str, Any]) -> None: ...

    def publish_seckill(self, msg: Mapping[str, Any]) -> None: ...

    def queue_depth(self, queue: str) -> int: ...

    def ping(self) -> None: ...


# --- storage --------------------------------------------------------------------


class CatalogPort(Protocol):
    def list_goods(self) -> list[Goods]: ...

    def get_goods(self, ids: Iterable[str]) -> dict[str, Goods]: ...

    def get_cart_lines(self, username: str) -> list[CartLine]: ...

    def get_cart(self, username: str) -> dict[str, int]: ...

    def set_cart_line(self, username: str, goods_id: str, num: int,
                      goods: Goods | None = None) -> None: ...

    def refresh_cart_line(self, username: str, goods: Goods) -> None: ...

    def delete_cart_line(self, username: str, goods_id: str) -> None: ...


class OrderPort(Protocol):
    def create_order(self, order: Order, cart: Mapping[str, int] | None) -> None: ...

    def get_order(self, order_id: str, *, consistent: bool = True) -> Order | None: ...

    def list_orders(self, username: str, limit: int = 100) -> list[Order]: ...

    def mark_paid(self, order_id: str, *, total_fen: int, trade_no: str, pay_time: datetime,
                  notify_id: str | None, now: datetime) -> bool: ...

    def close_order(self, order: Order, *, now: datetime) -> bool: ...

    def mark_refunded(self, order_id: str, *, trade_no: str, refund_request_no: str,
                      now: datetime) -> bool: ...

    def unpaid_due(self, now: datetime, limit: int = 500) -> list[str]: ...


class SalesPort(Protocol):
    def list_sales(self) -> list[Sale]: ...

    def get_sale(self, sale_id: str, *, consistent: bool = False) -> Sale | None: ...

    def claim_ticket(self, ticket: Ticket) -> str | None: ...

    def drop_ticket(self, ticket: Ticket) -> None: ...

    def get_ticket(self, ticket_id: str) -> Ticket | None: ...

    def create_seckill_order(self, order: Order, ticket: Ticket) -> SeckillOutcome: ...

    def finish_ticket(self, ticket: Ticket, status: str, *, release_claim: bool,
                      now: datetime) -> bool: ...


class StorePort(CatalogPort, OrderPort, SalesPort, Protocol):
    """Everything the handlers keep: the DynamoDB store and the in-memory one."""

    def warm(self) -> None: ...

    def ping(self) -> None: ...
