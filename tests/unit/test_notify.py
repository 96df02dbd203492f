"""The notify and return routes with real RSA2 signatures (the sandbox's signer),
a fake publisher and moto's DynamoDB: what is refused changes nothing."""

from __future__ import annotations

import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from chalicelib import handlers
from chalicelib.alipay_gateway import AlipayGateway
from local.alipay_sandbox import LOCAL_APP_ID, LOCAL_SELLER_ID
from local.alipay_sandbox.keys import ensure_keys, load_private_key
from local.alipay_sandbox.signer import sign_params
from tests.conftest import bearer, body

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return ensure_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return ensure_keys(tmp_path_factory.mktemp("other"))


@pytest.fixture
def paying(app_deps: Any, keys: dict[str, Path]) -> Any:
    app_deps.gateway = AlipayGateway(
        LOCAL_APP_ID, LOCAL_SELLER_ID, "http://127.0.0.1:9/gateway.do",
        keys["app_private"].read_text(), keys["alipay_public"].read_text(),
        "http://127.0.0.1:8000/alipay/notify", "http://127.0.0.1:8000/alipay/return",
        timeout=1.0)
    app_deps.store.set_cart_line("alice", "g1", 2)
    app_deps.store.set_cart_line("alice", "g2", 1)
    order = handlers.create_order(app_deps, "alice")
    return app_deps, order


def notify_params(order: dict[str, Any], **changes: str) -> dict[str, str]:
    params = {
        "notify_time": "2026-11-26 15:20:01", "notify_type": "trade_status_sync",
        "notify_id": "2026112600222152001000000001", "app_id": LOCAL_APP_ID,
        "charset": "utf-8", "version": "1.0", "trade_no": "2026112622001400000000000001",
        "out_trade_no": order["id"], "buyer_id": "2088102000000001",
        "seller_id": LOCAL_SELLER_ID, "trade_status": "TRADE_SUCCESS",
        "total_amount": order["totalMoney"], "receipt_amount": order["totalMoney"],
        "buyer_pay_amount": order["totalMoney"], "gmt_create": "2026-11-26 15:19:50",
        "gmt_payment": "2026-11-26 15:20:00", "subject": "Tea cup and 1 more",
    }
    params.update(changes)
    return params


def signed(params: dict[str, str], keys: dict[str, Path]) -> dict[str, str]:
    return sign_params(params, load_private_key(keys["alipay_private"]))


def post(client: Any, form: dict[str, str] | bytes) -> str:
    raw = form if isinstance(form, bytes) else urllib.parse.urlencode(form).encode()
    r = client.http.post("/alipay/notify", headers=FORM, body=raw)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/plain")
    return r.body.decode()


def test_valid_notify_publishes_and_answers_success(client: Any, paying: Any,
                                                    keys: dict[str, Path]) -> None:
    d, order = paying
    assert post(client, signed(notify_params(order), keys)) == "success"
    assert d.broker.pays == [{
        "orderId": order["id"], "tradeNo": "2026112622001400000000000001",
        "totalAmount": "99.70", "payTime": "2026-11-26T07:20:00.000Z",
        "notifyId": "2026112600222152001000000001"}]
    assert d.store.get_order(order["id"]).status == "UNPAID"  # the bridge marks it PAID


def _refused(client: Any, d: Any, order: dict[str, Any], form: dict[str, str] | bytes) -> None:
    assert post(client, form) == "failure"
    assert d.broker.pays == []
    assert d.store.get_order(order["id"]).status == "UNPAID"


@pytest.mark.parametrize("change", [
    {"total_amount": "99.69"}, {"total_amount": "0.01"}, {"total_amount": "99.700"},
    {"total_amount": "-99.70"}, {"app_id": "2021000000000000"},
    {"seller_id": "2088999999999999"}, {"out_trade_no": "ORDER_1795678420690_0000000000000000"},
    {"out_trade_no": "not-ours"}, {"trade_no": ""},
])
def test_signed_but_wrong_business_fields_fail(client: Any, paying: Any, keys: dict[str, Path],
                                               change: dict[str, str]) -> None:
    d, order = paying
    _refused(client, d, order, signed(notify_params(order, **change), keys))


