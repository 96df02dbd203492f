"""The store in memory: the DynamoDB store's conditional rules without DynamoDB.

`InMemoryStore` has the public methods of `chalicelib.store.Store` and behaves
as it does on DynamoDB, which tests/store_contract.py proves by running one
suite against both. Where they could differ, the DynamoDB store is the
reference and this one follows it:

- every operation holds one lock, so a condition and its write are atomic, and
  a "transaction" (create_order, close_order, claim_ticket, drop_ticket,
  create_seckill_order, finish_ticket, reserve_refund, settle_refund,
  retry_refund) checks every condition before it writes anything: a failed
  condition writes nothing;
- when several conditions of a transaction fail, the error is the one the
  DynamoDB store reports (it reads the first failed condition in the order
  pynamodb sends the items: deletes, puts, updates);
- a transaction of more than 100 actions, or naming one item twice, is refused
  by DynamoDB (ValidationException) and by this store alike: Unavailable;
- times are kept as DynamoDB keeps them, ISO strings in UTC with milliseconds
  (`chalicelib.domain.iso`), so a datetime comes back truncated to the millisecond, and
  "due" and "newest" compare those strings;
- an order keeps what the DynamoDB item keeps: create_order stores a new order's
  fields (not its payment fields, refund sums, link expiry or `extra`; absent
  sums read 0, as on an older item); mark_paid, close_order,
  mark_paid_but_closed and the refund writes add theirs, and the sparse index
  flags (unpaid, recheck, paid_but_closed, a refund's "open") are kept as the
  item keeps them;
- the lists read from an index come in that index's order (range key, then id
  where DynamoDB leaves ties unordered); a timeline's events of one millisecond
  come in the order appended (DynamoDB: in any order);
- search_orders pages with a cursor of its own (opaque, as the DynamoDB store's:
  the two are not interchangeable), newest first by create time, then id;
- where the DynamoDB store turns a failed condition or a refused request into
  Unavailable, so does this one: clear_recheck of an unknown order,
  order_by_trade of an empty trade number;
- what a method returns is a copy (or an immutable value): changing it, or the
  order passed in, does not change the store.

Test hook: `fail_next(n)` makes the next n operations raise Unavailable and
change nothing, as a DynamoDB that does not answer. (A real timeout may also
come after the write was applied; that case is not simulated.)
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import secrets
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from datetime import date, datetime, timedelta
from typing import Any, Concatenate, ParamSpec, TypeVar

from chalicelib.domain import (
    CLOSED,
    MAX_TRANSACTION_ACTIONS,
    PAID,
    REFUNDED,
    TICKET_ORDERED,
    TICKET_QUEUED,
    UNPAID,
    CartLine,
    Conflict,
    EventType,
    Goods,
    Invalid,
    Line,
    Order,
    OrderStatus,
    OutOfStock,
    PriceChanged,
    Refund,
    RefundStatus,
    Sale,
    SeckillOutcome,
    Ticket,
    TicketStatus,
    TimelineEvent,
    TooManyUnpaidOrders,
    Unavailable,
    events,
    iso,
    parse_iso,
    sale_of,
    shard_key,
    split_stock,
)
from chalicelib.domain.events import OrderEvent
from chalicelib.domain.reconciliation import (
    AlreadyResolved,
    Difference,
    Extra,
    Report,
    ReportStatus,
    bill_day,
)
from chalicelib.domain.timeline import created as created_event
from chalicelib.domain.webhooks import Attempt, Delivery, DeliveryStatus, Subscription
from chalicelib.ports import PaidRecord

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _operation(
    method: Callable[Concatenate[InMemoryStore, _P], _R],
) -> Callable[Concatenate[InMemoryStore, _P], _R]:
    """One public operation: under the store's lock, after the injected failures."""

    @functools.wraps(method)
    def run(self: InMemoryStore, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self._lock:
            self._fail_if_asked(method.__name__)
            return method(self, *args, **kwargs)

    return run


def _iso(ts: datetime) -> str:
    text = iso(ts)
    assert text is not None
    return text


def _ms(ts: datetime) -> datetime:
    """A datetime as it comes back from DynamoDB: UTC, milliseconds."""
    return parse_iso(_iso(ts))


class InMemoryStore:
    """Goods, carts, orders, flash sales, refunds and timelines in dicts, with
    Store's conditions."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._goods: dict[str, Goods] = {}
        self._carts: dict[str, dict[str, CartLine]] = {}
        self._orders: dict[str, dict[str, Any]] = {}  # the DynamoDB item's fields
        self._sales: dict[str, Sale] = {}  # a sale, and a sharded sale's `<sale>#<k>`
        self._sale_shards: dict[str, int] = {}  # sale -> N, for a sale of N > 1 shards
        self._tickets: dict[str, Ticket] = {}
        self._claims: dict[tuple[str, str], str] = {}  # (sale, user) -> ticket id
        self._bought: dict[tuple[str, str], str] = {}  # (sale, user) -> order id
        # user -> ids of cart orders that may still be UNPAID (the cap; UNPAID#<user>)
        self._unpaid_ids: dict[str, set[str]] = {}
        self._refunds: dict[str, dict[str, Any]] = {}  # the DynamoDB item's fields
        self._refund_keys: dict[str, str] = {}  # IDEM#<order>#<key> -> refund id
        self._timeline: dict[str, list[tuple[str, str, str, tuple[str, str]]]] = {}
        # (time, type, JSON, the DynamoDB item's sort key)
        # (DAY#<day>, REPORT | DIFF#<id> | EXTRA#<key>) -> the item's fields
        self._recon: dict[tuple[str, str], dict[str, Any]] = {}
        # order id -> seq -> the outbox item's fields (event, unsent, parked, ...)
        self._outbox: dict[str, dict[str, dict[str, Any]]] = {}
        self._webhooks: dict[str, dict[str, Any]] = {}  # id -> a subscription's or delivery's
        self._failures = 0
        self._failing_ops: frozenset[str] | None = None

    # --- test hooks -----------------------------------------------------------

    def fail_next(self, n: int = 1, *, only: Collection[str] | None = None) -> None:
        """The next `n` operations raise Unavailable and change nothing ("DynamoDB is
        not answering"). With `only` (method names, e.g. {"close_order"}) only
        calls of those count and fail. `fail_next(0)` ends it. create_tables and
        warm never fail."""
        with self._lock:
            self._failures = n
            self._failing_ops = frozenset(only) if only is not None else None

    def _fail_if_asked(self, op: str) -> None:
        if self._failures <= 0:
            return
        if self._failing_ops is not None and op not in self._failing_ops:
            return
        self._failures -= 1
        raise Unavailable(f"dynamodb is not answering (in-memory store: {op} made to fail)")

    # --- set-up -------------------------------------------------------------

    def create_tables(self) -> None:
        """Nothing to create."""

    def warm(self) -> None:
        """No client to build."""

    @_operation
    def ping(self) -> None:
        """Always answers (unless fail_next says otherwise)."""

    # --- goods --------------------------------------------------------------

    @_operation
    def put_goods(self, goods: Goods) -> None:
        self._goods[goods.id] = Goods(goods.id, goods.name, int(goods.price_fen),
                                      int(goods.stock))

    @_operation
    def list_goods(self) -> list[Goods]:
        return [self._goods[k] for k in sorted(self._goods)]

    @_operation
    def get_goods(self, ids: Iterable[str]) -> dict[str, Goods]:
        return {k: self._goods[k] for k in set(ids) if k in self._goods}

    # --- cart ---------------------------------------------------------------

    def _cart_lines(self, username: str) -> list[CartLine]:
        cart = self._carts.get(username, {})
        return [cart[k] for k in sorted(cart)]  # the range key's order

    @_operation
    def get_cart_lines(self, username: str) -> list[CartLine]:
        return self._cart_lines(username)

    @_operation
    def get_cart(self, username: str) -> dict[str, int]:
        return {line.goods_id: line.num for line in self._cart_lines(username)}

    @_operation
    def set_cart_line(self, username: str, goods_id: str, num: int,
                      goods: Goods | None = None) -> None:
        """`goods`: the goods as just read, its price and name kept on the line."""
        self._carts.setdefault(username, {})[goods_id] = CartLine(
            goods_id, int(num),
            int(goods.price_fen) if goods else None, goods.name if goods else None)

    @_operation
    def refresh_cart_line(self, username: str, goods: Goods) -> None:
        """The goods' current price and name onto the user's line, if it still exists."""
        cart = self._carts.get(username, {})
        line = cart.get(goods.id)
        if line is not None:
            cart[goods.id] = replace(line, price_fen=int(goods.price_fen), name=goods.name)

    @_operation
    def delete_cart_line(self, username: str, goods_id: str) -> None:
        cart = self._carts.get(username, {})
        cart.pop(goods_id, None)
        if not cart:
            self._carts.pop(username, None)

    # --- orders -------------------------------------------------------------

    @_operation
    def create_order(self, order: Order, cart: Mapping[str, int] | None, *,
                     max_unpaid: int | None = None) -> None:
        """Put the order, take the stock and (for a cart order) empty the cart, all or nothing.

        Conditions, in the order the DynamoDB store reports them: each cart line
        still holds the num read (Conflict), the order does not exist (Conflict),
        with `max_unpaid` the user's set of unpaid order ids holds fewer than that
        once the ids of orders paid or closed since are taken out
        (TooManyUnpaidOrders; the DynamoDB store takes them out and tries again),
        per line the goods has `stock >= num` at the line's price (PriceChanged
        when the price differs, else OutOfStock). Without `max_unpaid` the order
        is not counted."""
        cart = dict(cart or {})
        capped = [("seckill", "UNPAID#" + order.username)] if max_unpaid is not None else []
        created = events.created(order, order.create_time)
        _transaction([("orders", order.id), ("outbox", order.id, created.seq)] + capped
                     + [("goods", line.goods_id) for line in order.lines]
                     + [("carts", order.username, gid) for gid in cart])
        held = self._carts.get(order.username, {})
        for goods_id, num in cart.items():
            line = held.get(goods_id)
            if line is None or line.num != num:
                raise Conflict("the cart changed while ordering; try again")
        if order.id in self._orders:
            raise Conflict(f"order {order.id} exists already")
        if max_unpaid is not None:
            ids = self._unpaid_ids.setdefault(order.username, set())
            if len(ids) >= max_unpaid:  # as the DynamoDB store: pruned only when full
                ids -= {i for i in ids if self._orders[i]["status"] != UNPAID}
            if len(ids) >= max_unpaid:
                raise TooManyUnpaidOrders(max_unpaid)
        for line in order.lines:
            goods = self._goods.get(line.goods_id)
            if goods is not None and goods.price_fen != line.price_fen:
                raise PriceChanged(line.goods_id, goods)
            if goods is None or goods.stock < line.num:
                raise OutOfStock(line.goods_id)
        # every condition holds: write
        self._orders[order.id] = _record(order)
        self._put_events([created])
        self._append_event(created_event(order))
        if max_unpaid is not None:
            self._unpaid_ids[order.username].add(order.id)
        for line in order.lines:
            goods = self._goods[line.goods_id]
            self._goods[goods.id] = replace(goods, stock=goods.stock - line.num)
        for goods_id in cart:
            held.pop(goods_id)
        if not held:
            self._carts.pop(order.username, None)

    @_operation
    def get_order(self, order_id: str, *, consistent: bool = True) -> Order | None:
        rec = self._orders.get(order_id)
        return _order(rec) if rec is not None else None

    @_operation
    def get_order_total(self, order_id: str) -> int | None:
        rec = self._orders.get(order_id)
        return _order(rec).total_fen if rec is not None else None

    @_operation
    def get_orders(self, ids: Iterable[str]) -> dict[str, Order]:
        return {i: _order(self._orders[i]) for i in set(ids) if i in self._orders}

    @_operation
    def list_orders(self, username: str, limit: int = 100) -> list[Order]:
        """Newest first (by create_time), at most `limit`."""
        mine = [r for r in self._orders.values() if r["username"] == username]
        mine.sort(key=lambda r: r["create_time"])
        mine.reverse()
        return [_order(r) for r in mine[:max(limit, 0)]]

    @_operation
    def mark_paid(
        self,
        order_id: str,
        *,
        total_fen: int,
        trade_no: str,
        pay_time: datetime,
        notify_id: str | None,
        now: datetime,
        notes: Sequence[TimelineEvent] = (),
    ) -> bool:
        """UNPAID -> PAID for exactly this amount. False when the order was not UNPAID,
        is due another amount, or does not exist."""
        rec = self._orders.get(order_id)
        if rec is None or rec["status"] != UNPAID or rec["total_fen"] != total_fen:
            return False
        self._put_events([events.paid(order_id, trade_no=trade_no, now=now)])
        for note in notes:
            self._append_event(note)
        rec.update(status=PAID, transaction_id=trade_no, pay_time=_iso(pay_time),
                   notify_id=notify_id or "", update_time=_iso(now), unpaid=None,
                   pay_day=bill_day(pay_time).isoformat())
        return True

    @_operation
    def close_order(self, order: Order, *, now: datetime,
                    notes: Sequence[TimelineEvent] = ()) -> bool:
        """UNPAID -> CLOSED and the stock back (to the sale for a flash-sale order),
        all or nothing. False when not UNPAID. The stock given back is that of the
        order passed in, as in the DynamoDB store. Closed before the expire time of
        the order passed in, it is marked for a recheck once that time has come
        (`link_expire_time`, `recheck_due`)."""
        if order.sale_id:
            _transaction([("orders", order.id)] + [("sales", order.sale_id)] * len(order.lines))
        else:
            _transaction([("orders", order.id)]
                         + [("goods", line.goods_id) for line in order.lines])
        rec = self._orders.get(order.id)
        if rec is None or rec["status"] != UNPAID:
            return False
        self._put_events([events.closed(order, now)])
        for note in notes:
            self._append_event(note)
        stamp = _iso(now)
        rec.update(status=CLOSED, close_time=stamp, end_time=stamp, update_time=stamp,
                   unpaid=None)
        if now < order.expire_time:  # closed before its payment link expires
            rec.update(recheck="1", link_expire_time=_iso(order.expire_time))
        # DynamoDB's unconditional `ADD stock` on a goods or sale that is not there
        # would create an item of key and stock alone; nothing here deletes goods or
        # sales, so that is left out.
        for line in order.lines:
            if order.sale_id:
                sale = self._sales.get(order.sale_id)
                if sale is not None:
                    self._sales[sale.id] = replace(sale, stock=sale.stock + line.num)
            else:
                goods = self._goods.get(line.goods_id)
                if goods is not None:
                    self._goods[goods.id] = replace(goods, stock=goods.stock + line.num)
        return True

    @_operation
    def unpaid_due(self, now: datetime, limit: int = 500) -> list[str]:
        """Ids of UNPAID orders whose check time has passed (to the millisecond),
        oldest check time first."""
        until = _iso(now)
        due = [r for r in self._orders.values() if r["unpaid"] and r["check_time"] <= until]
        due.sort(key=lambda r: r["check_time"])
        return [r["id"] for r in due[:max(limit, 0)]]

    @_operation
    def recheck_due(self, now: datetime, limit: int = 500) -> list[str]:
        """Ids of orders still marked for a recheck whose link expired by `now` (to
        the millisecond), oldest link_expire_time first."""
        until = _iso(now)
        due = [r for r in self._orders.values()
               if r["recheck"] and r["link_expire_time"] <= until]
        due.sort(key=lambda r: (r["link_expire_time"], r["id"]))
        return [r["id"] for r in due[:max(limit, 0)]]

    @_operation
    def clear_recheck(self, order_id: str) -> None:
        """The recheck marker off (the order and its link_expire_time stay). An
        unknown order: Unavailable, as the DynamoDB store's failed `exists`
        condition is."""
        rec = self._orders.get(order_id)
        if rec is None:
            raise Unavailable("dynamodb is not answering (in-memory store: clear_recheck "
                              f"of unknown order {order_id})")
        rec["recheck"] = None

    @_operation
    def mark_paid_but_closed(self, order_id: str, *, trade_no: str, now: datetime) -> None:
        """A CLOSED order the provider holds money for: listed by paid_but_closed, its
        transaction_id the trade. Nothing happens to an order that is not CLOSED."""
        rec = self._orders.get(order_id)
        if rec is None or rec["status"] != CLOSED:
            return
        rec.update(paid_but_closed="1", transaction_id=trade_no, update_time=_iso(now))

    @_operation
    def paid_but_closed(self, limit: int = 100) -> list[str]:
        """Ids of the orders so marked, oldest update_time first."""
        marked = [r for r in self._orders.values() if r["paid_but_closed"]]
        marked.sort(key=lambda r: (r["update_time"], r["id"]))
        return [r["id"] for r in marked[:max(limit, 0)]]

    @_operation
    def order_by_trade(self, trade_no: str) -> Order | None:
        """An order whose transaction_id is `trade_no` (one of them, should several
        share it), or None."""
        if not trade_no:
            raise Unavailable("dynamodb is not answering (in-memory store: DynamoDB "
                              "refuses an empty key)")
        found = sorted(k for k, r in self._orders.items() if r["transaction_id"] == trade_no)
        return _order(self._orders[found[0]]) if found else None

    @_operation
    def search_orders(self, *, status: str | None, start: datetime | None,
                      end: datetime | None, limit: int, cursor: str | None,
                      ) -> tuple[list[Order], str | None]:
        """Orders newest first (create time, then id), of `status` (every status when
        None) created within [start, end] (to the millisecond), `limit` at a time.
        The second value is the cursor of the next page, None when nothing is left.
        Invalid when `cursor` is not one this store gave."""
        after = _decode_cursor(cursor)
        low, high = iso(start), iso(end)
        found = [r for r in self._orders.values()
                 if (not status or r["status"] == status)
                 and (low is None or r["create_time"] >= low)
                 and (high is None or r["create_time"] <= high)
                 and (after is None or (r["create_time"], r["id"]) < after)]
        found.sort(key=lambda r: (r["create_time"], r["id"]), reverse=True)
        page = found[:max(limit, 0)]
        nxt = None
        if page and len(found) > len(page):
            nxt = _encode_cursor(page[-1]["create_time"], page[-1]["id"])
        return [_order(r) for r in page], nxt

    # --- flash sales ----------------------------------------------------------

    @_operation
    def put_sale(self, sale: Sale, *, shards: int = 1) -> None:
        """As store/sales.py's: `shards` > 1 splits the stock over items
        `<sale>#<k>` (split_stock), the sale's own item keeping stock 0."""
        units = split_stock(int(sale.stock), shards)
        row = Sale(sale.id, sale.goods_id, sale.name, int(sale.price_fen),
                   int(sale.stock), _ms(sale.start_time), _ms(sale.end_time))
        if shards == 1:
            self._sales[sale.id] = row
            self._sale_shards.pop(sale.id, None)
            return
        _transaction([("sales", sale.id)]
                     + [("sales", shard_key(sale.id, k)) for k in range(shards)])
        self._sales[sale.id] = replace(row, stock=0)
        for k, n in enumerate(units):
            self._sales[shard_key(sale.id, k)] = replace(row, id=shard_key(sale.id, k),
                                                          stock=n)
        self._sale_shards[sale.id] = shards

    @_operation
    def list_sales(self) -> list[Sale]:
        return [self._summed(k) for k in sorted(self._sales) if "#" not in k]

    @_operation
    def get_sale(self, sale_id: str, *, consistent: bool = False) -> Sale | None:
        return self._summed(sale_id) if sale_id in self._sales else None

    @_operation
    def sale_stock_items(self, sale_id: str, *, consistent: bool = False,
                         ) -> tuple[Sale, list[str]] | None:
        sale = self._sales.get(sale_id)
        if sale is None:
            return None
        n = self._sale_shards.get(sale_id, 1)
        return sale, [sale_id] if n == 1 else [shard_key(sale_id, k) for k in range(n)]

    @_operation
    def sale_shard_stocks(self, sale_id: str, *, consistent: bool = False,
                          ) -> tuple[Sale, list[int]] | None:
        sale = self._sales.get(sale_id)
        if sale is None:
            return None
        return sale, self._shard_stocks(sale_id)

    def _shard_stocks(self, sale_id: str) -> list[int]:
        n = self._sale_shards.get(sale_id, 1)
        if n == 1:
            return [self._sales[sale_id].stock]
        found = (self._sales.get(shard_key(sale_id, k)) for k in range(n))
        return [s.stock if s is not None else 0 for s in found]

    def _summed(self, sale_id: str) -> Sale:
        return replace(self._sales[sale_id], stock=sum(self._shard_stocks(sale_id)))

    @_operation
    def claim_ticket(self, ticket: Ticket) -> str | None:
        """The user's claim on the sale and the ticket, both or neither. None when
        written; otherwise the id of the ticket that holds the claim. Conflict when
        the claim is free but the ticket id is taken."""
        key = (ticket.sale_id, ticket.username)
        if key in self._claims:
            return self._claims[key]
        if ticket.id in self._tickets:
            raise Conflict(f"ticket {ticket.id} exists already")
        self._claims[key] = ticket.id
        self._tickets[ticket.id] = _ticket(ticket)
        return None

    @_operation
    def drop_ticket(self, ticket: Ticket) -> None:
        """Undo claim_ticket: the claim (if this ticket's) and the ticket (if QUEUED),
        both or neither. Either condition failing raises Unavailable, as in the
        DynamoDB store."""
        key = (ticket.sale_id, ticket.username)
        held = self._tickets.get(ticket.id)
        if self._claims.get(key) != ticket.id or held is None or held.status != TICKET_QUEUED:
            raise Unavailable(f"ticket {ticket.id} could not be dropped: its claim or its "
                              "QUEUED status is gone")
        del self._claims[key]
        del self._tickets[ticket.id]

    @_operation
    def get_ticket(self, ticket_id: str) -> Ticket | None:
        return self._tickets.get(ticket_id)

    @_operation
    def create_seckill_order(self, order: Order, ticket: Ticket) -> SeckillOutcome:
        """Order put (absent), one order per user and sale, sale stock -= num
        (stock >= num), ticket QUEUED -> ORDERED; all or nothing.

        Returns ORDERED, or why nothing changed, in the DynamoDB store's
        precedence: NOT_QUEUED, DUPLICATE, SOLD_OUT; an existing order id raises
        Conflict. The unit comes from the item `order.sale_id` names: the sale,
        or one shard `<sale>#<k>` of it."""
        assert order.sale_id and sale_of(order.sale_id) == ticket.sale_id
        assert len(order.lines) == 1
        key = (ticket.sale_id, ticket.username)
        num = order.lines[0].num
        held = self._tickets.get(ticket.id)
        sale = self._sales.get(order.sale_id)
        if held is None or held.status != TICKET_QUEUED:
            return SeckillOutcome.NOT_QUEUED
        if key in self._bought:
            return SeckillOutcome.DUPLICATE
        if sale is None or sale.stock < num:
            return SeckillOutcome.SOLD_OUT
        if order.id in self._orders:
            raise Conflict(f"order {order.id} exists already")
        self._orders[order.id] = _record(order)
        self._put_events([events.created(order, order.create_time)])
        self._bought[key] = order.id
        self._sales[sale.id] = replace(sale, stock=sale.stock - num)
        self._tickets[ticket.id] = replace(held, status=TICKET_ORDERED, order_id=order.id,
                                           update_time=_ms(order.create_time))
        return SeckillOutcome.ORDERED

    @_operation
    def finish_ticket(self, ticket: Ticket, status: str, *, release_claim: bool,
                      now: datetime) -> bool:
        """QUEUED -> `status` (no order). With `release_claim` the user's claim on the
        sale goes too, if it is this ticket's (another ticket's claim stays). False,
        and nothing changed, when the ticket was not QUEUED."""
        held = self._tickets.get(ticket.id)
        if held is None or held.status != TICKET_QUEUED:
            return False
        key = (ticket.sale_id, ticket.username)
        if release_claim and self._claims.get(key) == ticket.id:
            del self._claims[key]
        self._tickets[ticket.id] = replace(held, status=TicketStatus(status),
                                           update_time=_ms(now))
        return True

    # --- refunds (the rule: chalicelib/store/refunds.py) -------------------------

    @_operation
    def reserve_refund(self, refund: Refund, order: Order, *,
                       expect_status: OrderStatus) -> bool:
        """The refund (as given) and the order's reservation, both or neither:
        pending := refund, reserved += amount, count += 1, update_time := the
        refund's create time. False when the order is not `expect_status`, has a
        pending refund, or its reserved sum or refund count is not `order`'s; when
        the refund id exists; when the refund's idempotency key was used on this
        order."""
        key = _idempotency_id(order.id, refund.idempotency_key)
        _transaction([("refunds", refund.id)] + ([("refunds", key)] if key else [])
                     + [("orders", order.id)])
        rec = self._orders.get(order.id)
        if (rec is None or rec["status"] != expect_status.value or rec["pending_refund_id"]
                or rec["refund_reserved_fen"] != order.refund_reserved_fen
                or rec["refund_count"] != order.refund_count
                or refund.id in self._refunds or (key and key in self._refund_keys)):
            return False
        self._refunds[refund.id] = _refund_record(refund)
        if key:
            self._refund_keys[key] = refund.id
        rec.update(pending_refund_id=refund.id,
                   refund_reserved_fen=order.refund_reserved_fen + refund.amount_fen,
                   refund_count=order.refund_count + 1,
                   update_time=_iso(refund.create_time))
        return True

    @_operation
    def settle_refund(self, refund: Refund, order: Order, *, status: RefundStatus,
                      now: datetime, failure_code: str | None = None,
                      failure_message: str | None = None,
                      trade_no: str | None = None) -> bool:
        """PENDING -> SUCCEEDED (refunded += amount; REFUNDED when it reaches the
        total, with `trade_no` as transaction_id and the refund as
        refund_request_no when given, paid_but_closed and recheck off) or FAILED
        (reserved -= amount; code "UNKNOWN" and message "" when not given, the
        message cut to 500 characters). Sums from `order`, which must be the
        order as it is: False, and nothing written, when the refund is not
        PENDING, is not the order's pending one, or refunded_fen changed."""
        _transaction([("refunds", refund.id), ("orders", order.id)])
        held = self._refunds.get(refund.id)
        rec = self._orders.get(order.id)
        if (held is None or held["status"] != RefundStatus.PENDING or rec is None
                or rec["pending_refund_id"] != refund.id
                or rec["refunded_fen"] != order.refunded_fen):
            return False
        stamp = _iso(now)
        if status == RefundStatus.SUCCEEDED:
            self._put_events(events.refund_settled(
                order, refund_id=refund.id, amount_fen=refund.amount_fen, now=now,
                trade_no=trade_no))
            held.update(status=status, finish_time=stamp, open=False, failure_code=None,
                        failure_message=None, finish_day=bill_day(now).isoformat())
            refunded = order.refunded_fen + refund.amount_fen
            rec.update(refunded_fen=refunded)
            if refunded >= order.total_fen:
                rec.update(status=REFUNDED, paid_but_closed=None, recheck=None,
                           end_time=stamp)
                if trade_no:
                    rec.update(transaction_id=trade_no, refund_request_no=refund.id)
        else:
            held.update(status=RefundStatus(status), finish_time=stamp, open=True,
                        failure_code=failure_code or "UNKNOWN",
                        failure_message=(failure_message or "")[:500])
            rec.update(refund_reserved_fen=order.refund_reserved_fen - refund.amount_fen)
        rec.update(pending_refund_id=None, update_time=stamp)
        return True

    @_operation
    def retry_refund(self, refund: Refund, order: Order, *, now: datetime) -> bool:
        """FAILED -> PENDING (failure and finish time cleared, create time := now)
        with the order's reservation (pending := refund, reserved += amount; the
        count stays). False, and nothing written, when the refund is not FAILED, or
        the order's status or reserved sum is not `order`'s, or a refund is
        pending."""
        _transaction([("refunds", refund.id), ("orders", order.id)])
        held = self._refunds.get(refund.id)
        rec = self._orders.get(order.id)
        if (held is None or held["status"] != RefundStatus.FAILED or rec is None
                or rec["status"] != order.status.value or rec["pending_refund_id"]
                or rec["refund_reserved_fen"] != order.refund_reserved_fen):
            return False
        stamp = _iso(now)
        held.update(status=RefundStatus.PENDING, finish_time=None, failure_code=None,
                    failure_message=None, open=True, create_time=stamp)
        rec.update(pending_refund_id=refund.id,
                   refund_reserved_fen=order.refund_reserved_fen + refund.amount_fen,
                   update_time=stamp)
        return True

    @_operation
    def get_refund(self, refund_id: str) -> Refund | None:
        held = self._refunds.get(refund_id)
        return _refund(held) if held is not None else None

    @_operation
    def refund_for_key(self, order_id: str, key: str) -> Refund | None:
        """The refund an idempotency key made on this order, if any."""
        refund_id = self._refund_keys.get(_idempotency_id(order_id, key) or "")
        held = self._refunds.get(refund_id) if refund_id else None
        return _refund(held) if held is not None else None

    @_operation
    def refunds_of(self, order_id: str) -> list[Refund]:
        """The order's refunds, oldest create time first."""
        mine = [r for r in self._refunds.values() if r["order_id"] == order_id]
        mine.sort(key=lambda r: (r["create_time"], r["id"]))
        return [_refund(r) for r in mine]

    @_operation
    def open_refunds(self, limit: int = 200) -> list[Refund]:
        """PENDING and FAILED refunds, oldest create time first."""
        due = [r for r in self._refunds.values() if r["open"]]
        due.sort(key=lambda r: (r["create_time"], r["id"]))
        return [_refund(r) for r in due[:max(limit, 0)]]

    # --- the timeline ---------------------------------------------------------------

    @_operation
    def append_event(self, event: TimelineEvent) -> None:
        """Kept as the DynamoDB item keeps it: the time to the millisecond, the detail
        as JSON (what JSON cannot hold as it is becomes its str)."""
        self._append_event(event)

    def _append_event(self, event: TimelineEvent) -> None:
        events = self._timeline.setdefault(event.order_id, [])
        key = (_iso(event.time), event.ref or secrets.token_hex(4))
        item = (key[0], event.type.value,
                json.dumps(event.detail, ensure_ascii=False, default=str), key)
        at = next((i for i, e in enumerate(events) if e[3] == key), None)
        if at is None:
            events.append(item)
        else:
            events[at] = item  # as DynamoDB's put of the same key: replaced in its place

    @_operation
    def timeline(self, order_id: str, limit: int = 1000) -> list[TimelineEvent]:
        """The order's first `limit` events in time order."""
        events = sorted(self._timeline.get(order_id, []), key=lambda e: e[0])
        return [TimelineEvent(order_id, parse_iso(t), EventType(kind), json.loads(detail))
                for t, kind, detail, _ in events[:max(limit, 0)]]

    # --- reconciliation (the DynamoDB store: chalicelib/store/reconciliations.py) ----

    def paid_on(self, day: date) -> Iterator[PaidRecord]:
        """The orders whose pay_day is `day`, by id (the index's range key)."""
        with self._lock:
            self._fail_if_asked("paid_on")
            wanted = day.isoformat()
            found = sorted((r for r in self._orders.values() if r.get("pay_day") == wanted),
                           key=lambda r: r["id"])
            records = [PaidRecord(r["id"], r["transaction_id"], r["total_fen"],
                                  OrderStatus(r["status"]), parse_iso(r["pay_time"]))
                       for r in found]
        yield from records

    def refunds_succeeded_on(self, day: date) -> Iterator[Refund]:
        with self._lock:
            self._fail_if_asked("refunds_succeeded_on")
            wanted = day.isoformat()
            found = sorted((r for r in self._refunds.values()
                            if r.get("finish_day") == wanted), key=lambda r: r["id"])
            refunds = [_refund(r) for r in found]
        yield from refunds

    def _lease_held(self, day: date, now: datetime) -> bool:
        item = self._recon.get((_day_pk(day), "REPORT"))
        return bool(item and item["lease_until"] and item["lease_until"] > _iso(now))

    @_operation
    def start_reconciliation(self, report: Report, *, now: datetime,
                             lease_seconds: int) -> bool:
        if self._lease_held(report.day, now):
            return False
        self._recon[(_day_pk(report.day), "REPORT")] = {
            "body": json.loads(json.dumps(report.to_item())), "report_list": "REPORT",
            "attention": None, "lease_until": _iso(now + timedelta(seconds=lease_seconds))}
        return True

    @_operation
    def request_reconciliation(self, day: date, *, by: str, now: datetime) -> bool:
        if self._lease_held(day, now):
            return False
        key = (_day_pk(day), "REPORT")
        item = self._recon.get(key)
        if item is None:
            body = Report(day, ReportStatus.RUNNING, "requested", now).to_item()
            item = self._recon[key] = {"body": body, "report_list": "REPORT",
                                       "attention": None, "lease_until": None}
        item.update(attention="REQUESTED", requested_by=by)
        return True

    @_operation
    def requested_days(self, limit: int = 50) -> list[date]:
        return self._attention_days("REQUESTED", limit, newest_first=False)

    def _attention_days(self, flag: str, limit: int, *, newest_first: bool) -> list[date]:
        days = sorted({k[0] for k, v in self._recon.items()
                       if k[1] == "REPORT" and v["attention"] == flag},
                      reverse=newest_first)
        return [date.fromisoformat(d.removeprefix("DAY#")) for d in days[:max(limit, 0)]]

    @_operation
    def finish_reconciliation(self, report: Report, differences: Sequence[Difference],
                              extras: Sequence[Extra]) -> bool:
        pk = _day_pk(report.day)
        if not self._run_holds(report):
            return False
        earlier = {k[1]: v for k, v in self._recon.items()
                   if k[0] == pk and k[1] != "REPORT"}
        for sk in earlier:
            del self._recon[(pk, sk)]
        for d in differences:
            before = earlier.get(f"DIFF#{d.id}")
            kept = d.keeping_resolution_of(Difference.from_item(before["body"])
                                           if before else None)
            self._recon[(pk, f"DIFF#{d.id}")] = {
                "body": json.loads(json.dumps(kept.to_item())), "report_list": None,
                "attention": None if kept.resolved else "DIFFERENCE", "lease_until": None}
        for x in extras:
            self._recon[(pk, f"EXTRA#{x.key}")] = {
                "body": x.to_item(), "report_list": None, "attention": None,
                "lease_until": None}
        self._put_report(report)
        return True

    @_operation
    def fail_reconciliation(self, report: Report) -> bool:
        if not self._run_holds(report):
            return False
        self._put_report(report)
        return True

    def _run_holds(self, report: Report) -> bool:
        item = self._recon.get((_day_pk(report.day), "REPORT"))
        return bool(item and item["body"]["runId"] == report.run_id)

    def _put_report(self, report: Report) -> None:
        failed = report.status == ReportStatus.FAILED
        self._recon[(_day_pk(report.day), "REPORT")] = {
            "body": json.loads(json.dumps(report.to_item())), "report_list": "REPORT",
            "attention": "FAILED" if failed else None, "lease_until": None}

    @_operation
    def get_reconciliation(self, day: date, *, differences: bool = True) -> Report | None:
        pk = _day_pk(day)
        item = self._recon.get((pk, "REPORT"))
        if item is None:
            return None
        report = _report(item)
        if not differences:
            return report
        found = sorted((k[1], v) for k, v in self._recon.items()
                       if k[0] == pk and k[1].startswith("DIFF#"))
        return replace(report, differences=tuple(Difference.from_item(v["body"])
                                                 for _, v in found))

    @_operation
    def list_reconciliations(self, limit: int = 100) -> list[Report]:
        days = sorted((k[0] for k, v in self._recon.items()
                       if k[1] == "REPORT" and v["report_list"]), reverse=True)
        return [_report(self._recon[(d, "REPORT")]) for d in days[:max(limit, 0)]]

    @_operation
    def get_extra(self, day: date, key: str) -> Extra | None:
        item = self._recon.get((_day_pk(day), f"EXTRA#{key}"))
        return Extra.from_item(item["body"]) if item else None

    @_operation
    def resolve_difference(self, day: date, difference_id: str, *, note: str, by: str,
                           now: datetime) -> Difference | None:
        item = self._recon.get((_day_pk(day), f"DIFF#{difference_id}"))
        if item is None:
            return None
        found = Difference.from_item(item["body"])
        if found.resolved:
            raise AlreadyResolved(f"difference {difference_id} was resolved by "
                                  f"{found.resolved_by}")
        done = replace(found, resolved=True, note=note, resolved_by=by,
                       resolved_at=_ms(now))
        item.update(body=json.loads(json.dumps(done.to_item())), attention=None)
        return done

    @_operation
    def open_differences(self, limit: int = 200) -> list[Difference]:
        found = sorted(((v["body"]["date"], k[1]), v) for k, v in self._recon.items()
                       if v["attention"] == "DIFFERENCE")
        return [Difference.from_item(v["body"]) for _, v in found[:max(limit, 0)]]

    @_operation
    def failed_days(self, limit: int = 100) -> list[date]:
        return self._attention_days("FAILED", limit, newest_first=True)


    # --- the outbox (chalicelib/store/outbox.py) -----------------------------------

    def _put_events(self, made: Sequence[OrderEvent]) -> None:
        """In the caller's operation: its change and these are written together."""
        for event in made:
            kept = replace(event, occurred_at=_ms(event.occurred_at),
                           data=json.loads(json.dumps(event.data, sort_keys=True)),
                           order=json.loads(json.dumps(event.order))
                           if event.order is not None else None)
            self._outbox.setdefault(event.order_id, {})[event.seq] = {
                "event": kept, "unsent": True, "parked": False, "failures": 0, "reason": ""}

    def _order_events(self, order_id: str) -> list[dict[str, Any]]:
        held = self._outbox.get(order_id, {})
        return [held[seq] for seq in sorted(held)]

    @_operation
    def events_of(self, order_id: str) -> list[OrderEvent]:
        return [x["event"] for x in self._order_events(order_id)]

    @_operation
    def unsent_events(self, order_id: str) -> list[OrderEvent]:
        return [x["event"] for x in self._order_events(order_id) if x["unsent"]]

    @_operation
    def unsent_orders(self, before: datetime, limit: int = 500) -> list[str]:
        cutoff = _iso(before)
        found = sorted((x["event"].seq, x["event"].order_id)
                       for held in self._outbox.values() for x in held.values()
                       if x["unsent"] and _iso(x["event"].occurred_at) <= cutoff)
        seen: dict[str, None] = {}
        for _, order_id in found[:max(limit, 0)]:
            seen.setdefault(order_id, None)
        return list(seen)

    def unsent_batch(self, before: datetime, limit: int = 500) -> list[OrderEvent]:
        cutoff = _iso(before)
        found = sorted((x["event"].seq, x["event"]) for held in self._outbox.values()
                       for x in held.values()
                       if x["unsent"] and _iso(x["event"].occurred_at) <= cutoff)
        batch = [e for _, e in found[:max(limit, 0)]]
        return sorted(batch, key=lambda e: (e.order_id, e.seq))

    def unsent_pages(self, before: datetime, page_size: int = 500
                     ) -> Iterator[list[OrderEvent]]:
        with self._lock:
            self._fail_if_asked("unsent_pages")
            cutoff = _iso(before)
            found = [e for _, e in sorted(
                (x["event"].seq, x["event"]) for held in self._outbox.values()
                for x in held.values()
                if x["unsent"] and _iso(x["event"].occurred_at) <= cutoff)]
        for i in range(0, len(found), max(page_size, 1)):
            yield sorted(found[i:i + page_size], key=lambda e: (e.order_id, e.seq))

    @_operation
    def mark_events_sent(self, events: Sequence[OrderEvent], *, now: datetime) -> None:
        for event in events:
            item = self._outbox.get(event.order_id, {}).get(event.seq)
            if item is not None:
                item.update(unsent=False, parked=False, failures=0, reason="")

    def mark_event_sent(self, event: OrderEvent, *, now: datetime) -> None:
        item = self._outbox.get(event.order_id, {}).get(event.seq)
        if item is not None and item["unsent"]:
            item["unsent"] = False

    @_operation
    def event_failed(self, event: OrderEvent, *, reason: str, park_after: int) -> bool:
        item = self._outbox.get(event.order_id, {}).get(event.seq)
        if item is None or not item["unsent"]:
            return False
        item["failures"] += 1
        item["reason"] = reason[:500]
        if item["failures"] >= park_after:
            item.update(unsent=False, parked=True)
            return True
        return False

    @_operation
    def parked_events(self, limit: int = 100) -> list[tuple[OrderEvent, str]]:
        found = sorted(((_iso(x["event"].occurred_at), x["event"].seq), x)
                       for held in self._outbox.values() for x in held.values() if x["parked"])
        return [(x["event"], x["reason"]) for _, x in found[:max(limit, 0)]]

    # --- webhooks (chalicelib/store/webhooks.py) -----------------------------------

    @_operation
    def save_subscription(self, sub: Subscription) -> None:
        if sub.id in self._webhooks:
            raise Unavailable(f"subscription {sub.id} exists already")
        self._webhooks[sub.id] = {"sub": replace(sub, create_time=_ms(sub.create_time)),
                                  "live": True}

    @_operation
    def get_subscription(self, sub_id: str) -> Subscription | None:
        item = self._webhooks.get(sub_id)
        return item["sub"] if item is not None and item.get("live") else None

    @_operation
    def list_subscriptions(self, limit: int = 200) -> list[Subscription]:
        live = sorted(((_iso(x["sub"].create_time), k), x["sub"])
                      for k, x in self._webhooks.items() if x.get("live"))
        return [sub for _, sub in live[:max(limit, 0)]]

    @_operation
    def delete_subscription(self, sub_id: str, *, now: datetime) -> bool:
        item = self._webhooks.get(sub_id)
        if item is None or not item.get("live"):
            return False
        item.update(live=False, sub=replace(item["sub"], secret=""))
        return True

    @_operation
    def create_delivery(self, d: Delivery) -> bool:
        if d.id in self._webhooks:
            return False
        self._webhooks[d.id] = {"delivery": replace(d, create_time=_ms(d.create_time))}
        return True

    @_operation
    def get_delivery(self, delivery_id: str) -> Delivery | None:
        item = self._webhooks.get(delivery_id)
        return item.get("delivery") if item is not None else None

    @_operation
    def record_attempt(self, d: Delivery, attempt: Attempt, status: DeliveryStatus) -> bool:
        item = self._webhooks.get(d.id)
        if item is None or "delivery" not in item:
            return False
        if len(item["delivery"].attempts) != len(d.attempts):
            return False
        item["delivery"] = d.attempted(replace(attempt, time=_ms(attempt.time)), status)
        return True

    @_operation
    def reopen_delivery(self, delivery_id: str) -> Delivery | None:
        item = self._webhooks.get(delivery_id)
        if item is None or "delivery" not in item:
            return None
        item["delivery"] = replace(item["delivery"], status=DeliveryStatus.PENDING)
        return item["delivery"]

    def _deliveries(self, keep: Callable[[Delivery], bool], *, newest_first: bool,
                    limit: int) -> list[Delivery]:
        found = sorted(((_iso(x["delivery"].create_time), k), x["delivery"])
                       for k, x in self._webhooks.items()
                       if "delivery" in x and keep(x["delivery"]))
        if newest_first:
            found.reverse()
        return [x for _, x in found[:max(limit, 0)]]

    @_operation
    def deliveries_of_subscription(self, sub_id: str, limit: int = 100) -> list[Delivery]:
        return self._deliveries(lambda x: x.subscription_id == sub_id, newest_first=True,
                                limit=limit)

    @_operation
    def deliveries_of_order(self, order_id: str, limit: int = 100) -> list[Delivery]:
        return self._deliveries(lambda x: x.order_id == order_id, newest_first=False,
                                limit=limit)

    @_operation
    def failed_deliveries(self, limit: int = 100) -> list[Delivery]:
        return self._deliveries(lambda x: x.status == DeliveryStatus.FAILED,
                                newest_first=False, limit=limit)


def _day_pk(day: date) -> str:
    return f"DAY#{day.isoformat()}"


def _report(item: Mapping[str, Any]) -> Report:
    report = Report.from_item(item["body"])
    by = item.get("requested_by")
    return replace(report, requested_by=by) if by else report


def _idempotency_id(order_id: str, key: str | None) -> str | None:
    """The DynamoDB store's marker of an idempotency key, per order."""
    return f"IDEM#{order_id}#{key}" if key else None


def _encode_cursor(create_time: str, order_id: str) -> str:
    raw = json.dumps({"at": create_time, "id": order_id}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str | None) -> tuple[str, str] | None:
    """The (create_time, id) a page ended with; Invalid when it is not one of ours."""
    if not cursor:
        return None
    try:
        position = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, binascii.Error) as exc:
        raise Invalid("cursor is not one this API gave") from exc
    if (not isinstance(position, dict) or not isinstance(position.get("at"), str)
            or not isinstance(position.get("id"), str)):
        raise Invalid("cursor is not one this API gave")
    return position["at"], position["id"]


