"""The sandbox's HTTP server: Alipay's gateway plus a few ``/sandbox`` routes.

Routes:

- ``GET|POST /gateway.do``: ``alipay.trade.page.pay`` gives the cashier page;
  ``alipay.trade.query``, ``.close``, ``.refund``, ``.fastpay.refund.query``
  answer signed JSON as Alipay does.
- ``POST /sandbox/pay`` (form ``out_trade_no``, optional ``notify=drop``).
- ``POST /sandbox/notify/{out_trade_no}``: send the async notify again now
  (``?out_request_no=...``: that refund's notify).
- ``GET /sandbox/trades/{out_trade_no}``, ``GET /sandbox/trades``: trades as JSON.
- ``PUT /sandbox/trades/{out_trade_no}/refund-fault`` with JSON
  ``{"code": "ACQ.SELLER_BALANCE_NOT_ENOUGH" | "ACQ.SYSTEM_ERROR", "applied": false}``:
  the trade's next refunds fail so (see ``trades``); ``DELETE`` clears it.
  400 on a bad body, 404 on an unknown trade.
- ``GET|PUT|DELETE /sandbox/faults``: the gateway's faults (slow, 5xx, unsigned or
  wrongly signed answers, slow notifies; see ``faults``).
- ``GET /health``.
- ``alipay.data.dataservice.bill.downloadurl.query`` on the gateway, ``GET
  /downloadBillFile.resource?...&fileId=...`` (the bill, for 30 s) and ``POST|DELETE
  /sandbox/bills/{yyyy-MM-dd}/edits`` (the test hook): see ``billing``.

Settings (``make_server`` arguments, else the environment):
``SANDBOX_REFUND_NOTIFY`` (``1``, the default: a refund that moved money is
notified to the trade's notify_url; ``0``: not) and ``SANDBOX_REFUND_RULE``
(``alipay``, the default: partial refunds; ``sandbox``: Alipay's sandbox quirk,
one refund per trade, of the whole amount); ``SANDBOX_BILLS_TODAY`` (``1``:
today's bill may be fetched too; default ``0``, past days only, as Alipay).
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from .billing import BILLS_TODAY_ENV, DOWNLOAD_PATH, EDITS_RE, BillDesk, parse_day
from .constants import (
    API_METHODS,
    DEFAULT_NOTIFY_SCHEDULE,
    LOCAL_APP_ID,
    LOCAL_SELLER_ID,
    PAGE_PAY_METHOD,
)
from .faults import FaultPicker, GatewayFaults
from .keys import ensure_keys, load_private_key, load_public_key
from .notifier import Notifier
from .pages import cashier_page, error_page, paid_page
from .signer import alipay_time, sign_content, sign_params, verify_request
from .trades import (
    REFUND_FAULT_CODES,
    REFUND_RULE_ALIPAY,
    REFUND_RULES,
    SYSTEM_ERROR,
    ApiError,
    PayRefused,
    RefundFault,
    TradeBook,
    utc_now,
)

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
NOTIFY_SCHEDULE_ENV = "SANDBOX_NOTIFY_SCHEDULE"
REFUND_NOTIFY_ENV = "SANDBOX_REFUND_NOTIFY"
REFUND_RULE_ENV = "SANDBOX_REFUND_RULE"
_FAULT_SUFFIX = "/refund-fault"
FAULTS_PATH = "/sandbox/faults"

__all__ = [
    "SandboxServer",
    "make_server",
    "parse_flag",
    "parse_refund_rule",
    "parse_schedule",
    "render_api_response",
]


def parse_flag(text: str, name: str = REFUND_NOTIFY_ENV) -> bool:
    """``1/true/yes/on`` or ``0/false/no/off`` (any case)."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be 1 or 0: {text!r}")


def parse_refund_rule(text: str) -> str:
    value = text.strip().lower()
    if value not in REFUND_RULES:
        raise ValueError(f"{REFUND_RULE_ENV} must be one of {', '.join(REFUND_RULES)}: {text!r}")
    return value


def parse_schedule(text: str) -> list[float]:
    """``"0.5,1,2"`` -> ``[0.5, 1.0, 2.0]`` (seconds between notify attempts)."""
    try:
        delays = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise ValueError(
            f"{NOTIFY_SCHEDULE_ENV} must be comma-separated seconds: {text!r}"
        ) from exc
    if any(d < 0 for d in delays):
        raise ValueError(f"{NOTIFY_SCHEDULE_ENV} must not hold negative delays: {text!r}")
    return delays


