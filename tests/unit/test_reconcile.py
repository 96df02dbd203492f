"""The daily reconciliation on fakes: the in-memory store, the fake gateway serving
bills the sandbox's writer makes, an archive in a dict. Each kind of difference,
the carried records of the days around, the late payment refunded once, bad
bills, runs again, and the operator routes."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import time as time_module
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import pytest

from chalicelib import handlers, reconcile
from chalicelib.domain import CLOSED, REFUNDED, RefundStatus
from chalicelib.domain.reconciliation import SHANGHAI, ReportStatus
from chalicelib.ports import PaymentRefused, PaymentUnavailable, Trade, TradeState
from local.alipay_sandbox.bills import PAYMENT, REFUND, BillRecord, bill_bytes
from tests.conftest import DictArchive, body, check_due, fake_notify, operator_bearer

D = date(2026, 12, 1)


def at(day: date, hour: int = 12, minute: int = 0, second: int = 0) -> datetime:
    return datetime.combine(day, time(hour, minute, second), SHANGHAI).astimezone(UTC)


@pytest.fixture
def d(app_deps: Any) -> Any:
    app_deps.archive = DictArchive()
    app_deps.clock.now = at(D + timedelta(days=3), 11)
    return app_deps


def order(d: Any, user: str = "alice", **cart: int) -> dict[str, Any]:
    now = d.clock.now
    for gid, num in (cart or {"g1": 1}).items():  # g1: 19.90
        d.store.set_cart_line(user, gid, num)
    created = handlers.create_order(d, user)
    d.clock.now = now
    return created


def pay(d: Any, o: dict[str, Any], trade_no: str, when: datetime) -> None:
    gmt = when.astimezone(SHANGHAI).strftime("%Y-%m-%d %H:%M:%S")
    handlers.on_paid(d, {"orderId": o["id"], "tradeNo": trade_no,
                         "totalAmount": o["totalMoney"], "payTime": when.isoformat(),
                         "notifyId": "n1",
                         "notify": fake_notify(o["id"], trade_no, o["totalMoney"],
                                               gmt_payment=gmt)})


def paid(d: Any, trade_no: str, when: datetime, user: str = "alice") -> dict[str, Any]:
    o = order(d, user)
    pay(d, o, trade_no, when)
    return o


def refund(d: Any, order_id: str, amount: str, when: datetime) -> str:
    from chalicelib import refunds

    now = d.clock.now
    d.clock.now = when
    made, _ = refunds.request_refund(d, "carol", order_id, amount, "returned", None)
    d.clock.now = now
    assert made.status == RefundStatus.SUCCEEDED
    return made.id


def row(kind: str, trade_no: str, order_id: str, amount: str, when: datetime,
        request_no: str | None = None) -> BillRecord:
    return BillRecord(kind, trade_no, order_id, "cup", amount, when - timedelta(minutes=1),
                      when, out_request_no=request_no)


def serve(d: Any, day: date, *rows: BillRecord, corrupt: str | None = None) -> None:
    d.gateway.bills[day] = bill_bytes(rows, day=day, corrupt=corrupt)


def kinds(report: Any) -> list[tuple[str, str | None]]:
    return sorted((x["kind"], x["refundId"] if x["entry"] == "REFUND" else x["tradeNo"])
                  for x in report["differences"])


def run(d: Any, day: date) -> dict[str, Any]:
    return reconcile.run_day(d, day).to_wire()


# --- balanced ---------------------------------------------------------------------


def test_a_day_that_matches_is_balanced_with_equal_sums(d: Any) -> None:
    a = paid(d, "T1", at(D, 9))
    b = paid(d, "T2", at(D, 10), user="bob")
    r1 = refund(d, a["id"], "5.00", at(D, 11))
    serve(d, D, row(PAYMENT, "T1", a["id"], "19.90", at(D, 9)),
          row(PAYMENT, "T2", b["id"], "19.90", at(D, 10)),
          row(REFUND, "T1", a["id"], "5.00", at(D, 11), request_no=r1))
    report = run(d, D)
    assert report["status"] == "BALANCED" and report["differences"] == []
    assert report["carried"] == [] and report["reason"] is None
    assert report["alipay"] == report["shop"] == {
        "payments": 2, "paymentsTotal": "39.80", "refunds": 1, "refundsTotal": "-5.00"}
    assert report["billKey"] in d.archive.kept  # the raw file, unchanged
    assert d.archive.kept[report["billKey"]] == d.gateway.bills[D]


def test_a_day_without_a_bill_and_without_trades_is_balanced(d: Any) -> None:
    report = run(d, D)
    assert report["status"] == "BALANCED"
    assert report["alipay"] == report["shop"] == {
        "payments": 0, "paymentsTotal": "0.00", "refunds": 0, "refundsTotal": "0.00"}


# --- each kind of difference -------------------------------------------------------


def test_each_kind_of_difference_is_named_once_and_nothing_else(d: Any) -> None:
    matched = paid(d, "T1", at(D, 9))
    short = paid(d, "T2", at(D, 9), user="bob")  # the bill says 1.00
    missing = paid(d, "T3", at(D, 9), user="cleo")  # no bill of the days around has it
    unpaid = order(d, "dan")  # the bill has it paid
    serve(d, D, row(PAYMENT, "T1", matched["id"], "19.90", at(D, 9)),
          row(PAYMENT, "T2", short["id"], "1.00", at(D, 9)),
          row(PAYMENT, "T4", unpaid["id"], "19.90", at(D, 10)),
          row(PAYMENT, "T9", "ORDER_1_unknown", "3.00", at(D, 10)),  # not ours
          row(REFUND, "T1", matched["id"], "2.00", at(D, 11), request_no="CONSOLE_1"))
    first = run(d, D)
    assert first["status"] == "DIFFERENCES"
    assert [c["tradeNo"] for c in first["carried"]] == ["T3"]  # not yet a difference
    serve(d, D + timedelta(days=1))
    run(d, D + timedelta(days=1))
    run(d, D + timedelta(days=2))  # the second day after: T3 is SHOP_ONLY now
    report = reconcile.get_report(d, D.isoformat())
    assert kinds(report) == sorted([
        ("AMOUNT_MISMATCH", "T2"), ("SHOP_ONLY", "T3"), ("STATUS_MISMATCH", "T4"),
        ("ALIPAY_ONLY", "T9"), ("ALIPAY_ONLY", "CONSOLE_1")])
    console = next(x for x in report["differences"] if x["entry"] == "REFUND")
    assert console["refundId"] == "CONSOLE_1" and console["kind"] == "ALIPAY_ONLY"
    assert console["alipay"]["退款批次号/请求号"] == "CONSOLE_1" and console["shop"] is None
    short_diff = next(x for x in report["differences"] if x["tradeNo"] == "T2")
    assert short_diff["shop"]["amount"] == "19.90"
    assert short_diff["alipay"]["订单金额（元）"] == "1.00"
    assert report["carried"] == []
    assert missing["id"] in {x["orderId"] for x in report["differences"]}
    assert report["alipay"]["payments"] == 4 and report["shop"]["payments"] == 3


def test_a_refund_the_shop_has_pending_is_a_status_difference(d: Any) -> None:
    from chalicelib import refunds

    o = paid(d, "T1", at(D, 9))
    d.gateway.refund_error = PaymentUnavailable("timeout")
    d.clock.now = at(D, 11)
    pending, _ = refunds.request_refund(d, "carol", o["id"], "5.00", "r", None)
    d.gateway.refund_error = None
    assert pending.status == RefundStatus.PENDING
    d.clock.now = at(D + timedelta(days=3), 11)
    serve(d, D, row(PAYMENT, "T1", o["id"], "19.90", at(D, 9)),
          row(REFUND, "T1", o["id"], "5.00", at(D, 11), request_no=pending.id))
    assert kinds(run(d, D)) == [("STATUS_MISMATCH", pending.id)]


# --- the days around ----------------------------------------------------------------


def test_a_payment_at_midnight_is_carried_and_found_in_the_next_days_bill(d: Any) -> None:
    late = paid(d, "T1", at(D, 23, 59, 59))
    serve(d, D)  # Alipay put it in tomorrow's bill
    serve(d, D + timedelta(days=1),
          row(PAYMENT, "T1", late["id"], "19.90", at(D + timedelta(days=1), 0, 0, 2)))
    first = run(d, D)
    assert first["status"] == "BALANCED"
    assert first["carried"] == [{"entry": "PAYMENT", "orderId": late["id"], "tradeNo": "T1",
                                 "refundId": None, "foundIn": None}]
    next_day = run(d, D + timedelta(days=1))
    assert next_day["status"] == "BALANCED" and next_day["differences"] == []
    run(d, D + timedelta(days=2))
    again = reconcile.get_report(d, D.isoformat())
    assert again["status"] == "BALANCED"
    assert [c["foundIn"] for c in again["carried"]] == [(D + timedelta(days=1)).isoformat()]


# --- the late payment -----------------------------------------------------------------


def test_money_for_a_closed_order_is_found_and_refunded_once(d: Any) -> None:
    o = order(d)
    check_due(d, o["id"])  # closed: nobody paid, says the (fake) provider
    assert d.store.get_order(o["id"]).status == CLOSED
    d.clock.now = at(D + timedelta(days=3), 11)
    # ...but the shopper paid through the old link; the notify was lost
    d.gateway.trades[o["id"]] = Trade(o["id"], "T7", TradeState.PAID, 1990, at(D, 9))
    serve(d, D, row(PAYMENT, "T7", o["id"], "19.90", at(D, 9)))
    report = run(d, D)
    (diff,) = report["differences"]
    assert diff["kind"] == "STATUS_MISMATCH" and diff["shop"]["status"] == "CLOSED"
    assert diff["action"]["refundStatus"] == "SUCCEEDED"
    assert diff["resolved"] is True and diff["resolvedBy"] == "system"
    assert d.store.get_order(o["id"]).status == REFUNDED
    assert [r[2] for r in d.gateway.refunds] == [f"REFUND_{o['id']}"]
    again = run(d, D)  # the same day again: the same difference, no second refund
    assert [x["id"] for x in again["differences"]] == [diff["id"]]
    assert len(d.gateway.refunds) == 1


def test_money_for_a_closed_order_is_not_refunded_unless_the_query_confirms(d: Any) -> None:
    o = order(d)
    check_due(d, o["id"])
    d.clock.now = at(D + timedelta(days=3), 11)
    serve(d, D, row(PAYMENT, "T7", o["id"], "19.90", at(D, 9)))  # the query says nothing
    (diff,) = run(d, D)["differences"]
    assert diff["action"] == {"verified": False, "trade": "NOT_FOUND"}
    assert diff["resolved"] is False and d.gateway.refunds == []


# --- bad bills ---------------------------------------------------------------------


@pytest.mark.parametrize("corrupt, words", [
    ("not-zip", "not a zip"), ("utf8", "GBK"), ("no-footer", "footer"),
    ("bad-total", "total"), ("bad-amount", "amount")])
def test_a_bad_bill_fails_the_run_keeps_the_file_and_the_next_run_starts_clean(
        d: Any, corrupt: str, words: str) -> None:
    o = paid(d, "T1", at(D, 9))
    good = row(PAYMENT, "T1", o["id"], "19.90", at(D, 9))
    serve(d, D, good, corrupt=corrupt)
    failed = run(d, D)
    assert failed["status"] == "FAILED" and failed["differences"] == []
    assert words.lower() in failed["reason"].lower(), failed["reason"]
    assert failed["billKey"] in failed["reason"]
    assert d.archive.kept[failed["billKey"]] == d.gateway.bills[D]
    assert reconcile.get_report(d, D.isoformat())["status"] == "FAILED"
    assert body_of_attention(d)["failedRuns"] == [D.isoformat()]
    serve(d, D, good)
    assert run(d, D)["status"] == "BALANCED"
    assert body_of_attention(d)["failedRuns"] == []


def test_a_failed_line_is_named(d: Any) -> None:
    o = paid(d, "T1", at(D, 9))
    serve(d, D, row(PAYMENT, "T1", o["id"], "19.90", at(D, 9)), corrupt="bad-amount")
    assert "line" in run(d, D)["reason"]


@pytest.mark.parametrize("error, words", [
    (PaymentRefused("isp.bill_not_ready"), "refused"),
    (PaymentUnavailable("timed out"), "did not answer")])
def test_a_refused_or_unanswered_bill_query_fails_the_run(d: Any, error: Exception,
                                                         words: str) -> None:
    d.gateway.bill_error = error
    report = run(d, D)
    assert report["status"] == "FAILED" and words in report["reason"]


def test_a_download_that_times_out_fails_the_run(d: Any) -> None:
    serve(d, D)
    d.gateway.download_error = PaymentUnavailable("read timed out")
    report = run(d, D)
    assert report["status"] == "FAILED" and "downloaded" in report["reason"]


def test_a_corrupt_bill_acts_on_nothing(d: Any) -> None:
    o = order(d)
    check_due(d, o["id"])
    d.clock.now = at(D + timedelta(days=3), 11)
    d.gateway.trades[o["id"]] = Trade(o["id"], "T7", TradeState.PAID, 1990, at(D, 9))
    serve(d, D, row(PAYMENT, "T7", o["id"], "19.90", at(D, 9)), corrupt="no-footer")
    assert run(d, D)["status"] == "FAILED"
    assert d.gateway.refunds == [] and d.store.get_order(o["id"]).status == CLOSED


# --- runs again ---------------------------------------------------------------------


def test_running_a_day_again_keeps_resolutions_and_lists_nothing_twice(d: Any) -> None:
    serve(d, D, row(PAYMENT, "T9", "ORDER_1_unknown", "3.00", at(D, 10)),
          row(PAYMENT, "T8", "ORDER_2_unknown", "4.00", at(D, 10)))
    first = run(d, D)
    target = first["differences"][0]["id"]
    reconcile.resolve(d, D.isoformat(), target, "refunded by hand in the console", "carol")
    second = run(d, D)
    assert sorted(x["id"] for x in second["differences"]) == sorted(
        x["id"] for x in first["differences"])
    kept = next(x for x in second["differences"] if x["id"] == target)
    assert kept["resolved"] and kept["note"] == "refunded by hand in the console"
    assert kept["resolvedBy"] == "carol"
    assert [x["id"] for x in body_of_attention(d)["reconciliation"]] == [
        x["id"] for x in second["differences"] if x["id"] != target]


def test_a_difference_that_went_away_is_gone_after_the_next_run(d: Any) -> None:
    serve(d, D, row(PAYMENT, "T9", "ORDER_1_unknown", "3.00", at(D, 10)))
    assert run(d, D)["status"] == "DIFFERENCES"
    serve(d, D)
    assert run(d, D)["differences"] == []
    assert body_of_attention(d)["reconciliation"] == []


def test_a_run_holding_the_day_keeps_a_second_run_out(d: Any) -> None:
    from chalicelib.domain.reconciliation import Report

    holder = Report(D, ReportStatus.RUNNING, "other", d.clock())
    assert d.store.start_reconciliation(holder, now=d.clock(), lease_seconds=600)
    assert reconcile.run_day(d, D).status == ReportStatus.RUNNING
    d.clock.now += timedelta(seconds=reconcile.LEASE_SECONDS + 1)  # that run died
    assert reconcile.run_day(d, D).status == ReportStatus.BALANCED


# --- the schedule -------------------------------------------------------------------


def test_due_days_wait_for_ten_oclock_and_skip_finished_days(d: Any) -> None:
    today = D + timedelta(days=3)
    before = reconcile.due_days(d, at(today, 9, 59))
    after = reconcile.due_days(d, at(today, 10, 0))
    assert before[-1] == today - timedelta(days=2) and after[-1] == today - timedelta(days=1)
    assert len(after) == reconcile.LOOKBACK_DAYS
    run(d, today - timedelta(days=1))
    assert reconcile.due_days(d, at(today, 10, 0))[-1] == today - timedelta(days=2)


def test_the_round_runs_requested_and_due_days(d: Any) -> None:
    d.settings = dataclasses.replace(d.settings, reconcile_inline=False)
    finished, answer = reconcile.start(d, D.isoformat(), "carol")
    assert not finished and answer == {"date": D.isoformat(), "status": "RUNNING"}
    assert d.store.requested_days() == [D]
    result = reconcile.run_scheduled(d)
    assert result["ran"][D.isoformat()] == "BALANCED"
    assert len(result["ran"]) == reconcile.LOOKBACK_DAYS  # D is one of the due days too
    assert d.store.requested_days() == []
    assert reconcile.get_report(d, D.isoformat())["requestedBy"] == "carol"
    assert reconcile.run_scheduled(d)["ran"] == {}  # nothing left


# --- the routes ---------------------------------------------------------------------


def body_of_attention(d: Any) -> dict[str, Any]:
    from chalicelib import admin

    return admin.attention(d)


def test_the_routes_run_list_show_resolve_and_export(client: Any, d: Any) -> None:
    serve(d, D, row(PAYMENT, "T9", "ORDER_1_unknown", "3.00", at(D, 10)))
    h = operator_bearer()
    ran = client.http.post(f"/admin/reconciliations/{D}", headers=h)
    assert ran.status_code == 200 and body(ran)["status"] == "DIFFERENCES"
    listed = body(client.http.get("/admin/reconciliations", headers=h))
    assert [x["date"] for x in listed["items"]] == [D.isoformat()]
    report = body(client.http.get(f"/admin/reconciliations/{D}", headers=h))
    (diff,) = report["differences"]
    assert diff["kind"] == "ALIPAY_ONLY" and diff["tradeNo"] == "T9"
    url = f"/admin/reconciliations/{D}/differences/{diff['id']}/resolve"
    assert client.http.post(url, headers=h, body="{}").status_code == 400
    done = client.http.post(url, headers=h, body='{"note": "a test payment, refunded"}')
    assert done.status_code == 200
    assert body(done)["resolved"] and body(done)["resolvedBy"] == "carol"
    assert body(done)["resolvedAt"]
    again = client.http.post(url, headers=h, body='{"note": "twice"}')
    assert again.status_code == 409
    exported = client.http.get(f"/admin/reconciliations/{D}/differences.csv", headers=h)
    assert exported.status_code == 200
    assert exported.headers["Content-Type"].startswith("text/csv")
    lines = list(csv.reader(io.StringIO(exported.body.decode())))
    assert lines[0] == list(reconcile.CSV_COLUMNS)
    assert len(lines) == 2 and lines[1][2] == "ALIPAY_ONLY" and lines[1][7] == "3.00"
    assert lines[1][9] == "yes" and lines[1][10] == "a test payment, refunded"


@pytest.mark.parametrize("path, method, status", [
    ("/admin/reconciliations/2026-13-01", "GET", 400),
    ("/admin/reconciliations/yesterday", "POST", 400),
    ("/admin/reconciliations/2026-11-01", "GET", 404),
    ("/admin/reconciliations/2099-01-01", "POST", 400),
    ("/admin/reconciliations/2026-11-01/differences.csv", "GET", 404),
    ("/admin/reconciliations/2026-11-01/differences/abc/resolve", "POST", 404),
])
def test_bad_days_and_unknown_things(client: Any, d: Any, path: str, method: str,
                                     status: int) -> None:
    response = getattr(client.http, method.lower())(path, headers=operator_bearer(),
                                                    body='{"note": "x"}')
    assert response.status_code == status, response.body


def test_a_shopper_gets_403_and_no_token_401(client: Any, d: Any) -> None:
    from tests.conftest import bearer

    assert client.http.get("/admin/reconciliations", headers=bearer("alice")).status_code == 403
    assert client.http.get("/admin/reconciliations").status_code == 401


def test_a_cell_a_spreadsheet_would_run_is_quoted() -> None:
    assert reconcile._cell("=HYPERLINK(1)") == "'=HYPERLINK(1)"
    assert reconcile._cell("-3.00") == "-3.00"
    assert reconcile._cell("-cmd") == "'-cmd"
    assert reconcile._cell(None) == ""


def test_the_cli_prints_the_report_and_says_by_its_exit_code(d: Any) -> None:
    from chalicelib import cli

    out = io.StringIO()
    assert cli.main(["reconcile", "--date", D.isoformat()], out=out) == 0
    printed = json.loads(out.getvalue())
    assert printed["date"] == D.isoformat() and printed["status"] == "BALANCED"
    assert printed["requestedBy"] == "cli"
    serve(d, D, row(PAYMENT, "T9", "ORDER_1_unknown", "3.00", at(D, 10)))
    assert cli.main(["reconcile", "--date", D.isoformat()], out=io.StringIO()) == 1
    assert cli.main(["reconcile", "--date", "not-a-day"], out=io.StringIO()) == 2


def test_no_bill_before_the_bills_hour_is_not_taken_for_an_empty_day(d: Any) -> None:
    d.clock.now = at(D + timedelta(days=1), 9, 59)
    report = run(d, D)
    assert report["status"] == "FAILED" and "no bill" in report["reason"]
    d.clock.now = at(D + timedelta(days=1), 10, 0)
    assert run(d, D)["status"] == "BALANCED"


def _until_every_due_day_ran(d: Any, stop: Any, runner: Any) -> None:
    """Waits until a round reported every due day (5 s at most), then stops the thread."""
    try:
        deadline = time_module.monotonic() + 5
        while len(d.store.list_reconciliations()) < reconcile.LOOKBACK_DAYS:
            assert time_module.monotonic() < deadline, "no round reported every due day"
            time_module.sleep(0.01)
    finally:
        stop.set()
        runner.join(5)


def test_the_local_workers_round_runs_the_due_days(d: Any) -> None:
    import threading

    from chalicelib import worker

    stop = threading.Event()
    runner = threading.Thread(target=worker.reconcile_forever, args=(d, stop, 60.0, 0.0))
    runner.start()
    _until_every_due_day_ran(d, stop, runner)
    assert not runner.is_alive()  # it stops when asked, not after its interval
    waiting = threading.Event()
    late = threading.Thread(target=worker.reconcile_forever, args=(d, waiting, 60.0, 30.0))
    late.start()
    waiting.set()  # asked to stop before its first round: it never ran one
    late.join(5)
    assert not late.is_alive()
    assert {r.status for r in d.store.list_reconciliations()} == {ReportStatus.BALANCED}


def test_a_round_that_fails_is_logged_and_the_next_one_comes(d: Any,
                                                             caplog: Any) -> None:
    import threading

    from chalicelib import worker

    d.store.fail_next(1, only={"requested_days"})
    stop = threading.Event()
    runner = threading.Thread(target=worker.reconcile_forever, args=(d, stop, 0.05, 0.0))
    runner.start()
    _until_every_due_day_ran(d, stop, runner)
    assert "reconciliation round failed" in caplog.text
