"""The relay: order events from the outbox to RabbitMQ's exchange.order.events.

An event is in the outbox because its change committed (chalicelib/store/outbox.py).
The relay publishes an order's unsent events in their order, each confirmed by
RabbitMQ before it is marked sent, and stops at the first that could not be
published, so that a consumer never sees an order's later event before an
earlier one that is still to come. A crash between the confirm and the mark
publishes that event again later: consumers dedupe on `eventId`.

Two things call it:
- the outbox table's stream (AWS: app.py's `relay_events`, a DynamoDB-stream
  function), at once for each new event;
- the backstop sweep (`sweep_unsent`), for events the stream's relay did not
  get out (RabbitMQ down, a function that timed out), found through a sparse
  index of unsent events, never a scan. The worker runs it every
  RELAY_INTERVAL_SECONDS; on the local stack, which has no stream function, it
  is the relay itself (OUTBOX_SWEEP_AFTER_SECONDS=0).

An event that cannot be made into a message (its order is missing, its stored
fields do not parse) fails the same way every time: after PARK_AFTER tries it
is parked, shown in /admin/attention, and the order's later events go on.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from chalicelib.context import Deps
from chalicelib.domain import Unavailable
from chalicelib.domain.events import OrderEvent

log = logging.getLogger(__name__)

PARK_AFTER = 3
SWEEP_BATCH = 200


def relay_order(d: Deps, order_id: str) -> int:
    """Publishes the order's unsent events in order; how many it published.
    Unavailable when RabbitMQ or DynamoDB did not answer (the rest waits)."""
    pending = d.store.unsent_events(order_id)
    if not pending:
        return 0
    order = d.store.get_order(order_id)
    sent = 0
    for event in pending:
        if order is None:
            _cannot(d, event, "its order does not exist")
            continue
        try:
            wire = event.to_wire(order)
        except (KeyError, TypeError, ValueError) as exc:
            _cannot(d, event, f"it cannot be made into a message: {exc!r}")
            continue
        d.broker.publish_event(wire)  # confirmed; Unavailable: stop here, keep the order
        d.store.mark_event_sent(event, now=d.clock())
        sent += 1
    return sent


def _cannot(d: Deps, event: OrderEvent, reason: str) -> None:
    parked = d.store.event_failed(event, reason=reason, park_after=PARK_AFTER)
    log.error("event %s of %s %s: %s", event.event_id, event.order_id,
              "parked" if parked else "not published", reason,
              extra={"orderId": event.order_id, "eventId": event.event_id})


def sweep_unsent(d: Deps, *, older_than_seconds: float) -> dict[str, int]:
    """Relays every order with an event unsent for longer than `older_than_seconds`.
    An order whose relay fails is left for the next sweep; the others go on."""
    before = d.clock() - timedelta(seconds=older_than_seconds)
    published = failed = 0
    orders = d.store.unsent_orders(before, limit=SWEEP_BATCH)
    for order_id in orders:
        try:
            published += relay_order(d, order_id)
        except Unavailable as exc:
            failed += 1
            log.warning("relay of %s: %s; the next sweep tries again", order_id, exc,
                        extra={"orderId": order_id})
            if failed >= 3:  # RabbitMQ is down: the next sweep, not every order now
                break
    if published or failed:
        log.info("events sweep: %d order(s), %d event(s) published, %d failed",
                 len(orders), published, failed)
    return {"orders": len(orders), "published": published, "failed": failed}


def relay_stream_records(d: Deps, records: list[dict[str, Any]]) -> int:
    """The outbox stream's new items (their keys, as the stream gives them):
    each order's events relayed once per batch. Unavailable is raised for the
    stream to try the batch again (a relayed event is not published twice by
    that: it is marked sent)."""
    orders: dict[str, None] = {}
    for record in records:
        if record.get("eventName") != "INSERT":
            continue  # the relay's own marks, and TTL removals
        keys = record.get("dynamodb", {}).get("Keys", {})
        order_id = keys.get("order_id", {}).get("S")
        if order_id:
            orders.setdefault(order_id, None)
    return sum(relay_order(d, order_id) for order_id in orders)


def parked(d: Deps, limit: int = 100) -> list[dict[str, Any]]:
    """The parked events, for /admin/attention."""
    return [{"eventId": e.event_id, "type": e.kind.value, "orderId": e.order_id,
             "reason": reason} for e, reason in d.store.parked_events(limit)]
