"""Alipay's notify under duplicates and replays, on the whole local stack (the API over
HTTP, the sandbox's real RSA2 signatures, the real RabbitMQ, the bridge).

- Duplicate storm: 50 identical valid notifies at once, then the same 50 again
  later: one transition, every answer `success`.
- Replays after PAID and after REFUNDED (the same notify, a re-sent one with a
  new notify_id, Alipay's TRADE_FINISHED / TRADE_CLOSED follow-ups): nothing changes.
"""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from local.alipay_sandbox.notifier import notify_params
from local.alipay_sandbox.signer import sign_params
from tests.reliability.harness import SCOREBOARD, Row, Stack, audit, wait_until

pytestmark = pytest.mark.rabbitmq

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture
def stack(rmq_vhost: str, tables: Any, keys: dict[str, Path]) -> Iterator[Stack]:
    s = Stack(keys=keys, rmq_url=str(rmq_vhost), check_delay=600)
    s.start_bridge()
    yield s
    s.close()


def signed_notify(stack: Stack, order_id: str, **changes: str) -> dict[str, str]:
    """The notify Alipay sends for this paid trade, signed with Alipay's key."""
    paid = stack.sandbox.book.paid_trade(order_id)
    assert paid is not None, f"{order_id} is not paid at the sandbox"
    params = notify_params(paid, "2026-11-26 15:20:01", stack.sandbox.alipay_private_key)
    if changes:
        params = sign_params({**params, **changes}, stack.sandbox.alipay_private_key)
    return params


def storm(stack: Stack, form: dict[str, str], n: int) -> list[str]:
    raw = urllib.parse.urlencode(form).encode()

    def send(_: int) -> str:
        answer = stack.http.request("POST", "/alipay/notify", body=raw, headers=FORM)
        return f"{answer.status} {answer.body.decode(errors='replace')}"

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(send, range(n)))


def settle(stack: Stack) -> None:
    # the delay queue holds each order's check for 10 minutes here: not due in this test
    wait_until(lambda: stack.drained(waiting_ok=True), 30, "queues drained", step=0.2)
    time.sleep(0.3)


def paid_without_notify(stack: Stack, user: str) -> dict[str, Any]:
    order = stack.order(user)
    assert order is not None
    url = stack.pay_url(order)
    assert url is not None and stack.open_cashier(url) == 200
    assert stack.press_pay(order["id"], drop_notify=True) == 302
    return order


def run_duplicate_storm(stack: Stack, orders: int, burst: int, name: str) -> Row:
    started = time.monotonic()
    row = Row(name)
    paid: list[str] = []
    for i in range(orders):
        order = paid_without_notify(stack, f"storm-{i}")
        form = signed_notify(stack, order["id"])
        for wave in range(2):  # at once, then the same again later
            answers = storm(stack, form, burst)
            row.runs += 1
            wrong = [a for a in answers if a != "200 success"]
            row.notes += [f"{order['id']} wave {wave}: answered {a!r}" for a in wrong[:3]]
            row.violations += len(wrong)
            wait_until(lambda o=order: stack.store.get_order(o["id"]).status == "PAID", 15,
                       "PAID")
            settle(stack)
        paid.append(order["id"])
    stack.stop_bridge()
    audit(stack.store, stack.start_stock, stack.store.transitions, money_in=paid,
          trades=stack.trades()).into(row)
    row.http_5xx = stack.http.count_5xx + stack.notify_5xx()
    row.seconds = time.monotonic() - started
    return SCOREBOARD.record(row)


def test_duplicate_storm(stack: Stack) -> None:
    row = run_duplicate_storm(stack, orders=1, burst=50, name="duplicate storm")
    assert row.runs == 2 and row.orders == 1
    assert stack.store.transitions == [("PAID", o) for _, o in stack.store.transitions]
    row.assert_zeros()


@pytest.mark.soak
def test_duplicate_storm_soak(stack: Stack) -> None:
    row = run_duplicate_storm(stack, orders=5, burst=50, name="duplicate storm (soak)")
    assert len(stack.store.transitions) == 5
    row.assert_zeros()


def test_notify_replays_after_paid_and_after_refunded(stack: Stack) -> None:
    started = time.monotonic()
    row = Row("notify replays")
    # PAID through the ordinary flow: the sandbox's own notify, answered success
    paid = stack.order("replay-paid")
    assert paid is not None
    url = stack.pay_url(paid)
    assert url is not None and stack.open_cashier(url) == 200
    assert stack.press_pay(paid["id"]) == 302
    wait_until(lambda: stack.store.get_order(paid["id"]).status == "PAID", 10, "PAID")
    # REFUNDED: cancelled before the cashier opened, then paid through the old link
    late = stack.order("replay-late")
    assert late is not None
    old_link = stack.pay_url(late)
    assert old_link is not None
    assert stack.http.api("POST", f"/orders/{late['id']}/cancel", "replay-late").status == 200
    assert stack.open_cashier(old_link) == 200
    assert stack.press_pay(late["id"]) == 302
    wait_until(lambda: stack.store.get_order(late["id"]).status == "REFUNDED", 10, "REFUNDED")
    settle(stack)
    before = {o["id"]: stack.store.get_order(o["id"]).to_wire() for o in (paid, late)}
    stock_before = stack.store.list_goods()
    counted = list(stack.store.transitions)
    refunds_before = {oid: t["refunds"] for oid, t in stack.trades().items()}

    for order in (paid, late):
        oid = order["id"]
        replays = [
            signed_notify(stack, oid),  # the very notify again
            signed_notify(stack, oid, notify_id="replayed-1", notify_time="2026-11-27 10:00:00"),
            signed_notify(stack, oid, trade_status="TRADE_FINISHED", notify_id="finished-1"),
            signed_notify(stack, oid, trade_status="TRADE_CLOSED", notify_id="closed-1"),
        ]
        for form in replays:
            answers = storm(stack, form, 10)
            row.runs += 1
            wrong = [a for a in answers if a != "200 success"]
            row.notes += [f"{oid} replay answered {a!r}" for a in wrong[:3]]
            row.violations += len(wrong)
        # and Alipay's own re-send, as after a lost answer
        resent = stack.sandbox_http.request("POST", f"/sandbox/notify/{oid}")
        assert resent.status == 200 and resent.json()["answer"] == "success"
        row.runs += 1
    settle(stack)
    stack.stop_bridge()
    after = {o["id"]: stack.store.get_order(o["id"]).to_wire() for o in (paid, late)}
    for oid in before:
        if after[oid] != before[oid]:
            row.violations += 1
            row.notes.append(f"{oid} changed on replay: {before[oid]} -> {after[oid]}")
    if stack.store.list_goods() != stock_before:
        row.violations += 1
        row.notes.append("stock changed on replay")
    if {oid: t["refunds"] for oid, t in stack.trades().items()} != refunds_before:
        row.double += 1
        row.notes.append("a replay moved money")
    if stack.store.transitions != counted:
        row.double += 1
        row.notes.append(f"replays won writes: {stack.store.transitions[len(counted):]}")
    audit(stack.store, stack.start_stock, stack.store.transitions,
          money_in=[paid["id"], late["id"]], trades=stack.trades()).into(row)
    row.http_5xx = stack.http.count_5xx + stack.notify_5xx()
    row.seconds = time.monotonic() - started
    SCOREBOARD.record(row)
    assert after[paid["id"]]["status"] == "PAID" and after[late["id"]]["status"] == "REFUNDED"
    row.assert_zeros()
