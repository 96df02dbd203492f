"""An order paid end to end on one machine: the API served over HTTP (chalice's
local server), the Alipay sandbox, the real RabbitMQ (a vhost per test), the
bridge, moto's DynamoDB. Every signature is real."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from chalice.config import Config

from chalicelib import broker, config, deps, worker
from chalicelib.alipay_gateway import AlipayGateway
from chalicelib.context import Deps
from chalicelib.store import Store
from local.alipay_sandbox import LOCAL_APP_ID, LOCAL_SELLER_ID, make_server
from local.alipay_sandbox.keys import ensure_keys, load_private_key
from local.alipay_sandbox.signer import sign_params
from local.api import local_server
from tests.conftest import bearer
from tests.counting import CountingStore
from tests.waiting import wait_until

pytestmark = pytest.mark.rabbitmq


@dataclasses.dataclass
class Shop:
    deps: Deps
    api: str
    sandbox: str
    store: CountingStore

    def call(self, method: str, path: str, user: str = "alice") -> tuple[int, Any]:
        req = urllib.request.Request(self.api + path, method=method, data=b"{}",
                                     headers=bearer(user))
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def order(self, user: str = "alice", **cart: int) -> dict[str, Any]:
        for gid, num in (cart or {"g1": 2, "g2": 1}).items():
            self.store.set_cart_line(user, gid, num)
        status, order = self.call("POST", "/orders", user)
        assert status == 201, order
        return order

    def pay_url(self, order: dict[str, Any], user: str = "alice") -> str:
        status, answer = self.call("POST", f"/orders/{order['id']}/pay", user)
        assert status == 200, answer
        return str(answer["payUrl"])

    def status(self, order: dict[str, Any]) -> str:
        found = self.store.get_order(order["id"])
        assert found is not None
        return found.status

    def trade(self, order: dict[str, Any]) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.sandbox}/sandbox/trades/{order['id']}") as r:
            return dict(json.loads(r.read()))

    def press_pay(self, order: dict[str, Any], notify: str | None = None) -> tuple[int, str]:
        """The cashier's Pay button: POST /sandbox/pay; returns the status and Location."""
        form = {"out_trade_no": order["id"], **({"notify": notify} if notify else {})}

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args: Any, **kwargs: Any) -> None:
                return None

        opener = urllib.request.build_opener(NoRedirect)
        try:
            r = opener.open(f"{self.sandbox}/sandbox/pay",
                            urllib.parse.urlencode(form).encode(), timeout=10)
            return r.status, ""
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers.get("Location", "")

    def stock(self) -> dict[str, int]:
        return {g.id: g.stock for g in self.store.list_goods()}


def open_url(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return ensure_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture
def shop(rmq_vhost: str, tables: Store, keys: dict[str, Path]) -> Iterator[Shop]:
    from app import app

    sandbox = make_server("127.0.0.1", 0, keys["app_private"].parent, [0.3] * 7)
    api = local_server(app, Config.create(), "127.0.0.1", 0)
    api_url = f"http://127.0.0.1:{api.server.server_address[1]}"
    threads = [threading.Thread(target=s, daemon=True)
               for s in (sandbox.serve_forever, api.server.serve_forever)]
    for t in threads:
        t.start()
    # check_now stands for the delay having passed: the worker takes a check up to a
    # whole delay early (its guard against forged checks: tests/unit/test_forged.py).
    settings = dataclasses.replace(config.load(), rmq_url=str(rmq_vhost), check_delay_seconds=60,
                                   check_skew_seconds=60)
    store = CountingStore()
    d = Deps(
        settings=settings,
        store=store,
        broker=broker.Broker(settings.rmq_url, settings.check_delay_seconds),
        gateway=AlipayGateway(
            LOCAL_APP_ID, LOCAL_SELLER_ID, sandbox.gateway_url,
            keys["app_private"].read_text(), keys["alipay_public"].read_text(),
            f"{api_url}/alipay/notify", f"{api_url}/alipay/return", timeout=5.0),
    )
    deps.use(d)
    stop = threading.Event()
    consumer = threading.Thread(target=worker.run, args=(d, stop), daemon=True,
                                kwargs={"sweep_interval": 3600, "retry_delays_ms": (100, 200)})
    consumer.start()
    yield Shop(d, api_url, sandbox.base_url, store)
    stop.set()
    consumer.join(10)
    deps.use(None)
    api.shutdown()
    sandbox.shutdown()
    sandbox.server_close()
    d.broker.close()  # type: ignore[attr-defined]


def check_now(shop: Shop, order: dict[str, Any]) -> None:
    shop.deps.broker.publish(broker.EXCHANGE_DELAY, broker.QUEUE_CHECK, {"orderId": order["id"]})


def test_order_pay_press_pay_is_paid_within_a_second(shop: Shop) -> None:
    order = shop.order()
    taken = shop.stock()
    status, cashier = open_url(shop.pay_url(order))
    assert status == 200 and "99.70" in cashier
    pressed = time.monotonic()
    code, location = shop.press_pay(order)
    assert code == 302 and location.startswith(f"{shop.api}/alipay/return?")
    took = wait_until(lambda: shop.status(order) == "PAID", 1.0, "PAID within a second")
    assert time.monotonic() - pressed <= 1.0, took
    assert shop.stock() == taken
    assert shop.trade(order)["notify_acknowledged"] is True
    status, page = open_url(location)
    assert status == 200 and "Status: <strong>paid</strong>" in page
    paid = shop.store.get_order(order["id"])
    assert paid is not None and paid.transaction_id == shop.trade(order)["trade_no"]


def test_the_same_notify_20_times_at_once_is_one_transition(
    shop: Shop, keys: dict[str, Path]
) -> None:
    order = shop.order()
    form = sign_params({
        "notify_time": "2026-11-26 15:20:01", "notify_type": "trade_status_sync",
        "notify_id": "n-20-at-once", "app_id": LOCAL_APP_ID, "charset": "utf-8",
        "version": "1.0", "trade_no": "2026112622001499999999999999",
        "out_trade_no": order["id"], "buyer_id": "2088102000000001",
        "seller_id": LOCAL_SELLER_ID, "trade_status": "TRADE_SUCCESS",
        "total_amount": order["totalMoney"], "receipt_amount": order["totalMoney"],
        "buyer_pay_amount": order["totalMoney"], "gmt_create": "2026-11-26 15:19:50",
        "gmt_payment": "2026-11-26 15:20:00", "subject": "Tea",
    }, load_private_key(keys["alipay_private"]))
    body = urllib.parse.urlencode(form).encode()

    def send(_: int) -> str:
        req = urllib.request.Request(f"{shop.api}/alipay/notify", data=body, headers={
            "Content-Type": "application/x-www-form-urlencoded"})
        with urllib.request.urlopen(req, timeout=20) as r:
            return str(r.read().decode())

    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(send, range(20)))
    assert answers == ["success"] * 20
    wait_until(lambda: shop.status(order) == "PAID", 5, "PAID")
    wait_until(lambda: shop.deps.broker.queue_depth(broker.QUEUE_PAY) == 0, 10, "drained")
    time.sleep(0.3)
    assert shop.store.transitions == [("PAID", order["id"])]


