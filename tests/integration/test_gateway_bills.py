"""AlipayGateway.bill_url and download_bill against a tiny HTTP server on the
loopback (no network beyond this machine, no sandbox): the bill API's answers as
Alipay signs them (or does not), and the download's streaming, counting, size cap,
HTTP errors, cut answers and timeouts."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from chalicelib import alipay_gateway
from chalicelib.alipay_gateway import (
    BILL_CHUNK_BYTES,
    BILL_METHOD,
    AlipayBusinessError,
    AlipayGateway,
    AlipayUnavailable,
)
from chalicelib.ports import PaymentRefused, PaymentUnavailable
from local.alipay_sandbox import LOCAL_APP_ID, LOCAL_SELLER_ID, ensure_keys
from local.alipay_sandbox.keys import load_private_key
from local.alipay_sandbox.server import render_api_response

RESPONSE = BILL_METHOD.replace(".", "_") + "_response"
DAY = date(2026, 12, 1)


@dataclass
class Answer:
    """What the server answers next: status, headers, body (written in pieces of
    `piece` bytes), after `delay` seconds; `cut` closes the connection early."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    length: int | None = None  # Content-Length; len(body) when None
    send_length: bool = True


class Local(ThreadingHTTPServer):
    daemon_threads = True
    answer: Answer
    seen: list[str]


class Handler(BaseHTTPRequestHandler):
    server: Local

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self.server.seen.append(self.path)
        answer = self.server.answer
        if answer.delay:
            time.sleep(answer.delay)
        try:
            self.send_response(answer.status)
            for name, value in answer.headers.items():
                self.send_header(name, value)
            if answer.send_length:
                length = len(answer.body) if answer.length is None else answer.length
                self.send_header("Content-Length", str(length))
            self.end_headers()
            self.wfile.write(answer.body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (the timeout test)
        self.close_connection = True


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return ensure_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def other_key() -> rsa.RSAPrivateKey:
    """Somebody else's key: what it signs must not pass for Alipay's answer."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def server() -> Iterator[Local]:
    # One server and one gateway for the module: building the SDK's client takes
    # a tenth of a second, and the whole file should take about one.
    server = Local(("127.0.0.1", 0), Handler)
    server.answer = Answer()
    server.seen = []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=2)


@pytest.fixture
def local(server: Local) -> Local:
    """The server, answering an empty 200 until a test says otherwise."""
    server.answer = Answer()
    server.seen = []
    return server


def url_of(server: Local, path: str = "/") -> str:
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


@pytest.fixture(scope="module")
def gateway(server: Local, keys: dict[str, Path]) -> AlipayGateway:
    # A short timeout: the timeout test waits it out.
    return AlipayGateway(LOCAL_APP_ID, LOCAL_SELLER_ID, url_of(server, "/gateway.do"),
                         keys["app_private"].read_text(), keys["alipay_public"].read_text(),
                         None, None, timeout=0.3)


class Writes:
    """A binary sink that records the size of each write (it must see pieces)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.sizes: list[int] = []

    def write(self, chunk: bytes) -> int:
        self.sizes.append(len(chunk))
        self.data += chunk
        return len(chunk)


# --- download_bill -----------------------------------------------------------------


def test_the_bill_is_copied_in_chunks_and_counted(gateway: AlipayGateway, local: Local) -> None:
    body = bytes(range(256)) * 1000 + b"tail"  # 256,004 bytes: several chunks
    local.answer = Answer(body=body, headers={"Content-Type": "application/oct-stream"})
    out = Writes()
    size = gateway.download_bill(url_of(local, "/downloadBillFile.resource?fileId=x"), out)
    assert size == len(body)
    assert bytes(out.data) == body
    assert len(out.sizes) > 1 and max(out.sizes) <= BILL_CHUNK_BYTES
    assert local.seen == ["/downloadBillFile.resource?fileId=x"]


def test_a_bill_without_content_length_is_read_to_its_end(gateway: AlipayGateway,
                                                          local: Local) -> None:
    local.answer = Answer(body=b"z" * 70_000, send_length=False)
    out = Writes()
    assert gateway.download_bill(url_of(local), out) == 70_000


@pytest.mark.parametrize("status", [404, 410, 500, 503])
def test_an_http_error_is_unavailable(gateway: AlipayGateway, local: Local,
                                      status: int) -> None:
    local.answer = Answer(status=status, body=b"<html>expired</html>")
    with pytest.raises(PaymentUnavailable, match=str(status)):
        gateway.download_bill(url_of(local), Writes())


@pytest.mark.parametrize("status", [203, 206])
def test_a_success_other_than_200_is_no_bill(gateway: AlipayGateway, local: Local,
                                             status: int) -> None:
    local.answer = Answer(status=status, body=b"part")
    with pytest.raises(AlipayUnavailable, match=str(status)):
        gateway.download_bill(url_of(local), Writes())


def test_a_cut_download_is_unavailable(gateway: AlipayGateway, local: Local) -> None:
    local.answer = Answer(body=b"x" * 1000, length=5000)  # the connection closes at 1000
    with pytest.raises(AlipayUnavailable, match="1000 of 5000"):
        gateway.download_bill(url_of(local), Writes())


def test_a_slow_server_times_out(gateway: AlipayGateway, local: Local) -> None:
    local.answer = Answer(body=b"late", delay=1.0)
    started = time.monotonic()
    with pytest.raises(PaymentUnavailable):
        gateway.download_bill(url_of(local), Writes())
    assert time.monotonic() - started < 0.9  # the gateway's 0.3 s, not the server's 1 s


def test_a_closed_port_is_unavailable(gateway: AlipayGateway) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nobody listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(PaymentUnavailable):
        gateway.download_bill(f"http://127.0.0.1:{port}/bill.zip", Writes())


@pytest.mark.parametrize("send_length", [True, False])
def test_more_than_the_cap_is_refused(gateway: AlipayGateway, local: Local,
                                      monkeypatch: pytest.MonkeyPatch,
                                      send_length: bool) -> None:
    monkeypatch.setattr(alipay_gateway, "BILL_MAX_BYTES", 100_000)
    local.answer = Answer(body=b"y" * 150_000, send_length=send_length)
    out = Writes()
    with pytest.raises(AlipayUnavailable, match="100000"):
        gateway.download_bill(url_of(local), out)
    assert len(out.data) <= 100_000  # what it wrote before it stopped stays under the cap


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.test/bill.zip", ""])
def test_only_http_urls_are_fetched(gateway: AlipayGateway, url: str) -> None:
    with pytest.raises(PaymentUnavailable):
        gateway.download_bill(url, Writes())


# --- bill_url ------------------------------------------------------------------------


def signed(key: rsa.RSAPrivateKey, payload: dict[str, Any]) -> bytes:
    return render_api_response(RESPONSE, payload, key)


def gateway_answer(body: bytes) -> Answer:
    return Answer(body=body, headers={"Content-Type": "application/json;charset=utf-8"})


@pytest.fixture(scope="module")
def alipay_key(keys: dict[str, Path]) -> rsa.RSAPrivateKey:
    return load_private_key(keys["alipay_private"])


def test_bill_url_asks_for_the_days_trade_bill(gateway: AlipayGateway, local: Local,
                                               alipay_key: rsa.RSAPrivateKey) -> None:
    url = ("http://dwbillcenter.alipay.com/downloadBillFile.resource?bizType=trade"
           "&userId=20881234&fileType=csv.zip&bizDates=20261201&downloadFileName=x.zip&fileId=f")
    local.answer = gateway_answer(signed(alipay_key, {"code": "10000", "msg": "Success",
                                                      "bill_download_url": url}))
    assert gateway.bill_url(DAY) == url
    (path,) = local.seen
    params = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(path).query))
    assert params["method"] == BILL_METHOD
    assert json.loads(params["biz_content"]) == {"bill_type": "trade", "bill_date": "2026-12-01"}
    assert params["sign_type"] == "RSA2" and params["sign"]


