"""`python -m local bench [--quick] [--out FILE] [STAGE ...]`: every hot path beside its ceiling.

Each stage measures a baseline (the bare component: pika on the local RabbitMQ,
pynamodb's low-level calls on the same moto endpoint, a bare import) and the
project's path, in the same run, with the same sizes, and prints both with
their ratio. Absolute times drift on shared machines; the ratios are the result.

Stages (by name or number): 1 drain, 2 notify, 3 create, 4 timeout, 5 e2e,
6 cold, 7 shave, 8 reconcile (local/bench_reconcile.py), 9 events
(local/bench_events.py). Default: all.
The bench starts what it needs and removes it
afterwards: moto's DynamoDB server (`python -m local dynamodb`, the one `make run`
uses, on a free port, in its own process so that it does not share a GIL with
the code under test), a fresh RabbitMQ vhost per stage (rabbitmqctl), the
Alipay sandbox's keys in a temporary directory. The service's own logs (JSON
lines) go to a file in that directory, not to the terminal.

Orders that a stage needs in bulk (10,000 UNPAID orders for the drain and the
timeout stages) are written with pynamodb's batch_write, in the store's own
format (with the sparse `unpaid` index attribute), and the goods' stock is set
to match: creating them through 10,000 transactions on moto would take minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
STAGES = ("drain", "notify", "create", "timeout", "e2e", "cold", "shave", "reconcile",
          "events")
CHECK_DELAY_S = 5  # the delay queue's TTL in every stage (stage 4's "5 s delay")
CAPACITY_ROUNDS = 4  # stage 4: the floor's and the bridge's turns at its capacity
RMQ_HOST = "127.0.0.1"
RMQ_PORT = 5672
JWT_SECRET = "bench-secret-0123456789abcdef0123456789"

FULL = {
    "drain_n": 3_000, "scale_n": 600, "scale_workers": (1, 2, 4),
    "notify_n": 1_200, "notify_rounds": 8,
    "create_n": 400, "create_rounds": 4,
    "timeout_cap_n": 2_000, "timeout_seconds": 24.0, "timeout_rate": 50.0,
    "e2e_seconds": 12.0, "e2e_rate": 50.0,
    "cold_reps": 7, "zip": True,
    "shave_n": 2_400, "shave_rate": 60.0,
    "reconcile_n": (2_000, 20_000),
    "events_n": 2_000, "events_seconds": 8.0, "events_rate": 50.0, "events_rounds": 4,
}
QUICK = {
    "drain_n": 300, "scale_n": 150, "scale_workers": (1, 2),
    "notify_n": 60, "notify_rounds": 2,
    "create_n": 40, "create_rounds": 2,
    "timeout_cap_n": 200, "timeout_seconds": 4.0, "timeout_rate": 50.0,
    "e2e_seconds": 2.0, "e2e_rate": 50.0,
    "cold_reps": 2, "zip": False,
    "shave_n": 200, "shave_rate": 50.0,
    "reconcile_n": (500, 2_000),
    "events_n": 100, "events_seconds": 1.0, "events_rate": 50.0, "events_rounds": 2,
}

_T0 = time.perf_counter()


def progress(text: str) -> None:
    sys.stderr.write(f"[bench {time.perf_counter() - _T0:6.1f}s] {text}\n")
    sys.stderr.flush()


# --- results -------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    stage: str
    metric: str
    baseline: float | None
    project: float | None
    unit: str
    target: str = ""
    met: bool | None = None
    ratio: float | None = None

    def __post_init__(self) -> None:
        if self.ratio is None and self.baseline and self.project is not None:
            self.ratio = self.project / self.baseline


@dataclasses.dataclass
class StageResult:
    name: str
    rows: list[Row]
    notes: list[str] = dataclasses.field(default_factory=list)
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if unit in ("ms", "s") or abs(value) < 10:
        text = f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"
    else:
        text = f"{value:,.0f}"
    return f"{text} {unit}".strip()


def render_table(results: Sequence[StageResult]) -> str:
    header = ("stage", "metric", "baseline", "project", "ratio", "target", "met")
    lines: list[tuple[str, ...]] = []
    for res in results:
        for row in res.rows:
            met = "-" if row.met is None else ("yes" if row.met else "NO")
            lines.append((row.stage, row.metric, _fmt(row.baseline, row.unit),
                          _fmt(row.project, row.unit),
                          "-" if row.ratio is None else f"{row.ratio:.2f}", row.target or "-", met))
    widths = [max(len(h), *(len(x[i]) for x in lines)) if lines else len(h)
              for i, h in enumerate(header)]

    def fmt(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [fmt(x) for x in lines]
    return "\n".join(out)


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = max(0, min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1)))))
    return ordered[k]


# --- the environment -------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _prepare_environment(moto_port: int, tmp: Path) -> None:
    """Settings are read once, lazily: set them before anything of chalicelib is imported."""
    for name in list(os.environ):
        if name.startswith("ALIPAY_") or name in ("GOODS_TABLE", "CARTS_TABLE", "ORDERS_TABLE",
                                                  "TABLE_PREFIX", "BRIDGE_FAULT"):
            del os.environ[name]
    os.environ.update({
        "STAGE": "bench",
        "AWS_ENDPOINT_URL_DYNAMODB": f"http://127.0.0.1:{moto_port}",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "JWT_SECRET": JWT_SECRET,
        "ORDER_CHECK_DELAY_SECONDS": str(CHECK_DELAY_S),
        "ORDER_PAY_TIMEOUT_SECONDS": "1800",
        "SWEEP_INTERVAL_SECONDS": "3600",
        # The other stages measure their own paths: the worker's relay of the events
        # they make stays out of them (stage 9 measures the relay). Not even its
        # backstop's look each second: a query of the unsent index costs moto a sort
        # of every unsent event (thousands here, since nothing relays them), and that
        # one-request-at-a-time moto would then serve everything else less.
        "OUTBOX_SWEEP_AFTER_SECONDS": "86400",
        "RELAY_INTERVAL_SECONDS": "3600",
        "LOG_LEVEL": "INFO",
        "RMQ_URL": f"amqp://guest:guest@{RMQ_HOST}:{RMQ_PORT}/%2F",
    })
    if "PYTHONPATH" not in os.environ or str(REPO) not in os.environ["PYTHONPATH"].split(":"):
        os.environ["PYTHONPATH"] = ":".join(
            x for x in (str(REPO), os.environ.get("PYTHONPATH", "")) if x)
    # The service's JSON lines to a file: logs.configure() keeps a handler it finds.
    from chalicelib.logs import JsonFormatter

    handler = logging.FileHandler(tmp / "service.log")
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    for noisy in ("pika", "botocore", "urllib3", "werkzeug"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _rabbitmqctl(*args: str, check: bool = True) -> str:
    done = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=60,
                          check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stderr.strip() or done.stdout}")
    return done.stdout


@contextlib.contextmanager
def vhost(stage: str) -> Iterator[str]:
    """A fresh vhost for guest, deleted afterwards; yields its amqp URL."""
    name = f"bench-{stage}-{uuid.uuid4().hex[:8]}"
    _rabbitmqctl("add_vhost", name)
    try:
        _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        url = f"amqp://guest:guest@{RMQ_HOST}:{RMQ_PORT}/{urllib.parse.quote(name, safe='')}"
        os.environ["RMQ_URL"] = url
        yield url
    finally:
        _rabbitmqctl("delete_vhost", name, check=False)


def _start_moto(port: int, tmp: Path) -> subprocess.Popen[bytes]:
    from local.stack import wait_for_port

    log = (tmp / "moto.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "local", "dynamodb", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO, env={**os.environ}, stdout=log, stderr=subprocess.STDOUT)
    wait_for_port(port, 60, proc)
    return proc


def _stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# --- fixtures: goods, orders, carts, notifies ------------------------------------------


@dataclasses.dataclass
class World:
    tmp: Path
    keys: dict[str, Path]
    sizes: dict[str, Any]


BENCH_GOODS = (("bench-a", "Bench cup", 1990), ("bench-b", "Bench teapot", 5990))
BIG_STOCK = 10**9
SEED_TOTAL_FEN = 2 * BENCH_GOODS[0][2]  # a seeded order: 2 x bench-a


def put_goods() -> None:
    from chalicelib import config
    from chalicelib.domain import Goods
    from chalicelib.store import Store

    store = Store.from_settings(config.get())
    for gid, name, price in BENCH_GOODS:
        store.put_goods(Goods(gid, name, price, BIG_STOCK))


def seed_orders(n: int, user_prefix: str, check_in_s: float) -> list[Any]:
    """n UNPAID orders (one line, 2 x bench-a) by batch_write, in the store's format,
    and the stock taken for them, as n create-order transactions would leave it."""
    from chalicelib.domain import UNPAID, Line, Order, new_order_id
    from chalicelib.store.models import model_from_order
    from local.bench_models import models

    M = models()

    now = datetime.now(UTC)
    gid, name, price = BENCH_GOODS[0]
    made = [
        Order(id=new_order_id(now), username=f"{user_prefix}{i}", status=UNPAID,
              source_type="1", lines=[Line(gid, name, price, 2)], create_time=now,
              update_time=now, expire_time=now + timedelta(seconds=1800),
              check_time=now + timedelta(seconds=check_in_s))
        for i in range(n)
    ]
    with M.Order.batch_write() as batch:
        for order in made:
            batch.save(model_from_order(M, order))
    M.Goods(gid).update(actions=[M.Goods.stock.add(-2 * n)])
    return made


def seed_carts(users: Sequence[str]) -> None:
    from local.bench_models import models

    M = models()

    with M.CartLine.batch_write() as batch:
        for user in users:
            # as PUT /cart/items/{id} leaves them: with the goods' price and name
            for (gid, name, price), num in zip(BENCH_GOODS, (1, 2), strict=True):
                batch.save(M.CartLine(user, gid, num=num, price_fen=price, name=name))


def pay_messages(world: World, orders: Sequence[Any]) -> list[bytes]:
    """What the notify route publishes for each order, with the signed notify the
    worker verifies again (signed before any clock starts)."""
    from chalicelib.domain import iso, money_str

    forms = signed_notify_forms(world, orders)
    return [json.dumps({"orderId": order.id, "tradeNo": form["trade_no"],
                        "totalAmount": money_str(order.total_fen),
                        "payTime": iso(datetime.now(UTC)), "notifyId": form["notify_id"],
                        "notify": form}).encode()
            for order, form in zip(orders, forms, strict=True)]


def signed_notifies(world: World, orders: Sequence[Any]) -> list[bytes]:
    """The notifies as Alipay posts them (form bodies)."""
    return [urllib.parse.urlencode(form).encode("ascii")
            for form in signed_notify_forms(world, orders)]


def signed_notify_forms(world: World, orders: Sequence[Any]) -> list[dict[str, str]]:
    """Alipay's trade_status_sync notify for each order, signed by the sandbox's key
    (Alipay's cost, so done before any clock starts)."""
    from chalicelib.domain import money_str
    from local.alipay_sandbox import LOCAL_APP_ID, LOCAL_SELLER_ID
    from local.alipay_sandbox.constants import LOCAL_BUYER_ID
    from local.alipay_sandbox.keys import load_private_key
    from local.alipay_sandbox.signer import alipay_time, sign_params

    key = load_private_key(world.keys["alipay_private"])
    now = alipay_time(datetime.now(UTC))
    forms = []
    for i, order in enumerate(orders):
        amount = money_str(order.total_fen)
        fields = {
            "notify_time": now, "notify_type": "trade_status_sync",
            "notify_id": f"bench{uuid.uuid4().hex}", "app_id": LOCAL_APP_ID, "charset": "utf-8",
            "version": "1.0", "trade_no": f"2026{i:024d}", "out_trade_no": order.id,
            "buyer_id": LOCAL_BUYER_ID, "seller_id": LOCAL_SELLER_ID,
            "trade_status": "TRADE_SUCCESS", "total_amount": amount, "receipt_amount": amount,
            "buyer_pay_amount": amount, "gmt_create": now, "gmt_payment": now,
            "subject": order.lines[0].name,
        }
        forms.append(sign_params(fields, key))
    return forms


# --- the project's pieces ------------------------------------------------------------


def make_store() -> Any:
    from chalicelib import config
    from chalicelib.store import Store

    class TimingStore(Store):
        """The real store; notes when each order's UNPAID -> PAID write was won."""

        def __init__(self) -> None:
            super().__init__(config.get().tables, config.get().aws_region)
            self.paid: dict[str, float] = {}

        def mark_paid(self, order_id: str, **kw: Any) -> bool:
            won = super().mark_paid(order_id, **kw)
            if won:
                self.paid[order_id] = time.perf_counter()
            return bool(won)

    return TimingStore()


def make_deps(world: World, url: str, store: Any | None = None) -> Any:
    from chalicelib import broker, config
    from chalicelib.alipay_gateway import AlipayGateway
    from chalicelib.context import Deps
    from local.alipay_sandbox import LOCAL_APP_ID, LOCAL_SELLER_ID

    settings = dataclasses.replace(config.load(), rmq_url=url, check_delay_seconds=CHECK_DELAY_S)
    gateway = AlipayGateway(
        LOCAL_APP_ID, LOCAL_SELLER_ID, "http://127.0.0.1:9/gateway.do",  # never called here
        world.keys["app_private"].read_text(), world.keys["alipay_public"].read_text(),
        None, None, timeout=5.0)
    return Deps(settings=settings, store=store or make_store(),
                broker=broker.Broker(url, CHECK_DELAY_S, settings.rmq_queue_type),
                gateway=gateway)


@contextlib.contextmanager
def running_bridge(d: Any, *, workers: int | None = None, pay_rate: float | None = None,
                   ) -> Iterator[dict[str, Any]]:
    """chalicelib.worker.run in a thread of this process (as the tests run it); `workers`
    None: BRIDGE_WORKERS."""
    from chalicelib import broker, worker

    stop = threading.Event()
    info: dict[str, Any] = {"started": time.perf_counter(),
                            "capped_by": "chalicelib.worker.run(rate_limits=...)"}
    kwargs: dict[str, Any] = {"sweep_interval": 3600.0, "workers": workers}
    if pay_rate is not None:
        kwargs["rate_limits"] = {broker.QUEUE_PAY: pay_rate}
    thread = threading.Thread(target=worker.run, args=(d, stop), kwargs=kwargs,
                              name="bench-bridge", daemon=True)
    thread.start()
    try:
        yield info
    finally:
        stop.set()
        thread.join(15)


def test_client(world: World) -> Any:
    from chalice.test import Client

    from app import app

    return Client(app, stage_name="bench", project_dir=str(world.tmp))


# --- bare pika -------------------------------------------------------------------------


def connect(url: str) -> Any:
    import pika

    return pika.BlockingConnection(pika.URLParameters(url))


def declare_project_topology(url: str) -> None:
    from chalicelib import broker

    conn = connect(url)
    try:
        broker.declare_topology(conn.channel(), CHECK_DELAY_S * 1000)
    finally:
        conn.close()


def fill_queue(url: str, exchange: str, routing_key: str, bodies: Sequence[bytes],
               queue: str) -> None:
    """Persistent messages, published without waiting for each confirm (set-up, not measured);
    returns once the queue holds them all."""
    import pika

    conn = connect(url)
    try:
        ch = conn.channel()
        props = pika.BasicProperties(content_type="application/json", delivery_mode=2)
        for body in bodies:
            ch.basic_publish(exchange, routing_key, body, props)
        deadline = time.monotonic() + 60
        while depth(ch, queue) < len(bodies):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{queue} did not fill up")
            time.sleep(0.05)
    finally:
        conn.close()


def depth(channel: Any, queue: str) -> int:
    return int(channel.queue_declare(queue, passive=True).method.message_count)


def bare_consume(url: str, queue: str, n: int, prefetch: int,
                 on_body: Callable[[bytes], None] | None = None) -> float:
    """Consume n messages with manual ack at `prefetch`; seconds from the first delivery
    request to the last ack."""
    conn = connect(url)
    try:
        ch = conn.channel()
        ch.basic_qos(prefetch_count=prefetch)
        done = {"n": 0}

        def cb(channel: Any, method: Any, properties: Any, body: bytes) -> None:
            if on_body is not None:
                on_body(body)
            channel.basic_ack(method.delivery_tag)
            done["n"] += 1

        start = time.perf_counter()
        ch.basic_consume(queue, cb, auto_ack=False)
        while done["n"] < n:
            conn.process_data_events(time_limit=0.1)
        return time.perf_counter() - start
    finally:
        conn.close()


def bare_confirmed_channel(url: str) -> tuple[Any, Any]:
    conn = connect(url)
    ch = conn.channel()
    ch.confirm_delivery()
    return conn, ch


def bare_publish(ch: Any, exchange: str, key: str, body: bytes) -> None:
    import pika

    ch.basic_publish(exchange, key, body,
                     pika.BasicProperties(content_type="application/json", delivery_mode=2),
                     mandatory=True)


# --- bare DynamoDB (pynamodb's low-level calls, the same endpoint) ------------------------


def bare_conditional_update(order_id: str) -> None:
    from chalicelib.domain import UNPAID, iso
    from local.bench_models import models

    M = models()

    M.Order._get_connection().update_item(
        order_id, actions=[M.Order.update_time.set(iso(datetime.now(UTC)))],
        condition=M.Order.status == UNPAID)


def bare_pay_update(order_id: str) -> None:
    """The bridge's UNPAID -> PAID write, bare: the same transaction (the order's
    update under its condition, the outbox's event, the notify's and the payment's
    timeline events)."""
    from pynamodb.transactions import TransactWrite

    from chalicelib.domain import PAID, UNPAID, EventType, TimelineEvent, events, iso
    from chalicelib.domain.reconciliation import bill_day
    from chalicelib.store.models import timeline_item
    from chalicelib.store.outbox import put_event
    from local.bench_models import models

    M = models()

    at = datetime.now(UTC)
    now = iso(at)
    with TransactWrite(connection=M.Order._get_connection().connection) as tx:
        put_event(M, tx, events.paid(order_id, trade_no="T1", now=at))
        for kind, detail in ((EventType.NOTIFY, {"verified": True}),
                             (EventType.PAID, {"tradeNo": "T1"})):
            tx.save(timeline_item(M, TimelineEvent(order_id, at, kind, detail)))
        tx.update(M.Order(order_id), actions=[
            M.Order.status.set(PAID), M.Order.transaction_id.set("T1"),
            M.Order.pay_time.set(now), M.Order.pay_day.set(bill_day(at).isoformat()),
            M.Order.notify_id.set("n1"), M.Order.update_time.set(now),
            M.Order.unpaid.remove()],
            condition=(M.Order.status == UNPAID) & (M.Order.total_fen == SEED_TOTAL_FEN))


def bare_total_read(order_id: str) -> dict[str, Any]:
    """What the notify reads: the order's amount alone, consistently."""
    from local.bench_models import models

    return dict(models().Order._get_connection().get_item(
        order_id, consistent_read=True, attributes_to_get=["total_fen"]))


def bare_read(order_id: str) -> dict[str, Any]:
    from local.bench_models import models

    M = models()

    return dict(M.Order._get_connection().get_item(order_id, consistent_read=True))


def in_threads(items: Sequence[Any], fn: Callable[[Any], None], concurrency: int) -> float:
    """fn over items from `concurrency` threads; wall seconds."""
    chunks = [items[i::concurrency] for i in range(concurrency)]
    errors: list[BaseException] = []

    def work(chunk: Sequence[Any]) -> None:
        try:
            for item in chunk:
                fn(item)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(c,)) for c in chunks]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - start


