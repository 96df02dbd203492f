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
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from chalicelib.domain import (
    CLOSED,
    MAX_CART_LINES,
    PAID,
    REFUNDED,
    SYSTEM_OPERATOR,
    TICKET_DUPLICATE,
    TICKET_FAILED,
    TICKET_ORDERED,
    TICKET_QUEUED,
    TICKET_SOLD_OUT,
    UNPAID,
    CartLine,
    Conflict,
    EventType,
    Goods,
    Invalid,
    Line,
    Order,
    OrderStatus,
    OutOfStock,
    PriceChanged,
    Refund,
    RefundStatus,
    Sale,
    Ticket,
    TimelineEvent,
    TooManyUnpaidOrders,
    Unavailable,
    iso,
    new_order_id,
    new_ticket_id,
    parse_iso,
    refund_id,
    refund_request_no,
)
from tests.outbox_contract import OutboxContract
from tests.reconciliation_contract import ReconciliationContract

# Microseconds on purpose: the stores keep milliseconds.
T0 = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
PAY_TIMEOUT = timedelta(minutes=30)
CHECK_DELAY = timedelta(minutes=35)
PENDING, SUCCEEDED, FAILED = RefundStatus.PENDING, RefundStatus.SUCCEEDED, RefundStatus.FAILED
HOUR = timedelta(hours=1)


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
    the payment fields, refund sums, link expiry and `extra` not kept (a new order
    has none)."""
    return dataclasses.replace(
        order, lines=list(order.lines),
        create_time=ms(order.create_time), update_time=ms(order.update_time),
        expire_time=ms(order.expire_time), check_time=ms(order.check_time),
        pay_time=None, close_time=None, end_time=None, consign_time=None,
        transaction_id=None, refund_request_no=None, refunded_fen=0,
        refund_reserved_fen=0, pending_refund_id=None, refund_count=0,
        link_expire_time=None, extra={})


def order_from_cart(store: Any, username: str, *picks: tuple[Goods, int],
                    at: datetime = T0, check_time: datetime | None = None) -> Order:
    """The picks put in the user's cart, then ordered from it; returns the order."""
    for goods, num in picks:
        store.set_cart_line(username, goods.id, num, goods)
    order = new_order(username, [line_of(g, n) for g, n in picks], at=at,
                      check_time=check_time)
    store.create_order(order, {g.id: n for g, n in picks})
    return order


def capped_order(store: Any, username: str, goods: Goods, cap: int, *, num: int = 1,
                 at: datetime = T0) -> Order:
    """`num` of the goods put in the user's cart, then ordered from it under a cap of
    `cap` UNPAID orders; returns the order."""
    store.set_cart_line(username, goods.id, num, goods)
    order = new_order(username, [line_of(goods, num)], at=at)
    store.create_order(order, {goods.id: num}, max_unpaid=cap)
    return order


def cart_order_state(store: Any, username: str, *gids: str) -> tuple[Any, ...]:
    """What a create_order may change: the user's orders and cart, the goods' stock."""
    return (store.list_orders(username), store.get_cart_lines(username),
            [stock_of(store, g) for g in gids])


def status_of(store: Any, order_id: str) -> str:
    order = store.get_order(order_id)
    assert order is not None
    return str(order.status)


def put_sale(store: Any, sid: str = "ks1", stock: int = 2, goods_id: str = "k1",
             shards: int = 1) -> Sale:
    sale = Sale(sid, goods_id, f"Sale {sid}", 990, stock, T0 - timedelta(hours=1),
                T0 + timedelta(hours=1))
    if shards == 1:
        store.put_sale(sale)
    else:
        store.put_sale(sale, shards=shards)
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


def fresh(store: Any, order_id: str) -> Order:
    """The order as the store has it now."""
    order = store.get_order(order_id)
    assert order is not None
    return order


def paid_order(store: Any, gid: str = "k1", price_fen: int = 1000, *, at: datetime = T0,
               username: str = "alice") -> Order:
    """A PAID order of one unit of a goods (put at `price_fen`), as the store has it;
    its trade number is T-<order id>."""
    goods = put_goods(store, gid, price_fen, 100)
    order = new_order(username, [line_of(goods, 1)], at=at)
    store.create_order(order, None)
    assert store.mark_paid(order.id, total_fen=price_fen, trade_no=f"T-{order.id}",
                           pay_time=at, notify_id=None, now=at)
    return fresh(store, order.id)


def new_refund(order: Order, n: int, amount_fen: int, *, at: datetime = T0,
               key: str | None = None) -> Refund:
    """The order's n-th refund, PENDING, as an operator asks for it."""
    return Refund(refund_id(order.id, n), order.id, amount_fen, f"reason {n}", PENDING,
                  "op1", at, idempotency_key=key)


def refund_as_stored(refund: Refund) -> Refund:
    return dataclasses.replace(
        refund, create_time=ms(refund.create_time),
        finish_time=ms(refund.finish_time) if refund.finish_time else None)


def reserved(store: Any, order_id: str, amount_fen: int, *, at: datetime = T0,
             key: str | None = None) -> Refund:
    """A refund reserved against the PAID order as it is now (its next number)."""
    order = fresh(store, order_id)
    refund = new_refund(order, order.refund_count + 1, amount_fen, at=at, key=key)
    assert store.reserve_refund(refund, order, expect_status=PAID) is True
    return refund


def settled(store: Any, refund: Refund, status: RefundStatus = SUCCEEDED, *,
            now: datetime = T0 + HOUR, **kwargs: Any) -> bool:
    """settle_refund against the order as it is now."""
    return bool(store.settle_refund(refund, fresh(store, refund.order_id), status=status,
                                    now=now, **kwargs))


def refund_state(store: Any, order_id: str, *refund_ids: str,
                 keys: tuple[str, ...] = ()) -> tuple[Any, ...]:
    """Everything a refund write may change, to compare before and after one that fails."""
    return (store.get_order(order_id), [store.get_refund(r) for r in refund_ids],
            store.refunds_of(order_id), store.open_refunds(),
            [store.refund_for_key(order_id, k) for k in keys])


def search_pages(store: Any, *, limit: int, status: str | None = None,
                 start: datetime | None = None, end: datetime | None = None,
                 ) -> list[list[Order]]:
    """Every page of a search, following the cursors to the end."""
    pages: list[list[Order]] = []
    cursor = None
    for _ in range(50):
        page, cursor = store.search_orders(status=status, start=start, end=end, limit=limit,
                                           cursor=cursor)
        pages.append(page)
        if cursor is None:
            return pages
    raise AssertionError(f"search_orders still gives cursors after 50 pages: {pages}")


def assert_pages(pages: list[list[Order]], expected: list[Order], limit: int) -> None:
    """The pages give each expected order once, in order; every page but the last is
    full. (A last page may be empty: DynamoDB may say "more" when a query stopped
    exactly at its limit.)"""
    assert [o.id for page in pages for o in page] == [o.id for o in expected]
    assert [o for page in pages for o in page] == expected
    assert all(len(page) == limit for page in pages[:-1]), [len(p) for p in pages]
    assert len(pages[-1]) <= limit
    assert len(pages) <= len(expected) // limit + 1


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


