"""What can go wrong, in the shop's words. No HTTP status, no AMQP: the edges
map these, each in one table (app.py's `ERRORS`, the worker's `DISPOSITIONS`)."""

from __future__ import annotations

from typing import Any


class ShopError(Exception):
    """Base of the errors handlers raise. `details` go out with the message
    (e.g. the goods that ran out)."""

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class Invalid(ShopError):
    """The request itself is wrong: a bad value, an empty cart, a bad signature."""


class NotFound(ShopError):
    """No such thing, or not the asker's."""


class Conflict(ShopError):
    """The thing is not in a state that allows this."""


class OutOfStock(Conflict):
    def __init__(self, goods_id: str) -> None:
        super().__init__(f"not enough stock for goods {goods_id}", goodsId=goods_id)
        self.goods_id = goods_id


class TooManyUnpaidOrders(Conflict):
    """The user already holds as many UNPAID orders as one user may: an order more
    would hold more stock for them. Paying or cancelling one frees a place."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"you already hold {limit} unpaid order{'' if limit == 1 else 's'}, the most "
            "one user may hold at once; pay or cancel an unpaid order to free a place "
            "for a new one",
            maxUnpaidOrders=limit)
        self.limit = limit


class Unavailable(ShopError):
    """A dependency (DynamoDB, RabbitMQ, Alipay) did not answer: try again later."""


class Overloaded(ShopError):
    """Back-pressure: come back after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int, **details: Any) -> None:
        super().__init__(message, retryAfter=retry_after, **details)
        self.retry_after = retry_after


class Unprocessable(ShopError):
    """A message no retry can fix (malformed, unknown order, wrong amount)."""


class Forged(Unprocessable):
    """A message that does not prove what it claims: a pay message whose signed
    notify is missing, badly signed or says something else, or a check message
    before its order's check time. It changes nothing and waits for a person."""
