"""Order events under faults: orders paid, closed and refunded while the worker (its
own process, as in production) is SIGKILLed again and again and the broker (a
private RabbitMQ node) is SIGKILLed too. Then:

- every change has exactly one event in the outbox (created; paid when it was
  paid; closed when it closed; one refund.succeeded per succeeded refund;
  refunded when it is REFUNDED), and no event without its change;
- every event reached exchange.order.events at least once: a durable queue bound
  to it before the run holds every eventId of the outbox;
- a consumer that dedupes on eventId counts exactly one per change, and saw each
  order's events in their order (first sightings).
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest

from chalicelib import broker
from chalicelib.domain import PAID, REFUNDED, RefundStatus
from chalicelib.domain.events import EventKind
from tests.rabbit_node import PrivateRabbit
from tests.reliability.harness import (
    SCOREBOARD,
    BridgeProcess,
    Row,
    Stack,
    all_orders,
    settle,
    wait_until,
)

pytestmark = pytest.mark.rabbitmq

# pay, abandon (the check closes it), pay and refund all, pay and refund a part
WAYS = ("pay", "abandon", "pay", "refund", "abandon", "part", "pay", "refund", "pay", "abandon")


@pytest.fixture
def stack(private_vhost: str, tables: Any, keys: dict[str, Path]) -> Iterator[Stack]:
    s = Stack(keys=keys, rmq_url=private_vhost, check_delay=3, retry_delays_ms=(200, 500),
              sweep_interval=1.0, notify_schedule=[1, 2, 3, 4, 5, 8, 10, 15])
    yield s
    s.close()


def _audit_queue(url: str) -> str:
    """A durable queue bound to every event, made before the run: what a consumer of
    the rest of the shop would hold, across the broker's crash."""
    broker.declare_at(url, 3)
    name = "queue.order.events.audit"
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        ch.queue_declare(name, durable=True)
        ch.queue_bind(name, broker.EXCHANGE_EVENTS, routing_key="order.#")
    finally:
        conn.close()
    return name


def _drain(url: str, queue: str) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        while True:
            method, _props, body = ch.basic_get(queue, auto_ack=True)
            if method is None:
                return seen
            seen.append(json.loads(body))
    finally:
        conn.close()


def _expected(store: Any) -> dict[str, list[str]]:
    """The changes each order went through, from its final state and its refunds."""
    want: dict[str, list[str]] = {}
    for order, _ in all_orders():
        kinds = [EventKind.CREATED.value]
        if order.pay_time is not None:  # marked paid (a late payment is not: it is refunded)
            kinds.append(EventKind.PAID.value)
        if order.close_time is not None:
            kinds.append(EventKind.CLOSED.value)
        kinds += [EventKind.REFUND_SUCCEEDED.value for r in store.refunds_of(order.id)
                  if r.status == RefundStatus.SUCCEEDED]
        if order.status == REFUNDED:
            kinds.append(EventKind.REFUNDED.value)
        want[order.id] = sorted(kinds)
    return want