def _refund_record(r: Refund) -> dict[str, Any]:
    """What the DynamoDB store's put of a refund keeps (`model_from_refund`)."""
    return {
        "id": r.id,
        "order_id": r.order_id,
        "amount_fen": int(r.amount_fen),
        "reason": r.reason,
        "status": RefundStatus(r.status),
        "operator": r.operator,
        "create_time": _iso(r.create_time),
        "finish_time": iso(r.finish_time),
        "failure_code": r.failure_code,
        "failure_message": r.failure_message,
        "idempotency_key": r.idempotency_key,
        "open": r.status != RefundStatus.SUCCEEDED,
        "finish_day": None,
    }


def _refund(r: Mapping[str, Any]) -> Refund:
    return Refund(
        id=r["id"], order_id=r["order_id"], amount_fen=r["amount_fen"], reason=r["reason"],
        status=r["status"], operator=r["operator"], create_time=parse_iso(r["create_time"]),
        finish_time=parse_iso(r["finish_time"]) if r["finish_time"] else None,
        failure_code=r["failure_code"], failure_message=r["failure_message"],
        idempotency_key=r["idempotency_key"])


def _transaction(items: list[tuple[str, ...]]) -> None:
    """What DynamoDB refuses before it looks at any condition."""
    if len(items) > MAX_TRANSACTION_ACTIONS:
        raise Unavailable(f"the transaction has {len(items)} actions, DynamoDB takes "
                          f"{MAX_TRANSACTION_ACTIONS}")
    if len(set(items)) != len(items):
        raise Unavailable("the transaction names one item twice, which DynamoDB refuses")


