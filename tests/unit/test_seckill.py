"""Flash sales: the routes through Chalice's test client on moto with the fake
publisher, and the bridge's handler called directly."""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from chalicelib import broker, config, seckill
from chalicelib.context import Deps
from chalicelib.domain import Sale, Unprocessable
from chalicelib.memstore import InMemoryStore
from chalicelib.ratelimit import TokenBucket
from tests.conftest import FakePublisher, bearer, body, check_due

NOW = datetime(2026, 11, 26, 7, 0, tzinfo=UTC)


def a_sale(stock: int = 3, sale_id: str = "flash", **times: datetime) -> Sale:
    return Sale(sale_id, "g2", "Teapot, flash sale", 990, stock,
                times.get("start", NOW - timedelta(minutes=1)),
                times.get("end", NOW + timedelta(hours=1)))


@pytest.fixture
def sale(app_deps: Deps) -> Iterator[Sale]:
    app_deps.clock.now = NOW  # type: ignore[attr-defined]
    s = a_sale()
    app_deps.store.put_sale(s)
    yield s


def fake(d: Deps) -> FakePublisher:
    assert isinstance(d.broker, FakePublisher)
    return d.broker


def post(client: Any, user: str, sale_id: str = "flash") -> Any:
    return client.http.post(f"/seckill/{sale_id}", headers=bearer(user))


def ticket_of(client: Any, user: str, ticket_id: str) -> Any:
    return client.http.get(f"/seckill/tickets/{ticket_id}", headers=bearer(user))


def sale_stock(store: InMemoryStore, sale_id: str = "flash") -> int:
    found = store.get_sale(sale_id, consistent=True)
    assert found is not None
    return found.stock


def drain(d: Deps) -> list[str]:
    """What the bridge does: every published seckill message into the handler."""
    out = [seckill.on_seckill(d, msg) for msg in fake(d).seckills]
    fake(d).seckills.clear()
    return out


def test_the_bridge_and_the_api_name_the_same_queue() -> None:
    assert seckill.QUEUE == broker.QUEUE_SECKILL


def test_list_sales_money_as_string_and_iso_times(client: Any, sale: Sale) -> None:
    r = client.http.get("/seckill")
    assert r.status_code == 200
    assert body(r) == {"items": [{
        "id": "flash", "goodsId": "g2", "name": "Teapot, flash sale", "price": "9.90",
        "stock": 3, "startTime": "2026-11-26T06:59:00.000Z",
        "endTime": "2026-11-26T08:00:00.000Z"}]}


def test_request_is_queued_without_writing_an_order(client: Any, app_deps: Deps,
                                                    sale: Sale) -> None:
    r = post(client, "alice")
    assert r.status_code == 202, r.body
    ticket_id = body(r)["ticketId"]
    assert set(body(r)) == {"ticketId"}
    assert fake(app_deps).seckills == [
        {"ticketId": ticket_id, "saleId": "flash", "username": "alice"}]
    assert app_deps.store.list_orders("alice") == []
    assert sale_stock(app_deps.store) == 3
    t = ticket_of(client, "alice", ticket_id)
    assert t.status_code == 200
    assert body(t) == {"ticketId": ticket_id, "saleId": "flash", "status": "QUEUED",
                       "orderId": None}


def test_second_request_of_a_user_is_409_and_names_the_ticket(client: Any, app_deps: Deps,
                                                               sale: Sale) -> None:
    first = body(post(client, "alice"))["ticketId"]
    r = post(client, "alice")
    assert r.status_code == 409
    assert body(r)["Code"] == "AlreadyHolding"
    assert body(r)["ticketId"] == first
    assert len(fake(app_deps).seckills) == 1
    assert post(client, "bob").status_code == 202  # another user is fine


@pytest.mark.parametrize("when, word", [(NOW - timedelta(hours=2), "opens"),
                                        (NOW + timedelta(hours=2), "ended")])
def test_outside_the_window_is_400_and_changes_nothing(client: Any, app_deps: Deps,
                                                        sale: Sale, when: datetime,
                                                        word: str) -> None:
    app_deps.clock.now = when  # type: ignore[attr-defined]
    r = post(client, "alice")
    assert r.status_code == 400
    assert word in body(r)["Message"]
    assert fake(app_deps).seckills == []
    app_deps.clock.now = NOW  # type: ignore[attr-defined]
    assert post(client, "alice").status_code == 202  # no claim was left behind


