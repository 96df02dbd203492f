"""The confirmed publisher used by the API (Lambda) and the handlers.

Why a module of its own: publishing has its own connection policy. Nothing opens
a socket when a `Broker` is constructed (Lambda builds it at import and reuses
the warm container); the first call connects and declares the topology, later
calls reuse the connection, and a stale one is replaced once per call. Every
publish is persistent, mandatory and confirmed: returning means RabbitMQ has it.

The API's user may only publish to the exchanges (topology.API_PERMISSIONS): it
cannot declare. With `declare=False`, or once the broker refused a declare
(403), the publisher only checks, with passive declares (which need no
permission), that the worker has declared the exchanges.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection
from pika.spec import BasicProperties

from chalicelib.broker.connection import (
    NACK_RETRY_PAUSES_S,
    STALE,
    BrokerUnavailable,
    Nacked,
    Unroutable,
    close_quietly,
    connect,
    parameters,
    safe_url,
)
from chalicelib.broker.messages import JSON, PERSISTENT, encode
from chalicelib.broker.topology import (
    CONSUMED_QUEUES,
    EXCHANGE_DELAY,
    EXCHANGE_EVENTS,
    EXCHANGE_PAY,
    EXCHANGE_REFUND,
    EXCHANGE_SECKILL,
    EXCHANGE_WEBHOOK,
    EXCHANGES,
    QUEUE_DELAY,
    QUEUE_PAY,
    QUEUE_REFUND,
    QUEUE_SECKILL,
    QUEUE_WEBHOOK_DELIVER,
    TopologyMismatch,
    TopologyMissing,
    declare_topology,
    parked_queue_name,
    validate_topology_args,
    webhook_wait_queue,
)
from chalicelib.config import DEFAULT_WEBHOOK_RETRY_SECONDS

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


class Broker:
    """Confirmed publisher, one connection and channel kept and reused.

    Construct it freely (at import time in Lambda): it connects on first use.
    Thread-safe: one lock serialises every use of the (non thread-safe)
    BlockingConnection.
    """

    def __init__(
        self,
        url: str,
        check_delay_seconds: int,
        queue_type: str = "classic",
        *,
        declare: bool = True,
        webhook_waits_s: Sequence[int] = DEFAULT_WEBHOOK_RETRY_SECONDS,
    ) -> None:
        """`declare=False`: never declare, only check that the exchanges exist (the
        API's publish-only user); True: declare, unless the user may not.
        `webhook_waits_s`: a failed webhook delivery's waits (its wait queues)."""
        validate_topology_args(int(check_delay_seconds) * 1000, queue_type, (1,))
        self._url = url
        self._declare = declare
        self._check_delay_ms = int(check_delay_seconds) * 1000
        self._queue_type = queue_type
        self._webhook_waits_s = tuple(int(w) for w in webhook_waits_s)
        self._params: list[pika.URLParameters] | None = None  # every address, in turn
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
            except STALE:
                pass
        self._drop()
        if self._params is None:
            self._params = parameters(self._url)
        connection = connect(self._url, self._params)
        try:
            channel = self._prepare(connection)
            channel.confirm_delivery()
        except (TopologyMismatch, TopologyMissing):
            close_quietly(connection)
            raise
        except STALE as exc:
            close_quietly(connection)
            raise BrokerUnavailable(f"RabbitMQ went away while declaring: {exc!r}") from exc
        self._connection, self._channel = connection, channel
        logger.info("connected to RabbitMQ at %s", safe_url(self._url))
        return channel

    def _prepare(self, connection: BlockingConnection) -> BlockingChannel:
        """A channel on a new connection, the topology declared or found declared."""
        channel = connection.channel()
        if self._declare:
            try:
                declare_topology(channel, self._check_delay_ms, self._queue_type,
                                 webhook_waits_s=self._webhook_waits_s)
                return channel
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code != 403:
                    raise
                # A publish-only user (the API's): the worker declares the topology.
                logger.info("this RabbitMQ user may not declare (%s): only checking the "
                            "exchanges from now on", exc.reply_text)
                self._declare = False
                channel = connection.channel()
        for exchange in EXCHANGES:
            try:
                channel.exchange_declare(exchange, passive=True)
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code != 404:
                    raise
                raise TopologyMissing(
                    f"exchange {exchange!r} is not declared at {safe_url(self._url)}: the "
                    "worker declares the topology when it starts (or run `python -m "
                    "chalicelib.cli declare` with the worker's settings)"
                ) from exc
        return channel

    def _drop(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            close_quietly(connection)

    def _with_channel(self, what: str, operation: Callable[[BlockingChannel], _T]) -> _T:
        """Run `operation`; on a stale connection reconnect once and run it again."""
        with self._lock:
            for attempt in (1, 2):
                channel = self._ensure_channel()
                try:
                    return operation(channel)
                except STALE as exc:
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

    def publish(self, exchange: str, routing_key: str, body: Mapping[str, Any], *,
                message_id: str | None = None) -> None:
        """Publish `body` as persistent JSON, mandatory, and wait for the broker's confirm.

        Raises `Unroutable` when no queue took it, `BrokerUnavailable` when it
        was not confirmed (after one reconnect; a nack: after a few new channels,
        `NACK_RETRY_PAUSES_S`), `TopologyMismatch` when the
        queues exist with other arguments. Returning means the broker has it.
        A publish retried after a lost connection may be delivered twice:
        consumers are idempotent.
        """
        payload = encode(body)
        properties = BasicProperties(
            content_type=JSON,
            content_encoding="utf-8",
            delivery_mode=PERSISTENT,
            message_id=message_id or uuid.uuid4().hex,
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
                self._channel = None  # it may go on nacking: a new one (NACK_RETRY_PAUSES_S)
                close_quietly(channel)
                raise Nacked(
                    f"RabbitMQ refused ({exchange!r}, {routing_key!r}): publish nacked"
                ) from exc

        for pause in (*NACK_RETRY_PAUSES_S, None):
            try:
                self._with_channel(f"publish to {exchange}/{routing_key}", send)
                return
            except Nacked:
                if pause is None:
                    raise
                logger.warning("publish to %s nacked: again in %.2f s", exchange, pause)
                time.sleep(pause)

    def publish_check(self, order_id: str) -> None:
        """Schedule the order's timeout check (queue.order.delay, then queue.order.check)."""
        self.publish(EXCHANGE_DELAY, QUEUE_DELAY, {"orderId": order_id})

    def publish_pay(self, msg: Mapping[str, Any]) -> None:
        """A verified payment: `{"orderId","tradeNo","totalAmount","payTime","notifyId"}`."""
        self.publish(EXCHANGE_PAY, QUEUE_PAY, msg)

    def publish_seckill(self, msg: Mapping[str, Any]) -> None:
        self.publish(EXCHANGE_SECKILL, QUEUE_SECKILL, msg)

    def publish_refund(self, refund_id: str) -> None:
        """A refund whose outcome is not known: the worker settles it by asking."""
        self.publish(EXCHANGE_REFUND, QUEUE_REFUND, {"refundId": refund_id})

    def publish_event(self, event: Mapping[str, Any]) -> None:
        """An order event to exchange.order.events, routing key = its type, message id
        = its eventId (a consumer dedupes on either)."""
        self.publish(EXCHANGE_EVENTS, str(event["type"]), event,
                     message_id=str(event["eventId"]))

    def publish_delivery(self, delivery_id: str, wait_seconds: int | None = None, *,
                         resend: bool = False) -> None:
        """A webhook delivery to attempt: now, or after `wait_seconds` (one of the
        waits the topology was declared with); `resend`: an operator's, attempted
        even while its subscriber is being let alone."""
        key = QUEUE_WEBHOOK_DELIVER if wait_seconds is None else webhook_wait_queue(wait_seconds)
        body: dict[str, Any] = {"deliveryId": delivery_id}
        if resend:
            body["resend"] = True
        self.publish(EXCHANGE_WEBHOOK, key, body)

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

    def parked_counts(self) -> dict[str, int]:
        """Messages waiting for a person, per parked queue (a queue not declared yet: 0)."""
        counts = {}
        for queue in CONSUMED_QUEUES:
            name = parked_queue_name(queue)
            try:
                counts[name] = self.queue_depth(name)
            except LookupError:
                counts[name] = 0
        return counts

    def close(self) -> None:
        with self._lock:
            self._drop()
