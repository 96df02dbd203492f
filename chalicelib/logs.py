"""Logs as JSON lines, one object per line, for the API, the bridge and Lambda.

Every line carries `time`, `level`, `logger` and `message`; a line that concerns
an order also carries `orderId`, `tradeNo` and `notifyId` when the caller passed
them with `extra=` (handlers do), so that one grep follows a payment through
the API, the queue, the bridge and the local sandbox (which writes the same keys).

    log.info("order %s PAID", oid, extra={"orderId": oid, "tradeNo": trade_no})
    {"time": "2026-11-26T07:20:00.123+00:00", "level": "INFO", "logger": "chalicelib.handlers",
     "message": "order ORDER_... PAID", "orderId": "ORDER_...", "tradeNo": "2026..."}

`configure()` only sets formatters and levels: it opens nothing.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from chalicelib import config

CORRELATION_KEYS = ("orderId", "tradeNo", "notifyId")
# Alipay's names for the same things, as the gateway wrapper and the sandbox log them.
ALIPAY_NAMES = {"orderId": "out_trade_no", "tradeNo": "trade_no", "notifyId": "notify_id"}

# The attributes every LogRecord has; anything else came in through `extra=`.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """time, level, logger, message, the correlation ids, then any other `extra` field."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        extra = {k: v for k, v in vars(record).items()
                 if k not in _STANDARD and not k.startswith("_")}
        for key in CORRELATION_KEYS:
            value = extra.pop(key, None)
            if value is None or value == "":
                value = extra.get(ALIPAY_NAMES[key])
            if value is not None and value != "":
                entry[key] = value
        entry.update(extra)
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure(level: int | str = "INFO", *, force: bool = False,
              on_lambda: bool | None = None) -> None:
    """JSON lines on the root logger.

    Without `force`, only where nobody configured logging yet, or on Lambda (whose
    runtime installs its own handler: it keeps it and only changes its format).
    A test runner's handlers are left alone.
    """
    root = logging.getLogger()
    if on_lambda is None:
        on_lambda = config.on_lambda()
    if root.handlers and not (force or on_lambda):
        return
    if on_lambda and root.handlers and not force:
        for handler in root.handlers:
            handler.setFormatter(JsonFormatter())
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("pika", "botocore", "urllib3", "werkzeug"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
