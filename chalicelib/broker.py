"""RabbitMQ adapter: topology, confirmed publishing, the consume loop, parked tools.

This is the only module of the project that imports pika. Nothing here opens a
socket at import time or when a `Broker` is constructed: Lambda imports the
module once and reuses the warm container, so the connection is opened by the
first call that needs it and kept for the next ones.

The queues are the contract's (CONTRACT.md, "Queues"):

    exchange.order.delay --queue.order.delay--> queue.order.delay
        (x-message-ttl = check delay; dead-letters to exchange.order.delay
         with key queue.order.check)
    exchange.order.delay --queue.order.check--> queue.order.check
    exchange.order.pay   --queue.order.pay----> queue.order.pay
    exchange.order.seckill --queue.order.seckill--> queue.order.seckill

plus, for each consumed queue Q (check, pay, seckill):

    Q.retry.<ms>ms  one per retry delay: x-message-ttl = <ms>, dead-letters back
                    to Q through the default exchange. A failed message waits
                    there instead of at the head of Q, so it never blocks the
                    messages behind it. Every message in one retry queue has the
                    same TTL, so they expire in order (RabbitMQ only expires
                    from the head of a queue).
    Q.parked        where a message goes after `max_attempts`, or at once when
                    it is not a JSON object or the handler raised `Park`. A
                    person looks at it with `list_parked` and moves it back with
                    `replay_parked`.

Delivery guarantees: publishes are persistent, mandatory and confirmed; the
consumer acks a message only after its handler returned (the handler does the
durable write), and moves a message to a retry or parked queue with a confirmed
publish *before* acking the original. Every step is therefore at-least-once:
handlers must be idempotent (they are: every state change is a conditional write).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection
from pika.spec import Basic, BasicProperties

from chalicelib.orders import Unavailable

__all__ = [
    "CONSUMED_QUEUES",
    "DEFAULT_RETRY_DELAYS_MS",
    "EXCHANGE_DELAY",
    "EXCHANGE_PAY",
    "EXCHANGE_SECKILL",
    "QUEUE_CHECK",
    "QUEUE_CHECK_PARKED",
    "QUEUE_DELAY",
    "QUEUE_PAY",
    "QUEUE_PAY_PARKED",
    "QUEUE_SECKILL",
    "QUEUE_SECKILL_PARKED",
    "Broker",
    "BrokerUnavailable",
    "Park",
    "TopologyMismatch",
    "Unroutable",
    "declare_topology",
    "list_parked",
    "parked_queue_name",
    "replay_parked",
    "retry_queue_name",
    "run_consumer",
    "safe_url",
]

logger = logging.getLogger(__name__)

# --- names (CONTRACT.md, "Queues") -------------------------------------------

EXCHANGE_DELAY = "exchange.order.delay"
QUEUE_DELAY = "queue.order.delay"
QUEUE_CHECK = "queue.order.check"
EXCHANGE_PAY = "exchange.order.pay"
QUEUE_PAY = "queue.order.pay"
EXCHANGE_SECKILL = "exchange.order.seckill"
QUEUE_SECKILL = "queue.order.seckill"

PARKED_SUFFIX = ".parked"
QUEUE_CHECK_PARKED = QUEUE_CHECK + PARKED_SUFFIX
QUEUE_PAY_PARKED = QUEUE_PAY + PARKED_SUFFIX
QUEUE_SECKILL_PARKED = QUEUE_SECKILL + PARKED_SUFFIX

#: The queues a consumer may read; each has retry queues and a parked queue.
CONSUMED_QUEUES: tuple[str, ...] = (QUEUE_CHECK, QUEUE_PAY, QUEUE_SECKILL)

DEFAULT_RETRY_DELAYS_MS: tuple[int, ...] = (1000, 5000, 30000)

QUEUE_TYPES = ("classic", "quorum")

# Headers the consumer writes.
H_ATTEMPTS = "x-attempts"
H_ERROR = "x-error"
H_ORIGINAL_QUEUE = "x-original-queue"
H_PARKED_AT = "x-parked-at"
H_REPLAYED_AT = "x-replayed-at"
# Headers RabbitMQ writes when it dead-letters; not carried over on a republish
# (the new message starts its own dead-letter history).
_BROKER_DEATH_HEADERS = (
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
)

MAX_ERROR_CHARS = 1000

# Connection defaults, so that a dead broker fails fast. A value given in the
# URL's query string (`?heartbeat=60&socket_timeout=10`) wins.
_CONNECTION_DEFAULTS: dict[str, float | int] = {
    "connection_attempts": 1,
    "retry_delay": 0.5,
    "socket_timeout": 5.0,
    "stack_timeout": 10.0,
    "blocked_connection_timeout": 5.0,
    "heartbeat": 30,
}

_PERSISTENT = 2
_JSON = "application/json"


# --- errors --------------------------------------------------------------------


class BrokerUnavailable(Unavailable):
    """Cannot connect, the connection was lost, or a publish was not confirmed.

    Callers answer 503 (HTTP) or `failure` (Alipay notify): nothing happened.
    It is the project's `orders.Unavailable` (503), as the store's errors are, so
    the handlers' `except Unavailable` covers the broker too.
    """


class TopologyMismatch(BrokerUnavailable):
    """A queue or exchange exists with other arguments than the code declares.

    RabbitMQ cannot change a queue's arguments in place. The message names the
    queue, what differs and the way out. It is a `BrokerUnavailable` (an HTTP
    caller answers 503 either way), but `run_consumer` does not retry it: it is
    a configuration problem that reconnecting cannot fix.
    """


class Unroutable(BrokerUnavailable):
    """A mandatory publish came back: no queue is bound for that routing key."""


class Park(Exception):
    """Raised by a consumer handler to park the message at once, without retries.

    For failures that retrying cannot fix, e.g. an amount that does not match.
    """


# --- topology --------------------------------------------------------------------


def parked_queue_name(queue: str) -> str:
    """`queue.order.pay` -> `queue.order.pay.parked` (a parked name is returned as is)."""
    return queue if queue.endswith(PARKED_SUFFIX) else queue + PARKED_SUFFIX


def retry_queue_name(queue: str, delay_ms: int) -> str:
    """The queue where a failed message of `queue` waits `delay_ms` before coming back."""
    return f"{queue}.retry.{int(delay_ms)}ms"


def _queue_args(queue_type: str, **arguments: Any) -> dict[str, Any]:
    args = dict(arguments)
    if queue_type == "quorum":
        args["x-queue-type"] = "quorum"
        if "x-dead-letter-exchange" in args:
            # Without these a quorum queue dead-letters at-most-once: an expired
            # order-check message could be lost between the two queues.
            args["x-dead-letter-strategy"] = "at-least-once"
            args["x-overflow"] = "reject-publish"
    return args


def _topology(
    check_delay_ms: int, queue_type: str, retry_delays_ms: Sequence[int]
) -> tuple[list[str], list[tuple[str, dict[str, Any]]], list[tuple[str, str, str]]]:
    exchanges = [EXCHANGE_DELAY, EXCHANGE_PAY, EXCHANGE_SECKILL]
    queues: list[tuple[str, dict[str, Any]]] = [
        (
            QUEUE_DELAY,
            _queue_args(
                queue_type,
                **{
                    "x-message-ttl": int(check_delay_ms),
                    "x-dead-letter-exchange": EXCHANGE_DELAY,
                    "x-dead-letter-routing-key": QUEUE_CHECK,
                },
            ),
        ),
        (QUEUE_CHECK, _queue_args(queue_type)),
        (QUEUE_PAY, _queue_args(queue_type)),
        (QUEUE_SECKILL, _queue_args(queue_type)),
    ]
    for queue in CONSUMED_QUEUES:
        queues.append((parked_queue_name(queue), _queue_args(queue_type)))
        for delay in sorted(set(retry_delays_ms)):
            queues.append(
                (
                    retry_queue_name(queue, delay),
                    _queue_args(
                        queue_type,
                        **{
                            "x-message-ttl": int(delay),
                            "x-dead-letter-exchange": "",  # the default exchange
                            "x-dead-letter-routing-key": queue,
                        },
                    ),
                )
            )
    bindings = [
        (QUEUE_DELAY, EXCHANGE_DELAY, QUEUE_DELAY),
        (QUEUE_CHECK, EXCHANGE_DELAY, QUEUE_CHECK),
        (QUEUE_PAY, EXCHANGE_PAY, QUEUE_PAY),
        (QUEUE_SECKILL, EXCHANGE_SECKILL, QUEUE_SECKILL),
    ]
    return exchanges, queues, bindings


def _validate_topology_args(
    check_delay_ms: int, queue_type: str, retry_delays_ms: Sequence[int]
) -> None:
    if queue_type not in QUEUE_TYPES:
        raise ValueError(f"queue_type must be one of {QUEUE_TYPES}, not {queue_type!r}")
    if int(check_delay_ms) <= 0:
        raise ValueError(f"check_delay_ms must be positive, not {check_delay_ms!r}")
    if not retry_delays_ms or any(int(d) <= 0 for d in retry_delays_ms):
        raise ValueError(f"retry_delays_ms must be positive delays, not {retry_delays_ms!r}")


def declare_topology(
    channel: BlockingChannel,
    check_delay_ms: int,
    queue_type: str = "classic",
    *,
    retry_delays_ms: Sequence[int] = DEFAULT_RETRY_DELAYS_MS,
) -> None:
    """Declare the contract's exchanges, queues and bindings, idempotently.

    Also declares the parked queue and one retry queue per delay in
    `retry_delays_ms` for each consumed queue. A queue or exchange that already
    exists with other arguments raises `TopologyMismatch`; RabbitMQ then closes
    `channel` (406), so the caller must open a new one.
    """
    _validate_topology_args(check_delay_ms, queue_type, retry_delays_ms)
    exchanges, queues, bindings = _topology(check_delay_ms, queue_type, retry_delays_ms)
    for exchange in exchanges:
        _declare(
            channel,
            "exchange",
            exchange,
            check_delay_ms,
            lambda e=exchange: channel.exchange_declare(e, exchange_type="direct", durable=True),
        )
    for queue, arguments in queues:
        _declare(
            channel,
            "queue",
            queue,
            check_delay_ms,
            lambda q=queue, a=arguments: channel.queue_declare(q, durable=True, arguments=a),
        )
    for queue, exchange, key in bindings:
        channel.queue_bind(queue, exchange, routing_key=key)
    logger.debug("topology declared (%s queues, check delay %d ms)", queue_type, check_delay_ms)


def _declare(
    channel: BlockingChannel,
    kind: str,
    name: str,
    check_delay_ms: int,
    declare: Callable[[], object],
) -> None:
    try:
        declare()
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code != 406:
            raise
        raise TopologyMismatch(
            _mismatch_message(channel, kind, name, check_delay_ms, exc.reply_text)
        ) from exc


_INEQUIVALENT = re.compile(
    r"inequivalent arg '(?P<arg>[^']*)' for (?P<kind>queue|exchange) '(?P<name>[^']*)'"
    r" in vhost '(?P<vhost>[^']*)': received (?P<wanted>.*) but current is (?P<current>.*)$"
)


_QUORUM_ONLY_ARGS = ("x-queue-type", "x-overflow", "x-dead-letter-strategy")


def _value(text: str) -> str:
    """`'5000'` / `the value '5000' of type 'signedint'` / `none` -> `5000` / `none`."""
    found = re.search(r"'([^']*)'", text)
    return found.group(1) if found else text.strip()


def _mismatch_message(
    channel: BlockingChannel, kind: str, name: str, check_delay_ms: int, reply_text: str
) -> str:
    found = _INEQUIVALENT.search(reply_text)
    vhost = found.group("vhost") if found else "VHOST"
    if found:
        arg, current, wanted = found.group("arg"), _value(found["current"]), _value(found["wanted"])
        differs = f"{arg} is {current} on the broker, {wanted} wanted"
    else:
        arg, current, differs = "", "", "its arguments differ"
    if kind == "exchange":
        return (
            f"exchange {name!r} in vhost {vhost!r} already exists with other arguments: {differs}. "
            f"Way out: delete the exchange (rabbitmqadmin -V {vhost} delete exchange "
            f"name={name}) or use another vhost. Broker said: {reply_text}"
        )
    held = _message_count(channel, name)
    holding = f" and holds {held} message(s)" if held is not None else ""
    message = (
        f"queue {name!r} in vhost {vhost!r} already exists with other arguments{holding}: "
        f"{differs}. RabbitMQ cannot change a queue's arguments. Way out: delete the queue "
        f"when it is empty (rabbitmqctl delete_queue -p {vhost} {name}), use another vhost"
    )
    if name == QUEUE_DELAY and arg == "x-message-ttl":
        old = f", {int(current) / 1000:g}" if current.isdigit() else ""
        message += (
            f", or set ORDER_CHECK_DELAY_SECONDS back to the old value{old}"
            f" (it is {check_delay_ms / 1000:g} now)"
        )
    elif arg in _QUORUM_ONLY_ARGS:
        message += (
            " (the queue was made with another queue type: classic and quorum queues"
            " cannot be converted in place)"
        )
    return f"{message}. Broker said: {reply_text}"


def _message_count(channel: BlockingChannel, queue: str) -> int | None:
    """Best effort: how many messages `queue` holds, on a fresh channel (406 closed ours)."""
    try:
        probe = channel.connection.channel()
        try:
            return int(probe.queue_declare(queue, passive=True).method.message_count)
        finally:
            if probe.is_open:
                probe.close()
    except Exception:  # noqa: BLE001 - only decorates an error message
        return None


# --- connection parameters and encoding -----------------------------------------


def _parameters(url: str, **overrides: float | int) -> pika.URLParameters:
    params = pika.URLParameters(url)
    given = parse_qs(urlsplit(url).query)
    for name, value in {**_CONNECTION_DEFAULTS, **overrides}.items():
        if name not in given:
            setattr(params, name, value)
    return params


def safe_url(url: str) -> str:
    """The URL without user and password, for logs."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path or '/'}"


