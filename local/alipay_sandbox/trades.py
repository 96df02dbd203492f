"""Sandbox trades, held in memory and guarded by one lock.

The book is the sandbox's whole state and implements Alipay's trade rules: a
page-pay trade is created when the buyer opens the cashier, ``time_expire``
closes it, a paid trade can be refunded in parts (each ``out_request_no`` at
most once) and a fully refunded trade is TRADE_CLOSED, as on Alipay.

Refunds answer as ``alipay.trade.refund`` does (code 40004 "Business Failed"
unless said otherwise):

- the same ``out_request_no`` and amount again: the first answer with
  ``fund_change: "N"``; nothing moves;
- the same ``out_request_no`` with another amount: ``ACQ.DISCORDANT_REPEAT_REQUEST``
  (不一致的请求);
- ``refund_amount`` not a positive number with at most two decimals (or above
  100000000): ``ACQ.REASON_TRADE_REFUND_FEE_ERR`` (退款金额无效);
- more than what is left of the trade: ``ACQ.REFUND_AMT_NOT_EQUAL_TOTAL`` (退款金额超限);
- an unpaid trade: ``ACQ.TRADE_STATUS_ERROR``;
- the refund rule ``sandbox`` (``SANDBOX_REFUND_RULE=sandbox``) is the quirk of
  Alipay's own sandbox: one refund per trade, of the whole amount. Any other
  amount is refused with ``ACQ.REFUND_AMT_NOT_EQUAL_TOTAL`` and the sub_msg
  撤销或退款金额与订单金额不一致 (the code's literal meaning: the refund is not the
  order's total); a second refund finds nothing left and gets the same code.

A refund fault set by the test hook (``set_refund_fault``) stays until cleared:

- ``ACQ.SELLER_BALANCE_NOT_ENOUGH``: every refund that would move money is
  refused, signed, code 40004, sub_msg 卖家余额不足; nothing moves (a repeat of a
  refund made before still answers ``fund_change: "N"``);
- ``ACQ.SYSTEM_ERROR``: every refund call of the trade answers code 20000
  "Service Currently Unavailable", sub_code ``aop.ACQ.SYSTEM_ERROR``, sub_msg
  系统异常 (how Alipay's gateway reports the refund system's failure; its docs
  list ``ACQ.SYSTEM_ERROR`` as the business code, and the gateway answers it
  as code 20000 with the ``aop.`` prefix, the outcome unknown). With
  ``applied`` false nothing is done; with ``applied`` true the call is carried
  out as usual (the refund is made and recorded, notified) and the answer is
  the error anyway.
"""

from __future__ import annotations

import itertools
import logging
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from .bills import PAYMENT as PAYMENT_ROW
from .bills import REFUND as REFUND_ROW
from .bills import BillRecord
from .constants import LOCAL_BUYER_ID
from .signer import ALIPAY_TIME_FORMAT, SHANGHAI, alipay_time, alipay_time_ms, money

logger = logging.getLogger(__name__)

WAIT_BUYER_PAY = "WAIT_BUYER_PAY"
TRADE_SUCCESS = "TRADE_SUCCESS"
TRADE_CLOSED = "TRADE_CLOSED"

REFUND_RULE_ALIPAY = "alipay"  # partial refunds, as Alipay's production does
REFUND_RULE_SANDBOX = "sandbox"  # Alipay's sandbox: one refund per trade, of the whole amount
REFUND_RULES = (REFUND_RULE_ALIPAY, REFUND_RULE_SANDBOX)

SELLER_BALANCE_NOT_ENOUGH = "ACQ.SELLER_BALANCE_NOT_ENOUGH"
SYSTEM_ERROR = "ACQ.SYSTEM_ERROR"
REFUND_FAULT_CODES = (SELLER_BALANCE_NOT_ENOUGH, SYSTEM_ERROR)

MIN_AMOUNT = Decimal("0.01")
MAX_AMOUNT = Decimal("100000000.00")
DEFAULT_TIMEOUT = timedelta(days=15)  # Alipay's default timeout_express for page pay
_AMOUNT_RE = re.compile(r"^\d{1,9}(\.\d{1,2})?$")
_OUT_TRADE_NO_RE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
_TIMEOUT_EXPRESS_RE = re.compile(r"^(\d+)([mhd])$")

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


