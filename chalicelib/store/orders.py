"""Orders: create (one transaction with the stock and the cart), pay, close, refund."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping
from datetime import datetime

from pynamodb.exceptions import DoesNotExist, TransactWriteError, UpdateError
from pynamodb.transactions import TransactWrite

from chalicelib.domain import (
    CLOSED,
    PAID,
    REFUNDED,
    UNPAID,
    Conflict,
    Order,
    OutOfStock,
    PriceChanged,
    Unavailable,
    iso,
)
from chalicelib.store.base import DYNAMO_ERRORS, StoreBase, dynamo, reasons, retryable
from chalicelib.store.models import UNPAID_FLAG, model_from_order, order_from_model

log = logging.getLogger(__name__)


class OrderStore(StoreBase):
    # --- orders -------------------------------------------------------------

    def create_order(self, order: Order, cart: Mapping[str, int] | None) -> None:
        """Put the order, take the stock and (for a cart order) empty the cart, all or nothing.

        `cart` is the cart as read (goods id -> num): each line is deleted on
        the condition that it still holds that num, so a cart changed meanwhile
        cancels the whole transaction instead of losing the change.
        """
        m = self.models
        attempts = 3
        for attempt in range(1, attempts + 1):
            try:
                with TransactWrite(connection=self.connection) as tx:
                    tx.save(model_from_order(m, order), condition=m.Order.id.does_not_exist())
                    for line in order.lines:
                        tx.update(
                            m.Goods(line.goods_id),
                            actions=[m.Goods.stock.add(-line.num)],
                            condition=(m.Goods.stock >= line.num)
                            & (m.Goods.price_fen == line.price_fen),
                        )
                    for goods_id, num in (cart or {}).items():
                        tx.delete(
                            m.CartLine(order.username, goods_id),
                            condition=m.CartLine.num == num,
                        )
                return
            except TransactWriteError as exc:
                why = reasons(exc)
                if "ConditionalCheckFailed" in why:
                    # pynamodb sends condition checks, deletes, puts, updates in that order.
                    kinds = [("cart", gid) for gid in (cart or {})] + [("order", order.id)]
                    kinds += [("stock", line.goods_id) for line in order.lines]
                    kind, key = kinds[why.index("ConditionalCheckFailed")]
                    if kind == "stock":
                        line = next(x for x in order.lines if x.goods_id == key)
                        now = self.get_goods([key]).get(key)
                        if now is not None and now.price_fen != line.price_fen:
                            raise PriceChanged(key, now) from exc
                        raise OutOfStock(key) from exc
                    if kind == "order":
                        raise Conflict(f"order {key} exists already") from exc
                    raise Conflict("the cart changed while ordering; try again") from exc
                if retryable(exc) and attempt < attempts:
                    time.sleep(random.uniform(0.02, 0.1) * attempt)
                    continue
                log.warning("create order %s failed: %s %s", order.id, why, exc,
                            extra={"orderId": order.id})
                raise Unavailable("the order could not be written; try again") from exc
            except DYNAMO_ERRORS as exc:
                raise Unavailable("dynamodb is not answering") from exc

    def get_order(self, order_id: str, *, consistent: bool = True) -> Order | None:
        m = self.models
        try:
            return order_from_model(m.Order.get(order_id, consistent_read=consistent))
        except DoesNotExist:
            return None
        except DYNAMO_ERRORS as exc:
            raise Unavailable("dynamodb is not answering") from exc

    def list_orders(self, username: str, limit: int = 100) -> list[Order]:
        m = self.models
        with dynamo():
            return [
                order_from_model(x)
                for x in m.Order.by_user.query(
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
        m = self.models
        try:
            # The table's own call rather than Model.update, which asks for ALL_NEW and
            # decodes the whole item that nobody reads here (a quarter of this write's
            # time on moto, see local/bench.py stage 1).
            m.Order._get_connection().update_item(
                order_id,
                actions=[
                    m.Order.status.set(PAID),
                    m.Order.transaction_id.set(trade_no),
                    m.Order.pay_time.set(iso(pay_time)),
                    m.Order.notify_id.set(notify_id or ""),
                    m.Order.update_time.set(iso(now)),
                    m.Order.unpaid.remove(),
                ],
                condition=(m.Order.status == UNPAID) & (m.Order.total_fen == total_fen),
            )
            return True
        except UpdateError as exc:
            if exc.cause_response_code == "ConditionalCheckFailedException":
                return False
            raise Unavailable("dynamodb is not answering") from exc
        except DYNAMO_ERRORS as exc:
            raise Unavailable("dynamodb is not answering") from exc

    def close_order(self, order: Order, *, now: datetime) -> bool:
        """UNPAID -> CLOSED and the stock back, in one transaction. False when not UNPAID."""
        m = self.models
        try:
            with TransactWrite(connection=self.connection) as tx:
                tx.update(
                    m.Order(order.id),
                    actions=[
                        m.Order.status.set(CLOSED),
                        m.Order.close_time.set(iso(now)),
                        m.Order.end_time.set(iso(now)),
                        m.Order.update_time.set(iso(now)),
                        m.Order.unpaid.remove(),
                    ],
                    condition=m.Order.status == UNPAID,
                )
                for line in order.lines:
                    if order.sale_id:  # a flash-sale order gives its unit back to the sale
                        tx.update(m.Sale(order.sale_id),
                                  actions=[m.Sale.stock.add(line.num)])
                    else:
                        tx.update(m.Goods(line.goods_id),
                                  actions=[m.Goods.stock.add(line.num)])
            return True
        except TransactWriteError as exc:
            if reasons(exc)[:1] == ["ConditionalCheckFailed"]:
                return False
            raise Unavailable(f"closing {order.id} failed: {reasons(exc)}") from exc
        except DYNAMO_ERRORS as exc:
            raise Unavailable("dynamodb is not answering") from exc

    def mark_refunded(
        self, order_id: str, *, trade_no: str, refund_request_no: str, now: datetime
    ) -> bool:
        """CLOSED -> REFUNDED once the money went back. False when not CLOSED."""
        m = self.models
        try:
            m.Order(order_id).update(
                actions=[
                    m.Order.status.set(REFUNDED),
                    m.Order.transaction_id.set(trade_no),
                    m.Order.refund_request_no.set(refund_request_no),
                    m.Order.update_time.set(iso(now)),
                ],
                condition=m.Order.status == CLOSED,
            )
            return True
        except UpdateError as exc:
            if exc.cause_response_code == "ConditionalCheckFailedException":
                return False
            raise Unavailable("dynamodb is not answering") from exc
        except DYNAMO_ERRORS as exc:
            raise Unavailable("dynamodb is not answering") from exc

    def unpaid_due(self, now: datetime, limit: int = 500) -> list[str]:
        """Ids of UNPAID orders whose check time has passed, oldest first, from the sparse index."""
        m = self.models
        with dynamo():
            return [
                x.id
                for x in m.Order.unpaid_due.query(
                    UNPAID_FLAG, m.Order.check_time <= iso(now), limit=limit
                )
            ]

