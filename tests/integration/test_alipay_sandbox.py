"""The local Alipay sandbox against python-alipay-sdk (through AlipayGateway).

The sandbox runs in-process on a free port; a tiny stdlib server plays the
merchant's notify endpoint and records what arrives. Every signature crosses
between the two implementations: the SDK (Cryptodome) signs requests that the
sandbox (cryptography) checks, and the sandbox signs notifies, returns and API
answers that the SDK checks.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from chalicelib.alipay_gateway import (
    AlipayBusinessError,
    AlipayGateway,
    AlipayUnavailable,
    TradeNotExist,
    TradeStatusError,
)
from local.alipay_sandbox import LOCAL_APP_ID, LOCAL_SELLER_ID, SandboxServer, make_server
from local.alipay_sandbox.keys import ensure_keys, load_private_key, load_public_key
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
RETURN_URL = "http://shop.test/alipay/return"
SCHEDULE = [0.3] * 7  # Alipay's 8 attempts, compressed to 0.3 s apart
NOTIFY_FIELDS = {
    "notify_time",
    "notify_type",
    "notify_id",
    "app_id",
    "charset",
    "version",
    "sign_type",
    "sign",
    "trade_no",
    "out_trade_no",
    "buyer_id",
    "seller_id",
    "trade_status",
    "total_amount",
    "receipt_amount",
    "buyer_pay_amount",
    "gmt_create",
    "gmt_payment",
    "subject",
}
RETURN_FIELDS = {
    "charset",
    "out_trade_no",
    "method",
    "total_amount",
    "sign",
    "trade_no",
    "auth_app_id",
    "version",
    "app_id",
    "sign_type",
    "seller_id",
    "timestamp",
}


# --- the merchant's notify endpoint ---------------------------------------


@dataclass
class Merchant:
    """Records notifies; answers per out_trade_no from a script, then ``success``."""

    url: str = ""
    received: list[dict[str, str]] = field(default_factory=list)
    scripts: dict[str, list[str]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer_for(self, form: dict[str, str]) -> str:
        with self.lock:
            self.received.append(form)
            script = self.scripts.get(form.get("out_trade_no", ""), [])
            return script.pop(0) if script else "success"

    def notifies(self, out_trade_no: str) -> list[dict[str, str]]:
        with self.lock:
            return [n for n in self.received if n.get("out_trade_no") == out_trade_no]


@contextmanager
def merchant_server() -> Iterator[Merchant]:
    """A merchant's notify endpoint on a free port, answering from its script."""
    state = Merchant()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
            body = state.answer_for(form).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/alipay/notify"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def merchant() -> Iterator[Merchant]:
    with merchant_server() as state:
        yield state


# --- the sandbox and the merchant's gateway --------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return ensure_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def sandbox(keys: dict[str, Path]) -> Iterator[SandboxServer]:
    server = make_server("127.0.0.1", 0, keys["app_private"].parent, SCHEDULE)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def make_gateway(
    gateway_url: str, keys: dict[str, Path], notify_url: str | None, **key_overrides: Path
) -> AlipayGateway:
    paths = {**keys, **key_overrides}
    return AlipayGateway(
        LOCAL_APP_ID,
        LOCAL_SELLER_ID,
        gateway_url,
        paths["app_private"].read_text(),
        paths["alipay_public"].read_text(),
        notify_url,
        RETURN_URL,
        timeout=5.0,
    )


@pytest.fixture(scope="module")
def gateway(sandbox: SandboxServer, keys: dict[str, Path], merchant: Merchant) -> AlipayGateway:
    return make_gateway(sandbox.gateway_url, keys, merchant.url)


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return ensure_keys(tmp_path_factory.mktemp("other-keys"))


# --- helpers ---------------------------------------------------------------


def new_order() -> str:
    return f"ORDER_{uuid.uuid4().hex[:16]}"


