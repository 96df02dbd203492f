"""Messages that prove nothing change nothing: a pay message is believed only as far
as the signed notify it carries, a check message only from its order's check time.
Each one refused is parked by the worker and kept on its order's timeline."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from chalicelib import handlers, worker
from chalicelib.domain import EventType, Forged
from tests.conftest import fake_notify, fake_pay_msg


def order_for(d: Any, user: str = "alice") -> dict[str, Any]:
    d.store.set_cart_line(user, "g1", 2)
    return handlers.create_order(d, user)


def stock(d: Any) -> dict[str, int]:
    return {g.id: g.stock for g in d.store.list_goods()}


def forged_events(d: Any, order_id: str) -> list[dict[str, Any]]:
    return [e.detail for e in d.store.timeline(order_id)
            if e.type == EventType.FORGED_MESSAGE]


def tampered(msg: dict[str, Any], **fields: str) -> dict[str, Any]:
    """The message with its notify's fields changed after signing."""
    return {**msg, "notify": {**msg["notify"], **fields}}


def resigned(order: dict[str, Any], **changes: str) -> dict[str, Any]:
    """A message whose notify is validly signed but says something else."""
    msg = fake_pay_msg(order["id"], "T1", order["totalMoney"])
    return {**msg, "notify": fake_notify(order["id"], "T1", order["totalMoney"], **changes)}


def test_a_pay_message_with_a_valid_notify_marks_the_order_paid(app_deps: Any) -> None:
    order = order_for(app_deps)
    assert handlers.on_paid(app_deps, fake_pay_msg(order["id"], "T1", order["totalMoney"])) \
        == "PAID"
    assert forged_events(app_deps, order["id"]) == []


@pytest.mark.parametrize("make", [
    pytest.param(lambda o: {"orderId": o["id"], "tradeNo": "T1",
                            "totalAmount": o["totalMoney"]}, id="bare, no notify"),
    pytest.param(lambda o: {**fake_pay_msg(o["id"], "T1", o["totalMoney"]), "notify": "x"},
                 id="notify not a form"),
    pytest.param(lambda o: tampered(fake_pay_msg(o["id"], "T1", o["totalMoney"]),
                                    total_amount="0.01"), id="amount changed after signing"),
    pytest.param(lambda o: tampered(fake_pay_msg(o["id"], "T1", o["totalMoney"]),
                                    sign="00"), id="bad signature"),
    pytest.param(lambda o: {**fake_pay_msg(o["id"], "T1", o["totalMoney"]),
                            "tradeNo": "T2"}, id="another trade than its notify"),
    pytest.param(lambda o: {**fake_pay_msg(o["id"], "T1", o["totalMoney"]),
                            "totalAmount": "0.01"}, id="another amount than its notify"),
    pytest.param(lambda o: {**fake_pay_msg("ORDER_1764140000000_0123456789abcdef", "T1",
                                           o["totalMoney"]), "orderId": o["id"]},
                 id="another order's notify"),
    pytest.param(lambda o: resigned(o, trade_status="WAIT_BUYER_PAY"), id="not paid"),
    pytest.param(lambda o: resigned(o, app_id="someone-else"), id="another app"),
    pytest.param(lambda o: resigned(o, seller_id="someone-else"), id="another seller"),
])
def test_a_pay_message_that_proves_nothing_changes_nothing(app_deps: Any, make: Any) -> None:
    order = order_for(app_deps)
    before = stock(app_deps)
    with pytest.raises(Forged):
        handlers.on_paid(app_deps, make(order))
    current = app_deps.store.get_order(order["id"])
    assert current.status == "UNPAID" and current.transaction_id is None
    assert stock(app_deps) == before
    [event] = forged_events(app_deps, order["id"])
    assert event["message"] == "pay" and event["reason"]
    assert "notify" not in event["fields"]  # the timeline keeps the claim, not the form


def test_a_forged_pay_message_for_an_unknown_order_writes_no_timeline(app_deps: Any) -> None:
    ghost = "ORDER_1764140000000_0123456789abcdef"
    with pytest.raises(Forged):
        handlers.on_paid(app_deps, {"orderId": ghost, "tradeNo": "T", "totalAmount": "1.00"})
    assert app_deps.store.timeline(ghost) == []


def test_a_closed_order_is_not_refunded_on_a_forged_pay_message(app_deps: Any) -> None:
    order = order_for(app_deps)
    app_deps.clock.now = app_deps.store.get_order(order["id"]).check_time
    assert handlers.on_check(app_deps, {"orderId": order["id"]}) == "CLOSED"
    with pytest.raises(Forged):
        handlers.on_paid(app_deps, {"orderId": order["id"], "tradeNo": "T1",
                                    "totalAmount": order["totalMoney"]})
    assert app_deps.store.get_order(order["id"]).status == "CLOSED"
    assert app_deps.store.paid_but_closed() == []
    assert app_deps.gateway.refunds == []


def test_a_check_before_the_order_s_check_time_changes_nothing(app_deps: Any) -> None:
    order = order_for(app_deps)
    before = stock(app_deps)
    check_time = app_deps.store.get_order(order["id"]).check_time
    skew = timedelta(seconds=app_deps.settings.check_skew_seconds)
    app_deps.clock.now = check_time - skew - timedelta(seconds=1)
    with pytest.raises(Forged):
        handlers.on_check(app_deps, {"orderId": order["id"]})
    assert app_deps.store.get_order(order["id"]).status == "UNPAID"
    assert stock(app_deps) == before and app_deps.gateway.closed == []
    [event] = forged_events(app_deps, order["id"])
    assert event["message"] == "check" and "check time" in event["reason"]
    # Within the clock-skew allowance it is the order's check: settled.
    app_deps.clock.now = check_time - skew
    assert handlers.on_check(app_deps, {"orderId": order["id"]}) == "CLOSED"


def test_the_worker_parks_forged_messages() -> None:
    assert worker.disposition(Forged("x")) is worker.Disposition.PARK
