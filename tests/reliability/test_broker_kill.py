"""RabbitMQ killed with SIGKILL and restarted while orders are in flight.

A private node of this session's own (tests/rabbit_node.py), never the
machine's shared RabbitMQ. Orders are created and paid all along, through the
outage: a delay message that could not be published is found by the bridge's
sweeper (every second here; the check delay is 4 s); a notify that could not be
published is answered `failure` and Alipay (the sandbox) sends it again; what the
broker confirmed survives the crash (durable queues, persistent messages).
Afterwards: no order lost, every order final, every queue drained.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.rabbit_node import PrivateRabbit
from tests.reliability.harness import SCOREBOARD, Row, Stack, audit, settle

pytestmark = pytest.mark.rabbitmq

WAYS = ("pay", "abandon", "lost notify")


@pytest.fixture
def stack(private_vhost: str, tables: Any, keys: dict[str, Path]) -> Iterator[Stack]:
    s = Stack(keys=keys, rmq_url=private_vhost, check_delay=4, sweep_interval=1.0,
              notify_schedule=[1, 2, 3, 4, 5, 8, 10])
    yield s
    s.close()


def run_broker_kill(stack: Stack, node: PrivateRabbit, *, n: int, kills: int, seed: int,
                    name: str) -> Row:
    started = time.monotonic()
    rng = random.Random(seed)
    row = Row(name)
    stack.start_bridge()
    created = threading.Semaphore(0)
    errors: list[BaseException] = []
    outage: list[float] = []

    def killer() -> None:
        try:
            for _kill in range(kills):
                for _ in range(n // (kills + 1)):  # kill with orders in flight
                    if not created.acquire(timeout=60):
                        raise TimeoutError("no order created for 60 s")
                node.kill()
                down = time.monotonic()
                time.sleep(rng.uniform(0.5, 2.0))
                node.start()
                outage.append(time.monotonic() - down)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    def shopper(i: int) -> None:
        way = WAYS[i % len(WAYS)]
        try:
            order = stack.order(f"crash-{i}", {"r-tea": 1 + i % 3, "r-cup": 1})
        finally:
            created.release()  # the killer counts attempts, failed ones too
        if order is None:
            return
        url = stack.pay_url(order)
        if url is None or way == "abandon":
            return
        if stack.open_cashier(url) == 200:
            stack.press_pay(order["id"], drop_notify=way == "lost notify")

    kill_thread = threading.Thread(target=killer, daemon=True)
    kill_thread.start()
    with ThreadPoolExecutor(max_workers=4) as pool:
        for f in [pool.submit(shopper, i) for i in range(n)]:
            f.result(120)
    kill_thread.join(180)
    assert not errors, errors
    row.runs = len(outage)
    if not settle(stack, stack.start_bridge, stack.stop_bridge, timeout=180):
        row.lost += 1
        row.notes.append(f"queues not drained: {stack.depths()}")
    trades = stack.trades()
    money = {oid for oid, t in trades.items() if t["gmt_payment"]} | stack.acknowledged()
    audit(stack.store, stack.start_stock, stack.store.transitions, money_in=money,
          trades=trades).into(row)
    row.http_5xx = stack.http.count_5xx + stack.notify_5xx() + stack.sandbox_http.count_5xx
    failures = sum(1 for t in trades.values() for a in t["notify_attempts"]
                   if a["answer"] == "failure")
    row.notes.append(f"outages {[round(s, 1) for s in outage]} s; {failures} notifies "
                     f"answered failure during them and were sent again")
    row.seconds = time.monotonic() - started
    return SCOREBOARD.record(row)


def test_broker_killed_with_orders_in_flight(stack: Stack, private_rabbit: PrivateRabbit
                                             ) -> None:
    row = run_broker_kill(stack, private_rabbit, n=60, kills=1, seed=5,
                          name="broker SIGKILL, 60 in flight")
    assert row.runs == 1 and row.orders == 60
    row.assert_zeros()


@pytest.mark.soak
def test_broker_killed_with_orders_in_flight_soak(stack: Stack, private_rabbit: PrivateRabbit
                                                  ) -> None:
    row = run_broker_kill(stack, private_rabbit, n=500, kills=2, seed=55,
                          name="broker SIGKILL x2, 500 in flight (soak)")
    assert row.runs == 2 and row.orders == 500
    row.assert_zeros()
