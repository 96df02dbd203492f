"""The consume loop: connect, declare, consume until stopped, reconnect when dropped.

Why a module of its own: this is the connection's side of consuming. The thread
that calls `run_consumer` owns the connection and does nothing but I/O: it keeps
calling `process_data_events`, so heartbeats flow however long a handler takes,
and it carries out the acks and moves that the worker thread (dispatcher.py)
hands it. The reconnect policy follows pika's
blocking_consume_recover_multiple_hosts.py: explicit `except` clauses, backoff.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingConnection

from chalicelib.broker.connection import close_quietly, open_connection, parameters, safe_url
from chalicelib.broker.dispatcher import Dispatcher, Session
from chalicelib.broker.topology import (
    CONSUMED_QUEUES,
    DEFAULT_RETRY_DELAYS_MS,
    DEFAULT_WEBHOOK_RETRY_SECONDS,
    declare_topology,
    validate_topology_args,
)

logger = logging.getLogger(__name__)

# How long the connection's thread waits for I/O before it looks at `stop` again.
_IO_SLICE_S = 0.2


def run_consumer(
    url: str,
    handlers: Mapping[str, Callable[[dict[str, Any]], None]],
    *,
    prefetch: int = 10,
    max_attempts: int = 5,
    retry_delays_ms: Sequence[int] = DEFAULT_RETRY_DELAYS_MS,
    webhook_waits_s: Sequence[int] = DEFAULT_WEBHOOK_RETRY_SECONDS,
    check_delay_seconds: int,
    queue_type: str = "classic",
    stop: threading.Event,
    reconnect_delays: Sequence[float] = (0.5, 1, 2, 5, 10),
) -> None:
    """Consume the queues named in `handlers` until `stop` is set.

    Declares the topology, then calls `handlers[queue](message_dict)` for each
    message and acks it only after the handler returned. The handlers run one
    after another on a worker thread, so the connection keeps its heartbeats
    while one waits. A handler that raises is retried through the queue's retry
    queues (`retry_delays_ms`, the last one repeated), without blocking the
    queue; after `max_attempts` calls, or at once for `Park` or a body that is
    not a JSON object, the message is parked in `<queue>.parked`. Reconnects
    with backoff (`reconnect_delays`, the last one repeated) when the broker goes
    away; a handler that finishes after its connection was lost is not acked
    (the message comes again). When `stop` is set, the message in hand is
    finished and acked, prefetched ones go back to the queue, and the function
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
    validate_topology_args(check_delay_ms, queue_type, retry_delays_ms)
    params = parameters(url)
    dispatcher = Dispatcher(
        max_attempts=max_attempts,
        retry_delays_ms=retry_delays_ms,
        stop=stop,
        name=f"broker-dispatch[{','.join(handlers)}]",
    )
    dispatcher.start()
    try:
        failures = 0
        while not stop.is_set():
            connection: BlockingConnection | None = None
            session: Session | None = None
            try:
                connection = open_connection(params)  # each address in turn
                channel = connection.channel()
                declare_topology(
                    channel, check_delay_ms, queue_type, retry_delays_ms=retry_delays_ms,
                    webhook_waits_s=webhook_waits_s,
                )
                channel.confirm_delivery()
                channel.basic_qos(prefetch_count=prefetch)
                session = Session(connection, channel)
                for queue, handler in handlers.items():
                    on_message = dispatcher.receiver(session, queue, handler)
                    channel.basic_consume(queue, on_message, auto_ack=False)
                logger.info("consuming %s from %s:%s (of %s)", ", ".join(handlers),
                            params[-1].host, params[-1].port, safe_url(url))
                failures = 0
                while not stop.is_set():
                    dispatcher.raise_failure()
                    connection.process_data_events(time_limit=_IO_SLICE_S)
                # Stopping: the worker starts no other message; the one in hand is
                # finished and its ack (or move) carried out here before closing.
                while dispatcher.busy():
                    connection.process_data_events(time_limit=_IO_SLICE_S)
                dispatcher.raise_failure()
                session.close()
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
                if session is not None:
                    session.close()  # an outcome still to come is dropped, never acked later
                if connection is not None:
                    close_quietly(connection)
            delay = float(reconnect_delays[min(failures, len(reconnect_delays) - 1)])
            failures += 1
            logger.warning(
                "RabbitMQ consumer: %s; reconnecting in %.1f s (attempt %d)",
                reason,
                delay,
                failures,
            )
            stop.wait(delay)
        logger.info("consumer stopped")
    finally:
        dispatcher.shutdown()
