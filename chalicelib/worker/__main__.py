"""`python -m chalicelib.worker`: the worker's process (the container's command).

SIGTERM or SIGINT: finish the message in hand, ack it, exit 0.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import threading

from chalicelib import broker, config, deps, logs
from chalicelib.context import Deps
from chalicelib.worker import run

log = logging.getLogger("chalicelib.worker")


def own_user(d: Deps) -> Deps:
    """`d` with the worker's RabbitMQ user everywhere: what its handlers publish goes
    through that user too (it may publish to the exchanges), never the API's."""
    settings = d.settings
    if settings.rmq_url == settings.worker_rmq_url:
        return d
    own = dataclasses.replace(settings, rmq_url=settings.worker_rmq_url)
    return dataclasses.replace(d, settings=own, broker=broker.Broker(
        own.rmq_url, own.check_delay_seconds, own.rmq_queue_type,
        webhook_waits_s=own.webhook_retry_seconds))


def main() -> int:
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        log.info("signal %s: finishing the message in hand, then stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    settings = config.get()
    logs.configure(settings.log_level, force=True)
    try:
        config.check(settings)
    except config.SettingsError as exc:
        log.error("%s", exc)
        return 2
    log.info("worker: %s, prefetch %s, check delay %s s",
             broker.safe_url(settings.worker_rmq_url), settings.bridge_prefetch,
             settings.check_delay_seconds)
    try:
        run(own_user(deps.get()), stop)
    except broker.TopologyMismatch as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
