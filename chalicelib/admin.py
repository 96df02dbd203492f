"""What the people who run the shop see: order search, an order with its refunds
and timeline, and the list of what needs a person's attention."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from chalicelib import domain, events, webhooks
from chalicelib.context import Deps, find_order
from chalicelib.domain import Invalid, Order, RefundStatus, Unavailable

MAX_PAGE = 100
PENDING_TOO_LONG = timedelta(minutes=10)


def _time(name: str, value: str | None) -> datetime | None:
    if value in (None, ""):
        return None
    try:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError as exc:
        raise Invalid(f"{name} must be an ISO-8601 time, e.g. 2026-12-01T00:00:00Z") from exc
    if moment.tzinfo is None:
        raise Invalid(f"{name} must name its time zone (e.g. end in Z)")
    return moment


def search_orders(deps: Deps, *, status: str | None = None, start: str | None = None,
                  end: str | None = None, q: str | None = None, limit: str | None = None,
                  cursor: str | None = None) -> dict[str, Any]:
    """`q`: an order id, a trade number or a username, matched exactly; otherwise by
    status (or every status) and create time, newest first, a page at a time."""
    if status not in (None, "") and status not in domain.STATES:
        raise Invalid(f"status must be one of {', '.join(domain.STATES)}")
    try:
        size = MAX_PAGE if limit in (None, "") else int(str(limit))
    except ValueError as exc:
        raise Invalid(f"limit must be a whole number from 1 to {MAX_PAGE}") from exc
    if not 1 <= size <= MAX_PAGE:
        raise Invalid(f"limit must be a whole number from 1 to {MAX_PAGE}")
    since, until = _time("from", start), _time("to", end)
    q = (q or "").strip()
    if q:
        found = _by_q(deps, q)
        found = [o for o in found
                 if (not status or o.status == status)
                 and (since is None or o.create_time >= since)
                 and (until is None or o.create_time <= until)]
        return {"items": [o.to_wire() for o in found[:size]], "next": None}
    orders, nxt = deps.store.search_orders(status=status or None, start=since, end=until,
                                           limit=size, cursor=cursor or None)
    return {"items": [o.to_wire() for o in orders], "next": nxt}


def _by_q(deps: Deps, q: str) -> list[Order]:
    """An order id, else a trade number, else a username (none is longer than 64)."""
    if domain.ORDER_ID_RE.fullmatch(q):
        order = deps.store.get_order(q)
        return [order] if order else []
    if len(q) > 64:
        return []
    by_trade = deps.store.order_by_trade(q)
    return [by_trade] if by_trade is not None else deps.store.list_orders(q)


def order_detail(deps: Deps, order_id: str) -> dict[str, Any]:
    order = find_order(deps, order_id)
    refunds = sorted(deps.store.refunds_of(order_id), key=lambda r: (r.create_time, r.id))
    return {"order": order.to_wire(), "refunds": [r.to_wire() for r in refunds],
            "timeline": [e.to_wire() for e in deps.store.timeline(order_id)]}


def attention(deps: Deps) -> dict[str, Any]:
    """Everything where money may be stuck until a person acts."""
    now = deps.clock()
    try:
        parked = deps.broker.parked_counts()
    except Unavailable:
        parked = {}
    refunds = [r for r in deps.store.open_refunds()
               if r.status == RefundStatus.FAILED or now - r.create_time > PENDING_TOO_LONG]
    return {
        "parked": parked,
        "refunds": [r.to_wire() for r in refunds],
        "paidButClosed": deps.store.paid_but_closed(),
        "reconciliation": [d.to_wire() for d in deps.store.open_differences()],
        "failedRuns": [d.isoformat() for d in deps.store.failed_days()],
        "deliveries": webhooks.failed(deps),
        "parkedEvents": events.parked(deps),
    }
