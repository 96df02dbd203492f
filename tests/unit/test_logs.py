"""JSON-lines logs: the API's and bridge's formatter, and the sandbox's, carry the
same correlation keys (orderId, tradeNo, notifyId)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

from chalicelib.logs import (
    MAX_ITEMS,
    MAX_MESSAGE_CHARS,
    MAX_TRACE_CHARS,
    MAX_VALUE_CHARS,
    JsonFormatter,
    clip_text,
)
from local.alipay_sandbox.logs import JsonFormatter as SandboxFormatter


def line(formatter: logging.Formatter, msg: str, *args: Any, **extra: Any) -> dict[str, Any]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger(f"test.logs.{id(formatter)}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.info(msg, *args, extra=extra or None)
    text = stream.getvalue()
    assert text.count("\n") == 1  # one object per line
    return json.loads(text)


def test_one_json_object_with_the_correlation_ids() -> None:
    entry = line(JsonFormatter(), "order %s PAID", "ORDER_1", orderId="ORDER_1",
                 tradeNo="2026112622001", notifyId="n-1", attempt=2)
    assert list(entry)[:7] == ["time", "level", "logger", "message", "orderId", "tradeNo",
                               "notifyId"]
    assert entry["message"] == "order ORDER_1 PAID" and entry["level"] == "INFO"
    assert (entry["orderId"], entry["tradeNo"], entry["notifyId"]) == (
        "ORDER_1", "2026112622001", "n-1")
    assert entry["attempt"] == 2
    assert entry["time"].endswith("+00:00")


def test_missing_ids_are_left_out_and_odd_values_are_stringified() -> None:
    entry = line(JsonFormatter(), "плохо \"quoted\"", orderId="ORDER_2", tradeNo=None,
                 notifyId="", when=object())
    assert entry["orderId"] == "ORDER_2"
    assert "tradeNo" not in entry and "notifyId" not in entry
    assert entry["message"] == "плохо \"quoted\""
    assert entry["when"].startswith("<object")


def test_exceptions_stay_on_one_line() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("test.logs.exc")
    logger.handlers[:] = [handler]
    logger.propagate = False
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed", extra={"orderId": "ORDER_3"})
    (text,) = stream.getvalue().splitlines()
    entry = json.loads(text)
    assert entry["orderId"] == "ORDER_3" and "ValueError: boom" in entry["exc_info"]


def test_the_sandbox_writes_the_same_keys_beside_alipays_names() -> None:
    entry = line(SandboxFormatter(), "notify sent", event="notify_sent", out_trade_no="ORDER_4",
                 trade_no="2026112622004", notify_id="abc")
    assert (entry["orderId"], entry["tradeNo"], entry["notifyId"]) == (
        "ORDER_4", "2026112622004", "abc")
    assert entry["out_trade_no"] == "ORDER_4" and entry["event"] == "notify_sent"
    assert {"time", "level", "logger", "message"} <= set(entry)


def test_handlers_log_lines_about_an_order_carry_its_ids(app_deps: Any, caplog: Any) -> None:
    from chalicelib import handlers

    app_deps.store.set_cart_line("alice", "g1", 1)
    app_deps.broker.down = True  # the delay message cannot go out: logged with the orderId
    with caplog.at_level(logging.WARNING, logger="chalicelib.handlers"):
        order = handlers.create_order(app_deps, "alice")
    (record,) = [r for r in caplog.records if r.name == "chalicelib.handlers"]
    assert record.orderId == order["id"]
    assert json.loads(JsonFormatter().format(record))["orderId"] == order["id"]


def test_alipays_names_give_the_correlation_keys_too() -> None:
    entry = line(JsonFormatter(), "page pay signed", out_trade_no="ORDER_5", total_amount="9.90")
    assert entry["orderId"] == "ORDER_5" and entry["out_trade_no"] == "ORDER_5"


# --- every line bounded: what is logged often came from outside ----------------------


@contextlib.contextmanager
def json_log_lines() -> Iterator[list[str]]:
    """Every line the process logs meanwhile, through the JSON formatter on the root
    logger (as on Lambda and under `python -m local`); the list fills on exit."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    lines: list[str] = []
    try:
        yield lines
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        lines.extend(stream.getvalue().splitlines())


