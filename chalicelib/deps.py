"""Builds the handlers' dependencies from the settings, lazily, once per process.

A warm Lambda (or the bridge) reuses them: the broker keeps its connection and
the store its client. Nothing here connects until first used.
"""

from __future__ import annotations

import logging

from chalicelib import config, logs
from chalicelib.context import Deps
from chalicelib.ports import BillArchive, PaymentGateway, WebhookSender
from chalicelib.store import Store

log = logging.getLogger(__name__)


def build(settings: config.Settings | None = None) -> Deps:
    from chalicelib.broker import Broker

    settings = config.check(settings or config.get())
    logs.configure(settings.log_level)  # the level only where nobody configured logging
    store = Store.from_settings(settings)
    if settings.function_role != "authorizer":  # it verifies tokens, never reads a table
        store.warm()  # one DynamoDB client for all tables (built here; no request)
    return Deps(
        settings=settings,
        store=store,
        broker=Broker(settings.rmq_url, settings.check_delay_seconds, settings.rmq_queue_type,
                      webhook_waits_s=settings.webhook_retry_seconds),
        gateway=_gateway(settings),
        archive=_archive(settings),
        webhooks=_webhooks(settings),
    )


def _webhooks(settings: config.Settings) -> WebhookSender | None:
    """The subscribers' HTTP: the worker delivers, the API checks URLs it saves."""
    if settings.function_role not in ("", "api"):
        return None
    from chalicelib.webhook_http import HttpSender

    return HttpSender(local=settings.stage in config.LOCAL_STAGES)


def _archive(settings: config.Settings) -> BillArchive | None:
    if settings.function_role not in ("", "reconciler", "api") or not settings.bills_bucket:
        return None
    from chalicelib.archive import archive_for

    return archive_for(settings)


def _gateway(settings: config.Settings) -> PaymentGateway | None:
    if settings.function_role == "authorizer":
        return None
    verify_only = settings.function_role == "notify"
    if not (settings.alipay_app_id and (settings.alipay_gateway or verify_only)):
        log.warning("ALIPAY_APP_ID or ALIPAY_GATEWAY not set: payment is off")
        return None
    from chalicelib.alipay_gateway import AlipayGateway

    private_key = settings.alipay_app_private_key
    if verify_only and not private_key:
        private_key = _throwaway_private_key()
    return AlipayGateway(
        app_id=settings.alipay_app_id,
        seller_id=settings.alipay_seller_id,
        gateway_url=settings.alipay_gateway,
        app_private_key_pem=private_key,
        alipay_public_key_pem=settings.alipay_public_key,
        notify_url=settings.alipay_notify_url or None,
        return_url=settings.alipay_return_url or None,
    )


def _throwaway_private_key() -> str:
    """A fresh RSA key for the notify function, which is not given the app's own.

    python-alipay-sdk imports an app private key when it is built, though checking
    a notify needs only Alipay's public key. This key is made in memory, never
    registered with Alipay: anything signed with it (nothing on the notify path
    signs) is refused by Alipay, so the function fails closed. 1024 bits: it
    protects nothing and is made on each cold start.
    """
    from Cryptodome.PublicKey import RSA

    return RSA.generate(1024).export_key().decode()


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
