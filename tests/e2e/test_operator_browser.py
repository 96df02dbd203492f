"""An operator's walk in a real browser (Debian's headless Chromium, driven by
Playwright): a shopper's order is paid at the sandbox through the API; then, on
the operator page (GET /admin), the operator signs in with a token, finds the
order by its Alipay trade number, refunds part of it, is told plainly when asking
for more than is left, refunds the rest, and sees the order REFUNDED; the
sandbox's trade shows the whole amount refunded. A second walk: a refund Alipay
refuses shows FAILED and in the attention list, and its Retry makes it SUCCEEDED.
A third: the operator reconciles today against the sandbox's bill, resolves the
difference a trade unknown to the shop makes, and exports the day's CSV.

The stack is started by the fixtures in conftest.py (`python -m local run` on free
ports, a fresh RabbitMQ vhost). A screenshot of each step goes to
tests/e2e/screenshots/ (operator-01-..., operator-retry-01-... and
operator-recon-01-...; ignored by git).
"""

from __future__ import annotations

import csv
import io
import json
import secrets
import urllib.error
import urllib.parse
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from chalicelib import auth, reconcile
from chalicelib.config import LOCAL_JWT_SECRET
from chalicelib.domain.reconciliation import bill_day
from tests.waiting import wait_until

pytestmark = pytest.mark.browser

