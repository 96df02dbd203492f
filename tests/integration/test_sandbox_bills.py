"""The sandbox's bills through python-alipay-sdk (AlipayGateway.bill_url and
download_bill): the day's trades and refunds as rows, Alipay's refusals, the
URL's 30 seconds, and the test hook's edits, read back with chalicelib.bill."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from chalicelib.alipay_gateway import BILL_METHOD, AlipayBusinessError, AlipayGateway
from chalicelib.bill import BillError, BillReader, RowKind
from chalicelib.ports import PaymentRefused, PaymentUnavailable
from local.alipay_sandbox import SandboxServer, make_server
from local.alipay_sandbox.faults import GatewayFaults
from local.alipay_sandbox.keys import ensure_keys
from local.alipay_sandbox.signer import SHANGHAI
from tests.integration.test_alipay_sandbox import (
    SCHEDULE,
    make_gateway,
    new_order,
    open_cashier,
    post_form,
)
from tests.integration.test_sandbox_refunds import serving


class Clock:
    """The sandbox's clock: real time plus what a test adds."""

    def __init__(self) -> None:
        self.ahead = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.ahead


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return ensure_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture
def clock() -> Clock:
    return Clock()


def start(keys: dict[str, Path], clock: Clock, today: bool,
          faults: GatewayFaults | None = None) -> Any:
    return serving(make_server("127.0.0.1", 0, keys["app_private"].parent, SCHEDULE,
                               clock=clock, refund_notify=False, refund_rule="alipay",
                               bills_today=today, faults=faults or GatewayFaults()))


@pytest.fixture
def sandbox(keys: dict[str, Path], clock: Clock) -> Iterator[SandboxServer]:
    with start(keys, clock, today=True) as server:
        yield server


@pytest.fixture
def gateway(sandbox: SandboxServer, keys: dict[str, Path]) -> AlipayGateway:
    return make_gateway(sandbox.gateway_url, keys, None)


def today(clock: Clock) -> date:
    return clock().astimezone(SHANGHAI).date()


def paid(gateway: AlipayGateway, sandbox: SandboxServer, amount: str) -> str:
    out_trade_no = new_order()
    open_cashier(gateway, out_trade_no, amount)
    status, _, body = post_form(sandbox, "/sandbox/pay", {"out_trade_no": out_trade_no,
                                                          "notify": "drop"})
    assert status == 302, body
    return out_trade_no


def read(gateway: AlipayGateway, day: date) -> tuple[list[Any], Any]:
    rows, totals, _ = read_bill(gateway, day)
    return rows, totals


def read_bill(gateway: AlipayGateway, day: date) -> tuple[list[Any], Any, str]:
    url = gateway.bill_url(day)
    assert url is not None
    return read_url(gateway, url)


def read_url(gateway: AlipayGateway, url: str) -> tuple[list[Any], Any, str]:
    out = io.BytesIO()
    size = gateway.download_bill(url, out)
    assert size == len(out.getvalue()) > 0
    out.seek(0)
    with BillReader(out) as bill:
        rows = list(bill.rows())
        return rows, bill.totals(), bill.account


