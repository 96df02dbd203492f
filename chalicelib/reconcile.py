"""A day's reconciliation: the provider's trade bill against the shop's records.

    run_day     bill_url -> download at once (the URL lives 30 s) -> keep the raw
                file (BillArchive) -> the shop's payments and refunds of the day
                into a scratch SQLite file -> the bill's rows, streamed, each
                matched by trade number (payments) or request number (refunds)
                -> the differences, then the report

Memory stays flat however big the day: the bill is read row by row
(chalicelib/bill.py) and the shop's side sits in SQLite on disk, not in a dict.

A row the day's own records lack is looked up by its order or refund: a payment
the shop filed under a nearby day (a payment at 23:59:59 lands in the next day's
bill) matches there and is kept as the day's "extra". A record of the shop's the
day's bill lacks is carried: found in an extra of the two days either side, it
matches; once the two following days have finished reports without it, it is
SHOP_ONLY. A finished day reruns its neighbours that still carry records, so a
carried record is settled as soon as the bills that could hold it were read.

Nothing is acted on until the whole bill is read and its footer checked: a cut
or corrupt bill ends the run FAILED (the raw file kept) and writes no difference.
Then a payment the bill holds for an order the shop closed goes back through the
refund machinery (once: REFUND_<orderId>), after the provider confirmed it by a
signed query.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import secrets
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import date, datetime, time, timedelta
from typing import IO, Any

from chalicelib import domain, handlers
from chalicelib.bill import BillError, BillReader, BillRow, RowKind
from chalicelib.context import Deps
from chalicelib.domain import (
    CLOSED,
    REFUNDED,
    Invalid,
    Order,
    Refund,
    RefundStatus,
    Unavailable,
    iso,
    money_str,
)
from chalicelib.domain.reconciliation import (
    CARRY_DAYS,
    FINISHED,
    SHANGHAI,
    Carried,
    Difference,
    DifferenceKind,
    EntryKind,
    Extra,
    ReconciliationNotFound,
    Report,
    ReportStatus,
    Side,
    bill_day,
    check_note,
    difference_id,
    parse_day,
)
from chalicelib.ports import PaidRecord, PaymentRefused, PaymentUnavailable

log = logging.getLogger(__name__)

# Longer than the reconciler function's timeout: a run that died leaves its day
# RUNNING until then, and the next round takes it again.
LEASE_SECONDS = 20 * 60
# Alipay's bill of a day is ready from about 10:00 the next day (Asia/Shanghai).
BILLS_READY = time(10, 0)
# The scheduled round looks this far back for days never run, or failed.
LOOKBACK_DAYS = 7
SYSTEM = domain.SYSTEM_OPERATOR
_INSERT_BATCH = 1000


# --- the matcher --------------------------------------------------------------


@dataclass
class _Findings:
    differences: list[Difference] = field(default_factory=list)
    extras: list[Extra] = field(default_factory=list)
    late_payments: list[tuple[Difference, Order]] = field(default_factory=list)
    alipay: Side = field(default_factory=Side)


class _ShopSide:
    """The shop's payments and refunds of the day, in a scratch SQLite file."""

    def __init__(self, directory: str) -> None:
        self.db = sqlite3.connect(os.path.join(directory, "shop.sqlite"))
        self.db.execute("CREATE TABLE shop (key TEXT PRIMARY KEY, entry TEXT, order_id TEXT,"
                        " trade_no TEXT, refund_id TEXT, fen INTEGER, status TEXT, at TEXT,"
                        " matched INTEGER DEFAULT 0)")
        self.side = Side()

    def load(self, payments: Iterable[PaidRecord], refunds: Iterable[Refund]) -> None:
        rows: list[tuple[Any, ...]] = []
        for p in payments:
            rows.append((f"P:{p.trade_no}", EntryKind.PAYMENT.value, p.order_id, p.trade_no,
                         None, p.total_fen, p.status.value, iso(p.pay_time)))
            self.side = self.side.add(EntryKind.PAYMENT, p.total_fen)
            self._flush(rows)
        for r in refunds:
            rows.append((f"R:{r.id}", EntryKind.REFUND.value, r.order_id, None, r.id,
                         -r.amount_fen, r.status.value, iso(r.finish_time)))
            self.side = self.side.add(EntryKind.REFUND, -r.amount_fen)
            self._flush(rows)
        self._flush(rows, force=True)

    def _flush(self, rows: list[tuple[Any, ...]], force: bool = False) -> None:
        if rows and (force or len(rows) >= _INSERT_BATCH):
            self.db.executemany("INSERT OR REPLACE INTO shop (key, entry, order_id, trade_no,"
                                " refund_id, fen, status, at) VALUES (?,?,?,?,?,?,?,?)", rows)
            rows.clear()

    def take(self, key: str) -> dict[str, Any] | None:
        """The record under `key`, marked matched; None when there is none."""
        found = self.db.execute("SELECT entry, order_id, trade_no, refund_id, fen, status, at"
                                " FROM shop WHERE key = ?", (key,)).fetchone()
        if found is None:
            return None
        self.db.execute("UPDATE shop SET matched = 1 WHERE key = ?", (key,))
        return _shop_record(*found)

    def unmatched(self) -> Iterator[dict[str, Any]]:
        for found in self.db.execute("SELECT entry, order_id, trade_no, refund_id, fen,"
                                     " status, at FROM shop WHERE matched = 0 ORDER BY key"):
            yield _shop_record(*found)

    def close(self) -> None:
        self.db.close()