def _connect(url: str, params: pika.URLParameters) -> BlockingConnection:
    try:
        return pika.BlockingConnection(params)
    except pika.exceptions.AMQPConnectionError as exc:
        raise BrokerUnavailable(f"cannot connect to RabbitMQ at {safe_url(url)}: {exc!r}") from exc


def _encode(body: Mapping[str, Any]) -> bytes:
    return json.dumps(dict(body), ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _decode(body: bytes) -> dict[str, Any]:
    """The message as a dict; ValueError when it is not a UTF-8 JSON object."""
    data = json.loads(body.decode("utf-8"))  # UnicodeDecodeError and JSONDecodeError: ValueError
    if not isinstance(data, dict):
        raise ValueError(f"body is JSON but not an object: {type(data).__name__}")
    return data


def _text(value: Any) -> Any:
    """Header values for people: bytes as text, nested tables and lists too."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, Mapping):
        return {str(k): _text(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_text(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _properties_like(properties: BasicProperties, headers: Mapping[str, Any]) -> BasicProperties:
    """A persistent copy of a message's properties with new headers (no per-message TTL)."""
    return BasicProperties(
        content_type=properties.content_type,
        content_encoding=properties.content_encoding,
        delivery_mode=_PERSISTENT,
        message_id=properties.message_id,
        correlation_id=properties.correlation_id,
        timestamp=properties.timestamp,
        type=properties.type,
        app_id=properties.app_id,
        headers=dict(headers),
    )


_T = TypeVar("_T")

# The connection went stale: closed by the broker or the network, or a channel
# closed under us. Reconnecting once and trying again is the cure.
_STALE: tuple[type[BaseException], ...] = (
    pika.exceptions.AMQPConnectionError,  # StreamLostError, ConnectionClosed*, WrongState ...
    pika.exceptions.ChannelClosed,
    pika.exceptions.ChannelWrongStateError,
)


# --- publisher -------------------------------------------------------------------


class Broker:
    """Confirmed publisher, one connection and channel kept and reused.

    Construct it freely (at import time in Lambda): it connects on first use.
    Thread-safe: one lock serialises every use of the (non thread-safe)
    BlockingConnection.
    """

    def __init__(self, url: str, check_delay_seconds: int, queue_type: str = "classic") -> None:
        _validate_topology_args(int(check_delay_seconds) * 1000, queue_type, (1,))
        self._url = url
        self._check_delay_ms = int(check_delay_seconds) * 1000
        self._queue_type = queue_type
        self._params: pika.URLParameters | None = None
        self._connection: BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        delay = self._check_delay_ms // 1000
        return f"Broker({safe_url(self._url)!r}, {delay}, {self._queue_type!r})"

    # -- connection management (callers hold the lock) --

    def _ensure_channel(self) -> BlockingChannel:
        connection = self._connection
        if connection is not None and connection.is_open:
            if self._channel is not None and self._channel.is_open:
                return self._channel
            try:  # the connection survived, only the channel was closed (e.g. a 404)
                channel = connection.channel()
                channel.confirm_delivery()
                self._channel = channel
                return channel
            except _STALE:
                pass
        self._drop()
        if self._params is None:
            self._params = _parameters(self._url)
        connection = _connect(self._url, self._params)
        try:
            channel = connection.channel()
            declare_topology(channel, self._check_delay_ms, self._queue_type)
            channel.confirm_delivery()
        except TopologyMismatch:
            _close_quietly(connection)
            raise
        except _STALE as exc:
            _close_quietly(connection)
            raise BrokerUnavailable(f"RabbitMQ went away while declaring: {exc!r}") from exc
        self._connection, self._channel = connection, channel
        logger.info("connected to RabbitMQ at %s", safe_url(self._url))
        return channel

    def _drop(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            _close_quietly(connection)

    def _with_channel(self, what: str, operation: Callable[[BlockingChannel], _T]) -> _T:
        """Run `operation`; on a stale connection reconnect once and run it again."""
        with self._lock:
            for attempt in (1, 2):
                channel = self._ensure_channel()
                try:
                    return operation(channel)
                except _STALE as exc:
                    self._drop()
                    if attempt == 2:
                        raise BrokerUnavailable(
                            f"{what} failed after a reconnect: {exc!r}"
                        ) from exc
                    logger.warning(
                        "RabbitMQ connection stale during %s (%r): reconnecting once", what, exc
                    )
            raise AssertionError("unreachable")  # pragma: no cover

    # -- public API --

    def publish(self, exchange: str, routing_key: str, body: Mapping[str, Any]) -> None:
        """Publish `body` as persistent JSON, mandatory, and wait for the broker's confirm.

        Raises `Unroutable` when no queue took it, `BrokerUnavailable` when it
        was not confirmed (after one reconnect), `TopologyMismatch` when the
        queues exist with other arguments. Returning means the broker has it.
        A publish retried after a lost connection may be delivered twice:
        consumers are idempotent.
        """
        payload = _encode(body)
        properties = BasicProperties(
            content_type=_JSON,
            content_encoding="utf-8",
            delivery_mode=_PERSISTENT,
            message_id=uuid.uuid4().hex,
            timestamp=int(time.time()),
        )

        def send(channel: BlockingChannel) -> None:
            try:
                channel.basic_publish(exchange, routing_key, payload, properties, mandatory=True)
            except pika.exceptions.UnroutableError as exc:
                # Someone may have deleted a queue: declare again on next use.
                self._drop()
                raise Unroutable(
                    f"no queue bound to {exchange!r} with key {routing_key!r}: message returned"
                ) from exc
            except pika.exceptions.NackError as exc:
                raise BrokerUnavailable(
                    f"RabbitMQ refused ({exchange!r}, {routing_key!r}): publish nacked"
                ) from exc

        self._with_channel(f"publish to {exchange}/{routing_key}", send)

    def publish_check(self, order_id: str) -> None:
        """Schedule the order's timeout check (queue.order.delay, then queue.order.check)."""
        self.publish(EXCHANGE_DELAY, QUEUE_DELAY, {"orderId": order_id})

    def publish_pay(self, msg: Mapping[str, Any]) -> None:
        """A verified payment: `{"orderId","tradeNo","totalAmount","payTime","notifyId"}`."""
        self.publish(EXCHANGE_PAY, QUEUE_PAY, msg)

    def publish_seckill(self, msg: Mapping[str, Any]) -> None:
        self.publish(EXCHANGE_SECKILL, QUEUE_SECKILL, msg)

    def ping(self) -> None:
        """A round trip to the broker; raises `BrokerUnavailable` when it cannot be made."""
        self._with_channel("ping", lambda ch: ch.queue_declare(QUEUE_DELAY, passive=True))

    def queue_depth(self, queue: str) -> int:
        """Messages ready in `queue` (not those delivered and unacked). LookupError if none."""

        def depth(channel: BlockingChannel) -> int:
            try:
                return int(channel.queue_declare(queue, passive=True).method.message_count)
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code != 404:
                    raise
                self._channel = None  # the connection is fine; reopen a channel next time
                raise LookupError(f"no queue {queue!r} on the broker") from exc

        return self._with_channel(f"queue_depth({queue})", depth)

    def close(self) -> None:
        with self._lock:
            self._drop()


def _close_quietly(connection: BlockingConnection) -> None:
    try:
        if connection.is_open:
            connection.close()
    except Exception:  # noqa: BLE001 - closing a broken connection may fail in many ways
        logger.debug("error while closing a RabbitMQ connection", exc_info=True)


# --- consumer ---------------------------------------------------------------------


Handler = Callable[[dict[str, Any]], None]


class _Dispatcher:
    """The per-message logic of run_consumer: decode, handle, ack / retry / park."""

    def __init__(
        self,
        channel: BlockingChannel,
        *,
        max_attempts: int,
        retry_delays_ms: Sequence[int],
        stop: threading.Event,
    ) -> None:
        self._channel = channel
        self._max_attempts = max_attempts
        self._retry_delays_ms = tuple(int(d) for d in retry_delays_ms)
        self._stop = stop

    def callback(
        self, queue: str, handler: Handler
    ) -> Callable[[BlockingChannel, Basic.Deliver, BasicProperties, bytes], None]:
        def on_message(
            channel: BlockingChannel,
            method: Basic.Deliver,
            properties: BasicProperties,
            body: bytes,
        ) -> None:
            self.handle(queue, handler, method, properties, body)

        return on_message

    def handle(
        self,
        queue: str,
        handler: Handler,
        method: Basic.Deliver,
        properties: BasicProperties,
        body: bytes,
    ) -> None:
        if self._stop.is_set():
            # Prefetched but not started: leave it unacked; closing the channel
            # gives it back to the queue. (No nack: a quorum queue would count
            # that as a failed delivery.)
            return
        headers = dict(properties.headers or {})
        attempt = _attempts(headers) + 1
        try:
            message = _decode(body)
        except ValueError as exc:
            self._park(queue, method, properties, body, headers, attempt, exc)
            return
        try:
            handler(message)
        except Park as exc:
            self._park(queue, method, properties, body, headers, attempt, exc)
        except Exception as exc:  # noqa: BLE001 - any handler failure is retried, then parked
            if attempt >= self._max_attempts:
                self._park(queue, method, properties, body, headers, attempt, exc)
            else:
                self._retry(queue, method, properties, body, headers, attempt, exc)
        else:
            self._channel.basic_ack(method.delivery_tag)

    def _retry(
        self,
        queue: str,
        method: Basic.Deliver,
        properties: BasicProperties,
        body: bytes,
        headers: dict[str, Any],
        attempt: int,
        exc: Exception,
    ) -> None:
        delay = self._retry_delays_ms[min(attempt, len(self._retry_delays_ms)) - 1]
        new_headers = _fresh_headers(headers)
        new_headers[H_ATTEMPTS] = attempt
        new_headers[H_ERROR] = _error_text(exc)
        target = retry_queue_name(queue, delay)
        if self._move(method, properties, body, new_headers, target):
            logger.info(
                "%s: attempt %d/%d failed (%s); retrying in %d ms",
                queue,
                attempt,
                self._max_attempts,
                _error_text(exc, 200),
                delay,
                extra=_message_ids(body),
            )

    def _park(
        self,
        queue: str,
        method: Basic.Deliver,
        properties: BasicProperties,
        body: bytes,
        headers: dict[str, Any],
        attempt: int,
        exc: Exception,
    ) -> None:
        new_headers = _fresh_headers(headers)
        new_headers.update(
            {
                H_ERROR: _error_text(exc),
                H_ATTEMPTS: attempt,
                H_ORIGINAL_QUEUE: queue,
                H_PARKED_AT: _now(),
            }
        )
        target = parked_queue_name(queue)
        if self._move(method, properties, body, new_headers, target):
            logger.warning(
                "parked a message of %s in %s after %d attempt(s): %s",
                queue,
                target,
                attempt,
                _error_text(exc, 300),
                extra=_message_ids(body),
            )

    def _move(
        self,
        method: Basic.Deliver,
        properties: BasicProperties,
        body: bytes,
        headers: Mapping[str, Any],
        target: str,
    ) -> bool:
        """Confirmed publish to `target` through the default exchange, then ack the original."""
        try:
            self._channel.basic_publish(
                "", target, body, _properties_like(properties, headers), mandatory=True
            )
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
            # Not moved: keep the original. It comes back after a pause; the
            # pause keeps a broker in trouble from being hammered.
            logger.error("could not move a message to %s (%r); requeued it", target, exc)
            self._channel.basic_nack(method.delivery_tag, requeue=True)
            self._stop.wait(1.0)
            return False
        self._channel.basic_ack(method.delivery_tag)
        return True


def _attempts(headers: Mapping[str, Any]) -> int:
    try:
        return max(0, int(headers.get(H_ATTEMPTS) or 0))
    except (TypeError, ValueError):
        return 0


def _fresh_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in headers.items() if k not in _BROKER_DEATH_HEADERS}


def _message_ids(body: bytes) -> dict[str, str]:
    """orderId, tradeNo and notifyId of a message, for its log lines (chalicelib.logs)."""
    try:
        msg = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(msg, dict):
        return {}
    return {k: str(msg[k]) for k in ("orderId", "tradeNo", "notifyId") if msg.get(k)}


def _error_text(exc: BaseException, limit: int = MAX_ERROR_CHARS) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_consumer(
    url: str,
    handlers: Mapping[str, Callable[[dict[str, Any]], None]],
    *,
    prefetch: int = 10,
    max_attempts: int = 5,
    retry_delays_ms: Sequence[int] = DEFAULT_RETRY_DELAYS_MS,
    check_delay_seconds: int,
    queue_type: str = "classic",
    stop: threading.Event,
    reconnect_delays: Sequence[float] = (0.5, 1, 2, 5, 10),
) -> None:
    """Consume the queues named in `handlers` until `stop` is set.

    Declares the topology, then calls `handlers[queue](message_dict)` for each
    message and acks it only after the handler returned. A handler that raises
    is retried through the queue's retry queues (`retry_delays_ms`, the last one
    repeated), without blocking the queue; after `max_attempts` calls, or at once
    for `Park` or a body that is not a JSON object, the message is parked in
    `<queue>.parked`. Reconnects with backoff (`reconnect_delays`, the last one
    repeated) when the broker goes away. When `stop` is set, the message in hand
    is finished and acked, prefetched ones go back to the queue, and the function
    returns within about a second. `TopologyMismatch` is raised, not retried.
    """
    unknown = sorted(set(handlers) - set(CONSUMED_QUEUES))
    if unknown or not handlers:
        raise ValueError(f"handlers must name some of {CONSUMED_QUEUES}, not {sorted(handlers)}")
    if max_attempts < 1 or prefetch < 1:
        raise ValueError("max_attempts and prefetch must be at least 1")
    if not reconnect_delays:
        raise ValueError("reconnect_delays must not be empty")
    check_delay_ms = int(check_delay_seconds) * 1000
    _validate_topology_args(check_delay_ms, queue_type, retry_delays_ms)
    params = _parameters(url)
    failures = 0
    while not stop.is_set():
        connection: BlockingConnection | None = None
        try:
            connection = pika.BlockingConnection(params)
            channel = connection.channel()
            declare_topology(channel, check_delay_ms, queue_type, retry_delays_ms=retry_delays_ms)
            channel.confirm_delivery()
            channel.basic_qos(prefetch_count=prefetch)
            dispatcher = _Dispatcher(
                channel, max_attempts=max_attempts, retry_delays_ms=retry_delays_ms, stop=stop
            )
            for queue, handler in handlers.items():
                channel.basic_consume(queue, dispatcher.callback(queue, handler), auto_ack=False)
            logger.info("consuming %s from %s", ", ".join(handlers), safe_url(url))
            failures = 0
            while not stop.is_set():
                connection.process_data_events(time_limit=0.2)
            # Closing the channel requeues whatever was prefetched and not handled.
            channel.close()
            connection.close()
            logger.info("consumer stopped")
            return
        # Reconnect policy after pika's blocking_consume_recover_multiple_hosts.py.
        except pika.exceptions.ConnectionClosedByBroker as exc:
            reason = f"connection closed by broker: {exc.reply_code} {exc.reply_text}"
        except pika.exceptions.ChannelClosedByBroker as exc:
            reason = f"channel closed by broker: {exc.reply_code} {exc.reply_text}"
        except pika.exceptions.AMQPChannelError as exc:
            reason = f"channel error: {exc!r}"
        except pika.exceptions.AMQPConnectionError as exc:  # StreamLostError, refused, ...
            reason = f"connection lost: {exc!r}"
        finally:
            if connection is not None:
                _close_quietly(connection)
        delay = float(reconnect_delays[min(failures, len(reconnect_delays) - 1)])
        failures += 1
        logger.warning(
            "RabbitMQ consumer: %s; reconnecting in %.1f s (attempt %d)", reason, delay, failures
        )
        stop.wait(delay)
    logger.info("consumer stopped")


# --- parked messages ---------------------------------------------------------------


def _open_tool_channel(url: str, queue: str) -> tuple[BlockingConnection, BlockingChannel, int]:
    connection = _connect(url, _parameters(url))
    try:
        channel = connection.channel()
        try:
            count = int(channel.queue_declare(queue, passive=True).method.message_count)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                raise LookupError(f"no queue {queue!r} on the broker") from exc
            raise
    except BaseException:
        _close_quietly(connection)
        raise
    return connection, channel, count


def list_parked(url: str, queue: str, *, limit: int = 1000) -> list[dict[str, Any]]:
    """The parked messages of `queue` (`queue.order.pay` or `queue.order.pay.parked`).

    Each is `{"body": dict | str, "headers": dict, "properties": dict}`. Nothing
    is consumed: the messages are fetched unacked and given back by closing the
    channel. At most `limit`, and at most as many as the queue held when asked,
    so it cannot loop.
    """
    name = parked_queue_name(queue)
    try:
        connection, channel, count = _open_tool_channel(url, name)
        try:
            found: list[dict[str, Any]] = []
            for _ in range(min(count, limit)):
                method, properties, body = channel.basic_get(name, auto_ack=False)
                if method is None:
                    break
                try:
                    shown: Any = json.loads(body.decode("utf-8"))
                except ValueError:
                    shown = body.decode("utf-8", errors="replace")
                found.append(
                    {
                        "body": shown,
                        "headers": _text(dict(properties.headers or {})),
                        "properties": {
                            "content_type": properties.content_type,
                            "message_id": properties.message_id,
                            "timestamp": properties.timestamp,
                        },
                    }
                )
            # Unacked messages are given back when the channel closes. (Not
            # nack: a quorum queue would count it as a failed delivery.)
            channel.close()
            return found
        finally:
            _close_quietly(connection)
    except _STALE as exc:
        raise BrokerUnavailable(f"listing {name} failed: {exc!r}") from exc


def replay_parked(url: str, queue: str) -> int:
    """Move every parked message of `queue` back to its original queue; returns how many.

    The attempts start again (the x-attempts, x-error, x-parked-at headers are
    removed). Each message is published with a confirm before it is acked, so a
    failure half-way loses nothing (the rest stays parked); it raises
    `BrokerUnavailable` or `Unroutable` saying how many were moved.
    """
    name = parked_queue_name(queue)
    default_target = name[: -len(PARKED_SUFFIX)]
    moved = 0
    try:
        connection, channel, count = _open_tool_channel(url, name)
        try:
            channel.confirm_delivery()
            for _ in range(count):
                method, properties, body = channel.basic_get(name, auto_ack=False)
                if method is None:
                    break
                headers = _fresh_headers(properties.headers or {})
                target = str(_text(headers.pop(H_ORIGINAL_QUEUE, None) or default_target))
                for header in (H_ATTEMPTS, H_ERROR, H_PARKED_AT):
                    headers.pop(header, None)
                headers[H_REPLAYED_AT] = _now()
                try:
                    channel.basic_publish(
                        "", target, body, _properties_like(properties, headers), mandatory=True
                    )
                except pika.exceptions.UnroutableError as exc:
                    raise Unroutable(
                        f"replay of {name} stopped after {moved}: no queue {target!r}"
                    ) from exc
                except pika.exceptions.NackError as exc:
                    raise BrokerUnavailable(
                        f"replay of {name} stopped after {moved}: publish to {target} nacked"
                    ) from exc
                channel.basic_ack(method.delivery_tag)
                moved += 1
            channel.close()
        finally:
            _close_quietly(connection)
    except _STALE as exc:
        raise BrokerUnavailable(f"replay of {name} stopped after {moved}: {exc!r}") from exc
    logger.warning("replayed %d parked message(s) from %s", moved, name)
    return moved
