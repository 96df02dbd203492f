"""Order events and webhooks through the handlers, on the in-memory store and fakes:
the relay's order and marks, the sweep, parking, the fan-out, attempts, retries,
giving up, resending, and the operator's routes."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import timedelta
from typing import Any

import pytest

from chalicelib import admin, events, handlers, refunds, webhooks
from chalicelib.domain import Unavailable, Unprocessable, money_str
from chalicelib.domain.events import EVENT_KINDS, order_fields, paid
from chalicelib.domain.webhooks import DeliveryStatus, delivery_id, sign
from tests.conftest import FakeAnswer, body, fake_pay_msg, operator_bearer

SECRET = "whsec_0123456789abcdef"


def order_for(d: Any, user: str = "alice") -> dict[str, Any]:
    d.store.set_cart_line(user, "g1", 2)
    d.store.set_cart_line(user, "g2", 1)
    return handlers.create_order(d, user)


def paid_order(d: Any, user: str = "alice") -> dict[str, Any]:
    order = order_for(d, user)
    handlers.on_paid(d, fake_pay_msg(order["id"], f"T-{order['id']}", order["totalMoney"]))
    return order


def subscribe(d: Any, *kinds: str, url: str = "https://shop.example/hook") -> dict[str, Any]:
    return webhooks.subscribe(d, {"url": url, "events": list(kinds or EVENT_KINDS),
                                  "secret": SECRET}, by="carol")


# --- the relay -------------------------------------------------------------------

def test_events_are_published_in_order_with_the_order_joined(app_deps: Any) -> None:
    order = paid_order(app_deps)
    assert events.relay_order(app_deps, order["id"]) == 2
    created, paid_event = app_deps.broker.events
    assert [created["type"], paid_event["type"]] == ["order.created", "order.paid"]
    assert paid_event["eventId"] == f"EVT_{order['id']}_paid"
    assert paid_event["orderId"] == order["id"]
    data = paid_event["data"]
    assert data["username"] == "alice"
    assert data["totalMoney"] == order["totalMoney"]
    assert data["refundedMoney"] == "0.00"
    assert data["transactionId"] == f"T-{order['id']}"
    assert [(i["goodsId"], i["num"], i["price"]) for i in data["items"]] == [
        (i["goodsId"], i["num"], i["price"]) for i in order["items"]]
    assert created["data"]["transactionId"] is None
    # sent: not again
    assert events.relay_order(app_deps, order["id"]) == 0
    assert len(app_deps.broker.events) == 2


def test_a_broker_outage_keeps_events_for_the_sweep_in_their_order(app_deps: Any) -> None:
    order = paid_order(app_deps)
    app_deps.broker.down = True
    with pytest.raises(Unavailable):
        events.relay_order(app_deps, order["id"])
    assert len(app_deps.store.unsent_events(order["id"])) == 2
    result = events.sweep_unsent(app_deps, older_than_seconds=0)
    assert result["failed"] == 1 and result["published"] == 0
    app_deps.broker.down = False
    # not old enough yet for a sweep that waits a minute
    assert events.sweep_unsent(app_deps, older_than_seconds=60)["published"] == 0
    app_deps.clock.now = app_deps.clock() + timedelta(minutes=2)
    assert events.sweep_unsent(app_deps, older_than_seconds=60)["published"] == 2
    assert [e["type"] for e in app_deps.broker.events] == ["order.created", "order.paid"]
    assert events.sweep_unsent(app_deps, older_than_seconds=0)["published"] == 0


def test_each_change_of_an_order_is_told_once(app_deps: Any) -> None:
    """Created, paid, a partial and the final refund; and a closed order."""
    from tests.unit.test_order_flow import FakeRefunds

    app_deps.gateway = FakeRefunds()
    order = paid_order(app_deps)
    refunds.request_refund(app_deps, "carol", order["id"], "10.00", "one cup back", None)
    rest = app_deps.store.get_order(order["id"])
    left = rest.total_fen - rest.refunded_fen
    refunds.request_refund(app_deps, "carol", order["id"], money_str(left), "all back", None)
    closed = order_for(app_deps, "bob")
    handlers.cancel_order(app_deps, "bob", closed["id"])
    events.sweep_unsent(app_deps, older_than_seconds=0)
    seen = [(e["orderId"], e["type"]) for e in app_deps.broker.events]
    assert seen == [(order["id"], "order.created"), (order["id"], "order.paid"),
                    (order["id"], "order.refund.succeeded"),
                    (order["id"], "order.refund.succeeded"), (order["id"], "order.refunded"),
                    (closed["id"], "order.created"), (closed["id"], "order.closed")]
    refunded = app_deps.broker.events[4]
    assert refunded["data"]["refundedMoney"] == order["totalMoney"]
    assert app_deps.broker.events[2]["data"]["amount"] == "10.00"
    assert len({e["eventId"] for e in app_deps.broker.events}) == 7


def test_an_event_that_cannot_be_published_is_parked_and_shown(app_deps: Any) -> None:
    order = paid_order(app_deps)
    # an event whose order is not there (as a store restored without its orders)
    ghost = paid("ORDER_0000000000000_0123456789abcdef", trade_no="T-ghost",
                 now=app_deps.clock())
    app_deps.store._put_events([ghost])
    for _ in range(events.PARK_AFTER):
        events.sweep_unsent(app_deps, older_than_seconds=0)
    assert app_deps.store.unsent_events(ghost.order_id) == []
    shown = admin.attention(app_deps)["parkedEvents"]
    assert [(x["eventId"], x["reason"]) for x in shown] == [
        (ghost.event_id, "its order does not exist")]
    # the other order's events went out all the same
    assert [e["orderId"] for e in app_deps.broker.events] == [order["id"]] * 2


def test_the_stream_relays_each_new_items_order_once(app_deps: Any) -> None:
    a, b = paid_order(app_deps, "alice"), order_for(app_deps, "bob")
    seqs = {e.order_id: e.seq for e in app_deps.store.events_of(a["id"])}

    def record(name: str, order_id: str) -> dict[str, Any]:
        return {"eventName": name, "dynamodb": {"Keys": {"order_id": {"S": order_id},
                                                         "seq": {"S": seqs[a["id"]]}}}}

    published = events.relay_stream_records(app_deps, [
        record("INSERT", a["id"]), record("INSERT", a["id"]), record("MODIFY", b["id"]),
        record("INSERT", b["id"])])
    assert published == 3
    assert sorted(e["type"] for e in app_deps.broker.events) == [
        "order.created", "order.created", "order.paid"]


# --- webhooks ----------------------------------------------------------------------

def event_of(d: Any, order: dict[str, Any], kind: str) -> dict[str, Any]:
    events.relay_order(d, order["id"])
    return next(e for e in d.broker.events if e["orderId"] == order["id"] and e["type"] == kind)


def test_an_event_fans_out_once_to_each_subscription_that_wants_it(app_deps: Any) -> None:
    wants = subscribe(app_deps, "order.paid")
    subscribe(app_deps, "order.closed")
    event = event_of(app_deps, paid_order(app_deps), "order.paid")
    assert webhooks.fan_out(app_deps, event) == 1
    did = delivery_id(wants["id"], event["eventId"])
    assert app_deps.broker.deliveries == [(did, None)]
    delivery = app_deps.store.get_delivery(did)
    assert delivery.status == DeliveryStatus.PENDING and json.loads(delivery.body) == event
    # fanned out again before any attempt (its first queueing may have failed):
    # queued again, the same delivery; once attempted, not any more
    assert webhooks.fan_out(app_deps, event) == 1
    assert [x.id for x in app_deps.store.deliveries_of_order(event["orderId"])] == [did]
    webhooks.deliver(app_deps, {"deliveryId": did})
    assert webhooks.fan_out(app_deps, event) == 0
    assert app_deps.broker.deliveries == [(did, None), (did, None)]


def test_a_delivery_is_signed_over_the_exact_body(app_deps: Any) -> None:
    sub = subscribe(app_deps, "order.paid")
    event = event_of(app_deps, paid_order(app_deps), "order.paid")
    webhooks.fan_out(app_deps, event)
    did = delivery_id(sub["id"], event["eventId"])
    assert webhooks.deliver(app_deps, {"deliveryId": did}) == DeliveryStatus.DELIVERED
    (url, sent, headers, timeout), = app_deps.webhooks.posts
    assert url == "https://shop.example/hook" and json.loads(sent) == event
    assert timeout == app_deps.settings.webhook_timeout_seconds
    assert headers["Content-Type"] == "application/json"
    assert headers["Shop-Event"] == "order.paid"
    assert headers["Idempotency-Key"] == event["eventId"]
    stamp, mac = (part.split("=", 1)[1] for part in headers["Shop-Signature"].split(","))
    expected = hmac.new(SECRET.encode(), f"{stamp}.".encode() + sent, hashlib.sha256)
    assert mac == expected.hexdigest()
    assert sign(SECRET, int(stamp), sent + b" ") != headers["Shop-Signature"]
    # delivered: a repeated message changes nothing
    assert webhooks.deliver(app_deps, {"deliveryId": did}) is None
    assert len(app_deps.webhooks.posts) == 1
    assert app_deps.store.get_delivery(did).attempts[0].status == 200


def test_a_failing_subscriber_is_retried_on_the_schedule_then_given_up(app_deps: Any) -> None:
    sub = subscribe(app_deps, "order.created")
    order = order_for(app_deps)
    event = event_of(app_deps, order, "order.created")
    webhooks.fan_out(app_deps, event)
    did = delivery_id(sub["id"], event["eventId"])
    schedule = app_deps.settings.webhook_retry_seconds
    app_deps.webhooks.answers = [FakeAnswer(500, body="boom")] * len(schedule) + [
        FakeAnswer(None, ms=5000, body="timeout after 5 s", error="timeout after 5 s")]
    app_deps.broker.deliveries.clear()
    for _ in schedule:
        assert webhooks.deliver(app_deps, {"deliveryId": did}) == DeliveryStatus.PENDING
    assert [w for _, w in app_deps.broker.deliveries] == list(schedule)
    assert webhooks.deliver(app_deps, {"deliveryId": did}) == DeliveryStatus.FAILED
    delivery = app_deps.store.get_delivery(did)
    assert [a.status for a in delivery.attempts] == [500] * len(schedule) + [None]
    assert delivery.attempts[-1].body == "timeout after 5 s"  # why, once
    shown = admin.attention(app_deps)["deliveries"]
    assert [x["id"] for x in shown] == [did]
    # an operator resends it: one more attempt now
    assert webhooks.deliver(app_deps, {"deliveryId": did}) is None  # FAILED: no more tries
    resent = webhooks.resend(app_deps, did, by="carol")
    assert resent["status"] == "PENDING" and app_deps.broker.deliveries[-1] == (did, "resend")
    posts = len(app_deps.webhooks.posts)
    # its subscriber gave no answer a moment ago, but a person asked: called now
    assert webhooks.deliver(app_deps, {"deliveryId": did, "resend": True}) == (
        DeliveryStatus.DELIVERED)
    assert len(app_deps.webhooks.posts) == posts + 1
    assert admin.attention(app_deps)["deliveries"] == []


def test_a_subscriber_that_gave_no_answer_is_let_alone_for_its_first_wait(
        app_deps: Any) -> None:
    """Its next deliveries are recorded as not called and wait their turn: a dead
    subscriber does not hold every consumer for a timeout each."""
    dead = subscribe(app_deps, "order.created", url="https://dead.example/hook")
    live = subscribe(app_deps, "order.created", url="https://live.example/hook")
    orders = [order_for(app_deps, f"u{i}") for i in range(3)]
    for order in orders:
        webhooks.fan_out(app_deps, event_of(app_deps, order, "order.created"))
    app_deps.webhooks.answers = [FakeAnswer(None, 5000, "timeout after 5 s",
                                            "timeout after 5 s")]
    first = delivery_id(dead["id"], f"EVT_{orders[0]['id']}_created")
    assert webhooks.deliver(app_deps, {"deliveryId": first}) == DeliveryStatus.PENDING
    for order in orders[1:]:
        did = delivery_id(dead["id"], f"EVT_{order['id']}_created")
        assert webhooks.deliver(app_deps, {"deliveryId": did}) == DeliveryStatus.PENDING
        (attempt,) = app_deps.store.get_delivery(did).attempts
        assert attempt.status is None and attempt.body.startswith("not called")
    for order in orders:  # the live one is called as ever
        did = delivery_id(live["id"], f"EVT_{order['id']}_created")
        assert webhooks.deliver(app_deps, {"deliveryId": did}) == DeliveryStatus.DELIVERED
    called = [url for url, *_ in app_deps.webhooks.posts]
    assert called.count("https://dead.example/hook") == 1
    assert called.count("https://live.example/hook") == 3


def test_a_deleted_subscription_stops_its_deliveries(app_deps: Any) -> None:
    sub = subscribe(app_deps, "order.created")
    event = event_of(app_deps, order_for(app_deps), "order.created")
    webhooks.fan_out(app_deps, event)
    webhooks.unsubscribe(app_deps, sub["id"], by="carol")
    did = delivery_id(sub["id"], event["eventId"])
    assert webhooks.deliver(app_deps, {"deliveryId": did}) == DeliveryStatus.FAILED
    assert app_deps.webhooks.posts == []


GHOST = "ORDER_0000000000000_0123456789abcdef"


@pytest.mark.parametrize("msg", [
    {"eventId": "EVT_x", "type": "order.shipped", "orderId": GHOST},
    {"eventId": "nope", "type": "order.paid", "orderId": GHOST},
    {"eventId": "EVT_x", "type": "order.paid", "orderId": "../etc"},
    {"type": "order.paid"},
])
def test_a_poison_event_is_refused_for_parking(app_deps: Any, msg: dict[str, Any]) -> None:
    subscribe(app_deps, "order.paid")
    with pytest.raises(Unprocessable):
        webhooks.fan_out(app_deps, msg)
    assert app_deps.broker.deliveries == []


def test_a_delivery_message_naming_no_delivery_is_refused(app_deps: Any) -> None:
    with pytest.raises(Unprocessable):
        webhooks.deliver(app_deps, {"deliveryId": "DLV_none"})
    with pytest.raises(Unprocessable):
        webhooks.deliver(app_deps, {"deliveryId": 7})


# --- the operator's routes -----------------------------------------------------------

def test_subscriptions_through_the_api(client: Any, app_deps: Any) -> None:
    h = operator_bearer()
    made = client.http.post("/admin/webhooks", headers=h, body=json.dumps(
        {"url": "https://shop.example/hook", "events": ["order.paid"], "secret": SECRET}))
    assert made.status_code == 201
    sub = body(made)
    assert SECRET not in made.body.decode() and "secret" not in sub
    assert sub["events"] == ["order.paid"] and sub["createdBy"] == "carol"
    listed = body(client.http.get("/admin/webhooks", headers=h))["items"]
    assert [s["id"] for s in listed] == [sub["id"]]
    assert client.http.delete(f"/admin/webhooks/{sub['id']}", headers=h).status_code == 204
    assert client.http.delete(f"/admin/webhooks/{sub['id']}", headers=h).status_code == 404
    assert body(client.http.get("/admin/webhooks", headers=h))["items"] == []


@pytest.mark.parametrize("bad, says", [
    ({"url": "ftp://shop.example/x", "events": ["order.paid"], "secret": SECRET}, "url"),
    ({"url": "not a url", "events": ["order.paid"], "secret": SECRET}, "url"),
    ({"url": "https://shop.example/x", "events": ["order.shipped"], "secret": SECRET},
     "order.shipped"),
    ({"url": "https://shop.example/x", "events": [], "secret": SECRET}, "events"),
    ({"url": "https://shop.example/x", "events": ["order.paid"]}, "secret"),
    ({"url": "https://shop.example/x", "events": ["order.paid"], "secret": "short"}, "secret"),
    ({"events": ["order.paid"], "secret": SECRET}, "url"),
])
def test_a_bad_subscription_is_refused_and_nothing_saved(
        client: Any, app_deps: Any, bad: dict[str, Any], says: str) -> None:
    answer = client.http.post("/admin/webhooks", headers=operator_bearer(),
                              body=json.dumps(bad))
    assert answer.status_code == 400
    assert says in body(answer)["Message"]
    assert app_deps.store.list_subscriptions() == []


def test_deliveries_are_listed_and_resent_through_the_api(client: Any, app_deps: Any) -> None:
    h = operator_bearer()
    sub = subscribe(app_deps, "order.paid")
    order = paid_order(app_deps)
    webhooks.fan_out(app_deps, event_of(app_deps, order, "order.paid"))
    app_deps.webhooks.answers = [FakeAnswer(503, body="later")]
    did = delivery_id(sub["id"], f"EVT_{order['id']}_paid")
    webhooks.deliver(app_deps, {"deliveryId": did})
    by_order = body(client.http.get(f"/admin/orders/{order['id']}/deliveries", headers=h))
    by_sub = body(client.http.get(f"/admin/webhooks/{sub['id']}/deliveries", headers=h))
    assert by_order == by_sub
    (listed,) = by_order["items"]
    assert listed["id"] == did and listed["status"] == "PENDING"
    assert listed["attempts"][0]["status"] == 503 and listed["attempts"][0]["body"] == "later"
    resent = client.http.post(f"/admin/deliveries/{did}/resend", headers=h)
    assert resent.status_code == 202 and body(resent)["id"] == did
    assert app_deps.broker.deliveries[-1] == (did, "resend")
    assert client.http.post("/admin/deliveries/DLV_none/resend", headers=h).status_code == 404
    missing = "ORDER_0000000000000_0123456789abcdef"
    assert client.http.get(f"/admin/orders/{missing}/deliveries", headers=h).status_code == 404


def test_only_operators_manage_webhooks(client: Any) -> None:
    from tests.conftest import bearer

    assert client.http.get("/admin/webhooks", headers=bearer("alice")).status_code == 403
    assert client.http.get("/admin/webhooks").status_code == 401
    assert client.http.post("/admin/deliveries/DLV_x/resend",
                            headers=bearer("alice")).status_code == 403


def test_the_event_wire_form_joins_what_never_changes(app_deps: Any) -> None:
    order = app_deps.store.get_order(order_for(app_deps)["id"])
    event = paid(order.id, trade_no="T", now=order.create_time)
    assert event.order is None  # the payment's write does not read the order
    with pytest.raises(ValueError):
        event.to_wire()
    wire = event.to_wire(order_fields(order))
    assert set(wire) == {"eventId", "type", "orderId", "occurredAt", "data"}
    assert set(wire["data"]) == {"username", "totalMoney", "refundedMoney", "transactionId",
                                 "items"}
    assert wire["data"]["transactionId"] == "T" and wire["data"]["refundedMoney"] == "0.00"
    created = app_deps.store.events_of(order.id)[0]
    assert created.order == order_fields(order)  # the create had the order in hand
    assert created.to_wire()["data"]["items"] == wire["data"]["items"]


def test_a_paid_event_is_joined_without_reading_its_order(app_deps: Any) -> None:
    """Its order's created event came through first (the usual case): no read."""
    order = order_for(app_deps)
    events.relay_order(app_deps, order["id"])
    handlers.on_paid(app_deps, fake_pay_msg(order["id"], "T-join", order["totalMoney"]))
    reads: list[Any] = []
    real = app_deps.store.get_orders
    app_deps.store.get_orders = lambda ids: reads.append(ids) or real(ids)
    assert events.relay_order(app_deps, order["id"]) == 1
    assert reads == []
    assert app_deps.broker.events[-1]["data"]["username"] == "alice"
    events.KNOWN.__init__()  # forgotten (another process): read once
    other = order_for(app_deps, "carol")
    handlers.on_paid(app_deps, fake_pay_msg(other["id"], "T-join2", other["totalMoney"]))
    app_deps.store.mark_events_sent(app_deps.store.events_of(other["id"])[:1],
                                    now=app_deps.clock())
    assert events.relay_order(app_deps, other["id"]) == 1
    assert reads == [{other["id"]}]
