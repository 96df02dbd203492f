"""What the handlers need from the world, in the shop's own terms.

The handlers take these ports; adapters implement them at the edge, each the only
importer of its library: `chalicelib.store` (pynamodb; `chalicelib.memstore` keeps the
same rules in memory), `chalicelib.broker` (pika), `chalicelib.alipay_gateway`
(python-alipay-sdk). The payment types name no provider: Alipay's trade states
and error codes stay in its adapter, which translates at its edge.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import IO, Any, Protocol

from chalicelib.domain import (
    CartLine,
    Goods,
    Order,
    OrderStatus,
    Refund,
    RefundStatus,
    Sale,
    SeckillOutcome,
    Ticket,
    TimelineEvent,
)
from chalicelib.domain.events import OrderEvent
from chalicelib.domain.reconciliation import Difference, Extra, Report
from chalicelib.domain.webhooks import Attempt, Delivery, DeliveryStatus, Subscription

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


class NoticeKind(enum.StrEnum):
    PAYMENT = "PAYMENT"  # the trade's state changed (paid, finished, closed)
    REFUND = "REFUND"  # a refund of the trade was made (never a payment)


@dataclass(frozen=True)
class PaymentNotice:
    """A provider's notification whose signature and merchant ids were verified.
    `amount_fen` is None when the amount was not a well-formed amount. A REFUND
    notice names the refund (`refund_id`, our request number) and the trade's
    total refunded so far (`refunded_fen`)."""

    order_id: str
    trade_no: str
    state: TradeState | None  # None: a state the shop does not act on
    amount_fen: int | None
    paid_at: datetime | None
    notice_id: str | None
    kind: NoticeKind = NoticeKind.PAYMENT
    refund_id: str | None = None
    refunded_fen: int | None = None
    refunded_at: datetime | None = None
    fields: Mapping[str, str] | None = None  # as received, for the order's timeline


@dataclass(frozen=True)
class RefundOutcome:
    order_id: str
    trade_no: str
    refunded_fen: int  # the trade's total refunded so far
    moved: bool  # False: a repeated request, the money moved before


class RefundState(enum.StrEnum):
    SUCCEEDED = "SUCCEEDED"  # the provider made it
    NOT_MADE = "NOT_MADE"  # the provider has no such refund: it may be asked again


class PaymentError(Exception):
    """Base of what a payment gateway raises."""


class PaymentUnavailable(PaymentError):
    """The outcome is unknown (network, timeout, an unsigned or malformed answer):
    nothing can be concluded; try again later."""


class PaymentRefused(PaymentError):
    """The provider answered, signed, and refused. `reason` is its code for why
    (e.g. "ACQ.SELLER_BALANCE_NOT_ENOUGH"), `detail` its words."""

    reason: str = ""
    detail: str = ""


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
                       request_no: str) -> RefundOutcome:
        """Refund `amount` of the order's payment under our `request_no`; the same
        request_no again never refunds twice. PaymentRefused: refused (nothing
        moved); PaymentUnavailable: the outcome is unknown (ask query_refund)."""
        ...

    def query_refund(self, order_id: str, request_no: str) -> RefundState:
        """Whether the refund `request_no` was made; PaymentUnavailable when unknown."""
        ...

    def bill_url(self, day: date) -> str | None:
        """Where the provider serves the trade bill of `day` (a day in its own time
        zone; the URL works for a short while only). None: the provider says it has
        no bill for that day (no trade). PaymentRefused: it refused (e.g. the day's
        bill is not ready yet); PaymentUnavailable: no answer."""
        ...

    def download_bill(self, url: str, out: IO[bytes]) -> int:
        """The file at `url` (from bill_url), written to `out` unchanged, as it comes;
        the number of bytes. PaymentUnavailable: the download failed or timed out."""
        ...


class BillArchive(Protocol):
    """Where the provider's raw bills are kept, unchanged, one per day and download."""

    def keep(self, day: date, name: str, source: IO[bytes]) -> str:
        """Stores `source` (read from where it is to its end) as the bill `name` of
        `day`; answers the stored key. Unavailable when it could not be stored."""
        ...


class WebhookAnswer(Protocol):
    """What a subscriber answered to one POST (chalicelib/webhook_http.py's Answer)."""

    @property
    def status(self) -> int | None: ...  # None: no answer (timeout, refused)

    @property
    def ms(self) -> int: ...

    @property
    def body(self) -> str: ...  # its first characters, or why there was no answer

    @property
    def error(self) -> str | None: ...

    @property
    def ok(self) -> bool: ...


