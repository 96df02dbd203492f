"""Flash sales against the real RabbitMQ (a vhost per test) and moto's DynamoDB:
the queue holds the burst, the bridge writes orders at its capped rate.

The requests go through the real routes, in-process: Chalice's test client
called from a thread pool (chalice makes `current_request` thread-local there,
as in `chalice local`). The bridge runs in a thread, as in test_bridge.py.
"""

from __future__ import annotations

import dataclasses
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from chalicelib import broker, config, deps
from chalicelib.context import Deps
from chalicelib.domain import TICKET_FINAL, Sale, parse_iso
from tests.conftest import MODELS, bearer, body
from tests.waiting import wait_until

pytestmark = pytest.mark.rabbitmq

SALE = "flash"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def sdeps(rmq_vhost: str, app_deps: Deps) -> Iterator[Deps]:
    """The app's dependencies with a real Broker on this test's vhost, used by the routes."""
    settings = dataclasses.replace(config.load(), rmq_url=str(rmq_vhost))
    real = broker.Broker(settings.rmq_url, settings.check_delay_seconds, settings.rmq_queue_type)
    d = dataclasses.replace(app_deps, settings=settings, broker=real)
    deps.use(d)
    yield d
    real.close()


@pytest.fixture
def run_bridge(sdeps: Deps, bridge_threads: Callable[..., threading.Event],
               ) -> Callable[[float], threading.Event]:
    """`run_bridge(rate)`: the bridge, draining queue.order.seckill at `rate` a second."""
    return lambda rate: bridge_threads(sdeps, rate_limits={broker.QUEUE_SECKILL: rate})


class DepthSampler:
    """queue.order.seckill's depth every 20 ms, on a connection of its own."""

    def __init__(self, url: str) -> None:
        self._broker = broker.Broker(url, config.load().check_delay_seconds)
        self._stop = threading.Event()
        self.samples: list[int] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.samples.append(self._broker.queue_depth(broker.QUEUE_SECKILL))

    def __enter__(self) -> DepthSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._broker.close()


class StockSampler(threading.Thread):
    """The sale's stock (consistent reads), to see that it never goes below zero."""

    def __init__(self, d: Deps) -> None:
        super().__init__(daemon=True)
        self.d = d
        self.seen: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            sale = self.d.store.get_sale(SALE, consistent=True)
            assert sale is not None
            self.seen.append(sale.stock)


def open_sale(d: Deps, stock: int, shards: int = 1) -> None:
    now = datetime.now(UTC)
    sale = Sale(SALE, "g2", "Teapot, flash sale", 990, stock,
                now - timedelta(minutes=1), now + timedelta(hours=1))
    if shards == 1:
        d.store.put_sale(sale)
    else:
        d.store.put_sale(sale, shards=shards)


class ShardSampler(threading.Thread):
    """Each shard's stock (consistent reads: the sale's item, then one BatchGetItem),
    to see that none goes below zero."""

    def __init__(self, d: Deps) -> None:
        super().__init__(daemon=True)
        self.d = d
        self.seen: list[list[int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            found = self.d.store.sale_shard_stocks(SALE, consistent=True)
            assert found is not None
            self.seen.append(list(found[1]))


def burst(client: Any, users: list[str], threads: int = 10) -> list[tuple[str, int, float, Any]]:
    """POST /seckill/flash for each user in order, from a pool: (user, status, seconds, body)."""

    def one(user: str) -> tuple[str, int, float, Any]:
        start = time.perf_counter()
        r = client.http.post(f"/seckill/{SALE}", headers=bearer(user))
        took = time.perf_counter() - start
        return user, r.status_code, took, (body(r), r.headers)

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, users))


def all_tickets() -> list[Any]:
    """The tickets (their table also holds the per-user claims and order markers)."""
    return [t for t in MODELS.Ticket.scan() if t.id.startswith("TICKET_")]


def drained_and_final(sdeps: Deps, sampler: Any) -> None:
    """queue.order.seckill empty, then every ticket final; the sampler stopped.
    (RabbitMQ is polled first: a scan of moto's table would slow the drain down.)"""
    wait_until(lambda: sdeps.broker.queue_depth(broker.QUEUE_SECKILL) == 0, 40, "drained",
               step=0.2)
    wait_until(lambda: all(t.status in TICKET_FINAL for t in all_tickets()), 10,
               "every ticket final", step=0.5)
    sampler.stop.set()
    sampler.join(5)


def all_orders() -> list[Any]:
    return list(MODELS.Order.scan())


