"""A three-node RabbitMQ cluster with quorum queues, a node SIGKILLed and restarted
every 5 s under a steady load: no order lost, none moved twice, every queue drained.

Three private nodes of this test's own (tests/rabbit_cluster.py: own names, ports,
data dirs, one cookie), never the machine's shared RabbitMQ. The API (chalice's
local server, over HTTP) and the worker (its own process, `python -m
tests.reliability.bridge_proc`) get all three addresses in RMQ_URL and
RMQ_QUEUE_TYPE=quorum. The load, all along: orders paid at the sandbox's cashier
(its notify -> the API -> queue.order.pay -> the worker), paid with the notify lost
(the check finds the payment), abandoned (the check, 4 s later, closes them),
cancelled, and flash-sale requests. The killer takes the pay queue's leader every
other time and a node at random otherwise, restarts it at once, and never has two
nodes down (a quorum queue needs two of its three members). The anchor is
RabbitMQ's own Jepsen tests: quorum queues on three nodes, lost = duplicated = 0.

503 is the API's honest "nothing happened, try again"; it is allowed for a request
that overlapped a node's outage (from its kill until some seconds after it was back,
while quorum queues elect leaders and clients reconnect), any other 5xx is counted.
"""

from __future__ import annotations

import random
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from chalicelib import broker, deps
from chalicelib.context import Deps
from chalicelib.domain import TICKET_FINAL, TICKET_ORDERED, Sale
from tests import rabbit_node
from tests.conftest import MODELS
from tests.rabbit_cluster import PrivateCluster
from tests.reliability.harness import (
    SCOREBOARD,
    Answer,
    BridgeProcess,
    Row,
    Stack,
    all_orders,
    audit,
    queue_depths,
    queue_names,
    settle,
)

pytestmark = pytest.mark.rabbitmq

SALE = "rel-cluster-flash"
SALE_STOCK = 30
KILL_EVERY_S = 5.0
# A 503 this long after a node came back still counts as the outage's: clients
# reconnect with backoff and a quorum queue may still be electing its leader.
OUTAGE_GRACE_S = 10.0
WAYS = ("pay", "abandon", "cancel", "pay", "lost notify")


@pytest.fixture(scope="module")
def cluster() -> Iterator[PrivateCluster]:
    why = rabbit_node.available()
    if why:
        pytest.fail(f"cannot start private RabbitMQ nodes: {why}", pytrace=False)
    c = PrivateCluster(Path(tempfile.mkdtemp(prefix="rel-cluster-")))
    try:
        c.start()
        yield c
    finally:
        c.stop()


