"""Poison messages mixed into the pay and check queues: each is parked (at once when
no retry can fix it, after the bound of attempts when it fails for a reason that
might pass), and the good messages around them flow. Replayed once the reason is
gone, a parked check settles its order."""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest

from chalicelib import broker
from chalicelib.ports import PaymentUnavailable
from tests.conftest import alipay_pay_msg
from tests.reliability.harness import SCOREBOARD, Row, Stack, audit, wait_until

pytestmark = pytest.mark.rabbitmq

MAX_ATTEMPTS = 3


class FlakyGateway:
    """The sandbox gateway, but Alipay is unreachable for the trades in `down`."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.down: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def query_trade(self, order_id: str) -> Any:
        if order_id in self.down:
            raise PaymentUnavailable(f"connection refused (test) for {order_id}")
        return self._real.query_trade(order_id)


@pytest.fixture
def stack(rmq_vhost: str, tables: Any, keys: dict[str, Path]) -> Iterator[Stack]:
    s = Stack(keys=keys, rmq_url=str(rmq_vhost), check_delay=600, max_attempts=MAX_ATTEMPTS)
    yield s
    s.close()


def raw_publish(url: str, exchange: str, key: str, bodies: list[bytes]) -> None:
    with pika.BlockingConnection(pika.URLParameters(url)) as conn:
        ch = conn.channel()
        ch.confirm_delivery()
        for body in bodies:
            ch.basic_publish(exchange, key, body, pika.BasicProperties(delivery_mode=2),
                             mandatory=True)


def run_poison(stack: Stack, *, good: int, rounds: int, seed: int, name: str) -> Row:
    started = time.monotonic()
    rng = random.Random(seed)
    row = Row(name)
    flaky = FlakyGateway(stack.gateway)
    stack.start_bridge(dataclasses.replace(stack.deps, gateway=flaky))
    url = stack.settings.rmq_url
    expected_parked = {broker.QUEUE_PAY: 0, broker.QUEUE_CHECK: 0}
    paid: list[str] = []
    stuck: list[str] = []
    for r in range(rounds):
        orders = [stack.order(f"poison-{r}-{i}") for i in range(good + 2)]
        assert all(orders)
        already_paid, wrong_amount = orders[-2], orders[-1]
        # poison for the pay queue: none of these can ever be applied
        unknown = f"ORDER_1795679000000_{rng.getrandbits(64):016x}"
        pay_poison = [
            b"{not json", b"[1, 2, 3]", b"", b"\xff\xfe\xfd", b'"a string"', b"null",
            json.dumps({"pad": "x" * (1 << 20)}).encode(),  # a 1 MB body
            json.dumps({"orderId": unknown, "tradeNo": "T", "totalAmount": "1.00"}).encode(),
            json.dumps({"orderId": "'; DROP TABLE orders; --", "tradeNo": "T"}).encode(),
            json.dumps({"orderId": wrong_amount["id"], "tradeNo": "T-wrong",
                        "totalAmount": "0.01"}).encode(),
            json.dumps({"orderId": wrong_amount["id"], "totalAmount": "1.00"}).encode(),
            json.dumps({"orderId": wrong_amount["id"], "tradeNo": "T",
                        "totalAmount": "NaN"}).encode(),
        ]
        check_poison = [b"{not json", json.dumps({"orderId": 5}).encode(), b"{}",
                        json.dumps({"orderId": "x" * 10_000}).encode()]
        # one order paid by its own trade, then a pay message of another trade for it
        stack.broker.publish_pay(alipay_pay_msg(stack.keys, already_paid["id"], "T-first",
                                                already_paid["totalMoney"]))
        wait_until(lambda o=already_paid: stack.store.get_order(o["id"]).status == "PAID", 10,
                   "paid by its first trade")
        pay_poison.append(json.dumps(alipay_pay_msg(
            stack.keys, already_paid["id"], "T-other", already_paid["totalMoney"])).encode())
        paid.append(already_paid["id"])
        # a check that fails for a reason that may pass: Alipay unreachable for it
        blocked = stack.order(f"poison-stuck-{r}")
        assert blocked is not None
        flaky.down.add(blocked["id"])
        stuck.append(blocked["id"])
        # the order the wrong payments name times out as usual
        goods_msgs: list[tuple[str, bytes]] = [
            (broker.QUEUE_CHECK, json.dumps({"orderId": wrong_amount["id"]}).encode())]
        for i, order in enumerate(orders[:good]):
            if i % 2 == 0:  # paid (the notify lost; the pay message as it would say)
                goods_msgs.append((broker.QUEUE_PAY, json.dumps(alipay_pay_msg(
                    stack.keys, order["id"], f"T-{order['id'][-8:]}",
                    order["totalMoney"])).encode()))
                paid.append(order["id"])
            else:  # timed out
                goods_msgs.append((broker.QUEUE_CHECK, json.dumps(
                    {"orderId": order["id"]}).encode()))
        mixed = ([(broker.QUEUE_PAY, b) for b in pay_poison]
                 + [(broker.QUEUE_CHECK, b) for b in check_poison]
                 + [(broker.QUEUE_CHECK, json.dumps({"orderId": blocked["id"]}).encode())]
                 + goods_msgs)
        rng.shuffle(mixed)
        for queue, body in mixed:
            exchange = broker.EXCHANGE_PAY if queue == broker.QUEUE_PAY else broker.EXCHANGE_DELAY
            raw_publish(url, exchange, queue, [body])
        expected_parked[broker.QUEUE_PAY] += len(pay_poison)
        expected_parked[broker.QUEUE_CHECK] += len(check_poison) + 1
        row.runs += 1
    # a good order is never held up behind the poison
    wait_until(lambda: stack.store.get_order(paid[-1]).status == "PAID", 20, "the rest flows")
    wait_until(lambda: all(stack.depths()[broker.parked_queue_name(q)] == n
                           for q, n in expected_parked.items()), 30,
               f"parked: {expected_parked}", step=0.2)
    wait_until(lambda: stack.drained(parked_ok=True, waiting_ok=True), 20, "the rest drained")
    parked = broker.list_parked(url, broker.QUEUE_CHECK)
    attempts = [p["headers"].get("x-attempts") for p in parked
                if isinstance(p["body"], dict) and p["body"].get("orderId") in stuck]
    if attempts != [MAX_ATTEMPTS] * len(stuck):
        row.violations += 1
        row.notes.append(f"stuck checks parked after {attempts} attempts, not {MAX_ATTEMPTS}")
    if any(stack.store.get_order(o).status != "UNPAID" for o in stuck):
        row.violations += 1
        row.notes.append("an order was closed blind while Alipay was unreachable")
    # Alipay is back: a person replays the parked checks; the stuck orders settle
    flaky.down.clear()
    broker.replay_parked(url, broker.QUEUE_CHECK)
    wait_until(lambda: all(stack.store.get_order(o).status == "CLOSED" for o in stuck), 20,
               "replayed checks settle their orders")
    wait_until(lambda: stack.depths()[broker.QUEUE_CHECK_PARKED]
               == expected_parked[broker.QUEUE_CHECK] - len(stuck), 20,
               "the garbage parks again, the rest is gone")
    wait_until(lambda: stack.drained(parked_ok=True, waiting_ok=True), 20, "drained")
    stack.stop_bridge()
    audit(stack.store, stack.start_stock, stack.store.transitions, money_in=paid).into(row)
    row.http_5xx = stack.http.count_5xx
    row.notes.append(f"parked {expected_parked} poison messages")
    row.seconds = time.monotonic() - started
    return SCOREBOARD.record(row)


def test_poison_messages_are_parked_and_the_rest_flows(stack: Stack) -> None:
    row = run_poison(stack, good=10, rounds=1, seed=3, name="poison messages")
    assert row.runs == 1 and row.orders > 10  # the good ones and the poisoned ones
    row.assert_zeros()


@pytest.mark.soak
def test_poison_messages_soak(stack: Stack) -> None:
    row = run_poison(stack, good=30, rounds=5, seed=33, name="poison messages (soak)")
    assert row.runs == 5 and row.orders > 30
    row.assert_zeros()
