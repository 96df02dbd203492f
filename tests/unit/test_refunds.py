"""The operator API's refunds on fakes: bad input changes nothing, idempotency,
the rules of one pending refund and never more than was paid, the worker's
settling of a refund whose outcome was unknown, and the timeline."""

from __future__ import annotations

from typing import Any

import pytest

from chalicelib import handlers, refunds
from chalicelib.domain import Unprocessable
from chalicelib.ports import PaymentRefused, PaymentUnavailable, RefundState
from tests.conftest import bearer, body, check_due, fake_pay_msg, operator_bearer


def paid(app_deps: Any, user: str = "alice", **cart: int) -> dict[str, Any]:
    for gid, num in (cart or {"g1": 2, "g2": 1}).items():  # 2 x 19.90 + 59.90 = 99.70
        app_deps.store.set_cart_line(user, gid, num)
    order = handlers.create_order(app_deps, user)
    handlers.on_paid(app_deps, fake_pay_msg(order["id"], "T1", order["totalMoney"]))
    return order


def refund(client: Any, order_id: str, amount: Any = "10.00", reason: Any = "returned",
           key: str | None = None, user: str = "carol") -> Any:
    headers = operator_bearer(user)
    if key is not None:
        headers["Idempotency-Key"] = key
    return client.http.post(f"/admin/orders/{order_id}/refunds", headers=headers,
                            body=_json({"amount": amount, "reason": reason}))


def _json(value: Any) -> str:
    import json

    return json.dumps(value)


def state(app_deps: Any, order_id: str) -> tuple[str, int, int, list[str]]:
    o = app_deps.store.get_order(order_id)
    return (o.status, o.refunded_fen, o.refund_reserved_fen,
            [r.status for r in app_deps.store.refunds_of(order_id)])


def test_a_partial_refund_succeeds_and_shows_on_the_order(client: Any, app_deps: Any) -> None:
    order = paid(app_deps)
    r = refund(client, order["id"], "10.00", "returned one cup")
    assert r.status_code == 201, r.body
    made = body(r)
    assert made["status"] == "SUCCEEDED" and made["amount"] == "10.00"
    assert made["operator"] == "carol" and made["refundId"] == f"REFUND_{order['id']}_1"
    assert made["failure"] is None and made["finishTime"] is not None
    detail = body(client.http.get(f"/admin/orders/{order['id']}", headers=operator_bearer()))
    assert detail["order"]["status"] == "PAID" and detail["order"]["refundedMoney"] == "10.00"
    assert [x["refundId"] for x in detail["refunds"]] == [made["refundId"]]
    kinds = [e["type"] for e in detail["timeline"]]
    assert kinds[:3] == ["created", "notify", "paid"]
    assert kinds[-3:] == ["operator", "refund_requested", "refund_succeeded"]
    assert app_deps.gateway.refunds[-1][2] == made["refundId"]


def test_refunding_what_is_left_makes_the_order_refunded(client: Any, app_deps: Any) -> None:
    order = paid(app_deps)
    assert refund(client, order["id"], "90.00").status_code == 201
    assert refund(client, order["id"], "9.71").status_code == 409  # 9.70 is left
    r = refund(client, order["id"], "9.70")
    assert r.status_code == 201
    assert state(app_deps, order["id"]) == ("REFUNDED", 9970, 9970, ["SUCCEEDED"] * 2)
    again = refund(client, order["id"], "0.01")
    assert again.status_code == 409 and body(again)["Code"] == "RefundNotAllowed"


@pytest.mark.parametrize(("amount", "reason"), [
    ("0.00", "x"), ("-1.00", "x"), ("1.001", "x"), ("1", "x"), ("abc", "x"), (1.5, "x"),
    (None, "x"), ("1.00", ""), ("1.00", "   "), ("1.00", None), ("1.00", "x" * 257),
])
def test_bad_input_is_400_and_changes_nothing(client: Any, app_deps: Any, amount: Any,
                                              reason: Any) -> None:
    order = paid(app_deps)
    r = refund(client, order["id"], amount, reason)
    assert r.status_code == 400, r.body
    assert body(r)["Code"] == "BadRequestError" and body(r)["Message"]
    assert state(app_deps, order["id"]) == ("PAID", 0, 0, [])
    assert app_deps.gateway.refunds == []


def test_more_than_was_paid_is_409(client: Any, app_deps: Any) -> None:
    order = paid(app_deps)
    r = refund(client, order["id"], "99.71")
    assert r.status_code == 409 and body(r)["Code"] == "RefundExceedsPaid"
    assert state(app_deps, order["id"]) == ("PAID", 0, 0, [])