def _record(o: Order) -> dict[str, Any]:
    """What the DynamoDB store's put of a new order keeps (`_model_from_order`)."""
    return {
        "id": o.id,
        "username": o.username,
        "status": o.status,
        "source_type": o.source_type,
        "pay_type": o.pay_type,
        "lines": tuple(Line(x.goods_id, x.name, int(x.price_fen), int(x.num)) for x in o.lines),
        "total_fen": o.total_fen,
        "create_time": _iso(o.create_time),
        "update_time": _iso(o.update_time),
        "expire_time": _iso(o.expire_time),
        "check_time": _iso(o.check_time),
        "pay_time": None,
        "close_time": None,
        "end_time": None,
        "consign_time": None,
        "transaction_id": None,
        "notify_id": None,
        "refund_request_no": None,
        "unpaid": "1" if o.status == UNPAID else None,
        "sale_id": o.sale_id,
        # absent on a new item; read as 0 / None
        "refunded_fen": 0,
        "refund_reserved_fen": 0,
        "pending_refund_id": None,
        "refund_count": 0,
        "link_expire_time": None,
        "recheck": None,
        "paid_but_closed": None,
        "pay_day": None,
    }


def _order(r: Mapping[str, Any]) -> Order:
    def opt(v: str | None) -> datetime | None:
        return parse_iso(v) if v else None

    return Order(
        id=r["id"],
        username=r["username"],
        status=OrderStatus(r["status"]),
        source_type=r["source_type"],
        pay_type=r["pay_type"],
        lines=list(r["lines"]),
        create_time=parse_iso(r["create_time"]),
        update_time=parse_iso(r["update_time"]),
        expire_time=parse_iso(r["expire_time"]),
        check_time=parse_iso(r["check_time"]),
        pay_time=opt(r["pay_time"]),
        close_time=opt(r["close_time"]),
        end_time=opt(r["end_time"]),
        consign_time=opt(r["consign_time"]),
        transaction_id=r["transaction_id"],
        refund_request_no=r["refund_request_no"],
        sale_id=r["sale_id"],
        refunded_fen=r["refunded_fen"],
        refund_reserved_fen=r["refund_reserved_fen"],
        pending_refund_id=r["pending_refund_id"],
        refund_count=r["refund_count"],
        link_expire_time=opt(r["link_expire_time"]),
    )


def _ticket(t: Ticket) -> Ticket:
    return Ticket(t.id, t.username, t.sale_id, TicketStatus(t.status), t.order_id,
                  _ms(t.create_time), _ms(t.update_time))
