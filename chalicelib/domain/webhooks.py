"""Webhook subscriptions and their deliveries, in the shop's words.

A subscription names a URL, the event types it wants and the secret its
deliveries are signed with (the secret is never shown again once saved). A
delivery is one event for one subscription: its id is made from the two, so an
event fanned out twice makes one delivery, and every attempt is kept on it.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from chalicelib.domain.errors import Invalid
from chalicelib.domain.events import EVENT_KINDS
from chalicelib.domain.order import iso

MIN_SECRET = 16  # characters: a guessable secret signs nothing
MAX_SECRET = 256
MAX_URL = 2048
KEPT = 200  # characters of a subscriber's answer kept on its delivery


class DeliveryStatus(enum.StrEnum):
    PENDING = "PENDING"
    DELIVERED = "DELIVERED"
    FAILED = "FAILED"


@dataclass(frozen=True)
class Subscription:
    id: str
    url: str
    events: tuple[str, ...]
    secret: str = field(repr=False)
    create_time: datetime
    created_by: str

    def wants(self, kind: str) -> bool:
        return kind in self.events

    def to_wire(self) -> dict[str, Any]:
        """Without the secret: it is shown to nobody once saved."""
        return {"id": self.id, "url": self.url, "events": list(self.events),
                "createTime": iso(self.create_time), "createdBy": self.created_by}


@dataclass(frozen=True)
class Attempt:
    time: datetime
    status: int | None  # the subscriber's HTTP status; None: no answer
    ms: int
    body: str  # the answer's first characters, or why there was none

    def to_wire(self) -> dict[str, Any]:
        return {"time": iso(self.time), "status": self.status, "ms": self.ms,
                "body": self.body}


@dataclass(frozen=True)
class Delivery:
    id: str
    subscription_id: str
    event_id: str
    type: str
    order_id: str
    url: str
    body: str  # the event's JSON, the very bytes signed and POSTed each time
    status: DeliveryStatus
    create_time: datetime
    attempts: tuple[Attempt, ...] = ()

    def attempted(self, attempt: Attempt, status: DeliveryStatus) -> Delivery:
        return replace(self, attempts=(*self.attempts, attempt), status=status)

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "subscriptionId": self.subscription_id,
                "eventId": self.event_id, "type": self.type, "orderId": self.order_id,
                "url": self.url, "status": self.status.value,
                "createTime": iso(self.create_time),
                "attempts": [a.to_wire() for a in self.attempts]}


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The Shop-Signature header: `t=<unix seconds>,v1=<hex HMAC-SHA256 of
    "<t>.<body>">` (Stripe's shape), so that a subscriber checks both the body and
    its age with the one secret."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def new_subscription_id() -> str:
    return f"WH_{secrets.token_hex(8)}"


def delivery_id(subscription_id: str, event_id: str) -> str:
    """The same for the same event and subscription, however often it is fanned out."""
    digest = hashlib.sha256(f"{subscription_id}\n{event_id}".encode()).hexdigest()
    return f"DLV_{digest[:32]}"


def subscription_fields(body: Any) -> tuple[str, tuple[str, ...], str]:
    """(url, events, secret) of a request to subscribe; Invalid says what is wrong.
    Whether the URL may be called is the sender's to say (chalicelib/webhooks.py)."""
    if not isinstance(body, dict):
        raise Invalid("the body must be a JSON object with url, events and secret")
    url, kinds, secret = body.get("url"), body.get("events"), body.get("secret")
    if not isinstance(url, str) or not url.strip():
        raise Invalid("url is required")
    if len(url) > MAX_URL:
        raise Invalid(f"url is longer than {MAX_URL} characters")
    if not isinstance(kinds, list) or not kinds or not all(isinstance(k, str) for k in kinds):
        raise Invalid(f"events must be a non-empty list of {', '.join(EVENT_KINDS)}")
    unknown = sorted(set(kinds) - set(EVENT_KINDS))
    if unknown:
        raise Invalid(f"unknown event type(s) {', '.join(unknown)}; known: "
                      f"{', '.join(EVENT_KINDS)}", unknown=unknown)
    if not isinstance(secret, str) or not secret:
        raise Invalid("secret is required: every delivery is signed with it")
    if not MIN_SECRET <= len(secret) <= MAX_SECRET:
        raise Invalid(f"secret must be {MIN_SECRET} to {MAX_SECRET} characters")
    ordered = tuple(k for k in EVENT_KINDS if k in kinds)
    return url.strip(), ordered, secret