def render_api_response(
    response_name: str, payload: Mapping[str, Any], key: rsa.RSAPrivateKey
) -> bytes:
    """``{"<name>": {...}, "sign": "..."}`` signed over the exact bytes written."""
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    sign = sign_content(text, key)
    return ('{"' + response_name + '":' + text + ',"sign":"' + sign + '"}').encode("utf-8")


def _api_response_name(method: str) -> str:
    return method.replace(".", "_") + "_response"


class SandboxServer(ThreadingHTTPServer):
    daemon_threads = True
    # The default backlog of 5 resets connections past the sixth arriving at once
    # (the bridge's workers, a bench's threads and the cashier's pages together).
    request_queue_size = 256

    def __init__(
        self,
        address: tuple[str, int],
        *,
        keys: dict[str, Path],
        app_id: str,
        seller_id: str,
        notify_schedule: Sequence[float],
        clock: Callable[[], datetime],
        refund_notify: bool = True,
        refund_rule: str = REFUND_RULE_ALIPAY,
        faults: GatewayFaults | None = None,
        bills_today: bool = False,
    ) -> None:
        super().__init__(address, SandboxHandler)
        self.keys_dir = keys["app_private"].parent
        self.app_id = app_id
        self.seller_id = seller_id
        self.clock = clock
        self.app_public_key = load_public_key(keys["app_public"])
        self.alipay_private_key = load_private_key(keys["alipay_private"])
        self.book = TradeBook(clock, refund_rule)
        self.faults = FaultPicker(faults or GatewayFaults())
        self.notifier = Notifier(self.book, self.alipay_private_key, notify_schedule, clock,
                                 first_delay=lambda: self.faults.faults.notify_delay_seconds)
        self.refund_notify = refund_notify
        self.book.on_refund(self._refunded)
        self.bills = BillDesk(self.book.bill_records, seller_id, clock, serve_today=bills_today)

    @property
    def refund_rule(self) -> str:
        return self.book.refund_rule

    def _refunded(self, out_trade_no: str, out_request_no: str) -> None:
        """A refund moved money: Alipay notifies the trade's notify_url."""
        if not self.refund_notify:
            return
        notice = self.book.refund_notice(out_trade_no, out_request_no)
        if notice is not None and notice.notify_url:
            self.notifier.start(out_trade_no, out_request_no)

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        host = str(host)
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return f"http://{host}:{port}"

    @property
    def gateway_url(self) -> str:
        return f"{self.base_url}/gateway.do"

    def server_close(self) -> None:
        self.notifier.stop()
        super().server_close()


