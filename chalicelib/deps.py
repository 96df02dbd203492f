"""Builds the handlers' dependencies from the settings, lazily, once per process.

A warm Lambda (or the bridge) reuses them: the broker keeps its connection and
the store its client. Nothing here connects until first used.
"""

from __future__ import annotations

import logging

from chalicelib import config, logs
from chalicelib.context import Deps
from chalicelib.ports import PaymentGateway
from chalicelib.store import Store

log = logging.getLogger(__name__)


def build(settings: config.Settings | None = None) -> Deps:
    from chalicelib.broker import Broker

    settings = config.check(settings or config.get())
    logs.configure(settings.log_level)  # the level only where nobody configured logging
    store = Store.from_settings(settings)
    store.warm()  # one DynamoDB client for all tables (built here, on first use; no request)
    return Deps(
        settings=settings,
        store=store,
        broker=Broker(settings.rmq_url, settings.check_delay_seconds, settings.rmq_queue_type),
        gateway=_gateway(settings),
    )


def _gateway(settings: config.Settings) -> PaymentGateway | None:
    if not (settings.alipay_app_id and settings.alipay_gateway):
        log.warning("ALIPAY_APP_ID or ALIPAY_GATEWAY not set: payment is off")
        return None
    from chalicelib.alipay_gateway import AlipayGateway

    return AlipayGateway(
        app_id=settings.alipay_app_id,
        seller_id=settings.alipay_seller_id,
        gateway_url=settings.alipay_gateway,
        app_private_key_pem=settings.alipay_app_private_key,
        alipay_public_key_pem=settings.alipay_public_key,
        notify_url=settings.alipay_notify_url or None,
        return_url=settings.alipay_return_url or None,
    )


_current: Deps | None = None


def get() -> Deps:
    """The process's dependencies, built on first use and then reused."""
    global _current
    if _current is None:
        _current = build()
    return _current


def use(d: Deps | None) -> None:
    """Tests and benchmarks put their own dependencies in place (None: build again)."""
    global _current
    _current = d
