"""The attention list as CloudWatch metrics: one line in the embedded metric format
(EMF), which CloudWatch Logs turns into the metrics the alarms of
.chalice/resources.json watch."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from chalicelib import admin, metrics
from chalicelib.domain import Refund, RefundStatus
from chalicelib.domain.reconciliation import Difference, DifferenceKind, EntryKind
from chalicelib.logs import JsonFormatter
from chalicelib.metrics import RawLineHandler, emit_attention

NOW = datetime(2026, 12, 1, 8, 0, 0, 123000, tzinfo=UTC)
NAMES = ["ParkedMessages", "RefundsFailed", "RefundsPendingTooLong", "PaidButClosed",
         "ReconciliationDifferences", "ReconciliationFailedDays", "WebhookDeliveriesFailed",
         "EventsParked"]


def refund(n: int, status: str) -> dict[str, Any]:
    return {"refundId": f"REFUND_ORDER_{n}_1", "orderId": f"ORDER_{n}", "amount": "1.00",
            "reason": "r", "status": status, "operator": "carol",
            "createTime": "2026-12-01T07:00:00.000Z", "finishTime": None, "failure": None}


ATTENTION = {
    "parked": {"queue.order.pay.parked": 2, "queue.order.check.parked": 3,
               "queue.order.seckill.parked": 0},
    "refunds": [refund(1, "FAILED"), refund(2, "PENDING"), refund(3, "FAILED"),
                refund(4, "FAILED")],
    "paidButClosed": ["ORDER_7", "ORDER_8"],
    "reconciliation": [{"id": "a"}, {"id": "b"}, {"id": "c"}], "failedRuns": ["2026-12-01"],
    "deliveries": [],
}


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger of the test's own that keeps the raw lines, as the metrics logger does."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger(f"test.metrics.{id(stream)}")
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO)
    yield log, stream
    log.handlers[:] = []


def one_line(text: str) -> dict[str, Any]:
    assert text.endswith("\n") and text.count("\n") == 1, text
    record = json.loads(text)
    assert isinstance(record, dict)
    return record


def assert_valid_emf(record: dict[str, Any]) -> None:
    """The structure CloudWatch needs to extract metrics from a log line."""
    aws = record["_aws"]
    assert isinstance(aws["Timestamp"], int) and aws["Timestamp"] > 0
    (directive,) = aws["CloudWatchMetrics"]
    assert directive["Namespace"] == "ShopPay"
    assert directive["Dimensions"] == [["Stage"]]
    for dimension_set in directive["Dimensions"]:
        for name in dimension_set:  # every dimension a top-level string
            assert isinstance(record[name], str) and record[name], name
    assert 1 <= len(directive["Metrics"]) <= 100
    for metric in directive["Metrics"]:
        assert set(metric) == {"Name", "Unit"} and metric["Unit"] == "Count"
        value = record[metric["Name"]]  # every metric a top-level number
        assert isinstance(value, int | float) and not isinstance(value, bool), metric


def test_one_emf_line_with_every_metric_computed(captured: Any) -> None:
    log, stream = captured
    values = emit_attention(ATTENTION, log=log, stage="prod", now=NOW)
    assert values == {"ParkedMessages": 5, "RefundsFailed": 3, "RefundsPendingTooLong": 1,
                      "PaidButClosed": 2, "ReconciliationDifferences": 3,
                      "ReconciliationFailedDays": 1, "WebhookDeliveriesFailed": 0,
                      "EventsParked": 0}
    record = one_line(stream.getvalue())
    assert_valid_emf(record)
    assert [m["Name"] for m in record["_aws"]["CloudWatchMetrics"][0]["Metrics"]] == NAMES
    assert {name: record[name] for name in NAMES} == values
    assert record["Stage"] == "prod"
    assert record["_aws"]["Timestamp"] == int(NOW.timestamp() * 1000) == 1796112000123
    # the per-queue counts ride along as a property (searchable, not a metric)
    assert record["parkedByQueue"] == ATTENTION["parked"]


def test_nothing_to_attend_to_is_zeros_not_silence(captured: Any) -> None:
    """Zeros are sent too: the alarms go back to OK on data, not on its absence."""
    log, stream = captured
    values = emit_attention({"parked": {}, "refunds": [], "paidButClosed": []}, log=log,
                            stage="dev")
    assert values == dict.fromkeys(NAMES, 0)
    record = one_line(stream.getvalue())
    assert_valid_emf(record)
    assert record["Stage"] == "dev" and record["parkedByQueue"] == {}
    assert abs(record["_aws"]["Timestamp"] / 1000 - datetime.now(UTC).timestamp()) < 60


def test_missing_parts_count_as_nothing(captured: Any) -> None:
    log, _ = captured
    assert emit_attention({}, log=log, stage="prod") == dict.fromkeys(NAMES, 0)


def test_the_stage_defaults_to_the_settings(captured: Any,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    log, stream = captured
    monkeypatch.setattr(metrics.config, "get", lambda: type("S", (), {"stage": "qa"})())
    emit_attention(ATTENTION, log=log)
    assert one_line(stream.getvalue())["Stage"] == "qa"


def test_the_default_logger_writes_the_bare_line_whatever_the_root_does(
        capsys: pytest.CaptureFixture[str]) -> None:
    """The project's JSON lines (logs.JsonFormatter) on the root, at WARNING: the EMF
    line still comes out alone and whole, not wrapped in {"message": ...}."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    json_out = io.StringIO()
    handler = logging.StreamHandler(json_out)
    handler.setFormatter(JsonFormatter())
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    try:
        capsys.readouterr()
        values = emit_attention(ATTENTION, stage="prod", now=NOW)
        emit_attention(ATTENTION, stage="prod", now=NOW)  # the handler is added once
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0] == lines[1]
    record = one_line(lines[0] + "\n")
    assert_valid_emf(record)
    assert {name: record[name] for name in NAMES} == values
    assert json_out.getvalue() == ""  # nothing went through the root's formatter
    log = logging.getLogger(metrics.LOGGER_NAME)
    assert not log.propagate
    assert [type(h) for h in log.handlers].count(RawLineHandler) == 1


