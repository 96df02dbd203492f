"""The per-message work of the consume loop, on a worker thread of its own.

Why a thread: a handler may wait a long time on a slow dependency (Alipay's
server calls time out after 15 s). pika's BlockingConnection sends and answers
heartbeats only while its thread is inside `process_data_events`, and it is not
thread-safe. A handler run inside pika's delivery callback stops all I/O while
it waits: with a short heartbeat RabbitMQ drops the connection, delivers the
message again while the first handler still runs, and the retry publish goes to
a dead connection. So, after pika's examples/basic_consumer_threaded.py:

- the connection's thread (`run_consumer`) only moves frames: pika's callback
  puts each delivery in the worker's inbox and returns;
- the worker decodes the body, calls the handler, and decides: ack, retry or park;
- the decision is carried out on the connection's thread, handed over with
  `connection.add_callback_threadsafe`, and the worker waits for it before it
  takes the next message: messages of one consumer are handled one after
  another and settled in order, as when everything ran on one thread;
- a delivery tag belongs to its channel: when the connection was lost while a
  handler ran, its outcome is dropped, never applied on the next connection
  (RabbitMQ delivers the message again; handlers are idempotent).

Moving a message to a retry or parked queue is a confirmed publish *before* the
original is acked, so every step is at-least-once.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection
from pika.spec import Basic, BasicProperties

from chalicelib.broker.messages import (
    H_ATTEMPTS,
    H_ERROR,
    H_ORIGINAL_QUEUE,
    H_PARKED_AT,
    attempts,
    decode,
    error_text,
    fresh_headers,
    message_ids,
    now,
    properties_like,
)
from chalicelib.broker.topology import parked_queue_name, retry_queue_name

logger = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], None]

# Carried out on the connection's thread with the delivery's channel; returns
# True when the consumer should pause before the next message (a move failed).
_Outcome = Callable[[BlockingChannel], bool]

# How often a worker waiting for its outcome looks whether the connection is gone.
_SETTLE_POLL_S = 0.1
# The pause after a failed move, so that a broker in trouble is not hammered.
_MOVE_FAILED_PAUSE_S = 1.0


class ChannelNacking(pika.exceptions.AMQPChannelError):
    """A move was nacked. A quorum queue nacks while it elects a leader, and RabbitMQ
    3.10 goes on nacking on a channel whose first publish to it came then
    (connection.NACK_RETRY_PAUSES_S): raised on the connection's thread, it makes
    `run_consumer` reconnect, with new channels."""


class Park(Exception):
    """Raised by a consumer handler to park the message at once, without retries.

    For failures that retrying cannot fix, e.g. an amount that does not match.
    """


class Session:
    """One connection and its channel; each delivery belongs to exactly one."""

    def __init__(self, connection: BlockingConnection, channel: BlockingChannel) -> None:
        self.connection = connection
        self.channel = channel
        self._closed = threading.Event()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def close(self) -> None:
        """Called on the connection's thread when it is done with this connection."""
        self._closed.set()


@dataclass(frozen=True)
class _Delivery:
    session: Session
    queue: str
    handler: Handler
    method: Basic.Deliver
    properties: BasicProperties
    body: bytes


