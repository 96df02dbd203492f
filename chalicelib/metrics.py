"""What needs a person (chalicelib/admin.py `attention()`) as CloudWatch metrics,
so that an alarm pages someone (.chalice/resources.json: an alarm per metric,
notifying the `AttentionTopic` SNS topic).

The metrics travel in CloudWatch's embedded metric format (EMF): one log line
that is a JSON object with the metric directive under `_aws` and the dimension
and each metric's value as top-level keys. CloudWatch Logs turns such a line
into metrics (in Lambda with nothing else to set up; for the worker's container
once its logs reach CloudWatch Logs): no `cloudwatch:PutMetricData` call, no
permission for it, no client, no dependency.

    {"_aws": {"Timestamp": 1764650000000, "CloudWatchMetrics": [{"Namespace": "ShopPay",
       "Dimensions": [["Stage"]], "Metrics": [{"Name": "ParkedMessages", "Unit": "Count"}, ...]}]},
     "Stage": "prod", "ParkedMessages": 2, "RefundsFailed": 0, "RefundsPendingTooLong": 0,
     "PaidButClosed": 1, "parkedByQueue": {"queue.order.pay.parked": 2}}

Why not the project's JSON log lines: `logs.JsonFormatter` puts the text under
`message` beside `time`, `level` and `logger`, and drops `extra` keys that
start with `_` (so `_aws` would never reach the line); Lambda's own handler
prefixes its text format. So the line goes through a logger of its own
(`shoppay.metrics`, not propagated to the root) whose handler writes the message
as it is, one line on stdout, whatever the root's handlers and level are: a
metric that pages must not vanish with LOG_LEVEL=WARNING.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from chalicelib import config

NAMESPACE = "ShopPay"
DIMENSION = "Stage"
LOGGER_NAME = "shoppay.metrics"
# metric name -> what it counts (the alarms in .chalice/resources.json watch these names)
METRICS = {
    "ParkedMessages": "messages parked in every <queue>.parked (the worker gave up on them)",
    "RefundsFailed": "refunds Alipay refused (FAILED): a person retries or settles them",
    "RefundsPendingTooLong": "refunds PENDING for over 10 minutes (Alipay's answer unknown)",
    "PaidButClosed": "closed orders whose money Alipay holds and that were not refunded yet",
    "ReconciliationDifferences": "open differences between Alipay's bills and the shop's books",
    "ReconciliationFailedDays": "days whose reconciliation failed (no bill, a bad bill)",
    "WebhookDeliveriesFailed": "webhook deliveries given up after a day of retries",
    "EventsParked": "order events that could not be published (parked)",
}


class RawLineHandler(logging.Handler):
    """Writes each record's message as it is, one line, on the current sys.stdout
    (looked up at each write: Lambda's runtime and test runners replace it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stdout
            stream.write(record.getMessage() + "\n")
            stream.flush()
        except Exception:  # logging's rule: a handler never raises
            self.handleError(record)


def metrics_logger() -> logging.Logger:
    """The `shoppay.metrics` logger, given its raw-line handler on first use (never
    at import)."""
    log = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(h, RawLineHandler) for h in log.handlers):
        log.addHandler(RawLineHandler())
        log.setLevel(logging.INFO)
        log.propagate = False  # the root's JSON formatter would wrap the line
    return log


def attention_values(attention: Mapping[str, Any]) -> dict[str, int]:
    """The metrics' values from `admin.attention()`'s answer: the parked counts
    summed, the refunds split by status, the paid-but-closed orders, the open
    differences of the reconciliations, the days whose run failed, the webhook
    deliveries given up and the order events that could not be published counted."""
    parked = attention.get("parked") or {}
    refunds = attention.get("refunds") or []
    statuses = [str(r.get("status", "")) for r in refunds if isinstance(r, Mapping)]
    return {
        "ParkedMessages": sum(int(n) for n in parked.values()),
        "RefundsFailed": statuses.count("FAILED"),
        "RefundsPendingTooLong": statuses.count("PENDING"),
        "PaidButClosed": len(attention.get("paidButClosed") or []),
        "ReconciliationDifferences": len(attention.get("reconciliation") or []),
        "ReconciliationFailedDays": len(attention.get("failedRuns") or []),
        "WebhookDeliveriesFailed": len(attention.get("deliveries") or []),
        "EventsParked": len(attention.get("parkedEvents") or []),
    }


def emf_record(values: Mapping[str, int], *, stage: str, now: datetime | None = None,
               properties: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One EMF object: the directive, the `Stage` dimension, each value at the top
    level. `properties`: more top-level keys (searchable in Logs Insights, not
    metrics); they never replace the directive, the dimension or a value."""
    timestamp = int((now.timestamp() if now is not None else time.time()) * 1000)
    record: dict[str, Any] = {
        "_aws": {
            "Timestamp": timestamp,
            "CloudWatchMetrics": [{
                "Namespace": NAMESPACE,
                "Dimensions": [[DIMENSION]],
                "Metrics": [{"Name": name, "Unit": "Count"} for name in values],
            }],
        },
        DIMENSION: stage,
        **{name: int(value) for name, value in values.items()},
    }
    for key, value in (properties or {}).items():
        record.setdefault(key, value)
    return record


def emit_attention(attention: Mapping[str, Any], *, log: logging.Logger | None = None,
                   stage: str | None = None, now: datetime | None = None) -> dict[str, int]:
    """Writes the attention list's metrics as ONE EMF line; returns their values.

    `attention`: what `admin.attention(deps)` answers. `stage`: the `Stage`
    dimension's value (default: the process's settings, `STAGE`; the alarms watch
    the deployed stage's name). `log`: where the line goes (default: the
    `shoppay.metrics` logger above); a logger given here must write the message
    as it is, or CloudWatch sees no metric. `now`: the metrics' time (default: now).
    """
    if stage is None:
        stage = config.get().stage  # the process's settings, read on first use
    values = attention_values(attention)
    parked = attention.get("parked") or {}
    record = emf_record(values, stage=stage, now=now,
                        properties={"parkedByQueue": {str(q): int(n) for q, n in parked.items()}})
    (log or metrics_logger()).info(json.dumps(record, separators=(",", ":"), default=str))
    return values