def _shop_record(entry: str, order_id: str, trade_no: str | None, refund_id: str | None,
                 fen: int, status: str, at: str | None) -> dict[str, Any]:
    return {"entry": entry, "orderId": order_id, "tradeNo": trade_no, "refundId": refund_id,
            "amount": money_str(fen), "amountFen": fen, "status": status, "time": at}


def _order_record(order: Order) -> dict[str, Any]:
    return {"entry": EntryKind.PAYMENT.value, "orderId": order.id,
            "tradeNo": order.transaction_id, "refundId": None,
            "amount": money_str(order.total_fen), "amountFen": order.total_fen,
            "status": order.status.value, "time": iso(order.pay_time)}


def _refund_record(refund: Refund) -> dict[str, Any]:
    return {"entry": EntryKind.REFUND.value, "orderId": refund.order_id, "tradeNo": None,
            "refundId": refund.id, "amount": money_str(-refund.amount_fen),
            "amountFen": -refund.amount_fen, "status": refund.status.value,
            "time": iso(refund.finish_time)}


def _evidence(row: BillRow) -> dict[str, Any]:
    return {**row.raw, "line": row.line_no}


class _Matcher:
    def __init__(self, deps: Deps, day: date, shop: _ShopSide) -> None:
        self.deps = deps
        self.day = day
        self.shop = shop
        self.found = _Findings()

    def _difference(self, kind: DifferenceKind, entry: EntryKind, key: str, *,
                    order_id: str | None, trade_no: str | None, refund_id: str | None,
                    alipay: dict[str, Any] | None, shop: dict[str, Any] | None) -> Difference:
        d = Difference(id=difference_id(kind, entry, key), day=self.day, kind=kind,
                       entry=entry, order_id=order_id, trade_no=trade_no, refund_id=refund_id,
                       alipay=alipay, shop=shop)
        self.found.differences.append(d)
        return d

    def row(self, row: BillRow) -> None:
        if row.kind == RowKind.PAYMENT:
            self.found.alipay = self.found.alipay.add(EntryKind.PAYMENT, row.amount_fen)
            self._payment(row)
        else:
            self.found.alipay = self.found.alipay.add(EntryKind.REFUND, row.amount_fen)
            self._refund(row)

    def _payment(self, row: BillRow) -> None:
        entry = EntryKind.PAYMENT
        mine = self.shop.take(f"P:{row.trade_no}")
        ids = {"order_id": row.out_trade_no, "trade_no": row.trade_no, "refund_id": None}
        if mine is not None:
            if mine["amountFen"] != row.amount_fen:
                self._difference(DifferenceKind.AMOUNT_MISMATCH, entry, row.trade_no, **ids,
                                 alipay=_evidence(row), shop=mine)
            return
        self.found.extras.append(Extra(row.trade_no, entry, row.out_trade_no, row.amount_fen))
        order = (self.deps.store.get_order(row.out_trade_no, consistent=False)
                 if domain.ORDER_ID_RE.fullmatch(row.out_trade_no) else None)
        if order is None:
            self._difference(DifferenceKind.ALIPAY_ONLY, entry, row.trade_no, **ids,
                             alipay=_evidence(row), shop=None)
        elif order.pay_time is not None and order.transaction_id == row.trade_no:
            if order.total_fen != row.amount_fen:  # filed under another day by the shop
                self._difference(DifferenceKind.AMOUNT_MISMATCH, entry, row.trade_no, **ids,
                                 alipay=_evidence(row), shop=_order_record(order))
        else:  # UNPAID, closed (its late payment), or PAID by another trade
            d = self._difference(DifferenceKind.STATUS_MISMATCH, entry, row.trade_no, **ids,
                                 alipay=_evidence(row), shop=_order_record(order))
            if order.status in (CLOSED, REFUNDED) and order.pay_time is None:
                self.found.late_payments.append((d, order))

    def _refund(self, row: BillRow) -> None:
        entry = EntryKind.REFUND
        request_no = row.request_no or ""
        amount = row.amount_fen  # negative, as the bill says it
        ids = {"order_id": row.out_trade_no, "trade_no": row.trade_no,
               "refund_id": request_no or None}
        mine = self.shop.take(f"R:{request_no}")
        if mine is not None:
            if mine["amountFen"] != amount:
                self._difference(DifferenceKind.AMOUNT_MISMATCH, entry, request_no, **ids,
                                 alipay=_evidence(row), shop=mine)
            return
        key = request_no or f"{row.trade_no}#{row.line_no}"
        self.found.extras.append(Extra(key, entry, row.out_trade_no, amount))
        refund = (self.deps.store.get_refund(request_no)
                  if domain.REFUND_ID_RE.fullmatch(request_no) else None)
        if refund is None:  # e.g. made in the provider's own console
            self._difference(DifferenceKind.ALIPAY_ONLY, entry, key, **ids,
                             alipay=_evidence(row), shop=None)
        elif refund.status != RefundStatus.SUCCEEDED:
            self._difference(DifferenceKind.STATUS_MISMATCH, entry, key, **ids,
                             alipay=_evidence(row), shop=_refund_record(refund))
        elif -refund.amount_fen != amount:
            self._difference(DifferenceKind.AMOUNT_MISMATCH, entry, key, **ids,
                             alipay=_evidence(row), shop=_refund_record(refund))

    def carry(self, finished: set[date]) -> list[Carried]:
        """The shop's records the bill lacked: found nearby, still carried, or (the
        two following days read without them) SHOP_ONLY."""
        carried: list[Carried] = []
        nearby = [self.day + timedelta(days=n) for n in range(-CARRY_DAYS, CARRY_DAYS + 1)
                  if n]
        settled = all(self.day + timedelta(days=n) in finished
                      for n in range(1, CARRY_DAYS + 1))
        for record in self.shop.unmatched():
            entry = EntryKind(record["entry"])
            key = record["tradeNo"] if entry == EntryKind.PAYMENT else record["refundId"]
            found_in = next((d for d in nearby if self.deps.store.get_extra(d, key)), None)
            if found_in is not None or not settled:
                carried.append(Carried(entry, record["orderId"], record["tradeNo"],
                                       record["refundId"], found_in))
                continue
            self._difference(DifferenceKind.SHOP_ONLY, entry, key, order_id=record["orderId"],
                             trade_no=record["tradeNo"], refund_id=record["refundId"],
                             alipay=None, shop=record)
        return carried


