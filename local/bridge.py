"""The bridge: the container's entry point (`python -m local bridge`).

Consumes queue.order.check, queue.order.pay and queue.order.seckill into the
same handler functions the HTTP routes use, acking only after the handler's
write (see chalicelib.broker.run_consumer), and runs the sweeper for lost delay
messages every `SWEEP_INTERVAL_SECONDS`. SIGTERM or SIGINT: finish the message
in hand, stop.

A queue may be drained at a fixed rate (`rate_limits`, messages a second; from
SECKILL_ORDERS_PER_SECOND and BRIDGE_PAY_PER_SECOND by default): a token bucket
(chalicelib/ratelimit.py) paces its handler, in a consumer of its own (its own
connection and thread), so that its waiting never holds up the other queues.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Mapping
from typing import Any

from chalicelib import broker, config, deps, handlers, seckill
from chalicelib.handlers import Deps
from chalicelib.orders import Unprocessable
from chalicelib.ratelimit import TokenBucket

log = logging.getLogger("local.bridge")


def consumer(fn: Callable[[Deps, dict[str, Any]], Any], d: Deps,
             ) -> Callable[[dict[str, Any]], None]:
    """A handler as the consume loop wants it: a message no retry can fix is parked at once."""

    crash_before_ack = os.environ.get("BRIDGE_FAULT") == "kill-before-ack"

    def handle(msg: dict[str, Any]) -> None:
        try:
            fn(d, msg)
        except Unprocessable as exc:
            raise broker.Park(exc.message) from exc
        if crash_before_ack:
            # For the crash test only: die after the handler's write, before the ack.
            log.warning("BRIDGE_FAULT=kill-before-ack: killing myself before the ack")
            os.kill(os.getpid(), signal.SIGKILL)

    handle.__name__ = fn.__name__
    return handle


def queue_handlers(d: Deps) -> dict[str, Callable[[dict[str, Any]], None]]:
    return {
        broker.QUEUE_CHECK: consumer(handlers.on_check, d),
        broker.QUEUE_PAY: consumer(handlers.on_paid, d),
        broker.QUEUE_SECKILL: consumer(seckill.on_seckill, d),
    }


def rate_limits_from(settings: config.Settings) -> dict[str, float]:
    """Messages a second per queue, from the settings; a queue not named is not paced."""
    limits = {broker.QUEUE_SECKILL: settings.seckill_orders_per_second,
              broker.QUEUE_PAY: settings.bridge_pay_per_second}
    return {queue: rate for queue, rate in limits.items() if rate > 0}


def throttled(handle: Callable[[dict[str, Any]], None], bucket: TokenBucket,
              ) -> Callable[[dict[str, Any]], None]:
    """`handle`, called at most `bucket.rate` times a second (also the message in hand
    when stopping: it is finished within the rate)."""

    def paced(msg: dict[str, Any]) -> None:
        bucket.take()
        handle(msg)

    paced.__name__ = getattr(handle, "__name__", "paced")
    return paced


def sweep_forever(d: Deps, stop: threading.Event, interval: float) -> None:
    while not stop.wait(interval):
        try:
            result = handlers.sweep(d)
            if result["due"]:
                log.info("sweep: %s", result)
        except Exception:  # noqa: BLE001 - the next round tries again
            log.exception("sweep failed")


def _retry_delays() -> tuple[int, ...]:
    raw = os.environ.get("BRIDGE_RETRY_DELAYS_MS", "")
    if not raw.strip():
        return tuple(broker.DEFAULT_RETRY_DELAYS_MS)
    return tuple(int(x) for x in raw.split(",") if x.strip())


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
    interval = sweep_interval if sweep_interval is not None else float(
        os.environ.get("SWEEP_INTERVAL_SECONDS", "60"))
    every = queue_handlers(d)
    limits = rate_limits_from(settings) if rate_limits is None else {
        queue: float(rate) for queue, rate in rate_limits.items() if rate > 0}
    if rate_limits is not None and any(rate < 0 for rate in rate_limits.values()):
        raise ValueError(f"a rate must be 0 (not paced) or more: {dict(rate_limits)}")
    if set(limits) - set(every):
        raise ValueError(f"rate_limits must name some of {sorted(every)}, not {sorted(limits)}")

    prefetch = prefetch or settings.bridge_prefetch
    retry_delays_ms = retry_delays_ms or _retry_delays()

    def consume(chosen: dict[str, Callable[[dict[str, Any]], None]]) -> None:
        broker.run_consumer(
            settings.rmq_url,
            chosen,
            prefetch=prefetch,
            max_attempts=settings.bridge_max_attempts,
            retry_delays_ms=retry_delays_ms,
            check_delay_seconds=settings.check_delay_seconds,
            queue_type=settings.rmq_queue_type,
            stop=stop,
        )

    failures: list[BaseException] = []

    def work(chosen: dict[str, Callable[[dict[str, Any]], None]]) -> None:
        try:
            consume(chosen)
        except BaseException as exc:  # noqa: BLE001 - re-raised by run() below
            failures.append(exc)
            stop.set()

    rest = {queue: h for queue, h in every.items() if queue not in limits}
    count = max(1, workers if workers is not None else settings.bridge_workers)
    d.store.warm()  # one set of DynamoDB clients for every thread below
    sweeper = threading.Thread(target=sweep_forever, args=(d, stop, interval),
                               name="sweeper", daemon=True)
    sweeper.start()
    paced = {queue: throttled(every[queue], TokenBucket(rate)) for queue, rate in limits.items()}
    drains = [threading.Thread(target=work, args=({queue: handle},), name=f"drain {queue}",
                               daemon=True) for queue, handle in paced.items()]
    drains += [threading.Thread(target=work, args=(rest,), name=f"worker {i}", daemon=True)
               for i in range(1, count) if rest]
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
    if failures:
        raise failures[0]


def main() -> int:
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        log.info("signal %s: finishing the message in hand, then stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    settings = config.get()
    logging.getLogger("pika").setLevel(logging.WARNING)
    log.info("bridge: %s, prefetch %s, check delay %s s", broker.safe_url(settings.rmq_url),
             settings.bridge_prefetch, settings.check_delay_seconds)
    try:
        run(deps.get(), stop)
    except broker.TopologyMismatch as exc:
        log.error("%s", exc)
        return 2
    return 0
