"""The store's contract: one suite, run against every store.

`StoreContract` holds the tests; a subclass gives them a store through a fixture
named `store`, fresh for each test (the way aws-samples/chalice-workshop runs one
test class against its in-memory and its DynamoDB todo stores):

    class TestInMemoryStore(StoreContract):            tests/unit/test_memory_store.py
    class TestDynamoDBStore(StoreContract):            tests/integration/test_dynamodb_store.py

A fresh store may already hold goods (the DynamoDB tables come seeded with the
test catalogue): every test puts what it needs, under ids of its own (`k-...`),
and compares with what was there before rather than with an empty store.

Where the two stores disagree, the DynamoDB store is the reference.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from chalicelib.domain import (
    CLOSED,
    PAID,
    REFUNDED,
    TICKET_DUPLICATE,
    TICKET_FAILED,
    TICKET_ORDERED,
    TICKET_QUEUED,
    TICKET_SOLD_OUT,
    UNPAID,
    CartLine,
    Conflict,
    Goods,
    Line,
    Order,
    OutOfStock,
    PriceChanged,
    Sale,
    Ticket,
    Unavailable,
    iso,
    new_order_id,
    new_ticket_id,
    parse_iso,
)

# Microseconds on purpose: the stores keep milliseconds.
T0 = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
PAY_TIMEOUT = timedelta(minutes=30)
CHECK_DELAY = timedelta(minutes=35)


def ms(ts: datetime) -> datetime:
    """A datetime as the stores give it back: UTC, truncated to the millisecond."""
    text = iso(ts)
    assert text is not None
    return parse_iso(text)


# --- building blocks -------------------------------------------------------------


def put_goods(store: Any, gid: str = "k1", price_fen: int = 1990, stock: int = 10) -> Goods:
    goods = Goods(gid, f"Goods {gid}", price_fen, stock)
    store.put_goods(goods)
    return goods


def stock_of(store: Any, gid: str) -> int:
    return int(store.get_goods([gid])[gid].stock)


def line_of(goods: Goods, num: int) -> Line:
    return Line(goods.id, goods.name, goods.price_fen, num)


def new_order(username: str, lines: list[Line], *, at: datetime = T0,
              check_time: datetime | None = None, sale_id: str | None = None) -> Order:
    return Order(
        id=new_order_id(at),
        username=username,
        status=UNPAID,
        source_type="1",
        lines=lines,
        create_time=at,
        update_time=at,
        expire_time=at + PAY_TIMEOUT,
        check_time=check_time or at + CHECK_DELAY,
        sale_id=sale_id,
    )


def as_stored(order: Order) -> Order:
    """What get_order gives back for `order` just created: times to the millisecond,
    the payment fields and `extra` not kept (a new order has none)."""
    return dataclasses.replace(
        order, lines=list(order.lines),
        create_time=ms(order.create_time), update_time=ms(order.update_time),
        expire_time=ms(order.expire_time), check_time=ms(order.check_time),
        pay_time=None, close_time=None, end_time=None, consign_time=None,
        transaction_id=None, refund_request_no=None, extra={})


def order_from_cart(store: Any, username: str, *picks: tuple[Goods, int],
                    at: datetime = T0, check_time: datetime | None = None) -> Order:
    """The picks put in the user's cart, then ordered from it; returns the order."""
    for goods, num in picks:
        store.set_cart_line(username, goods.id, num, goods)
    order = new_order(username, [line_of(g, n) for g, n in picks], at=at,
                      check_time=check_time)
    store.create_order(order, {g.id: n for g, n in picks})
    return order


def status_of(store: Any, order_id: str) -> str:
    order = store.get_order(order_id)
    assert order is not None
    return str(order.status)


def put_sale(store: Any, sid: str = "ks1", stock: int = 2, goods_id: str = "k1") -> Sale:
    sale = Sale(sid, goods_id, f"Sale {sid}", 990, stock, T0 - timedelta(hours=1),
                T0 + timedelta(hours=1))
    store.put_sale(sale)
    return dataclasses.replace(sale, start_time=ms(sale.start_time), end_time=ms(sale.end_time))


def sale_stock(store: Any, sid: str) -> int:
    sale = store.get_sale(sid, consistent=True)
    assert sale is not None
    return int(sale.stock)


def new_ticket(username: str, sale_id: str, at: datetime = T0) -> Ticket:
    return Ticket(new_ticket_id(at), username, sale_id, TICKET_QUEUED, None, at, at)


def claimed(store: Any, username: str, sale_id: str, at: datetime = T0) -> Ticket:
    ticket = new_ticket(username, sale_id, at)
    assert store.claim_ticket(ticket) is None
    return ticket


def sale_order(sale: Sale, username: str, at: datetime = T0) -> Order:
    return new_order(username, [Line(sale.goods_id, sale.name, sale.price_fen, 1)], at=at,
                     sale_id=sale.id)


def ticket_of(store: Any, ticket_id: str) -> Ticket:
    ticket = store.get_ticket(ticket_id)
    assert ticket is not None
    return ticket


