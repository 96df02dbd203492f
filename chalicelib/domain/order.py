"""The order: its states, lines, ids and times. Nothing here does I/O."""

from __future__ import annotations

import enum
import re
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from chalicelib.domain.money import money_str


class OrderStatus(enum.StrEnum):
    UNPAID = "UNPAID"
    PAID = "PAID"
    CLOSED = "CLOSED"
    REFUNDED = "REFUNDED"


UNPAID = OrderStatus.UNPAID
PAID = OrderStatus.PAID
CLOSED = OrderStatus.CLOSED
REFUNDED = OrderStatus.REFUNDED
STATES = tuple(OrderStatus)

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
# One DynamoDB transaction holds at most 100 actions: the order put, its outbox
# event, its first timeline event, the user's unpaid-orders cap, and per cart line
# one stock update and one cart delete.
MAX_TRANSACTION_ACTIONS = 100
MAX_CART_LINES = (MAX_TRANSACTION_ACTIONS - 4) // 2

ORDER_ID_RE = re.compile(r"^ORDER_[0-9]{13}_[0-9a-f]{16}$")
GOODS_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


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
    status: OrderStatus
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
    # A flash-sale order: the item its unit came from and goes back to, the sale
    # (`<sale>`) or one of its stock shards (`<sale>#<k>`), not the goods.
    sale_id: str | None = None
    # Refunds (chalicelib/domain/refund.py): what succeeded, what succeeded or is
    # pending (never above what was paid), the one pending refund, refunds made so far.
    refunded_fen: int = 0
    refund_reserved_fen: int = 0
    pending_refund_id: str | None = None
    refund_count: int = 0
    # When the payment link Alipay was given stops working (None: no link was issued):
    # a closed order is checked once more after it, in case money came through it.
    link_expire_time: datetime | None = None
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
        order_status, pay_status = _SEED_STATUS[OrderStatus(self.status)]
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
            "refundedMoney": money_str(self.refunded_fen),
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