def edit(sandbox: SandboxServer, day: date, body: Any, method: str = "POST") -> tuple[int, Any]:
    data = None if body is None else (body if isinstance(body, bytes)
                                      else json.dumps(body).encode())
    request = urllib.request.Request(f"{sandbox.base_url}/sandbox/bills/{day}/edits",
                                     data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_bill_has_the_days_payments_and_refunds(gateway: AlipayGateway,
                                                    sandbox: SandboxServer,
                                                    clock: Clock) -> None:
    day = today(clock)
    a = paid(gateway, sandbox, "59.90")
    b = paid(gateway, sandbox, "19.90")
    refund = gateway.refund_payment(a, Decimal("10.00"), f"REFUND_{a}_1")
    assert refund.moved
    if today(clock) != day:
        pytest.skip("the payments straddle midnight in Asia/Shanghai")
    rows, totals, account = read_bill(gateway, day)
    assert account == f"{sandbox.seller_id}0156"
    payments = {r.out_trade_no: r for r in rows if r.kind == RowKind.PAYMENT}
    assert {o: r.amount_fen for o, r in payments.items()} == {a: 5990, b: 1990}
    (back,) = [r for r in rows if r.kind == RowKind.REFUND]
    assert (back.out_trade_no, back.request_no, back.amount_fen) == (a, f"REFUND_{a}_1", -1000)
    assert back.trade_no == payments[a].trade_no
    assert (totals.payments, totals.payments_fen, totals.refunds) == (2, 7980, 1)
    assert totals.refunds_fen == -1000


def test_today_and_later_are_refused_as_alipay_refuses_them(keys: dict[str, Path],
                                                            clock: Clock) -> None:
    with start(keys, clock, today=False) as server:
        gateway = make_gateway(server.gateway_url, keys, None)
        for day in (today(clock), today(clock) + timedelta(days=1)):
            with pytest.raises(AlipayBusinessError) as refused:
                gateway.bill_url(day)
            assert refused.value.reason == "isv.invalid_arguments"
            assert isinstance(refused.value, PaymentRefused)
            assert refused.value.detail.startswith("入参不合法")
        assert gateway.bill_url(today(clock) - timedelta(days=1)) is None  # no trade


def test_a_day_without_rows_has_no_bill(gateway: AlipayGateway, clock: Clock) -> None:
    assert gateway.bill_url(today(clock) - timedelta(days=3)) is None


def test_the_url_works_for_thirty_seconds(gateway: AlipayGateway, sandbox: SandboxServer,
                                          clock: Clock) -> None:
    day = today(clock) - timedelta(days=2)
    assert edit(sandbox, day, {"add": [{"trade_no": "T1", "out_trade_no": "O1",
                                        "type": "交易", "amount": "1.00"}]})[0] == 200
    url = gateway.bill_url(day)
    assert url is not None
    clock.ahead = timedelta(seconds=29)
    gateway.download_bill(url, io.BytesIO())
    clock.ahead = timedelta(seconds=31)
    with pytest.raises(PaymentUnavailable, match="404"):
        gateway.download_bill(url, io.BytesIO())


def test_each_edit_shows_in_the_bill(gateway: AlipayGateway, sandbox: SandboxServer,
                                     clock: Clock) -> None:
    day = today(clock)
    a = paid(gateway, sandbox, "59.90")
    b = paid(gateway, sandbox, "19.90")
    if today(clock) != day:
        pytest.skip("the payments straddle midnight in Asia/Shanghai")
    rows, _ = read(gateway, day)
    trade_b = next(r.trade_no for r in rows if r.out_trade_no == b)
    trade_a = next(r.trade_no for r in rows if r.out_trade_no == a)
    status, _ = edit(sandbox, day, {
        "add": [{"trade_no": "2026STRANGER", "out_trade_no": "ORDER_stranger", "type": "交易",
                 "amount": "9.90"},
                {"trade_no": trade_a, "out_trade_no": a, "type": "退款", "amount": "3.00",
                 "out_request_no": "CONSOLE_1"}],
        "drop": [trade_b]})
    assert status == 200
    assert edit(sandbox, day, {"amounts": {trade_a: "1.00"}})[0] == 200  # they add up
    rows, totals = read(gateway, day)
    seen = {(r.kind, r.out_trade_no, r.request_no, r.amount_fen) for r in rows}
    assert seen == {(RowKind.PAYMENT, a, None, 100),
                    (RowKind.PAYMENT, "ORDER_stranger", None, 990),
                    (RowKind.REFUND, a, "CONSOLE_1", -300)}
    assert (totals.payments, totals.payments_fen) == (2, 1090)
    assert edit(sandbox, day, None, method="DELETE")[0] == 200
    rows, _ = read(gateway, day)
    assert {r.out_trade_no for r in rows} == {a, b}


@pytest.mark.parametrize("corrupt", ["not-zip", "utf8", "no-footer", "bad-total",
                                     "bad-amount"])
def test_each_corruption_is_a_bill_the_parser_refuses(gateway: AlipayGateway,
                                                      sandbox: SandboxServer, clock: Clock,
                                                      corrupt: str) -> None:
    day = today(clock) - timedelta(days=5)
    edit(sandbox, day, {"add": [{"trade_no": "T1", "out_trade_no": "O1", "amount": "1.00"}],
                        "corrupt": corrupt})
    with pytest.raises(BillError):
        read(gateway, day)
    edit(sandbox, day, {"corrupt": None})
    rows, _ = read(gateway, day)
    assert [r.trade_no for r in rows] == ["T1"]


@pytest.mark.parametrize("body", [
    b"not json", [], {"add": "x"}, {"add": [{"trade_no": "T1", "out_trade_no": "O1",
                                              "amount": "1.5"}]},
    {"add": [{"trade_no": "T1", "out_trade_no": "O1", "amount": "1.00", "type": "其他"}]},
    {"add": [{"trade_no": "T1", "out_trade_no": "O1", "amount": "1.00", "type": "退款"}]},
    {"add": [{"trade_no": "T1", "out_trade_no": "O1", "amount": "1.00",
              "time": "2020-01-01 10:00:00"}]},
    {"add": [{"trade_no": "T 1", "out_trade_no": "O1", "amount": "1.00"}]},
    {"drop": "T1"}, {"amounts": {"T1": "-1.00"}}, {"amounts": {"T1": 1.0}},
    {"corrupt": "gzip"}, {"colour": "red"}])
def test_bad_edits_are_400_and_change_nothing(sandbox: SandboxServer, gateway: AlipayGateway,
                                              clock: Clock, body: Any) -> None:
    day = today(clock) - timedelta(days=4)
    status, answer = edit(sandbox, day, body)
    assert status == 400 and answer["error"] == "BAD_REQUEST", answer
    assert gateway.bill_url(day) is None


def one_row(sandbox: SandboxServer, day: date, amount: str = "1.00") -> None:
    status, answer = edit(sandbox, day, {"add": [{"trade_no": "T1", "out_trade_no": "O1",
                                                  "type": "交易", "amount": amount}]})
    assert status == 200, answer


@pytest.mark.parametrize("biz", [
    {"bill_type": "signcustomer"}, {"bill_type": "TRADE"}, {"bill_type": None},
    {"bill_date": "2020-11"}, {"bill_date": "2020-W48-1"}, {"bill_date": "20201201"},
    {"bill_date": "2020/12/01"}, {"bill_date": "2021-02-30"}, {"bill_date": None}])
def test_a_bad_bill_type_or_date_is_refused_as_invalid_arguments(
        gateway: AlipayGateway, sandbox: SandboxServer, biz: dict[str, Any]) -> None:
    one_row(sandbox, date(2020, 12, 1))  # the day exists: only the arguments are wrong
    request = {"bill_type": "trade", "bill_date": "2020-12-01", **biz}
    with pytest.raises(AlipayBusinessError) as refused:
        gateway._call(BILL_METHOD, {k: v for k, v in request.items() if v is not None})
    assert (refused.value.code, refused.value.reason) == ("40004", "isv.invalid_arguments")
    assert gateway.bill_url(date(2020, 12, 1)) is not None


@pytest.mark.parametrize("kind", ["unsigned", "badsign", "5xx"])
def test_an_answer_without_alipays_signature_is_no_answer(keys: dict[str, Path], clock: Clock,
                                                           kind: str) -> None:
    faults = GatewayFaults(rate=1.0, kinds=(kind,), methods=(BILL_METHOD,))
    with start(keys, clock, today=False, faults=faults) as server:
        gateway = make_gateway(server.gateway_url, keys, None)
        day = today(clock) - timedelta(days=1)
        one_row(server, day)
        with pytest.raises(PaymentUnavailable):
            gateway.bill_url(day)
        with pytest.raises(PaymentUnavailable):  # not even "no bill" is believed unsigned
            gateway.bill_url(day - timedelta(days=1))


def test_an_issued_file_keeps_what_it_said(gateway: AlipayGateway, sandbox: SandboxServer,
                                          clock: Clock) -> None:
    """The file is made when its URL is issued: later edits show in the next URL's."""
    day = today(clock) - timedelta(days=6)
    one_row(sandbox, day, "5.00")
    first = gateway.bill_url(day)
    assert first is not None
    assert edit(sandbox, day, {"amounts": {"T1": "7.00"}})[0] == 200
    rows, _, _ = read_url(gateway, first)
    assert [r.amount_fen for r in rows] == [500]
    rows, totals = read(gateway, day)
    assert [r.amount_fen for r in rows] == [700]
    assert (totals.payments, totals.payments_fen) == (1, 700)


def test_an_expired_or_unknown_url_is_a_plain_404(gateway: AlipayGateway,
                                                 sandbox: SandboxServer, clock: Clock) -> None:
    day = today(clock) - timedelta(days=2)
    one_row(sandbox, day)
    url = gateway.bill_url(day)
    assert url is not None and url.startswith(f"{sandbox.base_url}/")
    with urllib.request.urlopen(url, timeout=5) as answer:
        assert answer.status == 200
    clock.ahead = timedelta(seconds=30)
    for stale in (url, url[: url.rindex("=") + 1] + "0" * 32):
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(stale, timeout=5)
        assert caught.value.code == 404
        caught.value.close()


def test_refund_rows_are_edited_by_their_request_no(gateway: AlipayGateway,
                                                    sandbox: SandboxServer,
                                                    clock: Clock) -> None:
    day = today(clock)
    a = paid(gateway, sandbox, "59.90")
    assert gateway.refund_payment(a, Decimal("10.00"), f"R1_{a}").moved
    assert gateway.refund_payment(a, Decimal("5.00"), f"R2_{a}").moved
    if today(clock) != day:
        pytest.skip("the payment and refunds straddle midnight in Asia/Shanghai")
    assert edit(sandbox, day, {"amounts": {f"R1_{a}": "2.00"}, "drop": [f"R2_{a}"]})[0] == 200
    rows, totals = read(gateway, day)
    assert sorted((r.kind, r.request_no, r.amount_fen) for r in rows) == [
        (RowKind.PAYMENT, None, 5990), (RowKind.REFUND, f"R1_{a}", -200)]
    assert (totals.refunds, totals.refunds_fen) == (1, -200)


def test_edits_add_up_and_a_later_corruption_replaces_the_earlier(
        gateway: AlipayGateway, sandbox: SandboxServer, clock: Clock) -> None:
    day = today(clock) - timedelta(days=7)
    row = {"trade_no": "T1", "out_trade_no": "O1", "amount": "1.00"}
    assert edit(sandbox, day, {"add": [row], "corrupt": "not-zip"})[1]["edits"]["added"] == 1
    _, answer = edit(sandbox, day, {"add": [{**row, "trade_no": "T2", "out_trade_no": "O2",
                                             "time": f"{day} 08:30:00"}],
                                    "corrupt": "bad-total"})
    assert answer["edits"] == {"added": 2, "drop": [], "amounts": {}, "corrupt": "bad-total"}
    _, answer = edit(sandbox, day, {"drop": ["T9"]})  # no corrupt key: it stays
    assert answer["edits"]["corrupt"] == "bad-total"
    with pytest.raises(BillError) as refused:
        read(gateway, day)
    assert "not a zip" not in str(refused.value)
    assert edit(sandbox, day, {"corrupt": None})[1]["edits"]["corrupt"] is None
    rows, totals = read(gateway, day)
    assert [(r.trade_no, r.finished_at) for r in rows] == [
        ("T1", datetime.combine(day, datetime.min.time(), SHANGHAI).replace(hour=12)),
        ("T2", datetime.combine(day, datetime.min.time(), SHANGHAI).replace(hour=8, minute=30)),
    ]
    assert (totals.payments, totals.payments_fen) == (2, 200)


def test_a_corruption_alone_makes_no_bill(gateway: AlipayGateway, sandbox: SandboxServer,
                                          clock: Clock) -> None:
    day = today(clock) - timedelta(days=8)
    for corrupt in ("bad-amount", "not-zip"):
        assert edit(sandbox, day, {"corrupt": corrupt})[0] == 200
        assert gateway.bill_url(day) is None  # no row, no file to corrupt


def test_edits_of_a_day_that_is_no_day_are_400(sandbox: SandboxServer) -> None:
    for method, body in (("POST", {"drop": ["T1"]}), ("DELETE", None)):
        request = urllib.request.Request(f"{sandbox.base_url}/sandbox/bills/2026-13-01/edits",
                                         data=None if body is None else json.dumps(body).encode(),
                                         method=method)
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=5)
        assert caught.value.code == 400
        assert json.loads(caught.value.read())["error"] == "BAD_REQUEST"


REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("env, expected", [("1", True), ("0", False), (None, False)])
def test_bills_today_comes_from_the_environment_unless_given(
        keys: dict[str, Path], monkeypatch: pytest.MonkeyPatch, env: str | None,
        expected: bool) -> None:
    if env is None:
        monkeypatch.delenv("SANDBOX_BILLS_TODAY", raising=False)
    else:
        monkeypatch.setenv("SANDBOX_BILLS_TODAY", env)
    for given, serves in ((None, expected), (not expected, not expected)):
        server = make_server("127.0.0.1", 0, keys["app_private"].parent, SCHEDULE,
                             bills_today=given, faults=GatewayFaults())
        try:
            assert server.bills.serve_today is serves
        finally:
            server.server_close()

    monkeypatch.setenv("SANDBOX_BILLS_TODAY", "maybe")
    with pytest.raises(ValueError, match="SANDBOX_BILLS_TODAY"):
        make_server("127.0.0.1", 0, keys["app_private"].parent, SCHEDULE,
                    faults=GatewayFaults())


@pytest.mark.parametrize("flag, shown", [(None, "bills_today=1"), ("0", "bills_today=0")])
def test_the_module_takes_bills_today_from_its_flag_else_the_env(
        tmp_path: Path, flag: str | None, shown: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "SANDBOX_BILLS_TODAY": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "local.alipay_sandbox", "--port", "0", "--keys",
         str(tmp_path / "keys"), *(["--bills-today", flag] if flag else [])],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=10)
    assert process.returncode == 0, stderr
    assert shown in line.split()
