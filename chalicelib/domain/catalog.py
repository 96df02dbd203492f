"""Goods, cart lines and flash sales with their tickets."""

from __future__ import annotations

import enum
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

from chalicelib.domain.errors import Conflict
from chalicelib.domain.money import money_str
from chalicelib.domain.order import GOODS_ID_RE, MAX_TRANSACTION_ACTIONS


@dataclass(frozen=True)
class Goods:
    id: str
    name: str
    price_fen: int
    stock: int


@dataclass(frozen=True)
class CartLine:
    goods_id: str
    num: int
    price_fen: int | None  # as it was when the line was put (None: an older line)
    name: str | None


class PriceChanged(Conflict):
    """The goods' price is not the one the cart line was put with: nothing was written."""

    def __init__(self, goods_id: str, goods: Goods) -> None:
        super().__init__(f"the price of goods {goods_id} changed to {money_str(goods.price_fen)}; "
                         "the cart shows the new price, order again", goodsId=goods_id)
        self.goods = goods


class SoldOut(Conflict):
    """The sale has no stock left."""


class AlreadyHolding(Conflict):
    """The user holds a live ticket of the sale already (one unit per user)."""


@dataclass(frozen=True)
class Sale:
    """A flash sale: one goods, its own stock, a window, one unit per user."""

    id: str
    goods_id: str
    name: str
    price_fen: int
    stock: int
    start_time: datetime
    end_time: datetime


# A sale's stock in one item, or split over N "shards" <sale>#0 .. <sale>#N-1 (one
# stock item takes ~500 order transactions a second): put_sale writes the sale's
# item and its shards in one transaction.
MAX_SALE_SHARDS = MAX_TRANSACTION_ACTIONS - 1


def shard_key(sale_id: str, shard: int) -> str:
    """The item that holds shard `shard` of a sale's stock (a sale of N > 1 shards)."""
    return f"{sale_id}#{shard}"


def sale_of(stock_item: str) -> str:
    """The sale a stock item belongs to: `<sale>` of `<sale>` or `<sale>#<k>`."""
    return stock_item.split("#", 1)[0]


def split_stock(stock: int, shards: int) -> list[int]:
    """`stock` units over `shards` shards, as even as whole units go (the first
    ones get the remainder): 10 over 4 is [3, 3, 2, 2]."""
    if not 1 <= shards <= MAX_SALE_SHARDS:
        raise ValueError(f"a sale has 1 to {MAX_SALE_SHARDS} shards, not {shards}")
    return [stock // shards + (1 if k < stock % shards else 0) for k in range(shards)]


class TicketStatus(enum.StrEnum):
    QUEUED = "QUEUED"
    ORDERED = "ORDERED"
    SOLD_OUT = "SOLD_OUT"
    DUPLICATE = "DUPLICATE"
    FAILED = "FAILED"


TICKET_QUEUED = TicketStatus.QUEUED
TICKET_ORDERED = TicketStatus.ORDERED
TICKET_SOLD_OUT = TicketStatus.SOLD_OUT
TICKET_DUPLICATE = TicketStatus.DUPLICATE
TICKET_FAILED = TicketStatus.FAILED
TICKET_FINAL = (TICKET_ORDERED, TICKET_SOLD_OUT, TICKET_DUPLICATE, TICKET_FAILED)


class SeckillOutcome(enum.StrEnum):
    """What the flash-sale order's transaction did: a ticket's final status, or
    NOT_QUEUED when the ticket had been decided already (a redelivery)."""

    ORDERED = "ORDERED"
    SOLD_OUT = "SOLD_OUT"
    DUPLICATE = "DUPLICATE"
    NOT_QUEUED = "NOT_QUEUED"


@dataclass(frozen=True)
class Ticket:
    id: str
    username: str
    sale_id: str
    status: TicketStatus
    order_id: str | None
    create_time: datetime
    update_time: datetime


TICKET_ID_RE = re.compile(r"^TICKET_[0-9]{13}_[0-9a-f]{16}$")
SALE_ID_RE = GOODS_ID_RE


def new_ticket_id(now: datetime) -> str:
    return f"TICKET_{int(now.timestamp() * 1000):013d}_{secrets.token_hex(8)}"
