"""The bridge: the container's entry point (`python -m local bridge`).

Consumes queue.order.check and queue.order.pay into the same handler functions
the HTTP routes use, acking only after the handler's write (see
chalicelib.broker.run_consumer), and runs the sweeper for lost delay messages
every `SWEEP_INTERVAL_SECONDS`. SIGTERM or SIGINT: finish the message in hand, stop.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from chalicelib import broker, config, deps, handlers
from chalicelib.handlers import Deps
from chalicelib.orders import Unprocessable

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
    }


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
        retry_delays_ms: tuple[int, ...] | None = None) -> None:
    settings = d.settings
    interval = sweep_interval if sweep_interval is not None else float(
        os.environ.get("SWEEP_INTERVAL_SECONDS", "60"))
    sweeper = threading.Thread(target=sweep_forever, args=(d, stop, interval),
                               name="sweeper", daemon=True)
    sweeper.start()
    broker.run_consumer(
        settings.rmq_url,
        queue_handlers(d),
        prefetch=prefetch or settings.bridge_prefetch,
        max_attempts=settings.bridge_max_attempts,
        retry_delays_ms=retry_delays_ms or _retry_delays(),
        check_delay_seconds=settings.check_delay_seconds,
        queue_type=settings.rmq_queue_type,
        stop=stop,
    )
    stop.set()
    sweeper.join(5)


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
