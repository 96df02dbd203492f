"""A flash-sale burst (POST /seckill/{saleId} over HTTP, many users, some asking
two or three times at once) while the bridge that drains queue.order.seckill is
killed with SIGKILL and restarted: exactly the sale's stock ends in orders, no
user holds two, every ticket that was answered 202 ends final, the queue drains."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from chalicelib.domain import TICKET_FINAL, TICKET_ORDERED, Sale
from tests.conftest import MODELS
from tests.reliability.harness import (
    SCOREBOARD,
    BridgeProcess,
    Row,
    Stack,
    all_orders,
    audit,
    settle,
)

pytestmark = pytest.mark.rabbitmq

SALE = "rel-flash"


@pytest.fixture
def stack(rmq_vhost: str, tables: Any, keys: dict[str, Path]) -> Iterator[Stack]:
    s = Stack(keys=keys, rmq_url=str(rmq_vhost), check_delay=600, retry_delays_ms=(200, 500),
              sweep_interval=3600.0)
    yield s
    s.close()


def tickets() -> list[Any]:
    """The tickets (their table also holds the per-user claims and order markers)."""
    return [t for t in MODELS.Ticket.scan(consistent_read=True) if t.id.startswith("TICKET_")]


def run_flash_sale(stack: Stack, workdir: Path, *, sale_stock: int, users: int, kills: int,
                   seed: int, name: str) -> Row:
    started = time.monotonic()
    rng = random.Random(seed)
    row = Row(name)
    now = datetime.now(UTC)
    stack.store.put_sale(Sale(SALE, "r-rare", "Rare tea, flash sale", 990, sale_stock,
                              now - timedelta(minutes=1), now + timedelta(hours=1)))
    start_sales = {SALE: sale_stock}
    # a slow drain, so that the burst waits in the queue while the bridge dies
    proc = BridgeProcess(stack, workdir, SECKILL_ORDERS_PER_SECOND="40")
    proc.start()
    accepted: dict[str, str] = {}  # ticket id -> user
    answers: Counter[int] = Counter()
    lock = threading.Lock()
    errors: list[BaseException] = []

    def killer() -> None:
        try:
            for _ in range(kills):
                time.sleep(rng.uniform(0.3, 1.5))
                proc.kill()
                proc.start()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    def buyer(user: str) -> None:
        answer = stack.http.api("POST", f"/seckill/{SALE}", user)
        with lock:
            answers[answer.status] += 1
            if answer.status == 202:
                accepted[answer.json()["ticketId"]] = user

    requests = [f"buyer-{i}" for i in range(users)]
    requests += [f"buyer-{i}" for i in rng.sample(range(users), users // 4)] * 2  # eager ones
    rng.shuffle(requests)
    kill_thread = threading.Thread(target=killer, daemon=True)
    kill_thread.start()
    with ThreadPoolExecutor(max_workers=16) as pool:
        for f in [pool.submit(buyer, u) for u in requests]:
            f.result(60)
    kill_thread.join(120)
    assert not errors, errors
    row.runs = proc.kills
    codes: list[int] = []
    drained = settle(stack, lambda: proc.start(ready=True), lambda: codes.append(proc.stop()),
                     timeout=120, done=lambda: all(t.status in TICKET_FINAL for t in tickets()),
                     waiting_ok=True, unpaid_ok=True)  # the orders wait for payment
    assert codes and all(c == 0 for c in codes), proc.tail()
    if not drained:
        row.lost += 1
        row.notes.append(f"queues not drained: {stack.depths()}")
    found = tickets()
    by_id = {t.id: t for t in found}
    sale_orders = [o for o, _ in all_orders() if o.sale_id == SALE]
    per_user = Counter(o.username for o in sale_orders)
    for ticket_id, user in accepted.items():
        t = by_id.get(ticket_id)
        if t is None or t.status not in TICKET_FINAL:
            row.lost += 1
            row.notes.append(f"ticket {ticket_id} of {user}: {t.status if t else 'missing'}")
        elif t.status == TICKET_ORDERED and t.order_id not in {o.id for o in sale_orders}:
            row.lost += 1
            row.notes.append(f"ticket {ticket_id} ORDERED without its order {t.order_id}")
    if len(sale_orders) != sale_stock:
        row.violations += 1
        row.notes.append(f"{len(sale_orders)} orders for a stock of {sale_stock}")
    twice = [u for u, n in per_user.items() if n > 1]
    if twice:
        row.double += len(twice)
        row.notes.append(f"users with two orders: {twice[:5]}")
    ordered = Counter(t.status for t in found)
    if ordered[TICKET_ORDERED] != len(sale_orders):
        row.violations += 1
        row.notes.append(f"{ordered[TICKET_ORDERED]} ORDERED tickets, {len(sale_orders)} orders")
    audit(stack.store, stack.start_stock, proc.transitions(), attempted=proc.attempts(),
          settled=False, start_sales=start_sales).into(row)
    row.orders = len(sale_orders)
    row.http_5xx = stack.http.count_5xx
    row.notes.append(f"{len(requests)} requests: answers {dict(answers)}; tickets "
                     f"{dict(ordered)}")
    row.seconds = time.monotonic() - started
    return SCOREBOARD.record(row)


def test_flash_sale_burst_while_the_bridge_dies(stack: Stack, tmp_path: Path) -> None:
    row = run_flash_sale(stack, tmp_path, sale_stock=20, users=80, kills=3, seed=42,
                         name="flash-sale burst, bridge SIGKILL x3")
    assert row.runs == 3
    row.assert_zeros()


@pytest.mark.soak
def test_flash_sale_burst_soak(stack: Stack, tmp_path: Path) -> None:
    row = run_flash_sale(stack, tmp_path, sale_stock=100, users=400, kills=10, seed=4242,
                         name="flash-sale burst, bridge SIGKILL x10 (soak)")
    assert row.runs == 10
    row.assert_zeros()
