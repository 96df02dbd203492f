"""What a message looks like on the wire: JSON bodies, properties and our headers.

Why a module of its own: the publisher writes bodies, the consumer reads them
and rewrites headers when it retries or parks, and the parked tools read and
rewrite the same headers when they list and replay. The header names and the
rules for copying a message live here once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pika.spec import BasicProperties

# Headers the consumer writes.
H_ATTEMPTS = "x-attempts"
H_ERROR = "x-error"
H_ORIGINAL_QUEUE = "x-original-queue"
H_PARKED_AT = "x-parked-at"
H_REPLAYED_AT = "x-replayed-at"
# Headers RabbitMQ writes when it dead-letters; not carried over on a republish
# (the new message starts its own dead-letter history).
BROKER_DEATH_HEADERS = (
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
)

MAX_ERROR_CHARS = 1000

PERSISTENT = 2
JSON = "application/json"


def encode(body: Mapping[str, Any]) -> bytes:
    return json.dumps(dict(body), ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def decode(body: bytes) -> dict[str, Any]:
    """The message as a dict; ValueError when it is not a UTF-8 JSON object."""
    data = json.loads(body.decode("utf-8"))  # UnicodeDecodeError and JSONDecodeError: ValueError
    if not isinstance(data, dict):
        raise ValueError(f"body is JSON but not an object: {type(data).__name__}")
    return data


def text(value: Any) -> Any:
    """Header values for people: bytes as text, nested tables and lists too."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, Mapping):
        return {str(k): text(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [text(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def properties_like(properties: BasicProperties, headers: Mapping[str, Any]) -> BasicProperties:
    """A persistent copy of a message's properties with new headers (no per-message TTL)."""
    return BasicProperties(
        content_type=properties.content_type,
        content_encoding=properties.content_encoding,
        delivery_mode=PERSISTENT,
        message_id=properties.message_id,
        correlation_id=properties.correlation_id,
        timestamp=properties.timestamp,
        type=properties.type,
        app_id=properties.app_id,
        headers=dict(headers),
    )


def fresh_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """The headers without RabbitMQ's dead-letter history."""
    return {k: v for k, v in headers.items() if k not in BROKER_DEATH_HEADERS}


def attempts(headers: Mapping[str, Any]) -> int:
    """How many times the message was handled before (our x-attempts header)."""
    try:
        return max(0, int(headers.get(H_ATTEMPTS) or 0))
    except (TypeError, ValueError):
        return 0


def message_ids(body: bytes) -> dict[str, str]:
    """orderId, tradeNo and notifyId of a message, for its log lines (chalicelib.logs)."""
    try:
        msg = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(msg, dict):
        return {}
    return {k: str(msg[k]) for k in ("orderId", "tradeNo", "notifyId") if msg.get(k)}


def error_text(exc: BaseException, limit: int = MAX_ERROR_CHARS) -> str:
    shown = f"{type(exc).__name__}: {exc}"
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."
