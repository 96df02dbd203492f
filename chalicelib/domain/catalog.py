"""Goods, cart lines and flash sales with their tickets."""

from __future__ import annotations

import enum
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

from chalicelib.domain.errors import Conflict
from chalicelib.domain.money import money_str
from chalicelib.domain.order import GOODS_ID_RE


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
