"""50 users each trying to hold stock with concurrent orders: no user above the cap.

Each user fires POST /orders from several threads at once over HTTP, the cart
refilled before each, until every thread is refused with 409
TooManyUnpaidOrders (the cap, MAX_UNPAID_ORDERS_PER_USER, default 5). Then the
user pays one order through the Alipay sandbox (notify, queue, bridge) and
cancels another, and hammers again: exactly the two freed places are taken.
Meanwhile other users do the same. At the end every UNPAID order is checked
(the bridge closes it, Alipay knowing no payment) and the audit runs.

What counts, besides the audit's lost / double / invariant (a refused order that
took stock would break the stock invariant):

- a violation: a user holding more than the cap, at the end of a wave (when
  nothing of the user's is in flight: read with consistent reads) or at any
  moment of the run (the orders' create and exit times, laid side by side); a
  wave that ends with another number of new orders than the places that were
  free (the cap is not to refuse what it should let through either); a refusal
  that does not say the cap;
- lost: a thread never refused within its attempts (the cap not reached).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from chalicelib.domain import CLOSED, PAID, UNPAID, Order
from tests.reliability.harness import SCOREBOARD, Row, Stack, all_orders, audit, settle
from tests.waiting import wait_until

pytestmark = pytest.mark.rabbitmq

CAP = 5  # the contract's default, which the stack runs with
THREADS = 3  # concurrent POST /orders per user
SHOPPERS_AT_ONCE = 10  # users ordering at the same time
ATTEMPTS = 40  # per thread and wave; each round of the user's threads orders once
CART = {"r-tea": 1, "r-cup": 1}


@pytest.fixture
def stack(rmq_vhost: str, tables: Any, keys: dict[str, Path]) -> Iterator[Stack]:
    s = Stack(keys=keys, rmq_url=str(rmq_vhost), check_delay=600)
    s.start_bridge()
    yield s
    s.close()


class Tally:
    """What the users' threads saw, under one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.answers: Counter[str] = Counter()
        self.problems: list[str] = []  # violations
        self.lost: list[str] = []

    def note(self, kind: str) -> None:
        with self.lock:
            self.answers[kind] += 1

    def problem(self, text: str, *, lost: bool = False) -> None:
        with self.lock:
            (self.lost if lost else self.problems).append(text)


def wave(stack: Stack, user: str, tally: Tally) -> list[str]:
    """THREADS threads of the user order (cart refilled before each POST) until each is
    refused for the cap; the ids of the orders made."""
    made: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(THREADS)

    def hammer(n: int) -> None:
        start.wait(30)
        for _ in range(ATTEMPTS):
            for gid, num in CART.items():  # set-up, straight into the table
                stack.store.set_cart_line(user, gid, num)
            answer = stack.http.api("POST", "/orders", user)
            if answer.status == 201:
                with lock:
                    made.append(answer.json()["id"])
                tally.note("201")
                continue
            if answer.status >= 500:
                tally.note(str(answer.status))  # counted by the 5xx column
                continue
            code = answer.json().get("Code") if answer.status in (400, 409) else None
            tally.note(f"{answer.status} {code}")
            if code == "TooManyUnpaidOrders":
                message = answer.json().get("Message", "")
                if f"{CAP} unpaid orders" not in message or "pay or cancel" not in message:
                    tally.problem(f"{user}: a refusal that does not say the cap: {message!r}")
                return
            if (answer.status, code) not in ((409, "ConflictError"), (400, "BadRequestError")):
                # only another thread taking the cart first may refuse otherwise
                tally.problem(f"{user}: {answer.status} {answer.body[:200]!r}")
        tally.problem(f"{user}: thread {n} never refused in {ATTEMPTS} attempts", lost=True)

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return made


def unpaid_now(stack: Stack, order_ids: list[str]) -> int:
    """Of these orders, how many are UNPAID (consistent reads, not the user index)."""
    return sum(1 for i in order_ids if (o := stack.store.get_order(i)) and o.status == UNPAID)