def sale_stock(d: Deps) -> int:
    sale = d.store.get_sale(SALE, consistent=True)
    assert sale is not None
    return sale.stock


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def test_burst_of_2000_requests_from_1000_users_at_a_sale_of_50(
        client: Any, sdeps: Deps, run_bridge: Callable[[float], threading.Event]) -> None:
    open_sale(sdeps, stock=50)
    goods_before = {g.id: g.stock for g in sdeps.store.list_goods()}
    users = [f"u{i:04d}" for i in range(1000)]
    rng = random.Random(7)
    requests = users + rng.choices(users, k=1000)  # every user once, many twice or more
    rng.shuffle(requests)
    assert len(requests) == 2000 and len(set(requests)) == 1000
    assert max(Counter(requests).values()) >= 2
    run_bridge(200)
    stock_seen = StockSampler(sdeps)
    stock_seen.start()
    started = time.monotonic()
    answers = burst(client, requests)
    burst_s = time.monotonic() - started

    statuses = Counter(status for _, status, _, _ in answers)
    assert set(statuses) <= {202, 409, 429}, statuses
    for _, status, _, (data, headers) in answers:
        if status == 429:
            assert int(headers["Retry-After"]) >= 1
        if status == 409:
            assert data["Code"] in ("SoldOut", "AlreadyHolding"), data
    latencies = [took for _, _, took, _ in answers]
    # "Fast": no request waits for an order to be written. 10 requests in flight
    # against one moto server that serves one request at a time.
    assert percentile(latencies, 99) < 1.0, (percentile(latencies, 99), burst_s)
    accepted = [(user, data["ticketId"]) for user, status, _, (data, _) in answers
                if status == 202]
    assert len(accepted) >= 50, statuses

    # every ticket ends in a final status; the queue drains
    ticket_ids = {tid for _, tid in accepted}
    drained_and_final(sdeps, stock_seen)
    tickets = {t.id: t for t in all_tickets()}
    assert set(tickets) == ticket_ids  # a ticket for each 202, and no other
    for user, tid in accepted:
        assert tickets[tid].username == user
    assert sdeps.broker.queue_depth(broker.QUEUE_SECKILL) == 0
    assert sdeps.broker.queue_depth(broker.QUEUE_SECKILL_PARKED) == 0

    # exactly 50 orders, no user has two, each is its ticket's
    orders = all_orders()
    assert len(orders) == 50
    assert len({o.username for o in orders}) == 50
    assert all(o.sale_id == SALE and o.total_fen == 990 and o.status == "UNPAID" for o in orders)
    ordered = {t.order_id: t.username for t in tickets.values() if t.status == "ORDERED"}
    assert ordered == {o.id: o.username for o in orders}
    outcome = Counter(t.status for t in tickets.values())
    assert outcome["ORDERED"] == 50
    assert outcome["ORDERED"] + outcome["SOLD_OUT"] + outcome["DUPLICATE"] == len(tickets)
    # the sale's stock is 0 and was never below; the goods' stock is untouched
    sale = sdeps.store.get_sale(SALE, consistent=True)
    assert sale is not None and sale.stock == 0
    assert stock_seen.seen and min(stock_seen.seen) >= 0
    assert {g.id: g.stock for g in sdeps.store.list_goods()} == goods_before
    # the usual delay message, once per order
    assert sdeps.broker.queue_depth(broker.QUEUE_DELAY) == 50


def test_drain_capped_at_20_orders_a_second(
        client: Any, sdeps: Deps, run_bridge: Callable[[float], threading.Event]) -> None:
    cap = 20
    open_sale(sdeps, stock=60)
    users = [f"u{i:02d}" for i in range(60)]
    with DepthSampler(str(sdeps.settings.rmq_url)) as depth:
        # The burst first, then the drain: the test's moto serves one request at a
        # time, and with the burst's requests beside it the drain could not even
        # reach the cap (it does ~40 orders a second alone), proving nothing.
        answers = burst(client, users)
        assert [status for _, status, _, _ in answers] == [202] * 60
        run_bridge(cap)
        wait_until(lambda: depth.samples[-1:] == [0], 10, "the queue empty")
        # the prefetched rest: watched through one small read (a scan would hold
        # the test's one-request-at-a-time moto long enough to slow the drain)
        wait_until(lambda: sale_stock(sdeps) == 0, 5, "the sale sold out", step=0.1)
    orders = all_orders()
    assert len(orders) == 60
    times = sorted(parse_iso(o.create_time).timestamp() for o in orders)
    # The bucket spaces the drain's takes by >= 1/cap s; an order's create time is
    # taken right after its take, to the millisecond. So any cap + 1 consecutive
    # orders span at least a second, give or take that timestamp's jitter (5 ms).
    spans = [times[i + cap] - times[i] for i in range(len(times) - cap)]
    assert min(spans) >= 0.995, min(spans)
    rate = (len(times) - 1) / (times[-1] - times[0])
    assert 0.75 * cap <= rate <= cap * 1.01, rate  # at the cap, not above, not crawling
    # the queue held the peak: it rose well above zero and fell back to zero
    peak = max(depth.samples)
    assert peak >= 20, depth.samples
    assert depth.samples[-1] == 0
    assert depth.samples.index(peak) < len(depth.samples) - 1


