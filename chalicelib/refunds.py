"""Refunds, as records an operator can issue and trace.

    request   validate; the refund PENDING with the order's reservation (one
              conditional write: succeeded + pending never above what was
              paid, one pending refund per order); then ask the provider
    answer    made -> SUCCEEDED (the order's refundedMoney with it; REFUNDED when
              it reaches what was paid); refused -> FAILED with the provider's
              code; unknown (timeout, ACQ.SYSTEM_ERROR) -> stays PENDING and goes
              to queue.order.refund
    resolve   the worker (and the sweeper) ask the provider about a PENDING
              refund: made -> SUCCEEDED; not made -> the same request number
              asked again (the provider never refunds one number twice)

The refund of money that came after its order closed runs the same way, by the
operator "system", under REFUND_<orderId>.
"""

from __future__ import annotations

import logging
import re
from datetime import timedelta
from typing import Any

from chalicelib import domain
from chalicelib.context import Deps, find_order, record
from chalicelib.domain import (
    CLOSED,
    PAID,
    SYSTEM_OPERATOR,
    EventType,
    Invalid,
    NotFound,
    Order,
    Refund,
    RefundExceedsPaid,
    RefundInProgress,
    RefundNotAllowed,
    RefundStatus,
    Unavailable,
    Unprocessable,
    from_fen,
    money_str,
    to_fen,
)
from chalicelib.domain.refund import MAX_REASON_CHARS
from chalicelib.ports import PaymentRefused, PaymentUnavailable, RefundState

log = logging.getLogger(__name__)

AMOUNT_RE = re.compile(r"[0-9]{1,10}\.[0-9]{2}")
IDEMPOTENCY_KEY_RE = re.compile(r"^[\x21-\x7e]{1,64}$")
ASK_AFTER = timedelta(seconds=10)  # Alipay: wait a little before asking about a refund
ATTEMPTS = 5  # optimistic writes against concurrent changes of the same order


def _amount(value: Any) -> int:
    if not isinstance(value, str) or not AMOUNT_RE.fullmatch(value):
        raise Invalid(f'amount must be a string with two decimals, e.g. "10.00", not {value!r}')
    fen = to_fen(value)
    if fen <= 0:
        raise Invalid("amount must be more than 0.00")
    return fen


