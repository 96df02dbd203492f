"""chalicelib.broker against the real RabbitMQ, each test in its own vhost.

pika is used here only to look at the broker independently of the code under
test (raw gets, raw publishes of bodies the adapter would never send).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, TypeVar

import pika
import pytest
from pika.adapters.blocking_connection import BlockingChannel

from chalicelib import broker as b
from tests.integration.conftest import RabbitURL, rabbitmqctl

pytestmark = pytest.mark.rabbitmq

CHECK_DELAY_S = 60
PAY_MSG = {
    "orderId": "ORDER_1",
    "tradeNo": "2024T1",
    "totalAmount": "99.70",
    "payTime": "2024-01-01T00:00:00Z",
    "notifyId": "n1",
}

T = TypeVar("T")


# --- helpers ------------------------------------------------------------------------


def wait_for(probe: Callable[[], T], timeout: float = 5.0, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


@contextmanager
def raw_channel(url: str) -> Iterator[BlockingChannel]:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        yield connection.channel()
    finally:
        if connection.is_open:
            connection.close()


def queue_rows(vhost: str) -> dict[str, dict[str, Any]]:
    out = rabbitmqctl(
        "-q", "list_queues", "-p", vhost, "name", "durable", "type", "arguments",
        "messages_ready", "messages_unacknowledged", "--formatter", "json",
    )  # fmt: skip
    rows = json.loads(out)
    for row in rows:
        row["arguments"] = {name: value for name, _type, value in row["arguments"]}
    return {row["name"]: row for row in rows}


@pytest.fixture
def broker(rmq_vhost: RabbitURL) -> Iterator[b.Broker]:
    publisher = b.Broker(rmq_vhost, check_delay_seconds=CHECK_DELAY_S)
    yield publisher
    publisher.close()


class Consumer:
    """run_consumer in a thread; stopped and joined on exit, its exception re-raised."""

    def __init__(self, url: str, handlers: dict[str, Callable[[dict], None]], **kw: Any) -> None:
        self.stop = threading.Event()
        self.error: BaseException | None = None
        kw.setdefault("check_delay_seconds", CHECK_DELAY_S)
        kw.setdefault("retry_delays_ms", (100, 200))

        def target() -> None:
            try:
                b.run_consumer(url, handlers, stop=self.stop, **kw)
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                self.error = exc

        self.thread = threading.Thread(target=target, name="run_consumer", daemon=True)

    def __enter__(self) -> Consumer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)  # a handler in hand is finished first
        assert not self.thread.is_alive(), "run_consumer did not return after stop"
        if self.error is not None:
            raise self.error


# --- topology ------------------------------------------------------------------------


def test_topology_declared_twice_has_the_contracts_arguments(rmq_vhost: RabbitURL) -> None:
    with raw_channel(rmq_vhost) as channel:
        b.declare_topology(channel, 2_100_000)
        b.declare_topology(channel, 2_100_000)  # idempotent
        assert channel.is_open

    queues = queue_rows(rmq_vhost.vhost)
    assert queues[b.QUEUE_DELAY]["arguments"] == {
        "x-message-ttl": 2_100_000,
        "x-dead-letter-exchange": "exchange.order.delay",
        "x-dead-letter-routing-key": "queue.order.check",
    }
    for name in ("queue.order.check", "queue.order.pay", "queue.order.seckill"):
        assert queues[name]["arguments"] == {}
        assert queues[name + ".parked"]["durable"] is True
        assert queues[f"{name}.retry.1000ms"]["arguments"] == {
            "x-message-ttl": 1000,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": name,
        }
    assert all(row["durable"] is True and row["type"] == "classic" for row in queues.values())

    bindings = json.loads(rabbitmqctl(
        "-q", "list_bindings", "-p", rmq_vhost.vhost, "source_name", "destination_name",
        "routing_key", "--formatter", "json",
    ))  # fmt: skip
    found = {(x["source_name"], x["destination_name"], x["routing_key"]) for x in bindings}
    assert {
        ("exchange.order.delay", "queue.order.delay", "queue.order.delay"),
        ("exchange.order.delay", "queue.order.check", "queue.order.check"),
        ("exchange.order.pay", "queue.order.pay", "queue.order.pay"),
        ("exchange.order.seckill", "queue.order.seckill", "queue.order.seckill"),
    } <= found
    exchanges = json.loads(rabbitmqctl(
        "-q", "list_exchanges", "-p", rmq_vhost.vhost, "name", "type", "durable",
        "--formatter", "json",
    ))  # fmt: skip
    kinds = {x["name"]: (x["type"], x["durable"]) for x in exchanges}
    for name in ("exchange.order.delay", "exchange.order.pay", "exchange.order.seckill"):
        assert kinds[name] == ("direct", True)


def test_quorum_topology(rmq_vhost: RabbitURL) -> None:
    with raw_channel(rmq_vhost) as channel:
        b.declare_topology(channel, 5000, "quorum", retry_delays_ms=(100,))
        b.declare_topology(channel, 5000, "quorum", retry_delays_ms=(100,))

    queues = queue_rows(rmq_vhost.vhost)
    assert queues[b.QUEUE_DELAY]["type"] == "quorum"
    assert queues[b.QUEUE_DELAY]["arguments"] == {
        "x-queue-type": "quorum",
        "x-message-ttl": 5000,
        "x-dead-letter-exchange": "exchange.order.delay",
        "x-dead-letter-routing-key": "queue.order.check",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    assert queues[b.QUEUE_PAY]["arguments"] == {"x-queue-type": "quorum"}
    assert queues[b.QUEUE_PAY_PARKED]["type"] == "quorum"


def test_another_ttl_raises_topology_mismatch_naming_the_queue(rmq_vhost: RabbitURL) -> None:
    with raw_channel(rmq_vhost) as channel:
        b.declare_topology(channel, 2_100_000)
        with pytest.raises(b.TopologyMismatch) as caught:
            b.declare_topology(channel, 5000)
        assert not channel.is_open  # RabbitMQ closed it (406); the connection survives
        again = channel.connection.channel()
        assert again.queue_declare(b.QUEUE_DELAY, passive=True).method.message_count == 0

    text = str(caught.value)
    assert "queue.order.delay" in text
    assert "x-message-ttl is 2100000 on the broker, 5000 wanted" in text
    assert f"rabbitmqctl delete_queue -p {rmq_vhost.vhost} queue.order.delay" in text
    assert "ORDER_CHECK_DELAY_SECONDS back to the old value, 2100" in text

    publisher = b.Broker(rmq_vhost, check_delay_seconds=5)
    try:
        with pytest.raises(b.TopologyMismatch, match="queue.order.delay"):
            publisher.publish_check("ORDER_X")
    finally:
        publisher.close()


# --- publishing ------------------------------------------------------------------------


def test_publish_check_reaches_the_check_queue_after_the_delay(rmq_vhost: RabbitURL) -> None:
    publisher = b.Broker(rmq_vhost, check_delay_seconds=1)
    try:
        started = time.monotonic()
        publisher.publish_check("ORDER_1")
        assert publisher.queue_depth(b.QUEUE_DELAY) == 1
        assert publisher.queue_depth(b.QUEUE_CHECK) == 0

        with raw_channel(rmq_vhost) as channel:
            method, properties, body = wait_for(
                lambda: (got := channel.basic_get(b.QUEUE_CHECK, auto_ack=True))[0] and got,
                timeout=5,
                what="the dead-lettered check message",
            )
        waited = time.monotonic() - started
        assert 0.9 <= waited < 4, waited
        assert json.loads(body) == {"orderId": "ORDER_1"}
        assert properties.content_type == "application/json"
        assert properties.delivery_mode == 2
        assert properties.headers["x-death"][0]["queue"] == "queue.order.delay"
        assert properties.headers["x-death"][0]["reason"] == "expired"
        assert publisher.queue_depth(b.QUEUE_DELAY) == 0
    finally:
        publisher.close()


def test_nothing_connects_before_use_and_a_dead_broker_fails_fast() -> None:
    dead = b.Broker("amqp://guest:guest@127.0.0.1:1/%2F", check_delay_seconds=CHECK_DELAY_S)
    assert dead._connection is None
    started = time.monotonic()
    with pytest.raises(b.BrokerUnavailable, match="cannot connect"):
        dead.publish_pay(PAY_MSG)
    with pytest.raises(b.BrokerUnavailable):
        dead.ping()
    assert time.monotonic() - started < 5


def test_unroutable_publish_raises(broker: b.Broker) -> None:
    with pytest.raises(b.Unroutable, match="no.such.key"):
        broker.publish(b.EXCHANGE_PAY, "no.such.key", PAY_MSG)
    broker.publish_pay(PAY_MSG)  # and the broker is still usable
    broker.ping()
    assert broker.queue_depth(b.QUEUE_PAY) == 1


def test_publish_survives_the_connection_being_closed(
    rmq_vhost: RabbitURL, broker: b.Broker
) -> None:
    broker.publish_pay(PAY_MSG)
    first = broker._connection
    rabbitmqctl("close_all_connections", "-p", rmq_vhost.vhost, "test: closed underneath")
    time.sleep(0.2)
    broker.publish_pay({**PAY_MSG, "notifyId": "n2"})  # reconnects once
    second = broker._connection
    assert second is not None and second is not first and second.is_open

    second.close()  # closed on our side this time
    broker.publish_pay({**PAY_MSG, "notifyId": "n3"})
    assert broker._connection is not second

    with raw_channel(rmq_vhost) as channel:
        notify_ids = []
        while (got := channel.basic_get(b.QUEUE_PAY, auto_ack=True))[0]:
            notify_ids.append(json.loads(got[2])["notifyId"])
    assert notify_ids == ["n1", "n2", "n3"]


def test_publish_is_thread_safe(broker: b.Broker) -> None:
    def publish_many(worker: int) -> None:
        for n in range(20):
            broker.publish_pay({**PAY_MSG, "notifyId": f"{worker}-{n}"})

    threads = [threading.Thread(target=publish_many, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert broker.queue_depth(b.QUEUE_PAY) == 160


# --- the consumer ------------------------------------------------------------------------


def test_handler_gets_the_message_and_it_is_acked_only_after_it_returned(
    rmq_vhost: RabbitURL, broker: b.Broker
) -> None:
    inside, release = threading.Event(), threading.Event()
    received: list[dict] = []

    def on_pay(message: dict) -> None:
        received.append(message)
        inside.set()
        release.wait(10)

    with Consumer(rmq_vhost, {b.QUEUE_PAY: on_pay}):
        broker.publish_pay(PAY_MSG)
        assert inside.wait(5)
        row = queue_rows(rmq_vhost.vhost)[b.QUEUE_PAY]
        assert (row["messages_ready"], row["messages_unacknowledged"]) == (0, 1)
        release.set()
        wait_for(
            lambda: queue_rows(rmq_vhost.vhost)[b.QUEUE_PAY]["messages_unacknowledged"] == 0,
            what="the ack",
        )
    assert received == [PAY_MSG]
    assert broker.queue_depth(b.QUEUE_PAY) == 0  # acked, not given back when we left


def test_failing_handler_parks_after_max_attempts_without_blocking_the_queue(
    rmq_vhost: RabbitURL, broker: b.Broker
) -> None:
    calls: list[str] = []
    poison = {"orderId": "POISON"}
    good = {"orderId": "GOOD"}

    def on_pay(message: dict) -> None:
        calls.append(message["orderId"])
        if message["orderId"] == "POISON":
            raise RuntimeError("boom: the store is down")

    with Consumer(rmq_vhost, {b.QUEUE_PAY: on_pay}, max_attempts=3, retry_delays_ms=(100, 200)):
        broker.publish_pay(poison)
        broker.publish_pay(good)
        wait_for(lambda: broker.queue_depth(b.QUEUE_PAY_PARKED) == 1, what="the park")

    assert calls.count("POISON") == 3
    assert calls.count("GOOD") == 1
    # The good message was handled while the poison one waited in a retry queue.
    assert calls.index("GOOD") < len(calls) - 1 - calls[::-1].index("POISON")

    [parked] = b.list_parked(rmq_vhost, b.QUEUE_PAY)
    assert parked["body"] == poison
    headers = parked["headers"]
    assert headers["x-error"] == "RuntimeError: boom: the store is down"
    assert headers["x-attempts"] == 3
    assert headers["x-original-queue"] == b.QUEUE_PAY
    assert datetime.fromisoformat(headers["x-parked-at"]).year >= 2024
    rows = queue_rows(rmq_vhost.vhost)
    for name in (b.QUEUE_PAY, "queue.order.pay.retry.100ms", "queue.order.pay.retry.200ms"):
        assert rows[name]["messages_ready"] + rows[name]["messages_unacknowledged"] == 0


def test_body_that_is_not_a_json_object_is_parked_at_once(
    rmq_vhost: RabbitURL, broker: b.Broker
) -> None:
    received: list[dict] = []
    broker.ping()  # declares the topology
    with raw_channel(rmq_vhost) as channel:
        for body in (b"not json {", b"[1, 2]", b"\xff\xfe"):
            channel.basic_publish(b.EXCHANGE_PAY, b.QUEUE_PAY, body)

    with Consumer(rmq_vhost, {b.QUEUE_PAY: received.append}, max_attempts=5):
        broker.publish_pay(PAY_MSG)
        wait_for(lambda: broker.queue_depth(b.QUEUE_PAY_PARKED) == 3, what="three parks")
        wait_for(lambda: received, what="the good message")

    assert received == [PAY_MSG]
    parked = b.list_parked(rmq_vhost, b.QUEUE_PAY)
    assert [p["body"] for p in parked] == ["not json {", [1, 2], "\ufffd\ufffd"]
    assert [p["headers"]["x-attempts"] for p in parked] == [1, 1, 1]
    errors = [p["headers"]["x-error"] for p in parked]
    assert errors[0].startswith("JSONDecodeError: ")
    assert errors[1] == "ValueError: body is JSON but not an object: list"
    assert errors[2].startswith("UnicodeDecodeError: ")


def test_park_exception_parks_at_once(rmq_vhost: RabbitURL, broker: b.Broker) -> None:
    calls: list[dict] = []

    def on_pay(message: dict) -> None:
        calls.append(message)
        raise b.Park("totalAmount 1.00 does not match the order's 99.70")

    with Consumer(rmq_vhost, {b.QUEUE_PAY: on_pay}, max_attempts=5):
        broker.publish_pay(PAY_MSG)
        wait_for(lambda: broker.queue_depth(b.QUEUE_PAY_PARKED) == 1, what="the park")

    assert calls == [PAY_MSG]
    [parked] = b.list_parked(rmq_vhost, b.QUEUE_PAY_PARKED)
    assert parked["headers"]["x-error"] == (
        "Park: totalAmount 1.00 does not match the order's 99.70"
    )
    assert parked["headers"]["x-attempts"] == 1


def test_stop_finishes_the_message_in_hand_and_returns_promptly(
    rmq_vhost: RabbitURL, broker: b.Broker
) -> None:
    for n in range(3):
        broker.publish_pay({**PAY_MSG, "notifyId": f"n{n}"})
    inside = threading.Event()
    finished: list[str] = []

    def slow(message: dict) -> None:
        inside.set()
        time.sleep(0.5)
        finished.append(message["notifyId"])

    consumer = Consumer(rmq_vhost, {b.QUEUE_PAY: slow}, prefetch=10)
    with consumer:
        assert inside.wait(5)
        consumer.stop.set()
        stopped_at = time.monotonic()
        consumer.thread.join(2)
        assert not consumer.thread.is_alive()
        assert time.monotonic() - stopped_at < 2
    assert finished == ["n0"]
    assert broker.queue_depth(b.QUEUE_PAY) == 2  # n0 acked; n1, n2 given back

    idle = Consumer(rmq_vhost, {b.QUEUE_CHECK: finished.append})
    with idle:
        time.sleep(0.5)
        idle.stop.set()
        stopped_at = time.monotonic()
        idle.thread.join(2)
        assert time.monotonic() - stopped_at < 1.5


def test_consumer_reconnects_when_the_broker_drops_it(
    rmq_vhost: RabbitURL, broker: b.Broker, caplog: pytest.LogCaptureFixture
) -> None:
    received: list[dict] = []
    caplog.set_level(logging.WARNING, logger="chalicelib.broker")
    with Consumer(rmq_vhost, {b.QUEUE_PAY: received.append}, reconnect_delays=(0.1, 0.5)):
        broker.publish_pay(PAY_MSG)
        wait_for(lambda: len(received) == 1, what="the first message")
        rabbitmqctl("close_all_connections", "-p", rmq_vhost.vhost, "test: broker restart")
        broker.publish_pay({**PAY_MSG, "notifyId": "n2"})
        wait_for(lambda: len(received) == 2, what="the message after the reconnect")
    assert [m["notifyId"] for m in received] == ["n1", "n2"]
    assert any("reconnecting in" in r.getMessage() for r in caplog.records)


def test_quorum_queues_delay_retry_and_handle(rmq_vhost: RabbitURL) -> None:
    publisher = b.Broker(rmq_vhost, check_delay_seconds=1, queue_type="quorum")
    calls: list[dict] = []

    def flaky(message: dict) -> None:
        calls.append(message)
        if len(calls) < 3:
            raise ConnectionError("alipay timed out")

    try:
        with Consumer(
            rmq_vhost, {b.QUEUE_CHECK: flaky}, check_delay_seconds=1, queue_type="quorum"
        ):
            publisher.publish_check("ORDER_Q")
            wait_for(lambda: len(calls) == 3, timeout=8, what="two retries then success")
        assert calls == [{"orderId": "ORDER_Q"}] * 3
        assert publisher.queue_depth(b.QUEUE_CHECK) == 0
        assert publisher.queue_depth(b.QUEUE_CHECK_PARKED) == 0
    finally:
        publisher.close()
    assert queue_rows(rmq_vhost.vhost)[b.QUEUE_CHECK]["type"] == "quorum"


def test_unknown_queue_in_handlers_is_refused() -> None:
    with pytest.raises(ValueError, match="queue.order.delay"):
        b.run_consumer(
            "amqp://guest:guest@127.0.0.1:1/%2F",
            {b.QUEUE_DELAY: print},
            check_delay_seconds=CHECK_DELAY_S,
            stop=threading.Event(),
        )


# --- parked tools ------------------------------------------------------------------------


def test_list_and_replay_parked_round_trip(rmq_vhost: RabbitURL, broker: b.Broker) -> None:
    def refuse(message: dict) -> None:
        raise b.Park("refused")

    with Consumer(rmq_vhost, {b.QUEUE_PAY: refuse}):
        broker.publish_pay({**PAY_MSG, "notifyId": "a"})
        broker.publish_pay({**PAY_MSG, "notifyId": "b"})
        wait_for(lambda: broker.queue_depth(b.QUEUE_PAY_PARKED) == 2, what="two parks")

    first = b.list_parked(rmq_vhost, b.QUEUE_PAY)
    second = b.list_parked(rmq_vhost, b.QUEUE_PAY)
    assert [p["body"]["notifyId"] for p in first] == ["a", "b"]
    assert [p["body"] for p in second] == [p["body"] for p in first]
    assert broker.queue_depth(b.QUEUE_PAY_PARKED) == 2  # listing consumed nothing

    assert b.replay_parked(rmq_vhost, b.QUEUE_PAY) == 2
    assert broker.queue_depth(b.QUEUE_PAY_PARKED) == 0
    assert b.list_parked(rmq_vhost, b.QUEUE_PAY) == []
    assert b.replay_parked(rmq_vhost, b.QUEUE_PAY) == 0

    received: list[dict] = []
    with raw_channel(rmq_vhost) as channel:
        method, properties, body = channel.basic_get(b.QUEUE_PAY, auto_ack=True)
        assert method is not None
        assert json.loads(body) == {**PAY_MSG, "notifyId": "a"}
        for header in ("x-attempts", "x-error", "x-parked-at", "x-original-queue"):
            assert header not in properties.headers
        assert "x-replayed-at" in properties.headers
        assert properties.delivery_mode == 2

    with Consumer(rmq_vhost, {b.QUEUE_PAY: received.append}):
        wait_for(lambda: received, what="the replayed message")
    assert received == [{**PAY_MSG, "notifyId": "b"}]
    assert broker.queue_depth(b.QUEUE_PAY) == 0
