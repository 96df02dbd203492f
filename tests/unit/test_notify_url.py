"""The notify behind the Lambda function URL (`alipay_notify_url`): the same
parse and handler as the /alipay/notify route, in a function URL's event
(payload 2.0) and answer shape."""

from __future__ import annotations

import base64
import json
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from app import MAX_NOTIFY_BASE64_CHARS, MAX_NOTIFY_BYTES
from chalicelib import handlers
from chalicelib.alipay_gateway import AlipayGateway
from chalicelib.logs import MAX_VALUE_CHARS
from local.alipay_sandbox import LOCAL_APP_ID, LOCAL_SELLER_ID
from local.alipay_sandbox.keys import ensure_keys, load_private_key
from local.alipay_sandbox.signer import sign_params
from tests.unit.test_logs import json_log_lines

FORM_TYPE = "application/x-www-form-urlencoded; charset=utf-8"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return ensure_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture
def order(app_deps: Any, keys: dict[str, Path]) -> dict[str, Any]:
    app_deps.gateway = AlipayGateway(
        LOCAL_APP_ID, LOCAL_SELLER_ID, "http://127.0.0.1:9/gateway.do",
        keys["app_private"].read_text(), keys["alipay_public"].read_text(),
        "https://abc.lambda-url.us-east-1.on.aws/", None, timeout=1.0)
    app_deps.store.set_cart_line("alice", "g1", 2)
    return handlers.create_order(app_deps, "alice")


def signed_form(order: dict[str, Any], keys: dict[str, Path], **extra: str) -> str:
    params = {
        "notify_time": "2026-11-26 15:20:01", "notify_type": "trade_status_sync",
        "notify_id": "2026112600222152001000000009", "app_id": LOCAL_APP_ID,
        "charset": "utf-8", "version": "1.0", "trade_no": "2026112622001400000000000009",
        "out_trade_no": order["id"], "buyer_id": "2088102000000001",
        "seller_id": LOCAL_SELLER_ID, "trade_status": "TRADE_SUCCESS",
        "total_amount": order["totalMoney"], "receipt_amount": order["totalMoney"],
        "buyer_pay_amount": order["totalMoney"], "gmt_create": "2026-11-26 15:19:50",
        "gmt_payment": "2026-11-26 15:20:00", "subject": "Tea cup 茶杯", **extra,
    }
    return urllib.parse.urlencode(sign_params(params, load_private_key(keys["alipay_private"])))


def event(body: str | None, *, b64: bool = False, method: str = "POST",
          content_type: str = FORM_TYPE) -> dict[str, Any]:
    """What a function URL hands the function (payload format 2.0)."""
    if b64 and body is not None:
        body = base64.b64encode(body.encode()).decode()
    return {
        "version": "2.0", "rawPath": "/", "rawQueryString": "",
        "headers": {"content-type": content_type, "host": "abc.lambda-url.us-east-1.on.aws"},
        "requestContext": {"http": {"method": method, "path": "/", "sourceIp": "110.75.1.1"}},
        "body": body, "isBase64Encoded": b64,
    }


def invoke(client: Any, payload: Any) -> dict[str, Any]:
    answer = client.lambda_.invoke("alipay_notify_url", payload).payload
    assert answer["headers"] == {"Content-Type": "text/plain"}
    return answer


@pytest.mark.parametrize("b64", [False, True])
def test_signed_notify_is_published_and_answered_success(
        client: Any, app_deps: Any, order: dict[str, Any], keys: dict[str, Path], b64: bool,
) -> None:
    form = signed_form(order, keys)
    answer = invoke(client, event(form, b64=b64))
    assert (answer["statusCode"], answer["body"]) == (200, "success")
    [msg] = app_deps.broker.pays
    assert msg.pop("receivedAt").endswith("Z")  # the worker's timeline uses it
    assert [msg] == [{
        "orderId": order["id"], "tradeNo": "2026112622001400000000000009",
        "totalAmount": order["totalMoney"], "payTime": "2026-11-26T07:20:00.000Z",
        "notifyId": "2026112600222152001000000009",
        "notify": dict(urllib.parse.parse_qsl(form))}]


def test_route_and_function_url_share_one_path(
        client: Any, app_deps: Any, order: dict[str, Any], keys: dict[str, Path]) -> None:
    form = signed_form(order, keys)
    r = client.http.post("/alipay/notify", headers={"Content-Type": FORM_TYPE}, body=form.encode())
    assert r.body.decode() == invoke(client, event(form))["body"] == "success"
    assert len(app_deps.broker.pays) == 2  # Alipay's redelivery; the bridge dedups by status


