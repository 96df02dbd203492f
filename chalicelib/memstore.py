"""The store in memory: the DynamoDB store's conditional rules without DynamoDB.

`InMemoryStore` has the public methods of `chalicelib.store.Store` and behaves
as it does on DynamoDB, which tests/store_contract.py proves by running one
suite against both. Where they could differ, the DynamoDB store is the
reference and this one follows it:

- every operation holds one lock, so a condition and its write are atomic, and
  a "transaction" (create_order, close_order, claim_ticket, drop_ticket,
  create_seckill_order, finish_ticket) checks every condition before it writes
  anything: a failed condition writes nothing;
- when several conditions of a transaction fail, the error is the one the
  DynamoDB store reports (it reads the first failed condition in the order
  pynamodb sends the items: deletes, puts, updates);
- a transaction of more than 100 actions, or naming one item twice, is refused
  by DynamoDB (ValidationException) and by this store alike: Unavailable;
- times are kept as DynamoDB keeps them, ISO strings in UTC with milliseconds
  (`chalicelib.domain.iso`), so a datetime comes back truncated to the millisecond, and
  "due" and "newest" compare those strings;
- an order keeps what the DynamoDB item keeps: create_order stores a new order's
  fields (not its payment fields, not `extra`); mark_paid, close_order and
  mark_refunded add theirs;
- what a method returns is a copy (or an immutable value): changing it, or the
  order passed in, does not change the store.

Test hook: `fail_next(n)` makes the next n operations raise Unavailable and
change nothing, as a DynamoDB that does not answer. (A real timeout may also
come after the write was applied; that case is not simulated.)
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import replace
from datetime import datetime
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
    Goods,
    Line,
    Order,
    OrderStatus,
    OutOfStock,
    PriceChanged,
    Sale,
    SeckillOutcome,
    Ticket,
    TicketStatus,
    Unavailable,
    iso,
    parse_iso,
)

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
    """Goods, carts, orders and flash sales in dicts, with Store's conditions."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._goods: dict[str, Goods] = {}
        self._carts: dict[str, dict[str, CartLine]] = {}
        self._orders: dict[str, dict[str, Any]] = {}  # the DynamoDB item's fields
        self._sales: dict[str, Sale] = {}
        self._tickets: dict[str, Ticket] = {}
        self._claims: dict[tuple[str, str], str] = {}  # (sale, user) -> ticket id
        self._bought: dict[tuple[str, str], str] = {}  # (sale, user) -> order id
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
    def create_order(self, order: Order, cart: Mapping[str, int] | None) -> None:
        """Put the order, take the stock and (for a cart order) empty the cart, all or nothing.

        Conditions, in the order the DynamoDB store reports them: each cart line
        still holds the num read (Conflict), the order does not exist (Conflict),
        per line the goods has `stock >= num` at the line's price (PriceChanged
        when the price differs, else OutOfStock)."""
        cart = dict(cart or {})
        _transaction([("orders", order.id)]
                     + [("goods", line.goods_id) for line in order.lines]
                     + [("carts", order.username, gid) for gid in cart])
        held = self._carts.get(order.username, {})
        for goods_id, num in cart.items():
            line = held.get(goods_id)
            if line is None or line.num != num:
                raise Conflict("the cart changed while ordering; try again")
        if order.id in self._orders:
            raise Conflict(f"order {order.id} exists already")
        for line in order.lines:
            goods = self._goods.get(line.goods_id)
            if goods is not None and goods.price_fen != line.price_fen:
                raise PriceChanged(line.goods_id, goods)
            if goods is None or goods.stock < line.num:
                raise OutOfStock(line.goods_id)
        # every condition holds: write
        self._orders[order.id] = _record(order)
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
    ) -> bool:
        """UNPAID -> PAID for exactly this amount. False when the order was not UNPAID,
        is due another amount, or does not exist."""
        rec = self._orders.get(order_id)
        if rec is None or rec["status"] != UNPAID or rec["total_fen"] != total_fen:
            return False
        rec.update(status=PAID, transaction_id=trade_no, pay_time=_iso(pay_time),
                   notify_id=notify_id or "", update_time=_iso(now), unpaid=None)
        return True

    @_operation
    def close_order(self, order: Order, *, now: datetime) -> bool:
        """UNPAID -> CLOSED and the stock back (to the sale for a flash-sale order),
        all or nothing. False when not UNPAID. The stock given back is that of the
        order passed in, as in the DynamoDB store."""
        if order.sale_id:
            _transaction([("orders", order.id)] + [("sales", order.sale_id)] * len(order.lines))
        else:
            _transaction([("orders", order.id)]
                         + [("goods", line.goods_id) for line in order.lines])
        rec = self._orders.get(order.id)
        if rec is None or rec["status"] != UNPAID:
            return False
        stamp = _iso(now)
        rec.update(status=CLOSED, close_time=stamp, end_time=stamp, update_time=stamp,
                   unpaid=None)
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
    def mark_refunded(
        self, order_id: str, *, trade_no: str, refund_request_no: str, now: datetime
    ) -> bool:
        """CLOSED -> REFUNDED once the money went back. False when not CLOSED."""
        rec = self._orders.get(order_id)
        if rec is None or rec["status"] != CLOSED:
            return False
        rec.update(status=REFUNDED, transaction_id=trade_no,
                   refund_request_no=refund_request_no, update_time=_iso(now))
        return True

    @_operation
    def unpaid_due(self, now: datetime, limit: int = 500) -> list[str]:
        """Ids of UNPAID orders whose check time has passed (to the millisecond),
        oldest check time first."""
        until = _iso(now)
        due = [r for r in self._orders.values() if r["unpaid"] and r["check_time"] <= until]
        due.sort(key=lambda r: r["check_time"])
        return [r["id"] for r in due[:max(limit, 0)]]

    # --- flash sales ----------------------------------------------------------

    @_operation
    def put_sale(self, sale: Sale) -> None:
        self._sales[sale.id] = Sale(sale.id, sale.goods_id, sale.name, int(sale.price_fen),
                                    int(sale.stock), _ms(sale.start_time), _ms(sale.end_time))

    @_operation
    def list_sales(self) -> list[Sale]:
        return [self._sales[k] for k in sorted(self._sales)]

    @_operation
    def get_sale(self, sale_id: str, *, consistent: bool = False) -> Sale | None:
        return self._sales.get(sale_id)

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
        Conflict."""
        assert order.sale_id == ticket.sale_id and len(order.lines) == 1
        key = (ticket.sale_id, ticket.username)
        num = order.lines[0].num
        held = self._tickets.get(ticket.id)
        sale = self._sales.get(ticket.sale_id)
        if held is None or held.status != TICKET_QUEUED:
            return SeckillOutcome.NOT_QUEUED
        if key in self._bought:
            return SeckillOutcome.DUPLICATE
        if sale is None or sale.stock < num:
            return SeckillOutcome.SOLD_OUT
        if order.id in self._orders:
            raise Conflict(f"order {order.id} exists already")
        self._orders[order.id] = _record(order)
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
    )


def _ticket(t: Ticket) -> Ticket:
    return Ticket(t.id, t.username, t.sale_id, TicketStatus(t.status), t.order_id,
                  _ms(t.create_time), _ms(t.update_time))