class ApiError(Exception):
    """An Alipay business answer other than 10000 (or a page the cashier refuses)."""

    def __init__(self, code: str, msg: str, sub_code: str, sub_msg: str) -> None:
        super().__init__(f"{code} {sub_code}: {sub_msg}")
        self.code = code
        self.msg = msg
        self.sub_code = sub_code
        self.sub_msg = sub_msg

    def payload(self) -> dict[str, str]:
        return {
            "code": self.code,
            "msg": self.msg,
            "sub_code": self.sub_code,
            "sub_msg": self.sub_msg,
        }


def business_error(sub_code: str, sub_msg: str) -> ApiError:
    return ApiError("40004", "Business Failed", sub_code, sub_msg)


def trade_not_exist() -> ApiError:
    return business_error("ACQ.TRADE_NOT_EXIST", "交易不存在")


def invalid_parameter(detail: str) -> ApiError:
    return business_error("ACQ.INVALID_PARAMETER", detail)


def system_error() -> ApiError:
    """Alipay's gateway when the refund system fails: the outcome is unknown."""
    return ApiError(
        "20000", "Service Currently Unavailable", "aop." + SYSTEM_ERROR, "系统异常"
    )


def parse_refund_amount(value: Any) -> Decimal:
    """``refund_amount``: a positive number with at most two decimals (a JSON
    string, as python-alipay-sdk sends it, or a JSON number, as some SDKs do)."""
    if value is None or value == "":
        raise invalid_parameter("refund_amount is required")
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise business_error("ACQ.REASON_TRADE_REFUND_FEE_ERR", "退款金额无效")
    text = value if isinstance(value, str) else str(value)
    if not _AMOUNT_RE.match(text):
        raise business_error("ACQ.REASON_TRADE_REFUND_FEE_ERR", "退款金额无效")
    amount = Decimal(text)
    if not MIN_AMOUNT <= amount <= MAX_AMOUNT:
        raise business_error("ACQ.REASON_TRADE_REFUND_FEE_ERR", "退款金额无效")
    return amount


def parse_amount(value: Any, name: str) -> Decimal:
    if not isinstance(value, str) or not _AMOUNT_RE.match(value):
        raise invalid_parameter(f"{name} must be a decimal string with at most two decimals")
    try:
        amount = Decimal(value)
    except InvalidOperation as exc:  # pragma: no cover - the regex already checked
        raise invalid_parameter(f"{name} is not a number") from exc
    if not MIN_AMOUNT <= amount <= MAX_AMOUNT:
        raise invalid_parameter(f"{name} must be between 0.01 and 100000000")
    return amount


def parse_expiry(biz: dict[str, Any], now: datetime) -> datetime:
    """The trade's deadline from ``time_expire`` or ``timeout_express`` (default 15d)."""
    time_expire = biz.get("time_expire")
    if time_expire:
        try:
            local = datetime.strptime(str(time_expire), ALIPAY_TIME_FORMAT)
        except ValueError as exc:
            raise invalid_parameter("time_expire must be yyyy-MM-dd HH:mm:ss") from exc
        return local.replace(tzinfo=SHANGHAI).astimezone(UTC)
    express = biz.get("timeout_express")
    if express:
        match = _TIMEOUT_EXPRESS_RE.match(str(express))
        if not match:
            raise invalid_parameter("timeout_express must look like 90m, 2h or 1d")
        unit = {"m": "minutes", "h": "hours", "d": "days"}[match.group(2)]
        return now + timedelta(**{unit: int(match.group(1))})
    return now + DEFAULT_TIMEOUT


@dataclass
class NotifyAttempt:
    at: datetime
    status: int | None
    answer: str | None
    error: str | None
    ok: bool


@dataclass
class Refund:
    out_request_no: str
    refund_amount: Decimal
    gmt_refund: datetime
    answer: dict[str, str]
    refund_fee: Decimal = Decimal("0.00")  # the trade's total refunded once this one was made
    closed_trade: bool = False  # this refund took the trade to TRADE_CLOSED
    notify_id: str = ""
    notify_acknowledged: bool = False
    notify_attempts: list[NotifyAttempt] = field(default_factory=list)


@dataclass(frozen=True)
class RefundFault:
    """The test hook's fault: the trade's next refunds fail with ``code``."""

    code: str
    applied: bool = False  # SYSTEM_ERROR only: the refund is made, the answer is the error

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "applied": self.applied}