@pytest.mark.parametrize("payload", [
    event(None),
    event("not=a=form&&&"),
    event("%%%", b64=False),
    event("a=1&a=2"),
    {**event("x=1"), "body": "@@not-base64@@", "isBase64Encoded": True},
    event("out_trade_no=ORDER_1&sign=abc"),
    event("x=1", content_type="application/json"),
    {},
    "not an event",
])
def test_malformed_input_is_failure_and_changes_nothing(
        client: Any, app_deps: Any, order: dict[str, Any], payload: Any) -> None:
    answer = invoke(client, payload)
    assert answer["body"] == "failure"
    assert app_deps.broker.pays == []
    assert app_deps.store.get_order(order["id"]).status == "UNPAID"


def test_a_tampered_signature_is_failure(
        client: Any, app_deps: Any, order: dict[str, Any], keys: dict[str, Path]) -> None:
    form = signed_form(order, keys).replace("total_amount=", "total_amount=1")
    assert invoke(client, event(form))["body"] == "failure"
    assert app_deps.broker.pays == []


def test_get_is_405(client: Any, app_deps: Any) -> None:
    answer = invoke(client, event(None, method="GET"))
    assert (answer["statusCode"], answer["body"]) == (405, "failure")


# --- the size limit: measured before anything is decoded, parsed or logged ----------


def oversized(n: int) -> str:
    """A form-shaped body of n bytes whose content is easy to look for in the logs."""
    return "out_trade_no=" + "Z" * (n - len("out_trade_no="))


@pytest.mark.parametrize("b64", [False, True])
def test_a_body_over_the_limit_is_refused_unparsed_and_only_its_size_logged(
        client: Any, app_deps: Any, order: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
        b64: bool) -> None:
    import app as app_module

    def no_parse(raw: bytes) -> None:
        raise AssertionError("an oversized body was parsed")

    monkeypatch.setattr(app_module, "_form", no_parse)
    with json_log_lines() as lines:
        answer = invoke(client, event(oversized(5_000_000), b64=b64))
    assert (answer["statusCode"], answer["body"]) == (200, "failure")
    assert app_deps.broker.pays == []
    unit = "base64 characters" if b64 else "characters"
    size = len(base64.b64encode(b"x" * 5_000_000)) if b64 else 5_000_000
    (refusal,) = [json.loads(t) for t in lines if "notify refused" in t]
    assert refusal["message"] == (f"notify refused: a body of {size} {unit}, over the limit "
                                  f"of {MAX_NOTIFY_BASE64_CHARS if b64 else MAX_NOTIFY_BYTES}")
    assert all(len(t) < 2048 and "ZZZZ" not in t for t in lines)


def test_base64_over_the_limit_is_not_decoded(
        client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import app as app_module

    def no_decode(*args: Any, **kwargs: Any) -> bytes:
        raise AssertionError("an oversized base64 body was decoded")

    monkeypatch.setattr(app_module.base64, "b64decode", no_decode)
    payload = event(oversized(MAX_NOTIFY_BYTES + 3), b64=True)
    assert len(payload["body"]) > MAX_NOTIFY_BASE64_CHARS
    assert invoke(client, payload)["body"] == "failure"


@pytest.mark.parametrize(("size", "parsed"), [
    (MAX_NOTIFY_BYTES, True), (MAX_NOTIFY_BYTES + 1, False), (MAX_NOTIFY_BYTES + 2, False)])
@pytest.mark.parametrize("b64", [False, True])
def test_the_limit_is_on_the_decoded_bytes(
        client: Any, monkeypatch: pytest.MonkeyPatch, size: int, parsed: bool,
        b64: bool) -> None:
    import app as app_module

    seen: list[int] = []
    monkeypatch.setattr(app_module, "_form", lambda raw: seen.append(len(raw)))
    # Over by 1 or 2 bytes, base64 without padding is still within the encoded limit:
    # the decoded size decides.
    assert invoke(client, event(oversized(size), b64=b64))["body"] == "failure"
    assert seen == ([size] if parsed else [])


def test_a_value_of_10_kb_in_a_15_kb_notify_is_logged_clipped(
        client: Any, app_deps: Any, order: dict[str, Any], keys: dict[str, Path]) -> None:
    """Under the limit, so parsed, verified (its signature is good) and refused: every
    line about it carries the value cut, not whole."""
    long_id = "ORDER_" + "9" * 10_000
    form = signed_form({**order, "id": long_id}, keys, passback_params="p" * 3500)
    assert 14_000 < len(form) <= MAX_NOTIFY_BYTES
    with json_log_lines() as lines:
        assert invoke(client, event(form))["body"] == "failure"
    assert app_deps.broker.pays == []
    entries = [json.loads(t) for t in lines]
    assert any(e["message"].startswith("notify refused") for e in entries)
    assert all(len(t) < 2048 and "9" * 1000 not in t for t in lines)
    assert all(e["orderId"].endswith(f"…[{len(long_id) - MAX_VALUE_CHARS} chars cut]")
               for e in entries if "orderId" in e)
