"""JSON-lines logging for the sandbox process."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message"}
CORRELATION_ALIASES = (("orderId", "out_trade_no"), ("tradeNo", "trade_no"),
                       ("notifyId", "notify_id"))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any ``extra``."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        extra = {k: v for k, v in vars(record).items() if k not in _STANDARD}
        # The same correlation keys as the API's and the bridge's lines (chalicelib.logs),
        # beside Alipay's own names: one grep for an orderId follows the whole payment.
        for ours, alipays in CORRELATION_ALIASES:
            if extra.get(alipays) not in (None, "") and ours not in extra:
                entry[ours] = extra[alipays]
        entry.update(extra)
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
