"""Logs as JSON lines, one object per line, for the API, the bridge and Lambda.

Every line carries `time`, `level`, `logger` and `message`; a line that concerns
an order also carries `orderId`, `tradeNo` and `notifyId` when the caller passed
them with `extra=` (handlers do), so that one grep follows a payment through
the API, the queue, the bridge and the local sandbox (which writes the same keys).

    log.info("order %s PAID", oid, extra={"orderId": oid, "tradeNo": trade_no})
    {"time": "2026-11-26T07:20:00.123+00:00", "level": "INFO", "logger": "chalicelib.handlers",
     "message": "order ORDER_... PAID", "orderId": "ORDER_...", "tradeNo": "2026..."}

Every line is bounded: the values of `extra=` fields and the message's `%` args
are clipped to MAX_VALUE_CHARS, the whole message to MAX_MESSAGE_CHARS and a
traceback to MAX_TRACE_CHARS, each cut saying how many characters went. Much of
what is logged comes from outside (a notify's out_trade_no, a header, an error
echoing input): a 5 MB field must not become a 5 MB log line.

`configure()` only sets formatters and levels: it opens nothing.
"""

from __future__ import annotations

import json
import logging
import numbers
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from chalicelib import config

CORRELATION_KEYS = ("orderId", "tradeNo", "notifyId")
# Alipay's names for the same things, as the gateway wrapper and the sandbox log them.
ALIPAY_NAMES = {"orderId": "out_trade_no", "tradeNo": "trade_no", "notifyId": "notify_id"}

# The attributes every LogRecord has; anything else came in through `extra=`.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName"}


# An id, an amount, a reason: a few dozen characters. 200 keeps every legitimate
# value whole and bounds a hostile one.
MAX_VALUE_CHARS = 200
# The message after interpolation: one built from input before it was logged (an
# f-string, a dict logged as the message) has no args to clip, and is cut here.
MAX_MESSAGE_CHARS = 1000
# A traceback keeps its frames (each line clipped) up to this, its end kept: the
# exception's own line is last.
MAX_TRACE_CHARS = 8000
MAX_TRACE_LINE_CHARS = 500
MAX_ITEMS = 32  # of a list or dict logged as a field
_MAX_DEPTH = 4
_MAX_INT_BITS = 640  # about 190 digits; str() of a much larger int is slow, then refused


def clip_text(text: str, limit: int = MAX_VALUE_CHARS) -> str:
    """`text`, or its first `limit` characters and how many were cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…[{len(text) - limit} chars cut]"


def bounded(value: Any, limit: int = MAX_VALUE_CHARS, _depth: int = 0) -> Any:
    """`value` as a log line may carry it: JSON's scalars kept, strings clipped,
    containers cut to MAX_ITEMS (and nesting to a few levels), anything else its
    clipped `str()`."""
    if value is None or isinstance(value, bool | float):
        return value
    if isinstance(value, int):
        return value if value.bit_length() <= _MAX_INT_BITS else (
            f"<an integer of {value.bit_length()} bits>")
    if isinstance(value, str):
        return clip_text(value, limit)
    if isinstance(value, bytes | bytearray):
        return clip_text(repr(bytes(value[:limit + 1])), limit) + (
            f" ({len(value)} bytes)" if len(value) > limit else "")
    if _depth < _MAX_DEPTH and isinstance(value, Mapping):
        items = list(value.items())
        out = {clip_text(str(k), 64): bounded(v, limit, _depth + 1)
               for k, v in items[:MAX_ITEMS]}
        if len(items) > MAX_ITEMS:
            out["…"] = f"{len(items) - MAX_ITEMS} more items cut"
        return out
    if _depth < _MAX_DEPTH and isinstance(value, list | tuple | set | frozenset):
        seq = list(value)
        out_seq = [bounded(v, limit, _depth + 1) for v in seq[:MAX_ITEMS]]
        if len(seq) > MAX_ITEMS:
            out_seq.append(f"…{len(seq) - MAX_ITEMS} more items cut")
        return out_seq
    return clip_text(str(value), limit)


class _Clipped:
    """A `%s`/`%r` argument shown clipped (an exception whose text echoes input)."""

    __slots__ = ("_value",)

    def __init__(self, value: Any) -> None:
        self._value = value

    def __str__(self) -> str:
        return clip_text(str(self._value))

    def __repr__(self) -> str:
        return clip_text(repr(self._value))


def _clip_arg(arg: Any) -> Any:
    if isinstance(arg, str):
        return clip_text(arg)
    if arg is None or isinstance(arg, bool):
        return arg
    if isinstance(arg, int):
        return arg if arg.bit_length() <= _MAX_INT_BITS else bounded(arg)
    if isinstance(arg, Decimal) and len(arg.as_tuple().digits) > MAX_VALUE_CHARS:
        return _Clipped(arg)  # a Decimal parsed from input may have any number of digits
    if isinstance(arg, numbers.Number):
        return arg  # kept as it is, for %d and %.2f
    return _Clipped(arg)


def bounded_message(record: logging.LogRecord) -> str:
    """`record.getMessage()` with every argument clipped, and the whole clipped.

    A message that does not format (wrong args) is said so, clipped, rather than
    raising: logging's own error report would print the arguments in full."""
    msg = str(record.msg) if not isinstance(record.msg, str) else record.msg
    args = record.args
    if args:
        try:
            if isinstance(args, Mapping):
                msg = msg % {k: _clip_arg(v) for k, v in args.items()}
            else:
                msg = msg % tuple(_clip_arg(a) for a in args)
        except (TypeError, ValueError, KeyError) as exc:
            msg = f"{msg} <not formatted: {type(exc).__name__}>"
    return clip_text(msg, MAX_MESSAGE_CHARS)


def bounded_trace(text: str) -> str:
    """A formatted traceback: each line clipped, then its last MAX_TRACE_CHARS."""
    text = "\n".join(clip_text(line, MAX_TRACE_LINE_CHARS) for line in text.split("\n"))
    if len(text) <= MAX_TRACE_CHARS:
        return text
    return f"[{len(text) - MAX_TRACE_CHARS} chars cut]…{text[-MAX_TRACE_CHARS:]}"


class JsonFormatter(logging.Formatter):
    """time, level, logger, message, the correlation ids, then any other `extra` field,
    every one bounded (the module's docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": bounded_message(record),
        }
        extra = {k: bounded(v) for k, v in vars(record).items()
                 if k not in _STANDARD and not k.startswith("_")}
        for key in CORRELATION_KEYS:
            value = extra.pop(key, None)
            if value is None or value == "":
                value = extra.get(ALIPAY_NAMES[key])
            if value is not None and value != "":
                entry[key] = value
        entry.update(extra)
        if record.exc_info:
            entry["exc_info"] = bounded_trace(self.formatException(record.exc_info))
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
