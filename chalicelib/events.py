"""The relay: order events from the outbox to RabbitMQ's exchange.order.events.

An event is in the outbox because its change committed (chalicelib/store/outbox.py).
The relay publishes an order's unsent events in their order, each confirmed by
RabbitMQ before it is marked sent (many marks to a request), and stops at an
order's first event that could not be published, so that a consumer never sees
an order's later event before an earlier one that is still to come. A crash
between the confirm and the mark publishes that event again later: consumers
dedupe on `eventId`.

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
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from chalicelib.context import Deps
from chalicelib.domain import Unavailable
from chalicelib.domain.events import OrderEvent, order_fields

log = logging.getLogger(__name__)

PARK_AFTER = 3
SWEEP_BATCH = 500  # events a page of the sweep
MARK_CHUNK = 100  # published events marked sent together (BatchWriteItem takes 25 a request)


class _OrderFields:
    """The fields of recent orders (they never change), so that an `order.paid` event,
    written without them, is joined without reading its order: its `order.created`
    came through this process a moment before, as a rule. Bounded; thread-safe."""

    def __init__(self, size: int = 20_000) -> None:
        self._size = size
        self._held: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def keep(self, order_id: str, fields: dict[str, Any]) -> None:
        with self._lock:
            self._held[order_id] = fields
            self._held.move_to_end(order_id)
            while len(self._held) > self._size:
                self._held.popitem(last=False)

    def get(self, order_id: str) -> dict[str, Any] | None:
        with self._lock:
            return self._held.get(order_id)


KNOWN = _OrderFields()


def _fields(d: Deps, pending: Sequence[OrderEvent]) -> dict[str, dict[str, Any]]:
    """Each pending event's order's fields: from an event that carries them, from
    KNOWN, else read (one request per hundred orders). An order not found is left out."""
    found: dict[str, dict[str, Any]] = {}
    for event in pending:
        if event.order is not None:
            found[event.order_id] = event.order
            KNOWN.keep(event.order_id, event.order)
    for order_id in {e.order_id for e in pending} - set(found):
        known = KNOWN.get(order_id)
        if known is not None:
            found[order_id] = known
    missing = {e.order_id for e in pending} - set(found)
    if missing:
        for order_id, order in d.store.get_orders(missing).items():
            found[order_id] = order_fields(order)
            KNOWN.keep(order_id, found[order_id])
    return found


class _Run:
    """One relay run's publishing: an order whose event could not be published
    keeps it and its later ones for the next run; three such failures (RabbitMQ is
    down) end the run."""

    def __init__(self, d: Deps) -> None:
        self.d = d
        self.stuck: set[str] = set()
        self.failed = 0
        self.published = 0

    @property
    def over(self) -> bool:
        return self.failed >= 3

    def publish(self, pending: Sequence[OrderEvent], sent: Callable[[list[OrderEvent]], None],
                chunk: int = MARK_CHUNK) -> None:
        """Publishes `pending` (each order's in its order), each with its confirm,
        handing the published ones to `sent` a chunk at a time. An event whose order
        is gone is counted towards parking."""
        fields = _fields(self.d, pending) if pending else {}
        done: list[OrderEvent] = []
        try:
            for event in pending:
                if event.order_id in self.stuck or self.over:
                    continue  # an earlier event of its order is still to go
                if event.order_id not in fields:
                    _cannot(self.d, event, "its order does not exist")
                    continue
                try:
                    self.d.broker.publish_event(event.to_wire(fields[event.order_id]))
                except Unavailable as exc:
                    self.stuck.add(event.order_id)
                    self.failed += 1
                    log.warning("event %s not published: %s; tried again later",
                                event.event_id, exc, extra={"orderId": event.order_id})
                    continue
                done.append(event)
                self.published += 1
                if len(done) >= chunk:
                    sent(done)
                    done = []
        finally:
            if done:
                sent(done)


def publish(d: Deps, pending: Sequence[OrderEvent]) -> dict[str, int]:
    """Publishes `pending` (unsent events, each order's in its order) with their
    confirms and marks the published ones sent, many to a request."""
    run = _Run(d)
    run.publish(pending, lambda done: d.store.mark_events_sent(done, now=d.clock()))
    if run.published or run.failed:
        log.info("events: %d published, %d failed", run.published, run.failed)
    return {"events": len(pending), "published": run.published, "failed": run.failed}


def relay_order(d: Deps, order_id: str) -> int:
    """Publishes the order's unsent events in order; how many it published."""
    result = publish(d, d.store.unsent_events(order_id))
    if result["failed"]:
        raise Unavailable(f"events of {order_id} not published; the sweep tries again")
    return result["published"]


def _cannot(d: Deps, event: OrderEvent, reason: str) -> None:
    parked = d.store.event_failed(event, reason=reason, park_after=PARK_AFTER)
    log.error("event %s of %s %s: %s", event.event_id, event.order_id,
              "parked" if parked else "not published", reason,
              extra={"orderId": event.order_id, "eventId": event.event_id})


def sweep_unsent(d: Deps, *, older_than_seconds: float) -> dict[str, int]:
    """Publishes every event unsent for longer than `older_than_seconds`, as `publish`
    does, with its I/O overlapped: a thread reads the next page of the sparse index
    and another marks what was published while this one publishes (each confirm is
    a wait on RabbitMQ, each page and mark one on DynamoDB)."""
    before = d.clock() - timedelta(seconds=older_than_seconds)
    run = _Run(d)
    pages: queue.Queue[list[OrderEvent] | BaseException | None] = queue.Queue(maxsize=2)
    marks: queue.Queue[list[OrderEvent] | None] = queue.Queue()
    stop = threading.Event()
    errors: list[BaseException] = []

    def read() -> None:
        try:
            for page in d.store.unsent_pages(before, SWEEP_BATCH):
                if stop.is_set():
                    return
                pages.put(page)
        except BaseException as exc:  # noqa: BLE001 - raised by the publishing thread
            pages.put(exc)
        finally:
            pages.put(None)

    def mark() -> None:
        while (done := marks.get()) is not None:
            try:
                d.store.mark_events_sent(done, now=d.clock())
            except BaseException as exc:  # noqa: BLE001 - raised below; the events go again
                errors.append(exc)

    reader = threading.Thread(target=read, name="relay-read", daemon=True)
    marker = threading.Thread(target=mark, name="relay-mark", daemon=True)
    reader.start()
    marker.start()
    seen = 0
    try:
        while (page := pages.get()) is not None:
            if isinstance(page, BaseException):
                raise page
            seen += len(page)
            run.publish(page, marks.put)
            if run.over:
                stop.set()  # RabbitMQ is down: the next sweep
    finally:
        stop.set()
        while reader.is_alive() or not pages.empty():  # let the reader finish its put
            try:
                pages.get(timeout=0.1)
            except queue.Empty:
                pass
        marks.put(None)
        marker.join()
    if errors:
        raise errors[0]
    if run.published or run.failed:
        log.info("events sweep: %d published, %d failed", run.published, run.failed)
    return {"events": seen, "published": run.published, "failed": run.failed}


def relay_stream_records(d: Deps, records: list[dict[str, Any]]) -> int:
    """The outbox stream's new items (their keys, as the stream gives them): the
    unsent events of their orders, published as `publish` does. Unavailable is
    raised for the stream to give the batch again (what was published is marked
    sent, so it is not published twice by that)."""
    orders: dict[str, None] = {}
    for record in records:
        if record.get("eventName") != "INSERT":
            continue  # the relay's own marks, and TTL removals
        keys = record.get("dynamodb", {}).get("Keys", {})
        order_id = keys.get("order_id", {}).get("S")
        if order_id:
            orders.setdefault(order_id, None)
    pending = [e for order_id in orders for e in d.store.unsent_events(order_id)]
    result = publish(d, pending)
    if result["failed"]:
        raise Unavailable(f"{result['failed']} event(s) not published; the stream gives "
                          "them again")
    return result["published"]


def parked(d: Deps, limit: int = 100) -> list[dict[str, Any]]:
    """The parked events, for /admin/attention."""
    return [{"eventId": e.event_id, "type": e.kind.value, "orderId": e.order_id,
             "reason": reason} for e, reason in d.store.parked_events(limit)]