def test_unpaid_and_closed_orders_cannot_be_refunded(client: Any, app_deps: Any) -> None:
    for gid in ("g1",):
        app_deps.store.set_cart_line("dan", gid, 1)
    unpaid = handlers.create_order(app_deps, "dan")
    r = refund(client, unpaid["id"], "1.00")
    assert r.status_code == 409 and body(r)["Code"] == "RefundNotAllowed"
    check_due(app_deps, unpaid["id"])
    r = refund(client, unpaid["id"], "1.00")
    assert r.status_code == 409 and body(r)["Code"] == "RefundNotAllowed"
    assert app_deps.store.refunds_of(unpaid["id"]) == []


def test_unknown_order_is_404(client: Any, app_deps: Any) -> None:
    assert refund(client, "ORDER_1764140000000_0123456789abcdef").status_code == 404
    assert refund(client, "nope").status_code == 404


def test_a_shoppers_token_is_403_and_no_token_401(client: Any, app_deps: Any) -> None:
    order = paid(app_deps)
    r = client.http.post(f"/admin/orders/{order['id']}/refunds", headers=bearer("alice"),
                         body=_json({"amount": "1.00", "reason": "mine"}))
    assert r.status_code == 403 and body(r)["Code"] == "ForbiddenError"
    r = client.http.post(f"/admin/orders/{order['id']}/refunds",
                         headers={"Content-Type": "application/json"},
                         body=_json({"amount": "1.00", "reason": "mine"}))
    assert r.status_code == 401
    for path in ("/admin/attention", f"/admin/orders/{order['id']}", "/admin/orders"):
        assert client.http.get(path, headers=bearer("alice")).status_code == 403
    assert state(app_deps, order["id"]) == ("PAID", 0, 0, [])


def test_the_same_idempotency_key_refunds_once(client: Any, app_deps: Any) -> None:
    order = paid(app_deps)
    first = refund(client, order["id"], "5.00", key="k-1")
    second = refund(client, order["id"], "5.00", key="k-1")
    assert (first.status_code, second.status_code) == (201, 200)
    assert body(first) == body(second)
    assert state(app_deps, order["id"]) == ("PAID", 500, 500, ["SUCCEEDED"])
    assert len(app_deps.gateway.refunds) == 1
    assert refund(client, order["id"], "5.00", key="k-2").status_code == 201


def test_a_refusal_is_failed_with_the_code_and_frees_the_reservation(client: Any,
                                                                    app_deps: Any) -> None:
    order = paid(app_deps)
    refused = PaymentRefused("refused")
    refused.reason, refused.detail = "ACQ.SELLER_BALANCE_NOT_ENOUGH", "balance"
    app_deps.gateway.refund_error = refused
    r = refund(client, order["id"], "20.00")
    assert r.status_code == 201
    failed = body(r)
    assert failed["status"] == "FAILED"
    assert failed["failure"] == {"code": "ACQ.SELLER_BALANCE_NOT_ENOUGH", "message": "balance"}
    assert state(app_deps, order["id"]) == ("PAID", 0, 0, ["FAILED"])
    listed = body(client.http.get("/admin/attention", headers=operator_bearer()))
    assert [x["refundId"] for x in listed["refunds"]] == [failed["refundId"]]
    # retried while Alipay still refuses, then once it allows
    retry = f"/admin/refunds/{failed['refundId']}/retry"
    assert body(client.http.post(retry, headers=operator_bearer()))["status"] == "FAILED"
    app_deps.gateway.refund_error = None
    done = client.http.post(retry, headers=operator_bearer())
    assert done.status_code == 201 and body(done)["status"] == "SUCCEEDED"
    assert state(app_deps, order["id"]) == ("PAID", 2000, 2000, ["SUCCEEDED"])
    assert body(client.http.get("/admin/attention", headers=operator_bearer()))["refunds"] == []
    assert client.http.post(retry, headers=operator_bearer()).status_code == 409