def wait_paid(store: Any, ids: Sequence[str], timeout: float) -> float:
    """Waits until every id was marked PAID by the bridge; returns the last one's time."""
    deadline = time.monotonic() + timeout
    while True:
        missing = sum(1 for oid in ids if oid not in store.paid)
        if not missing:
            return max(store.paid[oid] for oid in ids)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{missing} of {len(ids)} orders not PAID within {timeout:.0f} s")
        time.sleep(0.05)


def statuses(ids: Sequence[str], attrs: Sequence[str] = ("id", "status")) -> dict[str, Any]:
    from local.bench_models import models

    M = models()

    found: dict[str, Any] = {}
    for i in range(0, len(ids), 100):
        for m in M.Order.batch_get(list(ids[i:i + 100]), consistent_read=True,
                                      attributes_to_get=list(attrs)):
            found[m.id] = m
    return found


# --- stage 1: the bridge drains the pay queue ----------------------------------------------


def stage_drain(world: World) -> StageResult:
    from chalicelib import broker, config

    n = world.sizes["drain_n"]
    prefetch = config.load().bridge_prefetch
    res = StageResult("drain", [])
    with vhost("drain") as url:
        declare_project_topology(url)
        progress(f"1 drain: seeding 2 x {n:,} UNPAID orders (batch_write, not transactions)")
        made = seed_orders(n, "drain-", 3600)
        spare = [o.id for o in seed_orders(n, "drain-bare-", 3600)]
        bodies = pay_messages(world, made)
        ids = [o.id for o in made]

        progress(f"1 drain: baseline, bare pika consume + ack of {n:,} at prefetch {prefetch}")
        conn = connect(url)
        conn.channel().queue_declare("bench.consume", durable=True)
        conn.close()
        fill_queue(url, "", "bench.consume", bodies, "bench.consume")
        consume_rate = n / bare_consume(url, "bench.consume", n, prefetch)

        progress(f"1 drain: baseline, {n:,} bare UNPAID -> PAID updates (concurrency 1)")
        update_rate = n / in_threads(spare, bare_pay_update, 1)
        m = min(n, world.sizes["scale_n"])
        progress(f"1 drain: {m:,} minimal conditional updates (SET one attribute), for scale")
        minimal_rate = m / in_threads(ids[:m], bare_conditional_update, 1)

        progress(f"1 drain: the bridge drains {n:,} pay messages")
        fill_queue(url, broker.EXCHANGE_PAY, broker.QUEUE_PAY, bodies, broker.QUEUE_PAY)
        d = make_deps(world, url)
        with running_bridge(d) as info:
            last = wait_paid(d.store, ids, timeout=max(120.0, n / 20))
        bridge_rate = n / (last - info["started"])
        d.broker.close()
        paid = sum(1 for m in statuses(ids).values() if m.status == "PAID")
        lower = min(consume_rate, update_rate)
        res.rows += [
            Row("1 drain", f"pay msg/s vs bare consume+ack (prefetch {prefetch})",
                consume_rate, bridge_rate, "/s"),
            Row("1 drain", "pay msg/s vs bare PAID update, same write", update_rate,
                bridge_rate, "/s"),
            Row("1 drain", "pay msg/s vs minimal update (SET 1 attr)", minimal_rate,
                bridge_rate, "/s"),
            Row("1 drain", "pay msg/s vs the lower of the two", lower, bridge_rate, "/s",
                ">= 0.80", bridge_rate / lower >= 0.8),
            Row("1 drain", "orders PAID", n, paid, "", "all", paid == n),
        ]
        res.data.update(n=n, prefetch=prefetch, consume_rate=consume_rate,
                        update_rate=update_rate, minimal_update_rate=minimal_rate,
                        bridge_rate=bridge_rate, paid=paid)

    res.data["scaling"] = _drain_scaling(world)
    for point in res.data["scaling"]:
        w = point["workers"]
        res.rows.append(Row("1 drain", f"{w} worker(s), msg/s vs bare updates x{w}",
                            point["update_rate"], point["bridge_rate"], "/s"))
    res.notes.append(
        f"1 drain: 2 x {n:,} orders seeded with batch_write in the store's format; the bare "
        "update is the bridge's own write (SET status, transactionId, payTime, notifyId, "
        "updateTime, REMOVE unpaid IF status = UNPAID AND totalFen = x) through pynamodb's "
        "low-level UpdateItem on the other half; the minimal update (SET one attribute) is "
        "shown for scale. The bridge runs in a thread of the bench (chalicelib.worker.run), moto "
        "in its own process.")
    return res


