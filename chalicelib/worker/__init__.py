"""The worker: drains RabbitMQ into the handlers (the production "bridge").

It runs beside the broker (a container on ECS, or `python -m chalicelib.worker`
anywhere), not in Lambda: it consumes queue.order.check, queue.order.pay and
queue.order.seckill into the same handler functions the HTTP routes call,
acking only after the handler's write (chalicelib.broker.run_consumer), and
sweeps for lost delay messages every `SWEEP_INTERVAL_SECONDS`.

What a handler's error means for its message is decided here, in one table
(`DISPOSITIONS`): the domain's errors know nothing of queues.

A queue may be drained at a fixed rate (`rate_limits`, messages a second; from
SECKILL_ORDERS_PER_SECOND and BRIDGE_PAY_PER_SECOND by default): a token bucket
(chalicelib/ratelimit.py) paces its handler in a consumer of its own (its own
connection and thread), so that its waiting never holds up the other queues.
"""

from __future__ import annotations

import enum
import logging
import os
import signal
import threading
from collections.abc import Callable, Mapping
from typing import Any

from chalicelib import (
    admin,
    broker,
    events,
    handlers,
    metrics,
    reconcile,
    refunds,
    seckill,
    webhooks,
)
from chalicelib.config import Settings
from chalicelib.context import Deps
from chalicelib.domain import Unavailable, Unprocessable
from chalicelib.ratelimit import TokenBucket

log = logging.getLogger(__name__)

Handle = Callable[[dict[str, Any]], None]


class Disposition(enum.Enum):
    RETRY = "retry"  # later, through the queue's retry queues, then parked
    PARK = "park"  # at once: no retry can fix it


# A handler's error -> what becomes of its message. Not named: RETRY (a bug or an
# outage we did not foresee is retried a bounded number of times, then parked).
DISPOSITIONS: dict[type[Exception], Disposition] = {
    Unprocessable: Disposition.PARK,
    Unavailable: Disposition.RETRY,
}


def disposition(exc: Exception) -> Disposition:
    for kind in type(exc).__mro__:
        if kind in DISPOSITIONS:
            return DISPOSITIONS[kind]
    return Disposition.RETRY


def consumer(fn: Callable[[Deps, dict[str, Any]], Any], d: Deps) -> Handle:
    """A handler as the consume loop wants it: `broker.Park` for what must be parked."""

    crash_before_ack = d.settings.bridge_fault == "kill-before-ack"

    def handle(msg: dict[str, Any]) -> None:
        try:
            fn(d, msg)
        except Exception as exc:
            if disposition(exc) is Disposition.PARK:
                raise broker.Park(str(exc)) from exc
            raise
        if crash_before_ack:
            # For the crash test only: die after the handler's write, before the ack.
            log.warning("BRIDGE_FAULT=kill-before-ack: killing myself before the ack")
            os.kill(os.getpid(), signal.SIGKILL)

    handle.__name__ = fn.__name__
    return handle


def queue_handlers(d: Deps) -> dict[str, Handle]:
    return {
        broker.QUEUE_CHECK: consumer(handlers.on_check, d),
        broker.QUEUE_PAY: consumer(handlers.on_paid, d),
        broker.QUEUE_SECKILL: consumer(seckill.on_seckill, d),
        broker.QUEUE_REFUND: consumer(refunds.resolve_refund, d),
        broker.QUEUE_WEBHOOK: consumer(webhooks.fan_out, d),
        broker.QUEUE_WEBHOOK_DELIVER: consumer(webhooks.deliver, d),
    }


def rate_limits_from(settings: Settings) -> dict[str, float]:
    """Messages a second per queue, from the settings; a queue not named is not paced."""
    limits = {broker.QUEUE_SECKILL: settings.seckill_orders_per_second,
              broker.QUEUE_PAY: settings.bridge_pay_per_second}
    return {queue: rate for queue, rate in limits.items() if rate > 0}


def throttled(handle: Handle, bucket: TokenBucket) -> Handle:
    """`handle`, called at most `bucket.rate` times a second (also the message in hand
    when stopping: it is finished within the rate)."""

    def paced(msg: dict[str, Any]) -> None:
        bucket.take()
        handle(msg)

    paced.__name__ = getattr(handle, "__name__", "paced")
    return paced


RECONCILE_ROUND_SECONDS = 600.0  # as the deployed reconciler's schedule


def sweep_forever(d: Deps, stop: threading.Event, interval: float) -> None:
    while not stop.wait(interval):
        try:
            result = handlers.sweep(d)
            if any(result.values()):
                log.info("sweep: %s", result)
            metrics.emit_attention(admin.attention(d), stage=d.settings.stage)
        except Exception:  # noqa: BLE001 - the next round tries again
            log.exception("sweep failed")


def relay_forever(d: Deps, stop: threading.Event, interval: float) -> None:
    """The outbox's backstop sweep (chalicelib/events.py), every `interval`: events
    older than OUTBOX_SWEEP_AFTER_SECONDS that no stream relay published. A
    thread of its own, so that a broker outage delays no other sweep."""
    after = d.settings.outbox_sweep_after_seconds
    while not stop.wait(interval):
        try:
            events.sweep_unsent(d, older_than_seconds=after)
        except Exception:  # noqa: BLE001 - the next round tries again
            log.exception("events sweep failed")


