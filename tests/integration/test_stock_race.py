"""Many buyers, little stock: the stock condition in the transaction is the only guard."""

from __future__ import annotations

import threading
from typing import Any

from chalicelib import handlers
from chalicelib.domain import Goods, OutOfStock


def test_40_concurrent_buyers_for_5_units(app_deps: Any) -> None:
    store = app_deps.store
    store.put_goods(Goods("hot", "Limited teapot", 19900, 5))
    buyers = [f"buyer{i:02d}" for i in range(40)]
    for b in buyers:
        store.set_cart_line(b, "hot", 1)
    start = threading.Barrier(len(buyers))
    results: dict[str, str] = {}

    def buy(user: str) -> None:
        start.wait()
        try:
            handlers.create_order(app_deps, user)
            results[user] = "ordered"
        except OutOfStock:
            results[user] = "out of stock"
        except Exception as exc:  # noqa: BLE001 - any other outcome fails the test below
            results[user] = f"error {type(exc).__name__}: {exc}"

    threads = [threading.Thread(target=buy, args=(b,)) for b in buyers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)

    assert sorted(set(results.values())) == ["ordered", "out of stock"], results
    winners = [u for u, r in results.items() if r == "ordered"]
    assert len(winners) == 5
    assert store.get_goods(["hot"])["hot"].stock == 0
    orders = [o for b in buyers for o in store.list_orders(b)]
    assert len(orders) == 5 and {o.username for o in orders} == set(winners)
    # the losers keep their carts; the winners' carts are empty
    assert all(store.get_cart(u) == ({} if u in winners else {"hot": 1}) for u in buyers)
