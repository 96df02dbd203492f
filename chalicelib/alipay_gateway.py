"""python-alipay-sdk wrapped: the only module of the project that imports ``alipay``.

What callers get:

- ``AlipayGateway.page_pay_url`` signs a page-pay request (no network).
- ``AlipayGateway.verify`` checks Alipay's RSA2 signature on an async notify or a
  return query; it never raises.
- ``query``, ``close``, ``refund`` and ``refund_query`` call Alipay's server APIs.
  A signed answer with a code other than ``10000`` raises ``AlipayBusinessError``
  (a ``PaymentRefused`` whose ``reason`` is Alipay's sub_code and ``detail`` its
  words; ``TradeNotExist`` / ``TradeStatusError`` for the two sub codes handlers
  act on). Anything that leaves the outcome unknown (network error, timeout,
  HTTP error, an answer that does not parse, whose signature is wrong or that
  is not signed at all, Alipay's ``20000`` "Service Currently Unavailable" or
  ``ACQ.SYSTEM_ERROR``) raises ``AlipayUnavailable``: try again later, with the
  same ``out_request_no`` for a refund, or ask ``query_refund``. An unsigned
  answer is never read as a business fact, whatever code it claims: anyone on
  the path could have written it.
- ``read_notice`` tells a refund's notify (it carries ``refund_fee``,
  ``out_biz_no`` or ``gmt_refund``) from a payment's.

Money is ``Decimal`` and goes over the wire as a string with two decimals; times
go over the wire as ``yyyy-MM-dd HH:mm:ss`` in Asia/Shanghai.

SDK facts this module relies on (python-alipay-sdk 3.4.0): ``AliPay.verify``
mutates its dict and pops ``sign_type``; business errors come back as dicts;
the gateway is the private attribute ``_gateway``; server calls are a GET of
``gateway?signed-query`` through ``urllib`` and the answer is verified over the
raw text of its ``..._response`` object; an answer without ``sign`` (or an
``error_response``) raises ``AliPayException``, which hides its text in
name-mangled attributes.

Alipay facts: ``gmt_refund`` in a refund notify carries milliseconds
(``2015-04-28 15:45:57.320``); the gateway reports a failing back end as code
``20000`` with sub_code ``isp.unknow-error`` or ``aop.ACQ.SYSTEM_ERROR``, and
the refund API's docs list ``ACQ.SYSTEM_ERROR`` (code 40004) too: all three
mean "unknown, retry the same request or query".
"""

from __future__ import annotations

import base64
import binascii
import http.client
import json
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone, tzinfo
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import IO, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import alipay
from alipay.exceptions import AliPayException, AliPayValidationError
from alipay.utils import AliPayConfig
from Cryptodome.PublicKey import RSA
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from chalicelib.config import ALIPAY_TIMEOUT_SECONDS
from chalicelib.domain import parse_amount, to_fen
from chalicelib.ports import (
    NoticeKind,
    NoticeRefused,
    PaymentError,
    PaymentNotice,
    PaymentRefused,
    PaymentUnavailable,
    RefundOutcome,
    RefundState,
    Trade,
    TradeNotFound,
    TradeState,
    TradeStateConflict,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ALIPAY_TIME_FORMAT",
    "AlipayBusinessError",
    "AlipayError",
    "AlipayGateway",
    "AlipayUnavailable",
    "RefundResult",
    "TRADE_NOT_EXIST",
    "TRADE_STATUS_ERROR",
    "TradeNotExist",
    "TradeQuery",
    "TradeStatusError",
    "format_alipay_time",
    "format_amount",
    "load_key",
    "parse_alipay_time",
]

