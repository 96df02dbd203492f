"""Forged messages on the broker, as sent by anyone holding credentials that may
publish to the exchanges (the API's own, leaked): 1,000 pay and check messages
aimed at real orders (unpaid, paid and closed) and at orders that do not exist.

The kinds: a bare pay message with no notify (the old format, or a forger's);
a notify signed with the forger's own RSA key; a genuine notify (signed by
Alipay's key, as one captured off the wire) under another order's id, or with
its amount or order changed after signing; a check long before the order's check
time. Not one may change an order, the stock or a trade at Alipay: each is parked
for a person, kept on its order's timeline and counted in /admin/attention, while
the real payments beside them still flow.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest

from chalicelib import broker
from chalicelib.domain import EventType
from local.alipay_sandbox.keys import ensure_keys
from tests.conftest import alipay_pay_msg
from tests.reliability.harness import SCOREBOARD, Row, Stack, all_orders, audit, stock
from tests.waiting import wait_until

pytestmark = pytest.mark.rabbitmq

CHECK_DELAY = 600  # the forged checks come minutes before any order's check time


@pytest.fixture
def stack(rmq_vhost: str, tables: Any, keys: dict[str, Path]) -> Iterator[Stack]:
    # The worker's real clock-skew allowance (30 s), not the harness's "check_now".
    s = Stack(keys=keys, rmq_url=str(rmq_vhost), check_delay=CHECK_DELAY, check_skew=30)
    yield s
    s.close()


@pytest.fixture(scope="module")
def forger_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An RSA pair of the forger's own: well-formed signatures Alipay never made."""
    return ensure_keys(tmp_path_factory.mktemp("forger"))


def snapshot(stack: Stack) -> dict[str, Any]:
    """Everything a forged message could change: every order, the stock, the trades."""
    return {
        "orders": {o.id: o.to_wire() for o, _ in all_orders()},
        "stock": stock(stack.store),
        "trades": {k: (t["status"], t["refunded_amount"]) for k, t in stack.trades().items()},
    }


def forgeries(stack: Stack, rng: random.Random, n: int, forger_keys: dict[str, Path],
              unpaid: list[str], paid: list[str], closed: list[str],
              ) -> tuple[list[tuple[str, bytes]], int]:
    """`n` forged messages (queue, body) and how many name an existing order."""
    known = unpaid + paid + closed
    money = {o.id: o.to_wire()["totalMoney"] for o, _ in all_orders()}
    out: list[tuple[str, bytes]] = []
    naming_known = 0
    for i in range(n):
        kind = i % 6
        target = rng.choice(known)
        if kind == 0 and i % 12 == 0:
            target = f"ORDER_1795679000000_{rng.getrandbits(64):016x}"  # no such order
        amount = money.get(target, "1.00")
        trade_no = f"2026{rng.getrandbits(48):016d}"
        if kind == 0:  # bare: no notify at all
            msg: dict[str, Any] = {"orderId": target, "tradeNo": trade_no,
                                   "totalAmount": amount}
            queue = broker.QUEUE_PAY
        elif kind == 1:  # signed, with the forger's key
            msg = alipay_pay_msg(forger_keys, target, trade_no, amount)
            queue = broker.QUEUE_PAY
        elif kind == 2:  # a genuine notify of a paid order, under another order's id
            source = rng.choice([p for p in paid if p != target])
            msg = {**alipay_pay_msg(stack.keys, source, trade_no, money[source]),
                   "orderId": target}
            queue = broker.QUEUE_PAY
        elif kind == 3:  # a genuine notify with its amount changed after signing
            msg = alipay_pay_msg(stack.keys, target, trade_no, amount)
            msg["notify"] = {**msg["notify"], "total_amount": "0.01"}
            msg["totalAmount"] = "0.01"
            queue = broker.QUEUE_PAY
        elif kind == 4:  # a genuine notify of a paid order, its out_trade_no changed
            source = rng.choice([p for p in paid if p != target])
            msg = alipay_pay_msg(stack.keys, source, trade_no, money[source])
            msg["notify"] = {**msg["notify"], "out_trade_no": target}
            msg["orderId"] = target
            queue = broker.QUEUE_PAY
        else:  # a check long before the check time of an unpaid order
            target = rng.choice(unpaid)
            msg = {"orderId": target}
            queue = broker.QUEUE_CHECK
        naming_known += target in known
        out.append((queue, json.dumps(msg).encode()))
    return out, naming_known


def publish_raw(url: str, messages: list[tuple[str, bytes]]) -> None:
    """As a forger would: straight to the exchanges, persistent, confirmed."""
    with pika.BlockingConnection(pika.URLParameters(url)) as conn:
        channel = conn.channel()
        channel.confirm_delivery()
        for queue, body in messages:
            exchange = broker.EXCHANGE_PAY if queue == broker.QUEUE_PAY else broker.EXCHANGE_DELAY
            channel.basic_publish(exchange, queue, body,
                                  pika.BasicProperties(delivery_mode=2), mandatory=True)


