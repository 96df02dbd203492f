"""The order's state machine through the handlers: check, pay, cancel, sweep, refund."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from chalicelib import handlers
from chalicelib.domain import Unavailable, Unprocessable, to_fen
from chalicelib.ports import RefundOutcome
from tests.conftest import FakeGateway, bearer, body, check_due, fake_pay_msg


@dataclass
class FakeRefunds:
    """Stands in for the Alipay gateway where only refunds matter."""

    app_id: str = "app"
    seller_id: str = "seller"
    refunds: list[tuple[str, Decimal, str]] = field(default_factory=list)
    read_notice = FakeGateway.read_notice

    def query_trade(self, order_id: str) -> None:
        return None  # no trade at the provider

    def close_trade(self, order_id: str) -> None:
        return None

    def refund_payment(self, order_id: str, amount: Decimal, request_no: str) -> RefundOutcome:
        self.refunds.append((order_id, amount, request_no))
        return RefundOutcome(order_id=order_id, trade_no="T1", refunded_fen=to_fen(amount),
                             moved=True)


def order_for(app_deps: Any, user: str = "alice", **cart: int) -> dict[str, Any]:
    for gid, num in (cart or {"g1": 2, "g2": 1}).items():
        app_deps.store.set_cart_line(user, gid, num)
    return handlers.create_order(app_deps, user)


def stock(app_deps: Any) -> dict[str, int]:
    return {g.id: g.stock for g in app_deps.store.list_goods()}


def pay_msg(order: dict[str, Any], trade_no: str = "T1", amount: str | None = None) -> dict:
    return fake_pay_msg(order["id"], trade_no, amount or order["totalMoney"])


def status(app_deps: Any, order: dict[str, Any]) -> str:
    return app_deps.store.get_order(order["id"]).status


def test_check_closes_an_unpaid_order_and_returns_stock_once(app_deps: Any) -> None:
    before = stock(app_deps)
    order = order_for(app_deps)
    assert stock(app_deps) == {**before, "g1": before["g1"] - 2, "g2": before["g2"] - 1}
    assert check_due(app_deps, order["id"]) == "CLOSED"
    assert stock(app_deps) == before
    assert check_due(app_deps, order["id"]) == "CLOSED"
    assert stock(app_deps) == before
    closed = app_deps.store.get_order(order["id"]).to_wire()
    assert (closed["orderStatus"], closed["payStatus"]) == ("2", "2")
    assert closed["closeTime"] is not None


def test_pay_marks_paid_once_and_check_then_does_nothing(app_deps: Any) -> None:
    order = order_for(app_deps)
    taken = stock(app_deps)
    assert handlers.on_paid(app_deps, pay_msg(order)) == "PAID"
    assert handlers.on_paid(app_deps, pay_msg(order)) == "PAID"
    assert check_due(app_deps, order["id"]) == "PAID"
    assert stock(app_deps) == taken
    paid = app_deps.store.get_order(order["id"]).to_wire()
    assert paid["transactionId"] == "T1" and paid["payTime"] == "2026-11-26T07:00:00.000Z"
    assert (paid["orderStatus"], paid["payStatus"]) == ("1", "1")


@pytest.mark.parametrize("amount", ["99.69", "99.71", "0.01", "abc", "99.700"])
def test_pay_with_another_amount_is_never_marked_paid(app_deps: Any, amount: str) -> None:
    order = order_for(app_deps)
    with pytest.raises(Unprocessable):
        handlers.on_paid(app_deps, pay_msg(order, amount=amount))
    assert status(app_deps, order) == "UNPAID"


@pytest.mark.parametrize("msg", [{}, {"orderId": 7}, {"orderId": "ORDER_x"},
                                 {"orderId": "ORDER_1764140000000_0123456789abcdef",
                                  "tradeNo": "T", "totalAmount": "1.00"}])
def test_malformed_or_unknown_pay_messages_are_unprocessable(app_deps: Any, msg: dict) -> None:
    with pytest.raises(Unprocessable):
        handlers.on_paid(app_deps, msg)


def test_a_second_trade_for_a_paid_order_needs_a_person(app_deps: Any) -> None:
    order = order_for(app_deps)
    handlers.on_paid(app_deps, pay_msg(order, trade_no="T1"))
    with pytest.raises(Unprocessable):
        handlers.on_paid(app_deps, pay_msg(order, trade_no="T2"))


def test_money_for_a_closed_order_is_refunded_once(app_deps: Any) -> None:
    app_deps.gateway = FakeRefunds()
    order = order_for(app_deps)
    before_close = stock(app_deps)
    assert check_due(app_deps, order["id"]) == "CLOSED"
    assert handlers.on_paid(app_deps, pay_msg(order)) == "REFUNDED"
    assert handlers.on_paid(app_deps, pay_msg(order)) == "REFUNDED"
    assert app_deps.gateway.refunds == [
        (order["id"], Decimal("99.70"), f"REFUND_{order['id']}")]
    refunded = app_deps.store.get_order(order["id"]).to_wire()
    assert refunded["status"] == "REFUNDED" and (refunded["orderStatus"],
                                                 refunded["payStatus"]) == ("2", "3")
    # the stock came back once, at the close, and stays back
    assert stock(app_deps)["g1"] == before_close["g1"] + 2


def test_without_a_gateway_a_pay_message_waits_and_changes_nothing(app_deps: Any) -> None:
    order = order_for(app_deps)
    check_due(app_deps, order["id"])
    app_deps.gateway = None  # its notify cannot be verified: retried, then parked
    with pytest.raises(Unavailable):
        handlers.on_paid(app_deps, pay_msg(order))
    assert status(app_deps, order) == "CLOSED"
    assert app_deps.store.get_refund(f"REFUND_{order['id']}") is None
    assert app_deps.store.paid_but_closed() == []


def test_without_a_gateway_an_unpaid_order_is_never_closed(app_deps: Any) -> None:
    app_deps.gateway = None
    order = order_for(app_deps)
    taken = stock(app_deps)
    with pytest.raises(Unavailable):
        check_due(app_deps, order["id"])
    assert status(app_deps, order) == "UNPAID" and stock(app_deps) == taken


def test_pay_and_check_race_resolves_to_one_winner(app_deps: Any) -> None:
    app_deps.gateway = FakeRefunds()
    initial = stock(app_deps)
    orders = [order_for(app_deps, f"u{i}", g1=1) for i in range(10)]
    app_deps.clock.now = max(app_deps.store.get_order(o["id"]).check_time for o in orders)
    for order in orders:
        barrier = threading.Barrier(4)

        def run(fn: Any, msg: dict, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            fn(app_deps, msg)

        threads = [threading.Thread(target=run, args=(fn, msg)) for fn, msg in [
            (handlers.on_paid, pay_msg(order)), (handlers.on_check, {"orderId": order["id"]}),
            (handlers.on_paid, pay_msg(order)), (handlers.on_check, {"orderId": order["id"]})]]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finals = [status(app_deps, o) for o in orders]
    assert set(finals) <= {"PAID", "REFUNDED"}
    # Two pay messages may both ask for the refund: Alipay refunds once per
    # out_request_no, so what must hold is one request number per refunded order.
    requests = {(no, req) for no, _amount, req in app_deps.gateway.refunds}
    refunded = {o["id"] for o, s in zip(orders, finals, strict=True) if s == "REFUNDED"}
    assert requests == {(no, f"REFUND_{no}") for no in refunded}
    # stock: PAID orders hold theirs; refunded ones gave it back exactly once
    assert stock(app_deps)["g1"] == initial["g1"] - finals.count("PAID")


def test_cancel_route(client: Any, app_deps: Any) -> None:
    before = stock(app_deps)
    order = order_for(app_deps)
    r = client.http.post(f"/orders/{order['id']}/cancel", headers=bearer("bob"))
    assert r.status_code == 404
    r = client.http.post(f"/orders/{order['id']}/cancel", headers=bearer("alice"))
    assert r.status_code == 200, r.body
    assert body(r)["status"] == "CLOSED"
    assert stock(app_deps) == before
    r = client.http.post(f"/orders/{order['id']}/cancel", headers=bearer("alice"))
    assert r.status_code == 409
    assert stock(app_deps) == before


def test_sweeper_finds_orders_whose_delay_message_was_lost(app_deps: Any) -> None:
    app_deps.broker.down = True  # the delay message is never published
    before = stock(app_deps)
    old = order_for(app_deps, "alice")
    app_deps.clock.now = datetime.now(UTC) + timedelta(hours=2)
    fresh = order_for(app_deps, "bob", g1=1)
    paid = order_for(app_deps, "carol", g1=1)
    handlers.on_paid(app_deps, pay_msg(paid))
    app_deps.clock.now = datetime.now(UTC) + timedelta(hours=1)
    # only `old` is due: `fresh` was created "later", `paid` left the sparse index
    assert app_deps.store.unpaid_due(app_deps.clock()) == [old["id"]]
    assert handlers.sweep(app_deps) == {"due": 1, "settled": 1, "failed": 0, "rechecked": 0,
                                        "refunds": 0}
    assert status(app_deps, old) == "CLOSED"
    assert status(app_deps, fresh) == "UNPAID"
    assert stock(app_deps)["g2"] == before["g2"]
    assert handlers.sweep(app_deps) == {"due": 0, "settled": 0, "failed": 0, "rechecked": 0,
                                        "refunds": 0}
