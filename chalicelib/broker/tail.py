"""Order events as they pass, for a person at a terminal (`events tail`).

A queue of its own, exclusive and deleted when the connection goes, bound to
exchange.order.events: it sees the events published from the moment it is
bound, and takes nothing from anyone else's queue. It is named under
`queue.order.` so that the worker's user, whose rights cover those names, may
declare it.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
from collections.abc import Callable, Sequence
from typing import Any

from chalicelib.broker.connection import close_quietly, connect, parameters
from chalicelib.broker.topology import EVENTS_BINDING, EXCHANGE_EVENTS

log = logging.getLogger(__name__)

TAIL_PREFIX = "queue.order.events.tail."


def tail_events(url: str, on_event: Callable[[dict[str, Any]], None], *,
                stop: threading.Event, keys: Sequence[str] = (EVENTS_BINDING,),
                ready: threading.Event | None = None) -> int:
    """Calls `on_event` with each event (a JSON object) until `stop` is set; how many
    it saw. `keys`: the binding keys (`order.paid`, `order.#`). `ready` is set once
    the queue is bound. BrokerUnavailable when RabbitMQ cannot be reached."""
    connection = connect(url, parameters(url))
    seen = 0
    try:
        channel = connection.channel()
        queue = TAIL_PREFIX + secrets.token_hex(6)
        channel.queue_declare(queue, exclusive=True, auto_delete=True)
        for key in keys:
            channel.queue_bind(queue, EXCHANGE_EVENTS, routing_key=key)
        if ready is not None:
            ready.set()
        while not stop.is_set():
            for method, _props, body in channel.consume(queue, auto_ack=True,
                                                         inactivity_timeout=0.2):
                if method is None:
                    if stop.is_set():
                        break
                    continue
                try:
                    event = json.loads(body)
                except ValueError:
                    log.warning("not JSON on %s: %r", EXCHANGE_EVENTS, body[:200])
                    continue
                if isinstance(event, dict):
                    seen += 1
                    on_event(event)
            channel.cancel()
    finally:
        close_quietly(connection)
    return seen
