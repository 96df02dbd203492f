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
                                        "refunds": 0, "left": 0}
    assert status(app_deps, old) == "CLOSED"
    assert status(app_deps, fresh) == "UNPAID"
    assert stock(app_deps)["g2"] == before["g2"]
    assert handlers.sweep(app_deps) == {"due": 0, "settled": 0, "failed": 0, "rechecked": 0,
                                        "refunds": 0, "left": 0}


class _SlowAlipay(FakeGateway):
    """The fake provider, with a trade WAITING for each order, each call `cost` seconds
    on a fake clock; `down` (a set of "query", "close"): that call never answers."""

    def __init__(self, cost: float = 0.0, down: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.cost = cost
        self.down = down
        self.spent = 0.0
        self.queried: list[str] = []

    def query_trade(self, order_id: str) -> Any:
        from chalicelib.ports import PaymentUnavailable, Trade, TradeState

        self.spent += self.cost
        self.queried.append(order_id)
        if "query" in self.down:
            raise PaymentUnavailable("alipay.trade.query: timed out")
        return Trade(order_id, None, TradeState.WAITING, 0, None)

    def close_trade(self, order_id: str) -> None:
        from chalicelib.ports import PaymentUnavailable

        self.spent += self.cost
        if "close" in self.down:
            raise PaymentUnavailable("alipay.trade.close: timed out")
        super().close_trade(order_id)


@pytest.mark.parametrize("down", ["query", "close"])
def test_cancel_with_alipay_not_answering_is_503_and_changes_nothing(
        client: Any, app_deps: Any, down: str) -> None:
    """The contract's 503 (a dependency is down), with the order as it was: UNPAID,
    its stock still taken, no trade closed; the cancel asked again then works."""
    order = order_for(app_deps)
    held = stock(app_deps)
    app_deps.gateway = _SlowAlipay(down=frozenset({down}))
    r = client.http.post(f"/orders/{order['id']}/cancel", headers=bearer("alice"))
    assert r.status_code == 503, r.body
    assert body(r)["Code"] == "ServiceUnavailable"
    assert status(app_deps, order) == "UNPAID"
    assert stock(app_deps) == held
    assert app_deps.gateway.closed == []
    app_deps.gateway.down = frozenset()
    r = client.http.post(f"/orders/{order['id']}/cancel", headers=bearer("alice"))
    assert r.status_code == 200, r.body
    assert body(r)["status"] == "CLOSED"


def test_the_api_calls_alipay_with_timeouts_that_fit_api_gateway() -> None:
    """A cancel's query and close at their worst, the secret's read on a cold start
    and every other route's chain stay under 25 s, below API Gateway's 29 s."""
    from chalicelib import config

    cancel = config.API_ROUTE_CHAIN_SECONDS["POST /orders/{id}/cancel"]
    assert cancel == 2 * config.alipay_call_seconds("api") == 10.0
    assert config.alipay_timeout_seconds("api") == config.ALIPAY_SHORT_TIMEOUT_SECONDS
    assert config.OUTBOUND_CHAIN_SECONDS["api"] <= config.API_MAX_CHAIN_SECONDS
    assert config.API_MAX_CHAIN_SECONDS < config.API_GATEWAY_TIMEOUT_SECONDS


def _due_orders(app_deps: Any, n: int) -> list[dict[str, Any]]:
    orders = [order_for(app_deps, f"u{i}", g1=1) for i in range(n)]
    app_deps.clock.now = max(app_deps.store.get_order(o["id"]).check_time for o in orders)
    return orders


def test_sweep_starts_no_check_it_may_not_finish_and_leaves_it_for_the_next_run(
        app_deps: Any, caplog: pytest.LogCaptureFixture) -> None:
    from chalicelib import config

    need = (config.sweep_check_seconds(app_deps.settings.function_role)
            + config.SWEEP_MARGIN_SECONDS)
    orders = _due_orders(app_deps, 5)
    alipay = app_deps.gateway = _SlowAlipay(cost=5.0)  # a query and a close: 10 s

    def seconds_left() -> float:  # the Lambda's clock: need + 25 s at the start
        return need + 25.0 - alipay.spent

    with caplog.at_level("WARNING", logger="chalicelib.handlers"):
        result = handlers.sweep(app_deps, seconds_left=seconds_left)
    # started at need+25, need+15, need+5 left; not at need-5
    assert result == {"due": 5, "settled": 3, "failed": 0, "rechecked": 0, "refunds": 0,
                      "left": 2}
    assert [status(app_deps, o) for o in orders].count("CLOSED") == 3
    assert "2 check(s) left for the next run" in caplog.text
    # The next run (a fresh clock) does what was left.
    alipay.spent = 0.0
    result = handlers.sweep(app_deps, seconds_left=seconds_left)
    assert (result["due"], result["settled"], result["left"]) == (2, 2, 0)
    assert {status(app_deps, o) for o in orders} == {"CLOSED"}


def test_sweep_with_too_little_time_asks_alipay_nothing(app_deps: Any) -> None:
    from chalicelib import config

    need = (config.sweep_check_seconds(app_deps.settings.function_role)
            + config.SWEEP_MARGIN_SECONDS)
    orders = _due_orders(app_deps, 2)
    alipay = app_deps.gateway = _SlowAlipay()
    result = handlers.sweep(app_deps, seconds_left=lambda: need - 0.001)
    assert (result["settled"], result["failed"], result["left"]) == (0, 0, 2)
    assert alipay.queried == []
    assert {status(app_deps, o) for o in orders} == {"UNPAID"}


def test_sweep_counts_the_rechecks_and_refunds_it_left(
        app_deps: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """What is left is counted over the three kinds of checks, taken in their order:
    the due orders, the closed orders to ask about again, the refunds to settle."""
    from chalicelib.domain import Refund, RefundStatus

    [order] = _due_orders(app_deps, 1)
    old = app_deps.clock() - timedelta(hours=1)
    refund = Refund("REFUND_x", order["id"], 100, "r", RefundStatus.PENDING, "carol", old)
    monkeypatch.setattr(app_deps.store, "recheck_due", lambda now, limit: [order["id"]])
    monkeypatch.setattr(app_deps.store, "open_refunds", lambda: [refund])
    times = iter([1000.0, 0.0])  # time for the first check only
    assert handlers.sweep(app_deps, seconds_left=lambda: next(times)) == {
        "due": 1, "settled": 1, "failed": 0, "rechecked": 0, "refunds": 0, "left": 2}
    assert status(app_deps, order) == "CLOSED"


def test_without_a_deadline_the_sweep_starts_checks_for_its_interval(
        app_deps: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's and the CLI's sweep: a plain clock; checks start during
    SWEEP_INTERVAL_SECONDS (60), each of which may then run its worst case."""
    orders = _due_orders(app_deps, 4)
    alipay = app_deps.gateway = _SlowAlipay(cost=15.0)  # a check: 30 s
    monkeypatch.setattr(handlers.time, "monotonic", lambda: 5000.0 + alipay.spent)
    result = handlers.sweep(app_deps)
    assert app_deps.settings.sweep_interval_seconds == 60.0
    assert (result["settled"], result["left"]) == (3, 1)  # started at 0, 30 and 60 s
    assert [status(app_deps, o) for o in orders].count("CLOSED") == 3


def test_a_sweeper_check_fits_the_sweepers_deadline() -> None:
    """The sweeper's Alipay calls are short: one check and the margin leave room for
    several checks in a function of a couple of minutes."""
    from chalicelib import config

    check = config.sweep_check_seconds("sweeper")
    assert check == 2 * config.ALIPAY_SHORT_CALL_SECONDS + config.RABBITMQ_PUBLISH_SECONDS
    assert config.OUTBOUND_CHAIN_SECONDS["sweeper"] == (
        config.SECRETS_READ_SECONDS + check + config.SWEEP_MARGIN_SECONDS)
    assert config.sweep_check_seconds("") > check  # the worker waits longer on Alipay


class _Context:
    """Lambda's context: the milliseconds left, read on each call."""

    def __init__(self, millis: list[float]) -> None:
        self.millis = millis

    def get_remaining_time_in_millis(self) -> float:
        return self.millis.pop(0) if len(self.millis) > 1 else self.millis[0]


def test_the_sweeper_function_takes_its_deadline_from_lambdas_context(app_deps: Any) -> None:
    from app import sweeper
    from chalicelib import config

    need_ms = 1000 * (config.sweep_check_seconds(app_deps.settings.function_role)
                      + config.SWEEP_MARGIN_SECONDS)
    orders = _due_orders(app_deps, 3)
    event = {"version": "0", "account": "1", "region": "us-east-1", "detail": {},
             "detail-type": "Scheduled Event", "source": "aws.events",
             "time": "2026-12-04T00:00:00Z", "id": "e1", "resources": []}
    result = sweeper(event, _Context([need_ms + 1, need_ms - 1]))
    assert (result["settled"], result["left"]) == (1, 2)
    assert [status(app_deps, o) for o in orders].count("CLOSED") == 1
