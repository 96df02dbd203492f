"""The whole steady flow under injected faults, on the local stack's fault fronts.

- DynamoDB (local/dynamodb.py's front before the session's moto): throttling,
  InternalServerError, transaction conflicts and slow calls at 10% of every call
  for the whole run, API and bridge alike;
- Alipay (the sandbox's gateway faults): every server API call slower than the
  worker's heartbeat (the bridge's connection asks for a 1 s heartbeat, Alipay
  answers after 3 s); answering 5xx; answering unsigned or wrongly signed (a lie:
  "no such trade" for a paid one, "paid" or "refunded" for what is not).

Shoppers act as a client does: a 503 is tried again a moment later (an order
lost to a 503 stays in the cart and is ordered again). Each row then switches
the faults off, lets the bridge and its sweeper settle and audits: 0 lost, 0
double, 0 invariant violations, no 5xx answer other than 503, every queue drained.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import pytest

from chalicelib.domain import PAID, Unavailable
from local.dynamodb import CONTROL_PATH
from tests.conftest import DYNAMODB_URL
from tests.reliability.harness import NO_ANSWER, SCOREBOARD, Answer, Row, Stack, audit, settle

pytestmark = pytest.mark.rabbitmq

WAYS = ("pay", "abandon", "lost notify", "cancel", "refund")
T = TypeVar("T")


def dynamodb_faults(**change: Any) -> dict[str, Any]:
    """PUT the DynamoDB front's settings, or with no argument turn its faults off;
    the front's report from before the change (what it injected)."""
    with urllib.request.urlopen(DYNAMODB_URL + CONTROL_PATH, timeout=10) as answer:
        before = dict(json.loads(answer.read()))
    data = json.dumps(change).encode() if change else None
    req = urllib.request.Request(DYNAMODB_URL + CONTROL_PATH, data=data,
                                 method="PUT" if change else "DELETE")
    urllib.request.urlopen(req, timeout=10).close()
    return before


def alipay_faults(stack: Stack, **change: Any) -> dict[str, Any]:
    """PUT the sandbox's gateway faults, or with no argument turn them off; the
    sandbox's report from before the change (what it injected)."""
    before = dict(stack.sandbox_http.request("GET", "/sandbox/faults").json())
    answer = stack.sandbox_http.request(
        "PUT" if change else "DELETE", "/sandbox/faults",
        body=json.dumps(change).encode() if change else None,
        headers={"Content-Type": "application/json"})
    assert answer.status == 200, answer.body
    return before


def make_stack(rmq_url: str, keys: dict[str, Path], **kw: Any) -> Stack:
    # a short check delay so that abandoned orders time out within the run; the
    # sweeper every second; more attempts than the default 5, as the production
    # delays (1 s, 5 s, 30 s) would give a faulty dependency the time to recover
    return Stack(keys=keys, rmq_url=rmq_url, check_delay=4, sweep_interval=1.0,
                 notify_schedule=[1, 2, 3, 4, 5, 8, 10], max_attempts=8,
                 retry_delays_ms=(100, 300, 600), **kw)


@pytest.fixture
def stack(rmq_vhost: str, tables: Any, keys: dict[str, Path]) -> Iterator[Stack]:
    s = make_stack(str(rmq_vhost), keys)
    yield s
    dynamodb_faults()
    s.close()


@pytest.fixture
def heartbeat_stack(rmq_vhost: str, tables: Any, keys: dict[str, Path]) -> Iterator[Stack]:
    """The bridge's connections with a 1 s heartbeat (RabbitMQ drops one after 2
    missed); the API's publisher as usual."""
    s = make_stack(str(rmq_vhost), keys)
    s.settings = replace(s.settings, rmq_worker_url=f"{rmq_vhost}?heartbeat=1")
    s.deps.settings = s.settings
    yield s
    s.close()


# --- a shopper who tries again after a 503 ----------------------------------------