def _reason(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise Invalid("a refund needs a reason")
    if len(value) > MAX_REASON_CHARS:
        raise Invalid(f"reason is longer than {MAX_REASON_CHARS} characters")
    return value.strip()


def request_refund(deps: Deps, operator: str, order_id: str, amount: Any, reason: Any,
                   idempotency_key: str | None = None) -> tuple[Refund, bool]:
    """An operator's refund. Returns the refund and whether it is the earlier one of
    a repeated Idempotency-Key (nothing new was asked)."""
    fen = _amount(amount)
    why = _reason(reason)
    if idempotency_key is not None and not IDEMPOTENCY_KEY_RE.fullmatch(idempotency_key):
        raise Invalid("Idempotency-Key must be 1 to 64 visible ASCII characters")
    order = find_order(deps, order_id)
    if idempotency_key:
        earlier = deps.store.refund_for_key(order.id, idempotency_key)
        if earlier is not None:
            return earlier, True
    for _ in range(ATTEMPTS):
        if order.status != PAID:
            raise RefundNotAllowed(f"order {order.id} is {order.status}: only a PAID order "
                                   "can be refunded")
        if order.pending_refund_id:
            raise RefundInProgress(f"refund {order.pending_refund_id} of order {order.id} is "
                                   "still PENDING; one refund at a time",
                                   refundId=order.pending_refund_id)
        left = order.total_fen - order.refund_reserved_fen
        if fen > left:
            raise RefundExceedsPaid(f"{money_str(fen)} is more than the {money_str(left)} left "
                                    f"of order {order.id}'s payment", left=money_str(left))
        refund = Refund(id=domain.refund_id(order.id, order.refund_count + 1),
                        order_id=order.id, amount_fen=fen, reason=why,
                        status=RefundStatus.PENDING, operator=operator,
                        create_time=deps.clock(), idempotency_key=idempotency_key)
        if deps.store.reserve_refund(refund, order, expect_status=PAID):
            record(deps, order.id, EventType.OPERATOR, who=operator, what="refund",
                   why=why, amount=money_str(fen), refundId=refund.id)
            record(deps, order.id, EventType.REFUND_REQUESTED, refundId=refund.id,
                   amount=money_str(fen), operator=operator)
            # settle_refund computes from the order as it is with this reservation
            return execute(deps, refund, find_order(deps, order.id)), False
        if idempotency_key:
            earlier = deps.store.refund_for_key(order.id, idempotency_key)
            if earlier is not None:
                return earlier, True
        order = find_order(deps, order.id)  # changed meanwhile: decide again on what it is now
    raise Unavailable(f"order {order.id} kept changing while refunding; try again")


def retry_refund(deps: Deps, operator: str, refund_id: str) -> Refund:
    """A FAILED refund asked again with the same request number and amount."""
    refund = get_refund(deps, refund_id)
    if refund.status != RefundStatus.FAILED:
        raise domain.Conflict(f"refund {refund.id} is {refund.status}; only a FAILED refund "
                              "is retried")
    for _ in range(ATTEMPTS):
        order = find_order(deps, refund.order_id)
        if order.pending_refund_id:
            raise RefundInProgress(f"refund {order.pending_refund_id} of order {order.id} is "
                                   "still PENDING; one refund at a time")
        if order.refund_reserved_fen + refund.amount_fen > order.total_fen:
            raise RefundExceedsPaid(f"{money_str(refund.amount_fen)} is more than what is left "
                                    f"of order {order.id}'s payment")
        if deps.store.retry_refund(refund, order, now=deps.clock()):
            record(deps, order.id, EventType.OPERATOR, who=operator, what="retry refund",
                   refundId=refund.id)
            pending = deps.store.get_refund(refund.id) or refund
            return execute(deps, pending, find_order(deps, order.id))
        refund = get_refund(deps, refund_id)
        if refund.status != RefundStatus.FAILED:
            raise domain.Conflict(f"refund {refund.id} is {refund.status}; only a FAILED "
                                  "refund is retried")
    raise Unavailable(f"refund {refund_id} could not be retried; try again")


def get_refund(deps: Deps, refund_id: str, order_id: str | None = None) -> Refund:
    """The refund (of `order_id`, when given), or NotFound."""
    if not isinstance(refund_id, str) or not domain.REFUND_ID_RE.fullmatch(refund_id):
        raise NotFound(f"no refund {refund_id!r}")
    refund = deps.store.get_refund(refund_id)
    if refund is None or (order_id is not None and refund.order_id != order_id):
        raise NotFound(f"no refund {refund_id!r}" + (f" of order {order_id!r}" if order_id
                                                      else ""))
    return refund


def execute(deps: Deps, refund: Refund, order: Order) -> Refund:
    """Ask the provider to make a PENDING refund and record its answer."""
    if deps.gateway is None:
        log.warning("refund %s stays PENDING: payment is not configured", refund.id,
                    extra={"orderId": order.id})
        return refund
    try:
        outcome = deps.gateway.refund_payment(order.id, from_fen(refund.amount_fen), refund.id)
    except PaymentRefused as exc:
        code = exc.reason or type(exc).__name__
        detail = exc.detail or str(exc)
        if deps.store.settle_refund(refund, order, status=RefundStatus.FAILED,
                                    now=deps.clock(), failure_code=code,
                                    failure_message=detail):
            record(deps, order.id, EventType.REFUND_FAILED, refundId=refund.id, code=code,
                   message=detail)
            log.warning("refund %s refused: %s %s", refund.id, code, detail,
                        extra={"orderId": order.id})
        return deps.store.get_refund(refund.id) or refund
    except PaymentUnavailable as exc:
        record(deps, order.id, EventType.REFUND_PENDING, refundId=refund.id, error=str(exc))
        log.warning("refund %s: outcome unknown (%s); settled by asking", refund.id, exc,
                    extra={"orderId": order.id})
        try:
            deps.broker.publish_refund(refund.id)
        except Unavailable:
            log.warning("refund %s: not queued; the sweeper settles it", refund.id)
        return refund
    return _succeed(deps, refund, order, trade_no=outcome.trade_no)


def _succeed(deps: Deps, refund: Refund, order: Order, trade_no: str | None) -> Refund:
    settled = deps.store.settle_refund(
        refund, order, status=RefundStatus.SUCCEEDED, now=deps.clock(),
        trade_no=trade_no if order.status == CLOSED else None)
    if settled:
        record(deps, order.id, EventType.REFUND_SUCCEEDED, refundId=refund.id,
               amount=money_str(refund.amount_fen))
        log.info("refund %s SUCCEEDED", refund.id, extra={"orderId": order.id})
    return deps.store.get_refund(refund.id) or refund


def resolve_refund(deps: Deps, msg: dict[str, Any]) -> RefundStatus:
    """queue.order.refund (and the sweeper): settle a PENDING refund by asking the
    provider. Still unknown: Unavailable, and it is asked again later."""
    refund_id = msg.get("refundId")
    if not isinstance(refund_id, str) or not domain.REFUND_ID_RE.fullmatch(refund_id):
        raise Unprocessable(f"refund message without a valid refundId: {dict(msg)!r}")
    refund = deps.store.get_refund(refund_id)
    if refund is None:
        raise Unprocessable(f"refund message for unknown refund {refund_id}")
    if refund.status != RefundStatus.PENDING:
        return refund.status
    if deps.gateway is None:
        raise Unavailable(f"refund {refund.id} is PENDING and payment is not configured")
    wait = (refund.create_time + ASK_AFTER - deps.clock()).total_seconds()
    if wait > 0:
        # Alipay may still be making it; the worker's thread waits, its connection
        # keeps answering heartbeats meanwhile.
        deps.sleep(min(wait, ASK_AFTER.total_seconds()))
    order = find_order(deps, refund.order_id)
    if order.pending_refund_id != refund.id:
        # Settled meanwhile (the API had Alipay's answer while this waited): done.
        current = deps.store.get_refund(refund.id)
        if current is not None and current.status != RefundStatus.PENDING:
            return current.status
        raise Unprocessable(f"refund {refund.id} is PENDING but its order holds "
                            f"{order.pending_refund_id!r}: needs a person")
    try:
        state = deps.gateway.query_refund(order.id, refund.id)
    except PaymentUnavailable as exc:
        raise Unavailable(f"refund {refund.id}: provider unreachable ({exc})") from exc
    except PaymentRefused as exc:
        raise Unavailable(f"refund {refund.id}: the provider refused the query "
                          f"({exc.reason or exc})") from exc
    record(deps, order.id, EventType.QUERY, refundId=refund.id, refund=state.value)
    if state == RefundState.SUCCEEDED:
        return _succeed(deps, refund, order, trade_no=order.transaction_id).status
    settled = execute(deps, refund, order)  # not made: the same request number again
    if settled.status == RefundStatus.PENDING:
        raise Unavailable(f"refund {refund.id}: still unknown")
    return settled.status


def refund_late_payment(deps: Deps, order: Order, trade_no: str) -> Refund:
    """Money for a CLOSED order goes back, once: REFUND_<orderId>, operator "system"."""
    refund_id = domain.refund_request_no(order.id)
    for _ in range(ATTEMPTS):
        refund = deps.store.get_refund(refund_id)
        if refund is not None:
            if refund.status == RefundStatus.PENDING:
                current = find_order(deps, order.id)
                if current.pending_refund_id == refund.id:
                    return execute(deps, refund, current)
            return refund  # SUCCEEDED, or FAILED: in front of a person
        current = find_order(deps, order.id)
        if current.status != CLOSED:
            raise Unprocessable(f"order {order.id} is {current.status}, not CLOSED: "
                                "its late payment needs a person")
        refund = Refund(id=refund_id, order_id=order.id, amount_fen=current.total_fen,
                        reason=f"paid ({trade_no}) after the order closed",
                        status=RefundStatus.PENDING, operator=SYSTEM_OPERATOR,
                        create_time=deps.clock())
        if deps.store.reserve_refund(refund, current, expect_status=CLOSED):
            record(deps, order.id, EventType.REFUND_REQUESTED, refundId=refund.id,
                   amount=money_str(refund.amount_fen), operator=SYSTEM_OPERATOR,
                   tradeNo=trade_no)
            return execute(deps, refund, find_order(deps, order.id))
    raise Unavailable(f"the late payment of {order.id} could not be recorded; try again")
