"""Builds the handlers' dependencies from the settings, lazily, once per process.

A warm Lambda (or the bridge) reuses them: the broker keeps its connection and
the store its client. Nothing here connects until first used, but the secret: a
function given SECRET_ID reads its secrets from Secrets Manager when its
dependencies are built (chalicelib/secrets.py), keeps them for
SECRET_REFRESH_SECONDS, then reads them again, at once when RabbitMQ refused its
user; when the secret's version changed, `get` builds the dependencies again
(a new broker connection, a gateway with the new key).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from chalicelib import config, logs, secrets
from chalicelib.context import Deps
from chalicelib.ports import BillArchive, PaymentGateway, Publisher, WebhookSender
from chalicelib.store import Store

log = logging.getLogger(__name__)


def build(settings: config.Settings | None = None) -> Deps:
    from chalicelib.broker import Broker

    settings = settings or config.get()
    if settings.secret_id:
        settings = secrets.resolve(settings, _secret_cache(settings).get())
    settings = config.check(settings)
    logs.configure(settings.log_level)  # the level only where nobody configured logging
    store = Store.from_settings(settings)
    if settings.function_role != "authorizer":  # it verifies tokens, never reads a table
        store.warm()  # one DynamoDB client for all tables (built here; no request)
    broker: Publisher = Broker(settings.rmq_url, settings.check_delay_seconds,
                               settings.rmq_queue_type,
                               webhook_waits_s=settings.webhook_retry_seconds)
    if settings.secret_id:
        broker = RefusalWatch(broker, _secret_cache(settings).refused)
    return Deps(
        settings=settings,
        store=store,
        broker=broker,
        gateway=_gateway(settings),
        archive=_archive(settings),
        webhooks=_webhooks(settings),
    )


# --- the secret, read at run time (SECRET_ID) ----------------------------------

_secrets: secrets.SecretCache | None = None


def _secret_cache(settings: config.Settings) -> secrets.SecretCache:
    """The process's cache of its secret (a process has one: its SECRET_ID)."""
    global _secrets
    if _secrets is None:
        source = secrets.SecretsManagerSource(settings.secret_id, settings.aws_region)
        _secrets = secrets.SecretCache(source, settings.secret_refresh_seconds)
    return _secrets


def use_secrets(cache: secrets.SecretCache | None) -> None:
    """Tests put their own secret's cache in place (None: made again from SECRET_ID)."""
    global _secrets
    _secrets = cache


# What RabbitMQ's refusal of a user looks like in the broker's errors (pika's class
# for a connection closed while authenticating, and the broker's reply code text),
# told apart here by name so that pika stays the broker's own import.
_REFUSED_MARKS = ("ACCESS_REFUSED", "ProbableAuthenticationError")


def credential_refused(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) is RabbitMQ refusing the user's login."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = f"{type(current).__name__} {current!s} {current!r}"
        if any(mark in text for mark in _REFUSED_MARKS):
            return True
        current = current.__cause__ or current.__context__
    return False


class RefusalWatch:
    """The broker as it is, but a call that fails because RabbitMQ refused the user
    tells `refused` first (the secret is read again: it may have been rotated)."""

    def __init__(self, broker: Publisher, refused: Callable[[], None]) -> None:
        self._broker = broker
        self._refused = refused

    def __repr__(self) -> str:
        return f"RefusalWatch({self._broker!r})"

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._broker, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def watched(*args: Any, **kwargs: Any) -> Any:
            try:
                return attr(*args, **kwargs)
            except Exception as exc:
                if credential_refused(exc):
                    self._refused()
                raise

        return watched


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
        # short where a caller waits: API Gateway's 29 s, the sweeper's deadline
        timeout=config.alipay_timeout_seconds(settings.function_role),
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
    """The process's dependencies, built on first use and then reused; built again
    when the secret they were built with was rotated (see `refresh`)."""
    global _current
    if _current is None:
        _current = build()
    elif _current.settings.secret_id and _secrets is not None and _secrets.due():
        _current = refresh(_current)
    return _current


def refresh(current: Deps) -> Deps:
    """Reads the secret again; a new version: the dependencies built again with it
    (the old broker's connection closed). Built again from the settings `current`
    was built from: a rebuild that fails keeps `current`, and says why."""
    assert _secrets is not None
    if not _secrets.refresh():
        return current
    try:
        fresh = build(current.settings)  # its secret values are replaced by the new ones
    except (ValueError, secrets.SecretUnavailable) as exc:  # SettingsError, a key unreadable
        log.error("secret rotated, but the dependencies cannot be built with it: %s", exc)
        return current
    close = getattr(current.broker, "close", None)
    if callable(close):
        try:
            close()
        except Exception:  # noqa: BLE001 - the old connection may be broken already
            log.debug("old broker not closed cleanly", exc_info=True)
    log.info("dependencies built again with the rotated secret")
    return fresh


def use(d: Deps | None) -> None:
    """Tests and benchmarks put their own dependencies in place (None: build again)."""
    global _current
    _current = d