@contextmanager
def eager_thread_switches() -> Iterator[None]:
    """Threads switch every microsecond instead of every 5 ms, so that a store in
    memory that forgot a lock loses the race here rather than once in a while."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


class StoreContract:
    """The store's public methods and every condition they keep. Subclasses provide
    the `store` fixture."""

    #: How many times each race test runs its race (a subclass may race more often:
    #: an in-memory store is cheap, and a missing lock shows only now and then).
    race_rounds = 1

    @pytest.fixture
    def store(self) -> Any:
        raise NotImplementedError("a subclass of StoreContract provides the store")

    # --- set-up ------------------------------------------------------------------

    def test_create_tables_warm_and_ping_answer(self, store: Any) -> None:
        store.create_tables()
        store.warm()
        store.ping()

    # --- goods ---------------------------------------------------------------------

    def test_get_goods_returns_the_goods_put_and_skips_unknown_ids(self, store: Any) -> None:
        a = put_goods(store, "k1", 1990, 5)
        b = put_goods(store, "k2", 5990, 0)
        assert store.get_goods(["k1", "k2", "k-none", "k1"]) == {"k1": a, "k2": b}
        assert store.get_goods(iter(["k2"])) == {"k2": b}
        assert store.get_goods([]) == {}
        assert store.get_goods(["k-none"]) == {}

    def test_put_goods_replaces_the_goods(self, store: Any) -> None:
        put_goods(store, "k1", 1990, 5)
        again = Goods("k1", "Renamed", 2990, 7)
        store.put_goods(again)
        assert store.get_goods(["k1"]) == {"k1": again}

    def test_list_goods_holds_every_goods_in_id_order(self, store: Any) -> None:
        before = store.list_goods()
        added = [put_goods(store, gid) for gid in ("k3", "k1", "k2")]
        listed = store.list_goods()
        assert listed == sorted(before + added, key=lambda g: g.id)

    # --- cart ----------------------------------------------------------------------

    def test_cart_line_keeps_the_price_and_name_of_the_goods_given(self, store: Any) -> None:
        g = put_goods(store, "k1", 1990)
        store.set_cart_line("alice", "k1", 2, g)
        store.set_cart_line("alice", "k2", 1)  # an older line: no price, no name
        assert store.get_cart_lines("alice") == [
            CartLine("k1", 2, 1990, "Goods k1"), CartLine("k2", 1, None, None)]
        assert store.get_cart("alice") == {"k1": 2, "k2": 1}

    def test_cart_lines_come_in_goods_id_order_and_per_user(self, store: Any) -> None:
        for gid in ("k3", "k1", "k2"):
            store.set_cart_line("alice", gid, 1)
        store.set_cart_line("bob", "k9", 4)
        assert [c.goods_id for c in store.get_cart_lines("alice")] == ["k1", "k2", "k3"]
        assert store.get_cart("bob") == {"k9": 4}
        assert store.get_cart("carol") == {}
        assert store.get_cart_lines("carol") == []

    def test_set_cart_line_replaces_the_line(self, store: Any) -> None:
        g = put_goods(store, "k1", 1990)
        store.set_cart_line("alice", "k1", 2, g)
        store.set_cart_line("alice", "k1", 5)
        assert store.get_cart_lines("alice") == [CartLine("k1", 5, None, None)]

    def test_refresh_cart_line_sets_price_and_name_and_keeps_num(self, store: Any) -> None:
        g = put_goods(store, "k1", 1990)
        store.set_cart_line("alice", "k1", 3, g)
        store.refresh_cart_line("alice", Goods("k1", "Dearer", 2990, 1))
        assert store.get_cart_lines("alice") == [CartLine("k1", 3, 2990, "Dearer")]

    def test_refresh_cart_line_never_creates_a_line(self, store: Any) -> None:
        g = put_goods(store, "k1", 1990)
        store.refresh_cart_line("alice", g)
        assert store.get_cart_lines("alice") == []

    def test_delete_cart_line_and_a_missing_line_is_no_error(self, store: Any) -> None:
        store.set_cart_line("alice", "k1", 1)
        store.set_cart_line("alice", "k2", 1)
        store.delete_cart_line("alice", "k1")
        store.delete_cart_line("alice", "k1")
        store.delete_cart_line("bob", "k1")
        assert store.get_cart("alice") == {"k2": 1}

    # --- create_order ----------------------------------------------------------------

    def test_create_order_puts_the_order_takes_stock_and_empties_the_lines_read(
            self, store: Any) -> None:
        a, b = put_goods(store, "k1", 1990, 10), put_goods(store, "k2", 5990, 3)
        store.set_cart_line("alice", "k3", 1)  # not in the cart as read: stays
        order = order_from_cart(store, "alice", (a, 2), (b, 3))
        assert store.get_order(order.id) == as_stored(order)
        assert (stock_of(store, "k1"), stock_of(store, "k2")) == (8, 0)
        assert store.get_cart("alice") == {"k3": 1}

    def test_create_order_without_a_cart_leaves_the_cart_alone(self, store: Any) -> None:
        a = put_goods(store, "k1", 1990, 10)
        store.set_cart_line("alice", "k1", 4, a)
        order = new_order("alice", [line_of(a, 2)])
        store.create_order(order, None)
        store.create_order(new_order("alice", [line_of(a, 1)]), {})
        assert status_of(store, order.id) == UNPAID
        assert stock_of(store, "k1") == 7
        assert store.get_cart("alice") == {"k1": 4}

    def test_an_order_comes_back_in_utc_to_the_millisecond_without_payment_fields(
            self, store: Any) -> None:
        a = put_goods(store, "k1", 1990, 10)
        at = T0.astimezone(timezone(timedelta(hours=8)))  # the same instant, UTC+8
        order = new_order("alice", [line_of(a, 1)], at=at)
        order.pay_time, order.transaction_id, order.extra = at, "T-not-kept", {"x": 1}
        store.create_order(order, None)
        got = store.get_order(order.id)
        assert got is not None
        assert got.create_time == T0.replace(microsecond=678000)
        assert got.create_time.utcoffset() == timedelta(0)
        assert (got.pay_time, got.transaction_id, got.extra) == (None, None, {})
        assert got == as_stored(order)
        assert got.total_fen == 1990

    def test_stock_exactly_enough_is_enough(self, store: Any) -> None:
        a = put_goods(store, "k1", 1990, 2)
        order_from_cart(store, "alice", (a, 2))
        assert stock_of(store, "k1") == 0

    def test_out_of_stock_writes_nothing(self, store: Any) -> None:
        a, b = put_goods(store, "k1", 1990, 10), put_goods(store, "k2", 5990, 1)
        before = store.list_goods()
        with pytest.raises(OutOfStock) as info:
            order_from_cart(store, "alice", (a, 2), (b, 2))
        assert info.value.goods_id == "k2"
        assert store.list_goods() == before  # k1's stock was not taken either
        assert store.get_cart("alice") == {"k1": 2, "k2": 2}
        assert store.list_orders("alice") == []

    def test_unknown_goods_is_out_of_stock_and_creates_nothing(self, store: Any) -> None:
        ghost = Goods("k-ghost", "Ghost", 100, 0)
        before = store.list_goods()
        with pytest.raises(OutOfStock) as info:
            store.create_order(new_order("alice", [line_of(ghost, 1)]), None)
        assert info.value.goods_id == "k-ghost"
        assert store.list_goods() == before
        assert store.list_orders("alice") == []

    def test_price_changed_writes_nothing_and_carries_the_goods_as_it_is(
            self, store: Any) -> None:
        a = put_goods(store, "k1", 1990, 10)
        store.set_cart_line("alice", "k1", 2, a)
        dearer = Goods("k1", "Goods k1", 2990, 1)  # dearer, and too few: the price wins
        store.put_goods(dearer)
        order = new_order("alice", [line_of(a, 2)])
        with pytest.raises(PriceChanged) as info:
            store.create_order(order, {"k1": 2})
        assert info.value.goods == dearer
        assert store.get_order(order.id) is None
        assert stock_of(store, "k1") == 1
        assert store.get_cart_lines("alice") == [CartLine("k1", 2, 1990, "Goods k1")]

    def test_a_cart_changed_meanwhile_is_a_conflict_and_writes_nothing(
            self, store: Any) -> None:
        a = put_goods(store, "k1", 1990, 10)
        store.set_cart_line("alice", "k1", 2, a)
        store.set_cart_line("alice", "k1", 3, a)  # changed after it was read as 2
        order = new_order("alice", [line_of(a, 2)])
        with pytest.raises(Conflict) as info:
            store.create_order(order, {"k1": 2})
        assert type(info.value) is Conflict
        assert store.get_order(order.id) is None
        assert stock_of(store, "k1") == 10
        assert store.get_cart("alice") == {"k1": 3}

    def test_a_cart_line_deleted_meanwhile_is_a_conflict(self, store: Any) -> None:
        a, b = put_goods(store, "k1", 1990, 10), put_goods(store, "k2", 1990, 10)
        store.set_cart_line("alice", "k1", 1, a)
        store.set_cart_line("alice", "k2", 1, b)
        store.delete_cart_line("alice", "k2")
        with pytest.raises(Conflict):
            store.create_order(new_order("alice", [line_of(a, 1), line_of(b, 1)]),
                               {"k1": 1, "k2": 1})
        assert store.get_cart("alice") == {"k1": 1}
        assert (stock_of(store, "k1"), stock_of(store, "k2")) == (10, 10)
        assert store.list_orders("alice") == []

    def test_a_changed_cart_is_reported_before_the_stock(self, store: Any) -> None:
        a = put_goods(store, "k1", 1990, 1)
        store.set_cart_line("alice", "k1", 5, a)
        with pytest.raises(Conflict) as info:
            store.create_order(new_order("alice", [line_of(a, 2)]), {"k1": 2})
        assert type(info.value) is Conflict

    def test_an_existing_order_is_a_conflict_and_writes_nothing(self, store: Any) -> None:
        a = put_goods(store, "k1", 1990, 10)
        first = order_from_cart(store, "alice", (a, 1))
        store.set_cart_line("alice", "k1", 2, a)
        again = dataclasses.replace(new_order("alice", [line_of(a, 2)]), id=first.id)
        with pytest.raises(Conflict) as info:
            store.create_order(again, {"k1": 2})
        assert type(info.value) is Conflict
        assert store.get_order(first.id) == as_stored(first)
        assert stock_of(store, "k1") == 9
        assert store.get_cart("alice") == {"k1": 2}

    def test_more_than_100_actions_is_unavailable_and_writes_nothing(self, store: Any) -> None:
        # the order, and per line a stock update and a cart delete: 1 + 50 + 50
        goods = [put_goods(store, f"k{i:02d}", 100, 5) for i in range(50)]
        for g in goods:
            store.set_cart_line("alice", g.id, 1, g)
        order = new_order("alice", [line_of(g, 1) for g in goods])
        with pytest.raises(Unavailable):
            store.create_order(order, {g.id: 1 for g in goods})
        assert store.get_order(order.id) is None
        assert stock_of(store, "k00") == 5
        assert len(store.get_cart("alice")) == 50

    def test_one_goods_twice_in_an_order_is_unavailable(self, store: Any) -> None:
        a = put_goods(store, "k1", 1990, 10)
        order = new_order("alice", [line_of(a, 1), line_of(a, 2)])
        with pytest.raises(Unavailable):
            store.create_order(order, None)
        assert store.get_order(order.id) is None
        assert stock_of(store, "k1") == 10

    # --- reading orders ---------------------------------------------------------------

    def test_an_unknown_order_is_none(self, store: Any) -> None:
        assert store.get_order(new_order_id(T0)) is None
        assert store.get_order(new_order_id(T0), consistent=False) is None

    def test_list_orders_newest_first_with_a_limit_and_per_user(self, store: Any) -> None:
        a = put_goods(store, "k1", 1990, 10)
        mine = [order_from_cart(store, "alice", (a, 1), at=T0 + timedelta(seconds=s))
                for s in (5, 1, 9, 3)]
        theirs = order_from_cart(store, "bob", (a, 1), at=T0 + timedelta(seconds=7))
        newest_first = sorted(mine, key=lambda o: o.create_time, reverse=True)
        assert store.list_orders("alice") == [as_stored(o) for o in newest_first]
        assert [o.id for o in store.list_orders("alice", limit=2)] == [
            o.id for o in newest_first[:2]]
        assert store.list_orders("bob") == [as_stored(theirs)]
        assert store.list_orders("carol") == []

    def test_orders_returned_and_given_are_copies(self, store: Any) -> None:
        a = put_goods(store, "k1", 1990, 10)
        order = order_from_cart(store, "alice", (a, 1))
        order.lines.append(line_of(a, 5))  # the order given, changed after the call
        order.status = PAID
        got = store.get_order(order.id)
        assert got is not None
        got.lines.clear()
        got.status = CLOSED
        got.extra["x"] = 1
        listed = store.list_orders("alice")
        listed[0].lines.clear()
        listed.clear()
        again = store.get_order(order.id)
        assert again is not None
        assert (again.status, again.lines, again.extra) == (UNPAID, [line_of(a, 1)], {})
        assert len(store.list_orders("alice")[0].lines) == 1

    def test_returned_collections_are_copies(self, store: Any) -> None:
        a = put_goods(store, "k1", 1990, 10)
        store.set_cart_line("alice", "k1", 1, a)
        store.list_goods().clear()
        store.get_goods(["k1"]).clear()
        store.get_cart("alice")["k1"] = 99
        store.get_cart_lines("alice").clear()
        put_sale(store, "ks1")
        store.list_sales().clear()
        assert store.get_goods(["k1"]) == {"k1": a}
        assert store.get_cart("alice") == {"k1": 1}
        assert [s.id for s in store.list_sales()] == ["ks1"]

    # --- mark_paid ---------------------------------------------------------------------

    def test_mark_paid_moves_an_unpaid_order_to_paid(self, store: Any) -> None:
        a = put_goods(store, "k1", 1990, 10)
        order = order_from_cart(store, "alice", (a, 2))
        paid_at, now = T0 + timedelta(minutes=1, microseconds=1500), T0 + timedelta(minutes=2)
        assert store.mark_paid(order.id, total_fen=3980, trade_no="T1", pay_time=paid_at,
                               notify_id="n1", now=now) is True
        got = store.get_order(order.id)
        assert got is not None
        assert (got.status, got.transaction_id) == (PAID, "T1")
        assert (got.pay_time, got.update_time) == (ms(paid_at), ms(now))
        assert (got.close_time, got.end_time) == (None, None)
        assert store.unpaid_due(T0 + timedelta(days=1)) == []
        assert stock_of(store, "k1") == 8

    def test_mark_paid_with_another_amount_changes_nothing(self, store: Any) -> None:
        a = put_goods(store, "k1", 1990, 10)
        order = order_from_cart(store, "alice", (a, 2))
        for fen in (3979, 3981, 0, 1990):
            assert store.mark_paid(order.id, total_fen=fen, trade_no="T1", pay_time=T0,
                                   notify_id=None, now=T0) is False
        assert store.get_order(order.id) == as_stored(order)

    def test_mark_paid_twice_keeps_the_first_payment(self, store: Any) -> None:
        a = put_goods(store, "k1", 1990, 10)
        order = order_from_cart(store, "alice", (a, 1))
        assert store.mark_paid(order.id, total_fen=1990, trade_no="T1", pay_time=T0,
                               notify_id="n1", now=T0)
        assert store.mark_paid(order.id, total_fen=1990, trade_no="T2",
                               pay_time=T0 + timedelta(hours=1), notify_id="n2",
                               now=T0 + timedelta(hours=1)) is False
        got = store.get_order(order.id)
        assert got is not None
        assert (got.status, got.transaction_id, got.pay_time) == (PAID, "T1", ms(T0))

    def test_mark_paid_of_a_closed_order_is_false(self, store: Any) -> None:
        a = put_goods(store, "k1", 1990, 10)
        order = order_from_cart(store, "alice", (a, 1))
        assert store.close_order(order, now=T0)
        assert store.mark_paid(order.id, total_fen=1990, trade_no="T1", pay_time=T0,
                               notify_id=None, now=T0) is False
        assert status_of(store, order.id) == CLOSED
        assert stock_of(store, "k1") == 10

    def test_mark_paid_of_an_unknown_order_is_false_and_creates_nothing(
            self, store: Any) -> None:
        order_id = new_order_id(T0)
        assert store.mark_paid(order_id, total_fen=1990, trade_no="T1", pay_time=T0,
                               notify_id=None, now=T0) is False
        assert store.get_order(order_id) is None

    # --- close_order -------------------------------------------------------------------

    def test_close_order_closes_and_gives_the_stock_back(self, store: Any) -> None:
        a, b = put_goods(store, "k1", 1990, 10), put_goods(store, "k2", 5990, 5)
        order = order_from_cart(store, "alice", (a, 2), (b, 5))
        now = T0 + timedelta(minutes=35, microseconds=999)
        assert store.close_order(order, now=now) is True
        got = store.get_order(order.id)
        assert got is not None
        assert got.status == CLOSED
        assert got.close_time == got.end_time == got.update_time == ms(now)
        assert got.pay_time is None
        assert (stock_of(store, "k1"), stock_of(store, "k2")) == (10, 5)
        assert store.unpaid_due(T0 + timedelta(days=1)) == []

    def test_close_order_twice_gives_the_stock_back_once(self, store: Any) -> None:
        a = put_goods(store, "k1", 1990, 10)
        order = order_from_cart(store, "alice", (a, 3))
        assert store.close_order(order, now=T0) is True
        assert store.close_order(order, now=T0 + timedelta(seconds=1)) is False
        assert stock_of(store, "k1") == 10
        got = store.get_order(order.id)
        assert got is not None and got.close_time == ms(T0)

    def test_close_order_of_a_paid_order_is_false_and_keeps_the_stock(self, store: Any) -> None:
        a = put_goods(store, "k1", 1990, 10)
        order = order_from_cart(store, "alice", (a, 3))
        assert store.mark_paid(order.id, total_fen=5970, trade_no="T1", pay_time=T0,
                               notify_id=None, now=T0)
        assert store.close_order(order, now=T0) is False
        assert status_of(store, order.id) == PAID
        assert stock_of(store, "k1") == 7

    def test_close_order_of_an_unknown_order_is_false_and_moves_no_stock(
            self, store: Any) -> None:
        a = put_goods(store, "k1", 1990, 10)
        order = new_order("alice", [line_of(a, 3)])
        assert store.close_order(order, now=T0) is False
        assert store.get_order(order.id) is None
        assert stock_of(store, "k1") == 10

    def test_closing_a_flash_sale_order_gives_the_unit_back_to_the_sale(
            self, store: Any) -> None:
        put_goods(store, "k1", 1990, 10)
        sale = put_sale(store, "ks1", stock=1)
        ticket = claimed(store, "alice", "ks1")
        order = sale_order(sale, "alice")
        assert store.create_seckill_order(order, ticket) == TICKET_ORDERED
        assert sale_stock(store, "ks1") == 0
        assert store.close_order(order, now=T0) is True
        assert store.close_order(order, now=T0) is False
        assert sale_stock(store, "ks1") == 1
        assert stock_of(store, "k1") == 10  # the goods' own stock is not the sale's

    # --- mark_refunded --------------------------------------------------------------------

    def test_mark_refunded_moves_a_closed_order_to_refunded(self, store: Any) -> None:
        a = put_goods(store, "k1", 1990, 10)
        order = order_from_cart(store, "alice", (a, 1))
        assert store.close_order(order, now=T0)
        later = T0 + timedelta(hours=1)
        assert store.mark_refunded(order.id, trade_no="T9", refund_request_no="R1",
                                   now=later) is True
        got = store.get_order(order.id)
        assert got is not None
        assert (got.status, got.transaction_id, got.refund_request_no) == (REFUNDED, "T9", "R1")
        assert (got.update_time, got.close_time) == (ms(later), ms(T0))
        assert stock_of(store, "k1") == 10

    def test_mark_refunded_only_from_closed(self, store: Any) -> None:
        a = put_goods(store, "k1", 1990, 10)
        unpaid = order_from_cart(store, "alice", (a, 1))
        paid = order_from_cart(store, "alice", (a, 1))
        assert store.mark_paid(paid.id, total_fen=1990, trade_no="T1", pay_time=T0,
                               notify_id=None, now=T0)
        refunded = order_from_cart(store, "alice", (a, 1))
        assert store.close_order(refunded, now=T0)
        assert store.mark_refunded(refunded.id, trade_no="T2", refund_request_no="R2", now=T0)
        for order_id, status in ((unpaid.id, UNPAID), (paid.id, PAID), (refunded.id, REFUNDED)):
            before = store.get_order(order_id)
            assert store.mark_refunded(order_id, trade_no="T3", refund_request_no="R3",
                                       now=T0 + timedelta(hours=1)) is False
            assert store.get_order(order_id) == before
            assert status_of(store, order_id) == status
        unknown = new_order_id(T0)
        assert store.mark_refunded(unknown, trade_no="T3", refund_request_no="R3",
                                   now=T0) is False
        assert store.get_order(unknown) is None

    # --- unpaid_due ---------------------------------------------------------------------

    def test_unpaid_due_oldest_check_time_first_up_to_now_with_a_limit(
            self, store: Any) -> None:
        a = put_goods(store, "k1", 1990, 100)
        now = T0 + timedelta(hours=1)
        checks = {s: order_from_cart(store, "alice", (a, 1),
                                     check_time=now + timedelta(seconds=s)).id
                  for s in (-30, -600, 0, -5, 60)}
        assert store.unpaid_due(now) == [checks[s] for s in (-600, -30, -5, 0)]
        assert store.unpaid_due(now, limit=2) == [checks[-600], checks[-30]]
        assert store.unpaid_due(now - timedelta(hours=1)) == []

    def test_unpaid_due_compares_to_the_millisecond(self, store: Any) -> None:
        a = put_goods(store, "k1", 1990, 10)
        now = T0.replace(microsecond=678100)
        same_ms = order_from_cart(store, "alice", (a, 1),
                                  check_time=T0.replace(microsecond=678900))
        order_from_cart(store, "alice", (a, 1), check_time=T0.replace(microsecond=679000))
        assert store.unpaid_due(now) == [same_ms.id]

    def test_unpaid_due_holds_only_unpaid_orders(self, store: Any) -> None:
        a = put_goods(store, "k1", 1990, 10)
        paid, closed, refunded, unpaid = (order_from_cart(store, u, (a, 1))
                                          for u in ("alice", "bob", "carol", "dave"))
        assert store.mark_paid(paid.id, total_fen=1990, trade_no="T1", pay_time=T0,
                               notify_id=None, now=T0)
        assert store.close_order(closed, now=T0)
        assert store.close_order(refunded, now=T0)
        assert store.mark_refunded(refunded.id, trade_no="T2", refund_request_no="R", now=T0)
        assert store.unpaid_due(T0 + timedelta(days=1)) == [unpaid.id]

    # --- sales ---------------------------------------------------------------------------

    def test_sales_put_get_and_list(self, store: Any) -> None:
        before = store.list_sales()
        b = put_sale(store, "ks2", stock=3)
        a = put_sale(store, "ks1", stock=0)
        assert store.get_sale("ks1") == a
        assert store.get_sale("ks2", consistent=True) == b
        assert store.get_sale("ks-none") is None
        assert store.list_sales() == sorted(before + [a, b], key=lambda s: s.id)

    def test_a_sale_comes_back_to_the_millisecond_and_put_sale_replaces(
            self, store: Any) -> None:
        start = T0.astimezone(timezone(timedelta(hours=-5)))
        sale = Sale("ks1", "k1", "Flash", 990, 5, start, T0 + timedelta(days=1, microseconds=7))
        store.put_sale(sale)
        got = store.get_sale("ks1", consistent=True)
        assert got == dataclasses.replace(sale, start_time=ms(T0),
                                          end_time=ms(T0 + timedelta(days=1)))
        assert got.start_time.utcoffset() == timedelta(0)
        store.put_sale(dataclasses.replace(sale, stock=1, price_fen=500))
        assert (sale_stock(store, "ks1"), store.get_sale("ks1").price_fen) == (1, 500)

    # --- tickets --------------------------------------------------------------------------

    def test_claim_ticket_writes_the_ticket(self, store: Any) -> None:
        ticket = new_ticket("alice", "ks1", at=T0)
        assert store.claim_ticket(ticket) is None
        assert store.get_ticket(ticket.id) == dataclasses.replace(
            ticket, create_time=ms(T0), update_time=ms(T0))
        assert store.get_ticket(new_ticket_id(T0)) is None

    def test_a_second_claim_names_the_holding_ticket_and_writes_nothing(
            self, store: Any) -> None:
        first = claimed(store, "alice", "ks1")
        second = new_ticket("alice", "ks1")
        assert store.claim_ticket(second) == first.id
        assert store.get_ticket(second.id) is None
        assert ticket_of(store, first.id).status == TICKET_QUEUED

    def test_claims_are_per_user_and_per_sale(self, store: Any) -> None:
        claimed(store, "alice", "ks1")
        claimed(store, "alice", "ks2")
        claimed(store, "bob", "ks1")

    def test_a_ticket_id_taken_is_a_conflict_and_writes_no_claim(self, store: Any) -> None:
        first = claimed(store, "alice", "ks1")
        same_id = dataclasses.replace(first, username="bob")
        with pytest.raises(Conflict):
            store.claim_ticket(same_id)
        assert ticket_of(store, first.id).username == "alice"
        claimed(store, "bob", "ks1")  # bob's claim was not written

    def test_drop_ticket_removes_ticket_and_claim(self, store: Any) -> None:
        ticket = claimed(store, "alice", "ks1")
        store.drop_ticket(ticket)
        assert store.get_ticket(ticket.id) is None
        claimed(store, "alice", "ks1")

    def test_drop_ticket_twice_is_unavailable(self, store: Any) -> None:
        ticket = claimed(store, "alice", "ks1")
        store.drop_ticket(ticket)
        with pytest.raises(Unavailable):
            store.drop_ticket(ticket)

    def test_drop_ticket_of_a_decided_ticket_is_unavailable_and_changes_nothing(
            self, store: Any) -> None:
        sale = put_sale(store, "ks1", stock=2)
        ticket = claimed(store, "alice", "ks1")
        assert store.create_seckill_order(sale_order(sale, "alice"), ticket) == TICKET_ORDERED
        before = ticket_of(store, ticket.id)
        with pytest.raises(Unavailable):
            store.drop_ticket(ticket)
        assert store.get_ticket(ticket.id) == before
        assert store.claim_ticket(new_ticket("alice", "ks1")) == ticket.id  # claim kept

    def test_drop_ticket_whose_claim_is_another_tickets_changes_nothing(
            self, store: Any) -> None:
        holder = claimed(store, "alice", "ks1")
        other = claimed(store, "bob", "ks1")
        as_alice = dataclasses.replace(other, username="alice")
        with pytest.raises(Unavailable):
            store.drop_ticket(as_alice)
        assert ticket_of(store, other.id).status == TICKET_QUEUED
        assert store.claim_ticket(new_ticket("alice", "ks1")) == holder.id

    # --- create_seckill_order --------------------------------------------------------------

    def test_a_flash_sale_order_takes_a_unit_of_the_sale(self, store: Any) -> None:
        put_goods(store, "k1", 1990, 10)
        sale = put_sale(store, "ks1", stock=2)
        ticket = claimed(store, "alice", "ks1")
        at = T0 + timedelta(seconds=3, microseconds=456789)
        order = sale_order(sale, "alice", at=at)
        assert store.create_seckill_order(order, ticket) == TICKET_ORDERED
        assert store.get_order(order.id) == as_stored(order)
        assert store.get_order(order.id).sale_id == "ks1"
        assert sale_stock(store, "ks1") == 1
        assert stock_of(store, "k1") == 10
        got = ticket_of(store, ticket.id)
        assert (got.status, got.order_id, got.update_time) == (TICKET_ORDERED, order.id, ms(at))
        assert got.create_time == ms(T0)
        assert store.claim_ticket(new_ticket("alice", "ks1")) == ticket.id  # claim kept
        assert store.unpaid_due(at + timedelta(days=1)) == [order.id]

    def test_a_redelivered_ticket_is_not_queued_and_writes_nothing(self, store: Any) -> None:
        sale = put_sale(store, "ks1", stock=5)
        ticket = claimed(store, "alice", "ks1")
        order = sale_order(sale, "alice")
        assert store.create_seckill_order(order, ticket) == TICKET_ORDERED
        # the same message again: same order id, marker there, ticket decided
        assert store.create_seckill_order(order, ticket) == "NOT_QUEUED"
        # or a new order for it
        other = sale_order(sale, "alice", at=T0 + timedelta(seconds=1))
        assert store.create_seckill_order(other, ticket) == "NOT_QUEUED"
        assert store.get_order(other.id) is None
        assert sale_stock(store, "ks1") == 4
        assert [o.id for o in store.list_orders("alice")] == [order.id]
        assert ticket_of(store, ticket.id).order_id == order.id

    def test_an_unknown_ticket_is_not_queued(self, store: Any) -> None:
        sale = put_sale(store, "ks1", stock=5)
        order = sale_order(sale, "alice")
        assert store.create_seckill_order(order, new_ticket("alice", "ks1")) == "NOT_QUEUED"
        assert store.get_order(order.id) is None
        assert sale_stock(store, "ks1") == 5

    def test_sold_out_writes_nothing(self, store: Any) -> None:
        sale = put_sale(store, "ks1", stock=0)
        ticket = claimed(store, "alice", "ks1")
        order = sale_order(sale, "alice")
        assert store.create_seckill_order(order, ticket) == TICKET_SOLD_OUT
        assert store.get_order(order.id) is None
        assert ticket_of(store, ticket.id).status == TICKET_QUEUED
        assert sale_stock(store, "ks1") == 0
        # a unit comes back: the same ticket orders (no "bought" marker was written)
        put_sale(store, "ks1", stock=1)
        assert store.create_seckill_order(order, ticket) == TICKET_ORDERED

    def test_an_unknown_sale_is_sold_out(self, store: Any) -> None:
        sale = Sale("ks-none", "k1", "Gone", 990, 1, T0, T0)
        ticket = claimed(store, "alice", "ks-none")
        order = sale_order(sale, "alice")
        assert store.create_seckill_order(order, ticket) == TICKET_SOLD_OUT
        assert store.get_order(order.id) is None
        assert store.get_sale("ks-none") is None

    def test_a_second_order_of_a_user_in_a_sale_is_a_duplicate(self, store: Any) -> None:
        sale = put_sale(store, "ks1", stock=5)
        first = claimed(store, "alice", "ks1")
        assert store.create_seckill_order(sale_order(sale, "alice"), first) == TICKET_ORDERED
        # A QUEUED ticket of alice's for the same sale; claim_ticket refuses one while
        # her claim is held, so it is bob's queued ticket passed as alice's.
        queued = dataclasses.replace(claimed(store, "bob", "ks1"), username="alice")
        order = sale_order(sale, "alice", at=T0 + timedelta(seconds=1))
        assert store.create_seckill_order(order, queued) == TICKET_DUPLICATE
        assert store.get_order(order.id) is None
        assert sale_stock(store, "ks1") == 4
        assert ticket_of(store, queued.id).status == TICKET_QUEUED
        # bob's own order is not alice's duplicate
        bobs = dataclasses.replace(queued, username="bob")
        assert store.create_seckill_order(sale_order(sale, "bob"), bobs) == TICKET_ORDERED

    def test_an_existing_order_id_is_a_conflict_and_writes_nothing(self, store: Any) -> None:
        a = put_goods(store, "k1", 1990, 10)
        taken = order_from_cart(store, "bob", (a, 1))
        sale = put_sale(store, "ks1", stock=5)
        ticket = claimed(store, "alice", "ks1")
        order = dataclasses.replace(sale_order(sale, "alice"), id=taken.id)
        with pytest.raises(Conflict):
            store.create_seckill_order(order, ticket)
        assert store.get_order(taken.id) == as_stored(taken)
        assert sale_stock(store, "ks1") == 5
        assert ticket_of(store, ticket.id).status == TICKET_QUEUED
        fresh = sale_order(sale, "alice", at=T0 + timedelta(seconds=1))
        assert store.create_seckill_order(fresh, ticket) == TICKET_ORDERED  # no marker left

    # --- finish_ticket ---------------------------------------------------------------------

    def test_finish_ticket_without_release_keeps_the_claim(self, store: Any) -> None:
        ticket = claimed(store, "alice", "ks1")
        later = T0 + timedelta(seconds=2, microseconds=2222)
        assert store.finish_ticket(ticket, TICKET_DUPLICATE, release_claim=False,
                                   now=later) is True
        got = ticket_of(store, ticket.id)
        assert (got.status, got.update_time, got.order_id) == (TICKET_DUPLICATE, ms(later), None)
        assert store.claim_ticket(new_ticket("alice", "ks1")) == ticket.id

    def test_finish_ticket_with_release_lets_the_user_claim_again(self, store: Any) -> None:
        ticket = claimed(store, "alice", "ks1")
        assert store.finish_ticket(ticket, TICKET_SOLD_OUT, release_claim=True,
                                   now=T0) is True
        assert ticket_of(store, ticket.id).status == TICKET_SOLD_OUT
        again = claimed(store, "alice", "ks1")
        assert ticket_of(store, again.id).status == TICKET_QUEUED

    def test_finish_ticket_of_a_decided_ticket_is_false_and_keeps_the_claim(
            self, store: Any) -> None:
        sale = put_sale(store, "ks1", stock=5)
        ticket = claimed(store, "alice", "ks1")
        assert store.create_seckill_order(sale_order(sale, "alice"), ticket) == TICKET_ORDERED
        before = ticket_of(store, ticket.id)
        for release in (True, False):
            assert store.finish_ticket(ticket, TICKET_FAILED, release_claim=release,
                                       now=T0 + timedelta(hours=1)) is False
        assert store.get_ticket(ticket.id) == before
        assert store.claim_ticket(new_ticket("alice", "ks1")) == ticket.id

    def test_finish_ticket_releases_only_its_own_claim(self, store: Any) -> None:
        holder = claimed(store, "alice", "ks1")
        # bob's queued ticket passed as alice's: alice's claim is not its to release
        other = dataclasses.replace(claimed(store, "bob", "ks1"), username="alice")
        assert store.finish_ticket(other, TICKET_FAILED, release_claim=True, now=T0) is True
        assert ticket_of(store, other.id).status == TICKET_FAILED
        assert store.claim_ticket(new_ticket("alice", "ks1")) == holder.id
        assert store.claim_ticket(new_ticket("bob", "ks1")) == other.id

    def test_finish_ticket_of_an_unknown_ticket_is_false(self, store: Any) -> None:
        ticket = new_ticket("alice", "ks1")
        assert store.finish_ticket(ticket, TICKET_FAILED, release_claim=True, now=T0) is False
        assert store.finish_ticket(ticket, TICKET_FAILED, release_claim=False, now=T0) is False
        assert store.get_ticket(ticket.id) is None

    # --- races -------------------------------------------------------------------------------

    def test_pay_against_close_has_one_winner_and_moves_stock_at_most_once(
            self, store: Any) -> None:
        for n in range(self.race_rounds):
            self._pay_against_close(store, f"k-race{n}", f"T0-{n}")

    def _pay_against_close(self, store: Any, gid: str, trade_no: str) -> None:
        """20 threads, half mark_paid and half close_order of one UNPAID order."""
        a = put_goods(store, gid, 1990, 10)
        order = order_from_cart(store, "alice", (a, 3))
        threads = 20
        start = threading.Barrier(threads)
        results: list[tuple[str, Any]] = []

        def pay() -> bool:
            return bool(store.mark_paid(order.id, total_fen=5970, trade_no=trade_no,
                                        pay_time=T0, notify_id=None, now=T0))

        def close() -> bool:
            return bool(store.close_order(order, now=T0))

        def run(name: str, act: Any) -> None:
            start.wait()
            try:
                results.append((name, act()))
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                results.append((name, exc))

        workers = [threading.Thread(target=run, args=(n, f))
                   for n, f in [("pay", pay), ("close", close)] * (threads // 2)]
        with eager_thread_switches():
            for t in workers:
                t.start()
            for t in workers:
                t.join(60)
        assert len(results) == threads and all(r in (True, False) for _, r in results), results
        winners = [name for name, won in results if won is True]
        assert len(winners) == 1, results
        got = store.get_order(order.id)
        assert got is not None
        if winners == ["pay"]:
            assert (got.status, got.transaction_id, stock_of(store, gid)) == (PAID, trade_no, 7)
        else:
            assert (got.status, got.transaction_id, stock_of(store, gid)) == (CLOSED, None, 10)

    def test_concurrent_orders_never_oversell(self, store: Any) -> None:
        for n in range(self.race_rounds):
            self._last_units(store, f"k-race{n}", [f"buyer{n}-{i}" for i in range(10)])

    def _last_units(self, store: Any, gid: str, buyers: list[str]) -> None:
        """10 buyers, each with one unit in the cart, for 3 units in stock."""
        a = put_goods(store, gid, 1990, 3)
        for b in buyers:
            store.set_cart_line(b, gid, 1, a)
        start = threading.Barrier(len(buyers))
        results: dict[str, str] = {}

        def buy(user: str) -> None:
            start.wait()
            try:
                store.create_order(new_order(user, [line_of(a, 1)]), {gid: 1})
                results[user] = "ordered"
            except OutOfStock:
                results[user] = "out of stock"
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                results[user] = repr(exc)

        workers = [threading.Thread(target=buy, args=(b,)) for b in buyers]
        with eager_thread_switches():
            for t in workers:
                t.start()
            for t in workers:
                t.join(60)
        assert sorted(results.values()) == ["ordered"] * 3 + ["out of stock"] * 7, results
        assert stock_of(store, gid) == 0
        winners = [b for b in buyers if results[b] == "ordered"]
        assert [len(store.list_orders(b)) for b in buyers] == [
            1 if b in winners else 0 for b in buyers]
        assert [store.get_cart(b) for b in buyers] == [
            {} if b in winners else {gid: 1} for b in buyers]
