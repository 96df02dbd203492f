"""The daily reconciliation against the local Alipay sandbox's bills, through
python-alipay-sdk (AlipayGateway), on moto's DynamoDB.

A day of real sandbox trades reads BALANCED; the sandbox's test hook
(`POST /sandbox/bills/{day}/edits`) produces each kind of difference on a past
day whose payments the shop recorded from notifies signed with the sandbox's
key; a cancelled order paid through its old link, its notify lost, is found by
the reconciliation alone and refunded; each bad bill fails the run, and the
next run after a good bill is BALANCED.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import pytest

from chalicelib import config, handlers, reconcile, refunds
from chalicelib.alipay_gateway import AlipayGateway
from chalicelib.context import Deps
from chalicelib.domain import CLOSED, PAID, REFUNDED, RefundStatus
from chalicelib.domain.reconciliation import SHANGHAI, bill_day
from local.alipay_sandbox import SandboxServer, make_server
from local.alipay_sandbox.keys import ensure_keys
from tests.conftest import Clock, DictArchive, FakePublisher, alipay_pay_msg, check_due
from tests.integration.test_alipay_sandbox import (
    SCHEDULE,
    Merchant,
    make_gateway,
    merchant_server,
    open_cashier,
    post_form,
    trade,
)
from tests.integration.test_sandbox_refunds import serving


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return ensure_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def merchant() -> Iterator[Merchant]:
    with merchant_server() as state:
        yield state


@pytest.fixture
def sandbox(keys: dict[str, Path]) -> Iterator[SandboxServer]:
    with serving(make_server("127.0.0.1", 0, keys["app_private"].parent, SCHEDULE,
                             refund_notify=False, refund_rule="alipay",
                             bills_today=True)) as server:
        yield server


@pytest.fixture
def d(tables: Any, sandbox: SandboxServer, keys: dict[str, Path],
      merchant: Merchant) -> Iterator[Deps]:
    gateway: AlipayGateway = make_gateway(sandbox.gateway_url, keys, merchant.url)
    yield Deps(settings=config.load(), store=tables, broker=FakePublisher(), clock=Clock(),
               gateway=gateway, archive=DictArchive())


def edits(sandbox: SandboxServer, day: date, body: dict[str, Any] | None) -> None:
    request = urllib.request.Request(
        f"{sandbox.base_url}/sandbox/bills/{day.isoformat()}/edits",
        data=json.dumps(body).encode() if body is not None else None,
        method="POST" if body is not None else "DELETE",
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as answer:
        assert answer.status in (200, 204)


def today() -> date:
    return datetime.now(UTC).astimezone(SHANGHAI).date()


def noon(day: date) -> datetime:
    return datetime.combine(day, time(12), SHANGHAI).astimezone(UTC)


def cart_order(d: Deps, user: str, goods: str = "g1") -> dict[str, Any]:
    d.store.set_cart_line(user, goods, 1)
    return handlers.create_order(d, user)


def paid_at_sandbox(d: Deps, sandbox: SandboxServer, user: str) -> dict[str, Any]:
    """An order paid at the sandbox, its notify lost; the shop learns of it by its check."""
    o = cart_order(d, user)
    assert d.gateway is not None
    open_cashier(d.gateway, o["id"], o["totalMoney"])  # type: ignore[arg-type]
    status, _, page = post_form(sandbox, "/sandbox/pay", {"out_trade_no": o["id"],
                                                          "notify": "drop"})
    assert status == 302, page
    return o


def paid_by_notify(d: Deps, keys: dict[str, Path], user: str, trade_no: str,
                   at: datetime) -> dict[str, Any]:
    """An order the shop recorded PAID at `at` from a notify signed with the sandbox's
    key (the sandbox itself holds no such trade: the day's bill is what edits say)."""
    o = cart_order(d, user)
    handlers.on_paid(d, alipay_pay_msg(keys, o["id"], trade_no, o["totalMoney"], paid_at=at))
    assert d.store.get_order(o["id"]).status == PAID
    return o


def kinds(report: dict[str, Any]) -> list[tuple[str, str]]:
    return sorted((x["kind"], x["refundId"] if x["entry"] == "REFUND" else x["tradeNo"])
                  for x in report["differences"])


def test_a_day_of_sandbox_trades_is_balanced_with_matching_sums(
        d: Deps, sandbox: SandboxServer) -> None:
    a = paid_at_sandbox(d, sandbox, "rc-alice")
    b = paid_at_sandbox(d, sandbox, "rc-bob")
    for o in (a, b):
        check_due(d, o["id"])
        d.clock.now = None  # type: ignore[attr-defined]
    refund, _ = refunds.request_refund(d, "carol", a["id"], "5.00", "one cup back", None)
    assert refund.status == RefundStatus.SUCCEEDED
    day = bill_day(d.store.get_order(a["id"]).pay_time)
    if {bill_day(d.store.get_order(b["id"]).pay_time), bill_day(refund.finish_time)} != {day}:
        pytest.skip("the trades straddle midnight in Asia/Shanghai: two bills, not one")
    report = reconcile.run_day(d, day).to_wire()
    assert report["status"] == "BALANCED", report
    assert report["alipay"] == report["shop"]
    assert report["alipay"]["refundsTotal"] == "-5.00"
    assert report["billKey"] in d.archive.kept  # type: ignore[union-attr]


def test_each_kind_of_difference_is_named_once_and_nothing_else(
        d: Deps, sandbox: SandboxServer, keys: dict[str, Path]) -> None:
    day = today() - timedelta(days=40)
    for n in range(3):
        edits(sandbox, day + timedelta(days=n), None)
    matched = paid_by_notify(d, keys, "rk-alice", "RK1", noon(day))
    short = paid_by_notify(d, keys, "rk-bob", "RK2", noon(day))
    missing = paid_by_notify(d, keys, "rk-cleo", "RK3", noon(day))
    unpaid = cart_order(d, "rk-dan")
    edits(sandbox, day, {"add": [
        {"trade_no": "RK1", "out_trade_no": matched["id"], "type": "交易", "amount": "19.90"},
        {"trade_no": "RK2", "out_trade_no": short["id"], "type": "交易", "amount": "19.90"},
        {"trade_no": "RK4", "out_trade_no": unpaid["id"], "type": "交易", "amount": "19.90"},
        {"trade_no": "RK9", "out_trade_no": "ORDER_rk_unknown", "type": "交易",
         "amount": "3.00"},
        {"trade_no": "RK1", "out_trade_no": matched["id"], "type": "退款", "amount": "2.00",
         "out_request_no": "CONSOLE_RK1"}]})
    edits(sandbox, day, {"amounts": {"RK2": "1.00"}})
    first = reconcile.run_day(d, day).to_wire()
    assert [c["tradeNo"] for c in first["carried"]] == ["RK3"]
    reconcile.run_day(d, day + timedelta(days=1))
    reconcile.run_day(d, day + timedelta(days=2))  # now RK3 is in no bill of the days after
    report = reconcile.get_report(d, day.isoformat())
    assert kinds(report) == sorted([
        ("AMOUNT_MISMATCH", "RK2"), ("SHOP_ONLY", "RK3"), ("STATUS_MISMATCH", "RK4"),
        ("ALIPAY_ONLY", "RK9"), ("ALIPAY_ONLY", "CONSOLE_RK1")])
    assert report["status"] == "DIFFERENCES" and report["carried"] == []
    assert {x["orderId"] for x in report["differences"]} >= {short["id"], missing["id"],
                                                             unpaid["id"]}
    again = reconcile.run_day(d, day).to_wire()  # the same report, nothing twice
    assert sorted(x["id"] for x in again["differences"]) == sorted(
        x["id"] for x in report["differences"])


def test_a_cancelled_order_paid_through_its_old_link_is_found_and_refunded(
        d: Deps, sandbox: SandboxServer) -> None:
    """Only the reconciliation runs here: no notify (dropped), no check (the order was
    closed by its cancel), no sweep of the closed orders."""
    o = cart_order(d, "rc-erin")
    handlers.cancel_order(d, "rc-erin", o["id"])  # Alipay has no trade yet: closed
    assert d.store.get_order(o["id"]).status == CLOSED
    assert d.gateway is not None
    open_cashier(d.gateway, o["id"], o["totalMoney"])  # type: ignore[arg-type]
    status, _, page = post_form(sandbox, "/sandbox/pay", {"out_trade_no": o["id"],
                                                          "notify": "drop"})
    assert status == 302, page
    paid = trade(sandbox, o["id"])
    day = today()
    if day != bill_day(datetime.now(UTC) - timedelta(seconds=5)):
        pytest.skip("paid a moment before midnight in Asia/Shanghai: tomorrow's bill")
    report = reconcile.run_day(d, day).to_wire()
    (diff,) = [x for x in report["differences"] if x["orderId"] == o["id"]]
    assert diff["kind"] == "STATUS_MISMATCH" and diff["tradeNo"] == paid["trade_no"]
    assert diff["action"]["refundStatus"] == "SUCCEEDED"
    assert diff["resolved"] is True and diff["resolvedBy"] == "system"
    assert d.store.get_order(o["id"]).status == REFUNDED
    assert trade(sandbox, o["id"])["refunded_amount"] == o["totalMoney"]
    reconcile.run_day(d, day)  # again: no second refund
    assert len(trade(sandbox, o["id"])["refunds"]) == 1


@pytest.mark.parametrize("corrupt, words", [
    ("not-zip", "not a zip"), ("utf8", "GBK"), ("no-footer", "footer"),
    ("bad-total", "total"), ("bad-amount", "amount")])
def test_each_bad_bill_fails_and_a_good_one_then_balances(
        d: Deps, sandbox: SandboxServer, keys: dict[str, Path], corrupt: str,
        words: str) -> None:
    day = today() - timedelta(days=60)
    edits(sandbox, day, None)
    o = paid_by_notify(d, keys, f"rb-{corrupt}", f"RB{corrupt}", noon(day))
    edits(sandbox, day, {"add": [{"trade_no": f"RB{corrupt}", "out_trade_no": o["id"],
                                  "type": "交易", "amount": "19.90"}], "corrupt": corrupt})
    failed = reconcile.run_day(d, day).to_wire()
    assert failed["status"] == "FAILED" and failed["differences"] == []
    assert words.lower() in failed["reason"].lower(), failed["reason"]
    assert failed["billKey"] and failed["billKey"] in failed["reason"]
    edits(sandbox, day, {"corrupt": None})
    good = reconcile.run_day(d, day).to_wire()
    assert good["status"] == "BALANCED", good
    assert good["alipay"] == good["shop"] == {"payments": 1, "paymentsTotal": "19.90",
                                              "refunds": 0, "refundsTotal": "0.00"}