# --- running a day --------------------------------------------------------------


def run_day(deps: Deps, day: date, *, requested_by: str | None = None,
            follow: bool = True) -> Report:
    """Reconciles `day` and answers its report (FINISHED or FAILED; RUNNING when
    another run of the day holds it). `follow`: then the nearby days that still
    carry records are run again."""
    if deps.gateway is None:
        raise Unavailable("payment is not configured: no bill to read")
    now = deps.clock()
    if day > bill_day(now):
        raise Invalid(f"{day} has not come yet: it has no bill")
    if requested_by is None:  # an operator's request the round takes up
        prior = deps.store.get_reconciliation(day, differences=False)
        requested_by = prior.requested_by if prior else None
    report = Report(day, ReportStatus.RUNNING, secrets.token_hex(8), now,
                    requested_by=requested_by)
    if not deps.store.start_reconciliation(report, now=now, lease_seconds=LEASE_SECONDS):
        log.info("reconciliation of %s: another run holds it", day)
        held = deps.store.get_reconciliation(day, differences=False)
        return held or report
    log.info("reconciliation of %s started (run %s)", day, report.run_id,
             extra={"day": day.isoformat(), "runId": report.run_id})
    try:
        finished = _run(deps, report)
    except _Failed as exc:
        return _fail(deps, report, exc.reason, exc.bill_key)
    except Exception as exc:
        # Whatever went wrong, the day says FAILED at once rather than RUNNING until
        # its lease ends; the error still reaches the caller's log.
        _fail(deps, report, f"the run stopped: {type(exc).__name__}: {exc}"[:500], None)
        raise
    if follow:
        _follow(deps, day)
    return finished


