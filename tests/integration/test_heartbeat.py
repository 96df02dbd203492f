"""Heartbeats keep flowing while a consumer's handler waits on a slow dependency.

RabbitMQ closes a connection that misses two heartbeats. `run_consumer` runs the
handlers on a worker thread while the connection's thread keeps calling
`process_data_events`, so a handler held for several heartbeat intervals (here
an HTTP request to a local server that answers after 7 s, standing in for a slow
Alipay) neither loses the connection nor gets its message delivered twice. And
when the connection is lost anyway, the late handler's ack is dropped, never
sent on the next connection (delivery tags belong to their channel).

Deliveries are watched by wrapping pika's `BlockingChannel.basic_consume`, the
only way to see a delivery's `redelivered` flag without changing the handlers'
interface; the broker is looked at with rabbitmqctl and passive declares.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from pika.adapters.blocking_connection import BlockingChannel

from chalicelib import broker as b
from tests.integration.conftest import RabbitURL, rabbitmqctl
from tests.integration.test_broker import Consumer

pytestmark = pytest.mark.rabbitmq

CHECK_DELAY_S = 60
RETRY_DELAYS_MS = (100, 200)
HEARTBEAT_S = 2
SLOW_ANSWER_S = 7.0  # more than three heartbeat intervals
PAY_MSG = {
    "orderId": "ORDER_HB",
    "tradeNo": "2024HB",
    "totalAmount": "99.70",
    "payTime": "2024-01-01T00:00:00Z",
    "notifyId": "hb1",
}


# --- helpers ------------------------------------------------------------------------


def wait_for(probe: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := probe()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
    return value


@dataclass(frozen=True)
class Seen:
    channel: BlockingChannel
    redelivered: bool


@pytest.fixture
def deliveries(monkeypatch: pytest.MonkeyPatch) -> list[Seen]:
    """Every delivery pika hands to a consumer callback: its channel and `redelivered`."""
    seen: list[Seen] = []
    original = BlockingChannel.basic_consume

    def spying(self: BlockingChannel, queue: str, on_message_callback: Any, *a: Any, **kw: Any):
        def recording(channel: BlockingChannel, method: Any, properties: Any, body: bytes):
            seen.append(Seen(channel, bool(method.redelivered)))
            return on_message_callback(channel, method, properties, body)

        return original(self, queue, recording, *a, **kw)

    monkeypatch.setattr(BlockingChannel, "basic_consume", spying)
    return seen


@contextmanager
def slow_http_server(delay_s: float) -> Iterator[str]:
    """A local HTTP server on 127.0.0.1 that answers `ok` after `delay_s`; yields its URL."""

    class Slow(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            time.sleep(delay_s)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="slow-alipay", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/gateway.do?method=alipay.trade.query"
    finally:
        server.shutdown()
        server.server_close()


def connections(vhost: str) -> list[dict[str, Any]]:
    """The vhost's connections: name and negotiated heartbeat (`timeout`), per rabbitmqctl.

    (list_connections lists the whole node, whatever `-p` says: filtered here.)
    """
    out = rabbitmqctl("-q", "list_connections", "name", "vhost", "timeout", "--formatter", "json")
    return sorted(
        (row for row in json.loads(out) if row["vhost"] == vhost), key=lambda row: row["name"]
    )


def depths(url: str) -> dict[str, int]:
    """Messages ready in queue.order.pay, its retry queues and its parked queue."""
    names = [b.QUEUE_PAY, b.QUEUE_PAY_PARKED]
    names += [b.retry_queue_name(b.QUEUE_PAY, ms) for ms in RETRY_DELAYS_MS]
    publisher = b.Broker(url, check_delay_seconds=CHECK_DELAY_S)
    try:
        return {name: publisher.queue_depth(name) for name in names}
    finally:
        publisher.close()


def publish_one(url: str) -> None:
    publisher = b.Broker(url, check_delay_seconds=CHECK_DELAY_S)
    try:
        publisher.publish_pay(PAY_MSG)
    finally:
        publisher.close()  # so that the consumer's is the vhost's only connection


def reconnects(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "reconnecting" in r.getMessage()]


# --- tests ------------------------------------------------------------------------


def test_a_handler_held_for_three_heartbeats_keeps_its_connection(
    rmq_vhost: RabbitURL, deliveries: list[Seen], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="chalicelib.broker")
    publish_one(rmq_vhost)
    calls: list[dict] = []
    held: list[float] = []
    inside = threading.Event()

    with slow_http_server(SLOW_ANSWER_S) as slow_alipay:

        def on_pay(message: dict) -> None:
            calls.append(message)
            inside.set()
            started = time.monotonic()
            with urllib.request.urlopen(slow_alipay, timeout=15) as answer:  # really blocks
                assert answer.read() == b"ok"
            held.append(time.monotonic() - started)

        with Consumer(f"{rmq_vhost}?heartbeat={HEARTBEAT_S}", {b.QUEUE_PAY: on_pay}):
            assert inside.wait(5), "the handler was not called"
            before = connections(rmq_vhost.vhost)  # while the handler waits
            wait_for(lambda: held, timeout=SLOW_ANSWER_S + 8, what="the slow call to return")
            time.sleep(0.3)  # time for the ack
            after = connections(rmq_vhost.vhost)

    assert [row["timeout"] for row in before] == [HEARTBEAT_S], before
    assert held[0] >= 6.5, f"the handler was held {held[0]:.1f} s only"
    assert reconnects(caplog) == []
    assert after == before, f"the connection changed: {before} -> {after}"
    assert calls == [PAY_MSG]  # handled exactly once
    assert len(deliveries) == 1 and deliveries[0].redelivered is False, deliveries
    # Acked once: the stop gave nothing back, and nothing was retried or parked.
    left = depths(rmq_vhost)
    assert left == dict.fromkeys(left, 0), left
    assert not [r for r in caplog.records if "parked" in r.getMessage()]


def test_a_handler_finishing_after_its_connection_was_lost_does_not_ack_on_the_next(
    rmq_vhost: RabbitURL, deliveries: list[Seen], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="chalicelib.broker")
    publish_one(rmq_vhost)
    calls: list[dict] = []
    inside = [threading.Event(), threading.Event()]
    release = [threading.Event(), threading.Event()]

    def on_pay(message: dict) -> None:
        n = len(calls)
        calls.append(message)
        inside[n].set()
        assert release[n].wait(10)

    with Consumer(rmq_vhost, {b.QUEUE_PAY: on_pay}, reconnect_delays=(0.1,)):
        assert inside[0].wait(5), "the handler was not called"
        rabbitmqctl("close_all_connections", "-p", rmq_vhost.vhost, "test: connection lost")
        wait_for(lambda: len(deliveries) == 2, timeout=5, what="the redelivery")
        release[0].set()  # the first handler returns after its connection was lost
        assert inside[1].wait(5), "the redelivered message was not handled"
        # Had the first handler's ack gone out on the new channel, it would have
        # acked this delivery (tag 1 there too) before its handler returned.
        row = next(
            r
            for r in json.loads(
                rabbitmqctl(
                    "-q", "list_queues", "-p", rmq_vhost.vhost, "name", "messages_ready",
                    "messages_unacknowledged", "--formatter", "json",
                )
            )
            if r["name"] == b.QUEUE_PAY
        )  # fmt: skip
        assert (row["messages_ready"], row["messages_unacknowledged"]) == (0, 1)
        release[1].set()

    assert calls == [PAY_MSG, PAY_MSG]
    assert [d.redelivered for d in deliveries] == [False, True]
    assert deliveries[0].channel is not deliveries[1].channel
    assert len(reconnects(caplog)) == 1, reconnects(caplog)
    assert any("not acked" in r.getMessage() for r in caplog.records)
    left = depths(rmq_vhost)
    assert left == dict.fromkeys(left, 0), left
