"""JSON-lines logs: the API's and bridge's formatter, and the sandbox's, carry the
same correlation keys (orderId, tradeNo, notifyId)."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

from chalicelib.logs import JsonFormatter
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
