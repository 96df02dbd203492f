"""AlipayGateway without a network: signatures both ways, formats, error mapping.

The signatures are made and checked by the sandbox's signer (``cryptography``),
so each side checks the other's implementation of Alipay's rule.
"""

from __future__ import annotations

import base64
import email.message
import errno
import io
import json
import urllib.error
import urllib.parse
import urllib.request
import urllib.response
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from chalicelib.alipay_gateway import (
    AlipayBusinessError,
    AlipayGateway,
    AlipayUnavailable,
    RefundResult,
    TradeNotExist,
    TradeQuery,
    TradeStatusError,
    format_alipay_time,
    format_amount,
    load_key,
    parse_alipay_time,
)
from chalicelib.ports import (
    NoticeKind,
    NoticeRefused,
    PaymentRefused,
    PaymentUnavailable,
    RefundOutcome,
    RefundState,
    TradeNotFound,
    TradeState,
    TradeStateConflict,
)
from local.alipay_sandbox import LOCAL_APP_ID, LOCAL_SELLER_ID, ensure_keys
from local.alipay_sandbox.keys import load_private_key, load_public_key
from local.alipay_sandbox.notifier import refund_notify_params
from local.alipay_sandbox.server import render_api_response
from local.alipay_sandbox.signer import sign_params, verify_request
from local.alipay_sandbox.trades import RefundNotice

GATEWAY_URL = "http://alipay.test/gateway.do"
NOTIFY_URL = "http://shop.test/alipay/notify"
RETURN_URL = "http://shop.test/alipay/return"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return ensure_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return ensure_keys(tmp_path_factory.mktemp("other-keys"))


@pytest.fixture(scope="module")
def alipay_key(keys: dict[str, Path]) -> rsa.RSAPrivateKey:
    return load_private_key(keys["alipay_private"])


@pytest.fixture(scope="module")
def gateway(keys: dict[str, Path]) -> AlipayGateway:
    return AlipayGateway(
        LOCAL_APP_ID,
        LOCAL_SELLER_ID,
        GATEWAY_URL,
        keys["app_private"].read_text(),
        keys["alipay_public"].read_text(),
        NOTIFY_URL,
        RETURN_URL,
    )


def notify_fields(**overrides: str) -> dict[str, str]:
    fields = {
        "notify_time": "2025-03-14 12:00:05",
        "notify_type": "trade_status_sync",
        "notify_id": "ac05099524730693a8b330c5ecf72da9786",
        "app_id": LOCAL_APP_ID,
        "charset": "utf-8",
        "version": "1.0",
        "trade_no": "2025031422001400000000000001",
        "out_trade_no": "ORDER_1",
        "buyer_id": "2088000000009999",
        "seller_id": LOCAL_SELLER_ID,
        "trade_status": "TRADE_SUCCESS",
        "total_amount": "59.90",
        "receipt_amount": "59.90",
        "buyer_pay_amount": "59.90",
        "gmt_create": "2025-03-14 12:00:00",
        "gmt_payment": "2025-03-14 12:00:04",
        "subject": "商品 ORDER_1",
    }
    fields.update(overrides)
    return fields


# --- verify --------------------------------------------------------------


def test_verify_accepts_a_notify_signed_by_the_sandbox(
    gateway: AlipayGateway, alipay_key: rsa.RSAPrivateKey
) -> None:
    signed = sign_params(notify_fields(), alipay_key)
    snapshot = dict(signed)

    assert gateway.verify(signed) is True
    assert signed == snapshot, "verify must not mutate the caller's dict"


def test_verify_accepts_a_signed_return_query(
    gateway: AlipayGateway, alipay_key: rsa.RSAPrivateKey
) -> None:
    signed = sign_params(
        {
            "charset": "utf-8",
            "out_trade_no": "ORDER_1",
            "method": "alipay.trade.page.pay.return",
            "total_amount": "59.90",
            "trade_no": "2025031422001400000000000001",
            "auth_app_id": LOCAL_APP_ID,
            "version": "1.0",
            "app_id": LOCAL_APP_ID,
            "seller_id": LOCAL_SELLER_ID,
            "timestamp": "2025-03-14 12:00:05",
        },
        alipay_key,
    )
    assert gateway.verify(signed) is True


def _tampered(kind: str, signed: dict[str, str], other: rsa.RSAPrivateKey) -> dict[str, object]:
    data: dict[str, object] = dict(signed)
    if kind == "changed amount":
        data["total_amount"] = "0.01"
    elif kind == "missing sign":
        del data["sign"]
    elif kind == "empty sign":
        data["sign"] = ""
    elif kind == "sign_type RSA":
        data["sign_type"] = "RSA"
    elif kind == "missing sign_type":
        del data["sign_type"]
    elif kind == "garbage sign":
        data["sign"] = "%%% not base64 !!!"
    elif kind == "base64 of junk":
        data["sign"] = base64.b64encode(b"\x00" * 256).decode()
    elif kind == "signed by another key":
        data = dict(sign_params(notify_fields(), other))
    elif kind == "extra field":
        data["refund_fee"] = "59.90"
    elif kind == "non-string value":
        data["total_amount"] = Decimal("59.90")
    else:  # pragma: no cover
        raise AssertionError(kind)
    return data


