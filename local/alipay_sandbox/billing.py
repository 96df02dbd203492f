"""The sandbox's bills: ``alipay.data.dataservice.bill.downloadurl.query`` and the
download behind its ``bill_download_url``, plus the test hook that edits a day.

A day's bill (a day in Asia/Shanghai) is made from the sandbox's own trades:
one row per payment on its gmt_payment's day, one per refund on its gmt_refund's
day (``TradeBook.bill_records``), then the day's edits. It is made when its URL is
issued and served unchanged from then on, for 30 seconds, as Alipay's URLs live.

Alipay's answers (all code 40004 "Business Failed"): a bill only for past days
(a day's bill is made the next morning, T+1: today's and later days' are refused
as bad arguments, ``isv.invalid_arguments`` 入参不合法, as Alipay is seen to answer
them, unless ``SANDBOX_BILLS_TODAY=1`` lets today's be fetched, for tests and
demos); ``isp.bill_not_exist`` for a day with no row (whatever its ``corrupt``:
no file, nothing to corrupt); ``isv.invalid_arguments`` too for a bill_type other
than ``trade`` or a bill_date that is not yyyy-MM-dd (Alipay's monthly bills,
yyyy-MM, are not made here).

The zip behind a URL is made when the URL is issued: edits made afterwards show
in the next URL's file only, as a bill already downloaded does not change.

Edits (``POST /sandbox/bills/{day}/edits``, JSON) accumulate per day until
``DELETE`` on the same path: ``add`` rows (a trade the shop never heard of, a
refund made in the console), ``drop`` rows by trade number or request number,
change ``amounts`` by the same keys (a refund's amount is given positive), and
``corrupt`` the file (``bills.CORRUPTIONS``; ``null`` clears it).
"""

from __future__ import annotations

import re
import secrets
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

from .bills import CORRUPTIONS, PAYMENT, REFUND, BillRecord, account_of, bill_bytes
from .signer import SHANGHAI
from .trades import ApiError

URL_LIFETIME = timedelta(seconds=30)
DOWNLOAD_PATH = "/downloadBillFile.resource"
EDITS_RE = re.compile(r"^/sandbox/bills/(\d{4}-\d{2}-\d{2})/edits$")
BILLS_TODAY_ENV = "SANDBOX_BILLS_TODAY"
# The sub codes Alipay's gateway is seen to answer for this method (answers developers
# published: an underscore here, not the hyphen of the gateway's common codes).
INVALID_ARGUMENTS = "isv.invalid_arguments"
BILL_NOT_EXIST = "isp.bill_not_exist"
_AMOUNT_RE = re.compile(r"^\d{1,10}\.\d{2}$")
# yyyy-MM-dd only: date.fromisoformat alone would also take "2026-W48-1" or "20261201".
_DAY_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_ID_RE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
_MAX_ADDED = 10_000


def invalid_arguments(detail: str) -> ApiError:
    # Alipay's words are only 入参不合法; the sandbox adds why, for whoever reads the logs.
    return ApiError("40004", "Business Failed", INVALID_ARGUMENTS, f"入参不合法: {detail}")


def bill_not_exist() -> ApiError:
    return ApiError("40004", "Business Failed", BILL_NOT_EXIST, "账单不存在")


@dataclass
class DayEdits:
    added: list[BillRecord] = field(default_factory=list)
    dropped: set[str] = field(default_factory=set)
    amounts: dict[str, Decimal] = field(default_factory=dict)
    corrupt: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"added": len(self.added), "drop": sorted(self.dropped),
                "amounts": {k: f"{v:.2f}" for k, v in sorted(self.amounts.items())},
                "corrupt": self.corrupt}


def _key(record: BillRecord) -> str:
    return record.out_request_no if record.type == REFUND and record.out_request_no \
        else record.trade_no


def _amount(value: Any, what: str) -> Decimal:
    if not isinstance(value, str) or not _AMOUNT_RE.fullmatch(value) or Decimal(value) <= 0:
        raise ValueError(f"{what} must be a positive amount like \"9.90\", not {value!r}")
    return Decimal(value)


def _text(value: Any, what: str, *, pattern: re.Pattern[str] = _ID_RE) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ValueError(f"{what} must be 1-64 of [A-Za-z0-9_-], not {value!r}")
    return value