def test_an_unknown_outcome_is_pending_and_settled_by_asking(client: Any, app_deps: Any) -> None:
    order = paid(app_deps)
    app_deps.gateway.refund_error = PaymentUnavailable("timed out")
    r = refund(client, order["id"], "10.00")
    assert r.status_code == 202 and body(r)["status"] == "PENDING"
    refund_id = body(r)["refundId"]
    assert app_deps.broker.refunds == [refund_id]
    # one pending refund per order
    other = refund(client, order["id"], "1.00")
    assert other.status_code == 409 and body(other)["Code"] == "RefundInProgress"
    # asked about at once, the worker first waits out the rest of Alipay's ~10 s
    waits: list[float] = []
    app_deps.sleep = waits.append
    # Alipay made it after all (the answer was lost): settled by the query, not refunded again
    app_deps.gateway.refund_states[refund_id] = RefundState.SUCCEEDED
    assert refunds.resolve_refund(app_deps, {"refundId": refund_id}) == "SUCCEEDED"
    assert len(waits) == 1 and 5 < waits[0] <= 10
    assert app_deps.gateway.refunds == []  # the fake never made it: the query was believed
    assert state(app_deps, order["id"]) == ("PAID", 1000, 1000, ["SUCCEEDED"])
    assert refunds.resolve_refund(app_deps, {"refundId": refund_id}) == "SUCCEEDED"


def test_a_pending_refund_not_made_is_asked_again_with_the_same_number(app_deps: Any) -> None:
    order = paid(app_deps)
    app_deps.gateway.refund_error = PaymentUnavailable("timed out")
    made, _ = refunds.request_refund(app_deps, "carol", order["id"], "3.00", "x")
    assert made.status == "PENDING"
    app_deps.gateway.refund_error = None
    from datetime import UTC, datetime, timedelta

    app_deps.clock.now = datetime.now(UTC) + timedelta(seconds=30)  # asked about later
    app_deps.sleep = lambda s: pytest.fail(f"waited {s} s for an old refund")
    assert refunds.resolve_refund(app_deps, {"refundId": made.id}) == "SUCCEEDED"
    assert [req for _o, _a, req in app_deps.gateway.refunds] == [made.id]


def test_bad_refund_messages_are_unprocessable(app_deps: Any) -> None:
    for msg in ({}, {"refundId": 7}, {"refundId": "REFUND_x y"},
                {"refundId": "REFUND_ORDER_1764140000000_0123456789abcdef_1"}):
        with pytest.raises(Unprocessable):
            refunds.resolve_refund(app_deps, msg)


def test_search_by_trade_number_username_and_status(client: Any, app_deps: Any) -> None:
    order = paid(app_deps)
    from datetime import UTC, datetime, timedelta

    app_deps.clock.now = datetime.now(UTC) + timedelta(seconds=1)  # newer, whatever the clock
    for gid in ("g1",):
        app_deps.store.set_cart_line("erin", gid, 1)
    other = handlers.create_order(app_deps, "erin")
    ops = operator_bearer()

    def ids(query: str) -> list[str]:
        r = client.http.get(f"/admin/orders{query}", headers=ops)
        assert r.status_code == 200, r.body
        return [o["id"] for o in body(r)["items"]]

    assert ids("?q=T1") == [order["id"]]
    assert ids(f"?q={order['id']}") == [order["id"]]
    assert ids("?q=erin") == [other["id"]]
    assert ids("?status=PAID") == [order["id"]]
    assert ids("?status=UNPAID") == [other["id"]]
    assert ids("") == [other["id"], order["id"]]  # newest first
    page = body(client.http.get("/admin/orders?limit=1", headers=ops))
    assert [o["id"] for o in page["items"]] == [other["id"]] and page["next"]
    rest = body(client.http.get(f"/admin/orders?limit=1&cursor={page['next']}", headers=ops))
    assert [o["id"] for o in rest["items"]] == [order["id"]]
    for bad in ("?status=LOST", "?limit=0", "?limit=x", "?from=yesterday", "?cursor=notours"):
        assert client.http.get(f"/admin/orders{bad}", headers=ops).status_code == 400, bad


def test_a_refund_settled_while_the_worker_waited_is_not_parked(app_deps: Any) -> None:
    """Alipay's refund notify comes before the refund's own answer: the worker gets
    the refund PENDING and waits; meanwhile the API settles it. Done, not a person's."""
    order = paid(app_deps)
    app_deps.gateway.refund_error = PaymentUnavailable("timed out")
    made, _ = refunds.request_refund(app_deps, "carol", order["id"], "3.00", "x")
    assert made.status == "PENDING"

    def settled_meanwhile(_seconds: float) -> None:
        current = app_deps.store.get_order(order["id"])
        refunds._succeed(app_deps, made, current, trade_no=current.transaction_id)

    app_deps.sleep = settled_meanwhile
    assert refunds.resolve_refund(app_deps, {"refundId": made.id}) == "SUCCEEDED"
    assert state(app_deps, order["id"]) == ("PAID", 300, 300, ["SUCCEEDED"])
