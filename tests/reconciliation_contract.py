"""The store's contract for the daily reconciliations (part of tests/store_contract.py's
StoreContract, so run on both stores). The DynamoDB tables are shared by the tests
of a session: every test works on days of its own, far apart, picked at random."""

from __future__ import annotations

import dataclasses
import secrets
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import pytest

from chalicelib.domain import PAID, REFUNDED
from chalicelib.domain.reconciliation import (
    SHANGHAI,
    AlreadyResolved,
    Carried,
    Difference,
    DifferenceKind,
    EntryKind,
    Extra,
    Report,
    ReportStatus,
    Side,
    difference_id,
)


def a_day() -> date:
    """A day no other test uses (random within ~800 years, a month's gap kept)."""
    return date(1200, 1, 1) + timedelta(days=30 * secrets.randbelow(10_000))


def noon(day: date, hour: int = 12) -> datetime:
    return datetime.combine(day, time(hour), SHANGHAI).astimezone(UTC)


def diff(day: date, key: str, kind: DifferenceKind = DifferenceKind.ALIPAY_ONLY) -> Difference:
    return Difference(difference_id(kind, EntryKind.PAYMENT, key), day, kind,
                      EntryKind.PAYMENT, f"ORDER_{key}", key, None,
                      {"支付宝交易号": key, "line": 7}, None)


def running(day: date, run_id: str = "r1") -> Report:
    return Report(day, ReportStatus.RUNNING, run_id, noon(day + timedelta(days=1)))


def finished(report: Report, status: ReportStatus = ReportStatus.DIFFERENCES) -> Report:
    return dataclasses.replace(report, status=status, finished_at=report.started_at,
                               alipay=Side(2, 3980, 1, -500), shop=Side(2, 3980, 1, -500),
                               carried=(Carried(EntryKind.PAYMENT, "ORDER_x", "T-x", None),))


