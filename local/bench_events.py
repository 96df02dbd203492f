"""Stage 9 of `python -m local bench`: order events.

- The relay: N order events waiting in the outbox (written with batch_write in the
  store's format, as N orders' create transactions would leave them), published
  by the worker's relay (chalicelib.events.sweep_unsent, what the local stack
  and the backstop run) until none is left, against a bare confirmed publish
  of the same messages (pika, one confirm per message, as the relay waits for
  each) to exchange.order.events. Target: at least 0.8 of it.
- The payment path: notify -> PAID through the route and the bridge, with the
  event written in the transaction (today's code) against the same path with
  the single conditional update it made before the outbox (kept here as
  `PreOutboxStore.mark_paid`), at the same pace, rounds interleaved (ABBA, every
  order seeded first, so that neither runs on a bigger table). Target: the
  outbox costs at most 10% at p50.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from local.bench import (
    Row,
    StageResult,
    World,
    bare_confirmed_channel,
    bare_publish,
    connect,
    declare_project_topology,
    make_deps,
    make_store,
    notify_to_paid,
    pct,
    progress,
    seed_orders,
    signed_notifies,
    vhost,
)


def _stores() -> tuple[Any, Any]:
    """make_store's TimingStore, and the same with mark_paid as it was before the
    outbox: one conditional UpdateItem, no event; the timeline's events each a write
    of their own, the notify's before it (the route wrote it), the payment's after."""
    from chalicelib.domain import PAID, UNPAID, iso
    from chalicelib.domain.reconciliation import bill_day
    from chalicelib.store.base import conditional

    timing = make_store()

    class PreOutboxStore(type(timing)):  # type: ignore[misc]
        def mark_paid(self, order_id: str, *, total_fen: int, trade_no: str,
                      pay_time: datetime, notify_id: str | None, now: datetime,
                      notes: Sequence[Any] = ()) -> bool:
            m = self.models
            # Before, the route wrote the notify's timeline event before it published,
            # so it was on this path; the payment's came after the update.
            for note in notes[:-1]:
                self.append_event(note)
            with conditional() as written:
                m.Order._get_connection().update_item(
                    order_id,
                    actions=[m.Order.status.set(PAID), m.Order.transaction_id.set(trade_no),
                             m.Order.pay_time.set(iso(pay_time)),
                             m.Order.pay_day.set(bill_day(pay_time).isoformat()),
                             m.Order.notify_id.set(notify_id or ""),
                             m.Order.update_time.set(iso(now)), m.Order.unpaid.remove()],
                    condition=(m.Order.status == UNPAID) & (m.Order.total_fen == total_fen))
            if written.held:
                self.paid[order_id] = time.perf_counter()
                for note in notes[-1:]:
                    self.append_event(note)
            return written.held

    return timing, PreOutboxStore()


def _seed_events(orders: list[Any]) -> list[bytes]:
    """Each order's `order.created` event in the outbox, unsent; the messages the relay
    will publish for them."""
    from chalicelib.domain import events
    from chalicelib.store.outbox import UNSENT_FLAG
    from local.bench_models import models

    M = models()
    made = [events.created(o, o.create_time) for o in orders]
    with M.Outbox.batch_write() as batch:
        for e in made:
            batch.save(M.Outbox(e.order_id, e.seq, event_id=e.event_id, type=e.kind.value,
                                occurred_at=e.seq.split("#")[0], data=json.dumps(e.data),
                                order=json.dumps(e.order), unsent=UNSENT_FLAG))
    return [json.dumps(e.to_wire(), ensure_ascii=False).encode() for e in made]


def _floor(url: str, n: int) -> float:
    """The I/O a relay of `n` waiting events cannot avoid, done bare, one batch after
    another as the relay does: the sparse index read (pynamodb's low-level query,
    raw items), a confirmed publish of each event's body, the marks (batch_write of
    the items less their flag). Events a second."""
    from chalicelib import broker
    from chalicelib.store.outbox import UNSENT_FLAG, up_to
    from local.bench_models import models

    M = models()
    conn = M.Outbox._get_connection()
    pconn, pch = bare_confirmed_channel(url)
    start = time.perf_counter()
    done = 0
    while done < n:
        page = conn.query(UNSENT_FLAG, M.Outbox.seq < up_to(datetime.now(UTC)),
                          index_name="unsent", limit=500)
        items = page.get("Items", [])
        if not items:
            break
        for item in items:
            fields = json.loads(item["order"]["S"])
            body = {"eventId": item["event_id"]["S"], "type": item["type"]["S"],
                    "orderId": item["order_id"]["S"], "occurredAt": item["occurred_at"]["S"],
                    "data": {**fields, **json.loads(item["data"]["S"])}}
            bare_publish(pch, broker.EXCHANGE_EVENTS, item["type"]["S"],
                         json.dumps(body, ensure_ascii=False).encode())
        with M.Outbox.batch_write() as batch:
            for item in items:
                batch.save(M.Outbox(item["order_id"]["S"], item["seq"]["S"],
                                    event_id=item["event_id"]["S"], type=item["type"]["S"],
                                    occurred_at=item["occurred_at"]["S"],
                                    data=item["data"]["S"], order=item["order"]["S"]))
        done += len(items)
    rate = done / (time.perf_counter() - start)
    pconn.close()
    if done != n:
        raise RuntimeError(f"the floor read {done} of {n} events")
    return rate


def _clear_backlog() -> int:
    """Deletes the events earlier stages left unsent (nothing relays them during the
    bench), so that the floor and the relay below see this stage's events only. Not
    marked sent: moto answers a query of the sparse index by reading every item of
    the table (DynamoDB reads the index's), so thousands of stale items would slow
    both sides, and the relay's paged reads, which overlap its marks, the more."""
    from chalicelib import config
    from chalicelib.store import Store
    from local.bench_models import models

    M = models()
    store = Store.from_settings(config.get())
    left = 0
    for page in store.unsent_pages(datetime.now(UTC)):
        with M.Outbox.batch_write() as batch:
            for event in page:
                batch.delete(M.Outbox(event.order_id, event.seq))
        left += len(page)
    return left


def _purge(url: str, queue: str) -> None:
    conn = connect(url)
    try:
        conn.channel().queue_purge(queue)
    finally:
        conn.close()


def _depth(url: str, queue: str) -> int:
    conn = connect(url)
    try:
        return int(conn.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        conn.close()


def run(world: World) -> StageResult:
    from chalicelib import broker, events

    n = world.sizes["events_n"]
    res = StageResult("events", [])
    with vhost("events") as url:
        declare_project_topology(url)  # queue.order.webhook is bound to every event
        left = _clear_backlog()
        if left:
            progress(f"9 events: {left:,} events of earlier stages deleted, not relayed")
        # The floor and the relay in turns (ABAB), half the events a round each, so
        # that a slow spell of the host weighs on both alike.
        part = n // 2
        n = 2 * part
        timing, pre = _stores()
        d = make_deps(world, url, timing)
        floor_s = relay_s = 0.0
        published = arrived = 0
        bodies: list[bytes] = []
        for r in range(2):
            progress(f"9 events: round {r + 1}/2: the floor (index read, publish, mark; "
                     f"bare), then the relay, {part:,} waiting events each")
            _seed_events(seed_orders(part, f"evt-floor{r}-", 3600))
            floor_s += part / _floor(url, part)
            _purge(url, broker.QUEUE_WEBHOOK)
            made = _seed_events(seed_orders(part, f"evt{r}-", 3600))
            bodies += made
            start = time.perf_counter()
            while True:
                swept = events.sweep_unsent(d, older_than_seconds=0)
                published += swept["published"]
                if not swept["events"]:
                    break
            relay_s += time.perf_counter() - start
            arrived += _depth(url, broker.QUEUE_WEBHOOK)
            _purge(url, broker.QUEUE_WEBHOOK)  # the bridge below would fan them out
        d.broker.close()
        floor_rate, relay_rate = n / floor_s, n / relay_s
        left = len(timing.unsent_orders(datetime.now(UTC), limit=10))

        progress(f"9 events: baseline, {n:,} bare confirmed publishes of the same messages")
        pconn, pch = bare_confirmed_channel(url)
        start = time.perf_counter()
        for body in bodies:
            bare_publish(pch, broker.EXCHANGE_EVENTS, "order.created", body)
        bare_rate = n / (time.perf_counter() - start)
        pconn.close()
        _purge(url, broker.QUEUE_WEBHOOK)

        rate, seconds = world.sizes["events_rate"], world.sizes["events_seconds"]
        m = int(rate * seconds)
        with_outbox: list[float] = []
        before: list[float] = []
        rounds = world.sizes["events_rounds"]
        progress(f"9 events: seeding 2 x {rounds} x {m} orders, signing their notifies")
        runs = []
        for r in range(rounds):
            # ABBA: neither variant always runs first, on the smaller table
            pair = [("before", pre), ("outbox", timing)]
            for which, store in (pair if r % 2 == 0 else pair[::-1]):
                made = seed_orders(m, f"evt-{which}{r}-", 3600)
                runs.append((r, which, store, made, signed_notifies(world, made)))
        for r, which, store, made, notifies in runs:
            progress(f"9 events: notify -> PAID at {rate:g}/s, {m} orders, round {r + 1}, "
                     f"{which}")
            got = notify_to_paid(world, url, store, made, notifies, rate)
            (with_outbox if which == "outbox" else before).extend(got)

    res.rows += [
        Row("9 events", "events relayed/s vs bare confirmed publish alone", bare_rate,
            relay_rate, "/s"),
        Row("9 events", "events relayed/s vs the floor (read, publish, mark; bare)",
            floor_rate, relay_rate, "/s", ">= 0.85", relay_rate / floor_rate >= 0.85),
        Row("9 events", "events relayed, on the exchange", n, min(published, arrived), "",
            "all", published == arrived == n and left == 0),
        Row("9 events", f"notify -> PAID p50 at {rate:g}/s, outbox vs before",
            pct(before, 50), pct(with_outbox, 50), "ms", "<= 1.10",
            pct(with_outbox, 50) <= 1.10 * pct(before, 50)),
        Row("9 events", f"notify -> PAID p99 at {rate:g}/s, outbox vs before",
            pct(before, 99), pct(with_outbox, 99), "ms"),
    ]
    res.data.update(n=n, bare_publish_rate=bare_rate, relay_rate=relay_rate,
                    floor_rate=floor_rate,
                    published=published, arrived=arrived, unsent_left=left,
                    latency_ms_outbox=with_outbox, latency_ms_before=before)
    res.notes.append(
        f"9 events: the relay is chalicelib.events.sweep_unsent (the local stack's relay and "
        f"the backstop) over {n:,} waiting events: pages of the unsent index read, each event "
        "published with a confirm, marked sent 25 to a request, the three overlapped; the "
        "baseline publishes the same bodies with a confirm each, the floor does the same "
        "read, publish and mark bare, one after another. Notify -> PAID: the route and the "
        "bridge, the event in the transaction against the single conditional update of "
        "before, rounds interleaved.")
    return res