def test_sold_out_is_409_from_the_sale_read(client: Any, app_deps: Deps, sale: Sale) -> None:
    app_deps.store.put_sale(dataclasses.replace(sale, stock=0))
    r = post(client, "alice")
    assert r.status_code == 409
    assert body(r)["Code"] == "SoldOut"
    assert fake(app_deps).seckills == []


def test_unknown_sale_is_404(client: Any, sale: Sale) -> None:
    assert post(client, "alice", "nope").status_code == 404
    assert post(client, "alice", "bad%20id").status_code == 404


def test_deep_queue_is_429_with_retry_after_and_changes_nothing(
        client: Any, app_deps: Deps, sale: Sale) -> None:
    app_deps.settings = dataclasses.replace(  # type: ignore[misc]
        app_deps.settings, seckill_max_queue_depth=100, seckill_orders_per_second=20,
        seckill_cache_ms=0)
    fake(app_deps).depths[broker.QUEUE_SECKILL] = 159
    r = post(client, "alice")
    assert r.status_code == 429
    assert body(r)["Code"] == "TooManyRequests"
    assert r.headers["Retry-After"] == "3"  # 60 over the bound at 20 a second
    assert body(r)["retryAfter"] == 3
    assert fake(app_deps).seckills == []
    fake(app_deps).depths[broker.QUEUE_SECKILL] = 99
    assert post(client, "alice").status_code == 202  # no claim was left behind


def test_queue_depth_is_read_once_per_cache_period(client: Any, app_deps: Deps,
                                                   sale: Sale) -> None:
    app_deps.settings = dataclasses.replace(  # type: ignore[misc]
        app_deps.settings, seckill_cache_ms=60_000)
    for user in ("u1", "u2", "u3", "u4"):
        assert post(client, user).status_code in (202, 409)
    assert fake(app_deps).depth_reads == 1


def test_broker_down_is_503_and_leaves_no_claim(client: Any, app_deps: Deps,
                                                sale: Sale) -> None:
    fake(app_deps).down = True
    r = post(client, "alice")
    assert r.status_code == 503
    fake(app_deps).down = False
    r = post(client, "alice")
    assert r.status_code == 202  # the failed request left nothing behind


def test_publish_fails_after_the_claim_then_both_are_dropped(client: Any, app_deps: Deps,
                                                             sale: Sale) -> None:
    class PublishFails(FakePublisher):
        def publish_seckill(self, msg: Any) -> None:
            from chalicelib.domain import Unavailable
            raise Unavailable("not confirmed (fake)")

    app_deps.broker = PublishFails()
    assert post(client, "alice").status_code == 503
    store = app_deps.store
    assert not store._claims and not store._tickets  # neither claim nor ticket is left
    app_deps.broker = FakePublisher()
    assert post(client, "alice").status_code == 202


def test_ticket_is_only_its_owners(client: Any, sale: Sale) -> None:
    ticket_id = body(post(client, "alice"))["ticketId"]
    assert ticket_of(client, "bob", ticket_id).status_code == 404
    assert ticket_of(client, "alice", "TICKET_0000000000000_0000000000000000").status_code == 404
    assert ticket_of(client, "alice", "nope").status_code == 404
    assert client.http.get(f"/seckill/tickets/{ticket_id}").status_code == 401
    assert client.http.post("/seckill/flash").status_code == 401