def test_no_bill_of_the_day_is_none(gateway: AlipayGateway, local: Local,
                                    alipay_key: rsa.RSAPrivateKey) -> None:
    local.answer = gateway_answer(signed(alipay_key, {
        "code": "40004", "msg": "Business Failed", "sub_code": "isp.bill_not_exist",
        "sub_msg": "账单不存在"}))
    assert gateway.bill_url(DAY) is None


def test_a_refusal_is_payment_refused_with_alipays_reason(gateway: AlipayGateway, local: Local,
                                                          alipay_key: rsa.RSAPrivateKey) -> None:
    local.answer = gateway_answer(signed(alipay_key, {
        "code": "40004", "msg": "Business Failed", "sub_code": "isv.invalid_arguments",
        "sub_msg": "入参不合法"}))
    with pytest.raises(AlipayBusinessError) as refused:
        gateway.bill_url(DAY)
    assert isinstance(refused.value, PaymentRefused)
    assert (refused.value.reason, refused.value.detail) == ("isv.invalid_arguments", "入参不合法")


Body = Callable[[rsa.RSAPrivateKey, rsa.RSAPrivateKey], bytes]
NOT_EXIST = {"code": "40004", "msg": "Business Failed", "sub_code": "isp.bill_not_exist",
             "sub_msg": "账单不存在"}


@pytest.mark.parametrize("body", [
    # unsigned: not even "no bill" is believed from an answer anyone could have written
    lambda key, other: json.dumps({RESPONSE: NOT_EXIST}).encode(),
    lambda key, other: json.dumps({"error_response": NOT_EXIST}).encode(),
    lambda key, other: signed(other, NOT_EXIST),  # signed, by someone else
    lambda key, other: signed(other, {"code": "10000", "msg": "Success",
                                      "bill_download_url": "http://evil.test/bill.zip"}),
    lambda key, other: signed(key, {"code": "10000", "msg": "Success"}),  # no URL
    lambda key, other: signed(key, {"code": "10000", "msg": "Success",
                                    "bill_download_url": "file:///etc/passwd"}),
    lambda key, other: signed(key, {"code": "20000", "msg": "Service Currently Unavailable",
                                    "sub_code": "isp.unknow-error"}),
    lambda key, other: b"<html>502 Bad Gateway</html>",
], ids=["unsigned", "unsigned-error", "other-key", "other-key-url", "no-url", "file-url",
        "20000", "html"])
def test_no_usable_answer_is_unavailable(gateway: AlipayGateway, local: Local,
                                         alipay_key: rsa.RSAPrivateKey,
                                         other_key: rsa.RSAPrivateKey, body: Body) -> None:
    local.answer = gateway_answer(body(alipay_key, other_key))
    with pytest.raises(AlipayUnavailable) as caught:
        gateway.bill_url(DAY)
    assert not isinstance(caught.value, PaymentRefused)


def test_a_gateway_error_status_is_unavailable(gateway: AlipayGateway, local: Local) -> None:
    local.answer = Answer(status=502, body=b"<html>502</html>")
    with pytest.raises(PaymentUnavailable):
        gateway.bill_url(DAY)
