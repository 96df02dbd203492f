"""The webhook sender against real HTTP servers on the loopback (the local stage's
rules: http to this machine is allowed): what a subscriber receives, and what a
misbehaving one costs an attempt (never more than its deadline)."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from chalicelib.domain.webhooks import sign as signature
from chalicelib.webhook_http import BODY_LIMIT, KEPT, Answer, HttpSender

TIMEOUT = 1.0
HUGE = 10 * 1024 * 1024
BODY = b'{"eventId":"EVT_1","type":"order.paid"}'


@dataclass
class Seen:
    """What one server saw, and the switch that lets its slow handlers go."""

    requests: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)
    huge_sent: int = -1  # bytes of /huge written before the sender hung up
    huge_done: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)


class Subscriber(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: Seen  # set per server, on a subclass
    redirect_to = ""

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.seen.requests.append((self.command, self.path, dict(self.headers), body))
        try:
            self._answer(self.path.split("?")[0])
        except OSError:
            pass  # the sender hung up: that is the point of some paths
        self.close_connection = True

    def _reply(self, status: int, body: bytes = b"", **headers: str) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _trickle(self, head: bytes) -> None:
        """`head`, then a byte every 0.2 s until the sender leaves (or the test is
        over, or 5 deadlines passed: a sender that does not stop fails, not hangs)."""
        self.wfile.write(head)
        give_up = time.monotonic() + TIMEOUT * 5
        while not self.seen.stop.wait(0.2) and time.monotonic() < give_up:
            self.wfile.write(b"a")

    def _answer(self, path: str) -> None:
        if path == "/ok":
            self._reply(200, b"thanks")
        elif path == "/target":
            self._reply(200, b"followed")
        elif path == "/redirect":
            self._reply(302, b"moved", Location=self.redirect_to)
        elif path == "/hang":
            self.seen.stop.wait(TIMEOUT * 5)
        elif path == "/trickle-body":
            self._trickle(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
        elif path == "/trickle-head":
            self._trickle(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        elif path == "/exact":
            self._reply(200, b"z" * BODY_LIMIT)
        elif path == "/over":
            self._reply(200, b"z" * (BODY_LIMIT + 1))
        elif path == "/huge":
            self._huge()
        else:
            self._reply(500, b"it broke")

    def _huge(self) -> None:
        # a small send buffer: what the server got written is close to what the sender took
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        sent = 0
        try:
            self.wfile.write(b"HTTP/1.1 200 OK\r\n" + f"Content-Length: {HUGE}\r\n\r\n".encode())
            chunk = b"y" * 8192
            while sent < HUGE:
                self.wfile.write(chunk)
                sent += len(chunk)
        finally:
            self.seen.huge_sent = sent
            self.seen.huge_done.set()


@dataclass
class Server:
    base: str
    seen: Seen


def _serve(redirect_to: str = "") -> Iterator[Server]:
    seen = Seen()
    handler = type("Handler", (Subscriber,), {"seen": seen, "redirect_to": redirect_to})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield Server(f"http://127.0.0.1:{server.server_address[1]}", seen)
    finally:
        seen.stop.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def elsewhere() -> Iterator[Server]:
    """Where the subscriber's redirect points: it must never be called."""
    yield from _serve()


@pytest.fixture
def subscriber(elsewhere: Server) -> Iterator[Server]:
    yield from _serve(redirect_to=f"{elsewhere.base}/target")


HEADERS = {"Content-Type": "application/json", "Shop-Event": "order.paid",
           "Idempotency-Key": "EVT_1", "Shop-Signature": signature("whsec_1", 1764578462, BODY)}


def post(url: str, timeout: float = TIMEOUT) -> tuple[Answer, float]:
    """The answer, and the attempt's wall time in seconds as the caller saw it."""
    began = time.monotonic()
    answer = HttpSender(local=True).post(url, BODY, HEADERS, timeout=timeout)
    return answer, time.monotonic() - began


