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
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
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
    TICKET_DUPLICATE,
    TICKET_ORDERED,
    TICKET_QUEUED,
    TICKET_SOLD_OUT,
    UNPAID,
    Conflict,
    Line,
    Order,
    OutOfStock,
    Unavailable,
    iso,
    money_str,
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
    # The goods' price and name when the line was put: create-order charges this
    # price on the condition, inside its transaction, that the goods still has it.
    price_fen = NumberAttribute(null=True)
    name = UnicodeAttribute(null=True)


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
    sale_id = UnicodeAttribute(null=True)  # a flash-sale order (its stock is the sale's)

    by_user = UserOrdersIndex()
    unpaid_due = UnpaidIndex()


# --- flash sales (chalicelib/seckill.py) --------------------------------------------


class SaleModel(Model):
    """A goods on sale for a while, with its own stock (the goods' stock is not touched)."""

    class Meta(_Meta):
        table_name = _settings.sales_table

    id = UnicodeAttribute(hash_key=True)
    goods_id = UnicodeAttribute()
    name = UnicodeAttribute()
    price_fen = NumberAttribute()
    stock = NumberAttribute()
    start_time = UnicodeAttribute()
    end_time = UnicodeAttribute()


class TicketModel(Model):
    """A queued request to buy in a flash sale: QUEUED until the bridge decides."""

    class Meta(_Meta):
        table_name = _settings.seckill_table

    id = UnicodeAttribute(hash_key=True)  # TICKET_...
    username = UnicodeAttribute()
    sale_id = UnicodeAttribute()
    status = UnicodeAttribute()
    order_id = UnicodeAttribute(null=True)
    create_time = UnicodeAttribute()
    update_time = UnicodeAttribute()


class SeckillMarkerModel(Model):
    """Per user and sale, in the tickets' table (sale ids hold no `#`):

    `CLAIM#<sale>#<user>`  the user holds a live ticket, or one that ordered: the
                           API's guard, a conditional put beside the ticket's.
    `ORDER#<sale>#<user>`  the user has an order of the sale: the real guard, a
                           conditional put in the order's own transaction.
    """

    class Meta(_Meta):
        table_name = _settings.seckill_table

    id = UnicodeAttribute(hash_key=True)
    ticket_id = UnicodeAttribute()
    order_id = UnicodeAttribute(null=True)
    create_time = UnicodeAttribute()


def _claim_key(sale_id: str, username: str) -> str:
    return f"CLAIM#{sale_id}#{username}"


def _bought_key(sale_id: str, username: str) -> str:
    return f"ORDER#{sale_id}#{username}"


MODELS: tuple[type[Model], ...] = (
    GoodsModel, CartLineModel, OrderModel, SaleModel, TicketModel, SeckillMarkerModel)

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


@dataclass(frozen=True)
class CartLine:
    goods_id: str
    num: int
    price_fen: int | None  # as it was when the line was put (None: an older line)
    name: str | None


class PriceChanged(Conflict):
    """The goods' price is not the one the cart line was put with: nothing was written."""

    code = "PriceChanged"

    def __init__(self, goods_id: str, goods: Goods) -> None:
        super().__init__(f"the price of goods {goods_id} changed to {money_str(goods.price_fen)}; "
                         "the cart shows the new price, order again", goodsId=goods_id)
        self.goods = goods


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


@dataclass(frozen=True)
class Ticket:
    id: str
    username: str
    sale_id: str
    status: str
    order_id: str | None
    create_time: datetime
    update_time: datetime


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
        sale_id=m.sale_id,
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
        sale_id=o.sale_id,
    )


@contextmanager
def _dynamo() -> Iterator[None]:
    """DynamoDB not answering (connection lost, timeouts, retries spent): Unavailable,
    which the routes answer with 503 and the bridge retries."""
    try:
        yield
    except _DYNAMO_ERRORS as exc:
        raise Unavailable("dynamodb is not answering") from exc


def _reasons(exc: TransactWriteError) -> list[str | None]:
    return [r.code if r is not None else None for r in exc.cancellation_reasons]


