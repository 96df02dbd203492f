"""The notify and return routes with real RSA2 signatures (the sandbox's signer),
a fake publisher and moto's DynamoDB: what is refused changes nothing."""

from __future__ import annotations

import urllib.parse
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from chalicelib import handlers
from chalicelib.alipay_gateway import AlipayGateway
from chalicelib.domain import EventType, iso, parse_iso
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


def pay_through_notify(d: Any, order: dict[str, Any], keys: dict[str, Path]) -> None:
    """The notify as Alipay sends it, then its pay message as the worker gets it."""
    assert handlers.on_notify(d, signed(notify_params(order), keys))
    handlers.on_paid(d, d.broker.pays[-1])


def post(client: Any, form: dict[str, str] | bytes) -> str:
    raw = form if isinstance(form, bytes) else urllib.parse.urlencode(form).encode()
    r = client.http.post("/alipay/notify", headers=FORM, body=raw)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/plain")
    return r.body.decode()


def test_valid_notify_publishes_and_answers_success(client: Any, paying: Any,
                                                    keys: dict[str, Path]) -> None:
    d, order = paying
    form = signed(notify_params(order), keys)
    before = datetime.now(UTC)
    assert post(client, form) == "success"
    [msg] = d.broker.pays
    received = parse_iso(msg.pop("receivedAt"))
    assert before - timedelta(milliseconds=1) <= received <= datetime.now(UTC)
    assert msg == {
        "orderId": order["id"], "tradeNo": "2026112622001400000000000001",
        "totalAmount": "99.70", "payTime": "2026-11-26T07:20:00.000Z",
        "notifyId": "2026112600222152001000000001", "notify": form}
    assert d.store.get_order(order["id"]).status == "UNPAID"  # the bridge marks it PAID
    # The route writes nothing; the worker puts the notify on the timeline, at the
    # time the route received it, once however often the message comes.
    assert [e.type for e in d.store.timeline(order["id"])] == [EventType.CREATED]
    stamped = {**msg, "receivedAt": iso(received)}
    for _ in range(2):
        handlers.on_paid(d, stamped)
    events = d.store.timeline(order["id"])
    notifies = [e for e in events if e.type == EventType.NOTIFY]
    assert len(notifies) == 1
    assert notifies[0].time == received.replace(microsecond=received.microsecond // 1000 * 1000)
    assert notifies[0].detail["verified"] is True
    assert notifies[0].detail["fields"]["trade_no"] == "2026112622001400000000000001"
    assert "sign" not in notifies[0].detail["fields"]
    assert [e.type for e in events].index(EventType.NOTIFY) < [
        e.type for e in events].index(EventType.PAID)


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
    pay_through_notify(d, order, keys)
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


def test_pay_gives_a_signed_page_pay_url(client: Any, paying: Any,
                                        keys: dict[str, Path]) -> None:
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
    pay_through_notify(d, order, keys)
    r = client.http.post(f"/orders/{order['id']}/pay", headers=bearer("alice"))
    assert r.status_code == 409


# --- the size limit and bounded logs on the API route ------------------------------


def test_a_body_over_the_limit_is_200_failure_unparsed_and_not_logged(
        client: Any, paying: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    import app as app_module
    from tests.unit.test_logs import json_log_lines

    def no_parse(raw: bytes) -> None:
        raise AssertionError("an oversized body was parsed")

    d, order = paying
    monkeypatch.setattr(app_module, "_form", no_parse)
    huge = b"out_trade_no=" + b"Q" * 5_000_000
    with json_log_lines() as lines:
        _refused(client, d, order, huge)
    (refusal,) = [json.loads(t) for t in lines if "notify refused" in t]
    assert refusal["message"] == (f"notify refused: a body of {len(huge)} bytes, over the "
                                  f"limit of {app_module.MAX_NOTIFY_BYTES}")
    assert all(len(t) < 2048 and "QQQQ" not in t for t in lines)


def test_the_route_parses_a_body_of_the_limit_and_no_more(
        client: Any, app_deps: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import app as app_module

    seen: list[int] = []
    monkeypatch.setattr(app_module, "_form", lambda raw: seen.append(len(raw)))
    limit = app_module.MAX_NOTIFY_BYTES
    for size in (limit, limit + 1):
        assert post(client, b"out_trade_no=" + b"1" * (size - 13)) == "failure"
    assert seen == [limit]


def test_a_value_of_10_kb_in_a_15_kb_notify_is_logged_clipped_on_the_route(
        client: Any, paying: Any, keys: dict[str, Path]) -> None:
    import json

    from chalicelib.logs import MAX_VALUE_CHARS
    from tests.unit.test_logs import json_log_lines

    d, order = paying
    long_id = "ORDER_" + "7" * 10_000
    form = signed(notify_params({**order, "id": long_id}, passback_params="p" * 3500), keys)
    raw = urllib.parse.urlencode(form).encode()
    assert 14_000 < len(raw) <= 16 * 1024
    with json_log_lines() as lines:
        _refused(client, d, order, raw)
    entries = [json.loads(t) for t in lines]
    refusals = [e for e in entries if e["message"].startswith("notify refused")]
    assert refusals and all("orderId" in e for e in refusals)
    assert all(len(t) < 2048 and "7" * 1000 not in t for t in lines)
    assert all(e["orderId"].endswith(f"…[{len(long_id) - MAX_VALUE_CHARS} chars cut]")
               for e in entries if "orderId" in e)
