"""Refunds and the paths where money got stuck, on the real RabbitMQ and the sandbox.

- partial refunds in a crowd: 1.00 at a time on a 10.00 order, 20 operators at
  once, again and again until every answer is a refusal: never a 5xx, exactly
  10.00 back, each request number refunded once, the order REFUNDED;
- a refund Alipay refuses (ACQ.SELLER_BALANCE_NOT_ENOUGH) is FAILED, listed in
  /admin/attention, and succeeds when retried once Alipay allows it;
- ACQ.SYSTEM_ERROR (the refund made, the answer an error) with the worker killed
  and restarted: the refund ends SUCCEEDED, made once;
- cancel, then pay through the old link with the notify lost: found once the link
  has expired, and refunded;
- no payment settings: an unpaid order is never closed blind, and a worker outside
  the local stages refuses to start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from chalicelib import handlers
from chalicelib.domain import Goods, to_fen
from tests.reliability.harness import SCOREBOARD, BridgeProcess, Row, Stack, audit, settle
from tests.waiting import wait_until

pytestmark = pytest.mark.rabbitmq

PROJECT = Path(__file__).resolve().parents[2]
TEN = Goods("r-ten", "Reliability gift card", 1000, 10_000)


@pytest.fixture
def stack(rmq_vhost: str, tables: Any, keys: dict[str, Path]) -> Iterator[Stack]:
    s = Stack(keys=keys, rmq_url=str(rmq_vhost), check_delay=600)
    s.store.put_goods(TEN)
    s.start_stock = {**s.start_stock, TEN.id: TEN.stock}
    yield s
    s.close()


def paid_order(stack: Stack, user: str, cart: dict[str, int] | None = None) -> dict[str, Any]:
    """An order paid through the cashier, its notify delivered: PAID."""
    order = stack.order(user, cart or {TEN.id: 1})
    assert order is not None
    url = stack.pay_url(order)
    assert url is not None and stack.open_cashier(url) == 200
    assert stack.press_pay(order["id"]) == 302
    wait_until(lambda: stack.store.get_order(order["id"]).status == "PAID", 20, "order PAID")
    return order


def trade(stack: Stack, order_id: str) -> dict[str, Any]:
    return stack.trades()[order_id]


def refund_fault(stack: Stack, order_id: str, code: str | None, applied: bool = False) -> None:
    path = f"/sandbox/trades/{order_id}/refund-fault"
    if code is None:
        answer = stack.sandbox_http.request("DELETE", path)
    else:
        answer = stack.sandbox_http.request(
            "PUT", path, body=json.dumps({"code": code, "applied": applied}).encode(),
            headers={"Content-Type": "application/json"})
    assert answer.status in (200, 204), answer.body


def finish(stack: Stack, row: Row, money: set[str], started: float,
           elsewhere: list[tuple[str, str]] | None = None) -> Row:
    """Settle, audit and record. `elsewhere`: transitions a worker process counted."""
    if stack._bridge is None:
        stack.start_bridge()
    try:
        drained = settle(stack, stack.start_bridge, stack.stop_bridge, timeout=60,
                         waiting_ok=True)
    except AssertionError:
        drained = False
    if not drained:
        row.lost += 1
        row.notes.append(f"queues not drained: {stack.depths()}, unpaid {stack.unpaid()}")
    trades = stack.trades()
    audit(stack.store, stack.start_stock, stack.store.transitions + (elsewhere or []),
          money_in=money, trades=trades).into(row)
    row.http_5xx += stack.http.count_5xx + stack.notify_5xx()
    row.seconds = time.monotonic() - started
    return SCOREBOARD.record(row)


def test_partial_refunds_in_a_crowd_add_up_to_what_was_paid(stack: Stack) -> None:
    started = time.monotonic()
    row = Row("refunds: 20 operators x 1.00 on 10.00")
    stack.start_bridge()
    order = paid_order(stack, "crowd")
    oid = order["id"]
    answers: list[int] = []
    refusals = 0
    rounds = 0
    with ThreadPoolExecutor(max_workers=20) as pool:
        while rounds < 30:
            rounds += 1
            batch = list(pool.map(lambda i: stack.http.admin(
                "POST", f"/admin/orders/{oid}/refunds", f"op{i}",
                {"amount": "1.00", "reason": f"crowd {i}"}), range(20)))
            answers += [a.status for a in batch]
            row.runs += len(batch)
            codes = {a.json().get("Code") for a in batch if a.status == 409}
            # nothing left: more than is left, or (all of it back) not PAID any more
            if all(a.status == 409 for a in batch) and codes <= {"RefundExceedsPaid",
                                                                 "RefundNotAllowed"}:
                refusals += 1
                break
            # a PENDING refund (202) is settled by the worker; give it the moment
            time.sleep(0.05)
    assert refusals == 1, f"still refunding after {rounds} rounds: {sorted(set(answers))}"
    assert set(answers) <= {201, 202, 409}, sorted(set(answers))
    wait_until(lambda: stack.store.get_order(oid).status == "REFUNDED", 60, "order REFUNDED")
    detail = stack.http.admin("GET", f"/admin/orders/{oid}").json()
    succeeded = [r for r in detail["refunds"] if r["status"] == "SUCCEEDED"]
    assert sum(to_fen(r["amount"]) for r in succeeded) == 1000
    assert detail["order"]["refundedMoney"] == detail["order"]["payMoney"] == "10.00"
    t = trade(stack, oid)
    assert t["refunded_amount"] == "10.00"
    requests = [r["out_request_no"] for r in t["refunds"]]
    assert len(requests) == len(set(requests)) == 10
    kinds = [e["type"] for e in detail["timeline"]]
    assert kinds.count("refund_succeeded") == 10 and "paid" in kinds
    counts = {s: answers.count(s) for s in set(answers)}
    row.notes.append(f"{rounds} rounds, answers {counts}")
    finish(stack, row, {oid}, started).assert_zeros()


def test_a_refused_refund_is_listed_and_succeeds_on_retry(stack: Stack) -> None:
    started = time.monotonic()
    row = Row("refunds: refused, then retried")
    stack.start_bridge()
    oid = paid_order(stack, "refused")["id"]
    refund_fault(stack, oid, "ACQ.SELLER_BALANCE_NOT_ENOUGH")
    first = stack.http.admin("POST", f"/admin/orders/{oid}/refunds",
                             body={"amount": "10.00", "reason": "returned"})
    assert first.status == 201, first.body
    refund = first.json()
    assert refund["status"] == "FAILED"
    assert refund["failure"]["code"] == "ACQ.SELLER_BALANCE_NOT_ENOUGH"
    listed = stack.http.admin("GET", "/admin/attention").json()
    assert [r["refundId"] for r in listed["refunds"]] == [refund["refundId"]]
    again = stack.http.admin("POST", f"/admin/refunds/{refund['refundId']}/retry")
    assert again.status == 201 and again.json()["status"] == "FAILED"  # Alipay still refuses
    refund_fault(stack, oid, None)
    done = stack.http.admin("POST", f"/admin/refunds/{refund['refundId']}/retry")
    assert done.status == 201, done.body
    assert done.json()["status"] == "SUCCEEDED"
    assert stack.http.admin("GET", "/admin/attention").json()["refunds"] == []
    assert stack.store.get_order(oid).status == "REFUNDED"
    assert trade(stack, oid)["refunded_amount"] == "10.00"
    row.runs = 3
    finish(stack, row, {oid}, started).assert_zeros()


def test_system_error_and_a_killed_worker_end_in_one_refund(stack: Stack,
                                                            tmp_path: Path) -> None:
    started = time.monotonic()
    row = Row("refunds: SYSTEM_ERROR, worker SIGKILL")
    worker = BridgeProcess(stack, tmp_path)
    worker.start(ready=True)
    try:
        oid = paid_order(stack, "syserr")["id"]
        refund_fault(stack, oid, "ACQ.SYSTEM_ERROR", applied=True)
        first = stack.http.admin("POST", f"/admin/orders/{oid}/refunds",
                                 body={"amount": "4.00", "reason": "half a card"})
        assert first.status == 202, first.body
        refund_id = first.json()["refundId"]
        assert first.json()["status"] == "PENDING"
        refund_fault(stack, oid, None)
        worker.kill()  # while the refund waits in queue.order.refund
        worker.start(ready=True)
        try:
            wait_until(lambda: stack.store.get_refund(refund_id).status == "SUCCEEDED", 90,
                       "the pending refund settled by asking")
        except AssertionError:
            print(worker.tail(6000))
            raise
    finally:
        assert worker.stop() == 0, worker.tail()
    t = trade(stack, oid)
    assert t["refunded_amount"] == "4.00"
    assert [r["out_request_no"] for r in t["refunds"]] == [refund_id]
    assert t["refund_calls"] == 1
    order = stack.store.get_order(oid)
    assert (order.status, order.refunded_fen) == ("PAID", 400)
    row.runs = 1
    finish(stack, row, {oid}, started, worker.transitions()).assert_zeros()


def test_cancel_then_pay_with_the_notify_lost_ends_refunded(stack: Stack) -> None:
    started = time.monotonic()
    row = Row("refunds: cancel, pay old link, notify lost")
    stack.deps.settings = replace(stack.deps.settings, pay_timeout_seconds=10)
    order = stack.order("late", {TEN.id: 1})
    assert order is not None
    oid = order["id"]
    url = stack.pay_url(order)  # the link, not opened yet: Alipay has no trade
    assert url is not None
    assert stack.http.api("POST", f"/orders/{oid}/cancel", "late").status == 200
    assert stack.open_cashier(url) == 200  # the buyer opens the old link ...
    assert stack.press_pay(oid, drop_notify=True) == 302  # ... pays; the notify is lost
    assert trade(stack, oid)["status"] == "TRADE_SUCCESS"
    assert stack.store.get_order(oid).status == "CLOSED"
    assert handlers.sweep(stack.deps)["rechecked"] == 0  # the link has not expired yet
    time.sleep(10.5)
    result = handlers.sweep(stack.deps)  # what the scheduled sweeper does
    assert result["rechecked"] == 1, result
    final = stack.store.get_order(oid)
    assert final.status == "REFUNDED", final
    assert trade(stack, oid)["refunded_amount"] == "10.00"
    assert stack.store.paid_but_closed() == []
    assert handlers.sweep(stack.deps)["rechecked"] == 0  # asked once
    row.runs = 1
    finish(stack, row, {oid}, started).assert_zeros()


def test_no_payment_settings_never_closes_blind(stack: Stack, tmp_path: Path) -> None:
    started = time.monotonic()
    row = Row("refunds: no gateway, never closed")
    blind = replace(stack.deps, gateway=None)
    order = stack.order("blind", {TEN.id: 1})
    assert order is not None
    before = stack.store.get_goods([TEN.id])[TEN.id].stock
    stack.check_now(order["id"])
    stack.start_bridge(blind)
    wait_until(lambda: stack.depths().get("queue.order.check.parked") == 1, 30,
               "the check parked after its attempts")
    stack.stop_bridge()
    assert stack.store.get_order(order["id"]).status == "UNPAID"
    assert stack.store.get_goods([TEN.id])[TEN.id].stock == before
    # a worker of a real stage without payment settings does not start at all
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIPAY_")}
    done = subprocess.run([sys.executable, "-m", "chalicelib.worker"], cwd=PROJECT,
                          env={**env, "STAGE": "prod", "RMQ_URL": stack.settings.rmq_url},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "ALIPAY_APP_ID" in done.stderr
    row.runs = 1
    # the parked check is replayed with payment configured: the order closes as usual
    from chalicelib import broker

    assert broker.replay_parked(stack.settings.rmq_url, broker.QUEUE_CHECK) == 1
    finish(stack, row, set(), started).assert_zeros()
    assert stack.store.get_order(order["id"]).status == "CLOSED"