def in_30_minutes() -> datetime:
    return datetime.now(UTC) + timedelta(minutes=30)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def post_form(
    sandbox: SandboxServer, path: str, fields: dict[str, str]
) -> tuple[int, str | None, str]:
    """POST without following redirects: (status, Location, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", sandbox.server_address[1], timeout=5)
    try:
        conn.request(
            "POST",
            path,
            urllib.parse.urlencode(fields),
            {"Content-Type": "application/x-www-form-urlencoded"},
        )
        response = conn.getresponse()
        return response.status, response.getheader("Location"), response.read().decode()
    finally:
        conn.close()


def trade(sandbox: SandboxServer, out_trade_no: str) -> dict[str, Any]:
    status, body = get(f"{sandbox.base_url}/sandbox/trades/{out_trade_no}")
    assert status == 200, body
    return json.loads(body)


def open_cashier(
    gateway: AlipayGateway,
    out_trade_no: str,
    amount: str = "59.90",
    time_expire: datetime | None = None,
) -> str:
    url = gateway.page_pay_url(
        out_trade_no, Decimal(amount), f"商品 {out_trade_no}", time_expire or in_30_minutes()
    )
    status, page = get(url)
    assert status == 200, page
    return page


def paid_trade(
    gateway: AlipayGateway, sandbox: SandboxServer, amount: str = "59.90", **form: str
) -> str:
    out_trade_no = new_order()
    open_cashier(gateway, out_trade_no, amount)
    status, location, body = post_form(
        sandbox, "/sandbox/pay", {"out_trade_no": out_trade_no, **form}
    )
    assert status == 302, body
    assert location is not None and location.startswith(RETURN_URL + "?")
    return out_trade_no


# --- the cashier -----------------------------------------------------------


def test_signed_page_pay_opens_the_cashier(gateway: AlipayGateway, sandbox: SandboxServer) -> None:
    out_trade_no = new_order()

    page = open_cashier(gateway, out_trade_no)

    assert f"商品 {out_trade_no}" in page
    assert "59.90" in page
    assert 'action="/sandbox/pay"' in page and ">Pay<" in page
    state = trade(sandbox, out_trade_no)
    assert (state["status"], state["total_amount"]) == ("WAIT_BUYER_PAY", "59.90")
    # Opening again is idempotent: the same trade, not a second one.
    open_cashier(gateway, out_trade_no)
    assert trade(sandbox, out_trade_no)["trade_no"] == state["trade_no"]


def test_tampered_page_pay_is_refused(gateway: AlipayGateway, sandbox: SandboxServer) -> None:
    out_trade_no = new_order()
    url = gateway.page_pay_url(out_trade_no, Decimal("59.90"), "x", in_30_minutes())
    tampered = url.replace("59.90", "0.01")
    assert tampered != url

    status, page = get(tampered)

    assert status == 400
    assert "invalid-signature" in page
    assert get(f"{sandbox.base_url}/sandbox/trades/{out_trade_no}")[0] == 404


def test_page_pay_signed_with_another_merchant_key_is_refused(
    sandbox: SandboxServer, keys: dict[str, Path], other_keys: dict[str, Path]
) -> None:
    stranger = make_gateway(sandbox.gateway_url, keys, None, app_private=other_keys["app_private"])
    status, page = get(stranger.page_pay_url(new_order(), Decimal("1.00"), "x", in_30_minutes()))
    assert status == 400 and "invalid-signature" in page


def test_reopening_with_another_amount_is_refused(gateway: AlipayGateway) -> None:
    out_trade_no = new_order()
    open_cashier(gateway, out_trade_no, "59.90")

    status, page = get(gateway.page_pay_url(out_trade_no, Decimal("0.01"), "x", in_30_minutes()))

    assert status == 400 and "ACQ.CONTEXT_INCONSISTENT" in page


def test_unknown_trade_is_404_json(sandbox: SandboxServer) -> None:
    status, body = get(f"{sandbox.base_url}/sandbox/trades/NOPE")
    assert status == 404
    assert json.loads(body)["out_trade_no"] == "NOPE"


# --- paying, the notify and the return ---------------------------------------


def test_pay_notifies_and_redirects_with_signatures_the_sdk_accepts(
    gateway: AlipayGateway, sandbox: SandboxServer, merchant: Merchant
) -> None:
    out_trade_no = new_order()
    open_cashier(gateway, out_trade_no, "59.90")

    status, location, _ = post_form(sandbox, "/sandbox/pay", {"out_trade_no": out_trade_no})

    assert status == 302 and location is not None
    back = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(location).query))
    assert set(back) == RETURN_FIELDS
    assert back["method"] == "alipay.trade.page.pay.return"
    assert (back["out_trade_no"], back["total_amount"]) == (out_trade_no, "59.90")
    assert gateway.verify(back) is True

    wait_until(lambda: len(merchant.notifies(out_trade_no)) == 1, 5.0, "one notify received")
    notify = merchant.notifies(out_trade_no)[0]
    assert set(notify) == NOTIFY_FIELDS
    assert gateway.verify(notify) is True
    assert gateway.verify({**notify, "total_amount": "0.01"}) is False
    assert notify["notify_type"] == "trade_status_sync"
    assert notify["sign_type"] == "RSA2"
    assert notify["trade_status"] == "TRADE_SUCCESS"
    assert (notify["app_id"], notify["seller_id"]) == (LOCAL_APP_ID, LOCAL_SELLER_ID)
    assert notify["total_amount"] == notify["receipt_amount"] == "59.90"
    assert notify["subject"] == f"商品 {out_trade_no}"
    assert notify["trade_no"] == back["trade_no"]

    result = gateway.query(out_trade_no)
    assert (result.trade_status, result.total_amount) == ("TRADE_SUCCESS", Decimal("59.90"))
    assert result.trade_no == notify["trade_no"] and result.pay_time is not None
    wait_until(lambda: trade(sandbox, out_trade_no)["notify_acknowledged"], 5.0,
               "the notify acknowledged")


def test_notify_is_resent_until_the_answer_is_success(
    gateway: AlipayGateway, sandbox: SandboxServer, merchant: Merchant
) -> None:
    out_trade_no = new_order()
    merchant.scripts[out_trade_no] = ["failure", "success\n"]  # not exactly "success"
    open_cashier(gateway, out_trade_no)

    post_form(sandbox, "/sandbox/pay", {"out_trade_no": out_trade_no})

    wait_until(lambda: len(merchant.notifies(out_trade_no)) == 3, 5.0, "three notifies received")
    time.sleep(2 * SCHEDULE[0] + 0.2)  # a fourth attempt would have come by now
    notifies = merchant.notifies(out_trade_no)
    assert len(notifies) == 3
    assert len({n["notify_id"] for n in notifies}) == 1
    assert all(gateway.verify(n) for n in notifies)
    attempts = trade(sandbox, out_trade_no)["notify_attempts"]
    assert [(a["answer"], a["ok"]) for a in attempts] == [
        ("failure", False),
        ("success\n", False),
        ("success", True),
    ]


def test_notify_drop_sends_nothing_and_the_hook_resends(
    gateway: AlipayGateway, sandbox: SandboxServer, merchant: Merchant
) -> None:
    out_trade_no = paid_trade(gateway, sandbox, notify="drop")

    time.sleep(2 * SCHEDULE[0])
    assert merchant.notifies(out_trade_no) == []
    state = trade(sandbox, out_trade_no)
    assert (state["status"], state["notify_dropped"], state["notify_attempts"]) == (
        "TRADE_SUCCESS",
        True,
        [],
    )
    # The merchant's timeout check finds the payment by query.
    assert gateway.query(out_trade_no).trade_status == "TRADE_SUCCESS"

    status, body = get_post_json(sandbox, f"/sandbox/notify/{out_trade_no}")
    assert status == 200 and body["ok"] is True
    assert len(merchant.notifies(out_trade_no)) == 1
    assert gateway.verify(merchant.notifies(out_trade_no)[0])


def get_post_json(sandbox: SandboxServer, path: str) -> tuple[int, dict[str, Any]]:
    status, _, body = post_form(sandbox, path, {})
    return status, json.loads(body)


def test_paying_twice_or_unknown_is_refused(gateway: AlipayGateway, sandbox: SandboxServer) -> None:
    out_trade_no = paid_trade(gateway, sandbox)

    again = post_form(sandbox, "/sandbox/pay", {"out_trade_no": out_trade_no})
    unknown = post_form(sandbox, "/sandbox/pay", {"out_trade_no": "NOPE"})

    assert again[0] == 409 and "ACQ.TRADE_HAS_SUCCESS" in again[2]
    assert unknown[0] == 400 and "ACQ.TRADE_NOT_EXIST" in unknown[2]


def test_expired_trade_is_closed_and_cannot_be_paid(
    gateway: AlipayGateway, sandbox: SandboxServer, merchant: Merchant
) -> None:
    out_trade_no = new_order()

    page = open_cashier(gateway, out_trade_no, time_expire=datetime.now(UTC) - timedelta(minutes=1))

    assert "TRADE_CLOSED" in page and "/sandbox/pay" not in page
    status, _, body = post_form(sandbox, "/sandbox/pay", {"out_trade_no": out_trade_no})
    assert status == 409 and "TRADE_CLOSED" in body
    assert gateway.query(out_trade_no).trade_status == "TRADE_CLOSED"
    assert trade(sandbox, out_trade_no)["close_reason"] == "EXPIRED"
    assert merchant.notifies(out_trade_no) == []


# --- server APIs ----------------------------------------------------------------


def test_unknown_trade_is_trade_not_exist(gateway: AlipayGateway) -> None:
    for call in (
        lambda: gateway.query("NOPE"),
        lambda: gateway.close("NOPE"),
        lambda: gateway.refund("NOPE", Decimal("1.00"), "NOPE-R1"),
    ):
        with pytest.raises(TradeNotExist) as caught:
            call()
        assert (caught.value.code, caught.value.sub_code) == ("40004", "ACQ.TRADE_NOT_EXIST")


def test_close_waiting_trade_then_it_cannot_be_paid(
    gateway: AlipayGateway, sandbox: SandboxServer
) -> None:
    out_trade_no = new_order()
    open_cashier(gateway, out_trade_no)

    gateway.close(out_trade_no)

    assert gateway.query(out_trade_no).trade_status == "TRADE_CLOSED"
    assert post_form(sandbox, "/sandbox/pay", {"out_trade_no": out_trade_no})[0] == 409
    with pytest.raises(TradeStatusError):
        gateway.close(out_trade_no)


def test_close_of_paid_trade_is_trade_status_error(
    gateway: AlipayGateway, sandbox: SandboxServer
) -> None:
    out_trade_no = paid_trade(gateway, sandbox)

    with pytest.raises(AlipayBusinessError) as caught:
        gateway.close(out_trade_no)

    assert caught.value.sub_code == "ACQ.TRADE_STATUS_ERROR"
    assert caught.value.is_trade_status_error
    assert gateway.query(out_trade_no).trade_status == "TRADE_SUCCESS"


def test_refund_with_the_same_out_request_no_refunds_once(
    gateway: AlipayGateway, sandbox: SandboxServer
) -> None:
    out_trade_no = paid_trade(gateway, sandbox, "59.90")

    first = gateway.refund(out_trade_no, Decimal("20.00"), f"{out_trade_no}-R1")
    second = gateway.refund(out_trade_no, Decimal("20.00"), f"{out_trade_no}-R1")

    assert (first.refund_fee, first.fund_change) == (Decimal("20.00"), True)
    assert (second.refund_fee, second.fund_change) == (Decimal("20.00"), False)
    state = trade(sandbox, out_trade_no)
    assert [r["refund_amount"] for r in state["refunds"]] == ["20.00"]
    assert (state["refunded_amount"], state["status"]) == ("20.00", "TRADE_SUCCESS")
    found = gateway.refund_query(out_trade_no, f"{out_trade_no}-R1")
    assert (found["refund_amount"], found["refund_status"]) == ("20.00", "REFUND_SUCCESS")
    assert "refund_amount" not in gateway.refund_query(out_trade_no, f"{out_trade_no}-R9")


def test_refund_beyond_what_is_left_is_refused_and_full_refund_closes(
    gateway: AlipayGateway, sandbox: SandboxServer
) -> None:
    out_trade_no = paid_trade(gateway, sandbox, "59.90")
    gateway.refund(out_trade_no, Decimal("20.00"), f"{out_trade_no}-R1")

    with pytest.raises(AlipayBusinessError) as caught:
        gateway.refund(out_trade_no, Decimal("39.91"), f"{out_trade_no}-R2")
    assert caught.value.sub_code == "ACQ.REFUND_AMT_NOT_EQUAL_TOTAL"

    rest = gateway.refund(out_trade_no, Decimal("39.90"), f"{out_trade_no}-R3")
    assert (rest.refund_fee, rest.fund_change) == (Decimal("59.90"), True)
    assert gateway.query(out_trade_no).trade_status == "TRADE_CLOSED"
    assert trade(sandbox, out_trade_no)["close_reason"] == "REFUNDED_IN_FULL"


def test_refund_of_unpaid_trade_is_refused(gateway: AlipayGateway) -> None:
    out_trade_no = new_order()
    open_cashier(gateway, out_trade_no)

    with pytest.raises(TradeStatusError):
        gateway.refund(out_trade_no, Decimal("1.00"), f"{out_trade_no}-R1")


def test_api_call_signed_with_another_merchant_key_is_40002(
    sandbox: SandboxServer, keys: dict[str, Path], other_keys: dict[str, Path]
) -> None:
    stranger = make_gateway(sandbox.gateway_url, keys, None, app_private=other_keys["app_private"])

    with pytest.raises(AlipayBusinessError) as caught:
        stranger.query("NOPE")

    assert (caught.value.code, caught.value.sub_code) == ("40002", "isv.invalid-signature")


def test_answer_not_signed_by_the_trusted_alipay_key_is_unavailable(
    sandbox: SandboxServer, keys: dict[str, Path], other_keys: dict[str, Path]
) -> None:
    fooled = make_gateway(
        sandbox.gateway_url, keys, None, alipay_public=other_keys["alipay_public"]
    )

    with pytest.raises(AlipayUnavailable):
        fooled.query("NOPE")


def test_sandbox_down_is_unavailable(keys: dict[str, Path]) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    down = make_gateway(f"http://127.0.0.1:{port}/gateway.do", keys, None)

    with pytest.raises(AlipayUnavailable):
        down.query("ORDER_X")


# --- keys and the process ---------------------------------------------------------


def test_ensure_keys_is_safe_when_raced(tmp_path: Path) -> None:
    results: list[dict[str, Path]] = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_keys(tmp_path / "k")))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert len(results) == 4
    paths = results[0]
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == [
        "alipay_private.pem",
        "alipay_public.pem",
        "app_private.pem",
        "app_public.pem",
    ]
    for owner in ("app", "alipay"):
        private, public = paths[f"{owner}_private"], paths[f"{owner}_public"]
        assert private.stat().st_mode & 0o777 == 0o600
        assert private.read_text().startswith("-----BEGIN PRIVATE KEY-----")
        assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
        signature = load_private_key(private).sign(b"m", padding.PKCS1v15(), hashes.SHA256())
        load_public_key(public).verify(signature, b"m", padding.PKCS1v15(), hashes.SHA256())
    before = {name: p.read_bytes() for name, p in paths.items()}
    assert {n: p.read_bytes() for n, p in ensure_keys(tmp_path / "k").items()} == before


def test_module_starts_prints_one_line_and_stops_on_sigterm(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "SANDBOX_NOTIFY_SCHEDULE": "0.5,1,2"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "local.alipay_sandbox",
            "--port",
            "0",
            "--keys",
            str(tmp_path / "keys"),
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert LOCAL_APP_ID in line and LOCAL_SELLER_ID in line
        assert str(tmp_path / "keys") in line and "notify_schedule=0.5,1,2" in line
        gateway_url = next(w for w in line.split() if w.endswith("/gateway.do"))
        status, body = get(gateway_url.replace("/gateway.do", "/health"))
        assert (status, json.loads(body)) == (200, {"status": "ok"})
    finally:
        process.send_signal(signal.SIGTERM)
        rest, stderr = process.communicate(timeout=10)
    assert process.returncode == 0, stderr
    assert rest == ""  # one line on stdout, the logs go to stderr
    logs = [json.loads(line) for line in stderr.splitlines()]
    assert logs[-1]["message"] == "sandbox stopped"