class Shop:
    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.busy = 0  # 503 answers and store calls that were Unavailable, tried again
        self._lock = threading.Lock()

    def _again(self) -> None:
        with self._lock:
            self.busy += 1
        time.sleep(0.2)

    def store(self, call: Callable[[], T]) -> T:
        """A set-up or look-up straight on the store (through the faults, too)."""
        for _ in range(30):
            try:
                return call()
            except Unavailable:
                self._again()
        return call()

    def api(self, method: str, path: str, user: str, *, operator: bool = False,
            body: Any = None) -> Answer:
        for _ in range(15):
            if operator:
                answer = self.stack.http.admin(method, path, body=body)
            else:
                answer = self.stack.http.api(method, path, user)
            if answer.status != 503:
                return answer
            self._again()
        return answer

    def order(self, user: str, cart: dict[str, int]) -> dict[str, Any] | None:
        for _ in range(5):
            for gid, num in cart.items():
                self.store(lambda g=gid, n=num: self.stack.store.set_cart_line(user, g, n))
            answer = self.api("POST", "/orders", user)
            if answer.status == 201:
                return dict(answer.json())
            if answer.status >= 500:
                return None
        return None

    def wait_paid(self, order_id: str, timeout: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.store(lambda: self.stack.store.get_order(order_id)).status == PAID:
                return True
            time.sleep(0.2)
        return False

    def shop(self, i: int, way: str, rng: random.Random, tag: str) -> None:
        """One user's order (many users: the unpaid cap is per user), taken one way."""
        user = f"{tag}-{i}"
        order = self.order(user, {"r-tea": rng.randint(1, 3), "r-cup": 1})
        if order is None:
            return
        oid = order["id"]
        if way == "cancel":
            self.api("POST", f"/orders/{oid}/cancel", user)
            return
        answer = self.api("POST", f"/orders/{oid}/pay", user)
        if answer.status != 200 or way == "abandon":
            return
        if self.stack.open_cashier(str(answer.json()["payUrl"])) != 200:
            return
        self.stack.press_pay(oid, drop_notify=way == "lost notify")
        if way == "refund" and self.wait_paid(oid):
            self.api("POST", f"/admin/orders/{oid}/refunds", "carol", operator=True,
                     body={"amount": "1.00", "reason": "a cup arrived broken"})


# --- the run, the settling, the audit --------------------------------------------


def run_flow(stack: Stack, *, n: int, seed: int, name: str, tag: str,
             faults_on: Callable[[], None], faults_off: Callable[[], dict[str, Any]],
             workers: int = 4) -> tuple[Row, dict[str, int]]:
    started = time.monotonic()
    rng = random.Random(seed)
    row = Row(name, runs=1)
    shop = Shop(stack)
    stack.start_bridge()
    faults_on()
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(shop.shop, i, WAYS[i % len(WAYS)],
                                   random.Random(rng.random()), tag) for i in range(n)]
            for f in futures:
                f.result(300)
        # the faults stay on until the checks of the last orders are due
        time.sleep(stack.settings.check_delay_seconds + 1)
    finally:
        injected = dict(faults_off().get("injected") or {})
    try:
        drained = settle(stack, stack.start_bridge, stack.stop_bridge, timeout=60)
    except AssertionError:  # not settled in time: counted and described below
        drained = False
    if not drained:
        row.lost += 1
        row.notes.append(f"queues not drained: {stack.depths()}, unpaid {stack.unpaid()}")
    trades = stack.trades()
    money = {oid for oid, t in trades.items() if t["gmt_payment"]} | stack.acknowledged()
    audit(stack.store, stack.start_stock, stack.store.transitions, money_in=money,
          trades=trades).into(row)
    statuses = (stack.http.statuses + stack.sandbox_http.statuses
                + [a["status"] or 0 for t in trades.values() for a in t["notify_attempts"]])
    row.http_5xx = sum(1 for s in statuses if s >= 500 and s != 503)
    if NO_ANSWER in statuses:
        row.notes.append(f"{statuses.count(NO_ANSWER)} requests got no answer at all")
    answered_503 = sum(1 for s in statuses if s == 503)
    ways = ", ".join(f"{w} {len(range(i, n, len(WAYS)))}" for i, w in enumerate(WAYS))
    row.notes.append(f"injected {injected}; {answered_503} answers 503 (tried again: "
                     f"{shop.busy}); ways: {ways}")
    row.seconds = time.monotonic() - started
    return SCOREBOARD.record(row), injected