SHOTS = Path(__file__).resolve().parent / "screenshots"
STEP_TIMEOUT_MS = 15_000


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def _http(method: str, url: str, *, token: str | None = None, body: Any = None,
          form: dict[str, str] | None = None) -> tuple[int, Any]:
    """One request; (status, JSON body or text). Redirects are not followed."""
    headers: dict[str, str] = {}
    data = None
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if body is not None:
        headers["Content-Type"] = "application/json"
        data = json.dumps(body).encode()
    elif form is not None:
        headers["Content-Type"] = "application/x-www-form-urlencoded"
        data = urllib.parse.urlencode(form).encode()
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with _OPENER.open(request, timeout=30) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    text = raw.decode("utf-8", "replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def _ok(answer: tuple[int, Any], *expected: int) -> Any:
    status, body = answer
    assert status in expected, f"{status}: {body}"
    return body


def _paid_order(api: str, sandbox: str) -> tuple[str, dict[str, Any]]:
    """A shopper's order of a teapot and two tea cups (99.70), paid at the sandbox:
    (order id, the sandbox's trade)."""
    shopper = auth.issue(LOCAL_JWT_SECRET, f"shopper-{uuid.uuid4().hex[:6]}", 3600)
    _ok(_http("PUT", f"{api}/cart/items/teapot", token=shopper, body={"num": 1}), 200)
    _ok(_http("PUT", f"{api}/cart/items/tea-cup", token=shopper, body={"num": 2}), 200)
    order = _ok(_http("POST", f"{api}/orders", token=shopper, body={"sourceType": "1"}), 201)
    order_id = order["id"]
    assert order["totalMoney"] == "99.70", order
    pay_url = _ok(_http("POST", f"{api}/orders/{order_id}/pay", token=shopper), 200)["payUrl"]
    _ok(_http("GET", pay_url), 200)  # the cashier: the sandbox opens the trade
    _ok(_http("POST", f"{sandbox}/sandbox/pay", form={"out_trade_no": order_id}), 302)

    def paid() -> bool:
        return _ok(_http("GET", f"{api}/orders/{order_id}", token=shopper), 200)[
            "status"] == "PAID"

    wait_until(paid, 30, f"{order_id} PAID after the sandbox's notify", step=0.2)
    trade = _ok(_http("GET", f"{sandbox}/sandbox/trades/{order_id}"), 200)
    assert trade["status"] == "TRADE_SUCCESS", trade
    return order_id, trade


def test_an_operator_refunds_an_order_in_the_browser(stack: dict[str, str],
                                                     browser: Any) -> None:
    from playwright.sync_api import expect

    api, sandbox = stack["api"], stack["sandbox"]
    SHOTS.mkdir(exist_ok=True)
    for old in SHOTS.glob("operator-0*.png"):  # this walk's; not operator-retry-*
        old.unlink()
    order_id, trade = _paid_order(api, sandbox)
    trade_no = trade["trade_no"]

    context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-US")
    page = context.new_page()
    page.set_default_timeout(STEP_TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    refund_posts: list[dict[str, str]] = []
    page.on("request", lambda r: refund_posts.append(r.headers)
            if r.method == "POST" and r.url.endswith(f"/admin/orders/{order_id}/refunds")
            else None)

    def shot(name: str) -> None:
        page.screenshot(path=str(SHOTS / f"operator-{name}.png"), full_page=True)

    def timeline_types() -> list[str]:
        return [t.strip() for t in page.locator("#timeline-list tr[data-type] td.type")
                .all_inner_texts()]

    # 1. The operator page, not signed in.
    page.goto(api + "/admin")
    expect(page.locator("#who")).to_have_text("not signed in")
    shot("01-signed-out")

    # 2. Sign in with an operator token (what `python -m local token carol --operator`
    #    prints): the newest orders and the attention list load.
    operator = f"carol-{uuid.uuid4().hex[:4]}"
    page.fill("#token", auth.issue(LOCAL_JWT_SECRET, operator, 3600, role=auth.OPERATOR))
    page.click("#login")
    expect(page.locator("#who")).to_have_text(f"signed in as {operator} (operator)")
    expect(page.locator(f"#result-list tr[data-order-id='{order_id}']")).to_be_visible()
    expect(page.locator("#attention-refunds")).to_have_text("None.")
    assert page.evaluate("Object.keys(sessionStorage)") == ["shop-pay.operator-token"]
    shot("02-signed-in")

    # 3. Find the order by its Alipay trade number.
    page.fill("#q", trade_no)
    page.select_option("#status", "PAID")
    page.click("#search-button")
    rows = page.locator("#result-list tr[data-order-id]")
    expect(rows).to_have_count(1)
    expect(rows.first).to_have_attribute("data-order-id", order_id)
    expect(rows.first.locator(".badge")).to_have_text("PAID")
    expect(page.locator("#next-page")).to_be_hidden()
    shot("03-found-by-trade-number")

    # 4. Open it: the fields and the timeline of its payment.
    rows.first.locator("a.open").click()
    expect(page.locator("#order-id")).to_have_text(order_id)
    expect(page.locator("#order-status")).to_have_text("PAID")
    expect(page.locator("#order-total")).to_have_text("¥99.70")
    expect(page.locator("#order-paid")).to_have_text("¥99.70")
    expect(page.locator("#order-refunded")).to_have_text("¥0.00")
    expect(page.locator("#order-transaction")).to_have_text(trade_no)
    expect(page.locator("#refunds")).to_have_text("No refunds.")
    expect(page.locator("#timeline-list tr[data-type='paid']")).to_have_count(1)
    before = timeline_types()
    assert before[0] == "created" and "refund_requested" not in before, before
    shot("04-order")

    # 5. Refund part of it: 201, SUCCEEDED, the timeline grows.
    page.fill("#refund-amount", "1.00")
    page.fill("#refund-reason", "one cup arrived chipped")
    page.click("#refund-submit")
    expect(page.locator("#refund-result")).to_contain_text("201 Created")
    expect(page.locator("#refund-result")).to_contain_text("SUCCEEDED")
    first = page.locator("#refund-list tr[data-refund-id]")
    expect(first).to_have_count(1)
    expect(first.locator(".status")).to_have_text("SUCCEEDED")
    expect(first.locator(".amount")).to_have_text("¥1.00")
    expect(first.locator(".operator")).to_have_text(operator)
    expect(page.locator("#order-refunded")).to_have_text("¥1.00")
    expect(page.locator("#order-status")).to_have_text("PAID")
    expect(page.locator("#timeline-list tr[data-type='refund_succeeded']")).to_have_count(1)
    after = timeline_types()
    assert after[:len(before)] == before, (before, after)
    assert after.index("refund_requested") < after.index("refund_succeeded"), after
    expect(page.locator("#refund-left")).to_have_text("¥98.70 left to refund.")
    shot("05-partial-refund")

    # 6. More than is left: the API's 409 and its Message, plainly; nothing changes.
    page.fill("#refund-amount", "99.00")
    page.fill("#refund-reason", "too much")
    page.click("#refund-submit")
    expect(page.locator("#refund-result")).to_contain_text("409 RefundExceedsPaid")
    expect(page.locator("#refund-result")).to_contain_text("98.70")
    expect(page.locator("#refund-list tr[data-refund-id]")).to_have_count(1)
    shot("06-more-than-left")

    # 7. Refund the rest with a double click: one refund; the order is REFUNDED.
    page.fill("#refund-amount", "98.70")
    page.fill("#refund-reason", "the customer returned everything else")
    page.dblclick("#refund-submit")
    expect(page.locator("#refund-result")).to_contain_text("201 Created")
    expect(page.locator("#order-status")).to_have_text("REFUNDED")
    expect(page.locator("#order-badge")).to_have_text("REFUNDED")
    expect(page.locator("#order-refunded")).to_have_text("¥99.70")
    expect(page.locator("#order-paid")).to_have_text("¥99.70")
    refunds = page.locator("#refund-list tr[data-refund-id]")
    expect(refunds).to_have_count(2)
    expect(refunds.nth(1).locator(".status")).to_have_text("SUCCEEDED")
    expect(refunds.nth(1).locator(".amount")).to_have_text("¥98.70")
    expect(page.locator("#timeline-list tr[data-type='refund_succeeded']")).to_have_count(2)
    expect(page.locator("#refund-submit")).to_be_disabled()
    shot("07-refunded")

    # Every refund POST carried its own Idempotency-Key (3 submissions, 3 keys).
    keys = [h.get("idempotency-key") for h in refund_posts]
    assert len(keys) == 3 and all(keys) and len(set(keys)) == 3, keys

    # 8. The search shows it REFUNDED with the whole amount; nothing needs attention.
    page.select_option("#status", "REFUNDED")
    page.click("#search-button")
    row = page.locator(f"#result-list tr[data-order-id='{order_id}']")
    expect(row.locator(".badge")).to_have_text("REFUNDED")
    page.click("#attention-reload")
    expect(page.locator("#attention-refunds")).to_have_text("None.")
    shot("08-search-refunded")

    # The sandbox paid back the whole amount, in two refunds.
    trade = _ok(_http("GET", f"{sandbox}/sandbox/trades/{order_id}"), 200)
    assert trade["refunded_amount"] == trade["total_amount"] == "99.70", trade
    assert sorted(r["refund_amount"] for r in trade["refunds"]) == ["1.00", "98.70"], trade

    assert errors == [], errors
    context.close()
    assert sorted(p.name for p in SHOTS.glob("operator-0*.png")) == [
        "operator-01-signed-out.png", "operator-02-signed-in.png",
        "operator-03-found-by-trade-number.png", "operator-04-order.png",
        "operator-05-partial-refund.png", "operator-06-more-than-left.png",
        "operator-07-refunded.png", "operator-08-search-refunded.png"]


def test_a_failed_refund_is_retried_from_the_attention_list(stack: dict[str, str],
                                                           browser: Any) -> None:
    """Alipay refuses a refund (the sandbox's refund-fault hook): the page shows it
    FAILED with Alipay's code, the attention list carries it with a Retry button,
    and the retry, once Alipay would refund, makes it SUCCEEDED."""
    from playwright.sync_api import expect

    api, sandbox = stack["api"], stack["sandbox"]
    SHOTS.mkdir(exist_ok=True)
    for old in SHOTS.glob("operator-retry-*.png"):
        old.unlink()
    order_id, _ = _paid_order(api, sandbox)
    fault = f"{sandbox}/sandbox/trades/{order_id}/refund-fault"
    _ok(_http("PUT", fault, body={"code": "ACQ.SELLER_BALANCE_NOT_ENOUGH", "applied": False}),
        200)

    context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-US")
    page = context.new_page()
    page.set_default_timeout(STEP_TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    # A link to the order (what the attention list's links are): it opens on sign-in.
    page.goto(f"{api}/admin#order={order_id}")
    page.fill("#token", auth.issue(LOCAL_JWT_SECRET, "dave", 3600, role=auth.OPERATOR))
    page.click("#login")
    expect(page.locator("#order-id")).to_have_text(order_id)
    expect(page.locator("#order-status")).to_have_text("PAID")

    # Alipay refuses: 201 with the refund FAILED and Alipay's code, in the order and
    # in the attention list, each with a Retry button.
    page.fill("#refund-amount", "5.00")
    page.fill("#refund-reason", "late delivery")
    page.click("#refund-submit")
    expect(page.locator("#refund-result")).to_contain_text("201 Created")
    expect(page.locator("#refund-result")).to_contain_text("FAILED")
    expect(page.locator("#refund-result")).to_contain_text("ACQ.SELLER_BALANCE_NOT_ENOUGH")
    row = page.locator("#refund-list tr[data-refund-id]")
    expect(row).to_have_count(1)
    expect(row.locator(".status")).to_have_text("FAILED")
    expect(row.locator(".failure code")).to_have_text("ACQ.SELLER_BALANCE_NOT_ENOUGH")
    expect(row.locator("button.retry")).to_be_visible()
    expect(page.locator("#order-refunded")).to_have_text("¥0.00")
    expect(page.locator("#timeline-list tr[data-type='refund_failed']")).to_have_count(1)
    refund_id = row.get_attribute("data-refund-id")
    listed = page.locator(f"#attention-refunds li[data-refund-id='{refund_id}']")
    expect(listed.locator(".badge")).to_have_text("FAILED")
    expect(listed.locator("button.retry")).to_be_visible()
    page.screenshot(path=str(SHOTS / "operator-retry-01-refund-failed.png"), full_page=True)

    # Alipay would refund now: Retry from the attention list.
    _ok(_http("DELETE", fault), 200)
    listed.locator("button.retry").click()
    expect(page.locator("#message")).to_contain_text(f"Retried: refund {refund_id}: SUCCEEDED")
    expect(row.locator(".status")).to_have_text("SUCCEEDED")
    expect(row.locator("button.retry")).to_have_count(0)
    expect(page.locator("#order-refunded")).to_have_text("¥5.00")
    expect(page.locator("#attention-refunds")).to_have_text("None.")
    expect(page.locator("#timeline-list tr[data-type='refund_succeeded']")).to_have_count(1)
    page.screenshot(path=str(SHOTS / "operator-retry-02-retried.png"), full_page=True)

    trade = _ok(_http("GET", f"{sandbox}/sandbox/trades/{order_id}"), 200)
    assert trade["refunded_amount"] == "5.00", trade
    assert [r["out_request_no"] for r in trade["refunds"]] == [refund_id], trade
    assert errors == [], errors
    context.close()


def test_an_operator_reconciles_a_day_in_the_browser(stack: dict[str, str],
                                                     browser: Any) -> None:
    """Today's bill (the sandbox serves it: SANDBOX_BILLS_TODAY=1) holds a payment of
    the shop's and, through the sandbox's bill-edits hook, a 9.90 trade the shop never
    heard of. On the operator page the operator runs today's reconciliation: the day
    is DIFFERENCES, the shop's payment matched, the unknown trade is ALIPAY_ONLY and
    in the attention list; resolved with a note it shows resolved, the exported CSV
    says so, and GET /admin/attention no longer lists it."""
    from playwright.sync_api import expect

    api, sandbox = stack["api"], stack["sandbox"]
    SHOTS.mkdir(exist_ok=True)
    for old in SHOTS.glob("operator-recon-*.png"):
        old.unlink()
    # The bill's day is a day in Asia/Shanghai, as Alipay cuts its bills.
    today = bill_day(datetime.now(UTC)).isoformat()
    order_id, trade = _paid_order(api, sandbox)
    stranger = f"EXT_{uuid.uuid4().hex[:12]}"  # not an order id of the shop's
    stranger_trade = f"{today.replace('-', '')}2200{secrets.randbelow(10**16):016d}"
    note = f"a test payment made in Alipay's console, refunded there ({uuid.uuid4().hex[:6]})"
    _ok(_http("POST", f"{sandbox}/sandbox/bills/{today}/edits", body={"add": [
        {"trade_no": stranger_trade, "out_trade_no": stranger, "type": "交易",
         "amount": "9.90"}]}), 200, 201, 204)

    operator = f"erin-{uuid.uuid4().hex[:4]}"
    token = auth.issue(LOCAL_JWT_SECRET, operator, 3600, role=auth.OPERATOR)
    context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-US",
                                  accept_downloads=True)
    page = context.new_page()
    # A run reads the whole bill inside the request (the local stage): more than a click.
    page.set_default_timeout(STEP_TIMEOUT_MS * 2)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    def shot(name: str) -> None:
        page.screenshot(path=str(SHOTS / f"operator-recon-{name}.png"), full_page=True)

    # 1. Sign in; the Reconciliation section offers today (Asia/Shanghai) to run.
    page.goto(api + "/admin")
    page.fill("#token", token)
    page.click("#login")
    expect(page.locator("#who")).to_have_text(f"signed in as {operator} (operator)")
    expect(page.locator("#recon-date")).to_have_value(today)

    # 2. Run today: the report answers in the request (or the page follows a 202).
    page.fill("#recon-date", today)
    page.click("#recon-run")
    expect(page.locator("#recon-result")).to_have_text(f"{today}: DIFFERENCES")
    day_row = page.locator(f"#recon-list tr[data-date='{today}']")
    expect(day_row.locator(".status")).to_have_text("DIFFERENCES")
    expect(page.locator("#recon-report-date")).to_have_text(today)
    expect(page.locator("#recon-report-status")).to_have_text("DIFFERENCES")
    expect(page.locator("#recon-report-reason")).to_be_hidden()
    report = _ok(_http("GET", f"{api}/admin/reconciliations/{today}", token=token), 200)
    assert report["status"] == "DIFFERENCES" and report["requestedBy"] == operator, report
    for key, side in (("alipay", "alipay"), ("shop", "shop")):  # the page shows both sides
        row = page.locator(f"#recon-sides-table tr[data-side='{side}']")
        expect(row.locator(".payments")).to_have_text(str(report[key]["payments"]))
        expect(row.locator(".payments-total")).to_have_text(f"¥{report[key]['paymentsTotal']}")
        expect(row.locator(".refunds")).to_have_text(str(report[key]["refunds"]))
        expect(row.locator(".refunds-total")).to_have_text(f"¥{report[key]['refundsTotal']}")
    # The shop's own payment is in the bill: it matched (no difference, nothing carried).
    assert report["alipay"]["payments"] >= 2, report
    assert all(d["orderId"] != order_id for d in report["differences"]), report
    assert all(c["orderId"] != order_id for c in report["carried"]), report
    assert trade["trade_no"] not in page.inner_text("#recon-differences")

    # 3. The unknown trade: ALIPAY_ONLY, the bill's 9.90 and no amount of the shop's,
    #    open, and in the attention list with a link to its day.
    found = [d for d in report["differences"] if d["tradeNo"] == stranger_trade]
    assert len(found) == 1, report["differences"]
    difference = found[0]
    assert difference["kind"] == "ALIPAY_ONLY" and difference["shop"] is None, difference
    assert difference["alipay"]["订单金额（元）"] == "9.90", difference
    row = page.locator(f"#recon-difference-list tr[data-difference-id='{difference['id']}']")
    expect(row).to_have_attribute("data-kind", "ALIPAY_ONLY")
    expect(row).to_have_attribute("data-resolved", "false")
    expect(row.locator(".kind")).to_have_text("ALIPAY_ONLY")
    expect(row.locator(".order")).to_have_text(stranger)
    expect(row.locator(".trade")).to_contain_text(stranger_trade)
    expect(row.locator(".alipay-amount")).to_have_text("¥9.90")
    expect(row.locator(".shop-amount")).to_have_text("—")
    listed = page.locator(f"#attention-differences li[data-difference-id='{difference['id']}']")
    expect(listed).to_contain_text("ALIPAY_ONLY")
    expect(listed.locator("a.open-day")).to_have_attribute("href", f"#reconciliation={today}")
    shot("01-differences")

    # 4. Resolve it with a note (the page's own field, not a prompt): resolved, by whom.
    row.locator("button.resolve").click()
    expect(page.locator("#resolve-id")).to_have_text(difference["id"])
    page.fill("#resolve-note", note)
    page.click("#resolve-submit")
    expect(row).to_have_attribute("data-resolved", "true")
    expect(row.locator(".badge")).to_have_text("RESOLVED")
    expect(row.locator(".resolved-by")).to_have_text(operator)
    expect(row.locator(".note")).to_have_text(note)
    expect(row.locator("button.resolve")).to_have_count(0)
    expect(page.locator("#resolve-form")).to_be_hidden()
    expect(page.locator("#message")).to_contain_text(
        f"Difference {difference['id']} resolved by {operator}.")
    expect(listed).to_have_count(0)
    shot("02-resolved")

    # 5. Open the day from the list of days: the same report, the difference resolved.
    day_row.locator("a.open-day").click()
    expect(page.locator("#recon-report-date")).to_have_text(today)
    expect(row).to_have_attribute("data-resolved", "true")

    # 6. Export the CSV (fetched with the token, handed over as a download).
    with page.expect_download() as download:
        page.click("#recon-export")
    assert download.value.suggested_filename == f"differences-{today}.csv"
    text = Path(download.value.path()).read_bytes().decode("utf-8")
    lines = list(csv.reader(io.StringIO(text, newline="")))
    assert tuple(lines[0]) == reconcile.CSV_COLUMNS, lines[0]
    rows = [dict(zip(lines[0], line, strict=True)) for line in lines[1:]]
    assert len(rows) == len(report["differences"]), rows
    mine = [r for r in rows if r["tradeNo"] == stranger_trade]
    assert len(mine) == 1, rows
    assert mine[0] | {"resolvedAt": ""} == {
        "id": difference["id"], "date": today, "kind": "ALIPAY_ONLY", "entry": "PAYMENT",
        "orderId": stranger, "tradeNo": stranger_trade, "refundId": "",
        "alipayAmount": "9.90", "shopAmount": "", "resolved": "yes", "note": note,
        "resolvedBy": operator, "resolvedAt": ""}, mine
    assert mine[0]["resolvedAt"].startswith(today[:4]), mine
    shot("03-exported")

    # 7. The API's attention list no longer carries it.
    attention = _ok(_http("GET", f"{api}/admin/attention", token=token), 200)
    assert difference["id"] not in {d["id"] for d in attention["reconciliation"]}, attention
    assert today not in attention["failedRuns"], attention

    assert errors == [], errors
    context.close()
