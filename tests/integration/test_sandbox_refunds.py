"""Refunds at the local Alipay sandbox, through python-alipay-sdk (AlipayGateway).

What Alipay does with refunds (CONTRACT.md, "The local Alipay sandbox"): partial
refunds each under its own out_request_no, a repeat that moves nothing, the
refusals (another amount for the same request, a bad amount, too much), the
test hook's faults (a refusal; the unknown outcome, with the refund made or
not), the refund notifies, ``fastpay.refund.query`` and the sandbox's own
one-full-refund rule. Raw answers are read with the SDK's ``server_api``, which
checks the answer's signature before it hands back the object.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from chalicelib.alipay_gateway import AlipayBusinessError, AlipayGateway, AlipayUnavailable
from chalicelib.ports import (
    NoticeKind,
    PaymentRefused,
    PaymentUnavailable,
    RefundOutcome,
    RefundState,
    TradeState,
)
from local.alipay_sandbox import SandboxServer, make_server
from local.alipay_sandbox.keys import ensure_keys
from tests.integration.test_alipay_sandbox import (
    NOTIFY_FIELDS,
    REPO,
    SCHEDULE,
    Merchant,
    make_gateway,
    merchant_server,
    new_order,
    open_cashier,
    post_form,
    trade,
)
from tests.waiting import wait_until

REFUND = "alipay.trade.refund"
REFUND_QUERY = "alipay.trade.fastpay.refund.query"
REFUND_NOTIFY_FIELDS = NOTIFY_FIELDS | {"refund_fee", "gmt_refund", "out_biz_no"}


# --- fixtures --------------------------------------------------------------------


@pytest.fixture(scope="module")
def merchant() -> Iterator[Merchant]:
    with merchant_server() as state:
        yield state


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return ensure_keys(tmp_path_factory.mktemp("keys"))


@contextmanager
def serving(server: SandboxServer) -> Iterator[SandboxServer]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def sandbox(keys: dict[str, Path]) -> Iterator[SandboxServer]:
    with serving(make_server("127.0.0.1", 0, keys["app_private"].parent, SCHEDULE,
                             refund_notify=True, refund_rule="alipay")) as server:
        yield server


@pytest.fixture(scope="module")
def gateway(sandbox: SandboxServer, keys: dict[str, Path], merchant: Merchant) -> AlipayGateway:
    return make_gateway(sandbox.gateway_url, keys, merchant.url)


# --- helpers ---------------------------------------------------------------------


def pay(gateway: AlipayGateway, sandbox: SandboxServer, amount: str = "59.90",
        drop_notify: bool = True) -> str:
    """A paid trade (its payment notify dropped by default: only refund notifies arrive)."""
    out_trade_no = new_order()
    open_cashier(gateway, out_trade_no, amount)
    form = {"out_trade_no": out_trade_no, **({"notify": "drop"} if drop_notify else {})}
    status, _, body = post_form(sandbox, "/sandbox/pay", form)
    assert status == 302, body
    return out_trade_no


def raw(gateway: AlipayGateway, method: str, biz: dict[str, Any]) -> dict[str, Any]:
    """The sandbox's answer object, its signature checked by the SDK (it raises if not)."""
    answer = gateway._client.server_api(method, biz)
    assert isinstance(answer, dict)
    return answer


def raw_refund(gateway: AlipayGateway, out_trade_no: str, amount: Any,
               request_no: str) -> dict[str, Any]:
    return raw(gateway, REFUND, {"out_trade_no": out_trade_no, "refund_amount": amount,
                                 "out_request_no": request_no})


