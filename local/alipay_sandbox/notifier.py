"""Alipay's async notify: a signed form POST to the merchant's notify_url, sent
again on Alipay's schedule until the answer body is exactly ``success``."""

from __future__ import annotations

import logging
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence

from cryptography.hazmat.primitives.asymmetric import rsa

from .constants import LOCAL_BUYER_ID
from .signer import alipay_time, sign_params
from .trades import Clock, NotifyAttempt, PaidTrade, TradeBook

logger = logging.getLogger(__name__)

MAX_ANSWER_BYTES = 4096


def notify_params(paid: PaidTrade, notify_time: str, key: rsa.RSAPrivateKey) -> dict[str, str]:
    """The signed fields of a trade_status_sync notify (the sign covers all but
    ``sign`` and ``sign_type``)."""
    fields = {
        "notify_time": notify_time,
        "notify_type": "trade_status_sync",
        "notify_id": paid.notify_id,
        "app_id": paid.app_id,
        "charset": "utf-8",
        "version": "1.0",
        "trade_no": paid.trade_no,
        "out_trade_no": paid.out_trade_no,
        "buyer_id": LOCAL_BUYER_ID,
        "seller_id": paid.seller_id,
        "trade_status": "TRADE_SUCCESS",
        "total_amount": paid.total_amount,
        "receipt_amount": paid.total_amount,
        "buyer_pay_amount": paid.total_amount,
        "gmt_create": paid.gmt_create,
        "gmt_payment": paid.gmt_payment,
        "subject": paid.subject,
    }
    return sign_params(fields, key)


class Notifier:
    def __init__(
        self,
        book: TradeBook,
        key: rsa.RSAPrivateKey,
        schedule: Sequence[float],
        clock: Clock,
        timeout: float = 5.0,
    ) -> None:
        self._book = book
        self._key = key
        self._schedule = tuple(schedule)
        self._clock = clock
        self._timeout = timeout
        self._stop = threading.Event()
        self._threads_lock = threading.Lock()
        self._threads: dict[str, threading.Thread] = {}

    @property
    def schedule(self) -> tuple[float, ...]:
        return self._schedule

    def start(self, out_trade_no: str) -> None:
        """Send now in the background, then again on the schedule until ``success``."""
        thread = threading.Thread(
            target=self._run, args=(out_trade_no,), name=f"notify-{out_trade_no}", daemon=True
        )
        with self._threads_lock:
            self._threads[out_trade_no] = thread
        thread.start()

    def _run(self, out_trade_no: str) -> None:
        try:
            self._attempts(out_trade_no)
        finally:
            with self._threads_lock:
                self._threads.pop(out_trade_no, None)

    def _attempts(self, out_trade_no: str) -> None:
        for attempt, delay in enumerate((0.0, *self._schedule), start=1):
            if self._stop.wait(delay):
                return
            if self._book.notify_acknowledged(out_trade_no):
                return
            if self.send_once(out_trade_no).ok:
                return
            logger.info(
                "notify not acknowledged",
                extra={
                    "event": "notify_retry_pending",
                    "out_trade_no": out_trade_no,
                    "attempt": attempt,
                },
            )
        logger.warning(
            "notify given up after the whole schedule",
            extra={"event": "notify_given_up", "out_trade_no": out_trade_no},
        )

    def send_once(self, out_trade_no: str) -> NotifyAttempt:
        """One notify now (also the test hook's resend); records the attempt."""
        paid = self._book.paid_trade(out_trade_no)
        if paid is None:
            raise KeyError(out_trade_no)
        now = self._clock()
        if not paid.notify_url:
            attempt = NotifyAttempt(now, None, None, "no notify_url", False)
            self._book.record_notify(out_trade_no, attempt)
            return attempt
        params = notify_params(paid, alipay_time(now), self._key)
        request = urllib.request.Request(
            paid.notify_url,
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
        self._book.record_notify(out_trade_no, attempt)
        logger.info(
            "notify sent",
            extra={
                "event": "notify_sent",
                "out_trade_no": paid.out_trade_no,
                "trade_no": paid.trade_no,
                "notify_id": paid.notify_id,
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
