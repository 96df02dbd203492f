"""Order events and webhooks end to end: the worker (its relay, fan-out and
deliveries) on the real RabbitMQ (a vhost per test), moto's DynamoDB, and a
subscriber that is a real HTTP server on the loopback."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import http.server
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from chalicelib import broker, config, handlers, webhooks
from chalicelib.broker.tail import tail_events
from chalicelib.context import Deps
from chalicelib.domain.webhooks import DeliveryStatus, delivery_id
from chalicelib.webhook_http import HttpSender
from tests.conftest import fake_pay_msg
from tests.waiting import wait_until

pytestmark = pytest.mark.rabbitmq

SECRET = "whsec_integration_0123456789"


@pytest.fixture
def rdeps(rmq_vhost: str, app_deps: Deps) -> Iterator[Deps]:
    settings = dataclasses.replace(
        config.load(), rmq_url=str(rmq_vhost), check_delay_seconds=3600,
        webhook_retry_seconds=(1, 2), webhook_timeout_seconds=2.0,
        relay_interval_seconds=0.2, outbox_sweep_after_seconds=0.0, webhook_workers=2)
    real = broker.Broker(settings.rmq_url, settings.check_delay_seconds,
                         webhook_waits_s=settings.webhook_retry_seconds)
    yield dataclasses.replace(app_deps, settings=settings, broker=real,
                              webhooks=HttpSender(local=True))
    real.close()


@pytest.fixture
def tail(rmq_vhost: str) -> Iterator[list[dict[str, Any]]]:
    """Every event published to exchange.order.events while the test runs."""
    seen: list[dict[str, Any]] = []
    stop, ready = threading.Event(), threading.Event()
    t = threading.Thread(target=tail_events, args=(str(rmq_vhost), seen.append),
                         kwargs={"stop": stop, "ready": ready}, daemon=True)
    # the exchange must exist before a queue is bound to it
    broker.declare_at(str(rmq_vhost), 3600)
    t.start()
    assert ready.wait(10)
    yield seen
    stop.set()
    t.join(5)


class Subscriber(http.server.BaseHTTPRequestHandler):
    answers: list[int] = []
    received: list[tuple[dict[str, str], bytes]] = []

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((dict(self.headers), body))
        status = self.answers.pop(0) if self.answers else 200
        self.send_response(status)
        self.end_headers()
        self.wfile.write(b"seen" if status < 300 else b"try later")


@pytest.fixture
def subscriber() -> Iterator[str]:
    Subscriber.answers, Subscriber.received = [], []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Subscriber)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hooks"
    server.shutdown()


def order_for(d: Deps, user: str) -> dict[str, Any]:
    d.store.set_cart_line(user, "g1", 1)
    return handlers.create_order(d, user)


def test_each_change_reaches_the_events_exchange_in_order(
        rdeps: Deps, bridge_threads: Callable[..., threading.Event],
        tail: list[dict[str, Any]]) -> None:
    bridge_threads(rdeps)
    paid = [order_for(rdeps, f"ev-{i}") for i in range(3)]
    closed = order_for(rdeps, "ev-closer")
    for order in paid:
        rdeps.broker.publish_pay(fake_pay_msg(order["id"], f"T-{order['id']}",
                                              order["totalMoney"]))
    handlers.cancel_order(rdeps, "ev-closer", closed["id"])
    want = {(o["id"], t) for o in paid for t in ("order.created", "order.paid")} | {
        (closed["id"], "order.created"), (closed["id"], "order.closed")}
    wait_until(lambda: want <= {(e["orderId"], e["type"]) for e in tail}, timeout=30,
               what="every change's event on exchange.order.events")
    for order in [*paid, closed]:
        mine = [e["type"] for e in tail if e["orderId"] == order["id"]]
        assert mine[0] == "order.created", mine  # an order's events in their order
    # marked sent after RabbitMQ confirmed them (a consumer may see one first)
    wait_until(lambda: not any(rdeps.store.unsent_events(o["id"]) for o in [*paid, closed]),
               timeout=10, what="every published event marked sent")
    paid_event = next(e for e in tail if e["type"] == "order.paid")
    assert paid_event["data"]["username"].startswith("ev-")
    assert paid_event["data"]["items"][0]["goodsId"] == "g1"


def test_a_subscriber_gets_a_signed_delivery_after_a_failure(
        rdeps: Deps, bridge_threads: Callable[..., threading.Event], subscriber: str) -> None:
    sub = webhooks.subscribe(rdeps, {"url": subscriber, "events": ["order.paid"],
                                     "secret": SECRET}, by="carol")
    Subscriber.answers = [503]
    bridge_threads(rdeps)
    order = order_for(rdeps, "hook-1")
    rdeps.broker.publish_pay(fake_pay_msg(order["id"], "T-hook-1", order["totalMoney"]))
    did = delivery_id(sub["id"], f"EVT_{order['id']}_paid")

    def delivered() -> bool:
        found = rdeps.store.get_delivery(did)
        return found is not None and found.status == DeliveryStatus.DELIVERED

    wait_until(delivered, timeout=30, what="the delivery, retried after its 503")
    delivery = rdeps.store.get_delivery(did)
    assert delivery is not None
    assert [a.status for a in delivery.attempts] == [503, 200]
    assert len(Subscriber.received) == 2
    (first_headers, first), (headers, body) = Subscriber.received
    assert first == body  # the same bytes each time
    event = json.loads(body)
    assert event["type"] == "order.paid" and event["orderId"] == order["id"]
    assert headers["Idempotency-Key"] == event["eventId"] == first_headers["Idempotency-Key"]
    assert headers["Shop-Event"] == "order.paid"
    stamp, mac = (p.split("=", 1)[1] for p in headers["Shop-Signature"].split(","))
    assert mac == hmac.new(SECRET.encode(), f"{stamp}.".encode() + body,
                           hashlib.sha256).hexdigest()
    # nothing for the types it did not ask for
    assert all(json.loads(b)["type"] == "order.paid" for _, b in Subscriber.received)


class Hanging(http.server.BaseHTTPRequestHandler):
    calls: list[float] = []

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.calls.append(time.monotonic())
        time.sleep(6)  # past the attempt's deadline (2 s here)


def test_a_hanging_subscriber_holds_up_no_other(
        rdeps: Deps, bridge_threads: Callable[..., threading.Event], subscriber: str) -> None:
    Hanging.calls = []
    hang = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hanging)
    hang.daemon_threads = True
    threading.Thread(target=hang.serve_forever, daemon=True).start()
    try:
        dead = webhooks.subscribe(rdeps, {"url": f"http://127.0.0.1:{hang.server_address[1]}/",
                                          "events": ["order.paid"], "secret": SECRET}, by="carol")
        live = webhooks.subscribe(rdeps, {"url": subscriber, "events": ["order.paid"],
                                          "secret": SECRET}, by="carol")
        bridge_threads(rdeps)
        orders = [order_for(rdeps, f"hang-{i}") for i in range(6)]
        started = time.monotonic()
        for order in orders:
            rdeps.broker.publish_pay(fake_pay_msg(order["id"], f"T-{order['id']}",
                                                  order["totalMoney"]))
        live_ids = [delivery_id(live["id"], f"EVT_{o['id']}_paid") for o in orders]

        def all_live() -> bool:
            found = [rdeps.store.get_delivery(i) for i in live_ids]
            return all(x is not None and x.status == DeliveryStatus.DELIVERED for x in found)

        wait_until(all_live, timeout=30, what="every delivery to the live subscriber")
        took = time.monotonic() - started
        # Six deliveries to a subscriber that never answers would take 6 x 2 s of the
        # two consumers; after its first timeouts it is let alone for its wait.
        assert took < 10, took
        assert len(Hanging.calls) <= 4, Hanging.calls
        dead_ids = [delivery_id(dead["id"], f"EVT_{o['id']}_paid") for o in orders]
        attempts = [a for i in dead_ids if (x := rdeps.store.get_delivery(i)) is not None
                    for a in x.attempts]
        assert attempts and all(a.status is None for a in attempts)
        assert any(a.body.startswith("not called") for a in attempts)
    finally:
        hang.shutdown()