class Store:
    """Goods, carts and orders. Plain data in, plain data out."""

    def __init__(self) -> None:
        self._connection: Connection | None = None

    @property
    def connection(self) -> Connection:
        if self._connection is None:
            self._connection = Connection(
                region=_REGION,
                connect_timeout_seconds=_Meta.connect_timeout_seconds,
                read_timeout_seconds=_Meta.read_timeout_seconds,
                max_retry_attempts=_Meta.max_retry_attempts,
            )
        return self._connection

    # --- set-up -------------------------------------------------------------

    @staticmethod
    def create_tables() -> None:
        for model in MODELS:
            if not model.exists():
                model.create_table(billing_mode="PAY_PER_REQUEST", wait=True)

    def warm(self) -> None:
        """One botocore client for every model and the transactions, built now.

        pynamodb builds a client per model class on first use (about 10 MB each,
        and threads that first use a class together each build one). A botocore
        client is safe to share between threads once built, and every model has the
        same region, endpoint and timeouts, so they all get this one. The bridge
        calls this before it starts its workers."""
        client = self.connection.client
        for model in MODELS:
            model._get_connection().connection._client = client

    def ping(self) -> None:
        try:
            OrderModel.describe_table()
        except _DYNAMO_ERRORS as exc:
            raise Unavailable(f"dynamodb: {exc}") from exc

    # --- goods --------------------------------------------------------------

    def put_goods(self, goods: Goods) -> None:
        GoodsModel(goods.id, name=goods.name, price_fen=goods.price_fen, stock=goods.stock).save()

    def list_goods(self) -> list[Goods]:
        with _dynamo():
            return sorted(
                (Goods(g.id, g.name, int(g.price_fen), int(g.stock)) for g in GoodsModel.scan()),
                key=lambda g: g.id,
            )

    def get_goods(self, ids: Iterable[str]) -> dict[str, Goods]:
        keys = sorted(set(ids))
        if not keys:
            return {}
        with _dynamo():
            return {
                g.id: Goods(g.id, g.name, int(g.price_fen), int(g.stock))
                for g in GoodsModel.batch_get(keys)
            }

    # --- cart ---------------------------------------------------------------

    def get_cart_lines(self, username: str) -> list[CartLine]:
        with _dynamo():
            return [
                CartLine(m.goods_id, int(m.num),
                         int(m.price_fen) if m.price_fen is not None else None, m.name)
                for m in CartLineModel.query(username)
            ]

    def get_cart(self, username: str) -> dict[str, int]:
        return {line.goods_id: line.num for line in self.get_cart_lines(username)}

    def set_cart_line(self, username: str, goods_id: str, num: int,
                      goods: Goods | None = None) -> None:
        """`goods`: the goods as just read, its price and name kept on the line."""
        with _dynamo():
            CartLineModel(username, goods_id, num=num,
                          price_fen=goods.price_fen if goods else None,
                          name=goods.name if goods else None).save()

    def refresh_cart_line(self, username: str, goods: Goods) -> None:
        """The goods' current price and name onto the user's line, if it still exists."""
        try:
            CartLineModel(username, goods.id).update(
                actions=[CartLineModel.price_fen.set(goods.price_fen),
                         CartLineModel.name.set(goods.name)],
                condition=CartLineModel.num.exists())
        except UpdateError as exc:
            if exc.cause_response_code != "ConditionalCheckFailedException":
                raise Unavailable("dynamodb is not answering") from exc
        except _DYNAMO_ERRORS as exc:
            raise Unavailable("dynamodb is not answering") from exc

    def delete_cart_line(self, username: str, goods_id: str) -> None:
        with _dynamo():
            CartLineModel(username, goods_id).delete()

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
                            condition=(GoodsModel.stock >= line.num)
                            & (GoodsModel.price_fen == line.price_fen),
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
                        line = next(x for x in order.lines if x.goods_id == key)
                        now = self.get_goods([key]).get(key)
                        if now is not None and now.price_fen != line.price_fen:
                            raise PriceChanged(key, now) from exc
                        raise OutOfStock(key) from exc
                    if kind == "order":
                        raise Conflict(f"order {key} exists already") from exc
                    raise Conflict("the cart changed while ordering; try again") from exc
                if _retryable(exc) and attempt < attempts:
                    time.sleep(random.uniform(0.02, 0.1) * attempt)
                    continue
                log.warning("create order %s failed: %s %s", order.id, reasons, exc,
                            extra={"orderId": order.id})
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
        with _dynamo():
            return [
                _order_from_model(m)
                for m in OrderModel.by_user.query(
                    username, scan_index_forward=False, limit=limit
                )
            ]

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
        """UNPAID -> PAID for exactly this amount. False when the order was not UNPAID
        (or does not exist: a failed condition never creates the item)."""
        try:
            # The table's own call rather than Model.update, which asks for ALL_NEW and
            # decodes the whole item that nobody reads here (a quarter of this write's
            # time on moto, see local/bench.py stage 1).
            OrderModel._get_connection().update_item(
                order_id,
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
                    if order.sale_id:  # a flash-sale order gives its unit back to the sale
                        tx.update(SaleModel(order.sale_id),
                                  actions=[SaleModel.stock.add(line.num)])
                    else:
                        tx.update(GoodsModel(line.goods_id),
                                  actions=[GoodsModel.stock.add(line.num)])
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
        with _dynamo():
            return [
                m.id
                for m in OrderModel.unpaid_due.query(
                    _UNPAID_FLAG, OrderModel.check_time <= iso(now), limit=limit
                )
            ]

    # --- flash sales (chalicelib/seckill.py) ----------------------------------

    def put_sale(self, sale: Sale) -> None:
        SaleModel(sale.id, goods_id=sale.goods_id, name=sale.name, price_fen=sale.price_fen,
                  stock=sale.stock, start_time=iso(sale.start_time),
                  end_time=iso(sale.end_time)).save()

    def list_sales(self) -> list[Sale]:
        with _dynamo():
            return sorted((_sale(m) for m in SaleModel.scan()), key=lambda s: s.id)

    def get_sale(self, sale_id: str, *, consistent: bool = False) -> Sale | None:
        """Eventually consistent by default: the API's sold-out fast path only; the
        order's transaction is the real guard."""
        try:
            return _sale(SaleModel.get(sale_id, consistent_read=consistent))
        except DoesNotExist:
            return None
        except _DYNAMO_ERRORS as exc:
            raise Unavailable("dynamodb is not answering") from exc

    def claim_ticket(self, ticket: Ticket) -> str | None:
        """The user's claim on the sale and the QUEUED ticket, both or neither.

        None when written; otherwise the id of the ticket that holds the claim
        already ("" if it went meanwhile). A user holds one live ticket per sale.
        """
        claim = SeckillMarkerModel(_claim_key(ticket.sale_id, ticket.username),
                                   ticket_id=ticket.id, create_time=iso(ticket.create_time))
        try:
            with TransactWrite(connection=self.connection) as tx:
                tx.save(claim, condition=SeckillMarkerModel.id.does_not_exist())
                tx.save(_ticket_model(ticket), condition=TicketModel.id.does_not_exist())
            return None
        except TransactWriteError as exc:
            reasons = _reasons(exc)
            if reasons[:1] == ["ConditionalCheckFailed"]:
                try:
                    held = SeckillMarkerModel.get(claim.id, consistent_read=True)
                    return str(held.ticket_id)
                except DoesNotExist:
                    return ""
                except _DYNAMO_ERRORS as exc2:
                    raise Unavailable("dynamodb is not answering") from exc2
            if "ConditionalCheckFailed" in reasons:
                raise Conflict(f"ticket {ticket.id} exists already") from exc
            raise Unavailable(f"the ticket could not be written: {reasons}") from exc
        except _DYNAMO_ERRORS as exc:
            raise Unavailable("dynamodb is not answering") from exc

    def drop_ticket(self, ticket: Ticket) -> None:
        """Undo claim_ticket (its message could not be published)."""
        try:
            with TransactWrite(connection=self.connection) as tx:
                tx.delete(SeckillMarkerModel(_claim_key(ticket.sale_id, ticket.username)),
                          condition=SeckillMarkerModel.ticket_id == ticket.id)
                tx.delete(TicketModel(ticket.id), condition=TicketModel.status == TICKET_QUEUED)
        except (TransactWriteError, *_DYNAMO_ERRORS) as exc:
            log.error("ticket %s could not be dropped after a failed publish: %s", ticket.id, exc)
            raise Unavailable("dynamodb is not answering") from exc

    def get_ticket(self, ticket_id: str) -> Ticket | None:
        try:
            return _ticket(TicketModel.get(ticket_id, consistent_read=True))
        except DoesNotExist:
            return None
        except _DYNAMO_ERRORS as exc:
            raise Unavailable("dynamodb is not answering") from exc

    def create_seckill_order(self, order: Order, ticket: Ticket) -> str:
        """The cart order's transaction for a flash sale, all or nothing:

            put the order              (it does not exist)
            put ORDER#<sale>#<user>    (it does not exist: one order per user and sale)
            sale stock -= 1            (stock >= 1)
            ticket QUEUED -> ORDERED   (still QUEUED: a redelivery changes nothing)

        Returns TICKET_ORDERED, or why nothing changed: TICKET_DUPLICATE,
        TICKET_SOLD_OUT, or TICKET_QUEUED's absence as "NOT_QUEUED" (decided already).
        """
        assert order.sale_id == ticket.sale_id and len(order.lines) == 1
        now = iso(order.create_time)
        bought = SeckillMarkerModel(_bought_key(ticket.sale_id, ticket.username),
                                    ticket_id=ticket.id, order_id=order.id, create_time=now)
        attempts = 3
        for attempt in range(1, attempts + 1):
            try:
                with TransactWrite(connection=self.connection) as tx:
                    # pynamodb sends puts before updates: reasons are in this order.
                    tx.save(_model_from_order(order), condition=OrderModel.id.does_not_exist())
                    tx.save(bought, condition=SeckillMarkerModel.id.does_not_exist())
                    tx.update(SaleModel(ticket.sale_id),
                              actions=[SaleModel.stock.add(-order.lines[0].num)],
                              condition=SaleModel.stock >= order.lines[0].num)
                    tx.update(TicketModel(ticket.id),
                              actions=[TicketModel.status.set(TICKET_ORDERED),
                                       TicketModel.order_id.set(order.id),
                                       TicketModel.update_time.set(now)],
                              condition=TicketModel.status == TICKET_QUEUED)
                return TICKET_ORDERED
            except TransactWriteError as exc:
                failed = [r == "ConditionalCheckFailed" for r in _reasons(exc)] + [False] * 4
                if failed[3]:
                    return "NOT_QUEUED"
                if failed[1]:
                    return TICKET_DUPLICATE
                if failed[2]:
                    return TICKET_SOLD_OUT
                if failed[0]:
                    raise Conflict(f"order {order.id} exists already") from exc
                if _retryable(exc) and attempt < attempts:
                    time.sleep(random.uniform(0.02, 0.1) * attempt)
                    continue
                log.warning("flash-sale order %s failed: %s %s", order.id, _reasons(exc), exc)
                raise Unavailable("the order could not be written; try again") from exc
            except _DYNAMO_ERRORS as exc:
                raise Unavailable("dynamodb is not answering") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def finish_ticket(self, ticket: Ticket, status: str, *, release_claim: bool,
                      now: datetime) -> bool:
        """QUEUED -> `status` (no order). With `release_claim` the user's claim on the
        sale goes in the same transaction, so that they may ask again. False when
        the ticket was not QUEUED any more."""
        update = {"actions": [TicketModel.status.set(status),
                              TicketModel.update_time.set(iso(now))],
                  "condition": TicketModel.status == TICKET_QUEUED}
        try:
            if release_claim:
                try:
                    with TransactWrite(connection=self.connection) as tx:
                        # deletes go before updates: reasons are [claim, ticket]
                        tx.delete(SeckillMarkerModel(_claim_key(ticket.sale_id, ticket.username)),
                                  condition=SeckillMarkerModel.ticket_id == ticket.id)
                        tx.update(TicketModel(ticket.id), **update)
                    return True
                except TransactWriteError as exc:
                    reasons = _reasons(exc) + [None, None]
                    if reasons[1] == "ConditionalCheckFailed":
                        return False
                    if reasons[0] != "ConditionalCheckFailed":
                        raise Unavailable(f"ticket {ticket.id}: {reasons[:2]}") from exc
                    # the claim is not this ticket's: leave it, finish the ticket alone
            TicketModel(ticket.id).update(**update)
            return True
        except UpdateError as exc:
            if exc.cause_response_code == "ConditionalCheckFailedException":
                return False
            raise Unavailable("dynamodb is not answering") from exc
        except _DYNAMO_ERRORS as exc:
            raise Unavailable("dynamodb is not answering") from exc


def _retryable(exc: TransactWriteError) -> bool:
    return exc.cause_response_code == "TransactionInProgressException" or any(
        r in ("TransactionConflict", "ThrottlingError") for r in _reasons(exc))


def _sale(m: SaleModel) -> Sale:
    return Sale(m.id, m.goods_id, m.name, int(m.price_fen), int(m.stock),
                parse_iso(m.start_time), parse_iso(m.end_time))


def _ticket(m: TicketModel) -> Ticket:
    return Ticket(m.id, m.username, m.sale_id, m.status, m.order_id,
                  parse_iso(m.create_time), parse_iso(m.update_time))


def _ticket_model(t: Ticket) -> TicketModel:
    return TicketModel(t.id, username=t.username, sale_id=t.sale_id, status=t.status,
                       order_id=t.order_id, create_time=iso(t.create_time),
                       update_time=iso(t.update_time))
