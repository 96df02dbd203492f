"""Webhook subscriptions and deliveries: one table, items by id.

A subscription (`WH_...`) is listed while `sub_list` is set; deleting one takes
it off the list (deliveries in flight to it stop at their next attempt) and
keeps the item, so its deliveries still name it. A delivery (`DLV_...`) keeps
the event's body and every attempt in `body`; `tries` counts the attempts, and
each attempt is written on the condition that no other was written since, so
a message delivered twice by RabbitMQ records its attempt once.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Any

from chalicelib.domain import iso, parse_iso
from chalicelib.domain.webhooks import Attempt, Delivery, DeliveryStatus, Subscription
from chalicelib.store.base import StoreBase, conditional, dynamo, get_item

log = logging.getLogger(__name__)

SUB_LIST = "SUB"
FAILED_FLAG = "1"


def _subscription(x: Any) -> Subscription:
    body = json.loads(x.body)
    return Subscription(id=x.id, url=body["url"], events=tuple(body["events"]),
                        secret=x.secret or "", create_time=parse_iso(x.create_time),
                        created_by=body.get("createdBy", ""))


def _delivery(x: Any) -> Delivery:
    body = json.loads(x.body)
    return Delivery(
        id=x.id, subscription_id=x.subscription_id, event_id=body["eventId"],
        type=body["type"], order_id=x.order_id, url=body["url"], body=body["event"],
        status=DeliveryStatus(x.status), create_time=parse_iso(x.create_time),
        attempts=tuple(Attempt(parse_iso(a["time"]), a["status"], int(a["ms"]), a["body"])
                       for a in body.get("attempts", ())))


def _delivery_body(d: Delivery) -> str:
    return json.dumps({
        "eventId": d.event_id, "type": d.type, "url": d.url, "event": d.body,
        "attempts": [{"time": iso(a.time), "status": a.status, "ms": a.ms, "body": a.body}
                     for a in d.attempts]}, ensure_ascii=False)


class WebhookStore(StoreBase):
    # --- subscriptions ----------------------------------------------------------

    def save_subscription(self, sub: Subscription) -> None:
        m = self.models
        body = json.dumps({"url": sub.url, "events": list(sub.events),
                           "createdBy": sub.created_by}, ensure_ascii=False)
        with dynamo():
            m.Webhook(sub.id, create_time=iso(sub.create_time), body=body, sub_list=SUB_LIST,
                      secret=sub.secret).save(condition=m.Webhook.id.does_not_exist())

    def get_subscription(self, sub_id: str) -> Subscription | None:
        """A live subscription; None when there is none or it was deleted."""
        item = get_item(self.models.Webhook, sub_id)
        if item is None or item.sub_list != SUB_LIST:
            return None
        return _subscription(item)

    def list_subscriptions(self, limit: int = 200) -> list[Subscription]:
        m = self.models
        with dynamo():
            return [_subscription(x) for x in m.Webhook.subscriptions.query(SUB_LIST, limit=limit)]

    def delete_subscription(self, sub_id: str, *, now: datetime) -> bool:
        """False when there was no live subscription of that id."""
        m = self.models
        with conditional() as written:
            m.Webhook._get_connection().update_item(
                sub_id, actions=[m.Webhook.sub_list.remove(), m.Webhook.secret.remove()],
                condition=m.Webhook.sub_list == SUB_LIST)
        if written.held:
            log.info("webhook subscription %s deleted at %s", sub_id, iso(now))
        return written.held

    # --- deliveries -------------------------------------------------------------

    def create_delivery(self, d: Delivery) -> bool:
        """False when the delivery exists already (the event was fanned out before)."""
        m = self.models
        with conditional() as written:
            m.Webhook(d.id, create_time=iso(d.create_time), body=_delivery_body(d),
                      status=d.status.value, subscription_id=d.subscription_id,
                      order_id=d.order_id, tries=0).save(
                condition=m.Webhook.id.does_not_exist())
        return written.held

    def get_delivery(self, delivery_id: str) -> Delivery | None:
        item = get_item(self.models.Webhook, delivery_id)
        if item is None or not item.subscription_id:
            return None
        return _delivery(item)

    def record_attempt(self, d: Delivery, attempt: Attempt, status: DeliveryStatus) -> bool:
        """The attempt and the delivery's new status, on the condition that no other
        attempt was recorded since `d` was read; False when one was."""
        m = self.models
        after = d.attempted(attempt, status)
        actions: list[Any] = [m.Webhook.body.set(_delivery_body(after)),
                              m.Webhook.status.set(status.value),
                              m.Webhook.tries.set(len(after.attempts))]
        actions.append(m.Webhook.failed.set(FAILED_FLAG) if status == DeliveryStatus.FAILED
                       else m.Webhook.failed.remove())
        with conditional() as written:
            m.Webhook._get_connection().update_item(
                d.id, actions=actions, condition=m.Webhook.tries == len(d.attempts))
        return written.held

    def reopen_delivery(self, delivery_id: str) -> Delivery | None:
        """PENDING again (an operator's resend), attempts kept; None: no such delivery."""
        m = self.models
        with conditional() as written:
            m.Webhook._get_connection().update_item(
                delivery_id, actions=[m.Webhook.status.set(DeliveryStatus.PENDING.value),
                                      m.Webhook.failed.remove()],
                condition=m.Webhook.subscription_id.exists())
        return self.get_delivery(delivery_id) if written.held else None

    def deliveries_of_subscription(self, sub_id: str, limit: int = 100) -> list[Delivery]:
        m = self.models
        with dynamo():
            return [_delivery(x) for x in m.Webhook.by_subscription.query(
                sub_id, scan_index_forward=False, limit=limit)]

    def deliveries_of_order(self, order_id: str, limit: int = 100) -> list[Delivery]:
        m = self.models
        with dynamo():
            return [_delivery(x) for x in m.Webhook.by_order.query(order_id, limit=limit)]

    def failed_deliveries(self, limit: int = 100) -> list[Delivery]:
        m = self.models
        with dynamo():
            return [_delivery(x) for x in m.Webhook.failed_deliveries.query(
                FAILED_FLAG, limit=limit)]