def test_bad_signatures_fail(client: Any, paying: Any, keys: dict[str, Path],
                             other_keys: dict[str, Path]) -> None:
    d, order = paying
    good = signed(notify_params(order), keys)
    tampered = {**good, "total_amount": "0.01"}
    missing = {k: v for k, v in good.items() if k != "sign"}
    rsa1 = {**good, "sign_type": "RSA"}
    garbage = {**good, "sign": "abc"}
    forged = signed(notify_params(order), other_keys)  # signed, but not by Alipay's key
    for form in (tampered, missing, rsa1, garbage, forged):
        _refused(client, d, order, form)


def test_malformed_forms_fail(client: Any, paying: Any, keys: dict[str, Path]) -> None:
    d, order = paying
    good = urllib.parse.urlencode(signed(notify_params(order), keys)).encode()
    _refused(client, d, order, good + b"&total_amount=0.01")  # the same key twice
    _refused(client, d, order, b"\xff\xfe=\x00")
    _refused(client, d, order, b"")
    r = client.http.post("/alipay/notify", headers={"Content-Type": "application/json"},
                         body=b"{}")
    assert r.status_code == 415


@pytest.mark.parametrize("trade_status", ["WAIT_BUYER_PAY", "TRADE_CLOSED"])
def test_verified_notify_of_another_status_is_success_and_changes_nothing(
    client: Any, paying: Any, keys: dict[str, Path], trade_status: str
) -> None:
    d, order = paying
    assert post(client, signed(notify_params(order, trade_status=trade_status), keys)) == "success"
    assert d.broker.pays == []


def test_broker_down_answers_failure_so_alipay_retries(client: Any, paying: Any,
                                                       keys: dict[str, Path]) -> None:
    d, order = paying
    d.broker.down = True
    _refused(client, d, order, signed(notify_params(order), keys))


def return_params(order: dict[str, Any], **changes: str) -> dict[str, str]:
    params = {"charset": "utf-8", "out_trade_no": order["id"],
              "method": "alipay.trade.page.pay.return", "total_amount": order["totalMoney"],
              "trade_no": "2026112622001400000000000001", "auth_app_id": LOCAL_APP_ID,
              "version": "1.0", "app_id": LOCAL_APP_ID, "seller_id": LOCAL_SELLER_ID,
              "timestamp": "2026-11-26 15:20:02"}
    params.update(changes)
    return params


def test_return_page_shows_the_status_and_never_changes_it(client: Any, paying: Any,
                                                           keys: dict[str, Path]) -> None:
    d, order = paying
    query = urllib.parse.urlencode(signed(return_params(order), keys))
    r = client.http.get(f"/alipay/return?{query}")
    assert r.status_code == 200
    page = r.body.decode()
    assert order["id"] in page and "confirming payment" in page
    assert d.store.get_order(order["id"]).status == "UNPAID"
    handlers.on_paid(d, {"orderId": order["id"], "tradeNo": "T1", "totalAmount": "99.70"})
    page = client.http.get(f"/alipay/return?{query}").body.decode()
    assert "Status: <strong>paid</strong>" in page


def test_return_with_a_bad_signature_is_400(client: Any, paying: Any,
                                            keys: dict[str, Path]) -> None:
    d, order = paying
    params = signed(return_params(order), keys)
    params["total_amount"] = "0.01"
    r = client.http.get(f"/alipay/return?{urllib.parse.urlencode(params)}")
    assert r.status_code == 400
    assert "invalid signature" in r.body.decode()


def test_pay_gives_a_signed_page_pay_url(client: Any, paying: Any) -> None:
    d, order = paying
    r = client.http.post(f"/orders/{order['id']}/pay", headers=bearer("alice"))
    assert r.status_code == 200, r.body
    url = urllib.parse.urlsplit(body(r)["payUrl"])
    q = dict(urllib.parse.parse_qsl(url.query))
    assert q["method"] == "alipay.trade.page.pay" and q["sign_type"] == "RSA2" and q["sign"]
    assert q["notify_url"] == "http://127.0.0.1:8000/alipay/notify"
    assert '"total_amount":"99.70"' in q["biz_content"]
    assert '"product_code":"FAST_INSTANT_TRADE_PAY"' in q["biz_content"]
    assert '"time_expire":"' in q["biz_content"]
    assert client.http.post(f"/orders/{order['id']}/pay", headers=bearer("bob")).status_code == 404
    handlers.on_paid(d, {"orderId": order["id"], "tradeNo": "T1", "totalAmount": "99.70"})
    r = client.http.post(f"/orders/{order['id']}/pay", headers=bearer("alice"))
    assert r.status_code == 409