@dataclass
class Trade:
    out_trade_no: str
    trade_no: str
    app_id: str
    seller_id: str
    subject: str
    total_amount: Decimal
    notify_url: str | None
    return_url: str | None
    time_expire: datetime
    gmt_create: datetime
    status: str = WAIT_BUYER_PAY
    gmt_payment: datetime | None = None
    gmt_close: datetime | None = None
    close_reason: str | None = None
    refunds: dict[str, Refund] = field(default_factory=dict)
    notify_id: str | None = None
    notify_dropped: bool = False
    notify_acknowledged: bool = False
    notify_attempts: list[NotifyAttempt] = field(default_factory=list)
    refund_calls: int = 0  # refund API calls that moved money
    refund_fault: RefundFault | None = None

    @property
    def refunded_amount(self) -> Decimal:
        return sum((r.refund_amount for r in self.refunds.values()), Decimal("0.00"))

    def to_json(self) -> dict[str, Any]:
        def iso(moment: datetime | None) -> str | None:
            return moment.astimezone(UTC).isoformat().replace("+00:00", "Z") if moment else None

        def attempts(items: list[NotifyAttempt]) -> list[dict[str, Any]]:
            return [
                {"at": iso(a.at), "status": a.status, "answer": a.answer, "error": a.error,
                 "ok": a.ok}
                for a in items
            ]

        return {
            "out_trade_no": self.out_trade_no,
            "trade_no": self.trade_no,
            "app_id": self.app_id,
            "seller_id": self.seller_id,
            "subject": self.subject,
            "status": self.status,
            "total_amount": money(self.total_amount),
            "refunded_amount": money(self.refunded_amount),
            "time_expire": iso(self.time_expire),
            "gmt_create": iso(self.gmt_create),
            "gmt_payment": iso(self.gmt_payment),
            "gmt_close": iso(self.gmt_close),
            "close_reason": self.close_reason,
            "notify_url": self.notify_url,
            "return_url": self.return_url,
            "refunds": [
                {
                    "out_request_no": r.out_request_no,
                    "refund_amount": money(r.refund_amount),
                    "gmt_refund": iso(r.gmt_refund),
                }
                for r in self.refunds.values()
            ],
            "refund_calls": self.refund_calls,
            "refund_fault": self.refund_fault.to_json() if self.refund_fault else None,
            "notify_id": self.notify_id,
            "notify_dropped": self.notify_dropped,
            "notify_acknowledged": self.notify_acknowledged,
            "notify_attempts": attempts(self.notify_attempts),
            # The refund notifies (each its own notify_id), apart from the refunds
            # themselves so that a notify in flight leaves "refunds" unchanged.
            "refund_notifies": [
                {
                    "out_request_no": r.out_request_no,
                    "notify_id": r.notify_id,
                    "trade_status": TRADE_CLOSED if r.closed_trade else TRADE_SUCCESS,
                    "refund_fee": money(r.refund_fee),
                    "acknowledged": r.notify_acknowledged,
                    "attempts": attempts(r.notify_attempts),
                }
                for r in self.refunds.values()
            ],
        }


@dataclass(frozen=True)
class CashierView:
    """What the cashier page shows (a copy, taken under the lock)."""

    out_trade_no: str
    trade_no: str
    subject: str
    total_amount: str
    status: str
    time_expire: str
    close_reason: str | None


@dataclass(frozen=True)
class PaidTrade:
    """A copy of what the notifier and the return redirect need after a payment."""

    out_trade_no: str
    trade_no: str
    app_id: str
    seller_id: str
    subject: str
    total_amount: str
    notify_url: str | None
    return_url: str | None
    gmt_create: str
    gmt_payment: str
    notify_id: str


@dataclass(frozen=True)
class RefundNotice:
    """A copy of what the notifier needs for one refund's notify."""

    out_trade_no: str
    trade_no: str
    app_id: str
    seller_id: str
    subject: str
    total_amount: str
    notify_url: str | None
    gmt_create: str
    gmt_payment: str
    out_request_no: str
    refund_fee: str  # the trade's total refunded once this refund was made
    gmt_refund: str  # Alipay writes it with milliseconds: 2015-04-28 15:45:57.320
    closed_trade: bool
    notify_id: str


RefundListener = Callable[[str, str], None]


class PayRefused(Exception):
    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.status = status
        self.reason = reason
        self.detail = detail