RECONCILE_FIRST_ROUND_SECONDS = 60.0  # after the worker started, busy with its queues


def reconcile_forever(d: Deps, stop: threading.Event,
                      interval: float = RECONCILE_ROUND_SECONDS,
                      first_delay: float = RECONCILE_FIRST_ROUND_SECONDS) -> None:
    """The reconciler's round where reconciliations run in-process (the local stack,
    which has no scheduled functions): a minute after the start, then every
    `interval`. A thread of its own: a round waits on Alipay, and the sweeps must
    not wait behind it."""
    if stop.wait(first_delay):
        return
    while True:
        try:
            ran = reconcile.run_scheduled(d)["ran"]
            if ran:
                log.info("reconciliations: %s", ran)
        except Exception:  # noqa: BLE001 - the next round tries again
            log.exception("reconciliation round failed")
        if stop.wait(interval):
            return


def run(d: Deps, stop: threading.Event, *, prefetch: int | None = None,
        sweep_interval: float | None = None,
        retry_delays_ms: tuple[int, ...] | None = None,
        rate_limits: Mapping[str, float] | None = None,
        workers: int | None = None) -> None:
    """Consume until `stop` is set. `rate_limits`: queue name -> messages a second
    (None: from the settings; a rate of 0 or a queue not named: not paced).
    `workers`: consumers on the unpaced queues, each with its own connection, so that
    one message's reads and writes overlap another's (None: BRIDGE_WORKERS). Every
    handler is a conditional write, so two workers on one order still make one winner."""
    settings = d.settings
    interval = settings.sweep_interval_seconds if sweep_interval is None else sweep_interval
    every = queue_handlers(d)
    limits = rate_limits_from(settings) if rate_limits is None else {
        queue: float(rate) for queue, rate in rate_limits.items() if rate > 0}
    if rate_limits is not None and any(rate < 0 for rate in rate_limits.values()):
        raise ValueError(f"a rate must be 0 (not paced) or more: {dict(rate_limits)}")
    if set(limits) - set(every):
        raise ValueError(f"rate_limits must name some of {sorted(every)}, not {sorted(limits)}")

    prefetch = prefetch or settings.bridge_prefetch
    retry_delays_ms = retry_delays_ms or settings.bridge_retry_delays_ms

    def consume(chosen: dict[str, Handle], prefetch: int = prefetch) -> None:
        broker.run_consumer(
            settings.worker_rmq_url,
            chosen,
            prefetch=prefetch,
            max_attempts=settings.bridge_max_attempts,
            retry_delays_ms=retry_delays_ms,
            webhook_waits_s=settings.webhook_retry_seconds,
            check_delay_seconds=settings.check_delay_seconds,
            queue_type=settings.rmq_queue_type,
            stop=stop,
        )

    failures: list[BaseException] = []

    def work(chosen: dict[str, Handle], prefetch: int = prefetch) -> None:
        try:
            consume(chosen, prefetch)
        except BaseException as exc:  # noqa: BLE001 - re-raised by run() below
            failures.append(exc)
            stop.set()

    # Webhook attempts wait on subscribers: consumers of their own, one message at
    # a time each, so a slow subscriber holds one of them and no order queue.
    deliver = every.pop(broker.QUEUE_WEBHOOK_DELIVER)
    rest = {queue: h for queue, h in every.items() if queue not in limits}
    count = max(1, workers if workers is not None else settings.bridge_workers)
    d.store.warm()  # one set of DynamoDB clients for every thread below
    sweeper = threading.Thread(target=sweep_forever, args=(d, stop, interval),
                               name="sweeper", daemon=True)
    sweeper.start()
    if settings.reconcile_inline and d.gateway is not None:
        threading.Thread(target=reconcile_forever, args=(d, stop), name="reconciler",
                         daemon=True).start()
    paced = {queue: throttled(every[queue], TokenBucket(rate)) for queue, rate in limits.items()}
    drains = [threading.Thread(target=work, args=({queue: handle},), name=f"drain {queue}",
                               daemon=True) for queue, handle in paced.items()]
    drains += [threading.Thread(target=work, args=(rest,), name=f"worker {i}", daemon=True)
               for i in range(1, count) if rest]
    drains += [threading.Thread(target=work, args=({broker.QUEUE_WEBHOOK_DELIVER: deliver}, 1),
                                name=f"webhooks {i}", daemon=True)
               for i in range(settings.webhook_workers)]
    relay = threading.Thread(target=relay_forever, args=(d, stop, settings.relay_interval_seconds),
                             name="relay", daemon=True)
    relay.start()
    for thread in drains:
        thread.start()
    if limits:
        log.info("paced: %s", ", ".join(f"{q} {r:g}/s" for q, r in limits.items()))
    if rest:
        log.info("%d worker(s) on %s", count, ", ".join(rest))
    try:
        if rest:
            consume(rest)
        else:
            stop.wait()
    finally:
        stop.set()
        for thread in drains:
            thread.join(10)
        sweeper.join(5)
        relay.join(5)
    if failures:
        raise failures[0]