def parse_edits(body: Any, day: date) -> tuple[list[BillRecord], list[str],
                                                dict[str, Decimal], tuple[bool, str | None]]:
    """The edits in a hook's JSON body; ValueError naming what is wrong."""
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    unknown = set(body) - {"add", "drop", "amounts", "corrupt"}
    if unknown:
        raise ValueError(f"unknown keys: {', '.join(sorted(unknown))}")
    added: list[BillRecord] = []
    rows = body.get("add", [])
    if not isinstance(rows, list) or len(rows) > _MAX_ADDED:
        raise ValueError(f"add must be a list of at most {_MAX_ADDED} rows")
    noon = datetime.combine(day, datetime.min.time(), SHANGHAI) + timedelta(hours=12)
    for n, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"add[{n}] must be an object")
        kind = row.get("type", PAYMENT)
        if kind not in (PAYMENT, REFUND):
            raise ValueError(f"add[{n}].type must be {PAYMENT} or {REFUND}")
        when = noon
        if row.get("time") is not None:
            try:
                when = datetime.strptime(str(row["time"]), _TIME_FORMAT).replace(tzinfo=SHANGHAI)
            except ValueError as exc:
                raise ValueError(f"add[{n}].time must be yyyy-MM-dd HH:mm:ss") from exc
            if when.date() != day:
                raise ValueError(f"add[{n}].time is not on {day}")
        request_no = None
        if kind == REFUND:
            request_no = _text(row.get("out_request_no"), f"add[{n}].out_request_no")
        added.append(BillRecord(
            kind, _text(row.get("trade_no"), f"add[{n}].trade_no"),
            _text(row.get("out_trade_no"), f"add[{n}].out_trade_no"), "sandbox test row",
            _amount(row.get("amount"), f"add[{n}].amount"), when - timedelta(minutes=1), when,
            out_request_no=request_no))
    dropped = body.get("drop", [])
    if not isinstance(dropped, list):
        raise ValueError("drop must be a list of trade or request numbers")
    drops = [_text(x, "drop[]") for x in dropped]
    amounts = body.get("amounts", {})
    if not isinstance(amounts, dict):
        raise ValueError("amounts must map a trade or request number to an amount")
    changes = {_text(k, "amounts key"): _amount(v, f"amounts[{k}]") for k, v in amounts.items()}
    corrupt = body.get("corrupt")
    if corrupt is not None and corrupt not in CORRUPTIONS:
        raise ValueError(f"corrupt must be null or one of {', '.join(CORRUPTIONS)}")
    return added, drops, changes, ("corrupt" in body, corrupt)


@dataclass(frozen=True)
class _Issued:
    body: bytes
    expires: datetime


class BillDesk:
    """Issues bill URLs, serves the files behind them, keeps the tests' edits."""

    def __init__(self, records_of: Callable[[date], Iterable[BillRecord]], seller_id: str,
                 clock: Callable[[], datetime], *, serve_today: bool = False) -> None:
        self._records_of = records_of
        self._seller_id = seller_id
        self._clock = clock
        self.serve_today = serve_today
        self._lock = threading.Lock()
        self._edits: dict[date, DayEdits] = {}
        self._issued: dict[str, _Issued] = {}

    # --- the test hook ---------------------------------------------------------

    def edit(self, day: date, body: Any) -> dict[str, Any]:
        added, drops, amounts, (has_corrupt, corrupt) = parse_edits(body, day)
        with self._lock:
            edits = self._edits.setdefault(day, DayEdits())
            edits.added.extend(added)
            edits.dropped.update(drops)
            edits.amounts.update(amounts)
            if has_corrupt:
                edits.corrupt = corrupt
            return edits.to_json()

    def clear(self, day: date) -> None:
        with self._lock:
            self._edits.pop(day, None)

    # --- Alipay's side -----------------------------------------------------------

    def issue(self, biz: dict[str, Any], base_url: str) -> dict[str, str]:
        """The API's answer fields, or ApiError as Alipay refuses."""
        if biz.get("bill_type") != "trade":
            raise invalid_arguments("bill_type 仅支持 trade")
        text = biz.get("bill_date")
        try:
            day = parse_day(text) if isinstance(text, str) else None
        except ValueError:
            day = None
        if day is None:
            raise invalid_arguments("bill_date 格式应为 yyyy-MM-dd")
        now = self._clock()
        today = now.astimezone(SHANGHAI).date()
        if day > today or (day == today and not self.serve_today):
            raise invalid_arguments("不支持下载当日及以后的账单 (T+1)")
        records, corrupt = self._day(day)
        if not records:
            raise bill_not_exist()
        body = bill_bytes(records, day=day, seller_id=self._seller_id, corrupt=corrupt,
                          exported_at=now)
        token = secrets.token_hex(16)
        with self._lock:
            self._issued = {k: v for k, v in self._issued.items() if v.expires > now}
            self._issued[token] = _Issued(body, now + URL_LIFETIME)
        name = f"{account_of(self._seller_id)}_{day:%Y%m%d}.csv.zip"
        return {"code": "10000", "msg": "Success", "bill_download_url": (
            f"{base_url}{DOWNLOAD_PATH}?bizType=trade&userId={self._seller_id}"
            f"&fileType=csv.zip&bizDates={day:%Y%m%d}&downloadFileName={name}"
            f"&fileId={token}")}

    def download(self, token: str) -> bytes | None:
        """The file of an unexpired URL; None otherwise."""
        now = self._clock()
        with self._lock:
            issued = self._issued.get(token)
        if issued is None or issued.expires <= now:
            return None
        return issued.body

    def _day(self, day: date) -> tuple[list[BillRecord], str | None]:
        with self._lock:
            edits = self._edits.get(day, DayEdits())
            edits = replace(edits, added=list(edits.added), dropped=set(edits.dropped),
                            amounts=dict(edits.amounts))
        rows: list[BillRecord] = []
        for record in [*self._records_of(day), *edits.added]:
            key = _key(record)
            if key in edits.dropped:
                continue
            if key in edits.amounts:
                record = replace(record, amount=edits.amounts[key], receipt_amount=None)
            rows.append(record)
        return rows, edits.corrupt


def parse_day(text: str) -> date:
    """``"2026-12-01"`` -> that day; ValueError for anything but a real yyyy-MM-dd."""
    try:
        if not _DAY_RE.fullmatch(text):
            raise ValueError(text)
        return date.fromisoformat(text)
    except ValueError as exc:
        raise ValueError(f"{text} is not a day (yyyy-MM-dd)") from exc


__all__ = ["BILLS_TODAY_ENV", "BILL_NOT_EXIST", "DOWNLOAD_PATH", "EDITS_RE", "INVALID_ARGUMENTS",
           "URL_LIFETIME", "BillDesk", "parse_day"]