# --- DynamoDB -------------------------------------------------------------------


def run_dynamodb_faults(stack: Stack, *, n: int, seed: int, name: str,
                        ) -> tuple[Row, dict[str, int]]:
    return run_flow(
        stack, n=n, seed=seed, name=name, tag=f"ddb{seed}",
        faults_on=lambda: dynamodb_faults(rate=0.1, kinds=["throttle", "internal", "conflict",
                                                           "slow"], slow_ms=300, seed=seed),
        faults_off=lambda: dynamodb_faults(rate=0.0))


def test_dynamodb_faults_at_ten_percent_for_the_whole_run(stack: Stack) -> None:
    row, injected = run_dynamodb_faults(stack, n=40, seed=11,
                              name="DynamoDB throttling and errors at 10% of calls, 40 orders")
    assert row.orders >= 30 and injected, row.notes
    row.assert_zeros()


@pytest.mark.soak
def test_dynamodb_faults_at_ten_percent_for_the_whole_run_soak(stack: Stack) -> None:
    row, injected = run_dynamodb_faults(
        stack, n=300, seed=111,
        name="DynamoDB throttling and errors at 10% of calls, 300 orders (soak)")
    assert row.orders >= 250 and injected, row.notes
    row.assert_zeros()


# --- Alipay ---------------------------------------------------------------------


def run_alipay_faults(stack: Stack, *, n: int, seed: int, name: str, workers: int = 4,
                      **faults: Any) -> tuple[Row, dict[str, int]]:
    return run_flow(stack, n=n, seed=seed, name=name, tag=f"ali{seed}", workers=workers,
                    faults_on=lambda: alipay_faults(stack, seed=seed, **faults),
                    faults_off=lambda: alipay_faults(stack))


# A refund's notify comes while the API still waits on Alipay's slow answer to the
# refund: the notify queues the PENDING refund for the worker, which waits its
# ASK_AFTER, meanwhile the API settles it; the worker then finds the order no
# longer holding the refund and parks the message ("needs a person") without
# reading the refund again. Fix (chalicelib/refunds.py, resolve_refund): when the
# order does not hold the refund, read the refund again and return its status if
# it is no longer PENDING. Checked with that fix applied: the row is all zeros.
def test_alipay_slower_than_the_workers_heartbeat(heartbeat_stack: Stack,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="chalicelib.broker.consumer")
    row, injected = run_alipay_faults(heartbeat_stack, n=10, seed=21, workers=2,
                                      name="Alipay answering in 3 s, worker heartbeat 1 s",
                                      rate=1.0, kinds=["slow"], slow_seconds=3.0)
    lost = [r.getMessage() for r in caplog.records if "reconnecting" in r.getMessage()]
    row.notes.append(f"the bridge's connections lost {len(lost)} time(s)")
    assert row.orders >= 8 and injected, row.notes
    assert lost == [], lost  # the heartbeats kept flowing while Alipay was slow
    row.assert_zeros()


def test_alipay_answering_5xx(stack: Stack) -> None:
    row, injected = run_alipay_faults(stack, n=20, seed=31,
                                      name="Alipay answering 5xx (20% of calls)",
                                      rate=0.2, kinds=["5xx"])
    assert row.orders >= 15 and injected, row.notes
    row.assert_zeros()


def test_alipay_answering_unsigned(stack: Stack) -> None:
    row, injected = run_alipay_faults(stack, n=20, seed=41,
                            name="Alipay answering unsigned or wrongly signed (20%)",
                            rate=0.2, kinds=["unsigned", "badsign"])
    assert row.orders >= 15 and injected, row.notes
    row.assert_zeros()


@pytest.mark.soak
def test_alipay_faults_mixed_soak(stack: Stack) -> None:
    row, injected = run_alipay_faults(stack, n=150, seed=51,
                            name="Alipay slow (2 s), 5xx, unsigned at 20% (soak)",
                            rate=0.2, kinds=["slow", "5xx", "unsigned", "badsign"],
                            slow_seconds=2.0, notify_delay_seconds=1.0)
    assert row.orders >= 120 and injected, row.notes
    row.assert_zeros()
