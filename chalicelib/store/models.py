"""The pynamodb models, built for the table names the store is given.

The classes are made per set of table names (`models_for`), not at import, so
that nothing reads a setting when the module is imported and one process can
hold stores of several stages (the tests do). Every model of a set shares the
region and timeouts below.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

from pynamodb.attributes import (
    ListAttribute,
    MapAttribute,
    NumberAttribute,
    UnicodeAttribute,
    UnicodeSetAttribute,
)
from pynamodb.indexes import (
    AllProjection,
    GlobalSecondaryIndex,
    IncludeProjection,
    KeysOnlyProjection,
)
from pynamodb.models import Model

from chalicelib.config import Tables
from chalicelib.domain import (
    UNPAID,
    Line,
    Order,
    OrderStatus,
    Refund,
    RefundStatus,
    Sale,
    Ticket,
    TicketStatus,
    TimelineEvent,
    iso,
    parse_iso,
)

UNPAID_FLAG = "1"  # the sparse index's key: present only while the order is UNPAID
OPEN_FLAG = "1"  # a refund's, while it is PENDING or FAILED
RECHECK_FLAG = "1"  # a closed order's, until it was asked about after its link expired
PAID_CLOSED_FLAG = "1"  # an order's, while money is held for it though it closed
UNPAID_ORDERS_PREFIX = "UNPAID#"  # + username: a user's UnpaidOrders item (tickets' table)
CONNECT_TIMEOUT_SECONDS = 3
READ_TIMEOUT_SECONDS = 10
MAX_RETRY_ATTEMPTS = 2


@dataclass(frozen=True)
class Models:
    Goods: Any
    CartLine: Any
    Order: Any
    OrderLine: Any
    Sale: Any
    Ticket: Any
    SeckillMarker: Any
    Refund: Any
    Timeline: Any
    UnpaidOrders: Any
    Reconciliation: Any
    Outbox: Any
    Webhook: Any

    @property
    def all(self) -> tuple[type[Model], ...]:
        """The models that tables are made, scanned and warmed by. Not UnpaidOrders:
        its items are in the tickets' table (a scan by SeckillMarker reads them
        too), and pynamodb's `to_simple_dict`, which tests use on every item of
        a scan, cannot render its string set. (It builds its own client on first
        use: only create_order's rare pass over a full set reads through it.)"""
        return (self.Goods, self.CartLine, self.Order, self.Sale, self.Ticket,
                self.SeckillMarker, self.Refund, self.Timeline, self.Reconciliation,
                self.Outbox, self.Webhook)


@lru_cache(maxsize=8)
def models_for(tables: Tables, region: str) -> Models:
    """The model classes of one set of tables (made once per set, then reused)."""

    class meta:
        billing_mode = "PAY_PER_REQUEST"
        connect_timeout_seconds = CONNECT_TIMEOUT_SECONDS
        read_timeout_seconds = READ_TIMEOUT_SECONDS
        max_retry_attempts = MAX_RETRY_ATTEMPTS

    meta.region = region  # type: ignore[attr-defined]

    class GoodsModel(Model):
        class Meta(meta):
            table_name = tables.goods

        id = UnicodeAttribute(hash_key=True)
        name = UnicodeAttribute()
        price_fen = NumberAttribute()
        stock = NumberAttribute()


    class CartLineModel(Model):
        class Meta(meta):
            table_name = tables.carts

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


    class StatusIndex(GlobalSecondaryIndex["OrderModel"]):
        """The operator's search by status, newest first, within a time range."""

        class Meta:
            index_name = "by-status"
            projection = AllProjection()

        status = UnicodeAttribute(hash_key=True)
        create_time = UnicodeAttribute(range_key=True)

    class TradeIndex(GlobalSecondaryIndex["OrderModel"]):
        """Sparse: the order of an Alipay trade number."""

        class Meta:
            index_name = "by-trade"
            projection = KeysOnlyProjection()

        transaction_id = UnicodeAttribute(hash_key=True)

    class RecheckIndex(GlobalSecondaryIndex["OrderModel"]):
        """Sparse: `recheck` exists while a closed order that had a payment link
        waits to be asked about once more (when the link has expired)."""

        class Meta:
            index_name = "recheck-by-time"
            projection = KeysOnlyProjection()

        recheck = UnicodeAttribute(hash_key=True)
        link_expire_time = UnicodeAttribute(range_key=True)

    class AttentionIndex(GlobalSecondaryIndex["OrderModel"]):
        """Sparse: `paid_but_closed` exists while the provider holds money for a
        closed order that has not gone back yet."""

        class Meta:
            index_name = "paid-but-closed"
            projection = KeysOnlyProjection()

        paid_but_closed = UnicodeAttribute(hash_key=True)
        update_time = UnicodeAttribute(range_key=True)

    class PaidByDayIndex(GlobalSecondaryIndex["OrderModel"]):
        """Sparse: `pay_day` (the payment's day in Asia/Shanghai, the bill's day) is
        set when an order becomes PAID; the reconciliation reads a day's payments."""

        class Meta:
            index_name = "paid-by-day"
            projection = IncludeProjection(["status", "total_fen", "pay_time",
                                            "transaction_id"])

        pay_day = UnicodeAttribute(hash_key=True)
        id = UnicodeAttribute(range_key=True)

    class OrderModel(Model):
        class Meta(meta):
            table_name = tables.orders

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
        refunded_fen = NumberAttribute(null=True)
        refund_reserved_fen = NumberAttribute(null=True)
        pending_refund_id = UnicodeAttribute(null=True)
        refund_count = NumberAttribute(null=True)
        link_expire_time = UnicodeAttribute(null=True)
        recheck = UnicodeAttribute(null=True)
        paid_but_closed = UnicodeAttribute(null=True)
        pay_day = UnicodeAttribute(null=True)

        by_user = UserOrdersIndex()
        by_status = StatusIndex()
        by_trade = TradeIndex()
        recheck_due = RecheckIndex()
        attention = AttentionIndex()
        unpaid_due = UnpaidIndex()
        paid_by_day = PaidByDayIndex()


    # flash sales (chalicelib/seckill.py)

    class SaleModel(Model):
        """A goods on sale for a while, with its own stock (the goods' stock is not touched)."""

        class Meta(meta):
            table_name = tables.sales

        id = UnicodeAttribute(hash_key=True)
        goods_id = UnicodeAttribute()
        name = UnicodeAttribute()
        price_fen = NumberAttribute()
        stock = NumberAttribute()
        start_time = UnicodeAttribute()
        end_time = UnicodeAttribute()
        # A sale whose stock is split over N > 1 items `<sale>#<k>` (store/sales.py);
        # absent: one item, this one, holds the stock.
        shards = NumberAttribute(null=True)


    class TicketModel(Model):
        """A queued request to buy in a flash sale: QUEUED until the bridge decides."""

        class Meta(meta):
            table_name = tables.seckill

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

        class Meta(meta):
            table_name = tables.seckill

        id = UnicodeAttribute(hash_key=True)
        ticket_id = UnicodeAttribute()
        order_id = UnicodeAttribute(null=True)
        create_time = UnicodeAttribute()

    class UnpaidOrdersModel(Model):
        """Per user, in the tickets' table beside the per-user markers:
        `UNPAID#<user>`, `order_ids` the ids of the user's cart orders that may
        still be UNPAID (chalicelib/store/orders.py, "the cap").

        An id is added in its order's create transaction, on the condition that
        the set holds fewer ids than the cap, and taken out only once its order is
        no longer UNPAID: every UNPAID cart order of the user is in the set, so
        they are never more than the cap. A DynamoDB set is never empty: no ids,
        no attribute."""

        class Meta(meta):
            table_name = tables.seckill

        id = UnicodeAttribute(hash_key=True)
        order_ids = UnicodeSetAttribute(null=True)

    # refunds (chalicelib/domain/refund.py)

    class RefundsByOrderIndex(GlobalSecondaryIndex["RefundModel"]):
        class Meta:
            index_name = "by-order"
            projection = AllProjection()

        order_id = UnicodeAttribute(hash_key=True)
        create_time = UnicodeAttribute(range_key=True)

    class OpenRefundsIndex(GlobalSecondaryIndex["RefundModel"]):
        """Sparse: `open_status` exists while the refund is PENDING or FAILED."""

        class Meta:
            index_name = "open-by-time"
            projection = AllProjection()

        open_status = UnicodeAttribute(hash_key=True)
        create_time = UnicodeAttribute(range_key=True)

    class SucceededByDayIndex(GlobalSecondaryIndex["RefundModel"]):
        """Sparse: `finish_day` (Asia/Shanghai) is set when a refund SUCCEEDED."""

        class Meta:
            index_name = "succeeded-by-day"
            projection = AllProjection()

        finish_day = UnicodeAttribute(hash_key=True)
        id = UnicodeAttribute(range_key=True)

    class RefundModel(Model):
        """A refund (`id` REFUND_...), or an operator's idempotency key
        (`id` IDEM#<order>#<key>, `refund_id` the refund it made) in the same table."""

        class Meta(meta):
            table_name = tables.refunds

        id = UnicodeAttribute(hash_key=True)
        order_id = UnicodeAttribute(null=True)
        amount_fen = NumberAttribute(null=True)
        reason = UnicodeAttribute(null=True)
        status = UnicodeAttribute(null=True)
        operator = UnicodeAttribute(null=True)
        create_time = UnicodeAttribute(null=True)
        finish_time = UnicodeAttribute(null=True)
        failure_code = UnicodeAttribute(null=True)
        failure_message = UnicodeAttribute(null=True)
        idempotency_key = UnicodeAttribute(null=True)
        open_status = UnicodeAttribute(null=True)
        refund_id = UnicodeAttribute(null=True)
        finish_day = UnicodeAttribute(null=True)

        by_order = RefundsByOrderIndex()
        open_refunds = OpenRefundsIndex()
        succeeded_by_day = SucceededByDayIndex()

    class TimelineModel(Model):
        """An order's events: `seq` is the event's time and a random tail, so a
        query of the order gives them in time order."""

        class Meta(meta):
            table_name = tables.timeline

        order_id = UnicodeAttribute(hash_key=True)
        seq = UnicodeAttribute(range_key=True)
        type = UnicodeAttribute()
        detail = UnicodeAttribute()  # JSON

    # reconciliation (chalicelib/reconcile.py)

    class ReportsIndex(GlobalSecondaryIndex["ReconciliationModel"]):
        """The days' reports, newest first: `report_list` is set on report items only."""

        class Meta:
            index_name = "reports-by-day"
            projection = AllProjection()

        report_list = UnicodeAttribute(hash_key=True)
        day = UnicodeAttribute(range_key=True)

    class OpenReconciliationIndex(GlobalSecondaryIndex["ReconciliationModel"]):
        """Sparse: `attention` is "DIFFERENCE" on an open difference, "FAILED" on a
        failed day's report; removed when resolved or run again cleanly."""

        class Meta:
            index_name = "open-by-day"
            projection = AllProjection()

        attention = UnicodeAttribute(hash_key=True)
        day = UnicodeAttribute(range_key=True)

    class ReconciliationModel(Model):
        """A day's items: `pk` DAY#<yyyy-MM-dd>; `sk` REPORT, DIFF#<id> (a difference)
        or EXTRA#<trade or request no> (a bill row the day's own records lacked).
        `body` is the item's JSON."""

        class Meta(meta):
            table_name = tables.reconciliations

        pk = UnicodeAttribute(hash_key=True)
        sk = UnicodeAttribute(range_key=True)
        day = UnicodeAttribute()
        body = UnicodeAttribute()
        report_list = UnicodeAttribute(null=True)
        attention = UnicodeAttribute(null=True)
        run_id = UnicodeAttribute(null=True)  # the report's: the run that may write it
        lease_until = UnicodeAttribute(null=True)  # the report's, while a run holds it
        requested_by = UnicodeAttribute(null=True)  # the report's: who asked for a run

        reports = ReportsIndex()
        open_items = OpenReconciliationIndex()

    # order events (chalicelib/events.py) and webhooks (chalicelib/webhooks.py)

    class UnsentIndex(GlobalSecondaryIndex["OutboxModel"]):
        """Sparse: `unsent` is set while an event is not published yet, for the
        backstop sweep (no scan); whole items, so a sweep reads its batch in one query."""

        class Meta:
            index_name = "unsent"
            projection = AllProjection()

        unsent = UnicodeAttribute(hash_key=True)
        # the event's own key: time, then its place among an order's events of that
        # time, so that pages of the index keep each order's events in their order
        seq = UnicodeAttribute(range_key=True)

    class ParkedEventsIndex(GlobalSecondaryIndex["OutboxModel"]):
        """Sparse: `parked` is set on an event that could not be published."""

        class Meta:
            index_name = "parked"
            projection = AllProjection()

        parked = UnicodeAttribute(hash_key=True)
        occurred_at = UnicodeAttribute(range_key=True)

    class OutboxModel(Model):
        """An order's events, written in the transaction of their change; `seq`
        orders them. Its stream (NEW_IMAGE) feeds the relay."""

        class Meta(meta):
            table_name = tables.outbox

        order_id = UnicodeAttribute(hash_key=True)
        seq = UnicodeAttribute(range_key=True)
        event_id = UnicodeAttribute()
        type = UnicodeAttribute()
        occurred_at = UnicodeAttribute()
        data = UnicodeAttribute()  # JSON: the change's own fields
        order = UnicodeAttribute(null=True)  # JSON: the order's fields, when the writer had it
        unsent = UnicodeAttribute(null=True)
        parked = UnicodeAttribute(null=True)
        failures = NumberAttribute(null=True)
        reason = UnicodeAttribute(null=True)  # why it was parked
        sent_time = UnicodeAttribute(null=True)

        unsent_events = UnsentIndex()
        parked_events = ParkedEventsIndex()

    class SubscriptionsIndex(GlobalSecondaryIndex["WebhookModel"]):
        class Meta:
            index_name = "subscriptions"
            projection = AllProjection()

        sub_list = UnicodeAttribute(hash_key=True)
        create_time = UnicodeAttribute(range_key=True)

    class DeliveriesBySubscriptionIndex(GlobalSecondaryIndex["WebhookModel"]):
        class Meta:
            index_name = "deliveries-by-subscription"
            projection = AllProjection()

        subscription_id = UnicodeAttribute(hash_key=True)
        create_time = UnicodeAttribute(range_key=True)

    class DeliveriesByOrderIndex(GlobalSecondaryIndex["WebhookModel"]):
        class Meta:
            index_name = "deliveries-by-order"
            projection = AllProjection()

        order_id = UnicodeAttribute(hash_key=True)
        create_time = UnicodeAttribute(range_key=True)

    class FailedDeliveriesIndex(GlobalSecondaryIndex["WebhookModel"]):
        """Sparse: `failed` is set while a delivery is FAILED."""

        class Meta:
            index_name = "failed-deliveries"
            projection = AllProjection()

        failed = UnicodeAttribute(hash_key=True)
        create_time = UnicodeAttribute(range_key=True)

    class WebhookModel(Model):
        """Subscriptions (`id` WH_...) and deliveries (`id` DLV_...); `body` is the
        item's JSON (a delivery's keeps its attempts)."""

        class Meta(meta):
            table_name = tables.webhooks

        id = UnicodeAttribute(hash_key=True)
        create_time = UnicodeAttribute()
        body = UnicodeAttribute()
        status = UnicodeAttribute(null=True)  # a delivery's
        sub_list = UnicodeAttribute(null=True)  # "SUB" on a live subscription
        subscription_id = UnicodeAttribute(null=True)
        order_id = UnicodeAttribute(null=True)
        failed = UnicodeAttribute(null=True)
        secret = UnicodeAttribute(null=True)  # a subscription's signing secret
        tries = NumberAttribute(null=True)  # a delivery's attempts so far

        subscriptions = SubscriptionsIndex()
        by_subscription = DeliveriesBySubscriptionIndex()
        by_order = DeliveriesByOrderIndex()
        failed_deliveries = FailedDeliveriesIndex()

    return Models(Goods=GoodsModel, CartLine=CartLineModel, Order=OrderModel,
                  OrderLine=OrderLineAttribute, Sale=SaleModel, Ticket=TicketModel,
                  SeckillMarker=SeckillMarkerModel, Refund=RefundModel,
                  Timeline=TimelineModel, UnpaidOrders=UnpaidOrdersModel,
                  Reconciliation=ReconciliationModel, Outbox=OutboxModel,
                  Webhook=WebhookModel)


def order_from_model(m: Any) -> Order:
    def opt(v: str | None) -> datetime | None:
        return parse_iso(v) if v else None

    return Order(
        id=m.id,
        username=m.username,
        status=OrderStatus(m.status),
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
        refunded_fen=int(m.refunded_fen or 0),
        refund_reserved_fen=int(m.refund_reserved_fen or 0),
        pending_refund_id=m.pending_refund_id,
        refund_count=int(m.refund_count or 0),
        link_expire_time=opt(m.link_expire_time),
    )


def timeline_item(models: Models, event: TimelineEvent) -> Any:
    """An event's item: `seq` is its time and its ref (a random tail without one),
    so a query of the order gives them in time order and a ref writes once."""
    return models.Timeline(event.order_id, f"{iso(event.time)}#{event.ref or secrets.token_hex(4)}",
                           type=event.type.value,
                           detail=json.dumps(event.detail, ensure_ascii=False, default=str))


def model_from_order(models: Models, o: Order) -> Any:
    return models.Order(
        o.id,
        username=o.username,
        status=o.status,
        source_type=o.source_type,
        pay_type=o.pay_type,
        lines=[
            models.OrderLine(goods_id=x.goods_id, name=x.name, price_fen=x.price_fen, num=x.num)
            for x in o.lines
        ],
        total_fen=o.total_fen,
        create_time=iso(o.create_time),
        update_time=iso(o.update_time),
        expire_time=iso(o.expire_time),
        check_time=iso(o.check_time),
        unpaid=UNPAID_FLAG if o.status == UNPAID else None,
        sale_id=o.sale_id,
    )


def refund_from_model(m: Any) -> Refund:
    return Refund(
        id=m.id, order_id=m.order_id, amount_fen=int(m.amount_fen), reason=m.reason,
        status=RefundStatus(m.status), operator=m.operator,
        create_time=parse_iso(m.create_time),
        finish_time=parse_iso(m.finish_time) if m.finish_time else None,
        failure_code=m.failure_code, failure_message=m.failure_message,
        idempotency_key=m.idempotency_key)


def model_from_refund(models: Models, r: Refund) -> Any:
    return models.Refund(
        r.id, order_id=r.order_id, amount_fen=r.amount_fen, reason=r.reason,
        status=r.status.value, operator=r.operator, create_time=iso(r.create_time),
        finish_time=iso(r.finish_time), failure_code=r.failure_code,
        failure_message=r.failure_message, idempotency_key=r.idempotency_key,
        open_status=OPEN_FLAG if r.status != RefundStatus.SUCCEEDED else None)


def sale_from_model(m: Any) -> Sale:
    return Sale(m.id, m.goods_id, m.name, int(m.price_fen), int(m.stock),
                parse_iso(m.start_time), parse_iso(m.end_time))


def ticket_from_model(m: Any) -> Ticket:
    return Ticket(m.id, m.username, m.sale_id, TicketStatus(m.status), m.order_id,
                  parse_iso(m.create_time), parse_iso(m.update_time))


def model_from_ticket(models: Models, t: Ticket) -> Any:
    return models.Ticket(t.id, username=t.username, sale_id=t.sale_id, status=t.status,
                       order_id=t.order_id, create_time=iso(t.create_time),
                       update_time=iso(t.update_time))
