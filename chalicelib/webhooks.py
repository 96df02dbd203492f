"""Signed webhooks: subscriptions, the fan-out of events, deliveries and resends.

    exchange.order.events --order.#--> queue.order.webhook   fan_out: one delivery per
                                                              subscription that wants it
    queue.order.webhook.deliver                               deliver: one attempt
        failed, attempts left -> queue.order.webhook.deliver.wait.<s>s -> deliver again
        failed, none left     -> FAILED, in /admin/attention

A delivery's id is made from its subscription and event, so an event fanned out
twice makes one delivery; each attempt is recorded on the condition that none
was recorded since the delivery was read, so a message redelivered by RabbitMQ
is attempted and recorded once. The body is the event's JSON, fixed when the
delivery is made: every attempt signs and sends the same bytes.

The deliveries run on consumers of their own (WEBHOOK_WORKERS), never on the
order queues', and each attempt is bounded by WEBHOOK_TIMEOUT_SECONDS in all: a
subscriber that hangs or trickles holds one consumer that long, and the order
flow not at all. After an attempt that got no answer, its subscriber's next
deliveries are not called until its first wait is over (each is recorded as an
attempt that was not made, and waits its turn), so a dead subscriber does not
take every consumer from the live ones.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from chalicelib import domain
from chalicelib.context import Deps, find_order
from chalicelib.domain import Invalid, NotFound, Unavailable, Unprocessable
from chalicelib.domain.events import EVENT_ID_RE, EVENT_KINDS
from chalicelib.domain.webhooks import (
    KEPT,
    Attempt,
    Delivery,
    DeliveryStatus,
    Subscription,
    delivery_id,
    new_subscription_id,
    sign,
    subscription_fields,
)

log = logging.getLogger(__name__)


# --- the operator's API ---------------------------------------------------------

def subscribe(d: Deps, body: Any, *, by: str) -> dict[str, Any]:
    url, kinds, secret = subscription_fields(body)
    if d.webhooks is None:
        raise Unavailable("webhooks are not configured in this process")
    try:
        url = d.webhooks.check_url(url)
    except ValueError as exc:
        raise Invalid(f"url: {exc}") from exc
    sub = Subscription(id=new_subscription_id(), url=url, events=kinds, secret=secret,
                       create_time=d.clock(), created_by=by)
    d.store.save_subscription(sub)
    log.info("webhook subscription %s to %s for %s by %s", sub.id, url, ",".join(kinds), by)
    return sub.to_wire()


def list_subscriptions(d: Deps) -> dict[str, Any]:
    return {"items": [s.to_wire() for s in d.store.list_subscriptions()]}


def unsubscribe(d: Deps, sub_id: str, *, by: str) -> None:
    if not d.store.delete_subscription(sub_id, now=d.clock()):
        raise NotFound(f"no webhook subscription {sub_id!r}")
    log.info("webhook subscription %s deleted by %s", sub_id, by)


def deliveries_of_subscription(d: Deps, sub_id: str) -> dict[str, Any]:
    return {"items": [x.to_wire() for x in d.store.deliveries_of_subscription(sub_id)]}


def deliveries_of_order(d: Deps, order_id: str) -> dict[str, Any]:
    order = find_order(d, order_id)
    return {"items": [x.to_wire() for x in d.store.deliveries_of_order(order.id)]}


def resend(d: Deps, delivery: str, *, by: str) -> dict[str, Any]:
    """PENDING again and attempted once more now (attempts kept); 202 on the route."""
    reopened = d.store.reopen_delivery(delivery)
    if reopened is None:
        raise NotFound(f"no delivery {delivery!r}")
    d.broker.publish_delivery(reopened.id, resend=True)
    log.info("delivery %s resent by %s", reopened.id, by)
    return reopened.to_wire()


def failed(d: Deps) -> list[dict[str, Any]]:
    return [x.to_wire() for x in d.store.failed_deliveries()]


# --- the worker -----------------------------------------------------------------

class _Cooling:
    """Subscribers whose last attempt got no answer (a timeout, a refused connection),
    and until when their deliveries are not called but wait their turn: each such
    attempt holds a consumer for the whole timeout. Per process; thread-safe."""

    def __init__(self) -> None:
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()

    def start(self, sub_id: str, seconds: float) -> None:
        with self._lock:
            self._until[sub_id] = time.monotonic() + seconds

    def until(self, sub_id: str) -> float | None:
        """Seconds left of its quiet time, or None when it may be called."""
        with self._lock:
            end = self._until.get(sub_id)
            if end is None:
                return None
            left = end - time.monotonic()
            if left <= 0:
                del self._until[sub_id]
                return None
            return left


COOLING = _Cooling()


def fan_out(d: Deps, msg: Mapping[str, Any]) -> int:
    """An event from queue.order.webhook: a delivery for each subscription that wants
    its type, each queued for its first attempt. How many it queued."""
    event_id, kind, order_id = msg.get("eventId"), msg.get("type"), msg.get("orderId")
    if not (isinstance(event_id, str) and EVENT_ID_RE.fullmatch(event_id)
            and kind in EVENT_KINDS and isinstance(order_id, str)
            and domain.ORDER_ID_RE.fullmatch(order_id)):
        raise Unprocessable(f"not an order event: {str(dict(msg))[:300]}")
    body = json.dumps(dict(msg), ensure_ascii=False, separators=(",", ":"))
    queued = 0
    for sub in d.store.list_subscriptions():
        if not sub.wants(str(kind)):
            continue
        delivery = Delivery(id=delivery_id(sub.id, event_id), subscription_id=sub.id,
                            event_id=event_id, type=str(kind), order_id=order_id, url=sub.url,
                            body=body, status=DeliveryStatus.PENDING, create_time=d.clock())
        if not d.store.create_delivery(delivery):
            # Fanned out before: queued then, unless that try failed between the two.
            known = d.store.get_delivery(delivery.id)
            if known is None or known.status != DeliveryStatus.PENDING or known.attempts:
                continue
        d.broker.publish_delivery(delivery.id)
        queued += 1
    return queued


def deliver(d: Deps, msg: Mapping[str, Any]) -> DeliveryStatus | None:
    """One attempt of the delivery a message of queue.order.webhook.deliver names."""
    wanted = msg.get("deliveryId")
    delivery = d.store.get_delivery(wanted) if isinstance(wanted, str) else None
    if delivery is None:
        raise Unprocessable(f"no delivery {wanted!r}")
    if delivery.status != DeliveryStatus.PENDING:
        return None  # delivered or given up already: a repeated message
    schedule = d.settings.webhook_retry_seconds
    sub = d.store.get_subscription(delivery.subscription_id)
    if sub is None:
        attempt = Attempt(d.clock(), None, 0, "the subscription was deleted")
        d.store.record_attempt(delivery, attempt, DeliveryStatus.FAILED)
        return DeliveryStatus.FAILED
    if d.webhooks is None:
        raise Unavailable("webhooks are not configured in this process")
    started = d.clock()
    quiet = None if msg.get("resend") is True else COOLING.until(sub.id)  # a person asked
    if quiet is not None:
        # Its last attempt had no answer a moment ago: not called again before its
        # wait is over, so that it holds no consumer another subscriber needs.
        attempt = Attempt(started, None, 0, f"not called: no answer from it until "
                          f"{quiet:.0f} s from now")
        ok = False
    else:
        stamp = int(time.time())
        body = delivery.body.encode()
        answer = d.webhooks.post(delivery.url, body, {
            "Content-Type": "application/json",
            "Shop-Event": delivery.type,
            "Idempotency-Key": delivery.event_id,
            "Shop-Signature": sign(sub.secret, stamp, body),
        }, timeout=d.settings.webhook_timeout_seconds)
        # no answer: the body says why; an answer that failed anyway: why, then its start
        kept = answer.body if answer.error is None or answer.status is None else (
            f"{answer.error}: {answer.body}")
        attempt = Attempt(started, answer.status, answer.ms, kept[:KEPT])
        ok = answer.ok
        if answer.status is None:
            COOLING.start(sub.id, schedule[0] if schedule else 10)
    number = len(delivery.attempts) + 1
    if ok:
        status = DeliveryStatus.DELIVERED
    elif number > len(schedule):
        status = DeliveryStatus.FAILED
    else:
        status = DeliveryStatus.PENDING
    if not d.store.record_attempt(delivery, attempt, status):
        log.info("delivery %s: another attempt was recorded meanwhile", delivery.id)
        return None
    log_level = logging.INFO if status != DeliveryStatus.FAILED else logging.WARNING
    log.log(log_level, "delivery %s of %s to %s: attempt %d answered %s in %d ms -> %s",
            delivery.id, delivery.event_id, delivery.url, number,
            attempt.status or attempt.body, attempt.ms, status.value,
            extra={"orderId": delivery.order_id, "eventId": delivery.event_id})
    if status == DeliveryStatus.PENDING:
        d.broker.publish_delivery(delivery.id, wait_seconds=schedule[number - 1])
    return status