def _drain_scaling(world: World) -> list[dict[str, Any]]:
    from chalicelib import broker

    n = world.sizes["scale_n"]
    points = []
    for workers in world.sizes["scale_workers"]:
        with vhost(f"scale{workers}") as url:
            declare_project_topology(url)
            progress(f"1 drain: {workers} worker(s), {n:,} messages, and bare updates x{workers}")
            made = seed_orders(n, f"scale{workers}-", 3600)
            ids = [o.id for o in made]
            spare = [o.id for o in seed_orders(n, f"scale{workers}-bare-", 3600)]
            update_rate = n / in_threads(spare, bare_pay_update, workers)
            fill_queue(url, broker.EXCHANGE_PAY, broker.QUEUE_PAY,
                       pay_messages(world, made),
                       broker.QUEUE_PAY)
            d = make_deps(world, url)
            with running_bridge(d, workers=workers) as info:
                last = wait_paid(d.store, ids, timeout=max(120.0, n / 20))
            d.broker.close()
            points.append({"workers": workers, "n": n, "update_rate": update_rate,
                           "bridge_rate": n / (last - info["started"])})
    return points


# --- stage 2: the notify route -------------------------------------------------------


def stage_notify(world: World) -> StageResult:
    from chalicelib import broker, deps

    n, rounds = world.sizes["notify_n"], world.sizes["notify_rounds"]
    res = StageResult("notify", [])
    with vhost("notify") as url:
        declare_project_topology(url)
        progress(f"2 notify: seeding {n:,} orders, signing {n:,} notifies (Alipay's side)")
        made = seed_orders(n, "notify-", 3600)
        bodies = signed_notifies(world, made)
        msgs = pay_messages(world, made)
        d = make_deps(world, url)
        deps.use(d)
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        base_s = proj_s = floor_s = 0.0
        answers: dict[str, int] = {}
        verify = _bare_rsa2_check(world)
        conn, ch = bare_confirmed_channel(url)
        # The notify as production takes it: the function URL's Lambda function
        # (Alipay's notify_url), called with the event Lambda would hand it.
        from app import alipay_notify_url as notify_url

        events = [{"version": "2.0", "rawPath": "/", "body": b.decode(),
                   "isBase64Encoded": False, "headers": headers,
                   "requestContext": {"http": {"method": "POST", "path": "/"}}}
                  for b in bodies]
        try:
            with test_client(world) as client:
                client.http.post("/alipay/notify", headers=headers, body=bodies[0])  # warm
                d.broker.ping()
                step = -(-n // rounds)
                for r in range(rounds):
                    part = range(r * step, min(n, (r + 1) * step))
                    progress(f"2 notify: round {r + 1}/{rounds}: {len(part)} bare read+publish, "
                             f"{len(part)} through the route")
                    start = time.perf_counter()
                    for i in part:
                        bare_read(made[i].id)
                        bare_publish(ch, broker.EXCHANGE_PAY, broker.QUEUE_PAY, msgs[i])
                    base_s += time.perf_counter() - start
                    start = time.perf_counter()
                    for i in part:  # the floor: what a notify cannot skip, done bare
                        assert verify(bodies[i])
                        bare_total_read(made[i].id)
                        bare_publish(ch, broker.EXCHANGE_PAY, broker.QUEUE_PAY, msgs[i])
                    floor_s += time.perf_counter() - start
                    start = time.perf_counter()
                    for i in part:
                        answer = notify_url(events[i], None)["body"]
                        answers[answer] = answers.get(answer, 0) + 1
                    proj_s += time.perf_counter() - start
        finally:
            conn.close()
            deps.use(None)
            d.broker.close()
        base, proj, floor = n / base_s, n / proj_s, n / floor_s
        ok = answers.get("success", 0)
        res.rows += [
            Row("2 notify", "notifies/s vs bare read + confirmed publish (before)", base, proj,
                "/s"),
            Row("2 notify", "notifies/s vs the floor (form, RSA2, amount read, publish; bare)",
                floor, proj, "/s", ">= 0.85", proj / floor >= 0.85),
            Row("2 notify", "answered success", n, ok, "", "all", ok == n),
        ]
        res.data.update(n=n, rounds=rounds, baseline_rate=base, project_rate=proj,
                        floor_rate=floor, answers=answers)
    res.notes.append("2 notify: the function URL's Lambda function (app.alipay_notify_url, "
                     "Alipay's notify_url in production) called in-process with a function-URL "
                     "event; it parses the form, "
                     "checks the RSA2 signature (the string python-alipay-sdk builds, the check "
                     "`cryptography`'s), reads the order's amount consistently and publishes "
                     "with a confirm (the notify goes on the timeline from the worker). The old "
                     "baseline does a read of the whole order (pynamodb GetItem) and the "
                     "confirmed publish (bare pika); the floor is the form's parse, the "
                     "signature check (sorted fields joined, `cryptography`), the read of the "
                     "amount alone and the confirmed publish, all bare. Rounds alternate.")
    return res


def _bare_rsa2_check(world: World) -> Callable[[bytes], bool]:
    """A notify body's RSA2 check, bare: the form parsed, its fields but sign and
    sign_type sorted and joined as Alipay signs them, SHA256withRSA by `cryptography`."""
    import base64

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding

    key: Any = serialization.load_pem_public_key(world.keys["alipay_public"].read_bytes())

    def check(body: bytes) -> bool:
        form = dict(urllib.parse.parse_qsl(body.decode(), keep_blank_values=True))
        sign = form.pop("sign")
        form.pop("sign_type", None)
        text = "&".join(f"{k}={v}" for k, v in sorted(form.items()))
        key.verify(base64.b64decode(sign), text.encode(), padding.PKCS1v15(), hashes.SHA256())
        return True

    return check


# --- stage 3: create order -------------------------------------------------------------


def stage_create(world: World) -> StageResult:
    from pynamodb.expressions.condition import size
    from pynamodb.transactions import TransactWrite

    from chalicelib import auth, broker, deps
    from chalicelib.domain import UNPAID, Line, Order, events, new_order_id
    from chalicelib.domain.timeline import created as created_event
    from chalicelib.store.models import UNPAID_ORDERS_PREFIX, model_from_order, timeline_item
    from chalicelib.store.outbox import put_event
    from local.bench_models import models

    M = models()

    n, rounds = world.sizes["create_n"], world.sizes["create_rounds"]
    res = StageResult("create", [])
    with vhost("create") as url:
        declare_project_topology(url)
        progress(f"3 create: {3 * n:,} carts of 2 lines (batch_write)")
        base_users = [f"cb{i}" for i in range(n)]
        floor_users = [f"cf{i}" for i in range(n)]
        proj_users = [f"cp{i}" for i in range(n)]
        seed_carts(base_users + floor_users + proj_users)
        tokens = {u: auth.issue(JWT_SECRET, u, 3600) for u in proj_users}
        d = make_deps(world, url)
        deps.use(d)
        conn = d.store.connection
        cap = d.settings.max_unpaid_orders_per_user  # one order per user here: never reached
        lines = [Line(g, name, price, num) for (g, name, price), num in zip(BENCH_GOODS, (1, 2),
                                                                              strict=True)]
        cart = {"bench-a": 1, "bench-b": 2}

        def bare_transaction(user: str) -> None:
            now = datetime.now(UTC)
            order = Order(id=new_order_id(now), username=user, status=UNPAID, source_type="1",
                          lines=lines, create_time=now, update_time=now,
                          expire_time=now + timedelta(seconds=1800),
                          check_time=now + timedelta(seconds=CHECK_DELAY_S))
            with TransactWrite(connection=conn) as tx:
                tx.save(model_from_order(M, order), condition=M.Order.id.does_not_exist())
                put_event(M, tx, events.created(order, now))  # the outbox's event
                tx.save(timeline_item(M, created_event(order)))  # the timeline's first
                ids = M.UnpaidOrders.order_ids  # the cap on UNPAID orders per user
                tx.update(M.UnpaidOrders(UNPAID_ORDERS_PREFIX + user),
                          actions=[ids.add({order.id})],
                          condition=ids.does_not_exist() | (size(ids) < cap))
                for line in lines:
                    tx.update(M.Goods(line.goods_id), actions=[M.Goods.stock.add(-line.num)],
                              condition=(M.Goods.stock >= line.num)
                              & (M.Goods.price_fen == line.price_fen))
                for gid, num in cart.items():
                    tx.delete(M.CartLine(user, gid), condition=M.CartLine.num == num)

        def bare_cart_read(user: str) -> int:
            # the cart's lines, as the route reads them (a Query of the user's partition)
            page = M.CartLine._get_connection().query(user, consistent_read=True)
            return len(page["Items"])

        pub_conn, pub_ch = bare_confirmed_channel(url)
        codes: dict[int, int] = {}
        base_s = floor_s = proj_s = 0.0
        try:
            with test_client(world) as client:
                client.http.get("/goods")  # warm: connections, the model's table meta
                d.broker.ping()
                step = -(-n // rounds)
                for r in range(rounds):
                    part = range(r * step, min(n, (r + 1) * step))
                    progress(f"3 create: round {r + 1}/{rounds}: {len(part)} bare TransactWrite, "
                             f"{len(part)} floors, {len(part)} POST /orders")
                    start = time.perf_counter()
                    for i in part:
                        bare_transaction(base_users[i])
                    base_s += time.perf_counter() - start
                    start = time.perf_counter()
                    for i in part:  # the floor: what a create cannot skip, done bare
                        user = floor_users[i]
                        assert bare_cart_read(user) == len(cart)
                        bare_transaction(user)
                        bare_publish(pub_ch, broker.EXCHANGE_DELAY, broker.QUEUE_DELAY,
                                     b'{"orderId": "ORDER_0000000000000_0000000000000000"}')
                    floor_s += time.perf_counter() - start
                    start = time.perf_counter()
                    for i in part:
                        user = proj_users[i]
                        got = client.http.post("/orders", body=b"{}", headers={
                            "Authorization": f"Bearer {tokens[user]}",
                            "Content-Type": "application/json"})
                        codes[got.status_code] = codes.get(got.status_code, 0) + 1
                    proj_s += time.perf_counter() - start
        finally:
            pub_conn.close()
            deps.use(None)
            d.broker.close()
        base, floor, proj = n / base_s, n / floor_s, n / proj_s
        res.rows += [
            Row("3 create", "orders/s vs bare TransactWrite alone", base, proj, "/s"),
            Row("3 create", "orders/s vs the floor (cart read, TransactWrite, publish; bare)",
                floor, proj, "/s", ">= 0.85", proj / floor >= 0.85),
            Row("3 create", "answered 201", n, codes.get(201, 0), "", "all", codes.get(201) == n),
        ]
        res.data.update(n=n, baseline_rate=base, floor_rate=floor, project_rate=proj,
                        codes=codes)
    res.notes.append("3 create: POST /orders through chalice's test client (JWT, cart query, "
                     "one TransactWrite: the order's put, its outbox event and first timeline "
                     "event + the user's unpaid-orders set within the cap + 2 stock updates "
                     "conditioned on stock and the cart line's price + 2 cart deletes, "
                     "confirmed delay publish); the old baseline "
                     "is that TransactWrite alone; the floor is the cart's Query, the same "
                     "TransactWrite and a confirmed publish to the delay queue, bare.")
    return res


# --- stage 4: timeout precision at scale --------------------------------------------------


def start_sandbox(world: World) -> Any:
    """The local Alipay on a free port, serving in a daemon thread of the bench."""
    from local.alipay_sandbox import make_server

    server = make_server("127.0.0.1", 0, world.keys["app_private"].parent, [0.3] * 7)
    threading.Thread(target=server.serve_forever, name="bench-sandbox", daemon=True).start()
    return server


def sandbox_env(world: World, server: Any) -> dict[str, str]:
    from local.alipay_sandbox import LOCAL_APP_ID, LOCAL_SELLER_ID

    return {"ALIPAY_APP_ID": LOCAL_APP_ID, "ALIPAY_SELLER_ID": LOCAL_SELLER_ID,
            "ALIPAY_GATEWAY": server.gateway_url,
            "ALIPAY_APP_PRIVATE_KEY_FILE": str(world.keys["app_private"]),
            "ALIPAY_PUBLIC_KEY_FILE": str(world.keys["alipay_public"])}


def _vm(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0  # kB -> MiB
    return float("nan")


def stage_timeout(world: World) -> StageResult:
    from chalicelib import broker, config

    cap_n, n_s, rate = (world.sizes["timeout_cap_n"], world.sizes["timeout_seconds"],
                        world.sizes["timeout_rate"])
    workers = config.get().bridge_workers
    res = StageResult("timeout", [])
    with vhost("timeout") as url:
        declare_project_topology(url)
        conn = connect(url)
        ch = conn.channel()
        ch.queue_declare("bench.ttl.dead", durable=True)
        ch.queue_declare("bench.ttl", durable=True, arguments={
            "x-message-ttl": CHECK_DELAY_S * 1000, "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": "bench.ttl.dead"})
        # The worker closes an order only after Alipay said it was not paid: the local
        # sandbox answers (no trade: TRADE_NOT_EXIST), as Alipay would for an order
        # whose payment page was never opened.
        sandbox = start_sandbox(world)
        progress("4 timeout: starting the bridge as a subprocess (python -m chalicelib.worker)")
        log = (world.tmp / "bridge-timeout.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "chalicelib.worker"], cwd=REPO,
                                env={**os.environ, "RMQ_URL": url, **sandbox_env(world, sandbox)},
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while int(ch.queue_declare(broker.QUEUE_CHECK, passive=True).method.consumer_count) < 1:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the bridge did not start; see bridge-timeout.log")
                time.sleep(0.1)
            idle_mb = _vm(proc.pid, "VmHWM")
            # Capacity: the floor and the bridge in turns (ABAB...), each closing a
            # share of its orders a round, so a slow spell of the host weighs on both.
            floor_s = cap_s = 0.0
            part = cap_n // CAPACITY_ROUNDS
            for r in range(CAPACITY_ROUNDS):
                progress(f"4 timeout: capacity, round {r + 1}/{CAPACITY_ROUNDS}: {part:,} closes "
                         f"done bare in "
                         f"{workers} threads (read, signed query, transaction), then "
                         f"{part:,} checks due at once through the bridge")
                floor_s += part / _close_floor_rate(world, sandbox.gateway_url,
                                                    seed_orders(part, f"tfloor{r}-", 0), workers)
                cap_s += part / _bridge_close_rate(url, ch, seed_orders(part, f"tcap{r}-", 0))
            floor_rate = CAPACITY_ROUNDS * part / floor_s
            cap_rate = CAPACITY_ROUNDS * part / cap_s
            half = cap_rate / 2
            runs = {}
            for label, r in (("half", half), ("target", rate)):
                runs[label] = _lateness_run(world, url, ch, proc, max(20, int(r * n_s)), r)
            peak_mb = _vm(proc.pid, "VmHWM")
        finally:
            _stop(proc)
            conn.close()
    carried = floor_rate >= 2 * rate  # the emulators carry the target rate with headroom
    half_p, at_p = runs["half"]["p"], runs["target"]["p"]
    res.rows += [
        Row("4 timeout", f"close capacity, closes/s vs the floor ({workers} threads, bare)",
            floor_rate, cap_rate, "/s", ">= 0.85", cap_rate / floor_rate >= 0.85),
        Row("4 timeout", f"close lateness p99 at half the capacity ({half:.0f}/s) vs bare TTL",
            runs["half"]["b"][99], half_p[99], "ms", "< 1000 ms", half_p[99] < 1000),
        Row("4 timeout", f"close lateness p50 at {rate:g}/s vs bare TTL", runs["target"]["b"][50],
            at_p[50], "ms"),
        Row("4 timeout", f"close lateness p99 at {rate:g}/s vs bare TTL", runs["target"]["b"][99],
            at_p[99], "ms", "< 1000 ms" if carried else "",
            at_p[99] < 1000 if carried else None),
        Row("4 timeout", f"close lateness max at {rate:g}/s vs bare TTL",
            runs["target"]["b"][100], at_p[100], "ms"),
        Row("4 timeout", "bridge peak RSS (VmHWM) vs idle", idle_mb, peak_mb, "MiB",
            "< 150 MiB", peak_mb < 150),
        Row("4 timeout", "orders CLOSED (capacity and both runs)",
            cap_n + sum(x["n"] for x in runs.values()),
            cap_n + sum(x["closed"] for x in runs.values()), "", "all",
            all(x["closed"] == x["n"] for x in runs.values())),
    ]
    res.data.update(capacity_n=cap_n, floor_rate=floor_rate, capacity_rate=cap_rate,
                    runs=runs, idle_rss_mb=idle_mb, peak_rss_mb=peak_mb, workers=workers)
    res.notes.append(
        f"4 timeout: capacity: {cap_n:,} UNPAID orders seeded with their check due, then "
        f"their checks put on queue.order.check at once; closes/s = orders / (last closeTime "
        f"- first publish). Its floor: the same I/O bare in {workers} threads (the bridge's "
        "workers): a consistent GetItem of the order, a signed alipay.trade.query to the "
        "sandbox over HTTP with its answer's signature checked (`cryptography`), and the "
        "close's TransactWrite (the order, the stock back, the outbox event, the two "
        "timeline events). Lateness: delay messages published with the project's confirmed "
        "publish at half the measured capacity and at the target rate, beside the same "
        "number into a bare 5 s TTL queue read by a bare consumer; lateness = closeTime - "
        "(publish + 5 s), every value in the JSON. The bridge is `python -m chalicelib.worker` "
        "in a subprocess; memory is its VmHWM.")
    if not carried:
        res.notes.append(
            f"4 timeout: the floor itself closes {floor_rate:.0f} a second here, less than "
            f"twice {rate:g}: the local emulators (moto applying one request at a time, the "
            f"sandbox in the bench's process) cannot carry {rate:g} closes a second with "
            f"headroom, so that row has no target; the half-capacity run carries it.")
    return res


def _bare_trade_query(gateway_url: str, order_id: str, key: Any, alipay_key: Any) -> str:
    """alipay.trade.query as Alipay's protocol has it, bare: sorted parameters signed
    SHA256withRSA, a GET, the answer's signature checked over the object as written.
    Returns the answer's sub_code (or code)."""
    import base64

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    from local.alipay_sandbox import LOCAL_APP_ID

    params = {"app_id": LOCAL_APP_ID, "method": "alipay.trade.query", "charset": "utf-8",
              "sign_type": "RSA2", "version": "1.0",
              "timestamp": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S"),
              "biz_content": json.dumps({"out_trade_no": order_id}, separators=(",", ":"))}
    items = sorted(params.items())
    text = "&".join(f"{k}={v}" for k, v in items)
    sign = base64.b64encode(key.sign(text.encode(), padding.PKCS1v15(), hashes.SHA256()))
    query = urllib.parse.urlencode([*items, ("sign", sign.decode())])
    with urllib.request.urlopen(f"{gateway_url}?{query}", timeout=10) as answer:  # noqa: S310
        raw = answer.read().decode()
    start = raw.index("{", raw.index("alipay_trade_query_response"))
    end = raw.rindex(',"sign":"')
    alipay_key.verify(base64.b64decode(raw[end + 9:raw.rindex('"')]), raw[start:end].encode(),
                      padding.PKCS1v15(), hashes.SHA256())
    body = json.loads(raw[start:end])
    return str(body.get("sub_code") or body.get("code"))


def _close_floor_rate(world: World, gateway_url: str, orders: Sequence[Any],
                      workers: int) -> float:
    """Closes a second with only the I/O a close cannot skip, done bare."""
    from cryptography.hazmat.primitives import serialization
    from pynamodb.transactions import TransactWrite

    from chalicelib.domain import CLOSED, UNPAID, EventType, TimelineEvent, events, iso
    from chalicelib.store.models import RECHECK_FLAG, timeline_item
    from chalicelib.store.outbox import put_event
    from local.bench_models import models

    M = models()
    conn = M.Order._get_connection().connection
    key: Any = serialization.load_pem_private_key(world.keys["app_private"].read_bytes(), None)
    alipay_key: Any = serialization.load_pem_public_key(
        world.keys["alipay_public"].read_bytes())

    def close(order: Any) -> None:
        M.Order._get_connection().get_item(order.id, consistent_read=True)
        assert _bare_trade_query(gateway_url, order.id, key, alipay_key) == "ACQ.TRADE_NOT_EXIST"
        now = datetime.now(UTC)
        stamp = iso(now)
        with TransactWrite(connection=conn) as tx:
            put_event(M, tx, events.closed(order, now))
            for kind, detail in ((EventType.QUERY, {"trade": None}),
                                 (EventType.CLOSED, {"stockReturned": 2})):
                tx.save(timeline_item(M, TimelineEvent(order.id, now, kind, detail)))
            tx.update(M.Order(order.id), actions=[
                M.Order.status.set(CLOSED), M.Order.close_time.set(stamp),
                M.Order.end_time.set(stamp), M.Order.update_time.set(stamp),
                M.Order.unpaid.remove(), M.Order.recheck.set(RECHECK_FLAG),
                M.Order.link_expire_time.set(iso(order.expire_time))],
                condition=M.Order.status == UNPAID)
            for line in order.lines:
                tx.update(M.Goods(line.goods_id), actions=[M.Goods.stock.add(line.num)])

    return len(orders) / in_threads(orders, close, workers)


def _bridge_close_rate(url: str, ch: Any, orders: Sequence[Any]) -> float:
    """Closes a second of the bridge with every check due at once."""
    import pika

    from chalicelib import broker
    from chalicelib.domain import parse_iso

    props = pika.BasicProperties(content_type="application/json", delivery_mode=2)
    start = time.time()
    for order in orders:
        ch.basic_publish("", broker.QUEUE_CHECK, json.dumps({"orderId": order.id}).encode(),
                         props)
    ids = [o.id for o in orders]
    deadline = time.monotonic() + 60 + len(orders) / 10
    while time.monotonic() < deadline:
        time.sleep(0.5)
        if depth(ch, broker.QUEUE_CHECK):
            continue
        found = statuses(ids, ("id", "status", "close_time"))
        closed = [m for m in found.values() if m.status == "CLOSED"]
        if len(closed) == len(ids):
            return len(ids) / (max(parse_iso(m.close_time).timestamp() for m in closed) - start)
    raise RuntimeError(f"the bridge did not close {len(ids)} orders in time")


def _lateness_run(world: World, url: str, ch: Any, proc: Any, n: int,
                  rate: float) -> dict[str, Any]:
    """n delay messages at `rate` a second through the project's publish, beside n
    into a bare TTL queue; each close's lateness and the bare TTL's."""
    import pika

    from chalicelib import broker
    from chalicelib.domain import parse_iso

    made = seed_orders(n, f"tlate{rate:.0f}-", CHECK_DELAY_S + n / rate)
    bare_late: list[float] = []
    stop = threading.Event()

    def bare_consumer() -> None:
        c = connect(url)
        cch = c.channel()
        cch.basic_qos(prefetch_count=50)

        def cb(channel: Any, method: Any, props: Any, body: bytes) -> None:
            bare_late.append(time.time() - (float(body) + CHECK_DELAY_S))
            channel.basic_ack(method.delivery_tag)

        cch.basic_consume("bench.ttl.dead", cb)
        while len(bare_late) < n and not stop.is_set():
            c.process_data_events(time_limit=0.1)
        c.close()

    consumer = threading.Thread(target=bare_consumer, daemon=True)
    consumer.start()
    publisher = make_deps(world, url).broker
    publisher.ping()  # connected before the clock starts: no burst to catch up with
    published: dict[str, float] = {}
    progress(f"4 timeout: publishing {n:,} delay messages at {rate:.0f}/s "
             f"(and {n:,} to a bare TTL queue beside them)")
    props = pika.BasicProperties(delivery_mode=2)
    start = time.perf_counter()
    for i, order in enumerate(made):
        wait = start + i / rate - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        t = time.time()
        publisher.publish_check(order.id)  # the project's confirmed publish
        published[order.id] = t
        ch.basic_publish("", "bench.ttl", repr(t).encode(), props)
    publisher.close()
    progress(f"4 timeout: waiting for the last closes (bridge VmRSS "
             f"{_vm(proc.pid, 'VmRSS'):.0f} MiB)")
    closed: dict[str, Any] = {}
    deadline = time.monotonic() + CHECK_DELAY_S + 60 + n / 50
    while time.monotonic() < deadline:
        time.sleep(1.0)
        if depth(ch, broker.QUEUE_DELAY) or depth(ch, broker.QUEUE_CHECK):
            continue
        found = statuses(list(published), ("id", "status", "close_time"))
        closed = {k: m for k, m in found.items() if m.status == "CLOSED"}
        if len(closed) == n:
            break
    consumer.join(10)
    stop.set()
    consumer.join(5)
    # in publish order (the JSON keeps when a late one was sent); pct sorts its own copy
    late_ms = [(parse_iso(closed[k].close_time).timestamp() - (t + CHECK_DELAY_S)) * 1000
               for k, t in published.items() if k in closed]
    bare_ms = [x * 1000 for x in bare_late]
    return {"n": n, "rate": rate, "closed": len(closed), "lateness_ms": late_ms,
            "bare_lateness_ms": bare_ms, "p": {q: pct(late_ms, q) for q in (50, 99, 100)},
            "b": {q: pct(bare_ms, q) for q in (50, 99, 100)}}


# --- stage 5: end to end ------------------------------------------------------------------


def stage_e2e(world: World) -> StageResult:
    from chalicelib import config

    seconds, rate = world.sizes["e2e_seconds"], world.sizes["e2e_rate"]
    n = int(seconds * rate)
    prefetch = config.load().bridge_prefetch
    res = StageResult("e2e", [])
    with vhost("e2e") as url:
        declare_project_topology(url)
        progress(f"5 e2e: seeding {n:,} orders, signing their notifies")
        made = seed_orders(n, "e2e-", 3600)
        spare = seed_orders(n, "e2e-bare-", 3600)
        bodies = signed_notifies(world, made)

        # Baseline: a bare read + confirmed publish, a bare consumer doing a bare conditional
        # update then ack, at the same pace.
        progress(f"5 e2e: baseline, bare pipeline at {rate:g}/s for {seconds:g} s")
        conn = connect(url)
        conn.channel().queue_declare("bench.e2e", durable=True)
        conn.close()
        sent: dict[str, float] = {}
        done: dict[str, float] = {}

        def on_body(body: bytes) -> None:
            oid = body.decode()
            bare_pay_update(oid)
            done[oid] = time.perf_counter()

        consumer = threading.Thread(target=bare_consume,
                                    args=(url, "bench.e2e", n, prefetch, on_body), daemon=True)
        consumer.start()
        pconn, pch = bare_confirmed_channel(url)
        start = time.perf_counter()
        for i, order in enumerate(spare):
            wait = start + i / rate - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            sent[order.id] = time.perf_counter()
            bare_read(order.id)
            bare_publish(pch, "", "bench.e2e", order.id.encode())
        consumer.join(60)
        pconn.close()
        base_ms = [(done[k] - sent[k]) * 1000 for k in sent if k in done]

        progress(f"5 e2e: notify -> PAID through the route and the bridge at {rate:g}/s")
        proj_ms = notify_to_paid(world, url, make_store(), made, bodies, rate)
        res.rows += [
            Row("5 e2e", f"notify -> PAID p50 at {rate:g}/s", pct(base_ms, 50), pct(proj_ms, 50),
                "ms"),
            Row("5 e2e", f"notify -> PAID p99 at {rate:g}/s", pct(base_ms, 99), pct(proj_ms, 99),
                "ms", "< 100 ms", pct(proj_ms, 99) < 100),
        ]
        res.data.update(n=n, rate=rate, latency_ms=proj_ms, bare_latency_ms=base_ms)
    res.notes.append("5 e2e: from the notify's arrival at the route to the bridge's won "
                     "UNPAID -> PAID write; the baseline is a bare read + confirmed publish, "
                     "a bare consumer doing the conditional update then ack, at the same pace.")
    return res


def notify_to_paid(world: World, url: str, store: Any, made: Sequence[Any],
                   bodies: Sequence[bytes], rate: float) -> list[float]:
    """Each notify posted to the route at `rate` while the bridge runs on `store` (a
    TimingStore, make_store's); ms from its arrival to the bridge's won PAID write."""
    from chalicelib import deps

    d = make_deps(world, url, store)
    deps.use(d)
    received: dict[str, float] = {}
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    try:
        with test_client(world) as client, running_bridge(d):
            d.broker.ping()
            time.sleep(0.5)
            start = time.perf_counter()
            for i, order in enumerate(made):
                wait = start + i / rate - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                received[order.id] = time.perf_counter()
                client.http.post("/alipay/notify", headers=headers, body=bodies[i])
            wait_paid(store, list(received), 60)
    finally:
        deps.use(None)
        d.broker.close()
    return [(store.paid[k] - received[k]) * 1000 for k in received]


# --- stage 6: cold start ------------------------------------------------------------------

_IMPORT_PROBE = r"""
import socket, sys, time
opened = []
_real = socket.socket.connect
def _connect(self, *a, **k):
    opened.append(repr(a))
    return _real(self, *a, **k)
socket.socket.connect = _connect
socket.socket.connect_ex = lambda self, *a, **k: opened.append(repr(a)) or 111
start = time.perf_counter()
for name in sys.argv[1].split(","):
    __import__(name)
took = time.perf_counter() - start
print(repr((took, len(opened))))
"""

DEPENDENCIES = ("chalice", "pynamodb.models", "pynamodb.connection", "pynamodb.transactions",
                "pynamodb.attributes", "pynamodb.indexes", "pika", "alipay", "jwt")


def _import_time(modules: Sequence[str]) -> tuple[float, int]:
    env = {**os.environ, "AWS_ENDPOINT_URL_DYNAMODB": "http://127.0.0.1:9"}
    done = subprocess.run([sys.executable, "-c", _IMPORT_PROBE, ",".join(modules)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=60, check=True)
    took, sockets = eval(done.stdout.strip().splitlines()[-1], {})  # noqa: S307 - our own output
    return float(took), int(sockets)


def stage_cold(world: World) -> StageResult:
    reps = world.sizes["cold_reps"]
    progress(f"6 cold: importing the dependencies alone and `app`, {reps} times each, alternating")
    base: list[float] = []
    proj: list[float] = []
    sockets = 0
    for _ in range(reps):
        base.append(_import_time(DEPENDENCIES)[0])
        took, opened = _import_time(("app",))
        proj.append(took)
        sockets += opened
    b, p = statistics.median(base), statistics.median(proj)
    res = StageResult("cold", [
        Row("6 cold", "import s, median (deps alone vs app)", b, p, "s", "<= 1.15", p / b <= 1.15),
        Row("6 cold", "sockets opened while importing app", 0, sockets, "", "0", sockets == 0),
    ])
    res.data.update(baseline_s=base, project_s=proj, sockets=sockets,
                    dependencies=list(DEPENDENCIES))
    res.notes.append("6 cold: a fresh interpreter per import (time of the imports only); "
                     f"dependencies = {', '.join(DEPENDENCIES)}; socket.connect is watched.")
    if world.sizes["zip"]:
        _zip_rows(world, res, reps)
    return res


# What each function imports when it starts and builds its dependencies.
FUNCTION_MODULES = ("app", "chalicelib.deps", "chalicelib.store", "chalicelib.broker",
                    "chalicelib.alipay_gateway", "chalicelib.webhook_http",
                    "chalicelib.archive", "chalicelib.secrets", "chalicelib.reconcile")


def _zip_rows(world: World, res: StageResult, reps: int) -> None:
    """The Lambda zip as chalice makes it (the SDK inside) against the one shipped
    (the runtime's SDK): sizes, unpacking, and the functions' imports under the
    runtime's Python, the SDK beside the code as /var/runtime is."""
    import zipfile

    from local import lambda_zip, package

    python = package.runtime_python()
    progress("6 cold: building the Lambda package (make package), whole and lean")
    whole = world.tmp / "whole.zip"
    package.build("prod", world.tmp / "package", whole_zip=whole)
    lean = world.tmp / "package" / "deployment.zip"
    unpack: dict[str, list[float]] = {"whole": [], "lean": []}
    for _ in range(reps):
        for name, path in (("whole", whole), ("lean", lean)):
            target = world.tmp / f"task-{name}"
            shutil.rmtree(target, ignore_errors=True)
            start = time.perf_counter()
            with zipfile.ZipFile(path) as z:
                z.extractall(target)
            unpack[name].append(time.perf_counter() - start)
    runtime = world.tmp / "runtime"
    runtime.mkdir(exist_ok=True)
    with zipfile.ZipFile(whole) as z:  # the SDK the whole zip holds, as the runtime's
        z.extractall(runtime, [i.filename for i in z.infolist()
                               if lambda_zip.runtime_provided(i.filename.split("/")[0])])
    imports: dict[str, list[float]] = {"whole": [], "lean": []}
    if python is not None:
        probe = ("import sys, time; sys.path[:0] = sys.argv[2].split(','); "
                 "t = time.perf_counter(); [__import__(m) for m in sys.argv[1].split(',')]; "
                 "print(time.perf_counter() - t)")
        for _ in range(reps):
            for name, path in (("whole", str(world.tmp / "task-whole")),
                               ("lean", f"{world.tmp / 'task-lean'},{runtime}")):
                done = subprocess.run([str(python), "-S", "-c", probe, ",".join(FUNCTION_MODULES),
                                       path], capture_output=True, text=True, timeout=60,
                                      check=True, env={"PATH": "/usr/bin:/bin", "STAGE": "prod"})
                imports[name].append(float(done.stdout.strip().splitlines()[-1]))
    mib = 1024 * 1024
    res.rows += [
        Row("6 cold", "Lambda zip MiB, as chalice makes it vs shipped", whole.stat().st_size / mib,
            lean.stat().st_size / mib, "MiB", f"<= {lambda_zip.BUDGET_BYTES / mib:g} MiB",
            lean.stat().st_size <= lambda_zip.BUDGET_BYTES),
        Row("6 cold", "zip unpack s, median (whole vs lean)", statistics.median(unpack["whole"]),
            statistics.median(unpack["lean"]), "s"),
    ]
    if python is not None:
        res.rows.append(Row("6 cold", f"functions' imports s under {package.LAMBDA_RUNTIME}, "
                            "median (whole vs lean + runtime SDK)",
                            statistics.median(imports["whole"]),
                            statistics.median(imports["lean"]), "s"))
    res.data.update(zip_whole_bytes=whole.stat().st_size, zip_lean_bytes=lean.stat().st_size,
                    zip_unpack_s=unpack, zip_imports_s=imports, zip_python=str(python))
    res.notes.append("6 cold: the zip rows build the package (`make package`'s build), unpack "
                     "each zip as Lambda does at a cold start, and import what the functions "
                     f"import ({', '.join(FUNCTION_MODULES)}) under the runtime's Python with "
                     "nothing else on the path: the whole zip alone, and the lean zip beside "
                     "the SDK the whole one held (in place of the runtime's /var/runtime).")


# --- stage 7: peak shaving ----------------------------------------------------------------


def stage_shave(world: World) -> StageResult:
    from chalicelib import broker, deps

    n, cap = world.sizes["shave_n"], world.sizes["shave_rate"]
    res = StageResult("shave", [])
    with vhost("shave") as url:
        declare_project_topology(url)
        progress(f"7 shave: seeding {n:,} orders, signing their notifies")
        made = seed_orders(n, "shave-", 3600)
        bodies = signed_notifies(world, made)
        d = make_deps(world, url)
        deps.use(d)
        samples: list[tuple[float, int]] = []
        stop = threading.Event()

        def watch() -> None:
            c = connect(url)
            wch = c.channel()
            while not stop.is_set():
                samples.append((time.perf_counter(), depth(wch, broker.QUEUE_PAY)))
                stop.wait(0.1)
            c.close()

        watcher = threading.Thread(target=watch, daemon=True)
        answers: dict[str, int] = {}
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        try:
            with test_client(world) as client, running_bridge(d, pay_rate=cap) as info:
                d.broker.ping()
                watcher.start()
                time.sleep(0.3)
                progress(f"7 shave: a burst of {n:,} notifies against a bridge capped at "
                         f"{cap:g}/s ({info['capped_by']})")
                start = time.perf_counter()
                for body in bodies:
                    answer = client.http.post("/alipay/notify", headers=headers,
                                              body=body).body.decode()
                    answers[answer] = answers.get(answer, 0) + 1
                burst_s = time.perf_counter() - start
                progress(f"7 shave: burst answered in {burst_s:.1f} s; draining")
                last = wait_paid(d.store, [o.id for o in made], n / cap * 3 + 60)
                time.sleep(0.3)
        finally:
            stop.set()
            watcher.join(5)
            deps.use(None)
            d.broker.close()
        conn = connect(url)
        parked = depth(conn.channel(), broker.QUEUE_PAY_PARKED)
        conn.close()
        drain_s = last - start
        peak = max((x for _, x in samples), default=0)
        final = samples[-1][1] if samples else -1
        paid = sum(1 for o in made if o.id in d.store.paid)
        ok = answers.get("success", 0)
        ideal = n / cap
        res.rows += [
            Row("7 shave", "notifies answered success", n, ok, "", "all", ok == n),
            Row("7 shave", "API answer rate during the burst vs the cap", cap, n / burst_s, "/s"),
            Row("7 shave", "peak queue depth (and back to 0)", None, peak, "", "rises, falls",
                peak > 0 and final == 0),
            Row("7 shave", "drain s: n/cap vs measured", ideal, drain_s, "s"),
            Row("7 shave", "orders PAID, none lost or parked", n, paid, "", "all",
                paid == n and parked == 0),
        ]
        res.data.update(n=n, cap=cap, capped_by=info["capped_by"], burst_s=burst_s,
                        drain_s=drain_s, peak_depth=peak, final_depth=final, parked=parked,
                        answers=answers, depth=[(round(t - start, 2), x) for t, x in samples])
    res.notes.append(
        f"7 shave: {n:,} signed notifies through the route as fast as one client sends them; "
        f"the bridge's pay queue capped at {cap:g}/s by {res.data['capped_by']}; depth sampled "
        "every 0.1 s (series in the JSON); drain time from the burst's first notify to the "
        "last order PAID.")
    return res


# --- stage 8: the day's reconciliation (local/bench_reconcile.py) -------------------------


def stage_reconcile(world: World) -> StageResult:
    from local.bench_reconcile import stage_reconcile as run  # imports this module back

    return run(world)


def stage_events(world: World) -> StageResult:
    from local.bench_events import run

    return run(world)


# --- main ---------------------------------------------------------------------------------

RUNNERS: dict[str, Callable[[World], StageResult]] = {
    "drain": stage_drain, "notify": stage_notify, "create": stage_create,
    "timeout": stage_timeout, "e2e": stage_e2e, "cold": stage_cold, "shave": stage_shave,
    "reconcile": stage_reconcile, "events": stage_events,
}


def _stage_names(given: Sequence[str]) -> list[str]:
    if not given:
        return list(STAGES)
    names = []
    for item in given:
        name = STAGES[int(item) - 1] if item.isdigit() and 1 <= int(item) <= len(STAGES) else item
        if name not in STAGES:
            raise SystemExit(f"unknown stage {item!r}: one of {', '.join(STAGES)} or "
                             f"1-{len(STAGES)}")
        names.append(name)
    return sorted(set(names), key=STAGES.index)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m local bench", description=__doc__.split(
        "\n")[0])
    parser.add_argument("stages", nargs="*",
                        help=f"{', '.join(STAGES)} or 1-{len(STAGES)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--out", default="bench-results.json", help="the JSON result file")
    parser.add_argument("--shave-rate", type=float, help="stage 7: the bridge's cap, msg/s")
    parser.add_argument("--timeout-rate", type=float,
                        help="stage 4: how fast the delay messages are published, msg/s")
    parser.add_argument("--reconcile-rows", metavar="SMALL,BIG",
                        help="stage 8's two sizes (full run: 2000,20000; its 200,000-row "
                             "day: 20000,200000, about 11 minutes)")
    args = parser.parse_args(argv)
    names = _stage_names(args.stages)
    sizes = dict(QUICK if args.quick else FULL)
    if args.shave_rate:
        sizes["shave_rate"] = args.shave_rate
    if args.timeout_rate:
        sizes["timeout_rate"] = args.timeout_rate
    if args.reconcile_rows:
        small, big = (int(x) for x in args.reconcile_rows.split(","))
        sizes["reconcile_n"] = (small, big)

    results: list[StageResult] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="shop-bench-") as tmp_name:
        tmp = Path(tmp_name)
        moto_port = _free_port()
        _prepare_environment(moto_port, tmp)
        progress(f"starting moto's DynamoDB on 127.0.0.1:{moto_port}; stages: {', '.join(names)}"
                 f"{' (quick)' if args.quick else ''}")
        moto = _start_moto(moto_port, tmp)
        try:
            from local.alipay_sandbox.keys import ensure_keys

            world = World(tmp=tmp, keys=ensure_keys(tmp / "keys"), sizes=sizes)
            from chalicelib import config
            from chalicelib.store import Store

            Store.from_settings(config.get()).create_tables()
            put_goods()
            for name in names:
                t = time.perf_counter()
                result = RUNNERS[name](world)
                result.seconds = time.perf_counter() - t
                progress(f"{name}: done in {result.seconds:.1f} s")
                results.append(result)
        finally:
            _stop(moto)

    table = render_table(results)
    notes = [n for r in results for n in r.notes]
    total = time.perf_counter() - started
    sys.stdout.write(table + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
                     + f"\n{len(names)} stage(s) in {total:.0f} s"
                     + f" on {platform.python_implementation()} {platform.python_version()},"
                     + f" {os.cpu_count()} CPUs; results in {args.out}\n")
    out = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick, "seconds": total, "cpus": os.cpu_count(),
        "python": platform.python_version(), "sizes": sizes, "table": table,
        "stages": {r.name: {"rows": [dataclasses.asdict(x) for x in r.rows], "notes": r.notes,
                            "seconds": r.seconds, "data": r.data} for r in results},
    }
    Path(args.out).write_text(json.dumps(out, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
