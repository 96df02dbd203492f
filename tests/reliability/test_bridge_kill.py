"""The bridge killed with SIGKILL at random moments (seeded) while it drains, and
restarted each time: no order lost, every order final, every queue drained.

Orders flow all along: some are paid at the cashier (the notify becomes a pay
message), some are abandoned (their check closes them after the delay), some are
paid late through an old link after the check closed them (a refund). The bridge
runs as its own process (`python -m tests.reliability.bridge_proc`, the bridge's
main with a counting store), with a 1 s sweeper; the check delay is 3 s.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chalicelib.domain import CLOSED, REFUNDED
from tests.reliability.harness import (
    SCOREBOARD,
    BridgeProcess,
    Row,
    Stack,
    audit,
    settle,
    wait_until,
)

pytestmark = pytest.mark.rabbitmq

WAYS = ("pay", "abandon", "late")


@pytest.fixture
def stack(rmq_vhost: str, tables: Any, keys: dict[str, Path]) -> Iterator[Stack]:
    s = Stack(keys=keys, rmq_url=str(rmq_vhost), check_delay=3, retry_delays_ms=(200, 500),
              sweep_interval=1.0, notify_schedule=[0.5, 1, 1, 2, 2, 3, 5])
    yield s
    s.close()


def run_bridge_kills(stack: Stack, workdir: Path, *, n: int, kills: int, seed: int,
                     name: str) -> Row:
    started = time.monotonic()
    rng = random.Random(seed)
    row = Row(name)
    proc = BridgeProcess(stack, workdir)
    proc.start()
    orders: list[tuple[str, dict[str, Any], str]] = []
    late_paid: list[str] = []
    errors: list[BaseException] = []
    done_killing = threading.Event()

    def killer() -> None:
        try:
            for _ in range(kills):
                time.sleep(rng.uniform(0.2, 2.0))  # from its start: booting, or draining
                proc.kill()
                proc.start()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
        finally:
            done_killing.set()

    def late_payer() -> None:
        try:
            for way, order, url in list(orders):
                if way != "late":
                    continue
                wait_until(lambda o=order: stack.store.get_order(o["id"]).status == CLOSED,
                           60, f"{order['id']} closed by its check")
                if stack.open_cashier(url) == 200 and stack.press_pay(order["id"]) == 302:
                    late_paid.append(order["id"])
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    kill_thread = threading.Thread(target=killer, daemon=True)
    kill_thread.start()
    for i in range(n):
        way = WAYS[i % len(WAYS)]
        order = stack.order(f"kill-{i}", {"r-tea": rng.randint(1, 2), "r-cup": rng.randint(0, 2)
                                          or 1})
        assert order is not None
        url = stack.pay_url(order)
        assert url is not None
        if way == "pay":
            assert stack.open_cashier(url) == 200
            assert stack.press_pay(order["id"]) == 302
        orders.append((way, order, url))
        time.sleep(rng.uniform(0, 0.05))
    payer = threading.Thread(target=late_payer, daemon=True)
    payer.start()
    payer.join(120)
    kill_thread.join(120)
    assert not errors, errors
    row.runs = proc.kills
    codes: list[int] = []
    drained = settle(
        stack, lambda: proc.start(ready=True), lambda: codes.append(proc.stop()), timeout=120,
        done=lambda: all(stack.store.get_order(o).status == REFUNDED for o in late_paid))
    assert codes and all(c == 0 for c in codes), proc.tail()
    if not drained:
        row.lost += 1
        row.notes.append(f"queues not drained: {stack.depths()}")
    trades = stack.trades()
    money = {oid for oid, t in trades.items() if t["gmt_payment"]} | stack.acknowledged()
    audit(stack.store, stack.start_stock, proc.transitions(), money_in=money, trades=trades,
          attempted=proc.attempts()).into(row)
    row.http_5xx = stack.http.count_5xx + stack.notify_5xx() + stack.sandbox_http.count_5xx
    row.notes.append(f"{len(late_paid)} late payments refunded")
    row.seconds = time.monotonic() - started
    return SCOREBOARD.record(row)


def test_bridge_killed_while_draining(stack: Stack, tmp_path: Path) -> None:
    row = run_bridge_kills(stack, tmp_path, n=30, kills=4, seed=20261126,
                           name="bridge SIGKILL x4")
    assert row.runs == 4 and row.orders == 30
    row.assert_zeros()


@pytest.mark.soak
def test_bridge_killed_while_draining_soak(stack: Stack, tmp_path: Path) -> None:
    row = run_bridge_kills(stack, tmp_path, n=150, kills=20, seed=1126,
                           name="bridge SIGKILL x20 (soak)")
    assert row.runs == 20 and row.orders == 150
    row.assert_zeros()
