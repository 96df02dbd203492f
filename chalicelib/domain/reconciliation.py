"""A day's reconciliation against the payment provider's bill: the report, its
differences and the days it carries.

The bill's day is a day in Asia/Shanghai, as Alipay cuts its bills; the shop files
each payment under the day of its payment time and each refund under the day it
succeeded, in the same zone (`bill_day`).
"""

from __future__ import annotations

import enum
import hashlib
import re
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta, timezone
from typing import Any

from chalicelib.domain.errors import Conflict, Invalid, NotFound
from chalicelib.domain.money import money_str
from chalicelib.domain.order import iso

# China has had no daylight saving time since 1991: a fixed offset is exact.
SHANGHAI = timezone(timedelta(hours=8), "Asia/Shanghai")
DAY_RE = re.compile(r"\d{4}-\d{2}-\d{2}")
DIFFERENCE_ID_RE = re.compile(r"[0-9a-f]{20}")
MAX_NOTE_CHARS = 1000
# A payment at 23:59:59 can be in the next day's bill: a record one side has and the
# other lacks is looked for this many days either side before it is a difference.
CARRY_DAYS = 2


def bill_day(moment: datetime) -> date:
    """The day of the provider's bill that `moment` belongs to."""
    return moment.astimezone(SHANGHAI).date()


def parse_day(text: Any) -> date:
    """A yyyy-MM-dd day; Invalid otherwise."""
    if not isinstance(text, str) or not DAY_RE.fullmatch(text):
        raise Invalid("the day must be yyyy-MM-dd")
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        raise Invalid(f"{text} is not a day") from exc


class ReportStatus(enum.StrEnum):
    RUNNING = "RUNNING"
    BALANCED = "BALANCED"
    DIFFERENCES = "DIFFERENCES"
    FAILED = "FAILED"


FINISHED = (ReportStatus.BALANCED, ReportStatus.DIFFERENCES)


class DifferenceKind(enum.StrEnum):
    ALIPAY_ONLY = "ALIPAY_ONLY"  # the bill has a payment or refund the shop lacks
    SHOP_ONLY = "SHOP_ONLY"  # the shop has one no bill of the nearby days has
    AMOUNT_MISMATCH = "AMOUNT_MISMATCH"
    STATUS_MISMATCH = "STATUS_MISMATCH"  # e.g. the bill paid, the order CLOSED or UNPAID


class EntryKind(enum.StrEnum):
    PAYMENT = "PAYMENT"
    REFUND = "REFUND"


def difference_id(kind: DifferenceKind, entry: EntryKind, key: str) -> str:
    """Stable across runs of the day: running it again finds the same ids, so an
    operator's resolution stays with its difference and nothing is listed twice."""
    return hashlib.sha256(f"{kind}|{entry}|{key}".encode()).hexdigest()[:20]


@dataclass(frozen=True)
class Side:
    """One side's counts and sums (fen; refunds negative, as in the bill)."""

    payments: int = 0
    payments_fen: int = 0
    refunds: int = 0
    refunds_fen: int = 0

    def add(self, entry: EntryKind, fen: int) -> Side:
        if entry == EntryKind.PAYMENT:
            return replace(self, payments=self.payments + 1,
                           payments_fen=self.payments_fen + fen)
        return replace(self, refunds=self.refunds + 1, refunds_fen=self.refunds_fen + fen)

    def to_wire(self) -> dict[str, Any]:
        return {"payments": self.payments, "paymentsTotal": money_str(self.payments_fen),
                "refunds": self.refunds, "refundsTotal": money_str(self.refunds_fen)}

    def to_item(self) -> dict[str, int]:
        return {"payments": self.payments, "payments_fen": self.payments_fen,
                "refunds": self.refunds, "refunds_fen": self.refunds_fen}

    @classmethod
    def from_item(cls, item: dict[str, Any] | None) -> Side | None:
        return None if item is None else cls(**{k: int(v) for k, v in item.items()})


@dataclass(frozen=True)
class Difference:
    id: str
    day: date
    kind: DifferenceKind
    entry: EntryKind
    order_id: str | None
    trade_no: str | None
    refund_id: str | None
    alipay: dict[str, Any] | None  # the bill row, by column name
    shop: dict[str, Any] | None  # the shop's record
    action: dict[str, Any] | None = None  # what the shop did about it (a refund)
    resolved: bool = False
    note: str | None = None
    resolved_by: str | None = None
    resolved_at: datetime | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "date": self.day.isoformat(), "kind": self.kind.value,
                "entry": self.entry.value, "orderId": self.order_id,
                "tradeNo": self.trade_no, "refundId": self.refund_id,
                "alipay": self.alipay, "shop": self.shop, "action": self.action,
                "resolved": self.resolved, "note": self.note,
                "resolvedBy": self.resolved_by, "resolvedAt": iso(self.resolved_at)}

    def to_item(self) -> dict[str, Any]:
        wire = self.to_wire()
        wire["resolvedAt"] = iso(self.resolved_at)
        return wire

    @classmethod
    def from_item(cls, item: dict[str, Any]) -> Difference:
        resolved_at = item.get("resolvedAt")
        return cls(id=item["id"], day=date.fromisoformat(item["date"]),
                   kind=DifferenceKind(item["kind"]), entry=EntryKind(item["entry"]),
                   order_id=item.get("orderId"), trade_no=item.get("tradeNo"),
                   refund_id=item.get("refundId"), alipay=item.get("alipay"),
                   shop=item.get("shop"), action=item.get("action"),
                   resolved=bool(item.get("resolved")), note=item.get("note"),
                   resolved_by=item.get("resolvedBy"),
                   resolved_at=datetime.fromisoformat(resolved_at) if resolved_at else None)

    def keeping_resolution_of(self, earlier: Difference | None) -> Difference:
        """This run's finding with the resolution an operator gave the same one."""
        if earlier is None or not earlier.resolved:
            return self
        return replace(self, resolved=True, note=earlier.note,
                       resolved_by=earlier.resolved_by, resolved_at=earlier.resolved_at)


