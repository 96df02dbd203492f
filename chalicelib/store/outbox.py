"""The outbox: order events, written in the transaction of their change.

Every store write that changes what the rest of the shop is told of (an order
created, paid, closed, a refund succeeded, an order refunded) puts its event
here in the same TransactWriteItems (`put_event`), so a change without its
event, or an event without its change, cannot be. An event is `unsent` (a
sparse index the backstop sweep queries) until the relay has had RabbitMQ
confirm it; the table's stream tells the relay at once in AWS.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

from pynamodb.transactions import TransactWrite

from chalicelib.domain import iso, parse_iso
from chalicelib.domain.events import EventKind, OrderEvent
from chalicelib.store.base import StoreBase, conditional, dynamo, get_item
from chalicelib.store.models import Models

log = logging.getLogger(__name__)

UNSENT_FLAG = "1"
PARKED_FLAG = "1"


def up_to(before: datetime) -> str:
    """The highest `seq` of an event of `before` or earlier: a seq is the event's time,
    then `#`, and `$` comes right after `#`."""
    return f"{iso(before)}$"


def _item(models: Models, event: OrderEvent, **more: Any) -> Any:
    return models.Outbox(
        event.order_id, event.seq, event_id=event.event_id, type=event.kind.value,
        occurred_at=iso(event.occurred_at),
        data=json.dumps(event.data, ensure_ascii=False, sort_keys=True),
        order=json.dumps(event.order, ensure_ascii=False, sort_keys=True)
        if event.order is not None else None, **more)


def put_event(models: Models, tx: TransactWrite, event: OrderEvent) -> None:
    """The event's item, in the caller's transaction. Its key (the order, the
    change's time and id) is new by construction: the change's own condition is
    what keeps a change from being written twice."""
    tx.save(_item(models, event, unsent=UNSENT_FLAG))


def put_events(models: Models, tx: TransactWrite, events: Sequence[OrderEvent]) -> None:
    for event in events:
        put_event(models, tx, event)


def event_from_model(x: Any) -> OrderEvent:
    return OrderEvent(event_id=x.event_id, kind=EventKind(x.type), order_id=x.order_id,
                      occurred_at=parse_iso(x.occurred_at), data=json.loads(x.data), seq=x.seq,
                      order=json.loads(x.order) if x.order else None)


def _event_from_item(x: dict[str, Any]) -> OrderEvent:
    """An event from a raw DynamoDB item of the outbox (its attributes are strings)."""
    order = x.get("order", {}).get("S")
    return OrderEvent(event_id=x["event_id"]["S"], kind=EventKind(x["type"]["S"]),
                      order_id=x["order_id"]["S"], occurred_at=parse_iso(x["occurred_at"]["S"]),
                      data=json.loads(x["data"]["S"]), seq=x["seq"]["S"],
                      order=json.loads(order) if order else None)


class OutboxStore(StoreBase):
    def events_of(self, order_id: str) -> list[OrderEvent]:
        """Every event of the order, in order (sent or not)."""
        m = self.models
        with dynamo():
            return [event_from_model(x)
                    for x in m.Outbox.query(order_id, consistent_read=True)]

    def unsent_events(self, order_id: str) -> list[OrderEvent]:
        """The order's events not published yet, in order."""
        m = self.models
        with dynamo():
            return [event_from_model(x)
                    for x in m.Outbox.query(order_id, consistent_read=True,
                                            filter_condition=m.Outbox.unsent.exists())]

    def unsent_orders(self, before: datetime, limit: int = 500) -> list[str]:
        """Orders with an event not published and older than `before`, oldest first."""
        m = self.models
        seen: dict[str, None] = {}
        with dynamo():
            for x in m.Outbox.unsent_events.query(UNSENT_FLAG, m.Outbox.seq < up_to(before),
                                                  limit=limit):
                seen.setdefault(x.order_id, None)
        return list(seen)

    def unsent_pages(self, before: datetime, page_size: int = 500
                     ) -> Iterator[list[OrderEvent]]:
        """Every event not published and older than `before`, oldest first (by `seq`,
        so each order's in its order, across pages too), a page of the sparse index at
        a time (each page by order). The
        pages follow the index's own position, so a page may be read while the one
        before it is being published and marked."""
        m = self.models
        last: dict[str, Any] | None = None
        while True:
            with dynamo():
                # the table's own query: raw items, read here without building models
                # (this runs beside the publishing, and shares its interpreter)
                result = m.Outbox._get_connection().query(
                    index_name="unsent", hash_key=UNSENT_FLAG,
                    range_key_condition=m.Outbox.seq < up_to(before), limit=page_size,
                    exclusive_start_key=last)
            page = [_event_from_item(x) for x in result.get("Items", [])]
            last = result.get("LastEvaluatedKey")
            if page:
                yield sorted(page, key=lambda e: (e.order_id, e.seq))
            if not last:
                return

    def mark_events_sent(self, events: Sequence[OrderEvent], *, now: datetime) -> None:
        """Many events marked sent at once: each item written again as it is, less its
        `unsent` flag (BatchWriteItem, 25 a request). Only for events just published:
        it does not look at what the item holds now."""
        m = self.models
        with dynamo(), m.Outbox.batch_write() as batch:
            for e in events:
                batch.save(_item(m, e, sent_time=iso(now)))

    def event_failed(self, event: OrderEvent, *, reason: str, park_after: int) -> bool:
        """Counts a failure to publish the event that no retry will fix; at
        `park_after` of them it is parked (taken out of the relay's way, in front
        of a person). True when it was parked."""
        m = self.models
        item = get_item(m.Outbox, event.order_id, range_key=event.seq)
        if item is None or item.unsent is None:
            return False
        failures = int(item.failures or 0) + 1
        actions: list[Any] = [m.Outbox.failures.set(failures),
                              m.Outbox.reason.set(reason[:500])]
        if failures >= park_after:
            actions += [m.Outbox.unsent.remove(), m.Outbox.parked.set(PARKED_FLAG)]
        with conditional():
            m.Outbox._get_connection().update_item(
                event.order_id, event.seq, actions=actions,
                condition=m.Outbox.unsent.exists())
        return failures >= park_after

    def parked_events(self, limit: int = 100) -> list[tuple[OrderEvent, str]]:
        """Events that could not be published, oldest first, with why."""
        m = self.models
        with dynamo():
            return [(event_from_model(x), x.reason or "")
                    for x in m.Outbox.parked_events.query(PARKED_FLAG, limit=limit)]