def test_the_json_formatter_would_lose_the_directive() -> None:
    """Why the metrics have a logger of their own: `extra` keys starting with `_`
    never reach a JSON line, and the text sits under `message`."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("test.metrics.json")
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO)
    log.info("metrics", extra={"_aws": {"Timestamp": 1}, "Stage": "prod"})
    entry = json.loads(stream.getvalue())
    assert "_aws" not in entry and entry["message"] == "metrics"


def test_the_attention_lists_refunds_split_as_the_metrics_count_them() -> None:
    """admin.attention() lists FAILED refunds and PENDING ones over 10 minutes old;
    the metrics count exactly those, by status."""

    class Store:
        def open_refunds(self) -> list[Refund]:
            def r(n: int, status: RefundStatus, age: timedelta) -> Refund:
                return Refund(f"REFUND_ORDER_{n}_1", f"ORDER_{n}", 100, "r", status, "carol",
                              NOW - age)

            return [r(1, RefundStatus.FAILED, timedelta(minutes=1)),
                    r(2, RefundStatus.PENDING, timedelta(minutes=11)),
                    r(3, RefundStatus.PENDING, timedelta(minutes=2)),  # not yet
                    r(4, RefundStatus.FAILED, timedelta(hours=3))]

        def paid_but_closed(self) -> list[str]:
            return ["ORDER_9"]

        def open_differences(self) -> list[Difference]:
            return [Difference(f"{n:020x}", date(2026, 12, 1), DifferenceKind.ALIPAY_ONLY,
                               EntryKind.PAYMENT, None, f"T{n}", None, {}, None)
                    for n in range(3)]

        def failed_days(self) -> list[date]:
            return [date(2026, 11, 30)]

        def failed_deliveries(self) -> list[Any]:
            return []

        def parked_events(self, limit: int = 100) -> list[Any]:
            return []

    class Broker:
        def parked_counts(self) -> dict[str, int]:
            return {"queue.order.pay.parked": 4}

    deps = type("D", (), {"clock": staticmethod(lambda: NOW), "store": Store(),
                          "broker": Broker()})()
    values = metrics.attention_values(admin.attention(deps))  # type: ignore[arg-type]
    assert values == {"ParkedMessages": 4, "RefundsFailed": 2, "RefundsPendingTooLong": 1,
                      "PaidButClosed": 1, "ReconciliationDifferences": 3,
                      "ReconciliationFailedDays": 1, "WebhookDeliveriesFailed": 0,
                      "EventsParked": 0}


def test_properties_never_replace_the_directive_the_dimension_or_a_value() -> None:
    record = metrics.emf_record({"RefundsFailed": 2}, stage="prod", now=NOW,
                                properties={"_aws": "x", "Stage": "other",
                                            "RefundsFailed": "many", "note": "kept"})
    assert_valid_emf(record)
    assert (record["Stage"], record["RefundsFailed"], record["note"]) == ("prod", 2, "kept")
