"""The notify behind the Lambda function URL (`alipay_notify_url`): the same
parse and handler as the /alipay/notify route, in a function URL's event
(payload 2.0) and answer shape."""

from __future__ import annotations

import base64
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from chalicelib import handlers
from chalicelib.alipay_gateway import AlipayGateway
from local.alipay_sandbox import LOCAL_APP_ID, LOCAL_SELLER_ID
from local.alipay_sandbox.keys import ensure_keys, load_private_key
from local.alipay_sandbox.signer import sign_params

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


def signed_form(order: dict[str, Any], keys: dict[str, Path]) -> str:
    params = {
        "notify_time": "2026-11-26 15:20:01", "notify_type": "trade_status_sync",
        "notify_id": "2026112600222152001000000009", "app_id": LOCAL_APP_ID,
        "charset": "utf-8", "version": "1.0", "trade_no": "2026112622001400000000000009",
        "out_trade_no": order["id"], "buyer_id": "2088102000000001",
        "seller_id": LOCAL_SELLER_ID, "trade_status": "TRADE_SUCCESS",
        "total_amount": order["totalMoney"], "receipt_amount": order["totalMoney"],
        "buyer_pay_amount": order["totalMoney"], "gmt_create": "2026-11-26 15:19:50",
        "gmt_payment": "2026-11-26 15:20:00", "subject": "Tea cup 茶杯",
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
    answer = invoke(client, event(signed_form(order, keys), b64=b64))
    assert (answer["statusCode"], answer["body"]) == (200, "success")
    assert app_deps.broker.pays == [{
        "orderId": order["id"], "tradeNo": "2026112622001400000000000009",
        "totalAmount": order["totalMoney"], "payTime": "2026-11-26T07:20:00.000Z",
        "notifyId": "2026112600222152001000000009"}]


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
