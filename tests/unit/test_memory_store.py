"""The store's contract (tests/store_contract.py) on the in-memory store, and its
test hook. No moto, no network."""

from __future__ import annotations

import pytest

from chalicelib.domain import Goods, Unavailable
from chalicelib.memstore import InMemoryStore
from tests.store_contract import (
    PAID,
    T0,
    StoreContract,
    new_refund,
    paid_order,
    refund_state,
)


class TestInMemoryStore(StoreContract):
    race_rounds = 30

    @pytest.fixture
    def store(self) -> InMemoryStore:
        return InMemoryStore()


def test_fail_next_fails_the_next_operations_and_changes_nothing() -> None:
    store = InMemoryStore()
    store.put_goods(Goods("k1", "Cup", 1990, 5))
    store.fail_next(2)
    with pytest.raises(Unavailable):
        store.put_goods(Goods("k1", "Cup", 1990, 0))
    with pytest.raises(Unavailable):
        store.ping()
    assert store.get_goods(["k1"])["k1"].stock == 5
    store.ping()


def test_fail_next_only_some_operations() -> None:
    store = InMemoryStore()
    store.fail_next(1, only={"close_order", "mark_paid"})
    store.put_goods(Goods("k1", "Cup", 1990, 5))  # not counted
    with pytest.raises(Unavailable):
        store.mark_paid("ORDER_x", total_fen=1, trade_no="T", pay_time=T0, notify_id=None,
                        now=T0)
    assert store.mark_paid("ORDER_x", total_fen=1, trade_no="T", pay_time=T0,
                           notify_id=None, now=T0) is False


def test_fail_next_zero_ends_it() -> None:
    store = InMemoryStore()
    store.fail_next(100)
    store.fail_next(0)
    store.create_tables()
    store.warm()
    store.ping()


def test_fail_next_on_a_refund_write_writes_nothing() -> None:
    store = InMemoryStore()
    order = paid_order(store)
    refund = new_refund(order, 1, 300, key="key-1")
    before = refund_state(store, order.id, refund.id, keys=("key-1",))
    store.fail_next(1, only={"reserve_refund"})
    with pytest.raises(Unavailable):
        store.reserve_refund(refund, order, expect_status=PAID)
    assert refund_state(store, order.id, refund.id, keys=("key-1",)) == before
    assert store.reserve_refund(refund, order, expect_status=PAID) is True