@pytest.mark.parametrize(
    "kind",
    [
        "changed amount",
        "missing sign",
        "empty sign",
        "sign_type RSA",
        "missing sign_type",
        "garbage sign",
        "base64 of junk",
        "signed by another key",
        "extra field",
        "non-string value",
    ],
)
def test_verify_rejects_without_raising(
    kind: str,
    gateway: AlipayGateway,
    alipay_key: rsa.RSAPrivateKey,
    other_keys: dict[str, Path],
) -> None:
    signed = sign_params(notify_fields(), alipay_key)
    assert gateway.verify(signed) is True  # the untouched notify is fine
    bad = _tampered(kind, signed, load_private_key(other_keys["alipay_private"]))

    assert gateway.verify(bad) is False  # type: ignore[arg-type]


def test_verify_of_empty_params_is_false(gateway: AlipayGateway) -> None:
    assert gateway.verify({}) is False


# --- page pay ------------------------------------------------------------


def _page_pay_params(url: str) -> dict[str, str]:
    assert url.startswith(GATEWAY_URL + "?")
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query, keep_blank_values=True))


def test_page_pay_url_formats_money_and_shanghai_time(
    gateway: AlipayGateway, keys: dict[str, Path]
) -> None:
    url = gateway.page_pay_url(
        "ORDER_1", Decimal("59.9"), "商品 ORDER_1", datetime(2025, 3, 14, 16, 30, tzinfo=UTC)
    )
    params = _page_pay_params(url)
    biz = json.loads(params["biz_content"])

    assert params["method"] == "alipay.trade.page.pay"
    assert params["app_id"] == LOCAL_APP_ID
    assert params["sign_type"] == "RSA2"
    assert params["notify_url"] == NOTIFY_URL
    assert params["return_url"] == RETURN_URL
    assert biz == {
        "out_trade_no": "ORDER_1",
        "total_amount": "59.90",
        "subject": "商品 ORDER_1",
        "product_code": "FAST_INSTANT_TRADE_PAY",
        "time_expire": "2025-03-15 00:30:00",  # 16:30 UTC is 00:30 next day in Shanghai
    }
    # The sandbox's cryptography-based check accepts the SDK's signature...
    app_public = load_public_key(keys["app_public"])
    assert verify_request(params, app_public) is True
    # ...and notices a change.
    assert (
        verify_request(
            {**params, "biz_content": params["biz_content"].replace("59.90", "0.01")}, app_public
        )
        is False
    )


def test_page_pay_url_converts_any_aware_time(gateway: AlipayGateway) -> None:
    from datetime import timedelta, timezone

    new_york_winter = timezone(timedelta(hours=-5))
    url = gateway.page_pay_url(
        "ORDER_2", Decimal("100"), "x", datetime(2025, 1, 1, 7, 0, tzinfo=new_york_winter)
    )
    biz = json.loads(_page_pay_params(url)["biz_content"])
    assert biz["time_expire"] == "2025-01-01 20:00:00"
    assert biz["total_amount"] == "100.00"


@pytest.mark.parametrize(
    ("amount", "error"),
    [
        (59.9, TypeError),
        ("59.90", TypeError),
        (Decimal("59.901"), ValueError),
        (Decimal("0"), ValueError),
        (Decimal("-1.00"), ValueError),
        (Decimal("NaN"), ValueError),
    ],
)
def test_page_pay_url_refuses_bad_money(
    gateway: AlipayGateway, amount: object, error: type[Exception]
) -> None:
    with pytest.raises(error):
        gateway.page_pay_url(
            "ORDER_3",
            amount,
            "x",  # type: ignore[arg-type]
            datetime(2025, 1, 1, tzinfo=UTC),
        )


def test_page_pay_url_refuses_naive_time(gateway: AlipayGateway) -> None:
    with pytest.raises(ValueError, match="aware"):
        gateway.page_pay_url("ORDER_4", Decimal("1.00"), "x", datetime(2025, 1, 1))


@pytest.mark.parametrize(
    ("amount", "text"),
    [
        (Decimal("59.9"), "59.90"),
        (Decimal("0.01"), "0.01"),
        (Decimal("100"), "100.00"),
        (Decimal("1E+2"), "100.00"),
        (Decimal("12345678.50"), "12345678.50"),
    ],
)
def test_format_amount(amount: Decimal, text: str) -> None:
    assert format_amount(amount) == text


def test_alipay_time_round_trip() -> None:
    moment = datetime(2025, 6, 30, 23, 59, 59, tzinfo=UTC)
    assert format_alipay_time(moment) == "2025-07-01 07:59:59"
    assert parse_alipay_time("2025-07-01 07:59:59") == moment


# --- keys ----------------------------------------------------------------


