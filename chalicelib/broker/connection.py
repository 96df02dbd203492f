"""Opening and closing RabbitMQ connections, and the errors every part raises.

Why a module of its own: the publisher, the consumer and the parked tools all
build their connection parameters the same way (fail fast on a dead broker,
the URL's query string wins), log the URL without its password, and agree on
which pika errors mean "the connection went stale, reconnect".

A cluster's nodes are given as several amqp URLs separated by commas
(`RMQ_URL=amqp://u:p@node1:5672/%2F,amqp://u:p@node2:5672/%2F`): every connect
tries them in turn, beginning after the one that served last, so a reconnect
after a node died goes to another node first. One URL works as it always did.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import parse_qs, urlsplit

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection

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


class Nacked(BrokerUnavailable):
    """The broker refused a publish (basic.nack): it did not take the message."""


# A quorum queue nacks publishes while it elects a leader (the first few hundred ms
# after its leader's node died), and RabbitMQ 3.10 goes on nacking every publish on
# a channel whose first publish to that queue came in that moment, while a new
# channel is served at once (tests/reliability/test_cluster.py showed it). So a
# nacked publish is made again on a new channel after each of these pauses
# (seconds); should a nacked message have been kept after all, the consumers,
# idempotent, see it twice.
NACK_RETRY_PAUSES_S: tuple[float, ...] = (0.25, 0.5, 1.0)


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


# A comma that begins the next address: one followed by a URL scheme. A comma
# anywhere else (in a percent-decoded password, a query string) stays in its URL.
_NEXT_ADDRESS = re.compile(r"\s*,\s*(?=[A-Za-z][A-Za-z0-9+.-]*://)")


def broker_urls(value: str) -> list[str]:
    """The addresses in `value`: one amqp(s) URL, or several separated by commas."""
    urls = _NEXT_ADDRESS.split(value.strip())
    if len(urls) == 1:
        return [value]  # as given: one URL is taken exactly as it always was
    for url in urls:
        if urlsplit(url).scheme not in ("amqp", "amqps") or not urlsplit(url).hostname:
            raise ValueError(f"not an amqp:// or amqps:// URL with a host: {safe_url(url)!r}")
    return urls


def _parameters(url: str, overrides: dict[str, float | int]) -> pika.URLParameters:
    params = pika.URLParameters(url)
    given = parse_qs(urlsplit(url).query)
    for name, value in {**CONNECTION_DEFAULTS, **overrides}.items():
        if name not in given:
            setattr(params, name, value)
    return params


def parameters(url: str, **overrides: float | int) -> list[pika.URLParameters]:
    """pika's parameters for each address in `url` (one URL, or several separated by
    commas), in the order to try them, with `CONNECTION_DEFAULTS` where a URL says
    nothing. `open_connection` and `connect` take this list and reorder it."""
    return [_parameters(one, dict(overrides)) for one in broker_urls(url)]


def safe_url(url: str) -> str:
    """The URL (or each of several) without user and password, for logs."""
    shown = []
    for one in _NEXT_ADDRESS.split(url.strip()):
        parts = urlsplit(one)
        host = parts.hostname or "?"
        try:
            port = f":{parts.port}" if parts.port else ""
        except ValueError:
            port = ":?"
        shown.append(f"{parts.scheme}://{host}{port}{parts.path or '/'}")
    return ",".join(shown)


def _address(params: pika.ConnectionParameters) -> str:
    return f"{params.host}:{params.port}"


def open_connection(params: list[pika.URLParameters]) -> BlockingConnection:
    """A connection to the first address of `params` that takes one, trying each once.

    On success `params` is rotated in place so that the address that served comes
    last: the next call is a reconnect, made because this connection went away,
    most likely with its node, so the other nodes are tried first. When none
    answered, raises pika's `AMQPConnectionError`: the address's own for one
    address, one naming each address's failure for several (their order kept).
    """
    if not params:
        raise ValueError("no RabbitMQ address to connect to")
    failures: list[str] = []
    for index, one in enumerate(list(params)):
        try:
            connection = pika.BlockingConnection(one)
        except pika.exceptions.AMQPConnectionError as exc:
            failures.append(f"{_address(one)}: {exc!r}")
            if index == len(params) - 1:
                if len(params) > 1:
                    raise pika.exceptions.AMQPConnectionError(
                        "no RabbitMQ address answered: " + "; ".join(failures)) from exc
                raise
            continue
        if len(params) > 1:
            params[:] = params[index + 1:] + params[: index + 1]
            if failures:
                logger.warning("RabbitMQ at %s, after %s", _address(one), "; ".join(failures))
            else:
                logger.info("RabbitMQ at %s", _address(one))
        return connection
    raise AssertionError("unreachable")  # pragma: no cover


def connect(url: str, params: list[pika.URLParameters]) -> BlockingConnection:
    """A new connection (see `open_connection`), or `BrokerUnavailable` saying where
    it could not be made."""
    try:
        return open_connection(params)
    except pika.exceptions.AMQPConnectionError as exc:
        raise BrokerUnavailable(f"cannot connect to RabbitMQ at {safe_url(url)}: {exc!r}") from exc


def close_quietly(it: BlockingConnection | BlockingChannel) -> None:
    """Close a connection or a channel if it is open; a broken one may fail to close
    in many ways."""
    try:
        if it.is_open:
            it.close()
    except Exception:  # noqa: BLE001 - closing a broken one may fail in many ways
        logger.debug("error while closing a RabbitMQ %s", type(it).__name__, exc_info=True)
