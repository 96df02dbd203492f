"""The sandbox's bills through python-alipay-sdk (AlipayGateway.bill_url and
download_bill): the day's trades and refunds as rows, Alipay's refusals, the
URL's 30 seconds, and the test hook's edits, read back with chalicelib.bill."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from chalicelib.alipay_gateway import AlipayBusinessError, AlipayGateway
from chalicelib.bill import BillError, BillReader, RowKind
from chalicelib.ports import PaymentUnavailable
from local.alipay_sandbox import SandboxServer, make_server
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


def start(keys: dict[str, Path], clock: Clock, today: bool) -> Any:
    return serving(make_server("127.0.0.1", 0, keys["app_private"].parent, SCHEDULE,
                               clock=clock, refund_notify=False, refund_rule="alipay",
                               bills_today=today))


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
    url = gateway.bill_url(day)
    assert url is not None
    out = io.BytesIO()
    size = gateway.download_bill(url, out)
    assert size == len(out.getvalue()) > 0
    out.seek(0)
    with BillReader(out) as bill:
        rows = list(bill.rows())
        return rows, bill.totals()


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
    rows, totals = read(gateway, day)
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
            assert refused.value.reason == "isv.invalid-arguments"
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
    {"drop": "T1"}, {"amounts": {"T1": "-1.00"}}, {"corrupt": "gzip"}, {"colour": "red"}])
def test_bad_edits_are_400_and_change_nothing(sandbox: SandboxServer, gateway: AlipayGateway,
                                              clock: Clock, body: Any) -> None:
    day = today(clock) - timedelta(days=4)
    status, answer = edit(sandbox, day, body)
    assert status == 400 and answer["error"] == "BAD_REQUEST", answer
    assert gateway.bill_url(day) is None
