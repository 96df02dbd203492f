"""The webhook sender against real HTTP servers on the loopback (the local stage's
rules: http to this machine is allowed): what a subscriber receives, and what a
misbehaving one costs an attempt (never more than its deadline)."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from chalicelib.webhook_http import BODY_LIMIT, HttpSender

TIMEOUT = 1.0


class Subscriber(http.server.BaseHTTPRequestHandler):
    received: list[tuple[str, dict[str, str], bytes]] = []

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, dict(self.headers), body))
        try:
            self._answer()
        except OSError:
            pass  # the sender hung up: that is the point of some paths

    def _answer(self) -> None:
        path = self.path.split("?")[0]
        if path == "/ok":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"thanks")
        elif path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/elsewhere")
            self.end_headers()
        elif path == "/hang":
            time.sleep(TIMEOUT * 3)
        elif path == "/trickle":
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            for _ in range(100):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.1)
        elif path == "/huge":
            self.send_response(200)
            self.send_header("Content-Length", str(10 * 1024 * 1024))
            self.end_headers()
            for _ in range(1280):
                self.wfile.write(b"y" * 8192)
        else:
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b"it broke")


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Subscriber)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def post(url: str) -> Any:
    return HttpSender(local=True).post(url, b'{"eventId":"EVT_1"}',
                                       {"Content-Type": "application/json",
                                        "Idempotency-Key": "EVT_1"}, timeout=TIMEOUT)


def test_a_2xx_is_delivered_with_the_exact_body_and_headers(base: str) -> None:
    Subscriber.received.clear()
    answer = post(f"{base}/ok?x=1")
    assert answer.ok and answer.status == 200 and answer.body == "thanks"
    ((path, headers, body),) = Subscriber.received
    assert path == "/ok?x=1" and body == b'{"eventId":"EVT_1"}'
    assert headers["Content-Type"] == "application/json"
    assert headers["Idempotency-Key"] == "EVT_1"


def test_a_500_is_not_delivered_and_its_answer_is_kept(base: str) -> None:
    answer = post(f"{base}/broken")
    assert not answer.ok and answer.status == 500 and answer.body == "it broke"


def test_a_redirect_is_not_followed(base: str) -> None:
    Subscriber.received.clear()
    answer = post(f"{base}/redirect")
    assert not answer.ok and answer.status == 302 and answer.error == "redirect not followed"
    assert [p for p, _, _ in Subscriber.received] == ["/redirect"]


@pytest.mark.parametrize("path", ["/hang", "/trickle"])
def test_a_hang_or_a_trickle_costs_one_deadline(base: str, path: str) -> None:
    began = time.monotonic()
    answer = post(f"{base}{path}")
    took = time.monotonic() - began
    assert answer.status is None and not answer.ok
    assert answer.error is not None and "timed out" in answer.error
    assert TIMEOUT * 0.9 <= took < TIMEOUT + 1.0, took


def test_a_huge_answer_is_cut_and_not_delivered(base: str) -> None:
    began = time.monotonic()
    answer = post(f"{base}/huge")
    assert answer.status == 200 and not answer.ok
    assert answer.error == f"answer over {BODY_LIMIT} bytes"
    assert len(answer.body) == 200
    assert time.monotonic() - began < TIMEOUT


def test_nobody_listening_is_no_answer() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    answer = post(f"http://127.0.0.1:{port}/hook")
    assert answer.status is None and not answer.ok and "refused" in (answer.error or "").lower()
