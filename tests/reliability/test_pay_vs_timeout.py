"""Pay against timeout: each order's payment and its check are delivered together.

Three ways the money and the timeout meet, mixed over the orders (seeded):

- notify: the cashier is open, the buyer presses Pay (the sandbox's notify becomes
  a pay message) while the check message lands in queue.order.check;
- message: the buyer paid but the notify was lost; the pay message (as the notify
  would have published it) and the check are published at the same moment;
- late link: the buyer opens an old pay link and pays while the check runs, so the
  check may close the order before the money comes (then it is refunded), close
  the trade before the buyer pays (then the cashier refuses), or see it paid.

Each order ends PAID, or CLOSED (no money), or CLOSED and then REFUNDED (the money
came); never both; the stock moves once; every queue drains.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import alipay_pay_msg
from tests.reliability.harness import SCOREBOARD, Row, Stack, audit, settle

pytestmark = pytest.mark.rabbitmq

WAYS = ("notify", "message", "late link")


@pytest.fixture
def stack(rmq_vhost: str, tables: Any, keys: dict[str, Path]) -> Iterator[Stack]:
    s = Stack(keys=keys, rmq_url=str(rmq_vhost), check_delay=600)
    s.start_bridge()
    yield s
    s.close()


def pay_message(stack: Stack, order_id: str) -> dict[str, Any]:
    """What on_notify publishes for the sandbox's (paid) trade."""
    trade = stack.trades()[order_id]
    paid_at = datetime.fromisoformat(trade["gmt_payment"].replace("Z", "+00:00"))
    return alipay_pay_msg(stack.keys, order_id, trade["trade_no"], trade["total_amount"],
                          paid_at)


def run_pay_vs_timeout(stack: Stack, n: int, name: str, seed: int) -> Row:
    started = time.monotonic()
    rng = random.Random(seed)
    row = Row(name)
    prepared: list[tuple[str, dict[str, Any], str]] = []
    for i in range(n):
        order = stack.order(f"race-{i}", {"r-tea": rng.randint(1, 3), "r-cup": 1})
        assert order is not None
        url = stack.pay_url(order)
        assert url is not None
        way = WAYS[i % len(WAYS)]
        if way == "notify":
            assert stack.open_cashier(url) == 200
        elif way == "message":
            assert stack.open_cashier(url) == 200
            assert stack.press_pay(order["id"], drop_notify=True) == 302
        prepared.append((way, order, url))
    rng.shuffle(prepared)
    barrier = threading.Barrier(2)
    pressed: dict[str, int] = {}
    published: set[str] = set()

    def pay(way: str, order: dict[str, Any], url: str, lag: float) -> None:
        barrier.wait(10)
        time.sleep(lag)
        if way == "message":
            stack.broker.publish_pay(pay_message(stack, order["id"]))
            published.add(order["id"])
        else:
            if way == "late link":
                stack.open_cashier(url)
            pressed[order["id"]] = stack.press_pay(order["id"])

    def check(order: dict[str, Any], lag: float) -> None:
        barrier.wait(10)
        time.sleep(lag)
        stack.check_now(order["id"])

    with ThreadPoolExecutor(max_workers=2) as pool:
        for way, order, url in prepared:  # each pair released together
            barrier.reset()
            # A seeded lag on either side spreads who gets there first (a check takes
            # some 50-90 ms from its publish to Alipay's answer here).
            pay_lag = rng.choice((0.0, rng.uniform(0, 0.15)))
            check_lag = rng.choice((0.0, rng.uniform(0, 0.05)))
            both = [pool.submit(pay, way, order, url, pay_lag),
                    pool.submit(check, order, check_lag)]
            for f in both:
                f.result(30)
            row.runs += 1
    # late money for orders the check closed first is refunded once it arrives
    if not settle(stack, stack.start_bridge, stack.stop_bridge, timeout=90, waiting_ok=True):
        row.lost += 1
        row.notes.append(f"queues not drained: {stack.depths()}")
    trades = stack.trades()
    money = {oid for oid, t in trades.items() if t["gmt_payment"]} | published
    audit(stack.store, stack.start_stock, stack.store.transitions, money_in=money,
          trades=trades).into(row)
    row.http_5xx = stack.http.count_5xx + stack.notify_5xx()
    outcomes: dict[str, int] = {}
    for o in stack.store.transitions:
        outcomes[o[0]] = outcomes.get(o[0], 0) + 1
    refused = sum(1 for code in pressed.values() if code != 302)
    row.notes.append(f"outcomes: {outcomes}, payments refused by a closed trade: {refused}")
    row.seconds = time.monotonic() - started
    return SCOREBOARD.record(row)


def test_pay_against_timeout(stack: Stack) -> None:
    row = run_pay_vs_timeout(stack, 30, "pay against timeout", seed=7)
    assert row.orders == 30
    row.assert_zeros()


@pytest.mark.soak
def test_pay_against_timeout_soak(stack: Stack) -> None:
    row = run_pay_vs_timeout(stack, 100, "pay against timeout (soak)", seed=11)
    assert row.orders == 100
    row.assert_zeros()