class SandboxHandler(BaseHTTPRequestHandler):
    server: SandboxServer
    server_version = "AlipaySandbox/1.0"

    # --- plumbing ---------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)

    def _send(
        self, status: int, body: bytes, content_type: str, headers: Mapping[str, str] | None = None
    ) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            # the caller stopped waiting (a slow answer): what it asked was done all the same
            logger.info("answer not delivered: the caller hung up", extra={"path": self.path})
            self.close_connection = True

    def _html(self, status: int, body: bytes) -> None:
        self._send(status, body, "text/html; charset=utf-8")

    def _read_json(self) -> Any:
        """The request's JSON body; ValueError when absent, too large or not JSON."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        if length <= 0:
            raise ValueError("a JSON body is required")
        if length > MAX_BODY_BYTES:
            raise ValueError("body too large")
        return json.loads(self.rfile.read(length).decode("utf-8"))

    def _json(self, status: int, payload: Any) -> None:
        body = json.dumps(payload, ensure_ascii=False, indent=2).encode("utf-8")
        self._send(status, body, "application/json; charset=utf-8")

    def _read_form(self) -> dict[str, str]:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        if length <= 0:
            return {}
        if length > MAX_BODY_BYTES:
            raise ValueError("body too large")
        raw = self.rfile.read(length).decode("utf-8", "replace")
        return dict(urllib.parse.parse_qsl(raw, keep_blank_values=True))

    def _split(self) -> tuple[str, dict[str, str]]:
        parts = urllib.parse.urlsplit(self.path)
        return parts.path, dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))

    # --- routing ----------------------------------------------------------

    def do_GET(self) -> None:
        path, query = self._split()
        if path == "/gateway.do":
            self._gateway(query)
        elif path == "/health":
            self._json(200, {"status": "ok"})
        elif path == DOWNLOAD_PATH:
            body = self.server.bills.download(query.get("fileId", ""))
            if body is None:
                self._html(404, error_page("Bill", "BILL_URL_EXPIRED",
                                           "the download URL has expired (30 s) or is unknown"))
            else:
                self._send(200, body, "application/oct-stream",
                           {"Content-Disposition": "attachment; filename="
                            f"\"{query.get('downloadFileName', 'bill.csv.zip')}\""})
        elif path == "/sandbox/trades":
            self._json(200, {"items": self.server.book.snapshot_all()})
        elif path == FAULTS_PATH:
            self._json(200, self.server.faults.report())
        elif (fault_of := self._fault_target(path)) is not None:
            trade = self.server.book.snapshot(fault_of)
            if trade is None:
                self._json(404, {"error": "TRADE_NOT_EXIST", "out_trade_no": fault_of})
            else:
                self._json(200, {"out_trade_no": fault_of, "refund_fault": trade["refund_fault"]})
        elif path.startswith("/sandbox/trades/"):
            out_trade_no = urllib.parse.unquote(path.removeprefix("/sandbox/trades/"))
            trade = self.server.book.snapshot(out_trade_no)
            if trade is None:
                self._json(404, {"error": "TRADE_NOT_EXIST", "out_trade_no": out_trade_no})
            else:
                self._json(200, trade)
        else:
            self._json(404, {"error": "NOT_FOUND", "path": path})

    def do_POST(self) -> None:
        path, query = self._split()
        if (edits_of := EDITS_RE.match(path)) is not None:
            self._edit_bill(edits_of.group(1))
            return
        try:
            form = self._read_form()
        except ValueError:
            self._json(413, {"error": "BODY_TOO_LARGE"})
            return
        if path == "/gateway.do":
            self._gateway({**query, **form})
        elif path == "/sandbox/pay":
            self._pay(form)
        elif path.startswith("/sandbox/notify/"):
            self._resend(
                urllib.parse.unquote(path.removeprefix("/sandbox/notify/")),
                query.get("out_request_no") or None,
            )
        else:
            self._json(404, {"error": "NOT_FOUND", "path": path})

    def do_PUT(self) -> None:
        path, _ = self._split()
        if path == FAULTS_PATH:
            try:
                change = self._read_json()
                if not isinstance(change, dict):
                    raise ValueError("the body must be a JSON object")
                self.server.faults.set(self.server.faults.faults.changed(change))
            except (ValueError, TypeError, UnicodeDecodeError) as exc:
                self._json(400, {"error": "BAD_REQUEST", "detail": str(exc)})
                return
            logger.info("gateway faults set", extra={"faults": self.server.faults.report()})
            self._json(200, self.server.faults.report())
            return
        out_trade_no = self._fault_target(path)
        if out_trade_no is None:
            self._json(404, {"error": "NOT_FOUND", "path": path})
            return
        try:
            fault = _parse_fault(self._read_json())
        except (ValueError, UnicodeDecodeError) as exc:
            self._json(400, {"error": "BAD_REQUEST", "detail": str(exc)})
            return
        self._set_fault(out_trade_no, fault)

    def do_DELETE(self) -> None:
        path, _ = self._split()
        if (edits_of := EDITS_RE.match(path)) is not None:
            try:
                self.server.bills.clear(parse_day(edits_of.group(1)))
            except ValueError as exc:
                self._json(400, {"error": "BAD_REQUEST", "detail": str(exc)})
                return
            self._json(200, {"day": edits_of.group(1), "edits": None})
            return
        if path == FAULTS_PATH:
            self.server.faults.set(GatewayFaults())
            self._json(200, self.server.faults.report())
            return
        out_trade_no = self._fault_target(path)
        if out_trade_no is None:
            self._json(404, {"error": "NOT_FOUND", "path": path})
            return
        self._set_fault(out_trade_no, None)

    # --- test hooks -------------------------------------------------------

    def _edit_bill(self, day_text: str) -> None:
        try:
            day = parse_day(day_text)
            edits = self.server.bills.edit(day, self._read_json())
        except (ValueError, UnicodeDecodeError) as exc:
            self._json(400, {"error": "BAD_REQUEST", "detail": str(exc)})
            return
        logger.info("bill edited", extra={"event": "bill_edited", "day": day_text})
        self._json(200, {"day": day_text, "edits": edits})

    @staticmethod
    def _fault_target(path: str) -> str | None:
        """``/sandbox/trades/{out_trade_no}/refund-fault`` -> out_trade_no."""
        if not (path.startswith("/sandbox/trades/") and path.endswith(_FAULT_SUFFIX)):
            return None
        name = path.removeprefix("/sandbox/trades/").removesuffix(_FAULT_SUFFIX)
        return urllib.parse.unquote(name) if name and "/" not in name else None

    def _set_fault(self, out_trade_no: str, fault: RefundFault | None) -> None:
        if not self.server.book.set_refund_fault(out_trade_no, fault):
            self._json(404, {"error": "TRADE_NOT_EXIST", "out_trade_no": out_trade_no})
            return
        self._json(
            200,
            {"out_trade_no": out_trade_no, "refund_fault": fault.to_json() if fault else None},
        )

    # --- the gateway ------------------------------------------------------

    def _check_request(self, params: Mapping[str, str]) -> ApiError | None:
        """Alipay's checks on a merchant request: signature, then app id."""
        if params.get("sign_type") != "RSA2":
            return ApiError(
                "40002",
                "Invalid Arguments",
                "isv.invalid-signature-type",
                "sandbox accepts sign_type RSA2 only",
            )
        if not params.get("sign"):
            return ApiError(
                "40001", "Missing Required Arguments", "isv.missing-signature", "缺少签名参数"
            )
        if not verify_request(params, self.server.app_public_key):
            return ApiError("40002", "Invalid Arguments", "isv.invalid-signature", "验签出错")
        if params.get("app_id") != self.server.app_id:
            return ApiError("40002", "Invalid Arguments", "isv.invalid-app-id", "无效的AppID参数")
        return None

    def _gateway(self, params: dict[str, str]) -> None:
        method = params.get("method", "")
        if method == PAGE_PAY_METHOD:
            self._page_pay(params)
        elif method in API_METHODS:
            self._api(method, params)
        elif not method:
            self._api_answer(
                "error_response",
                ApiError(
                    "40001", "Missing Required Arguments", "isv.missing-method", "缺少方法名参数"
                ).payload(),
            )
        else:
            self._api_answer(
                "error_response",
                ApiError(
                    "40002", "Invalid Arguments", "isv.invalid-method", "不存在的方法名"
                ).payload(),
            )

    def _biz(self, params: Mapping[str, str]) -> dict[str, Any]:
        raw = params.get("biz_content") or "{}"
        try:
            biz = json.loads(raw)
        except ValueError as exc:
            raise ApiError(
                "40002", "Invalid Arguments", "isv.invalid-biz-content", "biz_content is not JSON"
            ) from exc
        if not isinstance(biz, dict):
            raise ApiError(
                "40002",
                "Invalid Arguments",
                "isv.invalid-biz-content",
                "biz_content is not a JSON object",
            )
        return biz

    def _page_pay(self, params: dict[str, str]) -> None:
        refused = self._check_request(params)
        if refused is not None:
            logger.warning(
                "page pay refused",
                extra={"event": "page_pay_refused", "sub_code": refused.sub_code},
            )
            self._html(400, error_page("Request refused", refused.sub_code, refused.sub_msg))
            return
        try:
            view = self.server.book.open_page_pay(
                params["app_id"],
                self.server.seller_id,
                self._biz(params),
                params.get("notify_url") or None,
                params.get("return_url") or None,
            )
        except ApiError as exc:
            self._html(400, error_page("Request refused", exc.sub_code, exc.sub_msg))
            return
        self._html(200, cashier_page(view))

    def _api(self, method: str, params: dict[str, str]) -> None:
        name = _api_response_name(method)
        refused = self._check_request(params)
        if refused is not None:
            logger.warning(
                "api call refused",
                extra={"event": "api_refused", "method": method, "sub_code": refused.sub_code},
            )
            self._api_answer(name, refused.payload())
            return
        fault = self.server.faults.pick(method)
        status = self.server.faults.status_5xx() if fault == "5xx" else 0
        if fault == "unsigned" or status in (502, 503):
            self._fault_answer(method, name, fault, status, params)  # never reaches Alipay
            return
        book = self.server.book
        handler = {
            "alipay.trade.query": book.query,
            "alipay.trade.close": book.close,
            "alipay.trade.refund": book.refund,
            "alipay.trade.fastpay.refund.query": book.refund_query,
            "alipay.data.dataservice.bill.downloadurl.query":
                lambda biz: self.server.bills.issue(biz, self.server.base_url),
        }[method]
        biz: dict[str, Any] = {}
        try:
            biz = self._biz(params)
            answer: dict[str, Any] = handler(biz)
        except ApiError as exc:
            answer = exc.payload()
            for key in ("out_trade_no", "trade_no"):
                if key in biz:
                    answer[key] = str(biz[key])
        logger.info(
            "api call",
            extra={
                "event": "api_call",
                "method": method,
                "code": answer.get("code"),
                "sub_code": answer.get("sub_code"),
                "out_trade_no": answer.get("out_trade_no"),
                "trade_no": answer.get("trade_no"),
                "fault": fault,
            },
        )
        if fault is None:
            self._api_answer(name, answer)
        elif fault == "slow":
            time.sleep(self.server.faults.faults.slow_seconds)
            self._api_answer(name, answer)
        else:  # done; then a 504, or the answer replaced by a lie with the true signature
            self._fault_answer(method, name, fault, status, params, answer)

    def _api_answer(self, name: str, payload: Mapping[str, Any]) -> None:
        body = render_api_response(name, payload, self.server.alipay_private_key)
        self._send(200, body, "application/json;charset=utf-8")

    def _fault_answer(self, method: str, name: str, fault: str | None, status: int,
                      params: Mapping[str, str], true_answer: Mapping[str, Any] | None = None,
                      ) -> None:
        logger.info("gateway fault", extra={"event": "gateway_fault", "method": method,
                                             "fault": fault, "status": status or None})
        if status:
            self._send(status, f"<html><body><h1>{status}</h1></body></html>".encode(),
                       "text/html; charset=utf-8")
            return
        try:
            out_trade_no = str(self._biz(params).get("out_trade_no") or "")
        except ApiError:
            out_trade_no = ""
        lie = json.dumps(_lie(method, out_trade_no, true_answer),
                         ensure_ascii=False, separators=(",", ":"))
        tail = ""
        if true_answer is not None:  # badsign: the lie beside the true answer's signature
            text = json.dumps(true_answer, ensure_ascii=False, separators=(",", ":"))
            tail = ',"sign":"' + sign_content(text, self.server.alipay_private_key) + '"'
        body = ('{"' + name + '":' + lie + tail + "}").encode("utf-8")
        self._send(200, body, "application/json;charset=utf-8")

    # --- the buyer --------------------------------------------------------

    def _pay(self, form: dict[str, str]) -> None:
        out_trade_no = form.get("out_trade_no", "")
        drop = form.get("notify") == "drop"
        try:
            paid = self.server.book.pay(out_trade_no, drop_notify=drop)
        except PayRefused as exc:
            self._html(exc.status, error_page("Payment refused", exc.reason, exc.detail))
            return
        if not drop and paid.notify_url:
            self.server.notifier.start(out_trade_no)
        if not paid.return_url:
            self._html(200, paid_page(paid.out_trade_no, paid.trade_no, paid.total_amount))
            return
        sync = sign_params(
            {
                "charset": "utf-8",
                "out_trade_no": paid.out_trade_no,
                "method": "alipay.trade.page.pay.return",
                "total_amount": paid.total_amount,
                "trade_no": paid.trade_no,
                "auth_app_id": paid.app_id,
                "version": "1.0",
                "app_id": paid.app_id,
                "seller_id": paid.seller_id,
                "timestamp": alipay_time(self.server.clock()),
            },
            self.server.alipay_private_key,
        )
        separator = "&" if urllib.parse.urlsplit(paid.return_url).query else "?"
        location = paid.return_url + separator + urllib.parse.urlencode(sync)
        self._send(HTTPStatus.FOUND, b"", "text/plain; charset=utf-8", {"Location": location})

    def _resend(self, out_trade_no: str, out_request_no: str | None) -> None:
        try:
            attempt = self.server.notifier.send_once(out_trade_no, out_request_no)
        except KeyError:
            error = "REFUND_NOT_EXIST" if out_request_no else "TRADE_NOT_PAID"
            self._json(404, {"error": error, "out_trade_no": out_trade_no,
                             "out_request_no": out_request_no})
            return
        self._json(
            200,
            {
                "out_trade_no": out_trade_no,
                "out_request_no": out_request_no,
                "status": attempt.status,
                "answer": attempt.answer,
                "error": attempt.error,
                "ok": attempt.ok,
            },
        )


