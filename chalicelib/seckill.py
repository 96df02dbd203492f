"""Flash sales (seckill): the queue holds the peak, the bridge writes at the rate
the database takes.

A sale brings more requests a second than the database takes writes. So the
API never writes an order here; it answers at once:

    POST /seckill/{saleId}
      sale open?             400 before the start or after the end
      sale sold out?         409, from a cheap eventually consistent read (the
                             transaction below is the real guard)
      queue deeper than SECKILL_MAX_QUEUE_DEPTH?
                             429 + Retry-After
                             (the sale and the depth are read at most once every
                             SECKILL_CACHE_MS per process, not once per request)
      claim + ticket         one transaction: put CLAIM#<sale>#<user> if absent,
                             put the ticket QUEUED; the claim is there: 409
      publish                {"ticketId","saleId","username"} to
                             exchange.order.seckill, persistent and confirmed;
                             not confirmed: claim and ticket deleted again, 503
      -> 202 {"ticketId"}

    bridge, queue.order.seckill, at most SECKILL_ORDERS_PER_SECOND (chalicelib/worker)
      ticket not QUEUED      a redelivery: nothing to do
      sale stock 0           SOLD_OUT (consistent read), the claim released
      transaction            order put, ORDER#<sale>#<user> put if absent,
                             sale stock -= 1 if >= 1, ticket QUEUED -> ORDERED
                             (cancelled: DUPLICATE or SOLD_OUT, nothing else changed)
      ORDERED                the usual delay message; the order is paid and
                             times out like any other (a closed one gives its
                             unit back to the sale)

A sale of N > 1 stock shards (store put_sale(sale, shards=N)): one item takes
about 1,000 writes a second and the transaction writes it twice, so one stock
item caps a sale at ~500 orders a second; N items take N times that. The drain
takes its unit from one shard: the user's own (a hash of the name) first, then
the others in order, each a consistent read of that shard and, when it has a
unit, the transaction above on it; SOLD_OUT only when every shard said empty.
The order's sale_id names the shard (`<sale>#<k>`), so a closed order gives its
unit back there. One per user stays exact (ORDER#<sale>#<user> is per sale, not
per shard); exactly the stock stays exact (each shard's condition, summed). The
API's sold-out read sums the shards (a BatchGetItem of N items, cached as ever).
The drain reads a sharded sale's own item (its description and shard ids) at
most once per SECKILL_CACHE_MS, and does not ask again, for that long, a shard
that said empty (the API's sold-out read is as old; a unit given back meanwhile
is found by the next ticket after that): once a sharded sale is sold out, the
rest of the queue is decided SOLD_OUT with a few reads of the sales table per
SECKILL_CACHE_MS, not N per ticket. A sale of one shard is read on every
message, as before.

The claim: a user holds one live ticket per sale. A ticket that ends SOLD_OUT
or FAILED releases it (same transaction as the ticket's last write), so the user
may ask again, e.g. when a closed order gave a unit back. ORDERED and DUPLICATE
keep it: one unit per user, and an order that closed unpaid still counts.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, TypeVar, cast

from chalicelib import domain, handlers
from chalicelib.context import Deps
from chalicelib.domain import (
    TICKET_DUPLICATE,
    TICKET_FAILED,
    TICKET_ORDERED,
    TICKET_QUEUED,
    TICKET_SOLD_OUT,
    AlreadyHolding,
    Invalid,
    Line,
    NotFound,
    Overloaded,
    Sale,
    SeckillOutcome,
    SoldOut,
    Ticket,
    TicketStatus,
    Unavailable,
    Unprocessable,
    iso,
    money_str,
)

log = logging.getLogger(__name__)
_T = TypeVar("_T")

QUEUE = "queue.order.seckill"  # chalicelib.broker.QUEUE_SECKILL, without importing pika
RETRY_AFTER_MAX_S = 60
_RELEASING = (TICKET_SOLD_OUT, TICKET_FAILED)


# --- the API ----------------------------------------------------------------------


def list_sales(deps: Deps) -> dict[str, Any]:
    return {
        "items": [
            {
                "id": s.id,
                "goodsId": s.goods_id,
                "name": s.name,
                "price": money_str(s.price_fen),
                "stock": s.stock,
                "startTime": iso(s.start_time),
                "endTime": iso(s.end_time),
            }
            for s in deps.store.list_sales()
        ]
    }


def request_ticket(deps: Deps, username: str, sale_id: str) -> dict[str, Any]:
    """POST /seckill/{saleId}: queue the user's request; no order is written here."""
    if not isinstance(sale_id, str) or not domain.SALE_ID_RE.fullmatch(sale_id):
        raise NotFound(f"no sale {sale_id!r}")
    ttl = deps.settings.seckill_cache_ms / 1000
    sale = _recent.get(deps.store, ("sale", sale_id), ttl, lambda: deps.store.get_sale(sale_id))
    if sale is None:
        raise NotFound(f"no sale {sale_id!r}")
    now = deps.clock()
    if now < sale.start_time:
        raise Invalid(f"sale {sale_id} opens at {iso(sale.start_time)}",
                         startTime=iso(sale.start_time))
    if now >= sale.end_time:
        raise Invalid(f"sale {sale_id} ended at {iso(sale.end_time)}",
                         endTime=iso(sale.end_time))
    if sale.stock <= 0:
        raise SoldOut(f"sale {sale_id} is sold out", saleId=sale_id)
    settings = deps.settings
    depth = _recent.get(deps.broker, ("depth", QUEUE), ttl, lambda: _queue_depth(deps))
    if depth >= settings.seckill_max_queue_depth:
        over = depth - settings.seckill_max_queue_depth + 1
        rate = settings.seckill_orders_per_second or 1.0
        retry = max(1, min(RETRY_AFTER_MAX_S, math.ceil(over / rate)))
        raise Overloaded(f"{depth} requests are waiting; try again in {retry} s",
                              retry_after=retry)
    ticket = Ticket(domain.new_ticket_id(now), username, sale_id, TICKET_QUEUED, None, now, now)
    held = deps.store.claim_ticket(ticket)
    if held is not None:
        extra = {"ticketId": held} if held else {}
        raise AlreadyHolding(f"you hold a ticket or an order for sale {sale_id} already",
                             **extra)
    try:
        deps.broker.publish_seckill(
            {"ticketId": ticket.id, "saleId": sale_id, "username": username})
    except Unavailable:
        deps.store.drop_ticket(ticket)  # a request that fails changes nothing
        raise
    return {"ticketId": ticket.id}