def test_drain_orders_once_and_a_redelivery_changes_nothing(client: Any, app_deps: Deps,
                                                            sale: Sale) -> None:
    ticket_id = body(post(client, "alice"))["ticketId"]
    msg = fake(app_deps).seckills[0]
    goods_before = {g.id: g.stock for g in app_deps.store.list_goods()}
    assert drain(app_deps) == ["ORDERED"]
    t = body(ticket_of(client, "alice", ticket_id))
    assert t["status"] == "ORDERED"
    order = body(client.http.get(f"/orders/{t['orderId']}", headers=bearer("alice")))
    assert order["status"] == "UNPAID"
    assert order["items"] == [{"goodsId": "g2", "name": "Teapot, flash sale", "price": "9.90",
                               "num": 1}]
    assert order["totalMoney"] == "9.90"
    assert order["createTime"] == "2026-11-26T07:00:00.000Z"
    assert fake(app_deps).checks == [t["orderId"]]
    assert sale_stock(app_deps.store) == 2
    assert {g.id: g.stock for g in app_deps.store.list_goods()} == goods_before
    assert seckill.on_seckill(app_deps, msg) == "ORDERED"  # redelivered
    assert [o.id for o in app_deps.store.list_orders("alice")] == [t["orderId"]]
    assert sale_stock(app_deps.store) == 2
    assert fake(app_deps).checks == [t["orderId"]]
    assert post(client, "alice").status_code == 409  # one unit per user


def test_sold_out_ticket_releases_the_claim(client: Any, app_deps: Deps, sale: Sale) -> None:
    app_deps.store.put_sale(dataclasses.replace(sale, stock=1))
    a = body(post(client, "alice"))["ticketId"]
    b = body(post(client, "bob"))["ticketId"]
    assert drain(app_deps) == ["ORDERED", "SOLD_OUT"]
    assert body(ticket_of(client, "bob", b)) == {"ticketId": b, "saleId": "flash",
                                                "status": "SOLD_OUT", "orderId": None}
    assert body(ticket_of(client, "alice", a))["status"] == "ORDERED"
    assert sale_stock(app_deps.store) == 0
    assert app_deps.store.list_orders("bob") == []
    # a unit comes back (an order closed): bob may ask again, alice may not
    app_deps.store.put_sale(dataclasses.replace(sale, stock=1))
    assert post(client, "bob").status_code == 202
    assert post(client, "alice").status_code == 409


def test_the_transaction_refuses_a_second_order_of_a_user(client: Any, app_deps: Deps,
                                                          sale: Sale) -> None:
    body(post(client, "alice"))
    assert drain(app_deps) == ["ORDERED"]
    # The claim gone (say, removed by hand): the API lets a second ticket through,
    # the order's transaction does not.
    del app_deps.store._claims[("flash", "alice")]
    second = body(post(client, "alice"))["ticketId"]
    assert drain(app_deps) == ["DUPLICATE"]
    assert body(ticket_of(client, "alice", second))["status"] == "DUPLICATE"
    assert len(app_deps.store.list_orders("alice")) == 1
    assert sale_stock(app_deps.store) == 2


def test_a_ticket_of_a_vanished_sale_fails(client: Any, app_deps: Deps, sale: Sale) -> None:
    ticket_id = body(post(client, "alice"))["ticketId"]
    del app_deps.store._sales["flash"]
    assert drain(app_deps) == ["FAILED"]
    assert body(ticket_of(client, "alice", ticket_id))["status"] == "FAILED"


def test_bad_messages(app_deps: Deps) -> None:
    with pytest.raises(Unprocessable):
        seckill.on_seckill(app_deps, {"ticketId": "nope"})
    assert seckill.on_seckill(
        app_deps, {"ticketId": "TICKET_0000000000000_0000000000000000"}) is None


def test_a_flash_sale_order_that_times_out_gives_its_unit_back_to_the_sale(
        client: Any, app_deps: Deps, sale: Sale) -> None:
    ticket_id = body(post(client, "alice"))["ticketId"]
    drain(app_deps)
    order_id = body(ticket_of(client, "alice", ticket_id))["orderId"]
    goods_before = {g.id: g.stock for g in app_deps.store.list_goods()}
    assert sale_stock(app_deps.store) == 2
    assert check_due(app_deps, order_id) == "CLOSED"
    assert sale_stock(app_deps.store) == 3
    assert {g.id: g.stock for g in app_deps.store.list_goods()} == goods_before
    assert check_due(app_deps, order_id) == "CLOSED"
    assert sale_stock(app_deps.store) == 3  # once


