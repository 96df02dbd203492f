"""Hostile input against every route: schemathesis drives the API (served over HTTP by
chalice's local server) from chalicelib/openapi.json with generated valid and
invalid input, with a valid token unless the generated request brings its own;
then the explicit cases: oversized bodies, bad UTF-8, duplicated form keys on the
notify, negative and huge quantities, injection strings in path params and bodies.

No answer is a 5xx, and a rejected request (4xx, or `failure` from the notify)
leaves every table exactly as it was.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from local.alipay_sandbox.notifier import notify_params
from tests.conftest import MODELS, token
from tests.reliability.harness import NO_ANSWER, SCOREBOARD, Answer, Row, Stack, audit

pytestmark = pytest.mark.rabbitmq

DOC = Path(__file__).resolve().parents[2] / "chalicelib" / "openapi.json"
USER = "fuzzer"
JSON = {"Content-Type": "application/json"}
FORM = {"Content-Type": "application/x-www-form-urlencoded"}

INJECTIONS = [
    "' OR '1'='1", "\"; DROP TABLE orders; --", "../../../../etc/passwd", "..%2F..%2Fetc",
    "<script>alert(1)</script>", "${jndi:ldap://127.0.0.1/a}", "{{7*7}}", "%00", "a\x00b",
    "$where: 1", "{\"$gt\": \"\"}", "ORDER_1795679000000_0000000000000000' OR 1=1",
    "x" * 5000, "🍵" * 100, "\u202e\u0000\ufeff", "%FF%FE", "%E0%80%AF",
]


@pytest.fixture
def stack(rmq_vhost: str, tables: Any, keys: dict[str, Path]) -> Iterator[Stack]:
    s = Stack(keys=keys, rmq_url=str(rmq_vhost), check_delay=600)
    yield s
    s.close()


def snapshot() -> list[list[str]]:
    """Every item of every table, in a comparable form. Not the orders' timelines:
    a refused notify is kept there on purpose (what came, and why it was refused),
    as a log of what was received, not a change of any order, stock or refund."""
    return [sorted(json.dumps(m.to_simple_dict(), sort_keys=True, default=str)
                   for m in model.scan(consistent_read=True))
            for model in MODELS.all if model is not MODELS.Timeline]


class Judge:
    """Counts 5xx answers, and state changes on rejected requests."""

    def __init__(self, row: Row) -> None:
        self.row = row
        self.state: list[list[str]] | None = None  # the tables as the last request left them

    def __call__(self, label: str, send: Callable[[], Answer]) -> Answer:
        # Nothing else writes meanwhile (no bridge runs), so the state before a request
        # is the state after the one before it: one snapshot per request is enough.
        before = self.state if self.state is not None else snapshot()
        answer = send()
        self.row.runs += 1
        if answer.status >= 500 or answer.status == NO_ANSWER:
            self.row.http_5xx += 1
            self.row.notes.append(f"{label}: {answer.status} {answer.body[:200]!r}")
        rejected = answer.status >= 400 or answer.body == b"failure"
        self.state = snapshot()
        if rejected and self.state != before:
            self.row.violations += 1
            self.row.notes.append(f"{label}: rejected with {answer.status} but changed state")
        return answer

    def forget(self) -> None:
        """The tables were changed outside a judged request."""
        self.state = None


def fill_cart(stack: Stack, judge: Judge) -> None:
    stack.store.set_cart_line(USER, "r-tea", 1)
    stack.store.set_cart_line(USER, "g1", 2)
    judge.forget()


def drive_operation(stack: Stack, judge: Judge, operation: Any, mode: GenerationMode,
                    examples: int) -> None:
    valid = {"Authorization": f"Bearer {token(USER)}"}

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def drive(case: Any) -> None:
        # a valid token, unless a negative case brings a (broken) one of its own
        own = mode == GenerationMode.NEGATIVE and "Authorization" in (case.headers or {})

        def send() -> Answer:
            try:
                r = case.call(base_url=stack.api_url, headers={} if own else valid, timeout=30)
            except Exception as exc:  # noqa: BLE001 - no answer at all counts as a 5xx
                return Answer(NO_ANSWER, repr(exc).encode(), {})
            return Answer(r.status_code, r.content, dict(r.headers))

        judge(f"{operation.label} [{mode.value}] {case.path_parameters} "
              f"{str(case.body)[:80]!r}", send)

    try:
        drive()
    except Unsatisfiable:
        pass  # nothing to make invalid (GET / has no parameters): the positive cases ran


def run_schemathesis(stack: Stack, judge: Judge, examples: int) -> None:
    schema = schemathesis.openapi.from_dict(json.loads(DOC.read_text(encoding="utf-8")))
    fill_cart(stack, judge)
    for result in schema.get_all_operations():
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            drive_operation(stack, judge, result.ok(), mode, examples)


def signed_notify_form(stack: Stack, order: dict[str, Any]) -> dict[str, str]:
    url = stack.pay_url(order)
    assert url is not None and stack.open_cashier(url) == 200
    assert stack.press_pay(order["id"], drop_notify=True) == 302
    paid = stack.sandbox.book.paid_trade(order["id"])
    assert paid is not None
    return notify_params(paid, "2026-11-26 15:20:01", stack.sandbox.alipay_private_key)


def run_explicit(stack: Stack, judge: Judge) -> None:
    http = stack.http
    auth = {"Authorization": f"Bearer {token(USER)}"}
    fill_cart(stack, judge)
    order = stack.order(USER, {"r-tea": 1})
    assert order is not None
    judge.forget()
    big = b"x" * (1 << 20)

    def req(label: str, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> Answer:
        return judge(label, lambda: http.request(method, path, body=body,
                                                 headers={**auth, **(headers or {})}))

    # oversized bodies
    req("1 MB JSON cart", "PUT", "/cart/items/r-tea",
        json.dumps({"num": 1, "pad": big.decode()}).encode(), JSON)
    req("1 MB JSON order", "POST", "/orders", json.dumps({"pad": big.decode()}).encode(), JSON)
    req("1 MB notify", "POST", "/alipay/notify", b"a=" + big, FORM)
    req("10k fields notify", "POST", "/alipay/notify",
        "&".join(f"k{i}=v" for i in range(10_000)).encode(), FORM)
    req("5 MB JSON", "PUT", "/cart/items/r-tea", b'{"num": 1, "p": "' + big * 5 + b'"}', JSON)
    # bad UTF-8 and broken JSON
    for raw in (b'{"num": "\xff\xfe"}', b"\xff\xfe\xfd", b"{", b"[]", b"null", b"1", b'"num"',
                b'{"num": 1, "num": 2}', b"{\"num\": NaN}", b"{\"num\": Infinity}"):
        req(f"cart body {raw[:20]!r}", "PUT", "/cart/items/r-tea", raw, JSON)
        req(f"order body {raw[:20]!r}", "POST", "/orders", raw, JSON)
    req("bad UTF-8 in path", "PUT", "/cart/items/%FF%FE", b'{"num": 1}', JSON)
    req("bad UTF-8 in order path", "GET", "/orders/%C3%28")
    req("bad UTF-8 in return query", "GET", "/alipay/return?out_trade_no=%FF&sign=%C3%28")
    req("bad UTF-8 notify", "POST", "/alipay/notify", b"out_trade_no=%FF%FE&sign=x", FORM)
    req("raw bad UTF-8 notify", "POST", "/alipay/notify", b"out_trade_no=\xff\xfe", FORM)
    req("wrong content type cart", "PUT", "/cart/items/r-tea", b"num=1",
        {"Content-Type": "text/plain"})
    req("JSON to the notify", "POST", "/alipay/notify", b"{}", JSON)
    # negative and huge quantities
    for num in (-1, 0, 100, 10**30, -(10**30), 1.5, 1e308, "1", True, None, [1], {"n": 1}):
        req(f"num {num!r}", "PUT", "/cart/items/r-tea", json.dumps({"num": num}).encode(), JSON)
    req("num 1e400", "PUT", "/cart/items/r-tea", b'{"num": 1e400}', JSON)
    req("num -0", "PUT", "/cart/items/r-tea", b'{"num": -0}', JSON)
    # injection strings in path parameters and bodies
    for bad in INJECTIONS:
        quoted = urllib.parse.quote(bad, safe="")
        req(f"goods id {bad[:30]!r}", "PUT", f"/cart/items/{quoted}", b'{"num": 1}', JSON)
        req(f"delete goods id {bad[:30]!r}", "DELETE", f"/cart/items/{quoted}")
        for action in ("", "/pay", "/cancel"):
            method = "GET" if not action else "POST"
            req(f"order id {bad[:30]!r}{action}", method, f"/orders/{quoted}{action}", b"{}",
                JSON)
        req(f"sale id {bad[:30]!r}", "POST", f"/seckill/{quoted}", b"{}", JSON)
        req(f"ticket id {bad[:30]!r}", "GET", f"/seckill/tickets/{quoted}")
        req(f"sourceType {bad[:30]!r}", "POST", "/orders",
            json.dumps({"sourceType": bad}).encode(), JSON)
        req(f"return {bad[:30]!r}", "GET",
            f"/alipay/return?out_trade_no={quoted}&sign={quoted}&sign_type=RSA2")
    # duplicated form keys (and other tampering) on a validly signed notify
    form = signed_notify_form(stack, order)
    judge.forget()
    raw = urllib.parse.urlencode(form)
    for label, body in (
        ("duplicated total_amount", raw + "&total_amount=0.01"),
        ("duplicated out_trade_no", raw + f"&out_trade_no={order['id']}"),
        ("duplicated sign", raw + "&sign=" + urllib.parse.quote(form["sign"])),
        ("duplicated key first", "total_amount=0.01&" + raw),
        ("tampered amount", urllib.parse.urlencode({**form, "total_amount": "0.01"})),
        ("injected out_trade_no", urllib.parse.urlencode({**form, "out_trade_no": INJECTIONS[1]})),
        ("charset bogus", urllib.parse.urlencode({**form, "charset": "x-bogus"})),
        ("charset gbk", urllib.parse.urlencode({**form, "charset": "gbk"})),
        ("empty", ""),
    ):
        answer = req(f"notify {label}", "POST", "/alipay/notify", body.encode(), FORM)
        if answer.body != b"failure":
            judge.row.violations += 1
            judge.row.notes.append(f"notify {label} answered {answer.body[:50]!r}")


def run_hostile(stack: Stack, examples: int, name: str) -> Row:
    started = time.monotonic()
    row = Row(name)
    judge = Judge(row)
    run_schemathesis(stack, judge, examples)
    run_explicit(stack, judge)
    audit(stack.store, stack.start_stock, stack.store.transitions, settled=False).into(row)
    row.http_5xx += stack.http.count_5xx
    row.seconds = time.monotonic() - started
    return SCOREBOARD.record(row)


def test_hostile_input(stack: Stack) -> None:
    row = run_hostile(stack, examples=5, name="hostile input")
    assert row.runs > 0 and row.orders > 0  # something was sent, at some order
    row.assert_zeros()


@pytest.mark.soak
def test_hostile_input_soak(stack: Stack) -> None:
    row = run_hostile(stack, examples=100, name="hostile input (soak)")
    assert row.runs > 0 and row.orders > 0
    row.assert_zeros()