def call(sandbox: SandboxServer, method: str, path: str,
         body: bytes | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(
        sandbox.base_url + path, data=body, method=method,
        headers={"Content-Type": "application/json"} if body is not None else {},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def set_fault(sandbox: SandboxServer, out_trade_no: str, code: str,
              applied: bool = False) -> None:
    status, body = call(sandbox, "PUT", f"/sandbox/trades/{out_trade_no}/refund-fault",
                        json.dumps({"code": code, "applied": applied}).encode())
    assert (status, body) == (200, {"out_trade_no": out_trade_no,
                                    "refund_fault": {"code": code, "applied": applied}})


def clear_fault(sandbox: SandboxServer, out_trade_no: str) -> None:
    status, body = call(sandbox, "DELETE", f"/sandbox/trades/{out_trade_no}/refund-fault")
    assert (status, body) == (200, {"out_trade_no": out_trade_no, "refund_fault": None})


def refund_notifies(merchant: Merchant, out_trade_no: str) -> list[dict[str, str]]:
    return [n for n in merchant.notifies(out_trade_no) if "out_biz_no" in n]


def moved(sandbox: SandboxServer, out_trade_no: str) -> tuple[str, int, list[str]]:
    state = trade(sandbox, out_trade_no)
    return (state["refunded_amount"], state["refund_calls"],
            [r["out_request_no"] for r in state["refunds"]])


# --- partial refunds, repeats, refusals -------------------------------------------


def test_partial_refunds_each_with_its_request_no(
    gateway: AlipayGateway, sandbox: SandboxServer
) -> None:
    order = pay(gateway, sandbox)

    first = gateway.refund_payment(order, Decimal("10.00"), f"{order}-R1")
    second = gateway.refund_payment(order, Decimal("20.00"), f"{order}-R2")
    again = gateway.refund_payment(order, Decimal("10.00"), f"{order}-R1")

    trade_no = trade(sandbox, order)["trade_no"]
    assert first == RefundOutcome(order, trade_no, 1000, True)
    assert second == RefundOutcome(order, trade_no, 3000, True)
    assert again == RefundOutcome(order, trade_no, 1000, False)  # the first answer, repeated
    state = trade(sandbox, order)
    assert (state["status"], state["total_amount"], state["refunded_amount"]) == (
        "TRADE_SUCCESS", "59.90", "30.00")
    assert state["refund_calls"] == 2  # the repeat moved nothing
    assert [(r["out_request_no"], r["refund_amount"]) for r in state["refunds"]] == [
        (f"{order}-R1", "10.00"), (f"{order}-R2", "20.00")]
    assert all(r["gmt_refund"].endswith("Z") for r in state["refunds"])


def test_same_request_no_with_another_amount_is_discordant(
    gateway: AlipayGateway, sandbox: SandboxServer
) -> None:
    order = pay(gateway, sandbox)
    gateway.refund_payment(order, Decimal("10.00"), f"{order}-R1")

    with pytest.raises(PaymentRefused) as caught:
        gateway.refund_payment(order, Decimal("11.00"), f"{order}-R1")

    err = caught.value
    assert isinstance(err, AlipayBusinessError)
    assert (err.code, err.reason, err.detail) == (
        "40004", "ACQ.DISCORDANT_REPEAT_REQUEST", "不一致的请求")
    assert moved(sandbox, order) == ("10.00", 1, [f"{order}-R1"])


@pytest.mark.parametrize(
    "amount",
    ["0.00", "0", "-1.00", "1.001", "abc", "1e2", " 1.00", "100000000.01", True, [1]],
)
def test_an_amount_that_is_not_a_positive_two_decimal_number_is_refused(
    amount: Any, gateway: AlipayGateway, sandbox: SandboxServer
) -> None:
    order = pay(gateway, sandbox)

    answer = raw_refund(gateway, order, amount, f"{order}-R1")

    assert (answer["code"], answer["msg"], answer["sub_code"], answer["sub_msg"]) == (
        "40004", "Business Failed", "ACQ.REASON_TRADE_REFUND_FEE_ERR", "退款金额无效")
    assert moved(sandbox, order) == ("0.00", 0, [])


def test_a_json_number_amount_is_an_amount(
    gateway: AlipayGateway, sandbox: SandboxServer
) -> None:
    order = pay(gateway, sandbox)

    answer = raw_refund(gateway, order, 1.5, f"{order}-R1")

    assert (answer["code"], answer["refund_fee"], answer["fund_change"]) == ("10000", "1.50", "Y")


def test_more_than_what_is_left_is_refused(
    gateway: AlipayGateway, sandbox: SandboxServer
) -> None:
    order = pay(gateway, sandbox)
    gateway.refund_payment(order, Decimal("50.00"), f"{order}-R1")

    with pytest.raises(PaymentRefused) as caught:
        gateway.refund_payment(order, Decimal("9.91"), f"{order}-R2")

    assert (caught.value.reason, caught.value.detail) == (
        "ACQ.REFUND_AMT_NOT_EQUAL_TOTAL", "退款金额超限")
    assert moved(sandbox, order) == ("50.00", 1, [f"{order}-R1"])


# --- the test hook's faults ------------------------------------------------------


def test_seller_balance_not_enough_refuses_until_cleared(
    gateway: AlipayGateway, sandbox: SandboxServer, merchant: Merchant
) -> None:
    order = pay(gateway, sandbox)
    set_fault(sandbox, order, "ACQ.SELLER_BALANCE_NOT_ENOUGH")

    answer = raw_refund(gateway, order, "10.00", f"{order}-R1")
    with pytest.raises(PaymentRefused) as caught:
        gateway.refund_payment(order, Decimal("10.00"), f"{order}-R1")

    assert (answer["code"], answer["msg"], answer["sub_code"], answer["sub_msg"]) == (
        "40004", "Business Failed", "ACQ.SELLER_BALANCE_NOT_ENOUGH", "卖家余额不足")
    assert answer["out_trade_no"] == order
    assert (caught.value.reason, caught.value.detail) == (
        "ACQ.SELLER_BALANCE_NOT_ENOUGH", "卖家余额不足")
    assert moved(sandbox, order) == ("0.00", 0, [])
    assert trade(sandbox, order)["refund_fault"] == {
        "code": "ACQ.SELLER_BALANCE_NOT_ENOUGH", "applied": False}
    assert gateway.query_refund(order, f"{order}-R1") is RefundState.NOT_MADE

    clear_fault(sandbox, order)
    outcome = gateway.refund_payment(order, Decimal("10.00"), f"{order}-R1")

    assert (outcome.refunded_fen, outcome.moved) == (1000, True)
    assert moved(sandbox, order) == ("10.00", 1, [f"{order}-R1"])


def test_system_error_not_applied_is_unknown_and_moves_nothing(
    gateway: AlipayGateway, sandbox: SandboxServer, merchant: Merchant
) -> None:
    order = pay(gateway, sandbox)
    set_fault(sandbox, order, "ACQ.SYSTEM_ERROR")

    answer = raw_refund(gateway, order, "10.00", f"{order}-R1")
    with pytest.raises(PaymentUnavailable) as caught:
        gateway.refund_payment(order, Decimal("10.00"), f"{order}-R1")

    assert (answer["code"], answer["msg"], answer["sub_code"], answer["sub_msg"]) == (
        "20000", "Service Currently Unavailable", "aop.ACQ.SYSTEM_ERROR", "系统异常")
    assert isinstance(caught.value, AlipayUnavailable)
    assert (caught.value.code, caught.value.sub_code) == ("20000", "aop.ACQ.SYSTEM_ERROR")
    assert moved(sandbox, order) == ("0.00", 0, [])
    assert gateway.query_refund(order, f"{order}-R1") is RefundState.NOT_MADE

    clear_fault(sandbox, order)  # the retry, same request number, same amount
    outcome = gateway.refund_payment(order, Decimal("10.00"), f"{order}-R1")

    assert outcome.moved is True
    assert moved(sandbox, order) == ("10.00", 1, [f"{order}-R1"])


def test_system_error_applied_makes_the_refund_and_answers_the_error(
    gateway: AlipayGateway, sandbox: SandboxServer, merchant: Merchant
) -> None:
    order = pay(gateway, sandbox)
    set_fault(sandbox, order, "ACQ.SYSTEM_ERROR", applied=True)

    with pytest.raises(PaymentUnavailable):
        gateway.refund_payment(order, Decimal("10.00"), f"{order}-R1")

    assert moved(sandbox, order) == ("10.00", 1, [f"{order}-R1"])
    assert gateway.query_refund(order, f"{order}-R1") is RefundState.SUCCEEDED
    wait_until(lambda: len(refund_notifies(merchant, order)) == 1, 5.0, "the refund notified")
    # Retried while the fault holds: the error again, and nothing moves twice.
    with pytest.raises(PaymentUnavailable):
        gateway.refund_payment(order, Decimal("10.00"), f"{order}-R1")
    assert moved(sandbox, order) == ("10.00", 1, [f"{order}-R1"])

    clear_fault(sandbox, order)
    again = gateway.refund_payment(order, Decimal("10.00"), f"{order}-R1")

    assert (again.refunded_fen, again.moved) == (1000, False)
    assert moved(sandbox, order) == ("10.00", 1, [f"{order}-R1"])
    time.sleep(2 * SCHEDULE[0])
    assert len(refund_notifies(merchant, order)) == 1


def test_fault_hook_refuses_bad_bodies_and_unknown_trades(
    gateway: AlipayGateway, sandbox: SandboxServer
) -> None:
    order = pay(gateway, sandbox)
    path = f"/sandbox/trades/{order}/refund-fault"
    bad_bodies = [
        b"not json",
        b"[]",
        b"{}",
        b'{"code": "ACQ.TRADE_NOT_EXIST"}',
        b'{"code": "ACQ.SYSTEM_ERROR", "applied": "yes"}',
        b'{"code": "ACQ.SELLER_BALANCE_NOT_ENOUGH", "applied": true}',
        b'{"code": "ACQ.SYSTEM_ERROR", "aplied": true}',
        b"\xff\xfe",
    ]
    for body in bad_bodies:
        status, answer = call(sandbox, "PUT", path, body)
        assert (status, answer["error"]) == (400, "BAD_REQUEST"), body
    assert call(sandbox, "PUT", path)[0] == 400  # no body at all
    assert trade(sandbox, order)["refund_fault"] is None

    unknown = "/sandbox/trades/NOPE/refund-fault"
    assert call(sandbox, "PUT", unknown, b'{"code": "ACQ.SYSTEM_ERROR"}')[0] == 404
    assert call(sandbox, "DELETE", unknown)[0] == 404
    assert call(sandbox, "GET", unknown)[0] == 404

    status, answer = call(sandbox, "PUT", path, b'{"code": "ACQ.SYSTEM_ERROR"}')
    assert (status, answer["refund_fault"]) == (
        200, {"code": "ACQ.SYSTEM_ERROR", "applied": False})  # applied defaults to false
    assert call(sandbox, "GET", path) == (
        200, {"out_trade_no": order,
              "refund_fault": {"code": "ACQ.SYSTEM_ERROR", "applied": False}})
    clear_fault(sandbox, order)
    clear_fault(sandbox, order)  # clearing twice is fine


# --- refund notifies -------------------------------------------------------------


def test_each_refund_is_notified_and_a_full_refund_closes(
    gateway: AlipayGateway, sandbox: SandboxServer, merchant: Merchant
) -> None:
    order = pay(gateway, sandbox, drop_notify=False)
    wait_until(lambda: trade(sandbox, order)["notify_acknowledged"], 5.0, "the payment notified")

    gateway.refund_payment(order, Decimal("20.00"), f"{order}-R1")
    wait_until(lambda: len(refund_notifies(merchant, order)) == 1, 5.0, "the first refund")
    gateway.refund_payment(order, Decimal("39.90"), f"{order}-R2")
    wait_until(lambda: len(refund_notifies(merchant, order)) == 2, 5.0, "the second refund")

    payment = [n for n in merchant.notifies(order) if "out_biz_no" not in n]
    first, second = refund_notifies(merchant, order)
    assert len(payment) == 1
    assert set(first) == REFUND_NOTIFY_FIELDS
    assert set(second) == REFUND_NOTIFY_FIELDS | {"gmt_close"}
    assert (first["trade_status"], first["refund_fee"], first["out_biz_no"]) == (
        "TRADE_SUCCESS", "20.00", f"{order}-R1")
    assert (second["trade_status"], second["refund_fee"], second["out_biz_no"]) == (
        "TRADE_CLOSED", "59.90", f"{order}-R2")
    assert len({payment[0]["notify_id"], first["notify_id"], second["notify_id"]}) == 3
    for notify in (first, second):
        assert notify["notify_type"] == "trade_status_sync"
        assert notify["total_amount"] == notify["receipt_amount"] == "59.90"
        assert notify["trade_no"] == payment[0]["trade_no"]
        assert notify["gmt_payment"] == payment[0]["gmt_payment"]
        assert len(notify["gmt_refund"]) == len("2015-04-28 15:45:57.320")
        assert gateway.verify(notify)
        assert not gateway.verify({**notify, "refund_fee": "0.01"})

    partial, full = (gateway.read_notice(n) for n in (first, second))
    assert (partial.kind, partial.state, partial.refund_id, partial.refunded_fen) == (
        NoticeKind.REFUND, TradeState.PAID, f"{order}-R1", 2000)
    assert (full.kind, full.state, full.refund_id, full.refunded_fen) == (
        NoticeKind.REFUND, TradeState.CLOSED, f"{order}-R2", 5990)
    assert partial.refunded_at is not None and full.refunded_at is not None
    assert partial.fields == {k: v for k, v in first.items() if k != "sign"}
    assert gateway.read_notice(payment[0]).kind is NoticeKind.PAYMENT
    state = trade(sandbox, order)
    assert [(n["out_request_no"], n["trade_status"], n["refund_fee"], n["acknowledged"])
            for n in state["refund_notifies"]] == [
        (f"{order}-R1", "TRADE_SUCCESS", "20.00", True),
        (f"{order}-R2", "TRADE_CLOSED", "59.90", True)]


def test_refund_notify_is_resent_until_the_answer_is_success(
    gateway: AlipayGateway, sandbox: SandboxServer, merchant: Merchant
) -> None:
    order = pay(gateway, sandbox)
    merchant.scripts[order] = ["fail", " success"]

    gateway.refund_payment(order, Decimal("1.00"), f"{order}-R1")

    wait_until(lambda: len(refund_notifies(merchant, order)) == 3, 5.0, "three refund notifies")
    time.sleep(2 * SCHEDULE[0] + 0.2)  # a fourth would have come by now
    notifies = refund_notifies(merchant, order)
    assert len(notifies) == 3 and len({n["notify_id"] for n in notifies}) == 1
    state = trade(sandbox, order)
    [record] = state["refund_notifies"]
    assert [(a["answer"], a["ok"]) for a in record["attempts"]] == [
        ("fail", False), (" success", False), ("success", True)]
    assert record["acknowledged"] is True
    assert state["notify_attempts"] == []  # the payment's notify was dropped, and stays so

    status, _, body = post_form(sandbox, f"/sandbox/notify/{order}?out_request_no={order}-R1",
                                {})
    assert status == 200 and json.loads(body)["ok"] is True
    assert len(refund_notifies(merchant, order)) == 4
    status, _, body = post_form(sandbox, f"/sandbox/notify/{order}?out_request_no=NOPE", {})
    assert (status, json.loads(body)["error"]) == (404, "REFUND_NOT_EXIST")


def test_a_refused_or_repeated_refund_is_not_notified(
    gateway: AlipayGateway, sandbox: SandboxServer, merchant: Merchant
) -> None:
    order = pay(gateway, sandbox)
    gateway.refund_payment(order, Decimal("1.00"), f"{order}-R1")
    wait_until(lambda: len(refund_notifies(merchant, order)) == 1, 5.0, "the refund notified")

    gateway.refund_payment(order, Decimal("1.00"), f"{order}-R1")
    with pytest.raises(PaymentRefused):
        gateway.refund_payment(order, Decimal("99.00"), f"{order}-R2")
    set_fault(sandbox, order, "ACQ.SYSTEM_ERROR")
    with pytest.raises(PaymentUnavailable):
        gateway.refund_payment(order, Decimal("1.00"), f"{order}-R3")

    time.sleep(2 * SCHEDULE[0])
    assert len(refund_notifies(merchant, order)) == 1


def test_refund_notifies_can_be_turned_off(
    keys: dict[str, Path], merchant: Merchant, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SANDBOX_REFUND_NOTIFY", "0")
    with serving(make_server("127.0.0.1", 0, keys["app_private"].parent, SCHEDULE)) as quiet:
        assert quiet.refund_notify is False
        gateway = make_gateway(quiet.gateway_url, keys, merchant.url)
        order = pay(gateway, quiet, drop_notify=False)
        wait_until(lambda: len(merchant.notifies(order)) == 1, 5.0, "the payment notified")

        gateway.refund_payment(order, Decimal("59.90"), f"{order}-R1")

        time.sleep(2 * SCHEDULE[0])
        assert refund_notifies(merchant, order) == []
        assert trade(quiet, order)["status"] == "TRADE_CLOSED"


# --- fastpay.refund.query ----------------------------------------------------------


def test_refund_query_shows_a_made_refund_and_nothing_for_an_unknown_one(
    gateway: AlipayGateway, sandbox: SandboxServer
) -> None:
    order = pay(gateway, sandbox)
    gateway.refund_payment(order, Decimal("12.34"), f"{order}-R1")

    made = raw(gateway, REFUND_QUERY, {"out_trade_no": order, "out_request_no": f"{order}-R1"})
    unknown = raw(gateway, REFUND_QUERY, {"out_trade_no": order, "out_request_no": f"{order}-R9"})

    assert (made["code"], made["refund_status"], made["refund_amount"], made["total_amount"],
            made["out_request_no"], made["out_trade_no"]) == (
        "10000", "REFUND_SUCCESS", "12.34", "59.90", f"{order}-R1", order)
    assert "gmt_refund_pay" in made
    assert unknown == {"code": "10000", "msg": "Success"}
    assert gateway.query_refund(order, f"{order}-R1") is RefundState.SUCCEEDED
    assert gateway.query_refund(order, f"{order}-R9") is RefundState.NOT_MADE
    assert gateway.query_refund("NOPE", "NOPE-R1") is RefundState.NOT_MADE


# --- the real sandbox's rule ------------------------------------------------------


def test_sandbox_rule_allows_one_refund_of_the_whole_amount(
    keys: dict[str, Path], merchant: Merchant
) -> None:
    server = make_server("127.0.0.1", 0, keys["app_private"].parent, SCHEDULE,
                         refund_rule="sandbox")
    with serving(server) as strict:
        assert strict.refund_rule == "sandbox"
        gateway = make_gateway(strict.gateway_url, keys, merchant.url)
        order = pay(gateway, strict)

        with pytest.raises(PaymentRefused) as partial:
            gateway.refund_payment(order, Decimal("10.00"), f"{order}-R1")
        whole = gateway.refund_payment(order, Decimal("59.90"), f"{order}-R2")
        again = gateway.refund_payment(order, Decimal("59.90"), f"{order}-R2")
        with pytest.raises(PaymentRefused) as second:
            gateway.refund_payment(order, Decimal("59.90"), f"{order}-R3")

        assert (partial.value.reason, partial.value.detail) == (
            "ACQ.REFUND_AMT_NOT_EQUAL_TOTAL", "撤销或退款金额与订单金额不一致")
        assert (whole.refunded_fen, whole.moved, again.moved) == (5990, True, False)
        assert second.value.reason == "ACQ.REFUND_AMT_NOT_EQUAL_TOTAL"
        assert moved(strict, order) == ("59.90", 1, [f"{order}-R2"])
        assert trade(strict, order)["status"] == "TRADE_CLOSED"


def test_bad_settings_are_refused(keys: dict[str, Path],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="SANDBOX_REFUND_RULE"):
        make_server("127.0.0.1", 0, keys["app_private"].parent, SCHEDULE, refund_rule="lenient")
    monkeypatch.setenv("SANDBOX_REFUND_NOTIFY", "maybe")
    with pytest.raises(ValueError, match="SANDBOX_REFUND_NOTIFY"):
        make_server("127.0.0.1", 0, keys["app_private"].parent, SCHEDULE)


def test_module_takes_the_refund_settings_from_flags_and_env(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "SANDBOX_REFUND_NOTIFY": "0",
           "SANDBOX_REFUND_RULE": "alipay"}
    process = subprocess.Popen(
        [sys.executable, "-m", "local.alipay_sandbox", "--port", "0", "--keys",
         str(tmp_path / "keys"), "--refund-rule", "sandbox"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=10)
    assert process.returncode == 0, stderr
    assert "refund_notify=0" in line and "refund_rule=sandbox" in line  # the flag wins