SUCCESS_CODE = "10000"
UNAVAILABLE_CODE = "20000"  # "Service Currently Unavailable": the outcome is unknown
TRADE_NOT_EXIST = "ACQ.TRADE_NOT_EXIST"
BILL_METHOD = "alipay.data.dataservice.bill.downloadurl.query"
BILL_NOT_EXIST = "isp.bill_not_exist"  # no bill of that day: no trade (or not made yet)
BILL_MAX_BYTES = 512 * 1024 * 1024  # a day of a big shop is tens of MB zipped
BILL_CHUNK_BYTES = 64 * 1024
TRADE_STATUS_ERROR = "ACQ.TRADE_STATUS_ERROR"
SYSTEM_ERROR = "ACQ.SYSTEM_ERROR"  # Alipay: retry (refunds with the same out_request_no)
# Sub codes that leave the outcome unknown, whatever the code beside them.
UNKNOWN_OUTCOME_SUB_CODES = frozenset({SYSTEM_ERROR, "aop." + SYSTEM_ERROR, "isp.unknow-error"})
REFUND_SUCCESS = "REFUND_SUCCESS"
# A notify with any of these is about a refund of the trade, never a payment.
REFUND_NOTICE_FIELDS = ("refund_fee", "out_biz_no", "gmt_refund")
ALIPAY_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
_CENT = Decimal("0.01")


def _shanghai() -> tzinfo:
    try:
        return ZoneInfo("Asia/Shanghai")
    except ZoneInfoNotFoundError:  # no tz database: China has had no DST since 1991
        return timezone(timedelta(hours=8), "CST")


SHANGHAI = _shanghai()


# --- errors ---------------------------------------------------------------


class AlipayError(PaymentError):
    """Base of every error this module raises."""


