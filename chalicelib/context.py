"""What every handler is given, and the few things every handler module does.

`Deps` bundles the ports (chalicelib/ports.py) with the settings and the clock;
the routes (app.py) and the worker build one per process (chalicelib/deps.py)
and pass it in. Nothing here does I/O of its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from chalicelib import domain
from chalicelib.config import Settings
from chalicelib.domain import EventType, NotFound, Order, TimelineEvent, Unavailable
from chalicelib.ports import BillArchive, PaymentGateway, Publisher, StorePort, WebhookSender

log = logging.getLogger(__name__)


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class Deps:
    settings: Settings
    store: StorePort
    broker: Publisher
    gateway: PaymentGateway | None = None
    clock: Callable[[], datetime] = utcnow
    sleep: Callable[[float], None] = time.sleep  # a handler's short wait (tests: no wait)
    archive: BillArchive | None = None  # where the provider's raw bills are kept
    webhooks: WebhookSender | None = None  # the subscribers' HTTP (webhook deliveries)


def find_order(deps: Deps, order_id: Any) -> Order:
    """The order, or NotFound (also for what cannot be an order id: no read then)."""
    if not isinstance(order_id, str) or not domain.ORDER_ID_RE.fullmatch(order_id):
        raise NotFound(f"no order {order_id!r}")
    order = deps.store.get_order(order_id)
    if order is None:
        raise NotFound(f"no order {order_id!r}")
    return order


def record(deps: Deps, order_id: str, kind: EventType, *, at: datetime | None = None,
           ref: str | None = None, **detail: Any) -> None:
    """An event on the order's timeline, at `at` (now when None); `ref` makes a second
    write of the same event replace the first. Best effort: the change it describes
    has happened already, so a timeline that cannot be written is logged, not raised."""
    try:
        deps.store.append_event(TimelineEvent(order_id, at or deps.clock(), kind, detail, ref))
    except Unavailable as exc:
        log.warning("timeline of %s: %s not recorded (%s)", order_id, kind.value, exc,
                    extra={"orderId": order_id})
