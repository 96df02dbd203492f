"""The order: states, money, ids and the errors handlers raise.

Money is Decimal in code, integer fen in storage and a two-decimal string on
the wire. Nothing here does I/O.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

UNPAID = "UNPAID"
PAID = "PAID"
CLOSED = "CLOSED"
REFUNDED = "REFUNDED"
STATES = (UNPAID, PAID, CLOSED, REFUNDED)

# The seed's two status columns, kept for clients written against it.
_SEED_STATUS = {
    UNPAID: ("0", "0"),
    PAID: ("1", "1"),
    CLOSED: ("2", "2"),
    REFUNDED: ("2", "3"),
}

SOURCE_TYPES = ("1", "2")  # 1 PC, 2 mobile
PAY_TYPE_ALIPAY = "1"
MAX_NUM = 99
# One DynamoDB transaction holds at most 100 actions: the order put, and per
# cart line one stock update and one cart delete.
MAX_TRANSACTION_ACTIONS = 100
MAX_CART_LINES = (MAX_TRANSACTION_ACTIONS - 1) // 2

ORDER_ID_RE = re.compile(r"^ORDER_[0-9]{13}_[0-9a-f]{16}$")
GOODS_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

_CENT = Decimal("0.01")


# --- errors -----------------------------------------------------------------


class ShopError(Exception):
    """Base of the errors a handler raises; app.py turns each into its status."""

    status = 500
    code = "InternalError"

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra
        self.headers: dict[str, str] = {}  # extra HTTP headers of the answer


class BadRequest(ShopError):
    status = 400
    code = "BadRequestError"


class NotFound(ShopError):
    status = 404
    code = "NotFoundError"


class Conflict(ShopError):
    status = 409
    code = "ConflictError"


class OutOfStock(Conflict):
    code = "OutOfStock"

    def __init__(self, goods_id: str) -> None:
        super().__init__(f"not enough stock for goods {goods_id}", goodsId=goods_id)
        self.goods_id = goods_id


class Unavailable(ShopError):
    status = 503
    code = "ServiceUnavailable"


class TooManyRequests(ShopError):
    """Back-pressure: come back after `retry_after` seconds (the `Retry-After` header)."""

    status = 429
    code = "TooManyRequests"

    def __init__(self, message: str, retry_after: int, **extra: Any) -> None:
        super().__init__(message, retryAfter=retry_after, **extra)
        self.headers = {"Retry-After": str(retry_after)}


class Unprocessable(ShopError):
    """A message no retry can fix (malformed, unknown order, wrong amount): park it."""

    status = 422
    code = "Unprocessable"


# --- money ------------------------------------------------------------------


def to_fen(amount: Decimal | str) -> int:
    """'59.90' or Decimal('59.9') -> 5990. Refuses more than two decimals."""
    try:
        value = Decimal(amount)
    except (InvalidOperation, TypeError, ValueError) as exc:
        raise ValueError(f"not an amount: {amount!r}") from exc
    if not value.is_finite():
        raise ValueError(f"not an amount: {amount!r}")
    cents = value.quantize(_CENT)
    if cents != value:
        raise ValueError(f"more than two decimals: {amount!r}")
    return int(cents * 100)


def from_fen(fen: int) -> Decimal:
    return (Decimal(int(fen)) / 100).quantize(_CENT)


def money_str(fen: int) -> str:
    """5990 -> '59.90', the only way money goes on the wire."""
    return f"{from_fen(fen):.2f}"


def parse_amount(text: str) -> int | None:
    """An amount as Alipay writes it ('59.90') -> fen, or None if it is not one."""
    if not isinstance(text, str) or not re.fullmatch(r"[0-9]{1,10}(\.[0-9]{1,2})?", text):
        return None
    return to_fen(text)


# --- time and ids -----------------------------------------------------------


def iso(ts: datetime | None) -> str | None:
    if ts is None:
        return None
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def parse_iso(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def new_order_id(now: datetime) -> str:
    """ORDER_<millis>_<16 hex>: unique, 36 characters of [A-Za-z0-9_] (Alipay's out_trade_no)."""
    return f"ORDER_{int(now.timestamp() * 1000):013d}_{secrets.token_hex(8)}"


# --- the order --------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    goods_id: str
    name: str
    price_fen: int
    num: int

    @property
    def total_fen(self) -> int:
        return self.price_fen * self.num


@dataclass
class Order:
    id: str
    username: str
    status: str
    source_type: str
    lines: list[Line]
    create_time: datetime
    update_time: datetime
    expire_time: datetime
    check_time: datetime
    pay_type: str = PAY_TYPE_ALIPAY
    pay_time: datetime | None = None
    close_time: datetime | None = None
    end_time: datetime | None = None
    consign_time: datetime | None = None
    transaction_id: str | None = None
    refund_request_no: str | None = None
    sale_id: str | None = None  # a flash-sale order: its stock is the sale's, not the goods'
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_num(self) -> int:
        return sum(line.num for line in self.lines)

    @property
    def total_fen(self) -> int:
        return sum(line.total_fen for line in self.lines)

    @property
    def pay_fen(self) -> int:
        return self.total_fen

    @property
    def subject(self) -> str:
        first = self.lines[0].name if self.lines else "order"
        more = len(self.lines) - 1
        return f"{first} and {more} more" if more > 0 else first

    def to_wire(self) -> dict[str, Any]:
        order_status, pay_status = _SEED_STATUS[self.status]
        return {
            "id": self.id,
            "username": self.username,
            "status": self.status,
            "orderStatus": order_status,
            "payStatus": pay_status,
            "payType": self.pay_type,
            "sourceType": self.source_type,
            "totalNum": self.total_num,
            "totalMoney": money_str(self.total_fen),
            "payMoney": money_str(self.pay_fen),
            "createTime": iso(self.create_time),
            "updateTime": iso(self.update_time),
            "expireTime": iso(self.expire_time),
            "payTime": iso(self.pay_time),
            "consignTime": iso(self.consign_time),
            "endTime": iso(self.end_time),
            "closeTime": iso(self.close_time),
            "transactionId": self.transaction_id,
            "items": [
                {
                    "goodsId": line.goods_id,
                    "name": line.name,
                    "price": money_str(line.price_fen),
                    "num": line.num,
                }
                for line in self.lines
            ],
        }


def refund_request_no(order_id: str) -> str:
    """Derived from the order, so that a retried refund is the same refund."""
    return f"REFUND_{order_id}"


# --- flash-sale tickets (chalicelib/seckill.py) -------------------------------

TICKET_QUEUED = "QUEUED"
TICKET_ORDERED = "ORDERED"
TICKET_SOLD_OUT = "SOLD_OUT"
TICKET_DUPLICATE = "DUPLICATE"
TICKET_FAILED = "FAILED"
TICKET_FINAL = (TICKET_ORDERED, TICKET_SOLD_OUT, TICKET_DUPLICATE, TICKET_FAILED)

TICKET_ID_RE = re.compile(r"^TICKET_[0-9]{13}_[0-9a-f]{16}$")
SALE_ID_RE = GOODS_ID_RE


def new_ticket_id(now: datetime) -> str:
    return f"TICKET_{int(now.timestamp() * 1000):013d}_{secrets.token_hex(8)}"
