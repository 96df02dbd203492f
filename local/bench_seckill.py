"""`python -m local bench seckill`: a flash-sale burst, measured, on its own stack.

Self-contained: it starts moto's DynamoDB (local/dynamodb.py, a child process on
a free port) and makes a RabbitMQ vhost of its own (`rabbitmqctl`; or give
`--rmq-url`), runs the bridge in a thread with the seckill queue paced at
`--rate` (default SECKILL_ORDERS_PER_SECOND), and bursts `--requests` requests
from `--users` users (every user once, the rest drawn at random: many twice)
at a sale of `--stock`. The requests go through the real routes in-process
(Chalice's test client, `--concurrency` in flight, no HTTP): the answer times
are the API's own, without a network.

`--shards N` splits the sale's stock over N items (README "Past one machine"):
the drain takes each unit from the user's own shard first, then the others.

Prints requests, accepted, orders, duplicates refused, the peak queue depth,
the drain time, the API's p50/p99, the write rate against its cap, and each
shard's orders, stock left and lowest stock seen; checks exactly `--stock`
orders, none twice for a user, every shard 0 and never below, each shard's
orders its share. Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

log = logging.getLogger("local.bench_seckill")

SALE = "bench-flash"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else 0.0


def _max_in_window(times: list[float], window: float = 1.0) -> int:
    """The most events in any half-open window [t, t + window)."""
    times = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] < t - window + 1e-9 and j < i:
            j += 1
        best = max(best, i - j + 1)
    return best


def _rabbitmqctl(*args: str) -> None:
    done = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=60,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stderr.strip() or done.stdout}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m local bench seckill")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--stock", type=int, default=50)
    parser.add_argument("--shards", type=int, default=1,
                        help="stock items the sale's stock is split over (1: one item)")
    parser.add_argument("--rate", type=float, default=None,
                        help="the drain's cap, orders a second (SECKILL_ORDERS_PER_SECOND)")
    parser.add_argument("--max-depth", type=int, default=None,
                        help="SECKILL_MAX_QUEUE_DEPTH (the 429 bound)")
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--rmq-url", default=None,
                        help="a vhost to use instead of making one with rabbitmqctl")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds to wait for the drain")
    args = parser.parse_args(argv)
    if args.users < 1 or args.requests < args.users or args.stock < 0:
        parser.error("need requests >= users >= 1 and stock >= 0")
    if not 1 <= args.shards <= 99:
        parser.error("need 1 <= shards <= 99")
    if "chalicelib.store" in sys.modules:
        parser.error("run it in a fresh process: the store reads its tables at import")

    py = sys.executable
    port = _free_port()
    moto = subprocess.Popen([py, "-m", "local", "dynamodb", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    vhost = None
    try:
        from local.stack import wait_for_port

        wait_for_port(port, proc=moto)
        rmq_url = args.rmq_url
        if rmq_url is None:
            vhost = f"bench-seckill-{uuid.uuid4().hex[:8]}"
            _rabbitmqctl("add_vhost", vhost)
            _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
            rmq_url = f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
        # Before anything of the app is imported: settings are read once.
        os.environ.update({
            "STAGE": "bench", "TABLE_PREFIX": "shop-bench",
            "AWS_ENDPOINT_URL_DYNAMODB": f"http://127.0.0.1:{port}",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench", "RMQ_URL": rmq_url,
            "JWT_SECRET": os.environ.get("JWT_SECRET") or "bench-secret-0123456789abcdef0123456789",
        })
        for name in ("GOODS_TABLE", "CARTS_TABLE", "ORDERS_TABLE", "SALES_TABLE",
                     "SECKILL_TABLE", "ALIPAY_APP_ID"):
            os.environ.pop(name, None)
        if args.rate is not None:
            os.environ["SECKILL_ORDERS_PER_SECOND"] = str(args.rate)
        if args.max_depth is not None:
            os.environ["SECKILL_MAX_QUEUE_DEPTH"] = str(args.max_depth)
        return _run(args)
    except (RuntimeError, TimeoutError) as exc:
        sys.stderr.write(f"bench seckill: {exc}\n")
        return 1
    finally:
        if vhost is not None:
            subprocess.run(["rabbitmqctl", "delete_vhost", vhost], capture_output=True,
                           timeout=60, check=False)
        moto.terminate()
        try:
            moto.wait(10)
        except subprocess.TimeoutExpired:
            moto.kill()


def _run(args: argparse.Namespace) -> int:
    from chalice.test import Client

    from app import app
    from chalicelib import auth, broker, config, deps
    from chalicelib.context import Deps
    from chalicelib.domain import TICKET_FINAL, Goods, Sale, parse_iso
    from chalicelib.store import Store
    from local.bench_models import models

    M = models()
    from chalicelib import worker

    for noisy in ("pika", "urllib3", "botocore", "chalicelib", "chalicelib.worker", "shop-pay"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    settings = config.load()
    cap = settings.seckill_orders_per_second
    store = Store.from_settings(config.get())
    store.create_tables()
    store.put_goods(Goods("teapot", "Yixing clay teapot", 5990, 50))
    now = datetime.now(UTC)
    store.put_sale(Sale(SALE, "teapot", "Yixing clay teapot, flash sale", 990, args.stock,
                        now - timedelta(minutes=1), now + timedelta(hours=1)),
                   shards=args.shards)
    found = store.sale_shard_stocks(SALE, consistent=True)
    assert found is not None
    shares = list(found[1])  # each shard's units at the start
    stock_items = store.sale_stock_items(SALE, consistent=True)
    assert stock_items is not None
    items = stock_items[1]  # the ids the orders' sale_id name
    api_broker = broker.Broker(settings.rmq_url, settings.check_delay_seconds,
                               settings.rmq_queue_type)
    d = Deps(settings=settings, store=store, broker=api_broker)
    deps.use(d)
    api_broker.ping()  # declares the topology

    users = [f"user{i:05d}" for i in range(args.users)]
    rng = random.Random(1)
    requests = users + rng.choices(users, k=args.requests - args.users)
    rng.shuffle(requests)
    tokens = {u: auth.issue(settings.jwt_secret, u, 3600) for u in users}

    stop = threading.Event()
    drain = threading.Thread(target=worker.run, args=(d, stop), daemon=True,
                             kwargs={"sweep_interval": 3600})
    depths: list[int] = []
    stocks: list[list[int]] = []  # each shard's stock, every 0.1 s
    sampling = threading.Event()

    def sample() -> None:
        probe = broker.Broker(settings.rmq_url, settings.check_delay_seconds,
                              settings.rmq_queue_type)
        try:
            while not sampling.wait(0.02):
                depths.append(probe.queue_depth(broker.QUEUE_SECKILL))
        finally:
            probe.close()

    def watch_stock() -> None:
        while not sampling.wait(0.1):
            seen = store.sale_shard_stocks(SALE, consistent=True)
            if seen is not None:
                stocks.append(list(seen[1]))

    samplers = [threading.Thread(target=sample, daemon=True),
                threading.Thread(target=watch_stock, daemon=True)]
    for t in samplers:
        t.start()
    drain.start()

    def one(client: Any, user: str) -> tuple[str, int, float, dict[str, Any]]:
        start = time.perf_counter()
        r = client.http.post(f"/seckill/{SALE}",
                             headers={"Authorization": f"Bearer {tokens[user]}"})
        took = time.perf_counter() - start
        import json

        return user, r.status_code, took, json.loads(r.body)

    with Client(app, stage_name="bench") as client:
        started = time.time()
        with ThreadPoolExecutor(args.concurrency) as pool:
            answers = list(pool.map(lambda u: one(client, u), requests))
        burst_s = time.time() - started

        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            if api_broker.queue_depth(broker.QUEUE_SECKILL) == 0:
                tickets = [t for t in M.Ticket.scan() if t.id.startswith("TICKET_")]
                if all(t.status in TICKET_FINAL for t in tickets):
                    break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"the drain did not finish within {args.timeout:.0f} s")
    sampling.set()
    for t in samplers:
        t.join(5)
    stop.set()
    drain.join(15)
    api_broker.close()

    statuses = Counter(status for _, status, _, _ in answers)
    codes = Counter(data.get("Code") for _, status, _, data in answers if status == 409)
    latencies = [took for _, _, took, _ in answers]
    outcome = Counter(t.status for t in tickets)
    orders = list(M.Order.scan())
    order_times = [parse_iso(o.create_time).timestamp() for o in orders]
    decided = [parse_iso(t.update_time).timestamp() for t in tickets]
    drain_s = (max(decided) - started) if decided else 0.0
    left = store.sale_shard_stocks(SALE, consistent=True)
    final = list(left[1]) if left else [-1]
    lowest = [min([s[k] for s in stocks] + [final[k]]) for k in range(len(final))]
    per_user = Counter(o.username for o in orders)
    per_item = Counter(o.sale_id for o in orders)
    taken = [per_item[item] for item in items]
    item_peak = max((_max_in_window([parse_iso(o.create_time).timestamp() for o in orders
                                     if o.sale_id == item]) for item in items), default=0)

    def rate(times: list[float]) -> str:
        if len(times) < 2:
            return f"{len(times)} in total"
        span = max(times) - min(times)
        mean = (len(times) - 1) / span if span else float("inf")
        peak = _max_in_window(times)
        note = "" if peak >= cap else "; below it: moto serves one request at a time"
        return (f"max {peak} in any 1 s, mean {mean:.1f}/s over {span:.2f} s"
                f" (cap {cap:g}/s{note})")

    lines = [
        ("requests", f"{len(answers)} from {len(users)} users in {burst_s:.2f} s "
                     f"({len(answers) / burst_s:.0f}/s, {args.concurrency} in flight)"),
        ("answers", ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items()))),
        ("accepted", f"{statuses[202]} tickets (202)"),
        ("orders", f"{len(orders)} (stock {args.stock})"),
        ("duplicates refused", f"{codes['AlreadyHolding']} at the API (409 AlreadyHolding), "
                               f"{outcome['DUPLICATE']} by the transaction (DUPLICATE)"),
        ("sold out", f"{codes['SoldOut']} at the API (409 SoldOut), "
                     f"{outcome['SOLD_OUT']} tickets SOLD_OUT"),
        ("back-pressure", f"{statuses[429]} answered 429 "
                          f"(bound {settings.seckill_max_queue_depth})"),
        ("peak queue depth", f"{max(depths, default=0)} (sampled every 20 ms; "
                             f"last {depths[-1] if depths else 0})"),
        ("drain time", f"{drain_s:.2f} s from the burst's start to the last ticket decided"),
        ("API answer time", f"p50 {_percentile(latencies, 50) * 1000:.1f} ms, "
                            f"p99 {_percentile(latencies, 99) * 1000:.1f} ms, "
                            f"max {max(latencies) * 1000:.1f} ms (in-process, no HTTP)"),
        ("order writes", rate(order_times)),
        ("ticket decisions", rate(decided)),
        ("stock shards", f"{len(items)}: orders {taken} of {shares}, stock left {final}, "
                         f"lowest seen {lowest} ({len(stocks)} samples)"),
        ("writes per stock item", f"max {item_peak} in any 1 s on one item "
                                  f"(all items: {_max_in_window(order_times)})"),
    ]
    checks = {
        f"exactly {args.stock} orders": len(orders) == args.stock,
        "no user has two orders": all(n == 1 for n in per_user.values()),
        "every ticket final": all(t.status in TICKET_FINAL for t in tickets),
        "every shard's stock 0, never below": final == [0] * len(items) and min(lowest) >= 0,
        "each shard's orders its units": taken == shares and sum(per_item.values()) == len(orders),
        "answers only 202, 409, 429": set(statuses) <= {202, 409, 429},
        "ticket decisions within the cap": _max_in_window(decided) <= cap + 1,
    }
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        sys.stdout.write(f"{key:<{width}}  {value}\n")
    for name, ok in checks.items():
        sys.stdout.write(f"{'ok' if ok else 'FAILED':<{width}}  {name}\n")
    return 0 if all(checks.values()) else 1
