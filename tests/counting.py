"""The real store, counting the order transitions that won their conditional write.

Shared by the payment tests and the reliability suite. A transition is counted
only when DynamoDB accepted the write (the store method returned True), so a
duplicate or a race that lost is not counted; two counts of one kind for one
order, or PAID beside CLOSED, would mean a condition failed to hold.

In a bridge subprocess (tests/reliability/bridge_proc.py) the counts also go to
a file, one `KIND ORDER_ID` line each, written with one unbuffered `write` right
after the store's answer, so that a SIGKILL a moment later keeps them. A
`TRY KIND ORDER_ID` line goes before each write: a SIGKILL between DynamoDB's
commit and the count leaves a TRY without its line, which explains a missing count.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from chalicelib import config
from chalicelib.store import Store


class CountingStore(Store):
    """The real store, counting the transitions that won their conditional write."""

    def __init__(self, log_path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(config.get().tables, config.get().aws_region)
        self.transitions: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._fd: int | None = None
        if log_path is not None:
            self._fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def _try(self, kind: str, order_id: str) -> None:
        if self._fd is not None:
            os.write(self._fd, f"TRY {kind} {order_id}\n".encode("ascii"))

    def _count(self, kind: str, order_id: str, won: bool) -> bool:
        if won:
            with self._lock:
                self.transitions.append((kind, order_id))
                if self._fd is not None:
                    os.write(self._fd, f"{kind} {order_id}\n".encode("ascii"))
        return won

    def mark_paid(self, order_id: str, **kw: Any) -> bool:
        self._try("PAID", order_id)
        return self._count("PAID", order_id, super().mark_paid(order_id, **kw))

    def close_order(self, order: Any, *, now: datetime, **kw: Any) -> bool:
        self._try("CLOSED", order.id)
        return self._count("CLOSED", order.id, super().close_order(order, now=now, **kw))

    def settle_refund(self, refund: Any, order: Any, **kw: Any) -> bool:
        """REFUNDED is won by the refund whose success brings the order's refunded
        total to what was paid."""
        full = (kw.get("status") == "SUCCEEDED"
                and order.refunded_fen + refund.amount_fen >= order.total_fen)
        if full:
            self._try("REFUNDED", order.id)
        won = super().settle_refund(refund, order, **kw)
        return self._count("REFUNDED", order.id, won) if full else won


def read_transitions(paths: Iterable[Path], *, attempts: bool = False
                     ) -> list[tuple[str, str]]:
    """The `KIND ORDER_ID` lines that bridge subprocesses wrote (`attempts`: the
    `TRY KIND ORDER_ID` lines instead)."""
    found: list[tuple[str, str]] = []
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text(encoding="ascii").splitlines():
            words = line.split()
            if attempts and len(words) == 3 and words[0] == "TRY":
                found.append((words[1], words[2]))
            elif not attempts and len(words) == 2:
                found.append((words[0], words[1]))
    return found