def pay(stack: Stack, order: dict[str, Any]) -> None:
    """The buyer's way: the payment link, the cashier, the Pay button."""
    url = stack.pay_url(order)
    assert url is not None and stack.open_cashier(url) == 200
    assert stack.press_pay(order["id"]) == 302


def run_forged(stack: Stack, forger_keys: dict[str, Path], *, n: int, seed: int,
               name: str) -> Row:
    started = time.monotonic()
    rng = random.Random(seed)
    row = Row(name, runs=1)
    stack.start_bridge()
    # Real orders in each state, spread over users (the unpaid-order cap).
    orders = [stack.order(f"forged-{i}") for i in range(12)]
    assert all(orders)
    ids = [o["id"] for o in orders if o]
    paid, closed, unpaid = ids[:4], ids[4:7], ids[7:]
    for order in orders[:4]:
        assert order is not None
        pay(stack, order)
    for order, order_id in zip(orders[4:7], closed, strict=True):
        assert order is not None
        assert stack.http.api("POST", f"/orders/{order_id}/cancel",
                              order["username"]).status == 200
    wait_until(lambda: all(stack.store.get_order(o).status == "PAID" for o in paid), 20,
               "the real payments")
    wait_until(lambda: stack.drained(waiting_ok=True), 20, "settled before the forgeries")
    before = snapshot(stack)

    # A real payment in the middle of the forgeries still goes through (no forgery
    # names it: a check for it once PAID would rightly be no forgery at all).
    late_payer = unpaid.pop()
    late_order = orders[ids.index(late_payer)]
    assert late_order is not None
    messages, naming_known = forgeries(stack, rng, n, forger_keys, unpaid, paid, closed)
    expected = {broker.QUEUE_PAY: sum(q == broker.QUEUE_PAY for q, _ in messages),
                broker.QUEUE_CHECK: sum(q == broker.QUEUE_CHECK for q, _ in messages)}
    publish_raw(stack.settings.rmq_url, messages[: n // 2])
    pay(stack, late_order)
    publish_raw(stack.settings.rmq_url, messages[n // 2:])
    wait_until(lambda: all(stack.depths()[broker.parked_queue_name(q)] == count
                           for q, count in expected.items()), 180,
               f"every forgery parked: {expected}", step=0.5)
    wait_until(lambda: stack.store.get_order(late_payer).status == "PAID", 20,
               "the real payment beside the forgeries")
    wait_until(lambda: stack.drained(parked_ok=True, waiting_ok=True), 30, "work queues empty")

    after = snapshot(stack)
    after["orders"].pop(late_payer)
    before["orders"].pop(late_payer)
    changed = [oid for oid, o in before["orders"].items() if after["orders"].get(oid) != o]
    if changed:
        row.violations += len(changed)
        row.notes.append(f"orders changed by forged messages: {changed[:5]}")
    if after["stock"] != before["stock"]:  # paying takes no stock: it was taken at creation
        row.violations += 1
        row.notes.append(f"stock moved: {before['stock']} -> {after['stock']}")
    trades_changed = [k for k, t in before["trades"].items()
                      if k != late_payer and after["trades"].get(k) != t]
    if trades_changed:
        row.violations += 1
        row.notes.append(f"trades at Alipay changed: {trades_changed[:5]}")
    recorded = sum(1 for oid in before["orders"] for e in stack.store.timeline(oid)
                   if e.type == EventType.FORGED_MESSAGE)
    if recorded != naming_known:
        row.violations += 1
        row.notes.append(f"{recorded} forged_message events for {naming_known} forgeries "
                         "naming a real order")
    attention = stack.http.admin("GET", "/admin/attention").json()["parked"]
    if any(attention.get(broker.parked_queue_name(q)) != c for q, c in expected.items()):
        row.violations += 1
        row.notes.append(f"/admin/attention shows {attention}, not {expected}")

    # A person looks, then closes what is still unpaid: every order ends final.
    for order_id in unpaid:
        user = stack.store.get_order(order_id).username
        assert stack.http.api("POST", f"/orders/{order_id}/cancel", user).status == 200
    stack.stop_bridge()
    audit(stack.store, stack.start_stock, stack.store.transitions,
          money_in=[*paid, late_payer]).into(row)
    row.http_5xx = stack.http.count_5xx
    row.notes.append(f"{n} forged messages ({expected[broker.QUEUE_PAY]} pay, "
                     f"{expected[broker.QUEUE_CHECK]} check), all parked; "
                     f"{len(changed)} orders changed")
    row.seconds = time.monotonic() - started
    return SCOREBOARD.record(row)


def test_a_thousand_forged_messages_change_no_order(stack: Stack,
                                                    forger_keys: dict[str, Path]) -> None:
    row = run_forged(stack, forger_keys, n=1000, seed=13, name="1,000 forged pay and check")
    assert row.orders >= 12
    row.assert_zeros()


@pytest.mark.soak
def test_forged_messages_soak(stack: Stack, forger_keys: dict[str, Path]) -> None:
    row = run_forged(stack, forger_keys, n=5000, seed=131, name="5,000 forged pay and check")
    row.assert_zeros()