class WebhookSender(Protocol):
    """The subscribers' side of webhooks: whether a URL may be called, and a POST."""

    def check_url(self, url: str) -> str:
        """The URL as it will be called; ValueError says why it may not be."""
        ...

    def post(self, url: str, body: bytes, headers: Mapping[str, str], *,
             timeout: float) -> WebhookAnswer:
        """One attempt, bounded by `timeout` in all; never raises for what the
        subscriber or the network does."""
        ...


# --- messages -------------------------------------------------------------------


class Publisher(Protocol):
    def publish_check(self, order_id: str) -> None: ...

    def publish_pay(self, msg: Mapping[str, Any]) -> None: ...

    def publish_seckill(self, msg: Mapping[str, Any]) -> None: ...

    def publish_refund(self, refund_id: str) -> None: ...

    def publish_event(self, event: Mapping[str, Any]) -> None:
        """An order event (its wire form) to the events exchange, confirmed."""
        ...

    def publish_delivery(self, delivery_id: str, wait_seconds: int | None = None, *,
                         resend: bool = False) -> None:
        """A webhook delivery to attempt now, or after one of the configured waits
        (`resend`: an operator's, attempted whatever its subscriber's state)."""
        ...

    def queue_depth(self, queue: str) -> int: ...

    def parked_counts(self) -> dict[str, int]:
        """Messages waiting for a person, per parked queue."""
        ...

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
    def create_order(self, order: Order, cart: Mapping[str, int] | None, *,
                     max_unpaid: int | None = None) -> None: ...

    def get_order(self, order_id: str, *, consistent: bool = True) -> Order | None: ...

    def get_order_total(self, order_id: str) -> int | None:
        """The fen an order is due (a consistent read of that alone); None: no order."""
        ...

    def get_orders(self, ids: Iterable[str]) -> dict[str, Order]: ...

    def list_orders(self, username: str, limit: int = 100) -> list[Order]: ...

    def mark_paid(self, order_id: str, *, total_fen: int, trade_no: str, pay_time: datetime,
                  notify_id: str | None, now: datetime,
                  notes: Sequence[TimelineEvent] = ()) -> bool:
        """`notes`: timeline events written in the same transaction (none if False)."""
        ...

    def close_order(self, order: Order, *, now: datetime,
                    notes: Sequence[TimelineEvent] = ()) -> bool:
        """`notes`: timeline events written in the same transaction (none if False)."""
        ...

    def unpaid_due(self, now: datetime, limit: int = 500) -> list[str]: ...

    def recheck_due(self, now: datetime, limit: int = 500) -> list[str]: ...

    def clear_recheck(self, order_id: str) -> None: ...

    def mark_paid_but_closed(self, order_id: str, *, trade_no: str, now: datetime) -> None: ...

    def paid_but_closed(self, limit: int = 100) -> list[str]: ...

    def order_by_trade(self, trade_no: str) -> Order | None: ...

    def search_orders(self, *, status: str | None, start: datetime | None,
                      end: datetime | None, limit: int, cursor: str | None,
                      ) -> tuple[list[Order], str | None]: ...


class RefundPort(Protocol):
    def reserve_refund(self, refund: Refund, order: Order, *,
                       expect_status: OrderStatus) -> bool: ...

    def settle_refund(self, refund: Refund, order: Order, *, status: RefundStatus,
                      now: datetime, failure_code: str | None = None,
                      failure_message: str | None = None,
                      trade_no: str | None = None) -> bool: ...

    def retry_refund(self, refund: Refund, order: Order, *, now: datetime) -> bool: ...

    def get_refund(self, refund_id: str) -> Refund | None: ...

    def refund_for_key(self, order_id: str, key: str) -> Refund | None: ...

    def refunds_of(self, order_id: str) -> list[Refund]: ...

    def open_refunds(self, limit: int = 200) -> list[Refund]: ...

    def append_event(self, event: TimelineEvent) -> None: ...

    def timeline(self, order_id: str, limit: int = 1000) -> list[TimelineEvent]: ...


class SalesPort(Protocol):
    def list_sales(self) -> list[Sale]: ...

    def get_sale(self, sale_id: str, *, consistent: bool = False) -> Sale | None: ...

    def put_sale(self, sale: Sale, *, shards: int = 1) -> None:
        """`shards` > 1: the stock split over items `<sale>#<k>` (a big sale's one hot
        item becomes several; README "Past one machine")."""
        ...

    def sale_stock_items(self, sale_id: str, *, consistent: bool = False,
                         ) -> tuple[Sale, list[str]] | None:
        """The sale and the ids of the items holding its stock (the drain's read)."""
        ...

    def sale_shard_stocks(self, sale_id: str, *, consistent: bool = False,
                          ) -> tuple[Sale, list[int]] | None: ...

    def claim_ticket(self, ticket: Ticket) -> str | None: ...

    def drop_ticket(self, ticket: Ticket) -> None: ...

    def get_ticket(self, ticket_id: str) -> Ticket | None: ...

    def create_seckill_order(self, order: Order, ticket: Ticket) -> SeckillOutcome: ...

    def finish_ticket(self, ticket: Ticket, status: str, *, release_claim: bool,
                      now: datetime) -> bool: ...