def refunded_late(store: Any, order_id: str, trade_no: str, now: datetime) -> None:
    """A CLOSED order's late payment refunded in full (the only way to REFUNDED from
    CLOSED): reserved and settled under REFUND_<orderId>."""
    order = store.get_order(order_id)
    refund = Refund(refund_request_no(order_id), order_id, order.total_fen, "paid after closing",
                    PENDING, SYSTEM_OPERATOR, now)
    assert store.reserve_refund(refund, order, expect_status=CLOSED) is True
    assert store.settle_refund(refund, store.get_order(order_id), status=SUCCEEDED, now=now,
                               trade_no=trade_no) is True


class StoreContract(ReconciliationContract, OutboxContract):
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

    def test_an_orders_total_is_read_alone_and_none_for_no_order(self, store: Any) -> None:
        a, b = put_goods(store, "k1", 1990, 10), put_goods(store, "k2", 5, 10)
        order = new_order("alice", [line_of(a, 2), line_of(b, 3)])
        store.create_order(order, None)
        assert store.get_order_total(order.id) == 2 * 1990 + 3 * 5
        assert store.get_order_total(new_order_id(T0)) is None

    def test_an_order_is_created_with_its_first_timeline_event_or_not_at_all(
            self, store: Any) -> None:
        a, b = put_goods(store, "k1", 1990, 10), put_goods(store, "k2", 5990, 1)
        order = order_from_cart(store, "alice", (a, 2))
        assert store.timeline(order.id) == [TimelineEvent(
            order.id, ms(order.create_time), EventType.CREATED,
            {"totalMoney": "39.80", "items": 1})]
        refused = new_order("bob", [line_of(b, 2)])
        with pytest.raises(OutOfStock):
            store.create_order(refused, None)
        assert store.timeline(refused.id) == []

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

    # --- the cap on UNPAID orders per user (create_order's max_unpaid) ------------------

    def test_one_order_over_the_cap_is_refused_and_changes_nothing(self, store: Any) -> None:
        a = put_goods(store, "k1", 1990, 10)
        first = capped_order(store, "alice", a, 2)
        capped_order(store, "alice", a, 2, num=2)
        store.set_cart_line("alice", "k1", 3, a)
        before = cart_order_state(store, "alice", "k1")
        order = new_order("alice", [line_of(a, 3)])
        with pytest.raises(TooManyUnpaidOrders) as info:
            store.create_order(order, {"k1": 3}, max_unpaid=2)
        assert isinstance(info.value, Conflict)
        assert info.value.limit == 2
        assert "2 unpaid orders" in info.value.message
        assert "pay or cancel" in info.value.message
        assert cart_order_state(store, "alice", "k1") == before
        assert store.get_order(order.id) is None
        assert stock_of(store, "k1") == 7
        assert store.get_cart("alice") == {"k1": 3}
        assert status_of(store, first.id) == UNPAID

    def test_paying_an_order_frees_a_place(self, store: Any) -> None:
        a = put_goods(store, "k1", 1000, 10)
        first = capped_order(store, "alice", a, 2)
        capped_order(store, "alice", a, 2)
        assert store.mark_paid(first.id, total_fen=1000, trade_no="T1", pay_time=T0,
                               notify_id=None, now=T0)
        third = capped_order(store, "alice", a, 2)
        assert status_of(store, third.id) == UNPAID
        with pytest.raises(TooManyUnpaidOrders):
            capped_order(store, "alice", a, 2)
        assert stock_of(store, "k1") == 7
        assert [o.status for o in store.list_orders("alice")].count(UNPAID) == 2

    def test_closing_an_order_frees_a_place_and_only_one(self, store: Any) -> None:
        a = put_goods(store, "k1", 1000, 10)
        first = capped_order(store, "alice", a, 2)
        capped_order(store, "alice", a, 2)
        assert store.close_order(first, now=T0) is True
        assert store.close_order(first, now=T0) is False  # closed once, freed once
        capped_order(store, "alice", a, 2)
        with pytest.raises(TooManyUnpaidOrders):
            capped_order(store, "alice", a, 2)
        assert stock_of(store, "k1") == 8

    def test_places_freed_by_several_exits_are_all_found(self, store: Any) -> None:
        a = put_goods(store, "k1", 1000, 20)
        held = [capped_order(store, "alice", a, 3) for _ in range(3)]
        assert store.mark_paid(held[0].id, total_fen=1000, trade_no="T1", pay_time=T0,
                               notify_id=None, now=T0)
        assert store.close_order(held[2], now=T0)
        for _ in range(2):  # both places, one after the other
            capped_order(store, "alice", a, 3)
        with pytest.raises(TooManyUnpaidOrders):
            capped_order(store, "alice", a, 3)
        assert [o.status for o in store.list_orders("alice")].count(UNPAID) == 3

    def test_the_cap_is_per_user_and_each_call_says_its_cap(self, store: Any) -> None:
        a = put_goods(store, "k1", 1000, 10)
        capped_order(store, "alice", a, 1)
        with pytest.raises(TooManyUnpaidOrders):
            capped_order(store, "alice", a, 1)
        capped_order(store, "bob", a, 1)  # alice's orders are not bob's
        capped_order(store, "alice", a, 2)  # a higher cap (a changed setting) lets one more
        with pytest.raises(TooManyUnpaidOrders) as info:
            capped_order(store, "alice", a, 2)
        assert info.value.limit == 2

    def test_orders_without_a_cap_and_flash_sale_orders_are_not_counted(
            self, store: Any) -> None:
        a = put_goods(store, "k1", 1990, 10)
        store.create_order(new_order("alice", [line_of(a, 1)]), None)  # no cap given
        sale = put_sale(store, "ks1", stock=1)
        ticket = claimed(store, "alice", "ks1")
        # A won ticket's order is never refused for the cap (its unit is taken already),
        # and does not take a place of the cart orders.
        assert store.create_seckill_order(sale_order(sale, "alice"), ticket) == TICKET_ORDERED
        capped_order(store, "alice", a, 1)
        with pytest.raises(TooManyUnpaidOrders):
            capped_order(store, "alice", a, 1)

    def test_a_changed_cart_is_reported_before_the_cap_and_the_cap_before_the_stock(
            self, store: Any) -> None:
        a = put_goods(store, "k1", 1990, 1)
        capped_order(store, "alice", a, 1)
        assert stock_of(store, "k1") == 0
        store.set_cart_line("alice", "k1", 5, a)
        with pytest.raises(Conflict) as info:
            store.create_order(new_order("alice", [line_of(a, 2)]), {"k1": 2}, max_unpaid=1)
        assert type(info.value) is Conflict
        with pytest.raises(TooManyUnpaidOrders):  # and out of stock too
            store.create_order(new_order("alice", [line_of(a, 5)]), {"k1": 5}, max_unpaid=1)
        assert store.get_cart("alice") == {"k1": 5}

    def test_a_cart_of_the_most_lines_fits_one_transaction_with_the_cap(
            self, store: Any) -> None:
        goods = [put_goods(store, f"k{i:02d}", 100, 5) for i in range(MAX_CART_LINES)]
        for g in goods:
            store.set_cart_line("alice", g.id, 1, g)
        order = new_order("alice", [line_of(g, 1) for g in goods])
        store.create_order(order, {g.id: 1 for g in goods}, max_unpaid=1)
        assert status_of(store, order.id) == UNPAID
        assert store.get_cart("alice") == {}

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

    def test_mark_paid_writes_its_notes_with_it_and_none_when_it_marks_nothing(
            self, store: Any) -> None:
        a = put_goods(store, "k1", 1990, 10)
        order = order_from_cart(store, "alice", (a, 1))
        at = T0 + timedelta(minutes=3)
        notes = [TimelineEvent(order.id, at, EventType.NOTIFY, {"verified": True}, "n1"),
                 TimelineEvent(order.id, at + timedelta(milliseconds=2), EventType.PAID,
                               {"tradeNo": "T1"})]
        kw = {"total_fen": 1990, "trade_no": "T1", "pay_time": at, "notify_id": "n1", "now": at}
        assert store.mark_paid(order.id, **kw, notes=notes) is True
        assert [e.type for e in store.timeline(order.id)][1:] == [EventType.NOTIFY,
                                                                  EventType.PAID]
        assert store.mark_paid(order.id, **kw, notes=[TimelineEvent(
            order.id, at, EventType.PAID, {"again": True})]) is False
        assert len(store.timeline(order.id)) == 3

    def test_close_order_writes_its_notes_with_it_and_none_when_it_closes_nothing(
            self, store: Any) -> None:
        a = put_goods(store, "k1", 1990, 10)
        order = order_from_cart(store, "alice", (a, 1))
        at = T0 + timedelta(minutes=35)
        notes = [TimelineEvent(order.id, at, EventType.QUERY, {"trade": None}),
                 TimelineEvent(order.id, at + timedelta(milliseconds=5), EventType.CLOSED,
                               {"stockReturned": 1})]
        assert store.close_order(order, now=at, notes=notes) is True
        kinds = [(e.type, e.detail) for e in store.timeline(order.id)]
        assert kinds[1:] == [(EventType.QUERY, {"trade": None}),
                             (EventType.CLOSED, {"stockReturned": 1})]
        again = [TimelineEvent(order.id, at + timedelta(seconds=1), EventType.QUERY, {})]
        assert store.close_order(order, now=at + timedelta(seconds=1), notes=again) is False
        assert len(store.timeline(order.id)) == 3

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
        refunded_late(store, refunded.id, "T2", T0)
        assert store.unpaid_due(T0 + timedelta(days=1)) == [unpaid.id]

    # --- what a new order keeps of refunds ---------------------------------------------

    def test_a_new_order_keeps_no_refund_sums_or_link_expiry_of_the_order_given(
            self, store: Any) -> None:
        a = put_goods(store, "k1", 1990, 10)
        order = dataclasses.replace(
            new_order("alice", [line_of(a, 1)]), refunded_fen=500, refund_reserved_fen=700,
            pending_refund_id="REFUND_x_1", refund_count=3, link_expire_time=T0)
        store.create_order(order, None)
        got = fresh(store, order.id)
        assert (got.refunded_fen, got.refund_reserved_fen, got.pending_refund_id,
                got.refund_count, got.link_expire_time) == (0, 0, None, 0, None)
        assert got == as_stored(order)

    # --- the recheck of orders closed before their payment link expired ---------------

    def test_closing_before_the_link_expires_marks_the_order_for_a_recheck(
            self, store: Any) -> None:
        a = put_goods(store, "k1", 1990, 10)
        order = order_from_cart(store, "alice", (a, 1))  # its link expires at T0 + 30 min
        link = ms(order.expire_time)
        assert store.close_order(order, now=T0 + timedelta(minutes=1)) is True
        got = fresh(store, order.id)
        assert (got.status, got.link_expire_time) == (CLOSED, link)
        assert store.recheck_due(link - timedelta(milliseconds=1)) == []
        assert store.recheck_due(link) == [order.id]
        assert store.recheck_due(order.expire_time) == [order.id]  # to the millisecond
        assert store.recheck_due(link + timedelta(days=1)) == [order.id]

    def test_closing_at_or_after_the_expire_time_marks_no_recheck(self, store: Any) -> None:
        a = put_goods(store, "k1", 1990, 10)
        on_time = order_from_cart(store, "alice", (a, 1))
        late = order_from_cart(store, "bob", (a, 1))
        assert store.close_order(on_time, now=on_time.expire_time) is True
        assert store.close_order(late, now=late.check_time) is True
        assert [fresh(store, o.id).link_expire_time for o in (on_time, late)] == [None, None]
        assert store.recheck_due(T0 + timedelta(days=1)) == []

    def test_a_refused_close_marks_no_recheck(self, store: Any) -> None:
        order = paid_order(store)
        assert store.close_order(order, now=T0) is False
        assert fresh(store, order.id).link_expire_time is None
        assert store.recheck_due(T0 + timedelta(days=1)) == []

    def test_recheck_due_oldest_link_first_up_to_now_with_a_limit(self, store: Any) -> None:
        a = put_goods(store, "k1", 1990, 100)
        orders = {m: order_from_cart(store, "alice", (a, 1), at=T0 + timedelta(minutes=m))
                  for m in (20, 0, 40, 10)}
        for order in orders.values():
            assert store.close_order(order, now=T0)  # links expire at 30, 40, 50, 70 min
        now = T0 + timedelta(minutes=60)
        assert store.recheck_due(now) == [orders[m].id for m in (0, 10, 20)]
        assert store.recheck_due(now, limit=2) == [orders[0].id, orders[10].id]
        assert store.recheck_due(T0) == []

    def test_clear_recheck_takes_the_order_off_the_list_and_keeps_it(self, store: Any) -> None:
        a = put_goods(store, "k1", 1990, 10)
        first = order_from_cart(store, "alice", (a, 1))
        second = order_from_cart(store, "bob", (a, 1), at=T0 + timedelta(seconds=1))
        for order in (first, second):
            assert store.close_order(order, now=T0)
        before = fresh(store, first.id)
        store.clear_recheck(first.id)
        store.clear_recheck(first.id)  # twice is no error
        later = T0 + timedelta(days=1)
        assert store.recheck_due(later) == [second.id]
        assert fresh(store, first.id) == before  # still CLOSED, its link_expire_time kept
        store.clear_recheck(second.id)
        assert store.recheck_due(later) == []

    # --- paid but closed ------------------------------------------------------------------

    def test_mark_paid_but_closed_lists_a_closed_order_with_its_trade(
            self, store: Any) -> None:
        a = put_goods(store, "k1", 1990, 10)
        order = order_from_cart(store, "alice", (a, 1))
        assert store.close_order(order, now=T0)
        later = T0 + timedelta(hours=1, microseconds=1234)
        assert store.mark_paid_but_closed(order.id, trade_no="T-late", now=later) is None
        got = fresh(store, order.id)
        assert (got.status, got.transaction_id, got.update_time) == (CLOSED, "T-late",
                                                                     ms(later))
        assert (got.close_time, got.refund_request_no) == (ms(T0), None)
        assert store.paid_but_closed() == [order.id]
        assert store.order_by_trade("T-late") == got

    def test_mark_paid_but_closed_of_an_order_not_closed_changes_nothing(
            self, store: Any) -> None:
        a = put_goods(store, "k1", 1990, 10)
        unpaid = order_from_cart(store, "alice", (a, 1))
        paid = paid_order(store, "k2")
        refunded = order_from_cart(store, "carol", (a, 1))
        assert store.close_order(refunded, now=T0)
        refunded_late(store, refunded.id, "T-r", T0)
        for order_id in (unpaid.id, paid.id, refunded.id):
            before = store.get_order(order_id)
            store.mark_paid_but_closed(order_id, trade_no="T-late", now=T0 + HOUR)
            assert store.get_order(order_id) == before
        unknown = new_order_id(T0)
        store.mark_paid_but_closed(unknown, trade_no="T-late", now=T0)
        assert store.get_order(unknown) is None
        assert store.paid_but_closed() == []
        assert store.order_by_trade("T-late") is None

    def test_paid_but_closed_oldest_mark_first_with_a_limit(self, store: Any) -> None:
        a = put_goods(store, "k1", 1990, 10)
        orders = {h: order_from_cart(store, f"user{h}", (a, 1)) for h in (3, 1, 2)}
        for h, order in orders.items():
            assert store.close_order(order, now=T0)
            store.mark_paid_but_closed(order.id, trade_no=f"T-{h}",
                                       now=T0 + timedelta(hours=h))
        assert store.paid_but_closed() == [orders[h].id for h in (1, 2, 3)]
        assert store.paid_but_closed(limit=2) == [orders[1].id, orders[2].id]

    # --- order_by_trade -------------------------------------------------------------------

    def test_order_by_trade_finds_a_paid_order_by_its_trade_number(self, store: Any) -> None:
        a = put_goods(store, "k1", 1990, 10)
        first = paid_order(store, "k2")
        second = paid_order(store, "k3", username="bob")
        unpaid = order_from_cart(store, "carol", (a, 1))
        assert store.order_by_trade(f"T-{first.id}") == first
        assert store.order_by_trade(f"T-{second.id}") == second
        assert store.order_by_trade("T-none") is None
        assert store.order_by_trade(unpaid.id) is None

    # --- search_orders --------------------------------------------------------------------

    def _seven_orders(self, store: Any) -> list[Order]:
        """Seven orders created a minute apart (put in shuffled order), in every status;
        newest first, as the store has them."""
        a = put_goods(store, "k1", 1990, 100)
        plan = [(3, PAID), (0, UNPAID), (6, CLOSED), (1, PAID), (5, REFUNDED), (2, CLOSED),
                (4, PAID)]
        ids = []
        for minute, status in plan:
            at = T0 + timedelta(minutes=minute)
            order = order_from_cart(store, f"user{minute}", (a, 1), at=at)
            if status == PAID:
                assert store.mark_paid(order.id, total_fen=1990, trade_no=f"T-{minute}",
                                       pay_time=at, notify_id=None, now=at)
            elif status in (CLOSED, REFUNDED):
                assert store.close_order(order, now=at + HOUR)
            if status == REFUNDED:
                refunded_late(store, order.id, f"T-{minute}", at + HOUR)
            ids.append(order.id)
        orders = [fresh(store, i) for i in ids]
        return sorted(orders, key=lambda o: o.create_time, reverse=True)

    def test_search_orders_pages_every_status_newest_first(self, store: Any) -> None:
        orders = self._seven_orders(store)
        assert [o.create_time.minute - T0.minute for o in orders] == [6, 5, 4, 3, 2, 1, 0]
        for limit in (3, 1, 2, 7):
            assert_pages(search_pages(store, limit=limit), orders, limit)
        assert store.search_orders(status=None, start=None, end=None, limit=10,
                                   cursor=None) == (orders, None)

    def test_search_orders_of_one_status(self, store: Any) -> None:
        orders = self._seven_orders(store)
        for status in OrderStatus:
            mine = [o for o in orders if o.status == status]
            for limit in (3, 2):
                assert_pages(search_pages(store, limit=limit, status=status.value), mine,
                             limit)
        assert [o.create_time.minute - T0.minute
                for o in search_pages(store, limit=10, status="PAID")[0]] == [4, 3, 1]

    def test_search_orders_within_from_and_to(self, store: Any) -> None:
        orders = self._seven_orders(store)  # minutes 6 .. 0
        at = {o.create_time.minute - T0.minute: o for o in orders}

        def minute(m: int) -> datetime:
            return T0 + timedelta(minutes=m)

        def within(low: int, high: int) -> list[Order]:
            return [at[m] for m in range(high, low - 1, -1)]

        assert_pages(search_pages(store, limit=3, start=minute(1), end=minute(5)),
                     within(1, 5), 3)
        assert_pages(search_pages(store, limit=3, start=minute(2)), within(2, 6), 3)
        assert_pages(search_pages(store, limit=3, end=minute(4)), within(0, 4), 3)
        assert_pages(search_pages(store, limit=2, status="PAID", start=minute(1),
                                  end=minute(3)), [at[3], at[1]], 2)
        # both bounds compare to the millisecond (T0 is at .678901 s), at either end
        same_ms = search_pages(store, limit=10, start=minute(1) + timedelta(microseconds=98),
                               end=minute(5) - timedelta(microseconds=901))
        assert_pages(same_ms, within(1, 5), 10)
        assert_pages(search_pages(store, limit=10, start=minute(1) + timedelta(milliseconds=1),
                                  end=minute(5) - timedelta(milliseconds=1)),
                     within(2, 4), 10)
        assert store.search_orders(status=None, start=minute(7), end=None, limit=3,
                                   cursor=None) == ([], None)
        assert store.search_orders(status="UNPAID", start=minute(1), end=minute(6), limit=3,
                                   cursor=None) == ([], None)

    def test_search_orders_created_at_one_time_come_by_id(self, store: Any) -> None:
        a = put_goods(store, "k1", 1990, 100)
        same = [order_from_cart(store, f"user{i}", (a, 1)) for i in range(5)]
        for order in same[:2]:
            assert store.mark_paid(order.id, total_fen=1990, trade_no=f"T-{order.id}",
                                   pay_time=T0, notify_id=None, now=T0)
        older = order_from_cart(store, "old", (a, 1), at=T0 - timedelta(milliseconds=1))
        expected = [fresh(store, o.id) for o in sorted(same, key=lambda o: o.id, reverse=True)]
        expected.append(fresh(store, older.id))
        for limit in (2, 3):
            assert_pages(search_pages(store, limit=limit), expected, limit)

    def test_a_cursor_the_store_did_not_give_is_invalid(self, store: Any) -> None:
        self._seven_orders(store)
        with pytest.raises(Invalid):
            store.search_orders(status=None, start=None, end=None, limit=3,
                                cursor="not a cursor")

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

    # --- a sale's stock in shards (chalicelib/seckill.py, "past one machine") ------------

    def test_a_sharded_sale_splits_its_stock_and_reads_it_summed(self, store: Any) -> None:
        before = [s for s in store.list_sales() if s.id != "ks1"]
        sale = Sale("ks1", "k1", "Sale ks1", 990, 10, T0 - timedelta(hours=1),
                    T0 + timedelta(hours=1))
        store.put_sale(sale, shards=4)
        whole = dataclasses.replace(sale, start_time=ms(sale.start_time),
                                    end_time=ms(sale.end_time))
        assert store.get_sale("ks1") == whole
        assert store.get_sale("ks1", consistent=True) == whole
        assert store.list_sales() == sorted(before + [whole], key=lambda s: s.id)
        head, stocks = store.sale_shard_stocks("ks1", consistent=True)
        assert stocks == [3, 3, 2, 2]
        assert (head.id, head.goods_id, head.price_fen) == ("ks1", "k1", 990)
        head, items = store.sale_stock_items("ks1", consistent=True)
        assert items == ["ks1#0", "ks1#1", "ks1#2", "ks1#3"]
        assert store.get_sale("ks1#2", consistent=True).stock == 2  # one shard's item
        assert store.sale_stock_items("ks-none") is None
        assert store.sale_shard_stocks("ks-none") is None
        # one shard: the sale's own item holds the stock, as before shards
        store.put_sale(dataclasses.replace(sale, stock=5))
        assert store.sale_stock_items("ks1", consistent=True)[1] == ["ks1"]
        assert store.sale_shard_stocks("ks1", consistent=True)[1] == [5]
        assert sale_stock(store, "ks1") == 5
        for bad in (0, 100):
            with pytest.raises(ValueError):
                store.put_sale(sale, shards=bad)

    def test_a_sharded_order_takes_its_unit_from_the_shard_it_names_and_gives_it_back(
            self, store: Any) -> None:
        put_goods(store, "k1", 1990, 10)
        sale = put_sale(store, "ks1", stock=4, shards=2)
        ticket = claimed(store, "alice", "ks1")
        order = dataclasses.replace(sale_order(sale, "alice"), sale_id="ks1#1")
        assert store.create_seckill_order(order, ticket) == TICKET_ORDERED
        assert store.get_order(order.id).sale_id == "ks1#1"  # the shard, for the return
        assert store.sale_shard_stocks("ks1", consistent=True)[1] == [2, 1]
        assert sale_stock(store, "ks1") == 3
        assert store.close_order(order, now=T0) is True
        assert store.close_order(order, now=T0) is False
        assert store.sale_shard_stocks("ks1", consistent=True)[1] == [2, 2]  # back to #1
        assert stock_of(store, "k1") == 10

    def test_a_dry_shard_is_sold_out_and_another_with_a_unit_orders(self, store: Any) -> None:
        sale = put_sale(store, "ks1", stock=1, shards=2)
        assert store.sale_shard_stocks("ks1", consistent=True)[1] == [1, 0]
        ticket = claimed(store, "alice", "ks1")
        dry = dataclasses.replace(sale_order(sale, "alice"), sale_id="ks1#1")
        assert store.create_seckill_order(dry, ticket) == TICKET_SOLD_OUT
        assert store.get_order(dry.id) is None
        assert ticket_of(store, ticket.id).status == TICKET_QUEUED
        # the sale's own item holds no units of a sharded sale
        head = dataclasses.replace(sale_order(sale, "alice"), sale_id="ks1")
        assert store.create_seckill_order(head, ticket) == TICKET_SOLD_OUT
        # the same order, from the shard that has the unit
        wet = dataclasses.replace(dry, sale_id="ks1#0")
        assert store.create_seckill_order(wet, ticket) == TICKET_ORDERED
        assert store.sale_shard_stocks("ks1", consistent=True)[1] == [0, 0]
        assert sale_stock(store, "ks1") == 0

    def test_one_order_per_user_and_sale_across_shards(self, store: Any) -> None:
        sale = put_sale(store, "ks1", stock=6, shards=3)
        first = claimed(store, "alice", "ks1")
        mine = dataclasses.replace(sale_order(sale, "alice"), sale_id="ks1#0")
        assert store.create_seckill_order(mine, first) == TICKET_ORDERED
        # bob's queued ticket passed as alice's, on another shard: her marker is per sale
        queued = dataclasses.replace(claimed(store, "bob", "ks1"), username="alice")
        other = dataclasses.replace(sale_order(sale, "alice", at=T0 + timedelta(seconds=1)),
                                    sale_id="ks1#2")
        assert store.create_seckill_order(other, queued) == TICKET_DUPLICATE
        assert store.get_order(other.id) is None
        assert store.sale_shard_stocks("ks1", consistent=True)[1] == [1, 2, 2]

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

    # --- reserve_refund -------------------------------------------------------------------

    def test_reserve_refund_writes_the_refund_pending_and_the_reservation(
            self, store: Any) -> None:
        order = paid_order(store)
        at = T0 + timedelta(hours=1, microseconds=2345)
        refund = new_refund(order, 1, 300, at=at, key="key-1")
        assert store.reserve_refund(refund, order, expect_status=PAID) is True
        stored = refund_as_stored(refund)
        assert store.get_refund(refund.id) == stored
        assert stored.create_time == ms(at) and stored.create_time.utcoffset() == timedelta(0)
        got = fresh(store, order.id)
        assert (got.status, got.pending_refund_id, got.refund_reserved_fen, got.refund_count,
                got.refunded_fen, got.update_time) == (PAID, refund.id, 300, 1, 0, ms(at))
        assert dataclasses.replace(got, pending_refund_id=None, refund_reserved_fen=0,
                                   refund_count=0, update_time=order.update_time) == order
        assert store.refunds_of(order.id) == [stored]
        assert store.open_refunds() == [stored]
        assert store.refund_for_key(order.id, "key-1") == stored
        assert store.get_refund(refund_id(order.id, 2)) is None
        assert store.refunds_of(new_order_id(T0)) == []

    def test_reserve_refund_needs_the_expected_status_and_writes_nothing_else(
            self, store: Any) -> None:
        a = put_goods(store, "k1", 1990, 10)
        unpaid = order_from_cart(store, "alice", (a, 1))
        closed = order_from_cart(store, "bob", (a, 1))
        assert store.close_order(closed, now=T0)
        paid = paid_order(store, "k2")
        for order, expect in ((fresh(store, unpaid.id), PAID), (fresh(store, closed.id), PAID),
                              (paid, CLOSED), (paid, UNPAID)):
            refund = new_refund(order, 1, 100, key="key-1")
            before = refund_state(store, order.id, refund.id, keys=("key-1",))
            assert store.reserve_refund(refund, order, expect_status=expect) is False
            assert refund_state(store, order.id, refund.id, keys=("key-1",)) == before
        ghost = dataclasses.replace(paid, id=new_order_id(T0))
        refund = new_refund(ghost, 1, 100)
        assert store.reserve_refund(refund, ghost, expect_status=PAID) is False
        assert (store.get_order(ghost.id), store.get_refund(refund.id)) == (None, None)
        # the refund of money that came after the order closed expects CLOSED
        late = fresh(store, closed.id)
        assert store.reserve_refund(new_refund(late, 1, 1990), late,
                                    expect_status=CLOSED) is True
        assert fresh(store, closed.id).refund_reserved_fen == 1990

    def test_one_pending_refund_per_order(self, store: Any) -> None:
        order = paid_order(store)
        first = reserved(store, order.id, 100)
        current = fresh(store, order.id)
        second = new_refund(current, 2, 100)
        before = refund_state(store, order.id, first.id, second.id)
        assert store.reserve_refund(second, current, expect_status=PAID) is False
        assert store.reserve_refund(new_refund(order, 3, 100), order,
                                    expect_status=PAID) is False  # read before the first
        assert refund_state(store, order.id, first.id, second.id) == before
        assert settled(store, first)
        assert reserved(store, order.id, 100).id == second.id

    def test_a_stale_reserved_sum_or_count_writes_nothing(self, store: Any) -> None:
        order = paid_order(store)
        first = reserved(store, order.id, 300)
        assert settled(store, first, FAILED)  # reserved back to 0, count stays 1
        current = fresh(store, order.id)
        assert (current.refund_reserved_fen, current.refund_count) == (0, 1)
        for stale in (order,  # count 0
                      dataclasses.replace(current, refund_reserved_fen=300),
                      dataclasses.replace(current, refund_reserved_fen=100),
                      dataclasses.replace(current, refund_count=2)):
            refund = new_refund(current, 2, 100, key="key-2")
            before = refund_state(store, order.id, first.id, refund.id, keys=("key-2",))
            assert store.reserve_refund(refund, stale, expect_status=PAID) is False
            assert refund_state(store, order.id, first.id, refund.id,
                                keys=("key-2",)) == before
        assert store.reserve_refund(new_refund(current, 2, 100, key="key-2"), current,
                                    expect_status=PAID) is True  # the key was not used up

    def test_an_existing_refund_id_is_refused_and_writes_nothing(self, store: Any) -> None:
        order = paid_order(store)
        first = reserved(store, order.id, 300)
        assert settled(store, first, FAILED, failure_code="X")
        current = fresh(store, order.id)
        again = new_refund(current, 1, 500, at=T0 + HOUR)  # refund 1 again
        assert again.id == first.id
        before = refund_state(store, order.id, first.id)
        assert store.reserve_refund(again, current, expect_status=PAID) is False
        assert refund_state(store, order.id, first.id) == before

    def test_a_used_idempotency_key_is_refused_and_names_the_first_refund(
            self, store: Any) -> None:
        order = paid_order(store)
        first = reserved(store, order.id, 300, key="key-1")
        assert settled(store, first)
        current = fresh(store, order.id)
        second = new_refund(current, 2, 300, at=T0 + HOUR, key="key-1")
        before = refund_state(store, order.id, first.id, second.id, keys=("key-1",))
        assert store.reserve_refund(second, current, expect_status=PAID) is False
        assert refund_state(store, order.id, first.id, second.id, keys=("key-1",)) == before
        earlier = store.refund_for_key(order.id, "key-1")
        assert earlier == store.get_refund(first.id)
        assert (earlier.id, earlier.status) == (first.id, SUCCEEDED)
        assert store.refund_for_key(order.id, "key-2") is None
        # the same key on another order is that order's own
        other = paid_order(store, "k2", username="bob")
        theirs = reserved(store, other.id, 100, key="key-1")
        assert store.refund_for_key(other.id, "key-1") == refund_as_stored(theirs)
        assert store.refund_for_key(order.id, "key-1") == earlier
        # another key on the first order is free
        third = new_refund(current, 2, 300, key="key-2")
        assert store.reserve_refund(third, current, expect_status=PAID) is True
        assert store.refund_for_key(order.id, "key-2") == refund_as_stored(third)

    # --- settle_refund --------------------------------------------------------------------

    def test_settle_succeeded_adds_to_the_refunded_sum_refunded_exactly_at_the_total(
            self, store: Any) -> None:
        order = paid_order(store)  # 10.00
        done = 0
        for n, amount in enumerate((300, 699), 1):
            refund = reserved(store, order.id, amount, at=T0 + timedelta(hours=n))
            now = T0 + timedelta(hours=n, minutes=1, microseconds=n * 1111)
            assert settled(store, refund, SUCCEEDED, now=now,
                           trade_no="T-ignored") is True  # not the whole: no trade kept
            done += amount
            got = fresh(store, order.id)
            assert (got.status, got.refunded_fen, got.refund_reserved_fen,
                    got.pending_refund_id, got.refund_count) == (PAID, done, done, None, n)
            assert (got.update_time, got.end_time) == (ms(now), None)
            assert (got.transaction_id, got.refund_request_no) == (order.transaction_id, None)
            assert store.get_refund(refund.id) == dataclasses.replace(
                refund_as_stored(refund), status=SUCCEEDED, finish_time=ms(now))
        assert store.open_refunds() == []
        last = reserved(store, order.id, 1, at=T0 + timedelta(hours=5))
        end = T0 + timedelta(hours=6, microseconds=4321)
        assert settled(store, last, now=end) is True
        got = fresh(store, order.id)
        assert (got.status, got.refunded_fen, got.refund_reserved_fen, got.refund_count,
                got.pending_refund_id) == (REFUNDED, 1000, 1000, 3, None)
        assert (got.end_time, got.update_time, got.pay_time) == (ms(end), ms(end), ms(T0))
        assert (got.transaction_id, got.refund_request_no) == (order.transaction_id, None)
        assert [(r.amount_fen, r.status) for r in store.refunds_of(order.id)] == [
            (300, SUCCEEDED), (699, SUCCEEDED), (1, SUCCEEDED)]

    def test_settling_the_refund_of_money_that_came_after_the_order_closed(
            self, store: Any) -> None:
        a = put_goods(store, "k1", 1990, 10)
        marked = order_from_cart(store, "alice", (a, 1))
        plain = order_from_cart(store, "bob", (a, 1))
        for order in (marked, plain):
            assert store.close_order(order, now=T0 + timedelta(minutes=1))  # recheck due
        store.mark_paid_but_closed(marked.id, trade_no="T-late", now=T0 + HOUR)
        end = T0 + timedelta(hours=2, microseconds=999)
        for order, trade in ((marked, "T-late"), (plain, "T-plain")):
            refund = Refund(refund_request_no(order.id), order.id, 1990, "paid after closing",
                            PENDING, SYSTEM_OPERATOR, T0 + HOUR)
            assert store.reserve_refund(refund, fresh(store, order.id),
                                        expect_status=CLOSED) is True
            assert settled(store, refund, SUCCEEDED, now=end, trade_no=trade) is True
            got = fresh(store, order.id)
            assert (got.status, got.refunded_fen, got.transaction_id,
                    got.refund_request_no) == (REFUNDED, 1990, trade, refund.id)
            assert (got.end_time, got.close_time) == (ms(end), ms(T0 + timedelta(minutes=1)))
            assert got.link_expire_time == ms(order.expire_time)
            assert store.order_by_trade(trade) == got
        assert store.paid_but_closed() == []
        assert store.recheck_due(T0 + timedelta(days=1)) == []

    def test_settle_failed_gives_the_reservation_back_and_keeps_the_reason(
            self, store: Any) -> None:
        order = paid_order(store)
        refund = reserved(store, order.id, 400, at=T0 + HOUR)
        now = T0 + timedelta(hours=2, microseconds=5555)
        assert settled(store, refund, FAILED, now=now, failure_code="ACQ.TRADE_HAS_FINISHED",
                       failure_message="the trade has finished") is True
        got = fresh(store, order.id)
        assert (got.status, got.refunded_fen, got.refund_reserved_fen, got.pending_refund_id,
                got.refund_count, got.update_time) == (PAID, 0, 0, None, 1, ms(now))
        failed = store.get_refund(refund.id)
        assert failed == dataclasses.replace(
            refund_as_stored(refund), status=FAILED, finish_time=ms(now),
            failure_code="ACQ.TRADE_HAS_FINISHED", failure_message="the trade has finished")
        assert store.open_refunds() == [failed]
        # no code or message given; a message longer than 500 characters
        second = reserved(store, order.id, 1000, at=T0 + timedelta(hours=3))
        assert settled(store, second, FAILED, now=T0 + timedelta(hours=3)) is True
        third = reserved(store, order.id, 500, at=T0 + timedelta(hours=4))
        assert settled(store, third, FAILED, now=T0 + timedelta(hours=4), failure_code="X",
                       failure_message="x" * 600) is True
        assert [(r.failure_code, r.failure_message) for r in store.open_refunds()] == [
            ("ACQ.TRADE_HAS_FINISHED", "the trade has finished"), ("UNKNOWN", ""),
            ("X", "x" * 500)]
        assert fresh(store, order.id).refund_reserved_fen == 0

    def test_settle_of_a_refund_not_pending_is_false_and_writes_nothing(
            self, store: Any) -> None:
        order = paid_order(store)
        done = reserved(store, order.id, 300, at=T0 + HOUR)
        assert settled(store, done)
        failed = reserved(store, order.id, 200, at=T0 + 2 * HOUR)
        assert settled(store, failed, FAILED)
        for refund in (done, failed):
            for status in (SUCCEEDED, FAILED):
                before = refund_state(store, order.id, done.id, failed.id)
                assert settled(store, refund, status, now=T0 + 9 * HOUR) is False
                assert refund_state(store, order.id, done.id, failed.id) == before
        ghost = new_refund(order, 9, 100)
        assert settled(store, ghost) is False
        assert store.get_refund(ghost.id) is None

    def test_settle_against_a_stale_refunded_sum_is_false_and_writes_nothing(
            self, store: Any) -> None:
        order = paid_order(store)
        refund = reserved(store, order.id, 300)
        current = fresh(store, order.id)
        stale = dataclasses.replace(current, refunded_fen=100)
        before = refund_state(store, order.id, refund.id)
        for status in (SUCCEEDED, FAILED):
            assert store.settle_refund(refund, stale, status=status, now=T0 + HOUR) is False
        assert refund_state(store, order.id, refund.id) == before
        assert store.settle_refund(refund, current, status=SUCCEEDED, now=T0 + HOUR) is True

    # --- retry_refund ---------------------------------------------------------------------

    def test_retry_makes_a_failed_refund_pending_again_with_its_reservation(
            self, store: Any) -> None:
        order = paid_order(store)
        refund = reserved(store, order.id, 400, at=T0 + HOUR, key="key-1")
        assert settled(store, refund, FAILED, now=T0 + 2 * HOUR, failure_code="X",
                       failure_message="no")
        now = T0 + timedelta(hours=3, microseconds=7777)
        assert store.retry_refund(refund, fresh(store, order.id), now=now) is True
        again = store.get_refund(refund.id)
        assert again == dataclasses.replace(refund_as_stored(refund), create_time=ms(now))
        assert (again.status, again.finish_time, again.failure_code) == (PENDING, None, None)
        got = fresh(store, order.id)
        assert (got.pending_refund_id, got.refund_reserved_fen, got.refund_count,
                got.refunded_fen, got.update_time) == (refund.id, 400, 1, 0, ms(now))
        assert store.open_refunds() == [again]
        assert store.refund_for_key(order.id, "key-1") == again
        assert settled(store, refund, now=T0 + 4 * HOUR) is True
        assert fresh(store, order.id).refunded_fen == 400

    def test_retry_only_of_a_failed_refund_against_the_order_as_it_is(
            self, store: Any) -> None:
        order = paid_order(store)
        failed = reserved(store, order.id, 300, at=T0 + HOUR)
        assert settled(store, failed, FAILED)
        pending = reserved(store, order.id, 200, at=T0 + 2 * HOUR)
        ids = (failed.id, pending.id)
        before = refund_state(store, order.id, *ids)
        for refund in (failed, pending):  # while a refund is pending; a PENDING refund
            assert store.retry_refund(refund, fresh(store, order.id),
                                      now=T0 + 9 * HOUR) is False
        assert refund_state(store, order.id, *ids) == before
        assert settled(store, pending)
        current = fresh(store, order.id)
        before = refund_state(store, order.id, *ids)
        for refund, read in ((pending, current),  # SUCCEEDED
                             (failed, dataclasses.replace(current, refund_reserved_fen=0)),
                             (failed, dataclasses.replace(current, status=CLOSED)),
                             (new_refund(order, 9, 100), current)):  # no such refund
            assert store.retry_refund(refund, read, now=T0 + 9 * HOUR) is False
        assert refund_state(store, order.id, *ids) == before
        assert store.get_refund(refund_id(order.id, 9)) is None
        assert store.retry_refund(failed, current, now=T0 + 9 * HOUR) is True
        assert fresh(store, order.id).refund_reserved_fen == 500

    # --- listing refunds ------------------------------------------------------------------

    def test_open_refunds_hold_pending_and_failed_oldest_first_with_a_limit(
            self, store: Any) -> None:
        a, b, c = (paid_order(store, gid, username=gid) for gid in ("k1", "k2", "k3"))
        fa = reserved(store, a.id, 100, at=T0 + HOUR)
        assert settled(store, fa, FAILED)
        sa = reserved(store, a.id, 100, at=T0 + 2 * HOUR)
        assert settled(store, sa)
        pb = reserved(store, b.id, 100, at=T0 + 3 * HOUR)
        fc = reserved(store, c.id, 100, at=T0 + timedelta(minutes=30))
        assert settled(store, fc, FAILED)
        assert [r.id for r in store.open_refunds()] == [fc.id, fa.id, pb.id]
        assert [r.status for r in store.open_refunds()] == [FAILED, FAILED, PENDING]
        assert [r.id for r in store.open_refunds(limit=2)] == [fc.id, fa.id]
        assert store.retry_refund(fc, fresh(store, c.id), now=T0 + 4 * HOUR)
        assert [r.id for r in store.open_refunds()] == [fa.id, pb.id, fc.id]

    def test_refunds_of_holds_the_orders_refunds_oldest_first(self, store: Any) -> None:
        a = paid_order(store, "k1")
        b = paid_order(store, "k2", username="bob")
        first = reserved(store, a.id, 100, at=T0 + 2 * HOUR, key="key-a")
        assert settled(store, first)
        second = reserved(store, a.id, 200, at=T0 + 3 * HOUR)
        theirs = reserved(store, b.id, 100, at=T0 + HOUR, key="key-b")
        assert store.refunds_of(a.id) == [store.get_refund(first.id),
                                          refund_as_stored(second)]
        assert store.refunds_of(b.id) == [refund_as_stored(theirs)]

    # --- the timeline ---------------------------------------------------------------------

    def test_timeline_in_time_order_per_order_with_a_limit(self, store: Any) -> None:
        order_id, other = new_order_id(T0), new_order_id(T0)
        events = [TimelineEvent(order_id, T0 + timedelta(seconds=s, microseconds=s * 1001),
                                kind, {"s": s})
                  for s, kind in ((5, EventType.PAID), (0, EventType.CREATED),
                                  (3, EventType.PAYMENT_LINK), (9, EventType.REFUND_REQUESTED))]
        for event in events:
            store.append_event(event)
        store.append_event(TimelineEvent(other, T0, EventType.CREATED, {}))
        want = [dataclasses.replace(e, time=ms(e.time))
                for e in sorted(events, key=lambda e: e.time)]
        got = store.timeline(order_id)
        assert got == want
        assert got[0].time.utcoffset() == timedelta(0)
        assert store.timeline(order_id, limit=2) == want[:2]
        assert store.timeline(other) == [TimelineEvent(other, ms(T0), EventType.CREATED, {})]
        assert store.timeline(new_order_id(T0)) == []

    def test_events_of_one_millisecond_are_all_kept(self, store: Any) -> None:
        order_id = new_order_id(T0)
        store.append_event(TimelineEvent(order_id, T0 + timedelta(milliseconds=1),
                                         EventType.PAID, {"i": 9}))
        for i in range(4):  # .678000 .. .678300: one millisecond
            store.append_event(TimelineEvent(order_id, T0.replace(microsecond=678000 + i * 100),
                                             EventType.NOTIFY, {"i": i}))
        store.append_event(TimelineEvent(order_id, T0 - timedelta(milliseconds=1),
                                         EventType.CREATED, {"i": -1}))
        got = store.timeline(order_id)
        assert [e.detail["i"] for e in got[:1] + got[-1:]] == [-1, 9]
        middle = got[1:-1]  # in any order among themselves
        assert sorted(e.detail["i"] for e in middle) == [0, 1, 2, 3]
        assert {(e.time, e.type) for e in middle} == {(ms(T0), EventType.NOTIFY)}

    def test_an_event_written_again_with_its_ref_is_kept_once(self, store: Any) -> None:
        order_id = new_order_id(T0)
        store.append_event(TimelineEvent(order_id, T0, EventType.NOTIFY, {"n": 1}, "ab12cd34"))
        store.append_event(TimelineEvent(order_id, T0, EventType.NOTIFY, {"n": 1}, "ab12cd34"))
        store.append_event(TimelineEvent(order_id, T0, EventType.NOTIFY, {"n": 2}, "ef56ab78"))
        store.append_event(TimelineEvent(order_id, T0, EventType.NOTIFY, {"n": 3}))
        store.append_event(TimelineEvent(order_id, T0, EventType.NOTIFY, {"n": 3}))
        assert sorted(e.detail["n"] for e in store.timeline(order_id)) == [1, 2, 3, 3]

    def test_an_events_detail_comes_back_as_json_and_as_a_copy(self, store: Any) -> None:
        order_id = new_order_id(T0)
        detail: dict[str, Any] = {"amount": "1.00", "n": 3, "ok": True, "none": None,
                                  "pair": (1, "a"), "when": T0, "nested": {"a": [1]},
                                  "名": "退款"}
        store.append_event(TimelineEvent(order_id, T0, EventType.NOTIFY, detail))
        detail["n"] = 4
        detail["nested"]["a"].append(2)
        got = store.timeline(order_id)[0]
        assert got.detail == {"amount": "1.00", "n": 3, "ok": True, "none": None,
                              "pair": [1, "a"], "when": str(T0), "nested": {"a": [1]},
                              "名": "退款"}
        got.detail["n"] = 99
        got.detail["nested"]["a"].clear()
        assert store.timeline(order_id)[0].detail["nested"] == {"a": [1]}
        assert store.timeline(order_id)[0].detail["n"] == 3

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

    def test_concurrent_refunds_never_reserve_more_than_was_paid(self, store: Any) -> None:
        for n in range(self.race_rounds):
            self._refund_race(store, f"k-race{n}")

    def _refund_race(self, store: Any, gid: str) -> None:
        """20 threads each refund 1.00 of a 10.00 order, each time against a fresh read,
        as chalicelib/refunds.py does: ten get theirs, ten find nothing left."""
        order = paid_order(store, gid, 1000)
        threads, unit = 20, 100
        start = threading.Barrier(threads)
        lock = threading.Lock()
        seen = {"holding": 0, "most_holding": 0, "most_reserved": 0}
        results: dict[int, str] = {}

        def refund_once(n: int) -> str:
            for _ in range(5000):
                current = fresh(store, order.id)
                with lock:
                    seen["most_reserved"] = max(seen["most_reserved"],
                                                current.refund_reserved_fen)
                if (current.status != PAID
                        or current.refund_reserved_fen + unit > current.total_fen):
                    return "nothing left"
                if current.pending_refund_id:
                    time.sleep(0.002)
                    continue
                refund = Refund(refund_id(order.id, current.refund_count + 1), order.id, unit,
                                f"thread {n}", PENDING, f"op{n}",
                                T0 + timedelta(milliseconds=n))
                if not store.reserve_refund(refund, current, expect_status=PAID):
                    continue
                with lock:
                    seen["holding"] += 1
                    seen["most_holding"] = max(seen["most_holding"], seen["holding"])
                mine = fresh(store, order.id)
                with lock:
                    seen["holding"] -= 1
                if mine.pending_refund_id != refund.id:
                    return f"pending is {mine.pending_refund_id}, not {refund.id}"
                if not store.settle_refund(refund, mine, status=SUCCEEDED, now=T0 + HOUR):
                    return "settle refused"
                return "refunded"
            return "gave up"

        def run(n: int) -> None:
            start.wait()
            try:
                results[n] = refund_once(n)
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                results[n] = repr(exc)

        workers = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
        with eager_thread_switches():
            for t in workers:
                t.start()
            for t in workers:
                t.join(120)
        assert sorted(results.values()) == ["nothing left"] * 10 + ["refunded"] * 10, results
        assert (seen["most_holding"], seen["most_reserved"]) == (1, 1000), seen
        got = fresh(store, order.id)
        assert (got.status, got.refunded_fen, got.refund_reserved_fen, got.refund_count,
                got.pending_refund_id) == (REFUNDED, 1000, 1000, 10, None)
        refunds = store.refunds_of(order.id)
        assert [r.status for r in refunds] == [SUCCEEDED] * 10
        assert sorted(r.operator for r in refunds) == sorted(
            f"op{n}" for n, outcome in results.items() if outcome == "refunded")
        assert sorted(r.id for r in refunds) == sorted(
            refund_id(order.id, i) for i in range(1, 11))

    def test_concurrent_orders_of_one_user_never_pass_the_cap(self, store: Any) -> None:
        for n in range(self.race_rounds):
            self._cap_race(store, f"k-cap{n}", f"hoarder{n}")

    def _cap_race(self, store: Any, gid: str, user: str) -> None:
        """Cap 3: of the user's 3 orders 2 are paid or closed (their places free, their
        ids still in the set), then 10 threads order at once: 2 get theirs."""
        a = put_goods(store, gid, 1000, 100)
        held = [capped_order(store, user, a, 3) for _ in range(3)]
        assert store.mark_paid(held[0].id, total_fen=1000, trade_no=f"T-{held[0].id}",
                               pay_time=T0, notify_id=None, now=T0)
        assert store.close_order(held[1], now=T0)
        threads = 10
        start = threading.Barrier(threads)
        results: dict[int, str] = {}

        def buy(n: int) -> None:
            start.wait()
            try:  # no cart: the threads race on the cap alone
                store.create_order(new_order(user, [line_of(a, 1)]), None, max_unpaid=3)
                results[n] = "ordered"
            except TooManyUnpaidOrders:
                results[n] = "too many"
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                results[n] = repr(exc)

        workers = [threading.Thread(target=buy, args=(n,)) for n in range(threads)]
        with eager_thread_switches():
            for t in workers:
                t.start()
            for t in workers:
                t.join(120)
        assert sorted(results.values()) == ["ordered"] * 2 + ["too many"] * 8, results
        unpaid = [o for o in store.list_orders(user) if o.status == UNPAID]
        assert len(unpaid) == 3
        assert stock_of(store, gid) == 100 - 4  # the paid, the still UNPAID, the 2 new