def test_a_2xx_is_delivered_with_the_exact_body_and_headers(subscriber: Server) -> None:
    answer, _ = post(f"{subscriber.base}/ok?x=1&y=%C3%A9")
    assert answer == Answer(200, answer.ms, "thanks", None) and answer.ok
    ((method, path, headers, body),) = subscriber.seen.requests
    assert (method, path, body) == ("POST", "/ok?x=1&y=%C3%A9", BODY)
    for name, value in HEADERS.items():
        assert headers[name] == value
    assert headers["Content-Length"] == str(len(BODY))
    assert headers["Connection"] == "close"
    assert headers["Host"] == subscriber.base.removeprefix("http://")
    assert set(headers) == {*HEADERS, "Content-Length", "Connection", "Host"}


def test_a_500_is_not_delivered_and_its_answer_is_kept(subscriber: Server) -> None:
    answer, _ = post(f"{subscriber.base}/broken")
    assert answer.status == 500 and not answer.ok
    assert answer.body == "it broke" and answer.error is None


def test_a_redirect_is_not_followed(subscriber: Server, elsewhere: Server) -> None:
    answer, _ = post(f"{subscriber.base}/redirect")
    assert answer.status == 302 and not answer.ok
    assert answer.error == "redirect not followed" and answer.body == "moved"
    assert [path for _, path, _, _ in subscriber.seen.requests] == ["/redirect"]
    assert elsewhere.seen.requests == []  # the redirect's target was never called


def test_a_subscriber_that_never_answers_costs_one_deadline(subscriber: Server) -> None:
    answer, took = post(f"{subscriber.base}/hang")
    assert answer.status is None and not answer.ok
    assert answer.error is not None and "timeout" in answer.error
    assert "status line" in answer.error and answer.body == answer.error
    assert TIMEOUT * 0.9 <= took and answer.ms < TIMEOUT * 1000 + 1500, (took, answer.ms)


@pytest.mark.parametrize("path", ["/trickle-body", "/trickle-head"])
def test_a_trickle_stops_at_the_deadline(subscriber: Server, path: str) -> None:
    # a byte every 0.2 s would renew a per-read timeout of 1 s forever
    answer, took = post(f"{subscriber.base}{path}")
    assert answer.status is None and not answer.ok
    assert answer.error is not None and "timeout" in answer.error
    assert TIMEOUT * 0.9 <= took < TIMEOUT + 1.5, took
    assert answer.ms < TIMEOUT * 1000 + 1500


def test_an_answer_of_exactly_the_limit_is_read_whole(subscriber: Server) -> None:
    answer, _ = post(f"{subscriber.base}/exact")
    assert answer.ok and answer.body == "z" * KEPT


def test_an_answer_one_byte_over_the_limit_is_not_delivered(subscriber: Server) -> None:
    answer, _ = post(f"{subscriber.base}/over")
    assert answer.status == 200 and not answer.ok
    assert answer.error == f"answer over {BODY_LIMIT} bytes"


def test_a_huge_answer_is_cut_and_not_read(subscriber: Server) -> None:
    answer, took = post(f"{subscriber.base}/huge", timeout=10)
    assert answer.status == 200 and not answer.ok
    assert answer.error == f"answer over {BODY_LIMIT} bytes"
    assert answer.body == "y" * KEPT
    assert took < 1.0, took  # well within its 10 s: it did not wait for the rest
    # the sender hung up early: the server could not write its 10 MB
    assert subscriber.seen.huge_done.wait(5)
    assert 0 <= subscriber.seen.huge_sent < HUGE // 2, subscriber.seen.huge_sent


def test_nobody_listening_is_no_answer() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nobody listens there
    answer, took = post(f"http://127.0.0.1:{port}/hook")
    assert answer.status is None and not answer.ok
    assert "refused" in (answer.error or "").lower() and answer.body == answer.error
    assert took < TIMEOUT
