"""Opening and closing RabbitMQ connections, and the errors every part raises.

Why a module of its own: the publisher, the consumer and the parked tools all
build their connection parameters the same way (fail fast on a dead broker,
the URL's query string wins), log the URL without its password, and agree on
which pika errors mean "the connection went stale, reconnect".
"""

from __future__ import annotations

import logging
from urllib.parse import parse_qs, urlsplit

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingConnection

from chalicelib.domain import Unavailable

logger = logging.getLogger(__name__)


class BrokerUnavailable(Unavailable):
    """Cannot connect, the connection was lost, or a publish was not confirmed.

    Callers answer 503 (HTTP) or `failure` (Alipay notify): nothing happened.
    It is the domain's `Unavailable` (503), as the store's errors are, so
    the handlers' `except Unavailable` covers the broker too.
    """


class Unroutable(BrokerUnavailable):
    """A mandatory publish came back: no queue is bound for that routing key."""


# Connection defaults, so that a dead broker fails fast. A value given in the
# URL's query string (`?heartbeat=60&socket_timeout=10`) wins.
CONNECTION_DEFAULTS: dict[str, float | int] = {
    "connection_attempts": 1,
    "retry_delay": 0.5,
    "socket_timeout": 5.0,
    "stack_timeout": 10.0,
    "blocked_connection_timeout": 5.0,
    "heartbeat": 30,
}

# The connection went stale: closed by the broker or the network, or a channel
# closed under us. Reconnecting once and trying again is the cure.
STALE: tuple[type[BaseException], ...] = (
    pika.exceptions.AMQPConnectionError,  # StreamLostError, ConnectionClosed*, WrongState ...
    pika.exceptions.ChannelClosed,
    pika.exceptions.ChannelWrongStateError,
)


def parameters(url: str, **overrides: float | int) -> pika.URLParameters:
    """pika's parameters for `url`, with `CONNECTION_DEFAULTS` where the URL says nothing."""
    params = pika.URLParameters(url)
    given = parse_qs(urlsplit(url).query)
    for name, value in {**CONNECTION_DEFAULTS, **overrides}.items():
        if name not in given:
            setattr(params, name, value)
    return params


def safe_url(url: str) -> str:
    """The URL without user and password, for logs."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path or '/'}"


def connect(url: str, params: pika.URLParameters) -> BlockingConnection:
    """A new connection, or `BrokerUnavailable` saying where it could not be made."""
    try:
        return pika.BlockingConnection(params)
    except pika.exceptions.AMQPConnectionError as exc:
        raise BrokerUnavailable(f"cannot connect to RabbitMQ at {safe_url(url)}: {exc!r}") from exc


def close_quietly(connection: BlockingConnection) -> None:
    """Close `connection` if it is open; a broken one may fail to close in many ways."""
    try:
        if connection.is_open:
            connection.close()
    except Exception:  # noqa: BLE001 - closing a broken connection may fail in many ways
        logger.debug("error while closing a RabbitMQ connection", exc_info=True)