def get_ticket(deps: Deps, username: str, ticket_id: str) -> dict[str, Any]:
    if not isinstance(ticket_id, str) or not domain.TICKET_ID_RE.fullmatch(ticket_id):
        raise NotFound(f"no ticket {ticket_id!r}")
    ticket = deps.store.get_ticket(ticket_id)
    if ticket is None or ticket.username != username:
        raise NotFound(f"no ticket {ticket_id!r}")
    return {"ticketId": ticket.id, "saleId": ticket.sale_id, "status": ticket.status,
            "orderId": ticket.order_id}


def _queue_depth(deps: Deps) -> int:
    try:
        return int(deps.broker.queue_depth(QUEUE))
    except LookupError as exc:
        raise Unavailable(f"{QUEUE} is missing on the broker") from exc


class _Recent:
    """What was read less than `ttl` seconds ago, per owner (a store or a broker).

    The API's two reads per request, the sale (its window, the sold-out fast
    path) and the queue's depth (a passive queue declare, a broker round trip),
    are asked thousands of times a second in a burst; both may be a little old.
    One reader per owner at a time; the others wait for its answer. The drain
    keeps what it read itself with `put` and looks with `peek` (no lock held
    while it reads).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: weakref.WeakKeyDictionary[Any, dict[Any, tuple[float, Any]]] = (
            weakref.WeakKeyDictionary())

    def get(self, owner: Any, key: Any, ttl: float, read: Callable[[], _T]) -> _T:
        with self._lock:
            seen = self._seen.setdefault(owner, {})
            hit = seen.get(key)
            if hit is not None and time.monotonic() - hit[0] < ttl:
                return cast(_T, hit[1])
            value = read()
            seen[key] = (time.monotonic(), value)
            return value

    def peek(self, owner: Any, key: Any, ttl: float) -> Any | None:
        """What `put` kept less than `ttl` seconds ago, else None (nothing is read)."""
        with self._lock:
            hit = self._seen.get(owner, {}).get(key)
        return hit[1] if hit is not None and time.monotonic() - hit[0] < ttl else None

    def put(self, owner: Any, key: Any, value: Any) -> None:
        with self._lock:
            self._seen.setdefault(owner, {})[key] = (time.monotonic(), value)


_recent = _Recent()


# --- the worker -------------------------------------------------------------------


def on_seckill(deps: Deps, msg: Mapping[str, Any]) -> TicketStatus | None:
    """queue.order.seckill: decide a ticket. Returns its status (None: no such
    ticket), for logs and tests.

    Idempotent: a ticket that is not QUEUED any more is left as it is, and every
    write below is conditioned on QUEUED.
    """
    now = deps.clock()  # the order's create time: when the drain took the message
    ticket_id = msg.get("ticketId")
    if not isinstance(ticket_id, str) or not domain.TICKET_ID_RE.fullmatch(ticket_id):
        raise Unprocessable(f"seckill message without a valid ticketId: {dict(msg)!r}")
    ticket = deps.store.get_ticket(ticket_id)
    if ticket is None:
        # Dropped by the API after a publish it thought failed: nothing to decide.
        log.warning("seckill message for unknown ticket %s", ticket_id)
        return None
    if ticket.status != TICKET_QUEUED:
        return ticket.status
    found = _stock_items(deps, ticket.sale_id)
    if found is None:
        log.warning("ticket %s: sale %s is gone", ticket.id, ticket.sale_id)
        return _finish(deps, ticket, TICKET_FAILED, now)
    sale, items = found
    sharded = len(items) > 1
    ttl = deps.settings.seckill_cache_ms / 1000
    order = None
    for item in shard_walk(items, ticket.username):
        if not sharded:
            stock = sale.stock  # the sale's own item, read consistently just now
        elif _recent.peek(deps.store, ("dry", item), ttl):
            continue  # said empty less than SECKILL_CACHE_MS ago: not asked again
        else:
            shard = deps.store.get_sale(item, consistent=True)
            stock = shard.stock if shard is not None else 0
        if stock < 1:
            if sharded:
                _recent.put(deps.store, ("dry", item), True)
            continue
        if order is None:
            line = Line(sale.goods_id, sale.name, sale.price_fen, 1)
            order = handlers._new_order(deps, ticket.username, "1", [line], now=now)
        order.sale_id = item  # where the unit comes from, and goes back to if it closes
        outcome = deps.store.create_seckill_order(order, ticket)
        if outcome == SeckillOutcome.SOLD_OUT:
            if sharded:
                _recent.put(deps.store, ("dry", item), True)
            continue  # that shard ran dry meanwhile: the next one
        if outcome == SeckillOutcome.ORDERED:
            log.info("ticket %s ordered %s from %s", ticket.id, order.id, item,
                     extra={"orderId": order.id})
            handlers._schedule_check(deps, order.id)
            return TICKET_ORDERED
        if outcome == SeckillOutcome.DUPLICATE:
            return _finish(deps, ticket, TICKET_DUPLICATE, now)
        return _current_status(deps, ticket.id)  # decided meanwhile (a redelivery raced us)
    return _finish(deps, ticket, TICKET_SOLD_OUT, now)  # every shard said empty (lately)


def shard_walk(items: list[_T], username: str) -> list[_T]:
    """The order the drain tries a sale's stock items in for a user: the user's
    own shard (crc32 of the name, the same in every process) first, then the
    others in order, wrapping around."""
    if len(items) < 2:
        return list(items)
    first = zlib.crc32(username.encode()) % len(items)
    return items[first:] + items[:first]


def _stock_items(deps: Deps, sale_id: str) -> tuple[Sale, list[str]] | None:
    """The sale's own item and the ids of its stock items (store.sale_stock_items),
    consistent. A sale of N > 1 shards is kept for SECKILL_CACHE_MS (what it
    holds does not change while the sale runs; its stock is in the shards); a
    sale of one shard is read every time, as its item holds the stock."""
    ttl = deps.settings.seckill_cache_ms / 1000
    key = ("stock-items", sale_id)
    kept = _recent.peek(deps.store, key, ttl)
    if kept is not None:
        return cast(tuple[Sale, list[str]], kept)
    found = deps.store.sale_stock_items(sale_id, consistent=True)
    if found is not None and len(found[1]) > 1:
        _recent.put(deps.store, key, found)
    return found


def _finish(deps: Deps, ticket: Ticket, status: TicketStatus,
            now: datetime) -> TicketStatus | None:
    if deps.store.finish_ticket(ticket, status, release_claim=status in _RELEASING, now=now):
        return status
    return _current_status(deps, ticket.id)


def _current_status(deps: Deps, ticket_id: str) -> TicketStatus | None:
    current = deps.store.get_ticket(ticket_id)
    return current.status if current else None
