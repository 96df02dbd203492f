"""local/dynamodb.py's fast answers are moto's answers: the tests' server compares
them with moto's for every new shape of answer (tests/conftest.py fails the session
on any difference); here every answer of a workload of each item operation the store
uses is compared."""

from __future__ import annotations

import dataclasses

import pytest

from chalicelib import handlers
from chalicelib.handlers import Deps
from chalicelib.orders import CLOSED, OutOfStock
from local.dynamodb import FAST_ANSWERS


def test_fast_answers_equal_motos_on_every_item_operation(
    app_deps: Deps, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(FAST_ANSWERS, "every", 1)  # compare every answer, not only new shapes
    d, user = app_deps, "fast-answers"
    before = FAST_ANSWERS.compared
    goods = d.store.list_goods()  # Scan
    d.store.set_cart_line(user, goods[0].id, 2)  # UpdateItem
    d.store.set_cart_line(user, goods[1].id, 1)
    assert len(d.store.get_cart_lines(user)) == 2  # Query
    order = handlers.create_order(d, user)  # TransactWriteItems
    assert d.store.get_order(order["id"]) is not None  # GetItem
    assert d.store.get_order("ORDER_0000000000000_0000000000000000") is None  # no Item
    assert [o.id for o in d.store.list_orders(user)] == [order["id"]]  # a GSI Query
    assert handlers.cancel_order(d, user, order["id"])["status"] == CLOSED
    d.store.set_cart_line(user, goods[0].id, 99)
    d.store.put_goods(dataclasses.replace(goods[0], stock=1))  # PutItem
    with pytest.raises(OutOfStock):  # a cancelled transaction: moto's error answer
        handlers.create_order(d, user)
    d.store.delete_cart_line(user, goods[0].id)  # DeleteItem
    assert FAST_ANSWERS.check
    assert FAST_ANSWERS.compared - before >= 10
    assert not FAST_ANSWERS.differences, FAST_ANSWERS.differences[:3]