@dataclass(frozen=True)
class PaidRecord:
    """A payment the shop recorded: an order marked PAID (it may have been refunded
    since), as the reconciliation reads a day of them."""

    order_id: str
    trade_no: str
    total_fen: int
    status: OrderStatus
    pay_time: datetime


class ReconciliationPort(Protocol):
    """The daily reports against the provider's bill (chalicelib/reconcile.py) and
    the shop's records of a bill day they read."""

    def paid_on(self, day: date) -> Iterator[PaidRecord]:
        """The payments whose payment time falls on `day` (Asia/Shanghai), paged."""
        ...

    def refunds_succeeded_on(self, day: date) -> Iterator[Refund]:
        """The refunds that succeeded on `day` (Asia/Shanghai), paged."""
        ...

    def start_reconciliation(self, report: Report, *, now: datetime,
                             lease_seconds: int) -> bool:
        """Writes the RUNNING report of a run, unless another run of the day holds an
        unexpired lease (False). An operator's request of the day is taken with it."""
        ...

    def request_reconciliation(self, day: date, *, by: str, now: datetime) -> bool:
        """Marks the day asked for by an operator, for the reconciler's next round;
        False when a run of it holds a lease (it is running)."""
        ...

    def requested_days(self, limit: int = 50) -> list[date]: ...

    def finish_reconciliation(self, report: Report, differences: Sequence[Difference],
                              extras: Sequence[Extra]) -> bool:
        """The run's result: the day's differences and extras become exactly these
        (an earlier run's resolution kept for the same difference), then the report.
        False (nothing of the report written) when the run lost its lease."""
        ...

    def fail_reconciliation(self, report: Report) -> bool:
        """The FAILED report of a run (earlier differences left as they were); False
        when the run lost its lease."""
        ...

    def get_reconciliation(self, day: date, *, differences: bool = True) -> Report | None: ...

    def list_reconciliations(self, limit: int = 100) -> list[Report]:
        """Newest day first; without differences."""
        ...

    def get_extra(self, day: date, key: str) -> Extra | None: ...

    def resolve_difference(self, day: date, difference_id: str, *, note: str, by: str,
                           now: datetime) -> Difference | None:
        """Marks it resolved with the note, who and when. None: no such difference;
        AlreadyResolved when it was."""
        ...

    def open_differences(self, limit: int = 200) -> list[Difference]: ...

    def failed_days(self, limit: int = 100) -> list[date]: ...


class OutboxPort(Protocol):
    """Order events, written by the order and refund writes in their transactions
    (chalicelib/store/outbox.py); read and marked by the relay."""

    def events_of(self, order_id: str) -> list[OrderEvent]: ...

    def unsent_events(self, order_id: str) -> list[OrderEvent]: ...

    def unsent_orders(self, before: datetime, limit: int = 500) -> list[str]: ...

    def unsent_pages(self, before: datetime, page_size: int = 500
                     ) -> Iterator[list[OrderEvent]]: ...

    def mark_events_sent(self, events: Sequence[OrderEvent], *, now: datetime) -> None: ...

    def event_failed(self, event: OrderEvent, *, reason: str, park_after: int) -> bool: ...

    def parked_events(self, limit: int = 100) -> list[tuple[OrderEvent, str]]: ...


class WebhookPort(Protocol):
    def save_subscription(self, sub: Subscription) -> None: ...

    def get_subscription(self, sub_id: str) -> Subscription | None: ...

    def list_subscriptions(self, limit: int = 200) -> list[Subscription]: ...

    def delete_subscription(self, sub_id: str, *, now: datetime) -> bool: ...

    def create_delivery(self, d: Delivery) -> bool: ...

    def get_delivery(self, delivery_id: str) -> Delivery | None: ...

    def record_attempt(self, d: Delivery, attempt: Attempt, status: DeliveryStatus) -> bool: ...

    def reopen_delivery(self, delivery_id: str) -> Delivery | None: ...

    def deliveries_of_subscription(self, sub_id: str, limit: int = 100) -> list[Delivery]: ...

    def deliveries_of_order(self, order_id: str, limit: int = 100) -> list[Delivery]: ...

    def failed_deliveries(self, limit: int = 100) -> list[Delivery]: ...


class StorePort(CatalogPort, OrderPort, SalesPort, RefundPort, ReconciliationPort, OutboxPort,
                WebhookPort, Protocol):
    """Everything the handlers keep: the DynamoDB store and the in-memory one."""

    def warm(self) -> None: ...

    def ping(self) -> None: ...