class ReconciliationContract:

    # --- the shop's records of a bill day --------------------------------------------

    def test_a_day_lists_its_payments_and_succeeded_refunds(self, store: Any) -> None:
        from tests.store_contract import paid_order, reserved, settled

        day = a_day()
        late = paid_order(store, "kr1", 1990, at=noon(day, 23) + timedelta(minutes=59))
        early = paid_order(store, "kr2", 500, at=noon(day, 0) + timedelta(minutes=1))
        paid_order(store, "kr3", 700, at=noon(day + timedelta(days=1), 0))  # the next day
        refund = reserved(store, late.id, 300, at=noon(day, 23))
        assert settled(store, refund, now=noon(day, 23) + timedelta(minutes=30))
        failed = reserved(store, early.id, 100, at=noon(day, 13))
        assert settled(store, failed, status=failed.status.FAILED, now=noon(day, 14))
        records = sorted(store.paid_on(day), key=lambda p: p.order_id)
        assert [(p.order_id, p.trade_no, p.total_fen, p.status) for p in records] == sorted(
            [(late.id, f"T-{late.id}", 1990, PAID), (early.id, f"T-{early.id}", 500, PAID)])
        assert records[0].pay_time.tzinfo is not None
        assert [r.id for r in store.refunds_succeeded_on(day)] == [refund.id]
        assert list(store.refunds_succeeded_on(day + timedelta(days=1))) == []

    def test_a_refunded_order_stays_a_payment_of_its_day(self, store: Any) -> None:
        from tests.store_contract import paid_order, reserved, settled

        day = a_day()
        order = paid_order(store, "kr4", 800, at=noon(day))
        assert settled(store, reserved(store, order.id, 800, at=noon(day)), now=noon(day, 13))
        (record,) = store.paid_on(day)
        assert record.status == REFUNDED

    # --- runs -----------------------------------------------------------------------

    def test_a_run_holds_its_day_until_its_lease_ends(self, store: Any) -> None:
        day = a_day()
        first = running(day, "r1")
        now = first.started_at
        assert store.start_reconciliation(first, now=now, lease_seconds=60) is True
        assert store.start_reconciliation(running(day, "r2"), now=now + timedelta(seconds=59),
                                          lease_seconds=60) is False
        assert store.get_reconciliation(day).run_id == "r1"
        assert store.start_reconciliation(running(day, "r3"), now=now + timedelta(seconds=61),
                                          lease_seconds=60) is True
        assert store.fail_reconciliation(dataclasses.replace(
            first, status=ReportStatus.FAILED, reason="x")) is False  # r1 lost it
        assert store.get_reconciliation(day).status == ReportStatus.RUNNING

    def test_a_finished_run_writes_its_differences_then_its_report(self, store: Any) -> None:
        day = a_day()
        report = running(day)
        assert store.start_reconciliation(report, now=report.started_at, lease_seconds=60)
        done = finished(report)
        a, b = diff(day, "T1"), diff(day, "T2", DifferenceKind.AMOUNT_MISMATCH)
        assert store.finish_reconciliation(done, [a, b], [Extra("T1", EntryKind.PAYMENT,
                                                                "ORDER_T1", 300)])
        got = store.get_reconciliation(day)
        assert got.status == ReportStatus.DIFFERENCES and got.alipay == Side(2, 3980, 1, -500)
        assert got.carried == done.carried and got.finished_at == done.finished_at
        assert sorted(d.id for d in got.differences) == sorted([a.id, b.id])
        assert next(d for d in got.differences if d.id == a.id) == a
        assert store.get_reconciliation(day, differences=False).differences == ()
        assert store.get_extra(day, "T1") == Extra("T1", EntryKind.PAYMENT, "ORDER_T1", 300)
        assert store.get_extra(day, "T2") is None
        assert store.get_extra(day + timedelta(days=1), "T1") is None
        mine = {d.id for d in store.open_differences(limit=10_000) if d.day == day}
        assert mine == {a.id, b.id}

    def test_running_again_keeps_a_resolution_and_drops_what_went_away(self, store: Any) -> None:
        day = a_day()
        first = running(day, "r1")
        store.start_reconciliation(first, now=first.started_at, lease_seconds=60)
        a, b = diff(day, "T1"), diff(day, "T2")
        store.finish_reconciliation(finished(first), [a, b], [Extra("T2", EntryKind.PAYMENT,
                                                                    "ORDER_T2", 1)])
        resolved = store.resolve_difference(day, a.id, note="console refund", by="carol",
                                            now=first.started_at)
        assert resolved.resolved and resolved.resolved_by == "carol"
        with pytest.raises(AlreadyResolved):
            store.resolve_difference(day, a.id, note="again", by="dave", now=first.started_at)
        second = running(day, "r2")
        later = second.started_at + timedelta(hours=2)
        assert store.start_reconciliation(dataclasses.replace(second, started_at=later),
                                          now=later, lease_seconds=60)
        c = diff(day, "T3")
        assert store.finish_reconciliation(
            finished(dataclasses.replace(second, started_at=later),
                     ReportStatus.DIFFERENCES), [a, c], [])
        got = store.get_reconciliation(day)
        assert sorted(d.id for d in got.differences) == sorted([a.id, c.id])
        kept = next(d for d in got.differences if d.id == a.id)
        assert (kept.resolved, kept.note, kept.resolved_by) == (True, "console refund", "carol")
        assert store.get_extra(day, "T2") is None
        mine = {d.id for d in store.open_differences(limit=10_000) if d.day == day}
        assert mine == {c.id}
        assert store.resolve_difference(day, "0" * 20, note="n", by="c", now=later) is None

    def test_failed_days_and_requested_days_are_listed(self, store: Any) -> None:
        day, other = a_day(), a_day()
        report = running(day)
        store.start_reconciliation(report, now=report.started_at, lease_seconds=60)
        assert store.fail_reconciliation(dataclasses.replace(
            report, status=ReportStatus.FAILED, reason="bill.zip, line 3: bad amount"))
        got = store.get_reconciliation(day)
        assert got.status == ReportStatus.FAILED and got.reason.endswith("bad amount")
        assert day in store.failed_days(limit=10_000)
        assert store.request_reconciliation(other, by="carol", now=report.started_at)
        assert other in store.requested_days(limit=10_000)
        asked = store.get_reconciliation(other)
        assert asked.status == ReportStatus.RUNNING and asked.requested_by == "carol"
        assert store.request_reconciliation(day, by="dave", now=report.started_at)
        assert store.get_reconciliation(day).requested_by == "dave"
        taken = running(day, "r9")
        assert store.start_reconciliation(taken, now=report.started_at, lease_seconds=60)
        assert day not in store.requested_days(limit=10_000)
        assert day in {r.day for r in store.list_reconciliations(limit=10_000)}
        assert store.request_reconciliation(day, by="erin", now=report.started_at) is False

    def test_reports_are_listed_newest_day_first(self, store: Any) -> None:
        days = sorted({a_day() for _ in range(3)})
        for n, day in enumerate(days):
            report = running(day, f"r{n}")
            store.start_reconciliation(report, now=report.started_at, lease_seconds=60)
            store.finish_reconciliation(finished(report, ReportStatus.BALANCED), [], [])
        listed = [r.day for r in store.list_reconciliations(limit=10_000) if r.day in days]
        assert listed == sorted(days, reverse=True)