class AlipayUnavailable(AlipayError, PaymentUnavailable):
    """The outcome is unknown (network, timeout, HTTP error, bad or unsigned answer).

    Retry later; nothing can be concluded about the trade. ``code`` and
    ``sub_code`` are what the answer claimed, if anything (for logs only).
    """

    def __init__(
        self, message: str, *, code: str | None = None, sub_code: str | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.sub_code = sub_code


class AlipayBusinessError(AlipayError, PaymentRefused):
    """Alipay answered (signed) with a code other than 10000, e.g. 40004.

    As the port's PaymentRefused: ``reason`` is Alipay's sub_code (the code when
    there is none), e.g. "ACQ.SELLER_BALANCE_NOT_ENOUGH"; ``detail`` its sub_msg,
    else its msg.
    """

    def __init__(
        self,
        code: str,
        sub_code: str | None,
        msg: str,
        sub_msg: str | None = None,
        method: str | None = None,
    ) -> None:
        super().__init__(
            f"{method or 'alipay'}: {code} {msg} {sub_code or ''} {sub_msg or ''}".rstrip()
        )
        self.code = code
        self.sub_code = sub_code
        self.msg = msg
        self.sub_msg = sub_msg
        self.method = method
        self.reason = sub_code or code
        self.detail = sub_msg or msg

    @property
    def is_trade_not_exist(self) -> bool:
        return self.sub_code == TRADE_NOT_EXIST

    @property
    def is_trade_status_error(self) -> bool:
        return self.sub_code == TRADE_STATUS_ERROR


class TradeNotExist(AlipayBusinessError, TradeNotFound):
    """40004 ACQ.TRADE_NOT_EXIST: Alipay has no such trade (never opened, or unknown)."""


class TradeStatusError(AlipayBusinessError, TradeStateConflict):
    """40004 ACQ.TRADE_STATUS_ERROR: the trade's state forbids it (e.g. closing a paid trade)."""


def _business_error(answer: Mapping[str, Any], method: str) -> AlipayBusinessError:
    code = str(answer.get("code", ""))
    sub_code = answer.get("sub_code")
    sub_code = str(sub_code) if sub_code is not None else None
    kind: type[AlipayBusinessError] = {
        TRADE_NOT_EXIST: TradeNotExist,
        TRADE_STATUS_ERROR: TradeStatusError,
    }.get(sub_code or "", AlipayBusinessError)
    sub_msg = answer.get("sub_msg")
    return kind(
        code,
        sub_code,
        str(answer.get("msg", "")),
        str(sub_msg) if sub_msg is not None else None,
        method,
    )


# --- results --------------------------------------------------------------


@dataclass(frozen=True)
class TradeQuery:
    out_trade_no: str
    trade_no: str | None
    trade_status: str  # WAIT_BUYER_PAY, TRADE_SUCCESS, TRADE_CLOSED or TRADE_FINISHED
    total_amount: Decimal
    pay_time: str | None  # Alipay's send_pay_date, Asia/Shanghai; see parse_alipay_time

    @property
    def paid(self) -> bool:
        return self.trade_status in ("TRADE_SUCCESS", "TRADE_FINISHED")


@dataclass(frozen=True)
class RefundResult:
    out_trade_no: str
    trade_no: str
    refund_fee: Decimal  # the trade's total refunded so far, as Alipay reports it
    fund_change: bool  # False on a repeated out_request_no: the refund happened before


# --- helpers --------------------------------------------------------------


def format_amount(amount: Decimal) -> str:
    """``Decimal("59.9")`` -> ``"59.90"``. Floats are refused, as are fractions of a cent."""
    if isinstance(amount, bool) or not isinstance(amount, Decimal | int):
        raise TypeError(f"money must be a Decimal, not {type(amount).__name__}")
    value = Decimal(amount)
    if not value.is_finite() or value <= 0:
        raise ValueError(f"amount must be positive: {amount}")
    if value != value.quantize(_CENT):
        raise ValueError(f"amount has a fraction of a cent: {amount}")
    return f"{value.quantize(_CENT):f}"


def format_alipay_time(moment: datetime) -> str:
    """An aware datetime as Alipay's ``yyyy-MM-dd HH:mm:ss`` in Asia/Shanghai."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("an aware datetime is required (naive times are ambiguous)")
    return moment.astimezone(SHANGHAI).strftime(ALIPAY_TIME_FORMAT)


def parse_alipay_time(value: str) -> datetime:
    """Alipay's ``yyyy-MM-dd HH:mm:ss`` (Asia/Shanghai) as an aware UTC datetime."""
    local = datetime.strptime(value, ALIPAY_TIME_FORMAT)
    return local.replace(tzinfo=SHANGHAI).astimezone(UTC)


def _content_length(text: str | None) -> int | None:
    """The Content-Length header as a count; None when absent or not a count."""
    value = (text or "").strip()
    if not (value.isascii() and value.isdigit()):
        return None
    return int(value)


def _alipay_time_or_none(text: str | None) -> datetime | None:
    """Alipay's clock as aware UTC; None when absent or malformed. Milliseconds
    (``2015-04-28 15:45:57.320``, as in ``gmt_refund``) are kept."""
    if not text:
        return None
    whole, dot, fraction = text.partition(".")
    try:
        moment = parse_alipay_time(whole)
    except ValueError:
        return None
    if dot:
        if not (fraction.isdigit() and fraction.isascii() and len(fraction) <= 6):
            return None
        moment = moment.replace(microsecond=int(fraction.ljust(6, "0")))
    return moment


def _amount_or_none(text: str | None) -> int | None:
    """A wire amount ("59.90") in fen; None when absent or malformed."""
    return parse_amount(text) if isinstance(text, str) and text else None


# Alipay's trade_status -> the shop's TradeState.
TRADE_STATES = {
    "WAIT_BUYER_PAY": TradeState.WAITING,
    "TRADE_SUCCESS": TradeState.PAID,
    "TRADE_FINISHED": TradeState.FINISHED,
    "TRADE_CLOSED": TradeState.CLOSED,
}


def load_key(value_or_path: str | os.PathLike[str]) -> str:
    """PEM text from a PEM string, a path to a PEM file, or bare base64 DER.

    Alipay's console hands out keys as bare base64; the SDK needs PEM headers,
    so bare base64 is re-exported as PEM. A PEM whose newlines were written as
    ``\\n`` (one env var line) is unfolded. The key itself is never logged.
    """
    if isinstance(value_or_path, os.PathLike):
        return load_key(Path(value_or_path).read_text(encoding="utf-8"))
    text = value_or_path.strip()
    if not text:
        raise ValueError("empty key")
    if "-----BEGIN" in text:
        if "\n" not in text and "\\n" in text:  # a PEM squeezed into one env var line
            text = text.replace("\\n", "\n")
        return text + "\n"
    if "\n" not in text and len(text) < 4096:
        path = Path(text).expanduser()
        try:  # bare base64 is no path: a run of 256 characters without "/" is ENAMETOOLONG
            is_file = path.is_file()
        except OSError:
            is_file = False
        if is_file:
            return load_key(path.read_text(encoding="utf-8"))
    try:
        der = base64.b64decode("".join(text.split()), validate=True)
        key = RSA.import_key(der)
    except (binascii.Error, ValueError, IndexError, TypeError):
        raise ValueError("not a PEM key, a path to a PEM file, or base64 DER") from None
    return key.export_key("PEM").decode("ascii") + "\n"


# --- the gateway ----------------------------------------------------------


class Rsa2Verifier:
    """``AliPay._verify(raw_content, signature)`` with `cryptography`: SHA256withRSA,
    PKCS#1 v1.5, the signature base64 as the SDK reads it (``base64.decodebytes``,
    which skips characters outside the alphabet and raises on bad padding, as
    the SDK's own does). True or False; a bad encoding raises as the SDK's does.
    tests/unit/test_alipay_gateway.py holds it to the SDK's answer input by input."""

    def __init__(self, public_key_pem: str) -> None:
        key = serialization.load_pem_public_key(public_key_pem.encode())
        if not isinstance(key, rsa.RSAPublicKey):
            raise ValueError("Alipay's public key is not an RSA key")
        self._key = key

    def __call__(self, raw_content: str, signature: str) -> bool:
        sig = base64.decodebytes(signature.encode())
        try:
            self._key.verify(sig, raw_content.encode(), padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            return False
        return True


class Rsa2Signer:
    """``AliPay._sign(unsigned_string)`` with `cryptography`: SHA256withRSA, PKCS#1
    v1.5 (deterministic, so byte for byte the SDK's signature), base64 on one line
    as the SDK writes it. Every request the worker and the API send is signed:
    pycryptodome's private-key operation costs several times OpenSSL's.
    tests/unit/test_alipay_gateway.py holds it to the SDK's output."""

    def __init__(self, private_key_pem: str) -> None:
        key = serialization.load_pem_private_key(private_key_pem.encode(), password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError("the app's private key is not an RSA key")
        self._key = key

    def __call__(self, unsigned_string: str) -> str:
        signature = self._key.sign(unsigned_string.encode(), padding.PKCS1v15(), hashes.SHA256())
        return base64.b64encode(signature).decode()


class AlipayGateway:
    """Alipay for the merchant: page pay, signature checks and the trade APIs.

    `timeout` (seconds) bounds each server call's connect, and then its wait for
    the answer (and each read of a bill's download): a call waits at most twice it.
    deps.py gives the API and the sweeper config.ALIPAY_SHORT_TIMEOUT_SECONDS (a
    cancel's query and close fit API Gateway's 29 s); the worker and the
    reconciler keep ALIPAY_TIMEOUT_SECONDS."""

    def __init__(
        self,
        app_id: str,
        seller_id: str,
        gateway_url: str,
        app_private_key_pem: str,
        alipay_public_key_pem: str,
        notify_url: str | None,
        return_url: str | None,
        timeout: float = ALIPAY_TIMEOUT_SECONDS,
    ) -> None:
        self.app_id = app_id
        self.seller_id = seller_id
        self.gateway_url = gateway_url
        self.notify_url = notify_url or None
        self.return_url = return_url or None
        self.timeout = timeout
        try:
            client = alipay.AliPay(
                appid=app_id,
                app_notify_url=None,
                app_private_key_string=load_key(app_private_key_pem),
                alipay_public_key_string=load_key(alipay_public_key_pem),
                sign_type="RSA2",
                config=AliPayConfig(timeout=timeout),
            )
        except (ValueError, IndexError, TypeError) as exc:
            # Never echo the key material into logs or tracebacks.
            raise ValueError(f"Alipay keys cannot be loaded: {type(exc).__name__}") from None
        client._gateway = gateway_url  # the SDK only knows Alipay's own gateways
        # The SDK builds the string to check (a notify's sorted fields, an answer's
        # raw text); only the RSA2 check itself is swapped for `cryptography`'s,
        # about 30 times faster than pycryptodome's on the notify path.
        client._verify = Rsa2Verifier(load_key(alipay_public_key_pem))
        client._sign = Rsa2Signer(load_key(app_private_key_pem))
        self._client = client

    def __repr__(self) -> str:
        return f"AlipayGateway(app_id={self.app_id!r}, gateway_url={self.gateway_url!r})"

    @classmethod
    def from_settings(
        cls,
        *,
        app_id: str,
        seller_id: str,
        gateway_url: str,
        app_private_key: str | os.PathLike[str],
        alipay_public_key: str | os.PathLike[str],
        notify_url: str | None = None,
        return_url: str | None = None,
        timeout: float = ALIPAY_TIMEOUT_SECONDS,
    ) -> AlipayGateway:
        """Like the constructor, but keys may be PEM text, a PEM file's path or bare base64."""
        return cls(
            app_id,
            seller_id,
            gateway_url,
            load_key(app_private_key),
            load_key(alipay_public_key),
            notify_url,
            return_url,
            timeout,
        )

    # --- no network -------------------------------------------------------

    def page_pay_url(
        self, out_trade_no: str, total_amount: Decimal, subject: str, time_expire: datetime
    ) -> str:
        """The signed ``alipay.trade.page.pay`` URL to send the buyer's browser to."""
        biz = {
            "out_trade_no": out_trade_no,
            "total_amount": format_amount(total_amount),
            "subject": subject,
            "product_code": "FAST_INSTANT_TRADE_PAY",
            "time_expire": format_alipay_time(time_expire),
        }
        query = self._client.client_api(
            "alipay.trade.page.pay",
            biz,
            notify_url=self.notify_url,
            return_url=self.return_url,
            timestamp=format_alipay_time(datetime.now(UTC)),
        )
        logger.info(
            "page pay signed",
            extra={"out_trade_no": out_trade_no, "total_amount": biz["total_amount"]},
        )
        return f"{self.gateway_url}?{query}"

    def verify(self, params: Mapping[str, str]) -> bool:
        """True when ``params`` (a notify form or a return query) carry Alipay's valid
        RSA2 signature. A missing sign, a sign_type other than RSA2 or garbage gives
        False; this never raises. It checks only the signature: the caller still
        checks app_id, seller_id, out_trade_no and total_amount."""
        try:
            data = dict(params)
            sign = data.pop("sign", None)
            if not isinstance(sign, str) or not sign:
                return False
            if data.get("sign_type") != "RSA2":
                return False
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
                return False
            return bool(self._client.verify(data, sign))
        except Exception as exc:  # by contract, bad input is just "not verified"
            logger.info("signature check failed on malformed input: %s", type(exc).__name__)
            return False

    # --- server APIs ------------------------------------------------------

    def query(self, out_trade_no: str) -> TradeQuery:
        """alipay.trade.query. Raises TradeNotExist when Alipay has no such trade."""
        answer = self._call("alipay.trade.query", {"out_trade_no": out_trade_no})
        try:
            pay_time = answer.get("send_pay_date") or None
            return TradeQuery(
                out_trade_no=str(answer.get("out_trade_no") or out_trade_no),
                trade_no=str(answer["trade_no"]) if answer.get("trade_no") else None,
                trade_status=str(answer["trade_status"]),
                total_amount=Decimal(str(answer["total_amount"])),
                pay_time=str(pay_time) if pay_time else None,
            )
        except (KeyError, InvalidOperation) as exc:
            raise AlipayUnavailable(f"alipay.trade.query: answer lacks {exc}") from exc

    def close(self, out_trade_no: str) -> None:
        """alipay.trade.close: only a WAIT_BUYER_PAY trade closes.

        Raises TradeNotExist (never opened: nothing to close) or TradeStatusError
        (already paid or closed: query to tell which)."""
        self._call("alipay.trade.close", {"out_trade_no": out_trade_no})

    def refund(self, out_trade_no: str, amount: Decimal, out_request_no: str) -> RefundResult:
        """alipay.trade.refund. The same ``out_request_no`` never refunds twice: a retry
        answers the first result with ``fund_change`` False."""
        answer = self._call(
            "alipay.trade.refund",
            {
                "out_trade_no": out_trade_no,
                "refund_amount": format_amount(amount),
                "out_request_no": out_request_no,
            },
        )
        try:
            return RefundResult(
                out_trade_no=str(answer.get("out_trade_no") or out_trade_no),
                trade_no=str(answer["trade_no"]),
                refund_fee=Decimal(str(answer["refund_fee"])),
                fund_change=answer.get("fund_change") == "Y",
            )
        except (KeyError, InvalidOperation) as exc:
            raise AlipayUnavailable(f"alipay.trade.refund: answer lacks {exc}") from exc

    def refund_query(self, out_trade_no: str, out_request_no: str) -> dict[str, Any]:
        """alipay.trade.fastpay.refund.query: Alipay's answer object. The refund
        happened when it holds ``refund_amount`` (and ``refund_status`` is empty or
        REFUND_SUCCESS); no refund fields means no such refund."""
        return self._call(
            "alipay.trade.fastpay.refund.query",
            {"out_trade_no": out_trade_no, "out_request_no": out_request_no},
        )

    # --- the shop's payment port (chalicelib.ports.PaymentGateway) ----------

    def read_notice(self, params: Mapping[str, str]) -> PaymentNotice:
        """An async notify, verified: the signature, then that it is for us.

        A notify that carries ``refund_fee``, ``out_biz_no`` or ``gmt_refund`` is
        about a refund (kind REFUND; TRADE_SUCCESS after a partial refund,
        TRADE_CLOSED after a full one): ``refund_id`` is its ``out_biz_no`` (our
        out_request_no), ``refunded_fen`` the trade's total refunded. Either kind
        keeps the fields received, without ``sign``, for the order's timeline."""
        if not self.verify(params):
            raise NoticeRefused("bad signature")
        if params.get("app_id") != self.app_id:
            raise NoticeRefused("app_id is not ours")
        if params.get("seller_id") != self.seller_id:
            raise NoticeRefused("seller_id is not ours")
        trade_no = params.get("trade_no") or ""
        if not trade_no:
            raise NoticeRefused("no trade_no")
        is_refund = any(key in params for key in REFUND_NOTICE_FIELDS)
        return PaymentNotice(
            order_id=params.get("out_trade_no") or "",
            trade_no=trade_no,
            state=TRADE_STATES.get(params.get("trade_status") or ""),
            amount_fen=parse_amount(params.get("total_amount") or ""),
            paid_at=_alipay_time_or_none(params.get("gmt_payment")),
            notice_id=params.get("notify_id"),
            kind=NoticeKind.REFUND if is_refund else NoticeKind.PAYMENT,
            refund_id=(params.get("out_biz_no") or None) if is_refund else None,
            refunded_fen=_amount_or_none(params.get("refund_fee")) if is_refund else None,
            refunded_at=_alipay_time_or_none(params.get("gmt_refund")) if is_refund else None,
            fields={k: v for k, v in params.items() if k != "sign"},
        )

    def read_return(self, params: Mapping[str, str]) -> str:
        """The browser's return from the cashier, verified: its order id."""
        if not self.verify(params):
            raise NoticeRefused("invalid signature")
        return params.get("out_trade_no") or ""

    def query_trade(self, order_id: str) -> Trade | None:
        try:
            answer = self.query(order_id)
        except TradeNotExist:
            return None
        state = TRADE_STATES.get(answer.trade_status)
        if state is None:
            raise AlipayUnavailable(f"alipay.trade.query: unknown trade_status "
                                    f"{answer.trade_status!r}")
        try:
            amount_fen = to_fen(answer.total_amount)
        except ValueError as exc:
            raise AlipayUnavailable(f"alipay.trade.query: {exc}") from exc
        return Trade(order_id=answer.out_trade_no, trade_no=answer.trade_no, state=state,
                     amount_fen=amount_fen, paid_at=_alipay_time_or_none(answer.pay_time))

    def close_trade(self, order_id: str) -> None:
        try:
            self.close(order_id)
        except TradeNotExist:
            pass  # never opened: nothing to close

    def refund_payment(self, order_id: str, amount: Decimal, request_no: str) -> RefundOutcome:
        """alipay.trade.refund. AlipayBusinessError (a PaymentRefused, ``reason`` the
        sub_code): refused, nothing moved. AlipayUnavailable: unknown, query_refund."""
        answer = self.refund(order_id, amount, request_no)
        try:
            refunded_fen = to_fen(answer.refund_fee)
        except ValueError as exc:
            raise AlipayUnavailable(f"alipay.trade.refund: refund_fee {exc}") from exc
        return RefundOutcome(order_id=answer.out_trade_no, trade_no=answer.trade_no,
                             refunded_fen=refunded_fen, moved=answer.fund_change)

    def query_refund(self, order_id: str, request_no: str) -> RefundState:
        """alipay.trade.fastpay.refund.query: SUCCEEDED when Alipay shows the refund
        (refund_status REFUND_SUCCESS, or refund fields with an empty status, as
        older answers have it); NOT_MADE when the answer has no refund fields or
        Alipay has no such trade; AlipayUnavailable for anything else."""
        method = "alipay.trade.fastpay.refund.query"
        try:
            answer = self.refund_query(order_id, request_no)
        except TradeNotExist:
            return RefundState.NOT_MADE  # no trade, no refund of it
        if answer.get("out_request_no") not in (None, "", request_no):
            raise AlipayUnavailable(f"{method}: the answer is about another refund")
        status = str(answer.get("refund_status") or "")
        amount = answer.get("refund_amount")
        if status == REFUND_SUCCESS:
            return RefundState.SUCCEEDED
        if status:
            raise AlipayUnavailable(f"{method}: unknown refund_status {status!r}",
                                    code=SUCCESS_CODE)
        if amount in (None, ""):
            return RefundState.NOT_MADE
        if parse_amount(str(amount)) is None:
            raise AlipayUnavailable(f"{method}: refund_amount {amount!r} is no amount",
                                    code=SUCCESS_CODE)
        return RefundState.SUCCEEDED

    def bill_url(self, day: date) -> str | None:
        """The trade bill of `day` (Asia/Shanghai): where to download it (for 30 s).
        None when Alipay has no bill of that day (isp.bill_not_exist)."""
        try:
            answer = self._call(BILL_METHOD, {"bill_type": "trade",
                                              "bill_date": day.isoformat()})
        except AlipayBusinessError as exc:
            if exc.sub_code == BILL_NOT_EXIST:
                return None
            raise
        url = answer.get("bill_download_url")
        if not isinstance(url, str) or not url.startswith(("https://", "http://")):
            raise AlipayUnavailable(f"{BILL_METHOD}: the answer has no bill_download_url")
        return url

    def download_bill(self, url: str, out: IO[bytes]) -> int:
        """The bill at `url`, copied to `out` as it comes (never whole in memory);
        its size. AlipayUnavailable for anything but a whole 200 answer."""
        if not url.startswith(("https://", "http://")):
            raise AlipayUnavailable("bill download: not an http(s) URL")
        size = 0
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as answer:  # noqa: S310
                # urlopen raises only for 4xx/5xx: a 204 or a 206 is no whole bill either.
                if answer.status != 200:
                    raise AlipayUnavailable(f"bill download: HTTP {answer.status}")
                expected = _content_length(answer.headers.get("Content-Length"))
                if expected is not None and expected > BILL_MAX_BYTES:
                    raise AlipayUnavailable(f"bill download: {expected} bytes announced, "
                                            f"more than {BILL_MAX_BYTES}")
                while chunk := answer.read(BILL_CHUNK_BYTES):
                    size += len(chunk)
                    if size > BILL_MAX_BYTES:
                        raise AlipayUnavailable(f"bill download: more than "
                                                f"{BILL_MAX_BYTES} bytes")
                    out.write(chunk)
                # read(n) answers b"" when the connection drops early instead of raising
                # IncompleteRead: a cut bill would pass for a whole one.
                if expected is not None and size != expected:
                    raise AlipayUnavailable(f"bill download: {size} of {expected} bytes")
        except urllib.error.HTTPError as exc:
            raise AlipayUnavailable(f"bill download: HTTP {exc.code}") from exc
        except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts, resets
            raise AlipayUnavailable(f"bill download: {type(exc).__name__}: {exc}") from exc
        logger.info("alipay bill downloaded", extra={"bytes": size})
        return size

    def _call(self, method: str, biz: dict[str, str]) -> dict[str, Any]:
        out_trade_no = biz.get("out_trade_no")
        try:
            answer = self._client.server_api(
                method, biz, timestamp=format_alipay_time(datetime.now(UTC))
            )
        except AliPayValidationError as exc:
            logger.warning(
                "alipay answer has a bad signature",
                extra={"method": method, "out_trade_no": out_trade_no},
            )
            raise AlipayUnavailable(f"{method}: the answer's signature is invalid") from exc
        except AliPayException as exc:
            # An unsigned answer or an error_response: the SDK hides code and text.
            raise self._unsigned_error(method, exc) from exc
        except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts, resets
            logger.warning(
                "alipay unreachable",
                extra={"method": method, "out_trade_no": out_trade_no, "error": repr(exc)},
            )
            raise AlipayUnavailable(f"{method}: {type(exc).__name__}: {exc}") from exc
        except (ValueError, KeyError, AttributeError, TypeError, IndexError) as exc:
            # JSON or UTF-8 that does not parse, an answer shaped unlike Alipay's.
            logger.warning(
                "alipay answer unreadable",
                extra={"method": method, "out_trade_no": out_trade_no, "error": repr(exc)},
            )
            raise AlipayUnavailable(f"{method}: unreadable answer ({type(exc).__name__})") from exc
        if not isinstance(answer, dict):
            raise AlipayUnavailable(f"{method}: the answer is not an object")
        code = str(answer.get("code", ""))
        log_extra = {
            "method": method,
            "out_trade_no": out_trade_no,
            "code": code,
            "sub_code": answer.get("sub_code"),
            "trade_no": answer.get("trade_no"),
        }
        if code == SUCCESS_CODE:
            if out_trade_no and answer.get("out_trade_no") not in (None, out_trade_no):
                raise AlipayUnavailable(f"{method}: the answer is about another trade")
            logger.info("alipay call ok", extra=log_extra)
            return answer
        if code == UNAVAILABLE_CODE or answer.get("sub_code") in UNKNOWN_OUTCOME_SUB_CODES:
            logger.warning("alipay busy", extra=log_extra)
            raise AlipayUnavailable(
                f"{method}: {code} {answer.get('sub_code') or ''}".rstrip(),
                code=code,
                sub_code=answer.get("sub_code"),
            )
        logger.info("alipay business error", extra=log_extra)
        raise _business_error(answer, method)

    @staticmethod
    def _unsigned_error(method: str, exc: AliPayException) -> AlipayUnavailable:
        """An answer without Alipay's signature: never a business fact, whatever it
        says (a 40004 ACQ.TRADE_NOT_EXIST from a proxy must not close an order).
        Its code and sub_code stay in the exception for the logs."""
        code = getattr(exc, "_AliPayException__code", None)
        raw = getattr(exc, "_AliPayException__message", "")
        detail: Mapping[str, Any] = {}
        try:
            parsed = json.loads(raw) if isinstance(raw, str) else {}
            if isinstance(parsed, dict):
                inner = parsed.get(method.replace(".", "_") + "_response") or parsed.get(
                    "error_response"
                )
                detail = inner if isinstance(inner, dict) else {}
        except ValueError:
            pass
        code = str(detail.get("code") or code or "")
        if code == "0":  # the SDK's stand-in when the answer has no code
            code = ""
        sub_code = detail.get("sub_code")
        sub_code = str(sub_code) if sub_code not in (None, "") else None
        logger.warning(
            "alipay unsigned answer",
            extra={"method": method, "code": code or None, "sub_code": sub_code},
        )
        claimed = " ".join(part for part in (code, sub_code) if part) or "no code"
        return AlipayUnavailable(
            f"Alipay unavailable: {method}: unsigned answer ({claimed})",
            code=code or None,
            sub_code=sub_code,
        )
