"""What the service does, as plain functions of plain data and their dependencies.

The HTTP routes (app.py) and the worker (chalicelib/worker) call these same
functions. They take their dependencies as ports (chalicelib/ports.py); none of
them knows HTTP, AMQP frames or Lambda.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

from chalicelib import config, domain, refunds
from chalicelib.context import Deps, find_order, record
from chalicelib.domain import (
    CLOSED,
    MAX_CART_LINES,
    MAX_NUM,
    PAID,
    REFUNDED,
    SOURCE_TYPES,
    UNPAID,
    Conflict,
    EventType,
    Forged,
    Invalid,
    Line,
    NotFound,
    Order,
    OrderStatus,
    OutOfStock,
    PriceChanged,
    RefundStatus,
    TimelineEvent,
    Unavailable,
    Unprocessable,
    from_fen,
    iso,
    money_str,
    parse_amount,
    parse_iso,
)
from chalicelib.domain.timeline import clip
from chalicelib.ports import (
    PAID_STATES,
    NoticeKind,
    NoticeRefused,
    PaymentNotice,
    PaymentRefused,
    PaymentUnavailable,
    Trade,
    TradeState,
    TradeStateConflict,
)

log = logging.getLogger(__name__)


# --- goods and cart -----------------------------------------------------------


def list_goods(deps: Deps) -> dict[str, Any]:
    return {
        "items": [
            {"id": g.id, "name": g.name, "price": money_str(g.price_fen), "stock": g.stock}
            for g in deps.store.list_goods()
        ]
    }


def get_cart(deps: Deps, username: str) -> dict[str, Any]:
    cart = deps.store.get_cart(username)
    goods = deps.store.get_goods(cart)
    items = [
        {
            "goodsId": gid,
            "name": goods[gid].name,
            "price": money_str(goods[gid].price_fen),
            "num": num,
        }
        for gid, num in sorted(cart.items())
        if gid in goods
    ]
    total_fen = sum(goods[i["goodsId"]].price_fen * i["num"] for i in items)
    return {
        "items": items,
        "totalNum": sum(i["num"] for i in items),
        "totalMoney": money_str(total_fen),
    }


def _goods_id(goods_id: str) -> str:
    if not isinstance(goods_id, str) or not domain.GOODS_ID_RE.fullmatch(goods_id):
        raise NotFound(f"no goods {goods_id!r}")
    return goods_id


def set_cart_item(deps: Deps, username: str, goods_id: str, num: Any) -> dict[str, Any]:
    if isinstance(num, bool) or not isinstance(num, int) or not 1 <= num <= MAX_NUM:
        raise Invalid(f"num must be an integer from 1 to {MAX_NUM}")
    _goods_id(goods_id)
    goods = deps.store.get_goods([goods_id]).get(goods_id)
    if goods is None:
        raise NotFound(f"no goods {goods_id!r}")
    deps.store.set_cart_line(username, goods_id, num, goods)
    return get_cart(deps, username)


def remove_cart_item(deps: Deps, username: str, goods_id: str) -> dict[str, Any]:
    _goods_id(goods_id)
    deps.store.delete_cart_line(username, goods_id)
    return get_cart(deps, username)


# --- orders -------------------------------------------------------------------


def create_order(deps: Deps, username: str, source_type: Any = None) -> dict[str, Any]:
    """Cart -> one transaction (order put, stock taken, cart emptied, the user's
    unpaid orders within the cap) -> delay message."""
    source_type = "1" if source_type is None else source_type
    if source_type not in SOURCE_TYPES:
        raise Invalid('sourceType must be "1" (PC) or "2" (mobile)')
    cart = sorted(deps.store.get_cart_lines(username), key=lambda c: c.goods_id)
    if not cart:
        raise Invalid("the cart is empty")
    if len(cart) > MAX_CART_LINES:
        raise Invalid(
            f"the cart holds {len(cart)} different goods; one order takes at most "
            f"{MAX_CART_LINES} (a DynamoDB transaction holds 100 actions)"
        )
    # The price each line was put with; the transaction takes the stock only while
    # the goods still has that price, so the order never records a stale one. Lines
    # put before prices were kept on them are priced from a read of the goods.
    unpriced = [c.goods_id for c in cart if c.price_fen is None or c.name is None]
    goods = deps.store.get_goods(unpriced) if unpriced else {}
    lines = []
    for c in cart:
        if c.price_fen is not None and c.name is not None:
            lines.append(Line(c.goods_id, c.name, c.price_fen, c.num))
        elif c.goods_id in goods:
            g = goods[c.goods_id]
            lines.append(Line(c.goods_id, g.name, g.price_fen, c.num))
        else:
            raise OutOfStock(c.goods_id)
    order = _new_order(deps, username, source_type, lines)
    try:
        # At most max_unpaid_orders_per_user UNPAID cart orders, kept inside the
        # create transaction (chalicelib/store/orders.py): TooManyUnpaidOrders.
        deps.store.create_order(order, {c.goods_id: c.num for c in cart},
                                max_unpaid=deps.settings.max_unpaid_orders_per_user)
    except PriceChanged as exc:
        deps.store.refresh_cart_line(username, exc.goods)  # the next order takes it
        raise
    _schedule_check(deps, order.id)
    return order.to_wire()


def _new_order(deps: Deps, username: str, source_type: str, lines: list[Line],
               now: datetime | None = None) -> Order:
    now = now or deps.clock()
    return Order(
        id=domain.new_order_id(now),
        username=username,
        status=UNPAID,
        source_type=source_type,
        lines=lines,
        create_time=now,
        update_time=now,
        expire_time=now + timedelta(seconds=deps.settings.pay_timeout_seconds),
        check_time=now + timedelta(seconds=deps.settings.check_delay_seconds),
    )


def _schedule_check(deps: Deps, order_id: str) -> None:
    """After the commit, never inside it. A lost message is found by the sweeper."""
    try:
        deps.broker.publish_check(order_id)
    except Unavailable as exc:
        log.warning("delay message for %s not published (%s); the sweeper will check it",
                    order_id, exc, extra={"orderId": order_id})


def _own_order(deps: Deps, username: str, order_id: str) -> Order:
    order = find_order(deps, order_id)
    if order.username != username:
        raise NotFound(f"no order {order_id!r}")  # someone else's: as if it were none
    return order


def list_orders(deps: Deps, username: str) -> dict[str, Any]:
    return {"items": [o.to_wire() for o in deps.store.list_orders(username)]}


def get_order(deps: Deps, username: str, order_id: str) -> dict[str, Any]:
    return _own_order(deps, username, order_id).to_wire()


def cancel_order(deps: Deps, username: str, order_id: str) -> dict[str, Any]:
    """The buyer's cancel, inside the request: Alipay is asked (query, then close)
    before the order closes, each call with the API's short timeout (deps.py), so
    the answer comes well within API Gateway's 29 s (config.API_ROUTE_CHAIN_SECONDS).
    Alipay not answering is Unavailable (503) with the order as it was: still
    UNPAID, its stock still taken; a close Alipay made before its answer was lost
    is found by the next query (this cancel again, or the order's check)."""
    order = _own_order(deps, username, order_id)
    if order.status != UNPAID:
        raise Conflict(f"order {order_id} is {order.status}, only an UNPAID order can be cancelled")
    status = _settle_unpaid(deps, order)
    if status != CLOSED:
        raise Conflict(f"order {order_id} is {status}: it was paid before it could close")
    return _own_order(deps, username, order_id).to_wire()


# --- the timeout --------------------------------------------------------------


def on_check(deps: Deps, msg: Mapping[str, Any]) -> OrderStatus | None:
    """queue.order.check, after the delay: an order still UNPAID is settled.

    Returns the status the order ends in (None: no such order), for logs and tests.
    """
    order_id = msg.get("orderId")
    if not isinstance(order_id, str) or not domain.ORDER_ID_RE.fullmatch(order_id):
        raise Unprocessable(f"check message without a valid orderId: {dict(msg)!r}")
    order = deps.store.get_order(order_id)
    if order is None:
        log.warning("check for unknown order %s", order_id, extra={"orderId": order_id})
        return None
    if order.status != UNPAID:
        return order.status
    # Anyone who may publish to the delay exchange could send a check at once: one
    # before the order's check time would close an order its buyer is still paying.
    if deps.clock() < order.check_time - timedelta(seconds=deps.settings.check_skew_seconds):
        raise _forged(deps, order, "check", f"before the order's check time "
                      f"{iso(order.check_time)}", msg)
    return _settle_unpaid(deps, order)


def _forged(deps: Deps, order: Order | str, kind: str, reason: str,
            msg: Mapping[str, Any]) -> Forged:
    """The error for a message that proves nothing, kept on its order's timeline
    (when it names one) so that a person sees who tried what."""
    order_id = order if isinstance(order, str) else order.id
    log.warning("forged %s message for %s: %s", kind, order_id, reason,
                extra={"orderId": order_id})
    if isinstance(order, str) and deps.store.get_order(order_id) is None:
        return Forged(f"{kind} message for unknown order {order_id}: {reason}")
    fields = {k: v for k, v in msg.items() if k != "notify"}
    record(deps, order_id, EventType.FORGED_MESSAGE, message=kind, reason=reason,
           fields=clip(fields))
    return Forged(f"{kind} message for {order_id}: {reason}; it changed nothing")


def _settle_unpaid(deps: Deps, order: Order) -> OrderStatus | None:
    """Ask the payment provider first: paid means PAID (the notify was lost);
    otherwise close the trade and then the order, giving the stock back exactly once.

    Never closes blind: no payment provider configured, the provider unreachable
    or refusing to answer raise Unavailable, and the caller tries again later.
    """
    # The query's (and the trade's close's) timeline events go into the close's
    # transaction when there is one: a close makes one write, not three.
    notes: list[TimelineEvent] = []
    trade = _query_trade(deps, order, notes=notes)
    if trade is not None and trade.paid:
        _record_notes(deps, notes)
        log.info("order %s paid though no notify came", order.id,
                 extra={"orderId": order.id, "tradeNo": trade.trade_no})
        return _apply_payment(deps, order, trade.trade_no or "", trade.amount_fen,
                              trade.paid_at or deps.clock(), None)
    gateway = deps.gateway  # there is one: _query_trade answered
    if trade is not None and trade.state == TradeState.WAITING and gateway is not None:
        try:
            gateway.close_trade(order.id)
        except (TradeStateConflict, PaymentUnavailable, PaymentRefused) as exc:
            _record_notes(deps, notes)
            if isinstance(exc, TradeStateConflict):  # paid between our query and our close
                raise Unavailable(f"closing trade {order.id}: {exc}; checking again") from exc
            if isinstance(exc, PaymentRefused):
                raise Unavailable(f"payment provider refused the close of {order.id}: "
                                  f"{exc.reason or exc}") from exc
            raise Unavailable(f"payment provider unreachable for {order.id}: {exc}") from exc
        notes.append(TimelineEvent(order.id, deps.clock(), EventType.TRADE_CLOSED,
                                   {"tradeNo": trade.trade_no}))
    now = deps.clock()
    closed = TimelineEvent(order.id, now, EventType.CLOSED, {"stockReturned": order.total_num})
    try:
        done = deps.store.close_order(order, now=now, notes=[*notes, closed])
    except Unavailable:
        _record_notes(deps, notes)
        raise
    if done:
        log.info("order %s closed, stock returned", order.id, extra={"orderId": order.id})
        return CLOSED
    _record_notes(deps, notes)  # what was asked happened, though another closed it
    current = deps.store.get_order(order.id)
    return current.status if current else None


def _record_notes(deps: Deps, notes: list[TimelineEvent]) -> None:
    for note in notes:
        record(deps, note.order_id, note.type, at=note.time, ref=note.ref, **note.detail)


def _query_trade(deps: Deps, order: Order, notes: list[TimelineEvent] | None = None,
                 **note: Any) -> Trade | None:
    """The provider's trade for the order (None: it has none), kept on the order's
    timeline (or added to `notes`, for the caller to write). Not configured,
    unreachable or refusing (no permission, a bad app) raise Unavailable: an order
    is never closed, nor a payment missed, blind."""
    if deps.gateway is None:
        raise Unavailable(f"order {order.id} needs the payment provider, and payment is "
                          "not configured: it waits until the provider can be asked")
    try:
        trade = deps.gateway.query_trade(order.id)
    except PaymentUnavailable as exc:
        raise Unavailable(f"payment provider unreachable for {order.id}: {exc}") from exc
    except PaymentRefused as exc:
        raise Unavailable(f"payment provider refused to answer for {order.id}: "
                          f"{exc.reason or exc}") from exc
    detail: dict[str, Any] = {"trade": None}
    if trade is not None:
        detail = {"trade": trade.state.value, "tradeNo": trade.trade_no,
                  "amount": money_str(trade.amount_fen)}
    if notes is None:
        record(deps, order.id, EventType.QUERY, **note, **detail)
    else:
        notes.append(TimelineEvent(order.id, deps.clock(), EventType.QUERY, {**note, **detail}))
    return trade


def sweep(deps: Deps, limit: int = 500,
          seconds_left: Callable[[], float] | None = None) -> dict[str, int]:
    """Finds UNPAID orders past their check time (a lost delay message), closed
    orders whose payment link has expired (money may have come through it), and
    refunds whose outcome is still unknown, and settles each. One order that fails
    never stops the rest.

    `seconds_left` tells how long the run may still go on (the sweeper: its
    Lambda's remaining time). A check is started only while one check's worst
    case (config.sweep_check_seconds, with this role's Alipay timeout) and
    config.SWEEP_MARGIN_SECONDS are left; what was not started is counted in
    `left`, for the next run. None: a plain clock that starts checks for
    SWEEP_INTERVAL_SECONDS (the worker, the CLI)."""
    need = (config.sweep_check_seconds(deps.settings.function_role)
            + config.SWEEP_MARGIN_SECONDS)
    # (at least a second of starts: an interval of 0 still sweeps)
    end = time.monotonic() + max(deps.settings.sweep_interval_seconds, 1.0) + need

    def plain_clock() -> float:
        return end - time.monotonic()

    time_left = seconds_left or plain_clock
    now = deps.clock()
    due = deps.store.unpaid_due(now, limit=limit)
    # PENDING only, and not one asked for a moment ago (Alipay may still be making
    # it; its own queue message settles it): the sweep never waits.
    ripe = [r for r in deps.store.open_refunds()
            if r.status == RefundStatus.PENDING and now >= r.create_time + refunds.ASK_AFTER]
    checks: list[tuple[str, str, str, Callable[[], object]]] = [
        *(("settled", "check", order_id, functools.partial(on_check, deps, {"orderId": order_id}))
          for order_id in due),
        *(("rechecked", "recheck", order_id, functools.partial(recheck_closed, deps, order_id))
          for order_id in deps.store.recheck_due(now, limit=limit)),
        *(("refunds", "refund", r.order_id,
           functools.partial(refunds.resolve_refund, deps, {"refundId": r.id})) for r in ripe),
    ]
    result = {"due": len(due), "settled": 0, "failed": 0, "rechecked": 0, "refunds": 0,
              "left": 0}
    for index, (done, what, order_id, settle) in enumerate(checks):
        left_s = time_left()
        if left_s < need:
            result["left"] = len(checks) - index
            log.warning("sweep stopped with %.1f s left (a check may take %.1f s): %d check(s) "
                        "left for the next run", left_s, need, result["left"])
            break
        try:
            settle()
            result[done] += 1
        except Exception as exc:  # noqa: BLE001 - the next round tries this one again
            result["failed"] += 1
            log.warning("sweep: %s of %s failed: %s", what, order_id, exc,
                        extra={"orderId": order_id})
    return result


def recheck_closed(deps: Deps, order_id: str) -> OrderStatus | None:
    """A closed order's payment link has expired: ask once more whether money came
    through it (a payment whose notify was lost). Paid: it is refunded."""
    order = deps.store.get_order(order_id)
    if order is None:
        deps.store.clear_recheck(order_id)
        return None
    if order.status == CLOSED:
        trade = _query_trade(deps, order, recheck=True)
        if trade is not None and trade.paid:
            return_late_payment(deps, order, trade.trade_no or "")
            order = deps.store.get_order(order_id) or order
    deps.store.clear_recheck(order_id)
    return order.status


# --- the payment --------------------------------------------------------------


def start_payment(deps: Deps, username: str, order_id: str) -> dict[str, Any]:
    order = _own_order(deps, username, order_id)
    if order.status != UNPAID:
        raise Conflict(f"order {order_id} is {order.status}, not UNPAID")
    if deps.clock() >= order.expire_time:
        raise Conflict(f"order {order_id} can no longer be paid; it closes soon")
    if deps.gateway is None:
        raise Unavailable("payment is not configured")
    url = deps.gateway.page_pay_url(
        order.id, from_fen(order.total_fen), order.subject, order.expire_time
    )
    record(deps, order.id, EventType.PAYMENT_LINK, expireTime=iso(order.expire_time),
           amount=money_str(order.total_fen))
    return {"orderId": order.id, "payUrl": url}


def on_notify(deps: Deps, params: Mapping[str, str]) -> bool:
    """The payment provider's async notify. True means answer `success`.

    Only verifies and publishes: the order changes in on_paid (a refund in
    refunds.resolve_refund), after the broker confirmed the message. A notify that
    fails a check changes nothing; each is kept on its order's timeline.
    """
    gateway = deps.gateway
    ctx = {"orderId": params.get("out_trade_no"), "tradeNo": params.get("trade_no"),
           "notifyId": params.get("notify_id")}
    received = clip({k: v for k, v in params.items() if k != "sign"})

    def refuse(why: str, order_id: str | None = None) -> bool:
        log.warning("notify refused: %s", why, extra=ctx)
        if order_id is not None:
            record(deps, order_id, EventType.NOTIFY, verified=False, reason=why,
                   fields=received)
        return False

    if gateway is None:
        return refuse("payment is not configured")
    try:
        notice = gateway.read_notice(params)
    except NoticeRefused as exc:
        return refuse(exc.reason, _known_order_id(deps, params.get("out_trade_no")))
    order_id = notice.order_id
    if not domain.ORDER_ID_RE.fullmatch(order_id):
        return refuse("out_trade_no is not one of ours")
    due = deps.store.get_order_total(order_id)
    if due is None:
        return refuse("unknown order")
    fen = notice.amount_fen
    if fen is None or fen != due:
        return refuse(f"total_amount differs from the order's {money_str(due)}", order_id)
    if notice.kind == NoticeKind.REFUND:
        return _on_refund_notice(deps, order_id, notice, received, ctx)
    if notice.state not in PAID_STATES:
        record(deps, order_id, EventType.NOTIFY, verified=True, fields=received)
        log.info("notify with trade state %s: nothing to do", notice.state, extra=ctx)
        return True
    # A payment's notify goes on the timeline from the worker (on_paid), with the
    # time it was received here: the route makes no write Alipay must wait for.
    msg = {
        "orderId": order_id,
        "tradeNo": notice.trade_no,
        "totalAmount": money_str(fen),
        "payTime": iso(notice.paid_at or deps.clock()),
        "notifyId": notice.notice_id,
        "receivedAt": iso(deps.clock()),
        # As received, signature included: the worker verifies it again, since
        # anyone holding the broker's credentials could publish to the pay queue.
        "notify": dict(params),
    }
    try:
        deps.broker.publish_pay(msg)
    except Unavailable as exc:
        log.warning("notify not published, answering failure so Alipay retries: %s", exc,
                    extra=ctx)
        return False
    log.info("notify verified and published for order %s", order_id, extra=ctx)
    return True


def _known_order_id(deps: Deps, order_id: str | None) -> str | None:
    """The order a refused notify names, if it is one (to keep the refusal on its
    timeline); None for anything else, without a read for what cannot be an id, and
    with the notify's own read (the amount alone) for what can."""
    if not isinstance(order_id, str) or not domain.ORDER_ID_RE.fullmatch(order_id):
        return None
    return order_id if deps.store.get_order_total(order_id) is not None else None


def _on_refund_notice(deps: Deps, order_id: str, notice: PaymentNotice,
                      received: dict[str, Any], ctx: dict[str, Any]) -> bool:
    """A refund was made: never a payment. A pending refund it names is settled by
    the worker, which asks the provider (the notice only says when to ask)."""
    record(deps, order_id, EventType.NOTIFY, verified=True, refund=True, fields=received)
    refund_id = notice.refund_id
    if not refund_id:
        return True
    refund = deps.store.get_refund(refund_id)
    if refund is None or refund.order_id != order_id or refund.status != RefundStatus.PENDING:
        return True  # not ours, or settled already
    try:
        deps.broker.publish_refund(refund_id)
    except Unavailable as exc:
        log.warning("refund notify not published, answering failure: %s", exc, extra=ctx)
        return False
    return True


def on_paid(deps: Deps, msg: Mapping[str, Any]) -> OrderStatus:
    """queue.order.pay: a payment, believed only as far as the signed notify it
    carries proves it. UNPAID -> PAID; CLOSED -> refund, REFUNDED."""
    order_id = msg.get("orderId")
    if not isinstance(order_id, str) or not domain.ORDER_ID_RE.fullmatch(order_id):
        raise Unprocessable(f"pay message without a valid orderId: {clip(dict(msg))!r}")
    notice = _verified_payment(deps, order_id, msg)
    notified = _notify_note(deps, order_id, msg)
    trade_no, notify_id = notice.trade_no, notice.notice_id
    fen = notice.amount_fen
    assert fen is not None  # _verified_payment compared it with the message's
    pay_time = notice.paid_at or deps.clock()
    # The common case in one write, no read first: the write's condition (UNPAID and
    # due exactly this amount) is the whole rule. Only when it fails does the read
    # below say why: unknown order, another amount, already PAID, CLOSED.
    if _mark_paid(deps, order_id, trade_no, fen, pay_time, notify_id, notes=[notified]):
        return PAID
    _record_notes(deps, [notified])  # a notify again, or for an order that is not UNPAID
    order = deps.store.get_order(order_id)
    if order is None:
        raise Unprocessable(f"pay message for unknown order {order_id}")
    if fen != order.total_fen:
        raise Unprocessable(
            f"pay message for {order_id}: {money_str(fen)} paid, "
            f"{money_str(order.total_fen)} due; never marked paid"
        )
    return _apply_payment(deps, order, trade_no, fen, pay_time, notify_id)


def _notify_note(deps: Deps, order_id: str, msg: Mapping[str, Any]) -> TimelineEvent:
    """The verified notify as the order's timeline keeps it, at the time the route
    received it; a redelivered message writes the same event again, not a second."""
    form = msg["notify"]
    try:
        at = parse_iso(str(msg.get("receivedAt", "")))
    except ValueError:
        at = deps.clock()  # published before the route stamped its messages
    ref = hashlib.sha256(str(form.get("sign", "")).encode()).hexdigest()[:8]
    return TimelineEvent(order_id, at, EventType.NOTIFY,
                         {"verified": True,
                          "fields": clip({k: v for k, v in form.items() if k != "sign"})},
                         ref=ref)


def _verified_payment(deps: Deps, order_id: str, msg: Mapping[str, Any]) -> PaymentNotice:
    """The pay message's notify, verified again as the notify route did (signature,
    app_id, seller_id), a payment in a paid state, and saying what the message says:
    this order, this trade, this amount. Anything short of that is Forged."""
    form = msg.get("notify")
    if not isinstance(form, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in form.items()):
        raise _forged(deps, order_id, "pay", "no signed notify", msg)
    if deps.gateway is None:
        raise Unavailable(f"pay message for {order_id}: payment is not configured, so its "
                          "notify cannot be verified; it waits")
    try:
        notice = deps.gateway.read_notice(form)
    except NoticeRefused as exc:
        raise _forged(deps, order_id, "pay", f"its notify did not verify: {exc.reason}",
                      msg) from exc
    if notice.kind != NoticeKind.PAYMENT or notice.state not in PAID_STATES:
        raise _forged(deps, order_id, "pay", "its notify is not a payment", msg)
    claimed = (order_id, msg.get("tradeNo"), parse_amount(str(msg.get("totalAmount", ""))))
    if notice.amount_fen is None or (notice.order_id, notice.trade_no,
                                     notice.amount_fen) != claimed:
        raise _forged(deps, order_id, "pay", "it says another order, trade or amount than "
                      "its signed notify", msg)
    return notice


def _mark_paid(deps: Deps, order_id: str, trade_no: str, fen: int, pay_time: datetime,
               notify_id: str | None, notes: list[TimelineEvent] | None = None) -> bool:
    """UNPAID -> PAID for exactly `fen` (the write's condition), the timeline's
    `notes` and `paid` event in the same transaction; False: it was not."""
    now = deps.clock()
    paid = TimelineEvent(order_id, now, EventType.PAID,
                         {"tradeNo": trade_no, "amount": money_str(fen)})
    if not deps.store.mark_paid(order_id, total_fen=fen, trade_no=trade_no, pay_time=pay_time,
                                notify_id=notify_id, now=now, notes=[*(notes or ()), paid]):
        return False
    log.info("order %s PAID", order_id,
             extra={"orderId": order_id, "tradeNo": trade_no, "notifyId": notify_id})
    return True


def _apply_payment(
    deps: Deps, order: Order, trade_no: str, fen: int, pay_time: datetime, notify_id: str | None
) -> OrderStatus:
    if order.status == UNPAID:
        if _mark_paid(deps, order.id, trade_no, fen, pay_time, notify_id):
            return PAID
        current = deps.store.get_order(order.id)  # lost a race: see who won
        if current is None:
            raise Unprocessable(f"order {order.id} is gone")
        order = current
    if order.status == PAID:
        if order.transaction_id != trade_no:
            raise Unprocessable(
                f"order {order.id} is PAID by trade {order.transaction_id}, "
                f"not by {trade_no}: needs a person"
            )
        return PAID
    if order.status == CLOSED:
        return return_late_payment(deps, order, trade_no)
    return order.status  # REFUNDED: the money went back already


def return_late_payment(deps: Deps, order: Order, trade_no: str) -> OrderStatus:
    """Money for a CLOSED order: it goes back through the refund machinery (operator
    "system", request number REFUND_<orderId>, so a retry is the same refund). Until
    it has, the order is in front of a person (paid but closed)."""
    deps.store.mark_paid_but_closed(order.id, trade_no=trade_no, now=deps.clock())
    refund = refunds.refund_late_payment(deps, order, trade_no)
    log.info("order %s paid after it closed: refund %s %s", order.id, refund.id,
             refund.status.value, extra={"orderId": order.id, "tradeNo": trade_no})
    current = deps.store.get_order(order.id)
    return current.status if current else order.status


_RETURN_LABELS = {
    UNPAID: "confirming payment",
    PAID: "paid",
    CLOSED: "closed",
    REFUNDED: "refunded",
}


def on_return(deps: Deps, params: Mapping[str, str]) -> dict[str, Any]:
    """The browser back from Alipay: verify and show. Never changes state; only the
    notify and the query are trusted to say an order is paid."""
    if deps.gateway is None:
        raise Unavailable("payment is not configured")
    try:
        order_id = deps.gateway.read_return(params)
    except NoticeRefused as exc:
        raise Invalid(exc.reason) from exc
    if not domain.ORDER_ID_RE.fullmatch(order_id):
        raise Invalid("out_trade_no is not one of ours")
    order = deps.store.get_order(order_id)
    if order is None:
        raise NotFound(f"no order {order_id!r}")
    return {"order": order.to_wire(), "label": _RETURN_LABELS[order.status]}