def test_clip_text_says_how_much_it_cut() -> None:
    assert clip_text("short") == "short"
    assert clip_text("x" * MAX_VALUE_CHARS) == "x" * MAX_VALUE_CHARS
    assert clip_text("x" * 1000, 10) == "x" * 10 + "…[990 chars cut]"


def test_extra_fields_and_correlation_ids_are_clipped() -> None:
    huge = "A" * 5_000_000
    entry = line(JsonFormatter(), "notify refused", out_trade_no=huge, tradeNo=huge,
                 fields={"subject": huge, "n": 3, "items": [huge] * 100}, raw=huge.encode(),
                 amount=Decimal("9.90"), attempt=2, ok=True, none=None)
    cut = f"{'A' * MAX_VALUE_CHARS}…[{5_000_000 - MAX_VALUE_CHARS} chars cut]"
    assert entry["orderId"] == entry["out_trade_no"] == entry["tradeNo"] == cut
    assert entry["fields"]["subject"] == cut and entry["fields"]["n"] == 3
    assert len(entry["fields"]["items"]) == MAX_ITEMS + 1
    assert entry["fields"]["items"][-1] == f"…{100 - MAX_ITEMS} more items cut"
    assert entry["raw"].endswith("(5000000 bytes)") and len(entry["raw"]) < 2 * MAX_VALUE_CHARS
    assert (entry["amount"], entry["attempt"], entry["ok"], entry["none"]) == (
        "9.90", 2, True, None)


def test_message_args_are_clipped_each_and_the_message_as_a_whole() -> None:
    huge = "B" * 100_000
    entry = line(JsonFormatter(), "refused %s (%r) after %d tries, %.2f", huge,
                 ValueError(huge), 3, Decimal("1.5"))
    message = entry["message"]
    assert message.startswith(f"refused {'B' * MAX_VALUE_CHARS}…[{100_000 - MAX_VALUE_CHARS}")
    assert message.endswith("chars cut]) after 3 tries, 1.50")
    assert len(message) < 3 * MAX_VALUE_CHARS
    unformatted = line(JsonFormatter(), f"an f-string {huge}")["message"]
    assert len(unformatted) < MAX_MESSAGE_CHARS + 50 and unformatted.endswith("chars cut]")
    mapping = line(JsonFormatter(), "%(id)s", {"id": huge})["message"]
    assert mapping == f"{'B' * MAX_VALUE_CHARS}…[{100_000 - MAX_VALUE_CHARS} chars cut]"


def test_a_message_that_does_not_format_is_a_line_not_an_error() -> None:
    entry = line(JsonFormatter(), "count %d", "C" * 100_000)
    assert entry["message"] == "count %d <not formatted: TypeError>"


def test_a_traceback_echoing_input_is_clipped() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("test.logs.trace")
    logger.handlers[:] = [handler]
    logger.propagate = False
    try:
        raise ValueError("bad out_trade_no " + "D" * 5_000_000)
    except ValueError:
        logger.exception("failed")
    (text,) = stream.getvalue().splitlines()
    assert len(text) < MAX_TRACE_CHARS + 200
    trace = json.loads(text)["exc_info"]
    assert trace.startswith("Traceback") and "ValueError: bad out_trade_no DDD" in trace
    assert "chars cut]" in trace


def test_numbers_stay_numbers_unless_they_are_huge() -> None:
    entry = line(JsonFormatter(), "%d|%s|%s", 2**64, 10**1000, Decimal("1" * 5000),
                 big=10**1000)
    small, big_int, big_decimal = entry["message"].split("|")
    assert small == str(2**64)
    assert big_int == "<an integer of 3322 bits>" and entry["big"] == big_int
    assert big_decimal.endswith(f"…[{5000 - MAX_VALUE_CHARS} chars cut]")