def test_a_lost_notify_is_found_by_the_check(shop: Shop) -> None:
    order = shop.order()
    taken = shop.stock()
    open_url(shop.pay_url(order))
    code, _ = shop.press_pay(order, notify="drop")
    assert code == 302
    time.sleep(0.5)
    assert shop.status(order) == "UNPAID" and shop.trade(order)["notify_attempts"] == []
    check_now(shop, order)
    wait_until(lambda: shop.status(order) == "PAID", 5, "the check marks it PAID")
    assert shop.stock() == taken  # not closed, stock stays taken
    assert shop.store.transitions == [("PAID", order["id"])]


def test_the_check_closes_the_trade_then_the_order(shop: Shop) -> None:
    before = shop.stock()
    order = shop.order()
    open_url(shop.pay_url(order))  # the cashier opened: a WAIT_BUYER_PAY trade exists
    check_now(shop, order)
    wait_until(lambda: shop.status(order) == "CLOSED", 5, "CLOSED")
    assert shop.trade(order)["status"] == "TRADE_CLOSED"
    assert shop.stock() == before
    code, _ = shop.press_pay(order)  # too late: Alipay refuses a closed trade
    assert code in (400, 409)


def test_cancelled_then_paid_through_the_old_link_is_refunded_once(shop: Shop) -> None:
    before = shop.stock()
    order = shop.order()
    old_link = shop.pay_url(order)
    status, cancelled = shop.call("POST", f"/orders/{order['id']}/cancel")
    assert status == 200 and cancelled["status"] == "CLOSED"
    assert shop.stock() == before
    assert open_url(old_link)[0] == 200  # the signed link still opens a cashier
    code, _ = shop.press_pay(order)
    assert code == 302
    wait_until(lambda: shop.status(order) == "REFUNDED", 5, "REFUNDED")
    # Alipay sends the notify again (and again): still one refund
    urllib.request.urlopen(urllib.request.Request(
        f"{shop.sandbox}/sandbox/notify/{order['id']}", method="POST"), timeout=10).read()
    time.sleep(1.0)
    trade = shop.trade(order)
    assert len(trade["refunds"]) == 1
    assert trade["refunded_amount"] == order["totalMoney"]
    assert shop.status(order) == "REFUNDED"
    assert shop.stock() == before  # counted once: taken, given back at the cancel
    assert shop.store.transitions == [("CLOSED", order["id"]), ("REFUNDED", order["id"])]
    wire = shop.store.get_order(order["id"]).to_wire()  # type: ignore[union-attr]
    assert (wire["orderStatus"], wire["payStatus"]) == ("2", "3")


def test_cancel_after_paying_without_a_notify_is_409_and_the_order_is_paid(shop: Shop) -> None:
    order = shop.order()
    open_url(shop.pay_url(order))
    shop.press_pay(order, notify="drop")
    status, answer = shop.call("POST", f"/orders/{order['id']}/cancel")
    assert status == 409, answer
    assert shop.status(order) == "PAID"
    assert shop.trade(order)["refunds"] == []

