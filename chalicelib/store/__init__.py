"""DynamoDB through pynamodb: the only package that imports pynamodb.

Every state change of an order is a conditional write on its current status, so
that duplicates, redeliveries and races (pay against timeout, pay against
cancel) resolve to exactly one winner:

    worker A (pay)                       worker B (check)
    read order: UNPAID                   read order: UNPAID
    update if status=UNPAID -> PAID  ok
                                         transact if status=UNPAID -> CLOSED,
                                         stock += n                  cancelled
                                         read order: PAID -> nothing to do

The store is split along its seams: goods and carts (catalog.py), orders
(orders.py), flash sales (sales.py), refunds and timelines (refunds.py), the
daily reconciliations (reconciliations.py), order events (outbox.py) and
webhooks (webhooks.py), over
the models of the tables it is given
(models.py). `chalicelib/memstore.py` keeps the same rules in memory, for unit tests and
development; tests/store_contract.py holds both to them.
`AWS_ENDPOINT_URL_DYNAMODB` points models and transactions at moto's server alike.
"""

from __future__ import annotations

from chalicelib.config import Settings, Tables
from chalicelib.store.catalog import CatalogStore
from chalicelib.store.orders import OrderStore
from chalicelib.store.outbox import OutboxStore
from chalicelib.store.reconciliations import ReconciliationStore
from chalicelib.store.refunds import RefundStore
from chalicelib.store.sales import SaleStore
from chalicelib.store.webhooks import WebhookStore


class Store(CatalogStore, OrderStore, SaleStore, RefundStore, ReconciliationStore,
            OutboxStore, WebhookStore):
    """Goods, carts, orders and flash sales on DynamoDB. Plain data in, plain data out."""

    def __init__(self, tables: Tables, region: str = "us-east-1") -> None:
        super().__init__(tables, region)

    @classmethod
    def from_settings(cls, settings: Settings) -> Store:
        return cls(settings.tables, settings.aws_region)


__all__ = ["Store"]