class TradeBook:
    def __init__(self, clock: Clock = utc_now, refund_rule: str = REFUND_RULE_ALIPAY) -> None:
        if refund_rule not in REFUND_RULES:
            raise ValueError(f"refund rule must be one of {', '.join(REFUND_RULES)}: "
                             f"{refund_rule!r}")
        self._clock = clock
        self._lock = threading.Lock()
        self._trades: dict[str, Trade] = {}
        self._sequence = itertools.count(1)
        self.refund_rule = refund_rule
        self._refund_listener: RefundListener | None = None

    def on_refund(self, listener: RefundListener | None) -> None:
        """Call ``listener(out_trade_no, out_request_no)`` after each refund that
        moved money (outside the lock; the server sends the refund notify)."""
        self._refund_listener = listener

    # --- helpers (call with the lock held) ---------------------------------

    def _new_trade_no(self, now: datetime) -> str:
        # Alipay's trade_no is 28 digits: date, a channel part, a sequence.
        return f"{now.astimezone(SHANGHAI):%Y%m%d}22001400{next(self._sequence):012d}"

    def _refresh(self, trade: Trade, now: datetime) -> None:
        if trade.status == WAIT_BUYER_PAY and now >= trade.time_expire:
            trade.status = TRADE_CLOSED
            trade.gmt_close = trade.time_expire
            trade.close_reason = "EXPIRED"
            logger.info(
                "trade expired",
                extra={
                    "event": "trade_expired",
                    "out_trade_no": trade.out_trade_no,
                    "trade_no": trade.trade_no,
                },
            )

    def _find(self, biz: dict[str, Any], now: datetime) -> Trade:
        out_trade_no = biz.get("out_trade_no")
        trade_no = biz.get("trade_no")
        if not out_trade_no and not trade_no:
            raise invalid_parameter("out_trade_no or trade_no is required")
        trade: Trade | None = None
        if out_trade_no:
            trade = self._trades.get(str(out_trade_no))
        else:
            trade = next((t for t in self._trades.values() if t.trade_no == trade_no), None)
        if trade is None or (trade_no and trade.trade_no != trade_no):
            raise trade_not_exist()
        self._refresh(trade, now)
        return trade

    # --- the cashier ------------------------------------------------------

    def open_page_pay(
        self,
        app_id: str,
        seller_id: str,
        biz: dict[str, Any],
        notify_url: str | None,
        return_url: str | None,
    ) -> CashierView:
        """Create the trade on first open (idempotent for the same amount)."""
        now = self._clock()
        out_trade_no = biz.get("out_trade_no")
        if not isinstance(out_trade_no, str) or not _OUT_TRADE_NO_RE.match(out_trade_no):
            raise invalid_parameter("out_trade_no must be 1-64 letters, digits, _ or -")
        subject = biz.get("subject")
        if not isinstance(subject, str) or not subject.strip() or len(subject) > 256:
            raise invalid_parameter("subject is required (at most 256 characters)")
        if biz.get("product_code") != "FAST_INSTANT_TRADE_PAY":
            raise invalid_parameter("product_code must be FAST_INSTANT_TRADE_PAY")
        amount = parse_amount(biz.get("total_amount"), "total_amount")
        deadline = parse_expiry(biz, now)
        with self._lock:
            trade = self._trades.get(out_trade_no)
            if trade is None:
                trade = Trade(
                    out_trade_no=out_trade_no,
                    trade_no=self._new_trade_no(now),
                    app_id=app_id,
                    seller_id=str(biz.get("seller_id") or seller_id),
                    subject=subject,
                    total_amount=amount,
                    notify_url=notify_url,
                    return_url=return_url,
                    time_expire=deadline,
                    gmt_create=now,
                )
                self._trades[out_trade_no] = trade
                logger.info(
                    "trade created",
                    extra={
                        "event": "trade_created",
                        "out_trade_no": out_trade_no,
                        "trade_no": trade.trade_no,
                        "total_amount": money(amount),
                    },
                )
            elif trade.total_amount != amount:
                raise business_error(
                    "ACQ.CONTEXT_INCONSISTENT",
                    "交易信息被篡改: total_amount differs from the first request",
                )
            self._refresh(trade, now)
            return CashierView(
                out_trade_no=trade.out_trade_no,
                trade_no=trade.trade_no,
                subject=trade.subject,
                total_amount=money(trade.total_amount),
                status=trade.status,
                time_expire=alipay_time(trade.time_expire),
                close_reason=trade.close_reason,
            )

    def pay(self, out_trade_no: str, drop_notify: bool) -> PaidTrade:
        now = self._clock()
        with self._lock:
            trade = self._trades.get(out_trade_no)
            if trade is None:
                raise PayRefused(400, "ACQ.TRADE_NOT_EXIST", "no such trade")
            self._refresh(trade, now)
            if trade.status == TRADE_SUCCESS:
                raise PayRefused(409, "ACQ.TRADE_HAS_SUCCESS", "the trade is already paid")
            if trade.status != WAIT_BUYER_PAY:
                raise PayRefused(409, "TRADE_CLOSED", f"the trade is closed ({trade.close_reason})")
            trade.status = TRADE_SUCCESS
            trade.gmt_payment = now
            trade.notify_id = uuid.uuid4().hex
            trade.notify_dropped = drop_notify
            logger.info(
                "trade paid",
                extra={
                    "event": "trade_paid",
                    "out_trade_no": out_trade_no,
                    "trade_no": trade.trade_no,
                    "notify_id": trade.notify_id,
                    "total_amount": money(trade.total_amount),
                    "notify_dropped": drop_notify,
                },
            )
            return self._paid_view(trade)

    def _paid_view(self, trade: Trade) -> PaidTrade:
        assert trade.gmt_payment is not None and trade.notify_id is not None
        return PaidTrade(
            out_trade_no=trade.out_trade_no,
            trade_no=trade.trade_no,
            app_id=trade.app_id,
            seller_id=trade.seller_id,
            subject=trade.subject,
            total_amount=money(trade.total_amount),
            notify_url=trade.notify_url,
            return_url=trade.return_url,
            gmt_create=alipay_time(trade.gmt_create),
            gmt_payment=alipay_time(trade.gmt_payment),
            notify_id=trade.notify_id,
        )

    # --- the notifier's view ----------------------------------------------

    def paid_trade(self, out_trade_no: str) -> PaidTrade | None:
        with self._lock:
            trade = self._trades.get(out_trade_no)
            if trade is None or trade.gmt_payment is None:
                return None
            return self._paid_view(trade)

    def refund_notice(self, out_trade_no: str, out_request_no: str) -> RefundNotice | None:
        with self._lock:
            trade = self._trades.get(out_trade_no)
            refund = trade.refunds.get(out_request_no) if trade is not None else None
            if trade is None or refund is None or trade.gmt_payment is None:
                return None
            paid = asdict(self._paid_view(trade))
            del paid["return_url"], paid["notify_id"]  # the payment's, not the refund's
            return RefundNotice(
                **paid,
                out_request_no=refund.out_request_no,
                refund_fee=money(refund.refund_fee),
                gmt_refund=alipay_time_ms(refund.gmt_refund),
                closed_trade=refund.closed_trade,
                notify_id=refund.notify_id,
            )

    def notify_acknowledged(self, out_trade_no: str, out_request_no: str | None = None) -> bool:
        """Whether the payment notify (or the refund ``out_request_no``'s) was answered
        ``success``; True for what does not exist (nothing left to send)."""
        with self._lock:
            trade = self._trades.get(out_trade_no)
            if trade is None:
                return True
            if out_request_no is None:
                return trade.notify_acknowledged
            refund = trade.refunds.get(out_request_no)
            return refund is None or refund.notify_acknowledged

    def record_notify(
        self, out_trade_no: str, attempt: NotifyAttempt, out_request_no: str | None = None
    ) -> None:
        with self._lock:
            trade = self._trades[out_trade_no]
            target: Trade | Refund = (
                trade if out_request_no is None else trade.refunds[out_request_no]
            )
            target.notify_attempts.append(attempt)
            if attempt.ok:
                target.notify_acknowledged = True

    # --- server APIs (each returns the ..._response object for code 10000) --

    def query(self, biz: dict[str, Any]) -> dict[str, str]:
        now = self._clock()
        with self._lock:
            trade = self._find(biz, now)
            paid = trade.gmt_payment is not None
            answer = {
                "code": "10000",
                "msg": "Success",
                "trade_no": trade.trade_no,
                "out_trade_no": trade.out_trade_no,
                "buyer_logon_id": "sandbox***@example.com",
                "trade_status": trade.status,
                "total_amount": money(trade.total_amount),
                "buyer_pay_amount": money(trade.total_amount) if paid else "0.00",
                "receipt_amount": money(trade.total_amount) if paid else "0.00",
                "invoice_amount": money(trade.total_amount) if paid else "0.00",
                "point_amount": "0.00",
                "buyer_user_id": LOCAL_BUYER_ID,
            }
            if trade.gmt_payment is not None:
                answer["send_pay_date"] = alipay_time(trade.gmt_payment)
            return answer

    def close(self, biz: dict[str, Any]) -> dict[str, str]:
        now = self._clock()
        with self._lock:
            trade = self._find(biz, now)
            if trade.status != WAIT_BUYER_PAY:
                # Alipay: only a trade waiting for the buyer can be closed.
                raise business_error("ACQ.TRADE_STATUS_ERROR", "交易状态不合法")
            trade.status = TRADE_CLOSED
            trade.gmt_close = now
            trade.close_reason = "CLOSED_BY_MERCHANT"
            logger.info(
                "trade closed",
                extra={
                    "event": "trade_closed",
                    "out_trade_no": trade.out_trade_no,
                    "trade_no": trade.trade_no,
                },
            )
            return {
                "code": "10000",
                "msg": "Success",
                "trade_no": trade.trade_no,
                "out_trade_no": trade.out_trade_no,
            }

    def refund(self, biz: dict[str, Any]) -> dict[str, str]:
        """alipay.trade.refund (the rules and faults: see the module's docstring)."""
        now = self._clock()
        amount = parse_refund_amount(biz.get("refund_amount"))
        made: tuple[str, str] | None = None
        failure: ApiError | None = None
        answer: dict[str, str] = {}
        with self._lock:
            trade = self._find(biz, now)
            fault = trade.refund_fault
            request_no = str(biz.get("out_request_no") or trade.out_trade_no)
            if fault is not None and fault.code == SYSTEM_ERROR and not fault.applied:
                failure = system_error()
            else:
                try:
                    answer = self._refund(trade, request_no, amount, now, fault)
                    if answer.get("fund_change") == "Y":
                        made = (trade.out_trade_no, request_no)
                except ApiError as exc:
                    failure = exc
                if fault is not None and fault.code == SYSTEM_ERROR:  # applied: done, yet
                    failure = system_error()
            if failure is not None:
                logger.info(
                    "refund refused",
                    extra={
                        "event": "refund_refused",
                        "out_trade_no": trade.out_trade_no,
                        "trade_no": trade.trade_no,
                        "out_request_no": request_no,
                        "refund_amount": money(amount),
                        "code": failure.code,
                        "sub_code": failure.sub_code,
                        "fault": fault.code if fault else None,
                        "moved": made is not None,
                    },
                )
        listener = self._refund_listener
        if made is not None and listener is not None:
            listener(*made)
        if failure is not None:
            raise failure
        return answer

    def _refund(
        self,
        trade: Trade,
        request_no: str,
        amount: Decimal,
        now: datetime,
        fault: RefundFault | None,
    ) -> dict[str, str]:
        """One refund call, with the lock held: the answer, or raises ApiError."""
        earlier = trade.refunds.get(request_no)
        if earlier is not None:
            if earlier.refund_amount != amount:
                raise business_error("ACQ.DISCORDANT_REPEAT_REQUEST", "不一致的请求")
            logger.info(
                "refund repeated",
                extra={
                    "event": "refund_repeated",
                    "out_trade_no": trade.out_trade_no,
                    "trade_no": trade.trade_no,
                    "out_request_no": request_no,
                },
            )
            return {**earlier.answer, "fund_change": "N"}
        if trade.gmt_payment is None:
            raise business_error("ACQ.TRADE_STATUS_ERROR", "交易状态不合法")
        if self.refund_rule == REFUND_RULE_SANDBOX and amount != trade.total_amount:
            raise business_error(
                "ACQ.REFUND_AMT_NOT_EQUAL_TOTAL", "撤销或退款金额与订单金额不一致"
            )
        if amount > trade.total_amount - trade.refunded_amount:
            raise business_error("ACQ.REFUND_AMT_NOT_EQUAL_TOTAL", "退款金额超限")
        if fault is not None and fault.code == SELLER_BALANCE_NOT_ENOUGH:
            raise business_error(SELLER_BALANCE_NOT_ENOUGH, "卖家余额不足")
        refund = Refund(
            out_request_no=request_no,
            refund_amount=amount,
            gmt_refund=now,
            answer={},
            notify_id=uuid.uuid4().hex,
        )
        trade.refunds[request_no] = refund
        trade.refund_calls += 1
        refund.refund_fee = trade.refunded_amount
        if trade.refunded_amount == trade.total_amount:
            trade.status = TRADE_CLOSED
            trade.gmt_close = now
            trade.close_reason = "REFUNDED_IN_FULL"
            refund.closed_trade = True
        refund.answer = {
            "code": "10000",
            "msg": "Success",
            "trade_no": trade.trade_no,
            "out_trade_no": trade.out_trade_no,
            "buyer_logon_id": "sandbox***@example.com",
            "fund_change": "Y",
            "refund_fee": money(refund.refund_fee),
            "gmt_refund_pay": alipay_time(now),
            "buyer_user_id": LOCAL_BUYER_ID,
        }
        logger.info(
            "refunded",
            extra={
                "event": "refunded",
                "out_trade_no": trade.out_trade_no,
                "trade_no": trade.trade_no,
                "out_request_no": request_no,
                "refund_amount": money(amount),
                "refund_fee": money(refund.refund_fee),
                "status": trade.status,
            },
        )
        return dict(refund.answer)

    def refund_query(self, biz: dict[str, Any]) -> dict[str, str]:
        """alipay.trade.fastpay.refund.query: the refund's fields when it was made;
        only code and msg when it was not (Alipay: no refund fields, no refund)."""
        now = self._clock()
        request_no = biz.get("out_request_no")
        if not request_no:
            raise invalid_parameter("out_request_no is required")
        with self._lock:
            trade = self._find(biz, now)
            refund = trade.refunds.get(str(request_no))
            if refund is None:
                return {"code": "10000", "msg": "Success"}
            return {
                "code": "10000",
                "msg": "Success",
                "trade_no": trade.trade_no,
                "out_trade_no": trade.out_trade_no,
                "out_request_no": refund.out_request_no,
                "total_amount": money(trade.total_amount),
                "refund_amount": money(refund.refund_amount),
                "refund_status": "REFUND_SUCCESS",
                "gmt_refund_pay": alipay_time(refund.gmt_refund),
            }

    # --- test hooks -------------------------------------------------------

    def set_refund_fault(self, out_trade_no: str, fault: RefundFault | None) -> bool:
        """Set (or clear, with None) the trade's refund fault; False: no such trade."""
        with self._lock:
            trade = self._trades.get(out_trade_no)
            if trade is None:
                return False
            trade.refund_fault = fault
            logger.info(
                "refund fault set" if fault else "refund fault cleared",
                extra={
                    "event": "refund_fault",
                    "out_trade_no": out_trade_no,
                    "trade_no": trade.trade_no,
                    "fault": fault.to_json() if fault else None,
                },
            )
            return True

    # --- inspection -------------------------------------------------------

    def snapshot(self, out_trade_no: str) -> dict[str, Any] | None:
        now = self._clock()
        with self._lock:
            trade = self._trades.get(out_trade_no)
            if trade is None:
                return None
            self._refresh(trade, now)
            return trade.to_json()

    def bill_records(self, day: date) -> list[BillRecord]:
        """The rows of ``day``'s trade bill (Asia/Shanghai): each payment on its
        gmt_payment's day, each refund on its gmt_refund's day, in time order."""
        with self._lock:
            rows: list[BillRecord] = []
            for t in self._trades.values():
                if t.gmt_payment is not None and t.gmt_payment.astimezone(SHANGHAI).date() == day:
                    rows.append(BillRecord(PAYMENT_ROW, t.trade_no, t.out_trade_no, t.subject,
                                           t.total_amount, t.gmt_create, t.gmt_payment))
                for r in t.refunds.values():
                    if r.gmt_refund.astimezone(SHANGHAI).date() == day:
                        rows.append(BillRecord(REFUND_ROW, t.trade_no, t.out_trade_no,
                                               t.subject, r.refund_amount, t.gmt_create,
                                               r.gmt_refund, out_request_no=r.out_request_no))
        return sorted(rows, key=lambda row: row.finished)

    def snapshot_all(self) -> list[dict[str, Any]]:
        now = self._clock()
        with self._lock:
            for trade in self._trades.values():
                self._refresh(trade, now)
            return [t.to_json() for t in self._trades.values()]
