"""The bridge against the real RabbitMQ (a vhost per test) and moto's DynamoDB:
unpaid orders close after the delay and give their stock back exactly once."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pytest

from chalicelib import broker, config, handlers
from chalicelib.context import Deps
from chalicelib.domain import to_fen
from chalicelib.ports import PaymentUnavailable, RefundOutcome
from tests.conftest import FakeGateway, FakePublisher, fake_pay_msg
from tests.integration.conftest import Sandbox
from tests.rabbit_node import PrivateRabbit
from tests.waiting import wait_until

pytestmark = pytest.mark.rabbitmq

DELAY = 3  # seconds: the delay queue's TTL in these tests
PROJECT = Path(__file__).resolve().parents[2]


@pytest.fixture
def rdeps(rmq_vhost: str, app_deps: Deps) -> Iterator[Deps]:
    """The app's dependencies with a real Broker on this test's vhost."""
    settings = dataclasses.replace(config.load(), rmq_url=str(rmq_vhost),
                                   check_delay_seconds=DELAY, bridge_max_attempts=3)
    real = Broker(settings)
    d = dataclasses.replace(app_deps, settings=settings, broker=real)
    yield d
    real.close()


def Broker(settings: config.Settings) -> broker.Broker:  # noqa: N802 - a factory
    return broker.Broker(settings.rmq_url, settings.check_delay_seconds, settings.rmq_queue_type)


@pytest.fixture
def run_bridge(rdeps: Deps, bridge_threads: Callable[..., threading.Event],
               ) -> Callable[..., threading.Event]:
    """`run_bridge(deps=rdeps, **run_kwargs)`."""
    return lambda d=None, **kwargs: bridge_threads(d or rdeps, **kwargs)


def order_for(d: Deps, user: str, **cart: int) -> dict[str, Any]:
    for gid, num in (cart or {"g1": 2, "g2": 1}).items():
        d.store.set_cart_line(user, gid, num)
    return handlers.create_order(d, user)


def stock(d: Deps) -> dict[str, int]:
    return {g.id: g.stock for g in d.store.list_goods()}


def status(d: Deps, order: dict[str, Any]) -> str:
    found = d.store.get_order(order["id"])
    assert found is not None
    return found.status


def pay_msg(order: dict[str, Any], trade_no: str = "T1") -> dict[str, Any]:
    return fake_pay_msg(order["id"], trade_no, order["totalMoney"])


def check_now(d: Deps, order: dict[str, Any]) -> None:
    """A check message straight into queue.order.check, as if its delay had passed."""
    d.broker.publish(broker.EXCHANGE_DELAY, broker.QUEUE_CHECK, {"orderId": order["id"]})


def test_unpaid_order_closes_within_the_delay_and_a_paid_one_is_untouched(
    rdeps: Deps, run_bridge: Callable[..., threading.Event]
) -> None:
    before = stock(rdeps)
    run_bridge()
    unpaid = order_for(rdeps, "alice")
    created = time.monotonic()
    paid = order_for(rdeps, "bob", g1=1)
    rdeps.broker.publish_pay(pay_msg(paid))
    wait_until(lambda: status(rdeps, paid) == "PAID", 5, "paid order PAID")
    wait_until(lambda: status(rdeps, unpaid) == "CLOSED", DELAY + 3, "unpaid order CLOSED")
    took = time.monotonic() - created
    assert took <= DELAY + 1, f"closed {took:.2f} s after creation"
    assert stock(rdeps) == {**before, "g1": before["g1"] - 1}
    time.sleep(1.0)  # the paid order's check has passed by now too
    assert status(rdeps, paid) == "PAID"
    assert stock(rdeps) == {**before, "g1": before["g1"] - 1}


class RefundingGateway:
    """Alipay with no trade for the order (so a check closes it) that records refunds."""

    app_id = "app"
    seller_id = "seller"

    read_notice = FakeGateway.read_notice  # pay messages carry fake_pay_msg's notify

    def __init__(self) -> None:
        self.refunds: list[tuple[str, str]] = []

    def query_trade(self, order_id: str) -> None:
        return None  # no trade at the provider

    def refund_payment(self, order_id: str, amount: Any, request_no: str) -> RefundOutcome:
        self.refunds.append((order_id, request_no))
        return RefundOutcome(order_id=order_id, trade_no="T1", refunded_fen=to_fen(amount),
                             moved=True)


@pytest.mark.parametrize("order_of_arrival", ["pay, then check", "check, then pay", "together"])
def test_pay_and_check_each_delivered_twice_end_in_one_state(
    rdeps: Deps, run_bridge: Callable[..., threading.Event], order_of_arrival: str
) -> None:
    gateway = RefundingGateway()
    d = dataclasses.replace(rdeps, gateway=gateway)
    before = stock(d)
    orders = [order_for(d, f"u{i}", g1=1) for i in range(5)]
    run_bridge(d)

    def pays() -> None:
        for o in orders * 2:
            d.broker.publish_pay(pay_msg(o))

    def checks() -> None:
        for o in orders * 2:
            check_now(d, o)

    if order_of_arrival == "pay, then check":
        pays()
        for o in orders:
            wait_until(lambda o=o: status(d, o) == "PAID", 10, "PAID")
        checks()
    elif order_of_arrival == "check, then pay":
        checks()
        for o in orders:
            wait_until(lambda o=o: status(d, o) == "CLOSED", 10, "CLOSED")
        pays()
    else:
        pays()
        checks()
    final = ("PAID", "REFUNDED")
    for o in orders:
        wait_until(lambda o=o: status(d, o) in final, 10, f"{o['id']} final")
    wait_until(lambda: d.broker.queue_depth(broker.QUEUE_PAY) == 0
               and d.broker.queue_depth(broker.QUEUE_CHECK) == 0, 10, "queues drained")
    time.sleep(0.5)
    states = [status(d, o) for o in orders]
    if order_of_arrival == "pay, then check":
        assert states == ["PAID"] * 5
    if order_of_arrival == "check, then pay":
        assert states == ["REFUNDED"] * 5
    # stock moved once: PAID orders hold theirs, refunded ones gave it back once
    assert stock(d) == {**before, "g1": before["g1"] - states.count("PAID")}
    refunded = {o["id"] for o, s in zip(orders, states, strict=True) if s == "REFUNDED"}
    assert set(gateway.refunds) == {(i, f"REFUND_{i}") for i in refunded}
    assert d.broker.queue_depth(broker.QUEUE_PAY + ".parked") == 0


def test_bridge_killed_after_the_write_before_the_ack(rdeps: Deps, rmq_vhost: str,
                                                      sandbox: Sandbox) -> None:
    before = stock(rdeps)
    order = order_for(rdeps, "alice")
    check_now(rdeps, order)
    settings = rdeps.settings
    env = {**os.environ, "STAGE": "test", "RMQ_URL": str(rmq_vhost),
           "ORDER_CHECK_DELAY_SECONDS": str(DELAY), "GOODS_TABLE": settings.goods_table,
           "CARTS_TABLE": settings.carts_table, "ORDERS_TABLE": settings.orders_table,
           "SWEEP_INTERVAL_SECONDS": "3600", "BRIDGE_FAULT": "kill-before-ack",
           **sandbox.env()}
    crashed = subprocess.run([sys.executable, "-m", "local", "bridge"], cwd=PROJECT, env=env,
                             capture_output=True, text=True, timeout=60)
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    assert status(rdeps, order) == "CLOSED"
    assert stock(rdeps) == before
    # the message was not acked: it is back in the queue
    assert rdeps.broker.queue_depth(broker.QUEUE_CHECK) == 1
    env.pop("BRIDGE_FAULT")
    proc = subprocess.Popen([sys.executable, "-m", "local", "bridge"], cwd=PROJECT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: rdeps.broker.queue_depth(broker.QUEUE_CHECK) == 0, 20,
                   "the redelivered check consumed")
        time.sleep(0.3)
        assert status(rdeps, order) == "CLOSED"
        assert stock(rdeps) == before  # given back once, not twice
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err[-2000:]


class DownGateway:
    """Alipay that never answers: the check must retry, then park, never close blind."""

    app_id = "app"
    seller_id = "seller"
    read_notice = FakeGateway.read_notice  # verifying a notify asks nobody

    def query_trade(self, order_id: str) -> None:
        raise PaymentUnavailable("connection refused (test)")


def test_poison_messages_are_parked_and_the_rest_flows(
    rdeps: Deps, run_bridge: Callable[..., threading.Event], rmq_vhost: str
) -> None:
    stuck = order_for(rdeps, "alice", g1=1)
    good = order_for(rdeps, "bob", g1=1)
    wrong_amount = order_for(rdeps, "carol", g1=1)
    with pika.BlockingConnection(pika.URLParameters(str(rmq_vhost))) as conn:
        conn.channel().basic_publish(broker.EXCHANGE_PAY, broker.QUEUE_PAY, b"{not json",
                                     pika.BasicProperties(delivery_mode=2))
    rdeps.broker.publish_pay({**pay_msg(wrong_amount), "totalAmount": "0.01"})
    check_now(rdeps, stuck)  # fails: Alipay is down
    rdeps.broker.publish_pay(pay_msg(good))
    run_bridge(dataclasses.replace(rdeps, gateway=DownGateway()))
    wait_until(lambda: status(rdeps, good) == "PAID", 10, "the good message handled")
    wait_until(lambda: rdeps.broker.queue_depth(broker.QUEUE_CHECK + ".parked") == 1, 10,
               "the check parked after its attempts")
    assert rdeps.broker.queue_depth(broker.QUEUE_PAY + ".parked") == 2
    assert status(rdeps, stuck) == "UNPAID"  # never closed blind
    assert status(rdeps, wrong_amount) == "UNPAID"  # never marked paid
    parked = broker.list_parked(str(rmq_vhost), broker.QUEUE_CHECK)
    assert parked[0]["headers"]["x-attempts"] == 3
    assert "payment provider unreachable" in parked[0]["headers"]["x-error"]
    assert parked[0]["body"] == {"orderId": stuck["id"]}


def test_rabbitmq_restarted_while_the_bridge_runs(
    rdeps: Deps, private_rabbit: PrivateRabbit, private_vhost: str,
    run_bridge: Callable[..., threading.Event],
) -> None:
    """On a private node (tests/rabbit_node.py): the machine's RabbitMQ is never stopped.
    The check delay is long here: the consumer may take its longest backoff (10 s) to
    come back, and the orders' checks must not race their payments."""
    settings = dataclasses.replace(rdeps.settings, rmq_url=private_vhost, check_delay_seconds=120)
    d = dataclasses.replace(rdeps, settings=settings, broker=Broker(settings))
    try:
        run_bridge(d)
        first = order_for(d, "alice", g1=1)
        d.broker.publish_pay(pay_msg(first))
        wait_until(lambda: status(d, first) == "PAID", 10, "paid before the restart")
        private_rabbit.ctl("stop_app", timeout=60)
        try:
            time.sleep(2)
        finally:
            private_rabbit.ctl("start_app", timeout=120)
            private_rabbit.ctl("await_startup", timeout=120)
        after = [order_for(d, f"u{i}", g1=1) for i in range(5)]  # publisher reconnects
        for order in after:
            d.broker.publish_pay(pay_msg(order))
        for order in after:
            wait_until(lambda o=order: status(d, o) == "PAID", 40, "drained after the restart")
        assert d.broker.queue_depth(broker.QUEUE_PAY) == 0
    finally:
        d.broker.close()


def test_sweeper_closes_an_order_whose_delay_message_was_never_published(
    rdeps: Deps, run_bridge: Callable[..., threading.Event]
) -> None:
    before = stock(rdeps)
    lost = FakePublisher()
    lost.down = True
    order = order_for(dataclasses.replace(rdeps, broker=lost), "alice")
    assert rdeps.broker.queue_depth(broker.QUEUE_DELAY) == 0
    run_bridge(sweep_interval=0.5)
    wait_until(lambda: status(rdeps, order) == "CLOSED", DELAY + 5, "swept and closed")
    assert stock(rdeps) == before