def test_concurrent_requests_each_see_their_own_user(client: Any, app_deps: Deps,
                                                     sale: Sale) -> None:
    """chalice local serves on threads: the route must read its own request's user."""
    app_deps.store.put_sale(dataclasses.replace(sale, stock=1000))
    users = [f"user{i}" for i in range(60)]
    got: dict[str, str] = {}
    lock = threading.Lock()

    def ask(user: str) -> None:
        r = post(client, user)
        assert r.status_code == 202, r.body
        with lock:
            got[body(r)["ticketId"]] = user

    threads = [threading.Thread(target=ask, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got.values()) == sorted(users)
    owners = {m["ticketId"]: m["username"] for m in fake(app_deps).seckills}
    assert owners == got


# --- a sale's stock in shards ----------------------------------------------------------


def sharded(d: Deps, stock: int, shards: int) -> Sale:
    d.clock.now = NOW  # type: ignore[attr-defined]
    s = a_sale(stock)
    d.store.put_sale(s, shards=shards)
    return s


def shard_stocks(store: InMemoryStore, sale_id: str = "flash") -> list[int]:
    found = store.sale_shard_stocks(sale_id, consistent=True)
    assert found is not None
    return list(found[1])


def user_starting_at(shard: int, shards: int) -> str:
    """A user name whose own shard (the drain's first try) is `shard`."""
    items = list(range(shards))
    return next(u for u in (f"user{i}" for i in range(1000))
                if seckill.shard_walk(items, u)[0] == shard)


def order_of(client: Any, app_deps: Deps, user: str, ticket_id: str) -> Any:
    t = body(ticket_of(client, user, ticket_id))
    assert t["status"] == "ORDERED", t
    return app_deps.store.get_order(t["orderId"])


def test_shard_walk_starts_at_the_users_shard_and_visits_every_shard_once() -> None:
    items = ["s#0", "s#1", "s#2", "s#3"]
    firsts: Counter[str] = Counter()
    for i in range(400):
        walk = seckill.shard_walk(items, f"u{i:04d}")
        assert sorted(walk) == items  # every shard, once
        k = items.index(walk[0])
        assert walk == items[k:] + items[:k]  # then the others in order
        assert seckill.shard_walk(items, f"u{i:04d}") == walk  # the same every time
        firsts[walk[0]] += 1
    assert all(60 <= n <= 140 for n in firsts.values()), firsts  # each about its share
    assert seckill.shard_walk(["s"], "alice") == ["s"]


def test_a_sharded_sale_sells_exactly_its_stock_one_per_user(client: Any,
                                                            app_deps: Deps) -> None:
    sharded(app_deps, stock=7, shards=3)
    assert shard_stocks(app_deps.store) == [3, 2, 2]
    users = [f"u{i:02d}" for i in range(20)]
    answers = [post(client, u) for u in users + users[:5]]  # five users twice
    assert [r.status_code for r in answers] == [202] * 20 + [409] * 5
    out = drain(app_deps)
    assert Counter(out) == {"ORDERED": 7, "SOLD_OUT": 13}
    orders = [o for u in users for o in app_deps.store.list_orders(u)]
    assert len(orders) == 7 and len({o.username for o in orders}) == 7
    # each shard gave exactly its units, and is at 0, never below
    assert Counter(o.sale_id for o in orders) == {"flash#0": 3, "flash#1": 2, "flash#2": 2}
    assert shard_stocks(app_deps.store) == [0, 0, 0]
    assert sale_stock(app_deps.store) == 0
    assert body(client.http.get("/seckill"))["items"][0]["stock"] == 0
    # sold out: the API's fast path sums the shards (read afresh: no cache)
    app_deps.settings = dataclasses.replace(  # type: ignore[misc]
        app_deps.settings, seckill_cache_ms=0)
    r = post(client, "late")
    assert r.status_code == 409 and body(r)["Code"] == "SoldOut"


def test_a_dry_shard_falls_over_to_the_next_one_with_a_unit(client: Any,
                                                          app_deps: Deps) -> None:
    sharded(app_deps, stock=2, shards=4)
    assert shard_stocks(app_deps.store) == [1, 1, 0, 0]
    user = user_starting_at(2, 4)  # its own shard is empty; so is #3; then #0
    ticket_id = body(post(client, user))["ticketId"]
    assert drain(app_deps) == ["ORDERED"]
    assert order_of(client, app_deps, user, ticket_id).sale_id == "flash#0"
    assert shard_stocks(app_deps.store) == [0, 1, 0, 0]


def test_sold_out_only_when_every_shard_is_dry(client: Any, app_deps: Deps,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    app_deps.settings = dataclasses.replace(  # type: ignore[misc]
        app_deps.settings, seckill_cache_ms=60_000)
    sharded(app_deps, stock=1, shards=4)
    assert shard_stocks(app_deps.store) == [1, 0, 0, 0]
    # the one unit is on the last shard of this user's walk: still found
    first = user_starting_at(1, 4)
    ticket_id = body(post(client, first))["ticketId"]
    assert drain(app_deps) == ["ORDERED"]
    assert order_of(client, app_deps, first, ticket_id).sale_id == "flash#0"
    # now every shard is dry: SOLD_OUT, the claim released, nothing written
    second = user_starting_at(3, 4)
    late = body(post(client, second))["ticketId"]  # the API's sale read is cached: 202
    assert drain(app_deps) == ["SOLD_OUT"]
    assert body(ticket_of(client, second, late))["status"] == "SOLD_OUT"
    assert app_deps.store.list_orders(second) == []
    assert shard_stocks(app_deps.store) == [0, 0, 0, 0]
    # a unit comes back to #2 (as a closed order gives it back)
    store = app_deps.store
    store._sales["flash#2"] = dataclasses.replace(store._sales["flash#2"], stock=1)
    reads: list[str] = []
    real = store.get_sale
    monkeypatch.setattr(store, "get_sale",
                        lambda sale_id, **kw: reads.append(sale_id) or real(sale_id, **kw))
    # within SECKILL_CACHE_MS a shard that said empty is not asked again: no read
    again = body(post(client, second))["ticketId"]  # the claim was released
    assert drain(app_deps) == ["SOLD_OUT"]
    assert reads == []
    # after it, the shards are read again and the unit is found
    app_deps.settings = dataclasses.replace(  # type: ignore[misc]
        app_deps.settings, seckill_cache_ms=0)
    assert body(ticket_of(client, second, again))["status"] == "SOLD_OUT"
    last = body(post(client, second))["ticketId"]
    assert drain(app_deps) == ["ORDERED"]
    assert order_of(client, app_deps, second, last).sale_id == "flash#2"
    assert shard_stocks(store) == [0, 0, 0, 0]


def test_a_shard_that_runs_dry_between_read_and_transaction_is_skipped(
        client: Any, app_deps: Deps, monkeypatch: pytest.MonkeyPatch) -> None:
    sharded(app_deps, stock=2, shards=2)
    user = user_starting_at(0, 2)
    ticket_id = body(post(client, user))["ticketId"]
    store = app_deps.store
    real = store.create_seckill_order
    tried: list[str] = []

    def racing(order: Any, ticket: Any) -> Any:
        tried.append(order.sale_id)
        if order.sale_id == "flash#0":  # another drain took shard 0's last unit
            store._sales["flash#0"] = dataclasses.replace(store._sales["flash#0"], stock=0)
        return real(order, ticket)

    monkeypatch.setattr(store, "create_seckill_order", racing)
    assert drain(app_deps) == ["ORDERED"]
    assert tried == ["flash#0", "flash#1"]  # SOLD_OUT on #0, then #1, same order id
    assert order_of(client, app_deps, user, ticket_id).sale_id == "flash#1"
    assert shard_stocks(store) == [0, 0]


def test_a_closed_order_gives_its_unit_back_to_its_own_shard(client: Any,
                                                            app_deps: Deps) -> None:
    sharded(app_deps, stock=6, shards=3)
    user = user_starting_at(1, 3)
    ticket_id = body(post(client, user))["ticketId"]
    drain(app_deps)
    order = order_of(client, app_deps, user, ticket_id)
    assert order.sale_id == "flash#1"
    assert shard_stocks(app_deps.store) == [2, 1, 2]
    assert check_due(app_deps, order.id) == "CLOSED"
    assert shard_stocks(app_deps.store) == [2, 2, 2]  # to #1, not to the sale's item
    assert check_due(app_deps, order.id) == "CLOSED"
    assert shard_stocks(app_deps.store) == [2, 2, 2]  # once


def stock_item_reads(store: Any, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The sale ids the drain asks store.sale_stock_items for, from now on."""
    real = store.sale_stock_items
    reads: list[str] = []

    def counted(sale_id: str, **kw: Any) -> Any:
        reads.append(sale_id)
        return real(sale_id, **kw)

    monkeypatch.setattr(store, "sale_stock_items", counted)
    return reads


def test_the_drain_reads_a_sharded_sales_item_once_per_cache_period(
        client: Any, app_deps: Deps, monkeypatch: pytest.MonkeyPatch) -> None:
    app_deps.settings = dataclasses.replace(  # type: ignore[misc]
        app_deps.settings, seckill_cache_ms=60_000)
    sharded(app_deps, stock=10, shards=2)
    for user in ("u1", "u2", "u3", "u4"):
        assert post(client, user).status_code == 202
    store = app_deps.store
    reads = stock_item_reads(store, monkeypatch)
    assert drain(app_deps) == ["ORDERED"] * 4
    assert reads == ["flash"]
    assert sum(shard_stocks(store)) == 6


def test_a_sale_of_one_shard_is_read_by_the_drain_every_time(
        client: Any, app_deps: Deps, sale: Sale, monkeypatch: pytest.MonkeyPatch) -> None:
    app_deps.settings = dataclasses.replace(  # type: ignore[misc]
        app_deps.settings, seckill_cache_ms=60_000)
    for user in ("u1", "u2"):
        assert post(client, user).status_code == 202
    store = app_deps.store
    reads = stock_item_reads(store, monkeypatch)
    assert drain(app_deps) == ["ORDERED"] * 2
    assert reads == ["flash", "flash"]  # its own item holds the stock
    orders = [o for u in ("u1", "u2") for o in store.list_orders(u)]
    assert {o.sale_id for o in orders} == {"flash"}  # one shard: the sale's id, as before


# --- the token bucket ---------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_token_bucket_spaces_takes_by_one_over_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(16, clock=clock)  # 1/16 s: exact in binary
    assert bucket.try_take() == 0.0625  # starts empty
    clock.t += 0.0625
    assert bucket.try_take() == 0.0
    assert bucket.try_take() == 0.0625
    clock.t += 0.03125
    assert bucket.try_take() == 0.03125
    clock.t += 10  # idle: it saves one token, not 160
    assert bucket.try_take() == 0.0
    assert bucket.try_take() == 0.0625


def test_token_bucket_burst_and_bad_rates() -> None:
    clock = FakeClock()
    bucket = TokenBucket(10, burst=3, clock=clock)
    clock.t += 5
    assert [bucket.try_take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.try_take() == pytest.approx(0.1)
    for rate in (0, -1, float("inf")):
        with pytest.raises(ValueError):
            TokenBucket(rate)


def test_token_bucket_real_time_rate() -> None:
    import time

    bucket = TokenBucket(200)
    start = time.monotonic()
    for _ in range(40):
        assert bucket.take()
    took = time.monotonic() - start
    assert 0.195 <= took < 0.5  # 40 takes at 200/s: 0.2 s, never less


def test_take_returns_false_when_stopped() -> None:
    stop = threading.Event()
    stop.set()
    assert TokenBucket(0.01).take(stop) is False


def test_settings_of_the_drain(monkeypatch: pytest.MonkeyPatch) -> None:
    from chalicelib.worker import rate_limits_from

    monkeypatch.setenv("SECKILL_ORDERS_PER_SECOND", "20")
    monkeypatch.setenv("BRIDGE_PAY_PER_SECOND", "7.5")
    s = config.load()
    assert rate_limits_from(s) == {broker.QUEUE_SECKILL: 20.0, broker.QUEUE_PAY: 7.5}
    monkeypatch.delenv("BRIDGE_PAY_PER_SECOND")
    assert rate_limits_from(config.load()) == {broker.QUEUE_SECKILL: 20.0}
    monkeypatch.setenv("SECKILL_ORDERS_PER_SECOND", "fast")
    with pytest.raises(ValueError, match="SECKILL_ORDERS_PER_SECOND"):
        config.load()
