"""Alipay's async notify: a signed form POST to the merchant's notify_url, sent
again on Alipay's schedule until the answer body is exactly ``success``.

Two kinds go out: the payment's (one per trade) and one per refund that moved
money (to the same notify_url: trade_status TRADE_SUCCESS, or TRADE_CLOSED
after a full refund, with ``refund_fee``, ``gmt_refund`` and ``out_biz_no``).
Each has its own ``notify_id``, the same on every retry of it."""

from __future__ import annotations

import logging
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence

from cryptography.hazmat.primitives.asymmetric import rsa

from .constants import LOCAL_BUYER_ID
from .signer import alipay_time, sign_params
from .trades import (
    TRADE_CLOSED,
    TRADE_SUCCESS,
    Clock,
    NotifyAttempt,
    PaidTrade,
    RefundNotice,
    TradeBook,
)

logger = logging.getLogger(__name__)

MAX_ANSWER_BYTES = 4096


def _trade_fields(trade: PaidTrade | RefundNotice, notify_time: str) -> dict[str, str]:
    """The fields every trade_status_sync notify of a paid trade carries."""
    return {
        "notify_time": notify_time,
        "notify_type": "trade_status_sync",
        "notify_id": trade.notify_id,
        "app_id": trade.app_id,
        "charset": "utf-8",
        "version": "1.0",
        "trade_no": trade.trade_no,
        "out_trade_no": trade.out_trade_no,
        "buyer_id": LOCAL_BUYER_ID,
        "seller_id": trade.seller_id,
        "trade_status": TRADE_SUCCESS,
        "total_amount": trade.total_amount,
        "receipt_amount": trade.total_amount,
        "buyer_pay_amount": trade.total_amount,
        "gmt_create": trade.gmt_create,
        "gmt_payment": trade.gmt_payment,
        "subject": trade.subject,
    }


def notify_params(paid: PaidTrade, notify_time: str, key: rsa.RSAPrivateKey) -> dict[str, str]:
    """The signed fields of a trade_status_sync notify (the sign covers all but
    ``sign`` and ``sign_type``)."""
    return sign_params(_trade_fields(paid, notify_time), key)


def refund_notify_params(
    refund: RefundNotice, notify_time: str, key: rsa.RSAPrivateKey
) -> dict[str, str]:
    """The signed fields of a refund's trade_status_sync notify: the trade's fields
    with ``refund_fee`` (the trade's total refunded once this refund was made),
    ``gmt_refund`` and ``out_biz_no`` (the refund's out_request_no)."""
    fields = {
        **_trade_fields(refund, notify_time),
        "out_biz_no": refund.out_request_no,
        "trade_status": TRADE_CLOSED if refund.closed_trade else TRADE_SUCCESS,
        "refund_fee": refund.refund_fee,
        "gmt_refund": refund.gmt_refund,
    }
    if refund.closed_trade:
        fields["gmt_close"] = refund.gmt_refund.partition(".")[0]
    return sign_params(fields, key)


NoticeKey = tuple[str, str | None]  # (out_trade_no, out_request_no or None for the payment)


class Notifier:
    def __init__(
        self,
        book: TradeBook,
        key: rsa.RSAPrivateKey,
        schedule: Sequence[float],
        clock: Clock,
        timeout: float = 5.0,
        first_delay: Callable[[], float] = lambda: 0.0,
    ) -> None:
        """`first_delay`: how long each notify's first attempt waits (a slow Alipay)."""
        self._first_delay = first_delay
        self._book = book
        self._key = key
        self._schedule = tuple(schedule)
        self._clock = clock
        self._timeout = timeout
        self._stop = threading.Event()
        self._threads_lock = threading.Lock()
        self._threads: dict[NoticeKey, threading.Thread] = {}

    @property
    def schedule(self) -> tuple[float, ...]:
        return self._schedule

    def start(self, out_trade_no: str, out_request_no: str | None = None) -> None:
        """Send the payment's notify (or the refund ``out_request_no``'s) now in the
        background, then again on the schedule until ``success``."""
        key: NoticeKey = (out_trade_no, out_request_no)
        name = f"notify-{out_trade_no}" + (f"-{out_request_no}" if out_request_no else "")
        thread = threading.Thread(target=self._run, args=(key,), name=name, daemon=True)
        with self._threads_lock:
            self._threads[key] = thread
        thread.start()

    def _run(self, key: NoticeKey) -> None:
        try:
            self._attempts(key)
        finally:
            with self._threads_lock:
                self._threads.pop(key, None)

    def _attempts(self, key: NoticeKey) -> None:
        out_trade_no, out_request_no = key
        for attempt, delay in enumerate((self._first_delay(), *self._schedule), start=1):
            if self._stop.wait(delay):
                return
            if self._book.notify_acknowledged(out_trade_no, out_request_no):
                return
            if self.send_once(out_trade_no, out_request_no).ok:
                return
            logger.info(
                "notify not acknowledged",
                extra={
                    "event": "notify_retry_pending",
                    "out_trade_no": out_trade_no,
                    "out_request_no": out_request_no,
                    "attempt": attempt,
                },
            )
        logger.warning(
            "notify given up after the whole schedule",
            extra={
                "event": "notify_given_up",
                "out_trade_no": out_trade_no,
                "out_request_no": out_request_no,
            },
        )

    def send_once(self, out_trade_no: str, out_request_no: str | None = None) -> NotifyAttempt:
        """One notify now (also the test hook's resend); records the attempt. KeyError:
        no such paid trade (or no such refund of it)."""
        now = self._clock()
        notice: PaidTrade | RefundNotice | None
        if out_request_no is None:
            notice = self._book.paid_trade(out_trade_no)
        else:
            notice = self._book.refund_notice(out_trade_no, out_request_no)
        if notice is None:
            raise KeyError(out_trade_no if out_request_no is None else out_request_no)
        if not notice.notify_url:
            attempt = NotifyAttempt(now, None, None, "no notify_url", False)
            self._book.record_notify(out_trade_no, attempt, out_request_no)
            return attempt
        if isinstance(notice, RefundNotice):
            params = refund_notify_params(notice, alipay_time(now), self._key)
        else:
            params = notify_params(notice, alipay_time(now), self._key)
        request = urllib.request.Request(
            notice.notify_url,
            data=urllib.parse.urlencode(params).encode("utf-8"),
            headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"},
            method="POST",
        )
        status: int | None = None
        answer: str | None = None
        error: str | None = None
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                status = response.status
                answer = response.read(MAX_ANSWER_BYTES).decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            status = exc.code
            answer = exc.read(MAX_ANSWER_BYTES).decode("utf-8", "replace")
        except (OSError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        ok = status == 200 and answer == "success"
        attempt = NotifyAttempt(now, status, answer, error, ok)
        self._book.record_notify(out_trade_no, attempt, out_request_no)
        logger.info(
            "notify sent",
            extra={
                "event": "notify_sent",
                "out_trade_no": notice.out_trade_no,
                "trade_no": notice.trade_no,
                "notify_id": notice.notify_id,
                "out_request_no": out_request_no,
                "trade_status": params["trade_status"],
                "http_status": status,
                "answer": answer,
                "error": error,
                "acknowledged": ok,
            },
        )
        return attempt

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._threads_lock:
            threads = list(self._threads.values())
        for thread in threads:
            thread.join(timeout)