def run_events_chaos(stack: Stack, node: PrivateRabbit, workdir: Path, *, n: int,
                     worker_kills: int, broker_kills: int, seed: int, name: str) -> Row:
    started = time.monotonic()
    rng = random.Random(seed)
    row = Row(name)
    audit_queue = _audit_queue(stack.settings.rmq_url)
    proc = BridgeProcess(stack, workdir, RELAY_INTERVAL_SECONDS="0.3",
                         OUTBOX_SWEEP_AFTER_SECONDS="0")
    proc.start()
    made = threading.Semaphore(0)
    errors: list[BaseException] = []
    outages: list[float] = []
    lock = threading.Lock()  # the killer's: the worker and the broker, one at a time

    def killer() -> None:
        try:
            plan = ["worker"] * worker_kills + ["broker"] * broker_kills
            rng.shuffle(plan)
            per = max(1, n // (len(plan) + 1))
            for target in plan:
                for _ in range(per):
                    if not made.acquire(timeout=120):
                        raise TimeoutError("no order made for 120 s")
                with lock:
                    if target == "worker":
                        proc.kill()
                        time.sleep(rng.uniform(0.1, 1.0))
                        proc.start()
                    else:
                        down = time.monotonic()
                        node.kill()
                        time.sleep(rng.uniform(0.5, 2.0))
                        node.start()
                        outages.append(time.monotonic() - down)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    refund_after: list[tuple[str, dict[str, Any]]] = []

    def shopper(i: int) -> None:
        way = WAYS[i % len(WAYS)]
        try:
            order = stack.order(f"evt-{i}", {"r-tea": 1 + i % 2, "r-cup": 1})
        finally:
            made.release()
        if order is None or way == "abandon":
            return
        url = stack.pay_url(order)
        if url is None or stack.open_cashier(url) != 200:
            return
        if stack.press_pay(order["id"]) == 302 and way in ("refund", "part"):
            with lock:
                refund_after.append((way, order))

    kill_thread = threading.Thread(target=killer, daemon=True)
    kill_thread.start()
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=4) as pool:
        for f in [pool.submit(shopper, i) for i in range(n)]:
            f.result(300)
    kill_thread.join(300)
    assert not errors, errors
    row.runs = proc.kills + len(outages)

    def refunded_all() -> bool:
        """Operators refund once the payment is in (the API answers 409 before)."""
        for way, order in list(refund_after):
            now = stack.store.get_order(order["id"])
            if now is None or now.status != PAID:
                continue
            amount = order["totalMoney"] if way == "refund" else "1.00"
            answer = stack.http.admin("POST", f"/admin/orders/{order['id']}/refunds",
                                      body={"amount": amount, "reason": "chaos"},
                                      headers={"Idempotency-Key": f"chaos-{order['id']}"})
            if answer.status in (200, 201, 202):
                refund_after.remove((way, order))
        return not refund_after

    codes: list[int] = []
    drained = settle(stack, lambda: proc.start(ready=True), lambda: codes.append(proc.stop()),
                     timeout=300, done=refunded_all)
    if not drained:
        row.lost += 1
        row.notes.append(f"queues not drained: {stack.depths()}")
    # the relay catches up: nothing left unsent (the worker, started once more)
    proc.start(ready=True)
    try:
        wait_until(lambda: not stack.store.unsent_orders(stack.deps.clock(), limit=10), 120,
                   "every event published")
    finally:
        codes.append(proc.stop())
    assert all(c == 0 for c in codes), proc.tail()

    store = stack.store
    orders = [o for o, _ in all_orders()]
    row.orders = len(orders)
    want = _expected(store)
    outbox = {o.id: store.events_of(o.id) for o in orders}
    ids = [e.event_id for events in outbox.values() for e in events]
    for order_id, events in outbox.items():
        got = sorted(e.kind.value for e in events)
        if got != want[order_id]:
            row.violations += 1
            row.notes.append(f"{order_id}: events {got}, changes {want[order_id]}")
    row.double += len(ids) - len(set(ids))
    seen = _drain(stack.settings.rmq_url, audit_queue)
    firsts: dict[str, dict[str, Any]] = {}
    for event in seen:
        firsts.setdefault(event["eventId"], event)
    missing = set(ids) - set(firsts)
    unknown = set(firsts) - set(ids)
    row.lost += len(missing)
    row.violations += len(unknown)
    changes = sum(len(k) for k in want.values())
    if len(firsts) != changes:
        row.violations += 1
        row.notes.append(f"the deduping consumer counted {len(firsts)}, changes {changes}")
    out_of_order = 0
    for order_id, events in outbox.items():
        order_seen = [e["eventId"] for e in firsts.values() if e["orderId"] == order_id]
        if order_seen != [e.event_id for e in events if e.event_id in firsts]:
            out_of_order += 1
    row.violations += out_of_order
    kinds = Counter(e["type"] for e in firsts.values())
    row.notes.append(
        f"{changes} changes ({dict(sorted(kinds.items()))}); {len(seen)} messages on the "
        f"exchange, {len(seen) - len(firsts)} repeats deduped; {len(missing)} never "
        f"published; {out_of_order} orders seen out of order; worker killed "
        f"{proc.kills}x, broker {len(outages)}x ({[round(s, 1) for s in outages]} s)")
    row.http_5xx = stack.http.count_5xx + stack.notify_5xx() + stack.sandbox_http.count_5xx
    row.seconds = time.monotonic() - started
    return SCOREBOARD.record(row)


def test_events_survive_worker_and_broker_kills(stack: Stack, private_rabbit: PrivateRabbit,
                                                tmp_path: Path) -> None:
    row = run_events_chaos(stack, private_rabbit, tmp_path, n=60, worker_kills=3,
                           broker_kills=1, seed=20261204,
                           name="events: 60 orders, worker SIGKILL x3, broker x1")
    assert row.orders == 60 and row.runs == 4
    row.assert_zeros()


@pytest.mark.soak
def test_events_survive_worker_and_broker_kills_soak(
        stack: Stack, private_rabbit: PrivateRabbit, tmp_path: Path) -> None:
    row = run_events_chaos(stack, private_rabbit, tmp_path, n=1000, worker_kills=8,
                           broker_kills=3, seed=1204,
                           name="events: 1,000 orders, worker SIGKILL x8, broker x3 (soak)")
    assert row.orders == 1000 and row.runs == 11
    row.assert_zeros()