def _fail(deps: Deps, report: Report, reason: str, bill_key: str | None) -> Report:
    failed = replace(report, status=ReportStatus.FAILED, reason=reason, bill_key=bill_key,
                     finished_at=deps.clock())
    log.warning("reconciliation of %s FAILED: %s", report.day, reason,
                extra={"day": report.day.isoformat()})
    try:
        if not deps.store.fail_reconciliation(failed):
            log.warning("reconciliation of %s: the run lost its lease", report.day)
    except Unavailable:
        log.warning("reconciliation of %s: FAILED not recorded (the store is not "
                    "answering); the day stays RUNNING until the run's lease ends", report.day)
    return failed


class _Failed(Exception):
    def __init__(self, reason: str, bill_key: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.bill_key = bill_key


def _run(deps: Deps, report: Report) -> Report:
    day = report.day
    assert deps.gateway is not None
    with tempfile.TemporaryDirectory(prefix="reconcile-") as scratch:
        path = os.path.join(scratch, "bill.zip")
        with open(path, "w+b") as raw:
            has_bill, bill_key = _fetch(deps, day, raw, path)
            shop = _ShopSide(scratch)
            try:
                matcher = _Matcher(deps, day, shop)
                try:
                    shop.load(deps.store.paid_on(day), deps.store.refunds_succeeded_on(day))
                    if has_bill:
                        with BillReader(raw) as bill:
                            for row in bill.rows():
                                matcher.row(row)
                    finished = {d for d in (day + timedelta(days=n)
                                            for n in range(1, CARRY_DAYS + 1))
                                if _finished(deps, d)}
                    carried = matcher.carry(finished)
                except BillError as exc:
                    raise _Failed(f"{exc}{_kept(bill_key)}", bill_key) from exc
                except Unavailable as exc:
                    raise _Failed(f"the shop's records could not be read: {exc}",
                                  bill_key) from exc
            finally:
                shop.close()
    found = matcher.found
    differences = _act_on_late_payments(deps, found)
    status = ReportStatus.DIFFERENCES if differences else ReportStatus.BALANCED
    result = replace(report, status=status, alipay=found.alipay, shop=shop.side,
                     carried=tuple(carried), bill_key=bill_key, finished_at=deps.clock())
    if not deps.store.finish_reconciliation(result, differences, found.extras):
        log.warning("reconciliation of %s: the run lost its lease; its result is not "
                    "written", day)
        return deps.store.get_reconciliation(day) or result
    log.info("reconciliation of %s %s: %d differences, %d carried", day, status.value,
             len(differences), len(carried),
             extra={"day": day.isoformat(), "differences": len(differences)})
    return deps.store.get_reconciliation(day) or result


def _kept(bill_key: str | None) -> str:
    return f" (the file is kept as {bill_key})" if bill_key else ""


def _fetch(deps: Deps, day: date, raw: IO[bytes], path: str) -> tuple[bool, str | None]:
    """Downloads the day's bill into `raw` (the file at `path`) and keeps it:
    (whether there is a bill, the key it is kept under)."""
    assert deps.gateway is not None
    try:
        url = deps.gateway.bill_url(day)
    except PaymentRefused as exc:
        raise _Failed(f"Alipay refused the bill of {day}: {exc.reason} {exc.detail}".strip()
                      ) from exc
    except PaymentUnavailable as exc:
        raise _Failed(f"Alipay did not answer the bill query of {day}: {exc}") from exc
    if url is None:
        now = deps.clock().astimezone(SHANGHAI)
        if now < datetime.combine(day + timedelta(days=1), BILLS_READY, SHANGHAI):
            # Before its bill is made, Alipay says the same "no bill" as for a day
            # without trades: only after that hour does it mean there were none.
            raise _Failed(f"Alipay has no bill of {day} yet: it is made by "
                          f"{BILLS_READY:%H:%M} Asia/Shanghai the next day")
        return False, None  # no trade that day, says Alipay
    try:
        size = deps.gateway.download_bill(url, raw)
    except PaymentUnavailable as exc:
        raise _Failed(f"the bill of {day} could not be downloaded: {exc}") from exc
    raw.flush()
    bill_key = None
    if deps.archive is not None:
        try:
            # A handle of its own: boto3's upload closes the file it was given.
            with open(path, "rb") as copy:
                bill_key = deps.archive.keep(day, f"{day:%Y%m%d}_trade.zip", copy)
        except Unavailable as exc:
            raise _Failed(f"the bill of {day} could not be kept: {exc}") from exc
    else:
        log.warning("no bills bucket: the bill of %s (%d bytes) is not kept", day, size)
    raw.seek(0)
    return True, bill_key


def _finished(deps: Deps, day: date) -> bool:
    report = deps.store.get_reconciliation(day, differences=False)
    return report is not None and report.status in FINISHED


def _act_on_late_payments(deps: Deps, found: _Findings) -> list[Difference]:
    """Money the bill holds for an order the shop closed goes back, once, after a
    signed query confirmed it; the difference says what was done."""
    acted: dict[str, Difference] = {}
    for d, order in found.late_payments:
        acted[d.id] = _return_late_payment(deps, d, order)
    return [acted.get(d.id, d) for d in found.differences]


def _return_late_payment(deps: Deps, d: Difference, order: Order) -> Difference:
    assert deps.gateway is not None
    refund_id = domain.refund_request_no(order.id)
    try:
        if order.status == CLOSED:
            trade = deps.gateway.query_trade(order.id)
            if trade is None or not trade.paid or trade.trade_no != d.trade_no:
                state = trade.state.value if trade else "NOT_FOUND"
                return replace(d, action={"verified": False, "trade": state})
            handlers.return_late_payment(deps, order, trade.trade_no or "")
        refund = deps.store.get_refund(refund_id)
    except (PaymentRefused, PaymentUnavailable, Unavailable, domain.Unprocessable) as exc:
        log.warning("reconciliation: the late payment of %s not returned yet: %s", order.id,
                    exc, extra={"orderId": order.id})
        return replace(d, action={"verified": None, "error": str(exc)[:200]})
    if refund is None:
        return replace(d, action={"verified": True, "refundId": None})
    action = {"verified": True, "refundId": refund.id, "refundStatus": refund.status.value}
    if refund.status == RefundStatus.SUCCEEDED:
        return replace(d, action=action, resolved=True, resolved_by=SYSTEM,
                       note=f"paid after the order closed; refunded by {refund.id}",
                       resolved_at=refund.finish_time)
    return replace(d, action=action)


def _follow(deps: Deps, day: date) -> None:
    """Runs the nearby finished days again that still carry records: this day's
    extras may hold them, or this day's report may settle them as SHOP_ONLY."""
    for n in (-2, -1, 1, 2):
        other = day + timedelta(days=n)
        report = deps.store.get_reconciliation(other, differences=False)
        if report is not None and report.status in FINISHED and report.pending:
            run_day(deps, other, follow=False)


# --- what the routes, the CLI and the schedule call ---------------------------------


def start(deps: Deps, day_text: Any, operator: str) -> tuple[bool, dict[str, Any]]:
    """POST /admin/reconciliations/{day}: (finished now, the answer). Run inside the
    request where the settings allow it; else recorded for the reconciler's round."""
    day = parse_day(day_text)
    if day > bill_day(deps.clock()):
        raise Invalid(f"{day} has not come yet: it has no bill")
    log.info("reconciliation of %s asked for by %s", day, operator,
             extra={"day": day.isoformat(), "operator": operator})
    if deps.settings.reconcile_inline:
        report = run_day(deps, day, requested_by=operator)
        if report.status != ReportStatus.RUNNING:
            return True, report.to_wire()
    else:
        deps.store.request_reconciliation(day, by=operator, now=deps.clock())
    return False, {"date": day.isoformat(), "status": ReportStatus.RUNNING.value}


def get_report(deps: Deps, day_text: Any) -> dict[str, Any]:
    day = parse_day(day_text)
    report = deps.store.get_reconciliation(day)
    if report is None:
        raise ReconciliationNotFound(f"{day} was never reconciled")
    return report.to_wire()


def list_reports(deps: Deps, limit: int = 100) -> dict[str, Any]:
    return {"items": [r.summary() for r in deps.store.list_reconciliations(limit)]}


def resolve(deps: Deps, day_text: Any, difference: Any, note: Any,
            operator: str) -> dict[str, Any]:
    day = parse_day(day_text)
    if not isinstance(difference, str) or not domain.reconciliation.DIFFERENCE_ID_RE.fullmatch(
            difference):
        raise ReconciliationNotFound(f"no difference {difference!r} on {day}")
    text = check_note(note)
    done = deps.store.resolve_difference(day, difference, note=text, by=operator,
                                         now=deps.clock())
    if done is None:
        raise ReconciliationNotFound(f"no difference {difference} on {day}")
    log.info("difference %s of %s resolved by %s", difference, day, operator,
             extra={"day": day.isoformat(), "operator": operator})
    return done.to_wire()


CSV_COLUMNS = ("id", "date", "kind", "entry", "orderId", "tradeNo", "refundId",
               "alipayAmount", "shopAmount", "resolved", "note", "resolvedBy", "resolvedAt")
_FORMULA_START = ("=", "+", "@", "\t", "\r")


def differences_csv(deps: Deps, day_text: Any) -> str:
    """The day's differences, one a line (UTF-8; a cell a spreadsheet would take for
    a formula is prefixed with ')."""
    day = parse_day(day_text)
    report = deps.store.get_reconciliation(day)
    if report is None:
        raise ReconciliationNotFound(f"{day} was never reconciled")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for d in report.to_wire()["differences"]:
        alipay = (d["alipay"] or {}).get("订单金额（元）")
        shop = (d["shop"] or {}).get("amount")
        cells = [d["id"], d["date"], d["kind"], d["entry"], d["orderId"], d["tradeNo"],
                 d["refundId"], alipay, shop, "yes" if d["resolved"] else "no", d["note"],
                 d["resolvedBy"], d["resolvedAt"]]
        writer.writerow([_cell(c) for c in cells])
    return out.getvalue()


def _cell(value: Any) -> str:
    text = "" if value is None else str(value)
    if text.startswith(_FORMULA_START) or (text.startswith("-") and not _is_amount(text)):
        return "'" + text
    return text


def _is_amount(text: str) -> bool:
    return domain.parse_amount(text.removeprefix("-")) is not None


def due_days(deps: Deps, now: datetime) -> list[date]:
    """Days of the last LOOKBACK_DAYS whose bill is ready and that have no finished
    report (never run, failed, or a run that died), oldest first."""
    local = now.astimezone(SHANGHAI)
    last = local.date() - timedelta(days=1 if local.time() >= BILLS_READY else 2)
    days = [last - timedelta(days=n) for n in range(LOOKBACK_DAYS - 1, -1, -1)]
    return [d for d in days if not _finished(deps, d)]


def run_scheduled(deps: Deps) -> dict[str, Any]:
    """The reconciler's round: the days operators asked for, then the due days."""
    ran: dict[str, str] = {}
    for day in [*deps.store.requested_days(), *due_days(deps, deps.clock())]:
        if day.isoformat() in ran:
            continue
        try:
            ran[day.isoformat()] = run_day(deps, day).status.value
        except (Unavailable, Invalid) as exc:
            log.warning("reconciliation of %s not run: %s", day, exc)
            ran[day.isoformat()] = f"not run: {exc}"
    return {"ran": ran}