def _lie(method: str, out_trade_no: str, truth: Mapping[str, Any] | None) -> dict[str, Any]:
    """What a faulty answer claims: Alipay has no such trade (which would close a paid
    order if believed) or, when that is the truth, that the call succeeded (which
    would mark an order paid, or a refund made)."""
    if truth is None or str(truth.get("code")) == "10000":
        return {"code": "40004", "msg": "Business Failed", "sub_code": "ACQ.TRADE_NOT_EXIST",
                "sub_msg": "交易不存在", "out_trade_no": out_trade_no}
    claim: dict[str, Any] = {"code": "10000", "msg": "Success", "out_trade_no": out_trade_no,
                             "trade_no": "2099010122001400000000000000"}
    if method == "alipay.trade.query":
        claim.update(trade_status="TRADE_SUCCESS", total_amount="0.01",
                     send_pay_date="2099-01-01 00:00:00")
    elif method == "alipay.trade.refund":
        claim.update(fund_change="Y", refund_fee="0.01")
    elif method == "alipay.trade.fastpay.refund.query":
        claim.update(refund_status="REFUND_SUCCESS", refund_amount="0.01")
    return claim


def _parse_fault(body: Any) -> RefundFault:
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    unknown = set(body) - {"code", "applied"}
    if unknown:
        raise ValueError(f"unknown fields: {', '.join(sorted(unknown))}")
    code = body.get("code")
    if code not in REFUND_FAULT_CODES:
        raise ValueError(f"code must be one of {', '.join(REFUND_FAULT_CODES)}")
    applied = body.get("applied", False)
    if not isinstance(applied, bool):
        raise ValueError("applied must be true or false")
    if applied and code != SYSTEM_ERROR:
        raise ValueError(f"applied: true only goes with {SYSTEM_ERROR} (a refusal moves nothing)")
    return RefundFault(code=code, applied=applied)