def test_queue_deeper_than_the_bound_answers_429_then_drains(
        client: Any, sdeps: Deps, run_bridge: Callable[[float], threading.Event]) -> None:
    open_sale(sdeps, stock=100)
    # the depth read on every request (no cache), requests one at a time: exact
    sdeps.settings = dataclasses.replace(  # type: ignore[misc]
        sdeps.settings, seckill_max_queue_depth=30, seckill_cache_ms=0,
        seckill_orders_per_second=10)
    answers = burst(client, [f"u{i:02d}" for i in range(45)], threads=1)
    statuses = [status for _, status, _, _ in answers]
    assert statuses == [202] * 30 + [429] * 15
    for _, _, _, (data, headers) in answers[30:]:
        assert headers["Retry-After"] == "1" and data["Code"] == "TooManyRequests"
    assert sdeps.broker.queue_depth(broker.QUEUE_SECKILL) == 30
    assert len(all_tickets()) == 30  # a 429 wrote nothing
    run_bridge(200)
    wait_until(lambda: sdeps.broker.queue_depth(broker.QUEUE_SECKILL) == 0, 10, "drained")
    wait_until(lambda: Counter(t.status for t in all_tickets()) == {"ORDERED": 30}, 10,
               "30 orders")
    # room again: the refused users come back and are queued
    late = burst(client, [f"u{i:02d}" for i in range(30, 45)], threads=1)
    assert [status for _, status, _, _ in late] == [202] * 15


def test_a_sale_of_4_shards_sells_exactly_60_to_400_requests_of_200_users(
        client: Any, sdeps: Deps, run_bridge: Callable[[float], threading.Event]) -> None:
    """README "Past one machine": the stock split over 4 items keeps both invariants,
    exactly the stock and one per user, and every shard ends at 0, never below."""
    open_sale(sdeps, stock=60, shards=4)
    found = sdeps.store.sale_shard_stocks(SALE, consistent=True)
    assert found is not None and found[1] == [15, 15, 15, 15]
    users = [f"u{i:03d}" for i in range(200)]
    rng = random.Random(11)
    requests = users + rng.choices(users, k=200)
    rng.shuffle(requests)
    run_bridge(200)
    shards_seen = ShardSampler(sdeps)
    shards_seen.start()
    answers = burst(client, requests)
    statuses = Counter(status for _, status, _, _ in answers)
    assert set(statuses) <= {202, 409}, statuses  # the queue's bound is far
    accepted = {data["ticketId"]: user for user, status, _, (data, _) in answers
                if status == 202}
    assert len(accepted) >= 60, statuses
    drained_and_final(sdeps, shards_seen)

    tickets = {t.id: t for t in all_tickets()}
    assert {tid: t.username for tid, t in tickets.items()} == accepted
    orders = all_orders()
    # exactly the stock, none twice for a user, each the order of its ticket
    assert len(orders) == 60
    assert len({o.username for o in orders}) == 60
    ordered = {t.order_id: t.username for t in tickets.values() if t.status == "ORDERED"}
    assert ordered == {o.id: o.username for o in orders}
    assert Counter(t.status for t in tickets.values())["ORDERED"] == 60
    # each shard gave its 15 units, ends at 0 and was never below
    assert Counter(o.sale_id for o in orders) == {f"{SALE}#{k}": 15 for k in range(4)}
    found = sdeps.store.sale_shard_stocks(SALE, consistent=True)
    assert found is not None and found[1] == [0, 0, 0, 0]
    assert shards_seen.seen and min(min(s) for s in shards_seen.seen) >= 0
    assert sale_stock(sdeps) == 0
    # the usual delay message, once per order
    assert sdeps.broker.queue_depth(broker.QUEUE_DELAY) == 60


def test_bench_seckill_with_4_shards_passes_its_checks(rabbitmq_running: None) -> None:
    """`python -m local bench seckill --shards 4`, small: its own moto and vhost."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "STAGE"))}
    done = subprocess.run(
        [sys.executable, "-m", "local", "bench", "seckill", "--shards", "4",
         "--requests", "400", "--users", "200", "--stock", "60"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    out = done.stdout
    assert any(line.startswith("orders ") and line.endswith("60 (stock 60)")
               for line in out.splitlines()), out
    for check in ("exactly 60 orders", "no user has two orders",
                  "every shard's stock 0, never below", "each shard's orders its units"):
        assert any(line.startswith("ok") and line.endswith(check)
                   for line in out.splitlines()), (check, out)
    assert "orders [15, 15, 15, 15] of [15, 15, 15, 15], stock left [0, 0, 0, 0]" in out, out