def shopper(stack: Stack, user: str, tally: Tally) -> None:
    first = wave(stack, user, tally)
    if len(first) != CAP:
        tally.problem(f"{user}: {len(first)} orders made before the cap refused, not {CAP}")
    if unpaid_now(stack, first) > CAP:
        tally.problem(f"{user}: {unpaid_now(stack, first)} UNPAID after the first wave")
    if len(first) < 2:
        return
    # Two places freed: one order paid through the sandbox, one cancelled.
    paid, cancelled = first[0], first[1]
    order = {"id": paid, "username": user}
    url = stack.pay_url(order)
    if url is None or stack.open_cashier(url) != 200 or stack.press_pay(paid) != 302:
        tally.problem(f"{user}: could not pay {paid}")
        return
    wait_until(lambda: (o := stack.store.get_order(paid)) is not None and o.status == PAID,
               60, f"{paid} PAID through notify, queue and bridge", step=0.1)
    answer = stack.http.api("POST", f"/orders/{cancelled}/cancel", user)
    if answer.status != 200:
        tally.problem(f"{user}: cancel of {cancelled}: {answer.status} {answer.body[:200]!r}")
        return
    second = wave(stack, user, tally)
    if len(second) != 2:
        tally.problem(f"{user}: {len(second)} orders made after paying one and cancelling "
                      f"one, not 2")
    if unpaid_now(stack, first + second) > CAP:
        tally.problem(f"{user}: {unpaid_now(stack, first + second)} UNPAID after the second "
                      f"wave")


def most_unpaid_at_once(orders: list[Order]) -> int:
    """The most orders of one user UNPAID at the same moment, from when each was made
    and when it left UNPAID (the handlers' clocks: the waves of one user follow each
    other, so the few milliseconds between a clock and its commit do not matter)."""
    events: list[tuple[float, int]] = []
    for o in orders:
        events.append((o.create_time.timestamp(), 1))
        if o.status != UNPAID:
            left = o.close_time if o.status == CLOSED else o.update_time
            events.append((left.timestamp(), -1))
    most = held = 0
    for _, step in sorted(events):  # at one instant a leave (-1) comes first
        held += step
        most = max(most, held)
    return most


def run_unpaid_cap(stack: Stack, users: int, name: str) -> Row:
    assert stack.settings.max_unpaid_orders_per_user == CAP
    started = time.monotonic()
    row = Row(name)
    tally = Tally()
    names = [f"holder-{i:02d}" for i in range(users)]
    with ThreadPoolExecutor(max_workers=SHOPPERS_AT_ONCE) as pool:
        for f in [pool.submit(shopper, stack, u, tally) for u in names]:
            f.result(600)
    row.runs = users
    shopping = time.monotonic() - started

    # Every per-user moment of the run, from the orders as they end up.
    created = {o.id: o for o, _ in all_orders()}
    by_user: dict[str, list[Order]] = {}
    for o in created.values():
        by_user.setdefault(o.username, []).append(o)
    for user, mine in sorted(by_user.items()):
        if most_unpaid_at_once(mine) > CAP:
            tally.problem(f"{user}: {most_unpaid_at_once(mine)} orders UNPAID at once")

    # The orders left UNPAID are checked: no payment at Alipay, so the bridge closes them.
    for o in created.values():
        if o.status == UNPAID:
            stack.check_now(o.id)
    if not settle(stack, stack.start_bridge, stack.stop_bridge, timeout=120, waiting_ok=True):
        row.lost += 1
        row.notes.append(f"queues not drained: {stack.depths()}")
    trades = stack.trades()
    money = {oid for oid, t in trades.items() if t["gmt_payment"]}
    audit(stack.store, stack.start_stock, stack.store.transitions, money_in=money,
          trades=trades).into(row)
    row.violations += len(tally.problems)
    row.lost += len(tally.lost)
    row.notes += tally.problems + tally.lost
    row.http_5xx = stack.http.count_5xx + stack.notify_5xx()
    statuses = Counter(str(o.status) for o, _ in all_orders())
    rest = time.monotonic() - started - shopping
    row.notes.append(f"answers {dict(tally.answers)}; orders {dict(statuses)}; shopping "
                     f"{shopping:.1f} s, checks and audit {rest:.1f} s")
    row.seconds = time.monotonic() - started
    return SCOREBOARD.record(row)


def check(row: Row, users: int) -> None:
    # each user: CAP orders, then 2 more after paying one and cancelling one
    assert row.orders == users * (CAP + 2), row.notes[-1]
    row.assert_zeros()


def test_users_hoarding_with_concurrent_orders_never_pass_the_cap(stack: Stack) -> None:
    row = run_unpaid_cap(stack, 10, "10 users hoarding with concurrent orders: cap 5")
    check(row, 10)


@pytest.mark.soak
def test_users_hoarding_with_concurrent_orders_never_pass_the_cap_soak(stack: Stack) -> None:
    row = run_unpaid_cap(stack, 50, "50 users hoarding with concurrent orders: cap 5 (soak)")
    check(row, 50)