@dataclass(frozen=True)
class Carried:
    """A record of the shop's this day's bill lacks, looked for in the nearby days'
    bills: `found_in` the day whose bill has it; None while not found yet."""

    entry: EntryKind
    order_id: str
    trade_no: str | None
    refund_id: str | None
    found_in: date | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"entry": self.entry.value, "orderId": self.order_id,
                "tradeNo": self.trade_no, "refundId": self.refund_id,
                "foundIn": self.found_in.isoformat() if self.found_in else None}

    @classmethod
    def from_wire(cls, item: dict[str, Any]) -> Carried:
        found = item.get("foundIn")
        return cls(entry=EntryKind(item["entry"]), order_id=item["orderId"],
                   trade_no=item.get("tradeNo"), refund_id=item.get("refundId"),
                   found_in=date.fromisoformat(found) if found else None)


@dataclass(frozen=True)
class Extra:
    """A row of the day's bill that none of the day's own records matched, kept so
    that the runs of the nearby days can find their carried records in it."""

    key: str  # the trade number of a payment, the request number of a refund
    entry: EntryKind
    order_id: str
    amount_fen: int

    def to_item(self) -> dict[str, Any]:
        return {"key": self.key, "entry": self.entry.value, "orderId": self.order_id,
                "amountFen": self.amount_fen}

    @classmethod
    def from_item(cls, item: dict[str, Any]) -> Extra:
        return cls(key=item["key"], entry=EntryKind(item["entry"]),
                   order_id=item["orderId"], amount_fen=int(item["amountFen"]))


@dataclass(frozen=True)
class Report:
    day: date
    status: ReportStatus
    run_id: str
    started_at: datetime
    finished_at: datetime | None = None
    reason: str | None = None
    alipay: Side | None = None
    shop: Side | None = None
    carried: tuple[Carried, ...] = ()
    differences: tuple[Difference, ...] = field(default=())  # filled when read whole
    bill_key: str | None = None  # where the raw bill is kept
    requested_by: str | None = None  # an operator asked for this run

    @property
    def pending(self) -> tuple[Carried, ...]:
        """Carried records not found in a nearby day's bill yet."""
        return tuple(c for c in self.carried if c.found_in is None)

    def summary(self) -> dict[str, Any]:
        shown = self.status in FINISHED
        return {
            "date": self.day.isoformat(), "status": self.status.value, "reason": self.reason,
            "alipay": self.alipay.to_wire() if self.alipay and shown else None,
            "shop": self.shop.to_wire() if self.shop and shown else None,
            "startedAt": iso(self.started_at), "finishedAt": iso(self.finished_at),
            "billKey": self.bill_key, "requestedBy": self.requested_by,
        }

    def to_wire(self) -> dict[str, Any]:
        """The day's report. Differences and carried records only of a finished run:
        a RUNNING or FAILED day shows none (an earlier run's are kept, with their
        resolutions, for the next run that finishes)."""
        shown = self.status in FINISHED
        wire = self.summary()
        wire["carried"] = [c.to_wire() for c in self.carried] if shown else []
        wire["differences"] = [d.to_wire() for d in self.differences] if shown else []
        return wire

    def to_item(self) -> dict[str, Any]:
        return {
            "date": self.day.isoformat(), "status": self.status.value, "runId": self.run_id,
            "startedAt": iso(self.started_at), "finishedAt": iso(self.finished_at),
            "reason": self.reason,
            "alipay": self.alipay.to_item() if self.alipay else None,
            "shop": self.shop.to_item() if self.shop else None,
            "carried": [c.to_wire() for c in self.carried],
            "billKey": self.bill_key, "requestedBy": self.requested_by,
        }

    @classmethod
    def from_item(cls, item: dict[str, Any]) -> Report:
        finished = item.get("finishedAt")
        return cls(
            day=date.fromisoformat(item["date"]), status=ReportStatus(item["status"]),
            run_id=item["runId"], started_at=datetime.fromisoformat(item["startedAt"]),
            finished_at=datetime.fromisoformat(finished) if finished else None,
            reason=item.get("reason"), alipay=Side.from_item(item.get("alipay")),
            shop=Side.from_item(item.get("shop")),
            carried=tuple(Carried.from_wire(c) for c in item.get("carried") or ()),
            bill_key=item.get("billKey"), requested_by=item.get("requestedBy"),
        )


def check_note(note: Any) -> str:
    if not isinstance(note, str) or not note.strip():
        raise Invalid("a note saying how the difference was resolved is required")
    if len(note) > MAX_NOTE_CHARS:
        raise Invalid(f"the note is longer than {MAX_NOTE_CHARS} characters")
    return note.strip()


class ReconciliationNotFound(NotFound):
    """No run of that day, or no such difference."""


class AlreadyResolved(Conflict):
    """The difference was resolved before (by someone, with a note)."""
