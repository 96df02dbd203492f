"""One user, many orders at once: the cap on UNPAID orders (MAX_UNPAID_ORDERS_PER_USER)
is a condition of the create transaction on moto, so threads racing each other
never get the user past it, and paid or closed orders free their places."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

from chalicelib import handlers
from chalicelib.domain import (
    UNPAID,
    Conflict,
    Goods,
    Invalid,
    TooManyUnpaidOrders,
)

THREADS = 8
ATTEMPTS = 40  # per thread and round: enough to meet the cap through cart conflicts


def _race(app_deps: Any, user: str) -> dict[str, list[str]]:
    """THREADS threads of `user`, each refilling the cart with one unit of its own goods
    and ordering, until it is refused for the cap. The cart is the user's one cart, so
    threads also take each other's lines (their own order then finds the cart changed,
    or empty): the cap must hold whatever the interleaving. Returns outcome -> ids
    (order ids for "ordered")."""
    store = app_deps.store
    start = threading.Barrier(THREADS)
    lock = threading.Lock()
    outcomes: dict[str, list[str]] = {}

    def note(kind: str, what: str) -> None:
        with lock:
            outcomes.setdefault(kind, []).append(what)

    def hoard(n: int) -> None:
        goods = store.get_goods([f"cap-{n}"])[f"cap-{n}"]
        start.wait()
        for _ in range(ATTEMPTS):
            store.set_cart_line(user, goods.id, 1, goods)  # the cart refilled
            try:
                note("ordered", handlers.create_order(app_deps, user)["id"])
            except TooManyUnpaidOrders:
                note("too many", str(n))
                return
            except (Conflict, Invalid) as exc:  # a cart another thread took meanwhile
                note("cart taken", type(exc).__name__)
            except Exception as exc:  # noqa: BLE001 - any other outcome fails the test
                note("error", f"{type(exc).__name__}: {exc}")
                return
        note("never refused", str(n))

    threads = [threading.Thread(target=hoard, args=(n,)) for n in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return outcomes


def _unpaid(store: Any, order_ids: list[str]) -> list[str]:
    """Of these orders, those UNPAID now (consistent reads, not the user index)."""
    return [i for i in order_ids if store.get_order(i).status == UNPAID]


def test_threads_of_one_user_never_hold_more_than_the_cap(app_deps: Any) -> None:
    store = app_deps.store
    cap = app_deps.settings.max_unpaid_orders_per_user
    assert cap == 5
    for n in range(THREADS):
        store.put_goods(Goods(f"cap-{n}", f"Cup {n}", 1000, 1000))
    user = "hoarder"

    first = _race(app_deps, user)
    assert "error" not in first and "never refused" not in first, first
    assert len(first["too many"]) == THREADS  # every thread met the cap ...
    ordered = first["ordered"]
    assert len(ordered) == cap, first  # ... after exactly `cap` orders in all
    assert _unpaid(store, ordered) == ordered
    units = sum(1000 - g.stock for g in store.get_goods([f"cap-{n}" for n in range(THREADS)]
                                                        ).values())
    # An order takes every line in the cart when it read it (other threads' too); the
    # refused ones took no stock.
    assert units == sum(line.num for i in ordered for line in store.get_order(i).lines)

    # Two paid, one closed: three places free, found by the next race.
    now = app_deps.clock()
    for order_id in ordered[:2]:
        order = store.get_order(order_id)
        assert store.mark_paid(order_id, total_fen=order.total_fen, trade_no=f"T-{order_id}",
                               pay_time=now, notify_id=None, now=now)
    assert store.close_order(store.get_order(ordered[2]), now=now + timedelta(hours=1))

    second = _race(app_deps, user)
    assert "error" not in second and "never refused" not in second, second
    assert len(second["ordered"]) == 3, second
    assert len(_unpaid(store, ordered + second["ordered"])) == cap
    listed = [o for o in store.list_orders(user) if o.status == UNPAID]
    assert len(listed) <= cap  # what the user sees (the index may lag, never exceed)
