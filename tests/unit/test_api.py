"""The HTTP API of goods, cart and orders, through Chalice's test client on moto."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jwt
import pytest

from chalicelib import config
from chalicelib.domain import MAX_CART_LINES, Goods
from tests.conftest import CATALOGUE, bearer, body, token


def put_item(client: Any, user: str, goods_id: str, num: Any) -> Any:
    return client.http.put(f"/cart/items/{goods_id}", headers=bearer(user),
                           body=json.dumps({"num": num}))


def snapshot(store: Any, *users: str) -> dict[str, Any]:
    return {
        "stock": {g.id: g.stock for g in store.list_goods()},
        "carts": {u: store.get_cart(u) for u in users},
        "orders": {u: [o.id for o in store.list_orders(u)] for u in users},
    }


def test_goods_lists_the_catalogue_with_money_as_strings(client: Any) -> None:
    r = client.http.get("/goods")
    assert r.status_code == 200
    items = body(r)["items"]
    assert [(i["id"], i["price"], i["stock"]) for i in items] == [
        ("g1", "19.90", 100), ("g2", "59.90", 10), ("g3", "99.90", 1)]


def test_cart_put_get_delete(client: Any) -> None:
    assert put_item(client, "alice", "g1", 2).status_code == 200
    r = put_item(client, "alice", "g2", 1)
    cart = body(r)
    assert cart == {
        "items": [
            {"goodsId": "g1", "name": "Tea cup", "price": "19.90", "num": 2},
            {"goodsId": "g2", "name": "Teapot", "price": "59.90", "num": 1},
        ],
        "totalNum": 3,
        "totalMoney": "99.70",
    }
    assert body(client.http.get("/cart", headers=bearer("alice"))) == cart
    assert body(client.http.get("/cart", headers=bearer("bob")))["items"] == []
    r = client.http.delete("/cart/items/g1", headers=bearer("alice"))
    assert r.status_code == 200
    assert body(r)["totalMoney"] == "59.90"


@pytest.mark.parametrize("num", [0, 100, -1, 1.5, "2", True, None, [1], 10**30])
def test_bad_num_is_400_and_changes_nothing(client: Any, app_deps: Any, num: Any) -> None:
    r = put_item(client, "alice", "g1", num)
    assert r.status_code == 400, r.body
    assert "num" in body(r)["Message"]
    assert app_deps.store.get_cart("alice") == {}


def test_unknown_goods_is_404(client: Any, app_deps: Any) -> None:
    r = put_item(client, "alice", "nope", 1)
    assert r.status_code == 404
    assert body(r)["Code"] == "NotFoundError"
    assert put_item(client, "alice", "bad%20id", 1).status_code == 404
    assert app_deps.store.get_cart("alice") == {}


def test_malformed_json_and_wrong_content_type(client: Any, app_deps: Any) -> None:
    r = client.http.put("/cart/items/g1", headers=bearer("alice"), body=b"{not json")
    assert r.status_code == 400
    r = client.http.put("/cart/items/g1", headers={**bearer("alice"), "Content-Type": "text/plain"},
                        body=b"num=1")
    assert r.status_code == 415
    r = client.http.put("/cart/items/g1", headers=bearer("alice"), body=b"[1]")
    assert r.status_code == 400
    r = client.http.post("/orders", headers=bearer("alice"), body=b"\xff\xfe")
    assert r.status_code == 400
    assert app_deps.store.get_cart("alice") == {}


def test_tokens(client: Any) -> None:
    secret = config.get().jwt_secret
    assert client.http.get("/cart").status_code == 401
    cases = {
        "expired": token("alice", ttl=-10),
        "forged": jwt.encode({"sub": "alice", "exp": 2**40}, "another-secret-0123456789abcdef-0123",
                             algorithm="HS256"),
        "no exp": jwt.encode({"sub": "alice"}, secret, algorithm="HS256"),
        "alg none": jwt.encode({"sub": "alice", "exp": 2**40}, None, algorithm="none"),
        "garbage": "abc.def.ghi",
    }
    for name, tok in cases.items():
        r = client.http.get("/cart", headers={"Authorization": f"Bearer {tok}"})
        assert r.status_code == 401, name
        assert body(r)["Code"] == "UnauthorizedError", name
    r = client.http.get("/cart", headers={"Authorization": f"Basic {token('alice')}"})
    assert r.status_code == 401


def test_create_order_takes_stock_empties_cart_and_schedules_the_check(
    client: Any, app_deps: Any
) -> None:
    put_item(client, "alice", "g1", 2)
    put_item(client, "alice", "g2", 1)
    r = client.http.post("/orders", headers=bearer("alice"), body=b"{}")
    assert r.status_code == 201, r.body
    order = body(r)
    assert order["status"] == "UNPAID"
    assert (order["orderStatus"], order["payStatus"]) == ("0", "0")
    assert order["totalNum"] == 3 and order["totalMoney"] == "99.70"
    assert order["payMoney"] == "99.70" and order["sourceType"] == "1"
    assert order["payTime"] is None and order["transactionId"] is None
    assert len(order["id"]) <= 64 and order["id"].startswith("ORDER_")
    assert order["items"] == [
        {"goodsId": "g1", "name": "Tea cup", "price": "19.90", "num": 2},
        {"goodsId": "g2", "name": "Teapot", "price": "59.90", "num": 1},
    ]
    stock = {g.id: g.stock for g in app_deps.store.list_goods()}
    assert stock == {"g1": 98, "g2": 9, "g3": 1}
    assert app_deps.store.get_cart("alice") == {}
    assert app_deps.broker.checks == [order["id"]]
    assert body(client.http.get(f"/orders/{order['id']}", headers=bearer("alice"))) == order
    assert body(client.http.get("/orders", headers=bearer("alice")))["items"] == [order]


def test_someone_elses_order_is_404(client: Any) -> None:
    put_item(client, "alice", "g1", 1)
    order_id = body(client.http.post("/orders", headers=bearer("alice"), body=b"{}"))["id"]
    r = client.http.get(f"/orders/{order_id}", headers=bearer("mallory"))
    assert r.status_code == 404
    assert body(client.http.get("/orders", headers=bearer("mallory")))["items"] == []
    assert client.http.get("/orders/ORDER_nope", headers=bearer("alice")).status_code == 404


def test_orders_newest_first(client: Any) -> None:
    ids = []
    for _ in range(3):
        put_item(client, "alice", "g1", 1)
        ids.append(body(client.http.post("/orders", headers=bearer("alice"), body=b"{}"))["id"])
    listed = [o["id"] for o in body(client.http.get("/orders", headers=bearer("alice")))["items"]]
    assert listed == ids[::-1]


def test_empty_cart_and_bad_source_type_are_400(client: Any, app_deps: Any) -> None:
    r = client.http.post("/orders", headers=bearer("alice"), body=b"{}")
    assert r.status_code == 400 and "empty" in body(r)["Message"]
    put_item(client, "alice", "g1", 1)
    r = client.http.post("/orders", headers=bearer("alice"), body=b'{"sourceType": "9"}')
    assert r.status_code == 400
    assert app_deps.store.get_cart("alice") == {"g1": 1}


def test_second_of_three_lines_out_of_stock_changes_nothing(client: Any, app_deps: Any) -> None:
    put_item(client, "alice", "g1", 1)
    put_item(client, "alice", "g2", 11)  # stock 10
    put_item(client, "alice", "g3", 1)
    before = snapshot(app_deps.store, "alice")
    r = client.http.post("/orders", headers=bearer("alice"), body=b"{}")
    assert r.status_code == 409
    assert body(r) == {"Code": "OutOfStock", "Message": "not enough stock for goods g2",
                       "goodsId": "g2"}
    assert snapshot(app_deps.store, "alice") == before
    assert app_deps.broker.checks == []


def test_cart_too_big_for_one_transaction_is_400(client: Any, app_deps: Any) -> None:
    for i in range(MAX_CART_LINES + 1):
        app_deps.store.put_goods(Goods(f"x{i}", f"Item {i}", 100, 5))
        app_deps.store.set_cart_line("alice", f"x{i}", 1)
    before = snapshot(app_deps.store, "alice")
    r = client.http.post("/orders", headers=bearer("alice"), body=b"{}")
    assert r.status_code == 400
    assert "transaction" in body(r)["Message"]
    assert snapshot(app_deps.store, "alice") == before


def test_largest_cart_that_fits_one_transaction_orders(client: Any, app_deps: Any) -> None:
    for i in range(MAX_CART_LINES):
        app_deps.store.put_goods(Goods(f"x{i:02d}", f"Item {i}", 100, 5))
        app_deps.store.set_cart_line("alice", f"x{i:02d}", 2)
    r = client.http.post("/orders", headers=bearer("alice"), body=b"{}")
    assert r.status_code == 201, r.body
    assert body(r)["totalMoney"] == f"{MAX_CART_LINES * 2}.00"
    assert app_deps.store.get_cart("alice") == {}


def test_publish_failure_after_commit_still_creates_the_order(client: Any, app_deps: Any) -> None:
    put_item(client, "alice", "g1", 1)
    app_deps.broker.down = True
    r = client.http.post("/orders", headers=bearer("alice"), body=b"{}")
    assert r.status_code == 201  # committed; the sweeper checks it later
    assert app_deps.store.unpaid_due(app_deps.clock()) == []
    assert [o.id for o in app_deps.store.list_orders("alice")] == [body(r)["id"]]


def test_health_names_what_failed(client: Any, app_deps: Any) -> None:
    r = client.http.get("/health")
    assert r.status_code == 200
    assert body(r) == {"status": "ok", "checks": {"dynamodb": "ok", "rabbitmq": "ok"}}
    app_deps.broker.down = True
    r = client.http.get("/health")
    assert r.status_code == 503
    assert body(r)["checks"]["rabbitmq"].startswith("down")
    assert body(r)["checks"]["dynamodb"] == "ok"


def test_catalogue_fixture_matches(app_deps: Any) -> None:
    assert {g.id for g in app_deps.store.list_goods()} == {g.id for g in CATALOGUE}


def test_a_price_changed_since_the_cart_is_409_and_the_next_order_takes_the_new_price(
    client: Any, app_deps: Any
) -> None:
    put_item(client, "alice", "g1", 2)  # 19.90 when put
    put_item(client, "alice", "g2", 1)
    app_deps.store.put_goods(Goods("g1", "Tea cup", 2190, 100))  # now 21.90
    before = snapshot(app_deps.store, "alice")
    r = client.http.post("/orders", headers=bearer("alice"), body=b"{}")
    assert r.status_code == 409
    assert body(r)["Code"] == "PriceChanged" and body(r)["goodsId"] == "g1"
    assert snapshot(app_deps.store, "alice") == before  # nothing taken, nothing ordered
    assert body(client.http.get("/cart", headers=bearer("alice")))["totalMoney"] == "103.70"
    r = client.http.post("/orders", headers=bearer("alice"), body=b"{}")
    assert r.status_code == 201, r.body
    assert body(r)["totalMoney"] == "103.70"
    assert body(r)["items"][0] == {"goodsId": "g1", "name": "Tea cup", "price": "21.90", "num": 2}


# --- the cap on UNPAID orders per user (MAX_UNPAID_ORDERS_PER_USER) ---------------


def _order(client: Any, user: str = "alice") -> Any:
    put_item(client, user, "g1", 1)
    return client.http.post("/orders", headers=bearer(user), body=b"{}")


def test_one_order_over_the_cap_is_409_and_changes_nothing(client: Any, app_deps: Any) -> None:
    cap = app_deps.settings.max_unpaid_orders_per_user
    assert cap == 5  # the contract's default
    held = [body(_order(client))["id"] for _ in range(cap)]
    put_item(client, "alice", "g1", 1)
    before = snapshot(app_deps.store, "alice")
    r = client.http.post("/orders", headers=bearer("alice"), body=b"{}")
    assert r.status_code == 409, r.body
    answer = body(r)
    assert answer["Code"] == "TooManyUnpaidOrders"
    # the message says the cap and how to free a place
    assert "5 unpaid orders" in answer["Message"]
    assert "pay or cancel" in answer["Message"]
    assert answer["maxUnpaidOrders"] == 5
    assert snapshot(app_deps.store, "alice") == before  # stock, cart, orders as they were
    assert app_deps.broker.checks == held  # no check scheduled for the refused one
    assert _order(client, "bob").status_code == 201  # another user's cap is their own


def test_cancelling_an_unpaid_order_frees_a_place(client: Any, app_deps: Any) -> None:
    held = [body(_order(client))["id"] for _ in range(5)]
    assert _order(client).status_code == 409
    r = client.http.post(f"/orders/{held[0]}/cancel", headers=bearer("alice"))
    assert r.status_code == 200, r.body
    r = client.http.post("/orders", headers=bearer("alice"), body=b"{}")  # the cart kept
    assert r.status_code == 201, r.body
    assert _order(client).status_code == 409


def test_the_cap_follows_the_setting(client: Any, app_deps: Any) -> None:
    app_deps.settings = dataclasses.replace(app_deps.settings, max_unpaid_orders_per_user=1)
    assert _order(client).status_code == 201
    r = _order(client)
    assert r.status_code == 409 and "hold 1 unpaid order," in body(r)["Message"]


def test_max_unpaid_orders_per_user_setting() -> None:
    assert config.load({}).max_unpaid_orders_per_user == 5
    assert config.load({"MAX_UNPAID_ORDERS_PER_USER": "12"}).max_unpaid_orders_per_user == 12
    # at least 1: a cap of 0 would refuse every order
    assert config.load({"MAX_UNPAID_ORDERS_PER_USER": "0"}).max_unpaid_orders_per_user == 1
