"""The daily reconciliations' reports, and the shop's records of a bill day.

One table, one partition per day (`pk` DAY#<yyyy-MM-dd>): the REPORT item, a
DIFF#<id> item per difference and an EXTRA#<key> item per bill row the day's own
records lacked. A run holds the REPORT item (its `run_id`, a lease) while it
works; its differences and extras are written before its report, so a run that
stops half-way leaves the report RUNNING (its lease runs out) and never a
finished report with half its differences. The sparse index `open-by-day`
lists open differences, failed days and days an operator asked for.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import date, datetime, timedelta
from typing import Any

from pynamodb.exceptions import PutError, UpdateError

from chalicelib.domain import OrderStatus, Refund, Unavailable, iso, parse_iso
from chalicelib.domain.reconciliation import (
    AlreadyResolved,
    Difference,
    Extra,
    Report,
    ReportStatus,
)
from chalicelib.ports import PaidRecord
from chalicelib.store.base import DYNAMO_ERRORS, StoreBase, dynamo, get_item
from chalicelib.store.models import refund_from_model

log = logging.getLogger(__name__)

REPORT = "REPORT"
REPORT_LIST = "REPORT"  # the one hash key of the reports-by-day index
DIFFERENCE_FLAG = "DIFFERENCE"
FAILED_FLAG = "FAILED"
REQUESTED_FLAG = "REQUESTED"


def _pk(day: date) -> str:
    return f"DAY#{day.isoformat()}"


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


class ReconciliationStore(StoreBase):

    def paid_on(self, day: date) -> Iterator[PaidRecord]:
        m = self.models
        with dynamo():
            for x in m.Order.paid_by_day.query(day.isoformat()):
                yield PaidRecord(x.id, x.transaction_id, int(x.total_fen),
                                 OrderStatus(x.status), parse_iso(x.pay_time))

    def refunds_succeeded_on(self, day: date) -> Iterator[Refund]:
        m = self.models
        with dynamo():
            for x in m.Refund.succeeded_by_day.query(day.isoformat()):
                yield refund_from_model(x)

    def _report_item(self, report: Report, *, lease_until: str | None) -> Any:
        m = self.models
        failed = report.status == ReportStatus.FAILED
        return m.Reconciliation(
            _pk(report.day), REPORT, day=report.day.isoformat(),
            body=_json(report.to_item()), report_list=REPORT_LIST,
            attention=FAILED_FLAG if failed else None, run_id=report.run_id,
            lease_until=lease_until, requested_by=report.requested_by)

    def _lease_free(self, now: datetime) -> Any:
        r = self.models.Reconciliation
        return (r.pk.does_not_exist() | r.lease_until.does_not_exist()
                | (r.lease_until <= iso(now)))

    def start_reconciliation(self, report: Report, *, now: datetime,
                             lease_seconds: int) -> bool:
        item = self._report_item(report, lease_until=iso(now + timedelta(seconds=lease_seconds)))
        return _put(item, self._lease_free(now))

    def request_reconciliation(self, day: date, *, by: str, now: datetime) -> bool:
        r = self.models.Reconciliation
        try:
            r(_pk(day), REPORT).update(
                actions=[r.attention.set(REQUESTED_FLAG), r.requested_by.set(by)],
                condition=r.pk.exists() & (r.lease_until.does_not_exist()
                                           | (r.lease_until <= iso(now))))
            return True
        except UpdateError as exc:
            if exc.cause_response_code != "ConditionalCheckFailedException":
                raise Unavailable("dynamodb is not answering") from exc
        except DYNAMO_ERRORS as exc:
            raise Unavailable("dynamodb is not answering") from exc
        # No report yet (or a run holds it): a new one that says it was asked for.
        first = self._report_item(Report(day, ReportStatus.RUNNING, "requested", now),
                                  lease_until=None)
        first.attention = REQUESTED_FLAG
        first.requested_by = by
        return _put(first, r.pk.does_not_exist())

    def requested_days(self, limit: int = 50) -> list[date]:
        r = self.models.Reconciliation
        with dynamo():
            return [date.fromisoformat(x.day)
                    for x in r.open_items.query(REQUESTED_FLAG, limit=limit)]

    def _holds(self, report: Report) -> bool:
        found = get_item(self.models.Reconciliation, _pk(report.day), range_key=REPORT)
        return found is not None and found.run_id == report.run_id

    def finish_reconciliation(self, report: Report, differences: Sequence[Difference],
                              extras: Sequence[Extra]) -> bool:
        m = self.models
        r = m.Reconciliation
        if not self._holds(report):
            return False
        pk = _pk(report.day)
        earlier: dict[str, Any] = {}
        with dynamo():
            for x in r.query(pk):
                if x.sk != REPORT:
                    earlier[x.sk] = x
        day = report.day.isoformat()
        keep: set[str] = set()
        with dynamo(), r.batch_write() as batch:
            for d in differences:
                sk = f"DIFF#{d.id}"
                keep.add(sk)
                before = earlier.get(sk)
                kept = d.keeping_resolution_of(
                    Difference.from_item(json.loads(before.body)) if before else None)
                batch.save(r(pk, sk, day=day, body=_json(kept.to_item()),
                             attention=None if kept.resolved else DIFFERENCE_FLAG))
            for x in extras:
                sk = f"EXTRA#{x.key}"
                keep.add(sk)
                batch.save(r(pk, sk, day=day, body=_json(x.to_item())))
        with dynamo():
            for sk in earlier.keys() - keep:
                m.Reconciliation(pk, sk).delete()
        return _put(self._report_item(report, lease_until=None), r.run_id == report.run_id)

    def fail_reconciliation(self, report: Report) -> bool:
        r = self.models.Reconciliation
        return _put(self._report_item(report, lease_until=None), r.run_id == report.run_id)

    def get_reconciliation(self, day: date, *, differences: bool = True) -> Report | None:
        r = self.models.Reconciliation
        if not differences:
            found = get_item(r, _pk(day), range_key=REPORT)
            return _report(found) if found is not None else None
        report: Report | None = None
        diffs: list[Difference] = []
        with dynamo():
            for x in r.query(_pk(day)):
                if x.sk == REPORT:
                    report = _report(x)
                elif x.sk.startswith("DIFF#"):
                    diffs.append(Difference.from_item(json.loads(x.body)))
        return replace(report, differences=tuple(diffs)) if report else None

    def list_reconciliations(self, limit: int = 100) -> list[Report]:
        r = self.models.Reconciliation
        with dynamo():
            return [_report(x) for x in r.reports.query(REPORT_LIST, scan_index_forward=False,
                                                        limit=limit)]

    def get_extra(self, day: date, key: str) -> Extra | None:
        found = get_item(self.models.Reconciliation, _pk(day), range_key=f"EXTRA#{key}")
        return Extra.from_item(json.loads(found.body)) if found is not None else None

    def resolve_difference(self, day: date, difference_id: str, *, note: str, by: str,
                           now: datetime) -> Difference | None:
        r = self.models.Reconciliation
        found = get_item(r, _pk(day), range_key=f"DIFF#{difference_id}")
        if found is None:
            return None
        current = Difference.from_item(json.loads(found.body))
        if current.resolved:
            raise AlreadyResolved(f"difference {difference_id} was resolved by "
                                  f"{current.resolved_by}")
        done = replace(current, resolved=True, note=note, resolved_by=by,
                       resolved_at=parse_iso(iso(now) or ""))
        try:
            found.update(actions=[r.body.set(_json(done.to_item())), r.attention.remove()],
                         condition=r.attention == DIFFERENCE_FLAG)
        except UpdateError as exc:
            if exc.cause_response_code == "ConditionalCheckFailedException":
                raise AlreadyResolved(f"difference {difference_id} was resolved "
                                      "meanwhile") from exc
            raise Unavailable("dynamodb is not answering") from exc
        except DYNAMO_ERRORS as exc:
            raise Unavailable("dynamodb is not answering") from exc
        return done

    def open_differences(self, limit: int = 200) -> list[Difference]:
        r = self.models.Reconciliation
        with dynamo():
            return [Difference.from_item(json.loads(x.body))
                    for x in r.open_items.query(DIFFERENCE_FLAG, limit=limit)]

    def failed_days(self, limit: int = 100) -> list[date]:
        r = self.models.Reconciliation
        with dynamo():
            return [date.fromisoformat(x.day) for x in r.open_items.query(
                FAILED_FLAG, scan_index_forward=False, limit=limit)]


def _report(item: Any) -> Report:
    report = Report.from_item(json.loads(item.body))
    return replace(report, requested_by=item.requested_by) if item.requested_by else report


def _put(item: Any, condition: Any) -> bool:
    """A put on a condition: False when it failed (nothing written)."""
    try:
        item.save(condition=condition)
        return True
    except PutError as exc:
        if exc.cause_response_code == "ConditionalCheckFailedException":
            return False
        raise Unavailable("dynamodb is not answering") from exc
    except DYNAMO_ERRORS as exc:
        raise Unavailable("dynamodb is not answering") from exc