class Dispatcher:
    """One worker thread: decode, handle, then ack / retry / park on the connection's thread."""

    def __init__(
        self,
        *,
        max_attempts: int,
        retry_delays_ms: Sequence[int],
        stop: threading.Event,
        name: str = "broker-dispatch",
    ) -> None:
        self._max_attempts = max_attempts
        self._retry_delays_ms = tuple(int(d) for d in retry_delays_ms)
        self._stop = stop
        self._inbox: queue.SimpleQueue[_Delivery | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._busy = False
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    # -- called on the connection's thread --

    def start(self) -> None:
        self._thread.start()

    def receiver(
        self, session: Session, queue_name: str, handler: Handler
    ) -> Callable[[BlockingChannel, Basic.Deliver, BasicProperties, bytes], None]:
        """pika's on_message callback for `queue_name`: hands the delivery to the worker."""

        def on_message(
            channel: BlockingChannel,
            method: Basic.Deliver,
            properties: BasicProperties,
            body: bytes,
        ) -> None:
            self._inbox.put(_Delivery(session, queue_name, handler, method, properties, body))

        return on_message

    def busy(self) -> bool:
        """A message is in hand: its handler runs or its outcome is not carried out yet.

        Once `stop` is set and this is False, the worker starts no other message.
        """
        with self._lock:
            return self._busy

    def raise_failure(self) -> None:
        """Re-raise what a handler raised that is not an Exception (e.g. KeyboardInterrupt)."""
        if self._failure is not None:
            raise self._failure

    def shutdown(self) -> None:
        """Let the worker finish the message in hand (if any) and end."""
        self._inbox.put(None)
        self._thread.join()

    # -- the worker thread --

    def _run(self) -> None:
        while True:
            delivery = self._inbox.get()
            if delivery is None:
                return
            with self._lock:
                if self._stop.is_set() or delivery.session.closed:
                    # Prefetched but not started: leave it unacked; closing the
                    # channel gives it back to the queue. (No nack: a quorum queue
                    # would count that as a failed delivery.)
                    continue
                self._busy = True
            try:
                pause = self._dispatch(delivery)
            except BaseException as exc:  # noqa: BLE001 - handed to the connection's thread
                self._failure = exc
                return
            finally:
                with self._lock:
                    self._busy = False
            if pause:
                self._stop.wait(_MOVE_FAILED_PAUSE_S)

    def _dispatch(self, delivery: _Delivery) -> bool:
        headers = dict(delivery.properties.headers or {})
        attempt = attempts(headers) + 1
        try:
            message = decode(delivery.body)
        except ValueError as exc:
            return self._settle(delivery, self._park(delivery, headers, attempt, exc))
        try:
            delivery.handler(message)
        except Park as exc:
            outcome = self._park(delivery, headers, attempt, exc)
        except Exception as exc:  # noqa: BLE001 - any handler failure is retried, then parked
            if attempt >= self._max_attempts:
                outcome = self._park(delivery, headers, attempt, exc)
            else:
                outcome = self._retry(delivery, headers, attempt, exc)
        else:
            outcome = self._ack(delivery)
        return self._settle(delivery, outcome)

    def _settle(self, delivery: _Delivery, outcome: _Outcome) -> bool:
        """Carry out `outcome` on the delivery's connection thread and wait; True: pause."""
        session = delivery.session
        settled = threading.Event()
        result = {"applied": False, "pause": False}

        def on_connection_thread() -> None:
            try:
                if not session.closed and session.channel.is_open:
                    result["pause"] = outcome(session.channel)
                    result["applied"] = True
            finally:
                settled.set()

        try:
            session.connection.add_callback_threadsafe(on_connection_thread)
        except pika.exceptions.ConnectionWrongStateError:
            pass  # closed already: nothing will run it
        else:
            while not settled.wait(_SETTLE_POLL_S) and not session.closed:
                pass
        if not result["applied"]:
            logger.warning(
                "%s: the connection was lost while the message was handled; not acked,"
                " RabbitMQ delivers it again",
                delivery.queue,
                extra=message_ids(delivery.body),
            )
            return False
        return bool(result["pause"])

    # -- outcomes: built on the worker, carried out on the connection's thread --

    def _ack(self, delivery: _Delivery) -> _Outcome:
        def ack(channel: BlockingChannel) -> bool:
            channel.basic_ack(delivery.method.delivery_tag)
            return False

        return ack

    def _retry(
        self, delivery: _Delivery, headers: dict[str, Any], attempt: int, exc: Exception
    ) -> _Outcome:
        delay = self._retry_delays_ms[min(attempt, len(self._retry_delays_ms)) - 1]
        new_headers = fresh_headers(headers)
        new_headers[H_ATTEMPTS] = attempt
        new_headers[H_ERROR] = error_text(exc)
        target = retry_queue_name(delivery.queue, delay)

        def retry(channel: BlockingChannel) -> bool:
            if not _move(channel, delivery, new_headers, target):
                return True
            logger.info(
                "%s: attempt %d/%d failed (%s); retrying in %d ms",
                delivery.queue,
                attempt,
                self._max_attempts,
                error_text(exc, 200),
                delay,
                extra=message_ids(delivery.body),
            )
            return False

        return retry

    def _park(
        self, delivery: _Delivery, headers: dict[str, Any], attempt: int, exc: Exception
    ) -> _Outcome:
        new_headers = fresh_headers(headers)
        new_headers.update(
            {
                H_ERROR: error_text(exc),
                H_ATTEMPTS: attempt,
                H_ORIGINAL_QUEUE: delivery.queue,
                H_PARKED_AT: now(),
            }
        )
        target = parked_queue_name(delivery.queue)

        def park(channel: BlockingChannel) -> bool:
            if not _move(channel, delivery, new_headers, target):
                return True
            logger.warning(
                "parked a message of %s in %s after %d attempt(s): %s",
                delivery.queue,
                target,
                attempt,
                error_text(exc, 300),
                extra=message_ids(delivery.body),
            )
            return False

        return park


def _move(
    channel: BlockingChannel, delivery: _Delivery, headers: dict[str, Any], target: str
) -> bool:
    """Confirmed publish to `target` through the default exchange, then ack the original."""
    try:
        channel.basic_publish(
            "",
            target,
            delivery.body,
            properties_like(delivery.properties, headers),
            mandatory=True,
        )
    except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
        # Not moved: keep the original. It comes back after a pause; the pause
        # keeps a broker in trouble from being hammered.
        logger.error("could not move a message to %s (%r); requeued it", target, exc)
        channel.basic_nack(delivery.method.delivery_tag, requeue=True)
        if isinstance(exc, pika.exceptions.NackError):
            raise ChannelNacking(f"a move to {target} was nacked") from exc
        return False
    channel.basic_ack(delivery.method.delivery_tag)
    return True
