"""DynamoDB through pynamodb: the models and the transactions.

The only module that imports pynamodb. Every state change of an order is a
conditional write on its current status, so that duplicates, redeliveries and
races (pay against timeout, pay against cancel) resolve to exactly one winner:

    bridge A (pay)                       bridge B (check)
    read order: UNPAID                   read order: UNPAID
    update if status=UNPAID -> PAID  ok
                                         transact if status=UNPAID -> CLOSED,
                                         stock += n                  cancelled
                                         read order: PAID -> nothing to do

`AWS_ENDPOINT_URL_DYNAMODB` points models and transactions at moto's server
alike; no connection is opened at import.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pynamodb.attributes import (
    ListAttribute,
    MapAttribute,
    NumberAttribute,
    UnicodeAttribute,
)
from pynamodb.connection import Connection
from pynamodb.exceptions import (
    DeleteError,
    DoesNotExist,
    GetError,
    PutError,
    PynamoDBConnectionError,
    QueryError,
    ScanError,
    TableError,
    TransactWriteError,
    UpdateError,
)
from pynamodb.indexes import AllProjection, GlobalSecondaryIndex, KeysOnlyProjection
from pynamodb.models import Model
from pynamodb.transactions import TransactWrite

from chalicelib import config
from chalicelib.orders import (
    CLOSED,
    PAID,
    REFUNDED,
    UNPAID,
    Conflict,
    Line,
    Order,
    OutOfStock,
    Unavailable,
    iso,
    parse_iso,
)

log = logging.getLogger(__name__)

_settings = config.get()
_REGION = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
_UNPAID_FLAG = "1"


class _Meta:
    region = _REGION
    billing_mode = "PAY_PER_REQUEST"
    connect_timeout_seconds = 3
    read_timeout_seconds = 10
    max_retry_attempts = 2


class GoodsModel(Model):
    class Meta(_Meta):
        table_name = _settings.goods_table

    id = UnicodeAttribute(hash_key=True)
    name = UnicodeAttribute()
    price_fen = NumberAttribute()
    stock = NumberAttribute()


class CartLineModel(Model):
    class Meta(_Meta):
        table_name = _settings.carts_table

    username = UnicodeAttribute(hash_key=True)
    goods_id = UnicodeAttribute(range_key=True)
    num = NumberAttribute()


class OrderLineAttribute(MapAttribute[str, Any]):
    goods_id = UnicodeAttribute()
    name = UnicodeAttribute()
    price_fen = NumberAttribute()
    num = NumberAttribute()


class UserOrdersIndex(GlobalSecondaryIndex["OrderModel"]):
    class Meta:
        index_name = "by-user"
        projection = AllProjection()

    username = UnicodeAttribute(hash_key=True)
    create_time = UnicodeAttribute(range_key=True)


class UnpaidIndex(GlobalSecondaryIndex["OrderModel"]):
    """Sparse: `unpaid` exists only while the order is UNPAID."""

    class Meta:
        index_name = "unpaid-by-check-time"
        projection = KeysOnlyProjection()

    unpaid = UnicodeAttribute(hash_key=True)
    check_time = UnicodeAttribute(range_key=True)


class OrderModel(Model):
    class Meta(_Meta):
        table_name = _settings.orders_table

    id = UnicodeAttribute(hash_key=True)
    username = UnicodeAttribute()
    status = UnicodeAttribute()
    source_type = UnicodeAttribute()
    pay_type = UnicodeAttribute()
    lines = ListAttribute(of=OrderLineAttribute)
    total_fen = NumberAttribute()
    create_time = UnicodeAttribute()
    update_time = UnicodeAttribute()
    expire_time = UnicodeAttribute()
    check_time = UnicodeAttribute()
    pay_time = UnicodeAttribute(null=True)
    close_time = UnicodeAttribute(null=True)
    end_time = UnicodeAttribute(null=True)
    consign_time = UnicodeAttribute(null=True)
    transaction_id = UnicodeAttribute(null=True)
    notify_id = UnicodeAttribute(null=True)
    refund_request_no = UnicodeAttribute(null=True)
    unpaid = UnicodeAttribute(null=True)

    by_user = UserOrdersIndex()
    unpaid_due = UnpaidIndex()


MODELS: tuple[type[Model], ...] = (GoodsModel, CartLineModel, OrderModel)

_DYNAMO_ERRORS = (
    PynamoDBConnectionError,
    GetError,
    PutError,
    UpdateError,
    DeleteError,
    QueryError,
    ScanError,
    TableError,
)


@dataclass(frozen=True)
class Goods:
    id: str
    name: str
    price_fen: int
    stock: int


def _order_from_model(m: OrderModel) -> Order:
    def opt(v: str | None) -> datetime | None:
        return parse_iso(v) if v else None

    return Order(
        id=m.id,
        username=m.username,
        status=m.status,
        source_type=m.source_type,
        pay_type=m.pay_type,
        lines=[
            Line(goods_id=x.goods_id, name=x.name, price_fen=int(x.price_fen), num=int(x.num))
            for x in m.lines
        ],
        create_time=parse_iso(m.create_time),
        update_time=parse_iso(m.update_time),
        expire_time=parse_iso(m.expire_time),
        check_time=parse_iso(m.check_time),
        pay_time=opt(m.pay_time),
        close_time=opt(m.close_time),
        end_time=opt(m.end_time),
        consign_time=opt(m.consign_time),
        transaction_id=m.transaction_id,
        refund_request_no=m.refund_request_no,
    )


def _model_from_order(o: Order) -> OrderModel:
    return OrderModel(
        o.id,
        username=o.username,
        status=o.status,
        source_type=o.source_type,
        pay_type=o.pay_type,
        lines=[
            OrderLineAttribute(goods_id=x.goods_id, name=x.name, price_fen=x.price_fen, num=x.num)
            for x in o.lines
        ],
        total_fen=o.total_fen,
        create_time=iso(o.create_time),
        update_time=iso(o.update_time),
        expire_time=iso(o.expire_time),
        check_time=iso(o.check_time),
        unpaid=_UNPAID_FLAG if o.status == UNPAID else None,
    )


def _reasons(exc: TransactWriteError) -> list[str | None]:
    return [r.code if r is not None else None for r in exc.cancellation_reasons]


class Store:
    """Goods, carts and orders. Plain data in, plain data out."""

    def __init__(self) -> None:
        self._connection: Connection | None = None

    @property
    def connection(self) -> Connection:
        if self._connection is None:
            self._connection = Connection(region=_REGION)
        return self._connection

    # --- set-up -------------------------------------------------------------

    @staticmethod
    def create_tables() -> None:
        for model in MODELS:
            if not model.exists():
                model.create_table(billing_mode="PAY_PER_REQUEST", wait=True)

    def ping(self) -> None:
        try:
            OrderModel.describe_table()
        except _DYNAMO_ERRORS as exc:
            raise Unavailable(f"dynamodb: {exc}") from exc

    # --- goods --------------------------------------------------------------

    def put_goods(self, goods: Goods) -> None:
        GoodsModel(goods.id, name=goods.name, price_fen=goods.price_fen, stock=goods.stock).save()

    def list_goods(self) -> list[Goods]:
        try:
            return sorted(
                (Goods(g.id, g.name, int(g.price_fen), int(g.stock)) for g in GoodsModel.scan()),
                key=lambda g: g.id,
            )
        except _DYNAMO_ERRORS as exc:
            raise Unavailable("dynamodb is not answering") from exc

    def get_goods(self, ids: Iterable[str]) -> dict[str, Goods]:
        keys = sorted(set(ids))
        if not keys:
            return {}
        try:
            return {
                g.id: Goods(g.id, g.name, int(g.price_fen), int(g.stock))
                for g in GoodsModel.batch_get(keys)
            }
        except _DYNAMO_ERRORS as exc:
            raise Unavailable("dynamodb is not answering") from exc

    # --- cart ---------------------------------------------------------------

    def get_cart(self, username: str) -> dict[str, int]:
        try:
            return {
                line.goods_id: int(line.num) for line in CartLineModel.query(username)
            }
        except _DYNAMO_ERRORS as exc:
            raise Unavailable("dynamodb is not answering") from exc

    def set_cart_line(self, username: str, goods_id: str, num: int) -> None:
        try:
            CartLineModel(username, goods_id, num=num).save()
        except _DYNAMO_ERRORS as exc:
            raise Unavailable("dynamodb is not answering") from exc

    def delete_cart_line(self, username: str, goods_id: str) -> None:
        try:
            CartLineModel(username, goods_id).delete()
        except _DYNAMO_ERRORS as exc:
            raise Unavailable("dynamodb is not answering") from exc

    # --- orders -------------------------------------------------------------

    def create_order(self, order: Order, cart: Mapping[str, int] | None) -> None:
        """Put the order, take the stock and (for a cart order) empty the cart, all or nothing.

        `cart` is the cart as read (goods id -> num): each line is deleted on
        the condition that it still holds that num, so a cart changed meanwhile
        cancels the whole transaction instead of losing the change.
        """
        attempts = 3
        for attempt in range(1, attempts + 1):
            try:
                with TransactWrite(connection=self.connection) as tx:
                    tx.save(_model_from_order(order), condition=OrderModel.id.does_not_exist())
                    for line in order.lines:
                        tx.update(
                            GoodsModel(line.goods_id),
                            actions=[GoodsModel.stock.add(-line.num)],
                            condition=GoodsModel.stock >= line.num,
                        )
                    for goods_id, num in (cart or {}).items():
                        tx.delete(
                            CartLineModel(order.username, goods_id),
                            condition=CartLineModel.num == num,
                        )
                return
            except TransactWriteError as exc:
                reasons = _reasons(exc)
                if "ConditionalCheckFailed" in reasons:
                    # pynamodb sends condition checks, deletes, puts, updates in that order.
                    kinds = [("cart", gid) for gid in (cart or {})] + [("order", order.id)]
                    kinds += [("stock", line.goods_id) for line in order.lines]
                    kind, key = kinds[reasons.index("ConditionalCheckFailed")]
                    if kind == "stock":
                        raise OutOfStock(key) from exc
                    if kind == "order":
                        raise Conflict(f"order {key} exists already") from exc
                    raise Conflict("the cart changed while ordering; try again") from exc
                retryable = exc.cause_response_code == "TransactionInProgressException" or any(
                    r in ("TransactionConflict", "ThrottlingError") for r in reasons
                )
                if retryable and attempt < attempts:
                    time.sleep(random.uniform(0.02, 0.1) * attempt)
                    continue
                log.warning("create order %s failed: %s %s", order.id, reasons, exc)
                raise Unavailable("the order could not be written; try again") from exc
            except _DYNAMO_ERRORS as exc:
                raise Unavailable("dynamodb is not answering") from exc

    def get_order(self, order_id: str, *, consistent: bool = True) -> Order | None:
        try:
            return _order_from_model(OrderModel.get(order_id, consistent_read=consistent))
        except DoesNotExist:
            return None
        except _DYNAMO_ERRORS as exc:
            raise Unavailable("dynamodb is not answering") from exc

    def list_orders(self, username: str, limit: int = 100) -> list[Order]:
        try:
            return [
                _order_from_model(m)
                for m in OrderModel.by_user.query(
                    username, scan_index_forward=False, limit=limit
                )
            ]
        except _DYNAMO_ERRORS as exc:
            raise Unavailable("dynamodb is not answering") from exc

    def mark_paid(
        self,
        order_id: str,
        *,
        total_fen: int,
        trade_no: str,
        pay_time: datetime,
        notify_id: str | None,
        now: datetime,
    ) -> bool:
        """UNPAID -> PAID for exactly this amount. False when the order was not UNPAID."""
        try:
            OrderModel(order_id).update(
                actions=[
                    OrderModel.status.set(PAID),
                    OrderModel.transaction_id.set(trade_no),
                    OrderModel.pay_time.set(iso(pay_time)),
                    OrderModel.notify_id.set(notify_id or ""),
                    OrderModel.update_time.set(iso(now)),
                    OrderModel.unpaid.remove(),
                ],
                condition=(OrderModel.status == UNPAID) & (OrderModel.total_fen == total_fen),
            )
            return True
        except UpdateError as exc:
            if exc.cause_response_code == "ConditionalCheckFailedException":
                return False
            raise Unavailable("dynamodb is not answering") from exc
        except _DYNAMO_ERRORS as exc:
            raise Unavailable("dynamodb is not answering") from exc

    def close_order(self, order: Order, *, now: datetime) -> bool:
        """UNPAID -> CLOSED and the stock back, in one transaction. False when not UNPAID."""
        try:
            with TransactWrite(connection=self.connection) as tx:
                tx.update(
                    OrderModel(order.id),
                    actions=[
                        OrderModel.status.set(CLOSED),
                        OrderModel.close_time.set(iso(now)),
                        OrderModel.end_time.set(iso(now)),
                        OrderModel.update_time.set(iso(now)),
                        OrderModel.unpaid.remove(),
                    ],
                    condition=OrderModel.status == UNPAID,
                )
                for line in order.lines:
                    tx.update(GoodsModel(line.goods_id), actions=[GoodsModel.stock.add(line.num)])
            return True
        except TransactWriteError as exc:
            if _reasons(exc)[:1] == ["ConditionalCheckFailed"]:
                return False
            raise Unavailable(f"closing {order.id} failed: {_reasons(exc)}") from exc
        except _DYNAMO_ERRORS as exc:
            raise Unavailable("dynamodb is not answering") from exc

    def mark_refunded(
        self, order_id: str, *, trade_no: str, refund_request_no: str, now: datetime
    ) -> bool:
        """CLOSED -> REFUNDED once the money went back. False when not CLOSED."""
        try:
            OrderModel(order_id).update(
                actions=[
                    OrderModel.status.set(REFUNDED),
                    OrderModel.transaction_id.set(trade_no),
                    OrderModel.refund_request_no.set(refund_request_no),
                    OrderModel.update_time.set(iso(now)),
                ],
                condition=OrderModel.status == CLOSED,
            )
            return True
        except UpdateError as exc:
            if exc.cause_response_code == "ConditionalCheckFailedException":
                return False
            raise Unavailable("dynamodb is not answering") from exc
        except _DYNAMO_ERRORS as exc:
            raise Unavailable("dynamodb is not answering") from exc

    def unpaid_due(self, now: datetime, limit: int = 500) -> list[str]:
        """Ids of UNPAID orders whose check time has passed, oldest first, from the sparse index."""
        try:
            return [
                m.id
                for m in OrderModel.unpaid_due.query(
                    _UNPAID_FLAG, OrderModel.check_time <= iso(now), limit=limit
                )
            ]
        except _DYNAMO_ERRORS as exc:
            raise Unavailable("dynamodb is not answering") from exc