class ClusterStack(Stack):
    """The harness's stack on the cluster's addresses, with quorum queues."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = replace(self.settings, rmq_queue_type="quorum")
        self.broker = broker.Broker(self.settings.rmq_url, self.settings.check_delay_seconds,
                                    "quorum")
        self.deps = Deps(settings=self.settings, store=self.store, broker=self.broker,
                         gateway=self.gateway)
        deps.use(self.deps)

    def depths(self) -> dict[str, int]:
        return queue_depths(self.settings.rmq_url, queue_names(self.retry_delays_ms))


@pytest.fixture
def stack(cluster: PrivateCluster, tables: Any, keys: dict[str, Path]) -> Iterator[ClusterStack]:
    url = cluster.add_vhost(f"cluster-{random.getrandbits(32):08x}")
    s = ClusterStack(keys=keys, rmq_url=url, check_delay=4, sweep_interval=1.0,
                     retry_delays_ms=(200, 500), notify_schedule=[1, 2, 3, 4, 5, 8, 10])
    yield s
    s.close()


@dataclass
class Load:
    """What the shoppers did, with each answer's time, to tell outages' 503s apart."""

    answers: list[tuple[float, float, int, str]] = field(default_factory=list)
    accepted: dict[str, str] = field(default_factory=dict)  # ticket id -> user
    ways: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, began: float, answer: Answer, what: str) -> Answer:
        with self.lock:
            self.answers.append((began, time.monotonic(), answer.status, what))
        return answer


def run_cluster_kills(stack: ClusterStack, cluster: PrivateCluster, workdir: Path, *,
                      seconds: float, seed: int, name: str) -> Row:
    started = time.monotonic()
    rng = random.Random(seed)
    row = Row(name)
    now = datetime.now(UTC)
    stack.store.put_sale(Sale(SALE, "r-rare", "Rare tea, flash sale", 990, SALE_STOCK,
                              now - timedelta(minutes=1), now + timedelta(hours=2)))
    proc = BridgeProcess(stack, workdir, RMQ_QUEUE_TYPE="quorum", BRIDGE_WORKERS="2")
    proc.start(ready=True)
    load = Load()
    errors: list[BaseException] = []
    outages: list[tuple[float, float]] = []
    killed: list[str] = []
    stop = threading.Event()
    vhost = stack.settings.rmq_url.split(",")[0].rsplit("/", 1)[1]

    def api(method: str, path: str, user: str, what: str) -> Answer:
        began = time.monotonic()
        return load.note(began, stack.http.api(method, path, user), what)

    def killer() -> None:
        try:
            k = 0
            while not stop.is_set():
                began = time.monotonic()
                target = cluster.leader(vhost, broker.QUEUE_PAY) if k % 2 == 0 else None
                target = target or rng.choice(cluster.nodes)
                down = time.monotonic()  # before: a client may fail within the kill
                cluster.kill(target)
                killed.append(f"{target.name.split('@')[0][-2:]}"
                              f"{'*' if k % 2 == 0 else ''}")
                cluster.restart(target)
                cluster.wait_running(len(cluster.nodes))
                outages.append((down, time.monotonic()))
                k += 1
                stop.wait(max(0.0, KILL_EVERY_S - (time.monotonic() - began)))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
            stop.set()

    def shopper(worker: int) -> None:
        i = 0
        try:
            while not stop.is_set():
                i += 1
                way = WAYS[(worker + i) % len(WAYS)]
                user = f"cl-{worker}-{i}"
                with load.lock:
                    load.ways[way] += 1
                for gid, num in {"r-tea": 1 + i % 3, "r-cup": 1}.items():
                    stack.store.set_cart_line(user, gid, num)
                created = api("POST", "/orders", user, "create")
                if created.status != 201:
                    continue
                order = created.json()
                paying = api("POST", f"/orders/{order['id']}/pay", user, "pay link")
                if way == "cancel":
                    api("POST", f"/orders/{order['id']}/cancel", user, "cancel")
                elif way != "abandon" and paying.status == 200:
                    url = str(paying.json()["payUrl"])
                    if stack.open_cashier(url) == 200:
                        stack.press_pay(order["id"], drop_notify=way == "lost notify")
                stop.wait(rng.uniform(0.05, 0.3))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
            stop.set()

    def buyer() -> None:
        i = 0
        try:
            while not stop.is_set():
                i += 1
                user = f"flash-{i}"
                answer = api("POST", f"/seckill/{SALE}", user, "seckill")
                if answer.status == 202:
                    with load.lock:
                        load.accepted[answer.json()["ticketId"]] = user
                stop.wait(0.25)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=killer, name="killer", daemon=True),
               threading.Thread(target=buyer, name="buyer", daemon=True)]
    threads += [threading.Thread(target=shopper, args=(w,), name=f"shopper {w}", daemon=True)
                for w in range(3)]
    for t in threads:
        t.start()
    stop.wait(seconds)
    stop.set()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads), "a load thread did not stop"
    row.runs = len(outages)
    cluster.wait_running(len(cluster.nodes))

    codes: list[int] = []
    drained = settle(stack, lambda: proc.start(ready=True), lambda: codes.append(proc.stop()),
                     timeout=150, done=lambda: all(t.status in TICKET_FINAL for t in tickets()))
    assert codes and all(c == 0 for c in codes), proc.tail()
    if not drained:
        row.lost += 1
        row.notes.append(f"queues not drained: {stack.depths()}")

    # flash sale: every ticket answered 202 is final, an ORDERED one has its order
    found = {t.id: t for t in tickets()}
    sale_orders = {o.id: o for o, _ in all_orders() if o.sale_id == SALE}
    for ticket_id, user in load.accepted.items():
        t = found.get(ticket_id)
        if t is None or t.status not in TICKET_FINAL:
            row.lost += 1
            row.notes.append(f"ticket {ticket_id} of {user}: {t.status if t else 'missing'}")
        elif t.status == TICKET_ORDERED and t.order_id not in sale_orders:
            row.lost += 1
            row.notes.append(f"ticket {ticket_id} ORDERED without its order {t.order_id}")
    twice = [u for u, n in Counter(o.username for o in sale_orders.values()).items() if n > 1]
    if twice:
        row.double += len(twice)
        row.notes.append(f"users with two sale orders: {twice[:5]}")

    trades = stack.trades()
    money = {oid for oid, t in trades.items() if t["gmt_payment"]} | stack.acknowledged()
    audit(stack.store, stack.start_stock, stack.store.transitions + proc.transitions(),
          money_in=money, trades=trades, attempted=proc.attempts(),
          start_sales={SALE: SALE_STOCK}).into(row)

    def in_outage(began: float, ended: float) -> bool:
        return any(began <= up + OUTAGE_GRACE_S and ended >= down for down, up in outages)

    statuses = Counter(status for _b, _e, status, _w in load.answers)
    excused = [w for b, e, status, w in load.answers if status == 503 and in_outage(b, e)]
    def near(began: float) -> str:
        """Where a request began, from the nearest kill (and its node back up)."""
        down, up = min(outages, key=lambda o: abs(began - o[0]), default=(began, began))
        return f"{began - down:+.1f} s from a kill (back at {up - down:+.1f} s)"

    unexcused = [f"{w} {status} {near(b)}" for b, e, status, w in load.answers
                 if status >= 500 and not (status == 503 and in_outage(b, e))]
    notify_5xx = [a["status"] for t in trades.values() for a in t["notify_attempts"]
                  if (a["status"] or 0) >= 500]
    # an unanswered request is 599 here; the sandbox's own calls never reach RabbitMQ
    row.http_5xx = len(unexcused) + len(notify_5xx) + stack.sandbox_http.count_5xx
    if unexcused or notify_5xx:
        row.notes.append(f"5xx: {unexcused[:10]} notify {notify_5xx[:10]}")
    failures = sum(1 for t in trades.values() for a in t["notify_attempts"]
                   if a["answer"] == "failure")
    row.notes.append(
        f"{len(outages)} kills ({' '.join(killed)}; * = the pay queue's leader), outages "
        f"{min((u - d for d, u in outages), default=0):.1f}-"
        f"{max((u - d for d, u in outages), default=0):.1f} s; answers {dict(statuses)}; "
        f"503 during outages {dict(Counter(excused))}; {failures} notifies answered failure "
        f"and sent again; ways {dict(load.ways)}; "
        f"tickets {dict(Counter(t.status for t in found.values()))}")
    row.seconds = time.monotonic() - started
    return SCOREBOARD.record(row)


def tickets() -> list[Any]:
    """The tickets (their table also holds the per-user claims and order markers)."""
    return [t for t in MODELS.Ticket.scan(consistent_read=True) if t.id.startswith("TICKET_")]


def test_cluster_node_killed_every_5s_under_load(stack: ClusterStack, cluster: PrivateCluster,
                                                 tmp_path: Path) -> None:
    row = run_cluster_kills(stack, cluster, tmp_path, seconds=50, seed=3,
                            name="three-node cluster, a node killed every 5 s for 50 s under load")
    assert row.runs >= 2 and row.orders > 0  # kills happened, orders were made
    row.assert_zeros()


@pytest.mark.soak
def test_cluster_node_killed_every_5s_soak(stack: ClusterStack, cluster: PrivateCluster,
                                           tmp_path: Path) -> None:
    row = run_cluster_kills(stack, cluster, tmp_path, seconds=300, seed=33,
                            name="three-node cluster, a node killed every 5 s for 5 minutes "
                                 "under load (soak)")
    assert row.runs >= 10 and row.orders > 0
    row.assert_zeros()