def test_load_key_takes_bare_base64_that_is_no_possible_file_name(
    keys: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key as Alipay's console gives it is tried as a file name first. When its base64
    starts with 256 characters without a "/" (about 1 key in 55), asking whether that
    file exists raises ENAMETOOLONG, which must not stop the key from loading."""
    with pytest.raises(OSError) as raised:
        Path("A" * 256).is_file()
    assert raised.value.errno == errno.ENAMETOOLONG
    pem = keys["app_private"].read_text()
    bare = "".join(line for line in pem.splitlines() if not line.startswith("-----"))

    def too_long(self: Path) -> bool:
        raise OSError(errno.ENAMETOOLONG, "File name too long", str(self))

    monkeypatch.setattr(Path, "is_file", too_long)
    rebuilt = load_key(bare)
    assert rebuilt.startswith("-----BEGIN")
    again = serialization.load_pem_private_key(rebuilt.encode(), password=None)
    assert isinstance(again, rsa.RSAPrivateKey)
    assert again.private_numbers() == load_private_key(keys["app_private"]).private_numbers()


def test_load_key_accepts_pem_text_path_and_bare_base64(keys: dict[str, Path]) -> None:
    pem = keys["alipay_public"].read_text()
    bare = "".join(line for line in pem.splitlines() if not line.startswith("-----"))

    assert load_key(pem).strip() == pem.strip()
    assert load_key(str(keys["alipay_public"])).strip() == pem.strip()
    assert load_key(keys["alipay_public"]).strip() == pem.strip()
    assert load_key(pem.strip().replace("\n", "\\n")).strip() == pem.strip()
    rebuilt = load_key(bare)
    assert rebuilt.startswith("-----BEGIN PUBLIC KEY-----")
    # the rebuilt PEM is the same key: a gateway made with it verifies Alipay's signatures
    private_bare = "".join(
        line
        for line in keys["app_private"].read_text().splitlines()
        if not line.startswith("-----")
    )
    gateway = AlipayGateway.from_settings(
        app_id=LOCAL_APP_ID,
        seller_id=LOCAL_SELLER_ID,
        gateway_url=GATEWAY_URL,
        app_private_key=private_bare,
        alipay_public_key=bare,
    )
    signed = sign_params(notify_fields(), load_private_key(keys["alipay_private"]))
    assert gateway.verify(signed) is True


def test_bad_keys_fail_at_construction_without_echoing_them() -> None:
    with pytest.raises(ValueError) as caught:
        AlipayGateway(
            LOCAL_APP_ID,
            LOCAL_SELLER_ID,
            GATEWAY_URL,
            "not-a-key-SECRET",
            "also-not-a-key",
            None,
            None,
        )
    assert "SECRET" not in str(caught.value)


# --- server APIs over a canned urllib ------------------------------------

Responder = Callable[[urllib.request.Request], tuple[int, bytes]]


class CannedHTTP(urllib.request.BaseHandler):
    """Answers every http request from ``respond`` (no socket is opened)."""

    def __init__(self, respond: Responder) -> None:
        self.respond = respond
        self.requests: list[urllib.request.Request] = []

    def http_open(self, request: urllib.request.Request) -> urllib.response.addinfourl:
        self.requests.append(request)
        status, body = self.respond(request)
        headers = email.message.Message()
        headers["Content-Type"] = "application/json;charset=utf-8"
        response = urllib.response.addinfourl(io.BytesIO(body), headers, request.full_url, status)
        response.msg = "OK" if status == 200 else "Error"  # read by HTTPErrorProcessor
        return response


@pytest.fixture
def canned(monkeypatch: pytest.MonkeyPatch) -> Callable[[Responder], CannedHTTP]:
    def install(respond: Responder) -> CannedHTTP:
        handler = CannedHTTP(respond)
        opener = urllib.request.OpenerDirector()
        for h in (
            handler,
            urllib.request.HTTPDefaultErrorHandler(),
            urllib.request.HTTPErrorProcessor(),
        ):
            opener.add_handler(h)
        monkeypatch.setattr(urllib.request, "_opener", opener)
        return handler

    return install


def _request_params(request: urllib.request.Request) -> dict[str, str]:
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(request.full_url).query))


def signed_answer(key: rsa.RSAPrivateKey, method: str, payload: dict[str, str]) -> Responder:
    body = render_api_response(method.replace(".", "_") + "_response", payload, key)
    return lambda _request: (200, body)


def test_query_parses_a_signed_answer_and_sends_a_signed_request(
    gateway: AlipayGateway,
    alipay_key: rsa.RSAPrivateKey,
    keys: dict[str, Path],
    canned: Callable[[Responder], CannedHTTP],
) -> None:
    http = canned(
        signed_answer(
            alipay_key,
            "alipay.trade.query",
            {
                "code": "10000",
                "msg": "Success",
                "out_trade_no": "ORDER_1",
                "trade_no": "2025031422001400000000000001",
                "trade_status": "TRADE_SUCCESS",
                "total_amount": "59.90",
                "send_pay_date": "2025-03-14 12:00:04",
            },
        )
    )

    result = gateway.query("ORDER_1")

    assert result == TradeQuery(
        "ORDER_1",
        "2025031422001400000000000001",
        "TRADE_SUCCESS",
        Decimal("59.90"),
        "2025-03-14 12:00:04",
    )
    assert result.paid
    sent = _request_params(http.requests[0])
    assert sent["method"] == "alipay.trade.query"
    assert json.loads(sent["biz_content"]) == {"out_trade_no": "ORDER_1"}
    assert verify_request(sent, load_public_key(keys["app_public"]))


def test_refund_sends_out_request_no_and_parses_decimal(
    gateway: AlipayGateway,
    alipay_key: rsa.RSAPrivateKey,
    canned: Callable[[Responder], CannedHTTP],
) -> None:
    http = canned(
        signed_answer(
            alipay_key,
            "alipay.trade.refund",
            {
                "code": "10000",
                "msg": "Success",
                "out_trade_no": "ORDER_1",
                "trade_no": "T1",
                "refund_fee": "10.00",
                "fund_change": "N",
            },
        )
    )

    result = gateway.refund("ORDER_1", Decimal("10"), "ORDER_1-R1")

    assert result == RefundResult("ORDER_1", "T1", Decimal("10.00"), False)
    biz = json.loads(_request_params(http.requests[0])["biz_content"])
    assert biz == {
        "out_trade_no": "ORDER_1",
        "refund_amount": "10.00",
        "out_request_no": "ORDER_1-R1",
    }


@pytest.mark.parametrize(
    ("sub_code", "kind"),
    [
        ("ACQ.TRADE_NOT_EXIST", TradeNotExist),
        ("ACQ.TRADE_STATUS_ERROR", TradeStatusError),
        ("ACQ.REFUND_AMT_NOT_EQUAL_TOTAL", AlipayBusinessError),
    ],
)
def test_signed_business_errors_raise_business_error(
    sub_code: str,
    kind: type[AlipayBusinessError],
    gateway: AlipayGateway,
    alipay_key: rsa.RSAPrivateKey,
    canned: Callable[[Responder], CannedHTTP],
) -> None:
    canned(
        signed_answer(
            alipay_key,
            "alipay.trade.close",
            {
                "code": "40004",
                "msg": "Business Failed",
                "sub_code": sub_code,
                "sub_msg": "中文说明",
            },
        )
    )

    with pytest.raises(kind) as caught:
        gateway.close("ORDER_1")

    err = caught.value
    assert type(err) is kind
    assert (err.code, err.sub_code, err.msg, err.sub_msg) == (
        "40004",
        sub_code,
        "Business Failed",
        "中文说明",
    )
    assert err.is_trade_not_exist == (sub_code == "ACQ.TRADE_NOT_EXIST")
    assert err.is_trade_status_error == (sub_code == "ACQ.TRADE_STATUS_ERROR")


def _unsigned(payload: dict[str, object], name: str = "error_response") -> Responder:
    body = json.dumps({name: payload}, ensure_ascii=False).encode()
    return lambda _request: (200, body)


def test_unsigned_error_response_keeps_its_code(
    gateway: AlipayGateway, canned: Callable[[Responder], CannedHTTP]
) -> None:
    """An unsigned error answer is no business fact: Alipay unavailable, with the
    code it claimed kept for the logs (it used to raise AlipayBusinessError)."""
    canned(
        _unsigned(
            {
                "code": "40002",
                "msg": "Invalid Arguments",
                "sub_code": "isv.invalid-app-id",
                "sub_msg": "无效的AppID参数",
            }
        )
    )

    with pytest.raises(AlipayUnavailable) as caught:
        gateway.query("ORDER_1")
    assert not isinstance(caught.value, PaymentRefused)
    assert (caught.value.code, caught.value.sub_code) == ("40002", "isv.invalid-app-id")
    assert str(caught.value).startswith("Alipay unavailable")


@pytest.mark.parametrize("name", ["alipay_trade_query_response", "error_response"])
def test_unsigned_trade_not_exist_never_reads_as_no_trade(
    name: str, gateway: AlipayGateway, canned: Callable[[Responder], CannedHTTP]
) -> None:
    """Anyone on the path can write an unsigned 40004 ACQ.TRADE_NOT_EXIST; read as a
    fact it would make the shop close a paid order."""
    canned(
        _unsigned(
            {
                "code": "40004",
                "msg": "Business Failed",
                "sub_code": "ACQ.TRADE_NOT_EXIST",
                "sub_msg": "交易不存在",
            },
            name,
        )
    )

    with pytest.raises(AlipayUnavailable) as caught:
        gateway.query_trade("ORDER_1")
    assert (caught.value.code, caught.value.sub_code) == ("40004", "ACQ.TRADE_NOT_EXIST")
    with pytest.raises(PaymentUnavailable):
        gateway.close_trade("ORDER_1")
    with pytest.raises(PaymentUnavailable):
        gateway.refund_payment("ORDER_1", Decimal("1.00"), "ORDER_1-R1")
    with pytest.raises(PaymentUnavailable):
        gateway.query_refund("ORDER_1", "ORDER_1-R1")


def test_unsigned_answer_without_a_code_is_unavailable(
    gateway: AlipayGateway, canned: Callable[[Responder], CannedHTTP]
) -> None:
    canned(_unsigned({"msg": "Success", "trade_status": "TRADE_SUCCESS"},
                     "alipay_trade_query_response"))

    with pytest.raises(AlipayUnavailable) as caught:
        gateway.query("ORDER_1")
    assert (caught.value.code, caught.value.sub_code) == (None, None)


# --- refunds through the port ---------------------------------------------


def test_refund_payment_answers_the_outcome(
    gateway: AlipayGateway,
    alipay_key: rsa.RSAPrivateKey,
    canned: Callable[[Responder], CannedHTTP],
) -> None:
    canned(
        signed_answer(
            alipay_key,
            "alipay.trade.refund",
            {
                "code": "10000",
                "msg": "Success",
                "out_trade_no": "ORDER_1",
                "trade_no": "T1",
                "refund_fee": "30.00",
                "fund_change": "Y",
            },
        )
    )

    outcome = gateway.refund_payment("ORDER_1", Decimal("10.00"), "ORDER_1-R2")

    assert outcome == RefundOutcome("ORDER_1", "T1", 3000, True)


@pytest.mark.parametrize(
    ("payload", "reason", "detail"),
    [
        (
            {"code": "40004", "msg": "Business Failed",
             "sub_code": "ACQ.SELLER_BALANCE_NOT_ENOUGH", "sub_msg": "卖家余额不足"},
            "ACQ.SELLER_BALANCE_NOT_ENOUGH",
            "卖家余额不足",
        ),
        (
            {"code": "40004", "msg": "Business Failed",
             "sub_code": "ACQ.DISCORDANT_REPEAT_REQUEST"},
            "ACQ.DISCORDANT_REPEAT_REQUEST",
            "Business Failed",
        ),
        (
            {"code": "40004", "msg": "Business Failed",
             "sub_code": "ACQ.REASON_TRADE_REFUND_FEE_ERR", "sub_msg": "退款金额无效"},
            "ACQ.REASON_TRADE_REFUND_FEE_ERR",
            "退款金额无效",
        ),
        ({"code": "40004", "msg": "Business Failed"}, "40004", "Business Failed"),
    ],
)
def test_refund_refusal_is_payment_refused_with_reason_and_detail(
    payload: dict[str, str],
    reason: str,
    detail: str,
    gateway: AlipayGateway,
    alipay_key: rsa.RSAPrivateKey,
    canned: Callable[[Responder], CannedHTTP],
) -> None:
    canned(signed_answer(alipay_key, "alipay.trade.refund", payload))

    with pytest.raises(PaymentRefused) as caught:
        gateway.refund_payment("ORDER_1", Decimal("10.00"), "ORDER_1-R1")

    assert type(caught.value) is AlipayBusinessError
    assert (caught.value.reason, caught.value.detail) == (reason, detail)


@pytest.mark.parametrize(
    ("sub_code", "kind"),
    [("ACQ.TRADE_NOT_EXIST", TradeNotFound), ("ACQ.TRADE_STATUS_ERROR", TradeStateConflict)],
)
def test_typed_refusals_carry_their_reason(
    sub_code: str,
    kind: type[PaymentRefused],
    gateway: AlipayGateway,
    alipay_key: rsa.RSAPrivateKey,
    canned: Callable[[Responder], CannedHTTP],
) -> None:
    canned(signed_answer(alipay_key, "alipay.trade.refund",
                         {"code": "40004", "msg": "Business Failed", "sub_code": sub_code,
                          "sub_msg": "说明"}))

    with pytest.raises(kind) as caught:
        gateway.refund_payment("ORDER_1", Decimal("10.00"), "ORDER_1-R1")

    assert (caught.value.reason, caught.value.detail) == (sub_code, "说明")


@pytest.mark.parametrize(
    "case",
    [
        "20000 aop.ACQ.SYSTEM_ERROR",
        "20000 isp.unknow-error",
        "40004 ACQ.SYSTEM_ERROR",
        "timeout",
        "http 500",
        "unsigned success",
        "refund_fee not an amount",
    ],
)
def test_refund_with_an_unknown_outcome_is_unavailable(
    case: str,
    gateway: AlipayGateway,
    alipay_key: rsa.RSAPrivateKey,
    canned: Callable[[Responder], CannedHTTP],
) -> None:
    method = "alipay.trade.refund"
    success = {"code": "10000", "msg": "Success", "out_trade_no": "ORDER_1", "trade_no": "T1",
               "refund_fee": "10.00", "fund_change": "Y"}
    respond: Responder = {
        "20000 aop.ACQ.SYSTEM_ERROR": signed_answer(
            alipay_key, method, {"code": "20000", "msg": "Service Currently Unavailable",
                                 "sub_code": "aop.ACQ.SYSTEM_ERROR", "sub_msg": "系统异常"}),
        "20000 isp.unknow-error": signed_answer(
            alipay_key, method, {"code": "20000", "msg": "Service Currently Unavailable",
                                 "sub_code": "isp.unknow-error", "sub_msg": "系统繁忙"}),
        "40004 ACQ.SYSTEM_ERROR": signed_answer(
            alipay_key, method, {"code": "40004", "msg": "Business Failed",
                                 "sub_code": "ACQ.SYSTEM_ERROR", "sub_msg": "系统错误"}),
        "timeout": _raise(TimeoutError("timed out")),
        "http 500": lambda _r: (500, b"<html>oops</html>"),
        "unsigned success": _unsigned(success, "alipay_trade_refund_response"),
        "refund_fee not an amount": signed_answer(
            alipay_key, method, {**success, "refund_fee": "10.001"}),
    }[case]
    canned(respond)

    with pytest.raises(PaymentUnavailable) as caught:
        gateway.refund_payment("ORDER_1", Decimal("10.00"), "ORDER_1-R1")
    assert isinstance(caught.value, AlipayUnavailable)
    assert not isinstance(caught.value, PaymentRefused)


def _refund_query_answer(**fields: str) -> dict[str, str]:
    return {"code": "10000", "msg": "Success", **fields}


@pytest.mark.parametrize(
    ("payload", "state"),
    [
        (
            _refund_query_answer(out_trade_no="ORDER_1", trade_no="T1",
                                 out_request_no="ORDER_1-R1", total_amount="59.90",
                                 refund_amount="10.00", refund_status="REFUND_SUCCESS"),
            RefundState.SUCCEEDED,
        ),
        (  # older answers: the refund's fields and an empty refund_status
            _refund_query_answer(out_trade_no="ORDER_1", trade_no="T1",
                                 out_request_no="ORDER_1-R1", refund_amount="10.00",
                                 refund_status=""),
            RefundState.SUCCEEDED,
        ),
        (
            _refund_query_answer(out_trade_no="ORDER_1", out_request_no="ORDER_1-R1",
                                 refund_amount="10.00"),
            RefundState.SUCCEEDED,
        ),
        (_refund_query_answer(), RefundState.NOT_MADE),
        (_refund_query_answer(out_trade_no="ORDER_1", trade_no="T1"), RefundState.NOT_MADE),
        (
            {"code": "40004", "msg": "Business Failed", "sub_code": "ACQ.TRADE_NOT_EXIST",
             "sub_msg": "交易不存在"},
            RefundState.NOT_MADE,
        ),
    ],
)
def test_query_refund_reads_alipays_answer(
    payload: dict[str, str],
    state: RefundState,
    gateway: AlipayGateway,
    alipay_key: rsa.RSAPrivateKey,
    canned: Callable[[Responder], CannedHTTP],
) -> None:
    http = canned(signed_answer(alipay_key, "alipay.trade.fastpay.refund.query", payload))

    assert gateway.query_refund("ORDER_1", "ORDER_1-R1") is state
    sent = _request_params(http.requests[0])
    assert sent["method"] == "alipay.trade.fastpay.refund.query"
    assert json.loads(sent["biz_content"]) == {
        "out_trade_no": "ORDER_1",
        "out_request_no": "ORDER_1-R1",
    }


@pytest.mark.parametrize(
    "payload",
    [
        _refund_query_answer(out_trade_no="ORDER_1", refund_amount="10.00",
                             refund_status="REFUND_PROCESSING"),
        _refund_query_answer(out_trade_no="ORDER_1", out_request_no="ORDER_1-R2",
                             refund_amount="10.00", refund_status="REFUND_SUCCESS"),
        _refund_query_answer(out_trade_no="ORDER_2", out_request_no="ORDER_1-R1",
                             refund_amount="10.00", refund_status="REFUND_SUCCESS"),
        _refund_query_answer(out_trade_no="ORDER_1", refund_amount="ten"),
        {"code": "20000", "msg": "Service Currently Unavailable",
         "sub_code": "aop.ACQ.SYSTEM_ERROR"},
        {"code": "40004", "msg": "Business Failed", "sub_code": "ACQ.SYSTEM_ERROR"},
    ],
    ids=["unknown status", "another refund", "another trade", "bad amount", "20000",
         "system error"],
)
def test_query_refund_unknown_is_unavailable(
    payload: dict[str, str],
    gateway: AlipayGateway,
    alipay_key: rsa.RSAPrivateKey,
    canned: Callable[[Responder], CannedHTTP],
) -> None:
    canned(signed_answer(alipay_key, "alipay.trade.fastpay.refund.query", payload))

    with pytest.raises(AlipayUnavailable):
        gateway.query_refund("ORDER_1", "ORDER_1-R1")


# --- notices ---------------------------------------------------------------


def test_payment_notify_is_a_payment_notice_with_its_fields(
    gateway: AlipayGateway, alipay_key: rsa.RSAPrivateKey
) -> None:
    signed = sign_params(notify_fields(), alipay_key)

    notice = gateway.read_notice(signed)

    assert notice.kind is NoticeKind.PAYMENT
    assert (notice.order_id, notice.state, notice.amount_fen) == (
        "ORDER_1", TradeState.PAID, 5990)
    assert (notice.refund_id, notice.refunded_fen, notice.refunded_at) == (None, None, None)
    assert notice.fields == {k: v for k, v in signed.items() if k != "sign"}
    assert "sign_type" in notice.fields and "sign" not in notice.fields


def _refund_notice(closed: bool, refund_fee: str = "20.00") -> RefundNotice:
    return RefundNotice(
        out_trade_no="ORDER_1",
        trade_no="2025031422001400000000000001",
        app_id=LOCAL_APP_ID,
        seller_id=LOCAL_SELLER_ID,
        subject="商品 ORDER_1",
        total_amount="59.90",
        notify_url=NOTIFY_URL,
        gmt_create="2025-03-14 12:00:00",
        gmt_payment="2025-03-14 12:00:04",
        out_request_no="ORDER_1-R1",
        refund_fee=refund_fee,
        gmt_refund="2025-03-14 13:00:00.320",
        closed_trade=closed,
        notify_id="n-refund-1",
    )


@pytest.mark.parametrize(
    ("closed", "trade_status", "state"),
    [(False, "TRADE_SUCCESS", TradeState.PAID), (True, "TRADE_CLOSED", TradeState.CLOSED)],
)
def test_refund_notify_from_the_sandbox_is_a_refund_notice(
    closed: bool,
    trade_status: str,
    state: TradeState,
    gateway: AlipayGateway,
    alipay_key: rsa.RSAPrivateKey,
) -> None:
    fee = "59.90" if closed else "20.00"
    signed = refund_notify_params(_refund_notice(closed, fee), "2025-03-14 13:00:01", alipay_key)
    assert signed["trade_status"] == trade_status

    notice = gateway.read_notice(signed)

    assert notice.kind is NoticeKind.REFUND
    assert notice.state is state
    assert (notice.order_id, notice.trade_no) == ("ORDER_1", "2025031422001400000000000001")
    assert notice.refund_id == "ORDER_1-R1"
    assert notice.refunded_fen == (5990 if closed else 2000)
    assert notice.amount_fen == 5990
    # 13:00:00.320 in Shanghai
    assert notice.refunded_at == datetime(2025, 3, 14, 5, 0, 0, 320000, tzinfo=UTC)
    assert notice.notice_id == "n-refund-1"
    assert notice.fields == {k: v for k, v in signed.items() if k != "sign"}


@pytest.mark.parametrize(
    ("extra", "refund_id", "refunded_fen", "refunded_at"),
    [
        ({"refund_fee": "10.00"}, None, 1000, None),
        ({"out_biz_no": "R9"}, "R9", None, None),
        ({"gmt_refund": "2025-03-14 13:00:00"}, None, None,
         datetime(2025, 3, 14, 5, 0, tzinfo=UTC)),
        ({"refund_fee": "10.001", "out_biz_no": "R9", "gmt_refund": "yesterday"}, "R9", None,
         None),
        ({"refund_fee": "-1.00", "gmt_refund": "2025-03-14 13:00:00.32x"}, None, None, None),
    ],
)
def test_any_refund_field_makes_a_refund_notice(
    extra: dict[str, str],
    refund_id: str | None,
    refunded_fen: int | None,
    refunded_at: datetime | None,
    gateway: AlipayGateway,
    alipay_key: rsa.RSAPrivateKey,
) -> None:
    signed = sign_params(notify_fields(**extra), alipay_key)

    notice = gateway.read_notice(signed)

    assert notice.kind is NoticeKind.REFUND
    assert (notice.refund_id, notice.refunded_fen, notice.refunded_at) == (
        refund_id, refunded_fen, refunded_at)


def test_forged_refund_notify_is_refused(
    gateway: AlipayGateway, alipay_key: rsa.RSAPrivateKey
) -> None:
    signed = refund_notify_params(_refund_notice(False), "2025-03-14 13:00:01", alipay_key)

    with pytest.raises(NoticeRefused):
        gateway.read_notice({**signed, "refund_fee": "59.90"})


def _raise(exc: BaseException) -> Responder:
    def respond(_request: urllib.request.Request) -> tuple[int, bytes]:
        raise exc

    return respond


@pytest.mark.parametrize(
    "case",
    [
        "connection refused",
        "timeout",
        "http 502",
        "not json",
        "not utf-8",
        "empty body",
        "answer signed by another key",
        "service unavailable 20000",
        "ACQ.SYSTEM_ERROR",
        "answer about another trade",
        "success without fields",
    ],
)
def test_unknown_outcomes_raise_unavailable(
    case: str,
    gateway: AlipayGateway,
    alipay_key: rsa.RSAPrivateKey,
    other_keys: dict[str, Path],
    canned: Callable[[Responder], CannedHTTP],
) -> None:
    query = "alipay.trade.query"
    respond: Responder = {
        "connection refused": _raise(urllib.error.URLError(ConnectionRefusedError(111, "no"))),
        "timeout": _raise(TimeoutError("timed out")),
        "http 502": lambda _r: (502, b"<html>bad gateway</html>"),
        "not json": lambda _r: (200, b"<html>maintenance</html>"),
        "not utf-8": lambda _r: (200, b"\xff\xfe{"),
        "empty body": lambda _r: (200, b""),
        "answer signed by another key": signed_answer(
            load_private_key(other_keys["alipay_private"]),
            query,
            {
                "code": "10000",
                "msg": "Success",
                "out_trade_no": "ORDER_1",
                "trade_status": "TRADE_SUCCESS",
                "total_amount": "59.90",
            },
        ),
        "service unavailable 20000": signed_answer(
            alipay_key,
            query,
            {
                "code": "20000",
                "msg": "Service Currently Unavailable",
                "sub_code": "isp.unknow-error",
            },
        ),
        "ACQ.SYSTEM_ERROR": signed_answer(
            alipay_key,
            query,
            {"code": "40004", "msg": "Business Failed", "sub_code": "ACQ.SYSTEM_ERROR"},
        ),
        "answer about another trade": signed_answer(
            alipay_key,
            query,
            {
                "code": "10000",
                "msg": "Success",
                "out_trade_no": "ORDER_2",
                "trade_status": "TRADE_SUCCESS",
                "total_amount": "59.90",
            },
        ),
        "success without fields": signed_answer(
            alipay_key, query, {"code": "10000", "msg": "Success", "out_trade_no": "ORDER_1"}
        ),
    }[case]
    canned(respond)

    with pytest.raises(AlipayUnavailable):
        gateway.query("ORDER_1")


# --- the RSA2 check: cryptography's against the SDK's own ------------------------


def _outcome(check: Callable[[], Any]) -> Any:
    """True/False, or the kind of error: what a caller of either check would see."""
    try:
        return bool(check())
    except Exception as exc:  # noqa: BLE001 - the kind is the outcome compared
        return type(exc).__name__


def test_the_fast_rsa2_check_agrees_with_the_sdks_on_every_input(
        gateway: AlipayGateway, keys: dict[str, Path], other_keys: dict[str, Path],
        alipay_key: rsa.RSAPrivateKey) -> None:
    """Notifies, return queries and API answers as the sandbox signs them, and each
    tampered: a field changed, added or dropped, the signature flipped, cut, empty,
    not base64, badly padded, another key's, another length's. The SDK builds the
    string either way; only the check differs, and it answers the same."""
    import alipay as sdk

    from chalicelib.alipay_gateway import Rsa2Verifier, load_key

    def client() -> Any:
        return sdk.AliPay(appid=LOCAL_APP_ID, app_notify_url=None,
                          app_private_key_string=load_key(keys["app_private"].read_text()),
                          alipay_public_key_string=load_key(keys["alipay_public"].read_text()),
                          sign_type="RSA2")

    slow, fast = client(), client()  # the SDK's own check; the same with the fast one
    fast._verify = Rsa2Verifier(load_key(keys["alipay_public"].read_text()))
    assert gateway._client._verify.__class__ is Rsa2Verifier  # the gateway uses it
    other = load_private_key(other_keys["alipay_private"])
    short = rsa.generate_private_key(public_exponent=65537, key_size=1024)

    forms = [notify_fields(), notify_fields(trade_status="TRADE_CLOSED", total_amount="0.01"),
             notify_fields(refund_fee="10.00", gmt_refund="2025-03-14 12:05:00.320",
                           out_biz_no="REFUND_ORDER_1_1"),
             {"charset": "utf-8", "out_trade_no": "ORDER_1", "method": "alipay.trade.page.pay"
              ".return", "total_amount": "59.90", "trade_no": "T1", "auth_app_id": LOCAL_APP_ID,
              "app_id": LOCAL_APP_ID, "seller_id": LOCAL_SELLER_ID, "version": "1.0",
              "timestamp": "2025-03-14 12:00:06", "subject": "中文 & = %"}]
    cases: list[tuple[str, dict[str, str], str]] = []
    for form in forms:
        signed = sign_params(form, alipay_key)
        sign = signed.pop("sign")
        cases.append(("valid", signed, sign))
        for key in list(form)[:6]:
            cases.append(("tampered", {**signed, key: signed[key] + "1"}, sign))
        cases.append(("tampered", {**signed, "extra": "x"}, sign))
        cases.append(("tampered", {k: v for k, v in signed.items() if k != "subject"}, sign))
        flipped = ("A" if sign[10] != "A" else "B")
        cases += [("tampered", signed, sign[:10] + flipped + sign[11:]),
                  ("odd", signed, sign[:-8]), ("odd", signed, ""),
                  ("odd", signed, "not base64 at all!"), ("odd", signed, sign.rstrip("=") + "="),
                  ("odd", signed, sign + "===="), ("odd", signed, " " + sign + "\n"),
                  ("tampered", signed, sign_params(form, other)["sign"]),
                  ("tampered", signed, sign_params(form, short)["sign"])]
    seen: dict[str, set[Any]] = {}
    for label, data, sign in cases:
        a = _outcome(lambda d=data, s=sign: slow.verify(dict(d), s))
        b = _outcome(lambda d=data, s=sign: fast.verify(dict(d), s))
        assert a == b, (data, sign, a, b)
        seen.setdefault(label, set()).add(a)
    assert seen["valid"] == {True} and seen["tampered"] == {False}
    assert len(seen["odd"]) > 1  # padding, spaces, cut, garbage: as the SDK, case by case

    # The API answers: the SDK finds the string in the raw text, then checks it.
    payload = {"code": "10000", "msg": "Success", "trade_no": "T1", "out_trade_no": "ORDER_1",
               "trade_status": "TRADE_SUCCESS", "total_amount": "59.90", "buyer_logon_id": "中文"}
    good = render_api_response("alipay_trade_query_response", payload, alipay_key).decode()
    answers = [good, good.replace("59.90", "59.91"),
               render_api_response("alipay_trade_query_response", payload, other).decode(),
               good.replace('"sign":"', '"sign":"AAAA')]
    for raw in answers:
        a = _outcome(lambda r=raw: slow._verify_and_return_sync_response(
            r, "alipay_trade_query_response"))
        b = _outcome(lambda r=raw: fast._verify_and_return_sync_response(
            r, "alipay_trade_query_response"))
        assert a == b, (raw, a, b)


def test_the_fast_rsa2_signature_is_the_sdks_byte_for_byte(
        gateway: AlipayGateway, keys: dict[str, Path]) -> None:
    """PKCS#1 v1.5 is deterministic: the same key and string give the same bytes,
    so the signer swapped in for pycryptodome's must write exactly the SDK's."""
    import alipay as sdk

    from chalicelib.alipay_gateway import Rsa2Signer, load_key

    pem = load_key(keys["app_private"].read_text())
    slow = sdk.AliPay(appid=LOCAL_APP_ID, app_notify_url=None, app_private_key_string=pem,
                      alipay_public_key_string=load_key(keys["alipay_public"].read_text()),
                      sign_type="RSA2")
    fast = Rsa2Signer(pem)
    assert gateway._client._sign.__class__ is Rsa2Signer  # the gateway uses it
    body = {"out_trade_no": "ORDER_1", "total_amount": "59.90", "subject": "中文 & = %"}
    strings = ["", "a=1", "中文=退款&x=%20+", "x" * 5000,
               "&".join(f"{k}={v}" for k, v in slow._ordered_data(
                   slow.build_body("alipay.trade.query", body,
                                   timestamp="2025-03-14 12:00:06")))]
    for text in strings:
        assert fast(text) == slow._sign(text), text
    assert len({fast(t) for t in strings}) == len(strings)