def make_server(
    host: str,
    port: int,
    keys_dir: Path,
    notify_schedule: list[float] | None = None,
    *,
    app_id: str = LOCAL_APP_ID,
    seller_id: str = LOCAL_SELLER_ID,
    clock: Callable[[], datetime] = utc_now,
    refund_notify: bool | None = None,
    refund_rule: str | None = None,
    faults: GatewayFaults | None = None,
    bills_today: bool | None = None,
) -> SandboxServer:
    """A sandbox bound to ``host:port`` (0 picks a free port); call ``serve_forever``.

    ``notify_schedule`` is the list of delays (seconds) between notify attempts;
    default: env ``SANDBOX_NOTIFY_SCHEDULE``, else Alipay's schedule with a minute
    compressed to a second. ``refund_notify`` (default: env ``SANDBOX_REFUND_NOTIFY``,
    else on) and ``refund_rule`` (default: env ``SANDBOX_REFUND_RULE``, else
    ``alipay``): see the module's docstring. ``faults`` (default: the environment's,
    see ``faults.GatewayFaults.from_env``): the gateway's faults. Keys are made in
    ``keys_dir`` when missing.
    """
    if notify_schedule is None:
        env = os.environ.get(NOTIFY_SCHEDULE_ENV)
        notify_schedule = parse_schedule(env) if env else list(DEFAULT_NOTIFY_SCHEDULE)
    if refund_notify is None:
        env = os.environ.get(REFUND_NOTIFY_ENV)
        refund_notify = parse_flag(env) if env else True
    if refund_rule is None:
        env = os.environ.get(REFUND_RULE_ENV)
        refund_rule = parse_refund_rule(env) if env else REFUND_RULE_ALIPAY
    else:
        refund_rule = parse_refund_rule(refund_rule)
    if bills_today is None:
        env = os.environ.get(BILLS_TODAY_ENV)
        bills_today = parse_flag(env, BILLS_TODAY_ENV) if env else False
    keys = ensure_keys(Path(keys_dir))
    server = SandboxServer(
        (host, port),
        keys=keys,
        app_id=app_id,
        seller_id=seller_id,
        notify_schedule=notify_schedule,
        clock=clock,
        refund_notify=refund_notify,
        refund_rule=refund_rule,
        faults=faults if faults is not None else GatewayFaults.from_env(),
        bills_today=bills_today,
    )
    logger.info(
        "sandbox ready",
        extra={
            "event": "sandbox_ready",
            "gateway": server.gateway_url,
            "app_id": app_id,
            "seller_id": seller_id,
            "keys_dir": str(server.keys_dir),
            "refund_notify": refund_notify,
            "refund_rule": refund_rule,
            "faults": server.faults.report(),
        },
    )
    return server
