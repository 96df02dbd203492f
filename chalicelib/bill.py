"""Alipay's daily trade bill (``bill_type=trade``), read as a stream.

The file ``bill_download_url`` serves is a zip with two GBK text files whose entry
names are GBK too (stored without the zip's UTF-8 flag, so ``zipfile`` shows them
decoded as cp437):

- ``<account>_<yyyyMMdd>_业务明细.csv``, the detail: ``#`` comment lines (title,
  account, date range), the section line ``#---...业务明细列表---...``, the column
  header row, one row per payment (业务类型 交易) and per refund (退款: negative
  amounts, the out_request_no in 退款批次号/请求号), text cells ending in a tab, the
  section's end line ``#---...业务明细列表结束---...`` and the footer
  ``#交易合计：N笔，商家实收共X元...``, ``#退款合计：N笔，商家实收退款共X元...``,
  ``#导出时间：[...]``;
- ``<account>_<yyyyMMdd>_业务明细(汇总).csv``, the summary: its own comment lines
  and section, one row per store and a 合计 row with the day's counts and sums.

``BillReader(source).rows()`` yields the detail's rows one at a time (a day of
200,000 rows is read in flat memory) and only after the last row checks the
footer against the rows and the summary against both; ``totals()`` then answers
the checked counts and sums. A caller streams the rows into its matcher and learns
at the end, from ``rows()`` ending normally or raising ``BillError``, whether the
file was whole::

    with BillReader(fileobj) as bill:
        for row in bill.rows():
            matcher.add(row)
        totals = bill.totals()

Money is integer fen, read with a strict ``-?\\d+\\.\\d{2}``. Every fault of the
file is a ``BillError`` naming the entry and the line. A zip without the summary
is refused: Alipay always serves it, so a bill without one is not Alipay's bill
as served (cut short, or made by something else).
"""

from __future__ import annotations

import codecs
import csv
import enum
import io
import logging
import os
import re
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from typing import IO, Any

logger = logging.getLogger(__name__)

# China has had no daylight saving time since 1991: a fixed offset is exact for
# every bill and saves a tz database lookup per cell.
SHANGHAI = timezone(timedelta(hours=8), "Asia/Shanghai")

DETAIL_TITLE = "#支付宝业务明细查询"
SUMMARY_TITLE = "#支付宝业务汇总查询"

DETAIL_COLUMNS: tuple[str, ...] = (
    "支付宝交易号", "商户订单号", "业务类型", "商品名称", "创建时间", "完成时间", "门店编号",
    "门店名称", "操作员", "终端号", "对方账户", "订单金额（元）", "商家实收（元）",
    "支付宝红包（元）", "集分宝（元）", "支付宝优惠（元）", "商家优惠（元）", "券核销金额（元）",
    "券名称", "商家红包消费金额（元）", "卡消费金额（元）", "退款批次号/请求号", "服务费（元）",
    "分润（元）", "备注",
)
SUMMARY_COLUMNS: tuple[str, ...] = (
    "门店编号", "门店名称", "交易订单总笔数", "退款订单总笔数", "订单金额（元）", "商家实收（元）",
    "支付宝优惠（元）", "商家优惠（元）", "卡消费金额（元）", "服务费（元）", "分润（元）",
    "实收净额（元）",
)

_COL_TRADE_NO = "支付宝交易号"
_COL_OUT_TRADE_NO = "商户订单号"
_COL_TYPE = "业务类型"
_COL_SUBJECT = "商品名称"
_COL_CREATED = "创建时间"
_COL_FINISHED = "完成时间"
_COL_AMOUNT = "订单金额（元）"
_COL_RECEIVED = "商家实收（元）"
_COL_REQUEST_NO = "退款批次号/请求号"
_COL_FEE = "服务费（元）"
# Money cells other than the two every row must have: checked when not empty.
_OTHER_MONEY = tuple(
    c for c in DETAIL_COLUMNS if c.endswith("（元）") and c not in (_COL_AMOUNT, _COL_RECEIVED)
)

_DETAIL_NAME = re.compile(r"(?P<account>\d+)_(?P<day>\d{8})_业务明细\.csv")
_SUMMARY_NAME = re.compile(r"(?P<account>\d+)_(?P<day>\d{8})_业务明细\(汇总\)\.csv")
_DETAIL_START = re.compile(r"#-+业务明细列表-+")
_DETAIL_END = re.compile(r"#-+业务明细列表结束-+")
_SUMMARY_START = re.compile(r"#-+业务汇总列表-+")
_SUMMARY_END = re.compile(r"#-+业务汇总列表结束-+")
_ACCOUNT_LINE = re.compile(r"#账号：\[(?P<account>[^\]]*)\]")
_PAYMENTS_FOOTER = re.compile(r"#交易合计：(?P<count>\d+)笔，商家实收共(?P<sum>-?\d+\.\d{2})元")
_REFUNDS_FOOTER = re.compile(r"#退款合计：(?P<count>\d+)笔，商家实收退款共(?P<sum>-?\d+\.\d{2})元")
_EXPORTED_FOOTER = "#导出时间："
_MONEY = re.compile(r"-?\d+\.\d{2}")
_TIME = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}")
# The optional money cells of a row, joined by commas, in one match (the common case).
_MONEY_CELLS = re.compile(r"(?:-?\d+\.\d{2})?(?:,(?:-?\d+\.\d{2})?)*")

_UTF8_FLAG = 0x800


class BillError(Exception):
    """The bill is not whole or not Alipay's format. ``str()`` names the file and line."""

    def __init__(self, reason: str, *, entry: str | None = None, line: int | None = None):
        self.reason = reason
        self.entry = entry
        self.line = line
        where = entry or "bill"
        if line is not None:
            where = f"{where}, line {line}"
        super().__init__(f"{where}: {reason}")


class RowKind(enum.StrEnum):
    PAYMENT = "PAYMENT"  # 业务类型 交易
    REFUND = "REFUND"  # 业务类型 退款


_KINDS = {"交易": RowKind.PAYMENT, "退款": RowKind.REFUND}


@dataclass(frozen=True, slots=True)
class BillRow:
    """One row of the detail. Amounts in fen, as the bill says them: a refund's are
    negative. ``raw`` holds every cell by column name (trimmed of the tab Alipay puts
    after text cells), as evidence."""

    kind: RowKind
    trade_no: str
    out_trade_no: str
    request_no: str | None  # a refund's out_request_no; None for payments
    subject: str
    amount_fen: int  # 订单金额
    merchant_received_fen: int  # 商家实收: what the footer totals add up
    fee_fen: int  # 服务费: negative on a payment, given back (positive) on a refund
    created_at: datetime  # UTC
    finished_at: datetime  # UTC; a refund's is the refund's time
    line_no: int
    raw: dict[str, str]


@dataclass(frozen=True, slots=True)
class BillTotals:
    """A day's counts and sums (商家实收, fen), as the footer states them and the rows
    add up to. ``refunds_fen`` is negative or zero, as in the bill."""

    payments: int
    payments_fen: int
    refunds: int
    refunds_fen: int
    amount_fen: int  # 订单金额 of all rows, payments and refunds
    fee_fen: int  # 服务费 of all rows


def _fen(text: str) -> int | None:
    if _MONEY.fullmatch(text) is None:
        return None
    # exactly two decimals: dropping the point gives the fen ("-0.60" -> -60)
    return int(text.replace(".", "", 1))


def _yuan(fen: int) -> str:
    sign = "-" if fen < 0 else ""
    return f"{sign}{abs(fen) // 100}.{abs(fen) % 100:02d}"


def _entry_name(info: zipfile.ZipInfo) -> str:
    """The entry's real name: Alipay writes GBK bytes without the UTF-8 flag, which
    zipfile has decoded as cp437."""
    if info.flag_bits & _UTF8_FLAG:
        return info.filename
    try:
        raw = info.filename.encode("cp437")
    except UnicodeEncodeError:  # zipfile decoded it some other way
        return info.filename
    for encoding in ("gbk", "utf-8"):
        try:
            name = raw.decode(encoding)
        except UnicodeDecodeError:
            continue
        base = name.rsplit("/", 1)[-1]
        if _DETAIL_NAME.fullmatch(base) or _SUMMARY_NAME.fullmatch(base):
            return name
    return info.filename


def _split(line: str) -> list[str]:
    cells = next(csv.reader([line])) if '"' in line else line.split(",")
    return [c.strip() for c in cells]


class BillReader:
    """Reads one bill zip. Opening finds the entries (``BillError`` at once when the
    source is not a zip or has no detail file); ``rows()`` streams the detail and
    checks the totals at its end; ``totals()`` answers them once ``rows()`` has run
    to its end. ``source`` is a seekable binary file object or a path."""

    def __init__(self, source: IO[bytes] | str | os.PathLike[str]):
        self.source_name = _source_name(source)
        try:
            self._zip = zipfile.ZipFile(source)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as exc:
            raise BillError(f"not a zip file ({exc})", entry=self.source_name) from exc
        self._detail: zipfile.ZipInfo | None = None
        self._summary: zipfile.ZipInfo | None = None
        self.detail_name = ""
        self.summary_name = ""
        self.account = ""
        self.bill_date: date | None = None
        self._find_entries()
        self._started = False
        self._totals: BillTotals | None = None

    # -- the zip ---------------------------------------------------------------

    def _find_entries(self) -> None:
        names = []
        for info in self._zip.infolist():
            if info.is_dir():
                continue
            name = _entry_name(info)
            names.append(name)
            base = name.rsplit("/", 1)[-1]
            if m := _DETAIL_NAME.fullmatch(base):
                if self._detail is not None:
                    raise BillError(
                        f"two detail entries: {self.detail_name} and {name}", entry=self.source_name
                    )
                self._detail, self.detail_name = info, name
                self.account = m["account"]
                try:
                    self.bill_date = datetime.strptime(m["day"], "%Y%m%d").date()
                except ValueError as exc:
                    raise BillError(f"no such day in the entry's name: {m['day']}",
                                    entry=name) from exc
            elif _SUMMARY_NAME.fullmatch(base):
                self._summary, self.summary_name = info, name
        if self._detail is None:
            raise BillError(
                f"no detail entry <account>_<yyyyMMdd>_业务明细.csv in the zip (entries: {names})",
                entry=self.source_name,
            )
        if self._summary is None:
            raise BillError(
                "no summary entry <account>_<yyyyMMdd>_业务明细(汇总).csv in the zip "
                f"(entries: {names})",
                entry=self.source_name,
            )

    def _check_encoding(self, info: zipfile.ZipInfo, name: str, title: str) -> None:
        """The first line must be the title once decoded as GBK. When it is not, say
        whether the text is UTF-8 (a GBK decoder reads UTF-8 Chinese as mojibake or
        fails on it, so the title check is what tells them apart)."""
        try:
            with self._zip.open(info) as raw:
                head = raw.readline(4096)
        except (zipfile.BadZipFile, EOFError, zlib.error, OSError, RuntimeError) as exc:
            raise BillError(f"the entry is damaged ({exc})", entry=name, line=1) from exc
        first = head.rstrip(b"\r\n")
        try:
            if first.decode("gbk") == title:
                return
        except UnicodeDecodeError:
            pass
        as_utf8 = first.removeprefix(codecs.BOM_UTF8).decode("utf-8", errors="replace")
        if as_utf8 == title:
            raise BillError("the text is UTF-8, not GBK as Alipay writes it", entry=name, line=1)
        shown = first[:80].decode("gbk", errors="replace")
        raise BillError(f"the first line is {shown!r}, not the title {title!r} in GBK",
                        entry=name, line=1)

    def _lines(self, info: zipfile.ZipInfo, name: str) -> Iterator[tuple[int, str]]:
        """The entry's lines, decoded one at a time: a GBK trail byte is never a newline,
        so splitting the bytes first is safe, and a bad byte is named with its line."""
        n = 0
        try:
            with self._zip.open(info) as entry, io.BufferedReader(entry, 1 << 16) as raw:
                for n, data in enumerate(raw, 1):
                    try:
                        line = data.decode("gbk")
                    except UnicodeDecodeError as exc:
                        raise BillError(
                            f"not GBK text: byte {data[exc.start:exc.start + 1]!r} at column "
                            f"{exc.start + 1}", entry=name, line=n,
                        ) from exc
                    yield n, line.rstrip("\r\n")
        except (zipfile.BadZipFile, EOFError, zlib.error, OSError, RuntimeError) as exc:
            # read ahead in blocks: the damage is on this line or further on
            raise BillError(f"the entry is damaged at or after this line ({exc})",
                            entry=name, line=n + 1) from exc

    # -- the detail --------------------------------------------------------------

    def rows(self) -> Iterator[BillRow]:
        """The detail's rows in file order. Raises ``BillError`` at the first fault,
        and after the last row when the footer or the summary disagree with the rows:
        only a ``rows()`` that ends normally has read a whole bill."""
        if self._started:
            raise RuntimeError("rows() reads the bill once")
        self._started = True
        assert self._detail is not None and self._summary is not None
        name = self.detail_name
        self._check_encoding(self._detail, name, DETAIL_TITLE)

        lines = self._lines(self._detail, name)
        try:
            columns, header_line = self._detail_header(lines, name)
            index = {c: i for i, c in enumerate(columns)}
            ncols = len(columns)
            payments = payments_fen = refunds = refunds_fen = amount_fen = fee_fen = 0
            last = header_line
            ended = False
            for n, line in lines:
                last = n
                if not line:
                    continue
                if line.startswith("#"):
                    if _DETAIL_END.fullmatch(line):
                        ended = True
                        break
                    raise BillError(f"a comment line among the rows: {line[:60]!r}",
                                    entry=name, line=n)
                cells = _split(line)
                if len(cells) != ncols:
                    raise BillError(f"{len(cells)} cells; the header has {ncols}",
                                    entry=name, line=n)
                row = _detail_row(cells, index, columns, name, n)
                if row.kind is RowKind.PAYMENT:
                    payments += 1
                    payments_fen += row.merchant_received_fen
                else:
                    refunds += 1
                    refunds_fen += row.merchant_received_fen
                amount_fen += row.amount_fen
                fee_fen += row.fee_fen
                yield row
            if not ended:
                raise BillError(
                    f"the file ends after {payments + refunds} rows without the section's end "
                    "line #---业务明细列表结束--- and the footer: cut short?",
                    entry=name, line=last,
                )
            found = BillTotals(payments, payments_fen, refunds, refunds_fen, amount_fen, fee_fen)
            self._detail_footer(lines, name, found, last)
        finally:
            lines.close()  # the entry's stream, also when the caller stops early
        self._check_summary(found)
        self._totals = found
        logger.info("bill %s read: %d payments %s, %d refunds %s", name, payments,
                    _yuan(payments_fen), refunds, _yuan(refunds_fen))

    def totals(self) -> BillTotals:
        """The checked totals; only once ``rows()`` has run to its end."""
        if self._totals is None:
            raise RuntimeError("totals() is known only after rows() has been read to its end")
        return self._totals

    def _detail_header(
        self, lines: Iterator[tuple[int, str]], name: str
    ) -> tuple[list[str], int]:
        in_section = False
        n = 0
        for n, line in lines:
            if not line:
                continue
            if not in_section:
                if _DETAIL_START.fullmatch(line):
                    in_section = True
                elif not line.startswith("#"):
                    raise BillError("a row before the section line #---业务明细列表---",
                                    entry=name, line=n)
                elif m := _ACCOUNT_LINE.fullmatch(line):
                    if m["account"] != self.account:
                        raise BillError(
                            f"the account {m['account']} is not the entry name's {self.account}",
                            entry=name, line=n,
                        )
                continue
            if line.startswith("#"):
                raise BillError("the column header row is missing after the section line",
                                entry=name, line=n)
            return _check_columns(_split(line), DETAIL_COLUMNS, name, n), n
        raise BillError("the file ends before the column header row", entry=name, line=n)

    def _detail_footer(
        self, lines: Iterator[tuple[int, str]], name: str, found: BillTotals, end_line: int
    ) -> None:
        stated: dict[str, tuple[int, int, int]] = {}  # which -> (count, fen, line)
        exported = False
        last = end_line
        for n, line in lines:
            last = n
            if not line:
                continue
            if not line.startswith("#"):
                raise BillError("a row after the section's end line", entry=name, line=n)
            for which, pattern in (("交易合计", _PAYMENTS_FOOTER), ("退款合计", _REFUNDS_FOOTER)):
                if line.startswith("#" + which):
                    m = pattern.match(line)
                    if m is None:
                        raise BillError(f"a malformed footer line: {line[:80]!r}",
                                        entry=name, line=n)
                    stated[which] = (int(m["count"]), _fen(m["sum"]) or 0, n)
            if line.startswith(_EXPORTED_FOOTER):
                exported = True
        for which in ("交易合计", "退款合计"):
            if which not in stated:
                raise BillError(f"the footer line #{which} is missing", entry=name, line=last)
        if not exported:
            raise BillError(f"the footer line {_EXPORTED_FOOTER} is missing", entry=name, line=last)
        for which, count, fen in (("交易合计", found.payments, found.payments_fen),
                                  ("退款合计", found.refunds, found.refunds_fen)):
            s_count, s_fen, n = stated[which]
            if (s_count, s_fen) != (count, fen):
                raise BillError(
                    f"totals do not add up: #{which} says {s_count} rows, {_yuan(s_fen)} yuan; "
                    f"the rows hold {count}, {_yuan(fen)} yuan",
                    entry=name, line=n,
                )

    # -- the summary -------------------------------------------------------------

    def _check_summary(self, found: BillTotals) -> None:
        assert self._summary is not None
        name = self.summary_name
        self._check_encoding(self._summary, name, SUMMARY_TITLE)
        lines = self._lines(self._summary, name)
        state = "preamble"
        index: dict[str, int] = {}
        total: tuple[list[str], int] | None = None
        last = None
        for n, line in lines:
            last = n
            if not line:
                continue
            if state == "preamble":
                if _SUMMARY_START.fullmatch(line):
                    state = "header"
                elif not line.startswith("#"):
                    raise BillError("a row before the section line #---业务汇总列表---",
                                    entry=name, line=n)
            elif state == "header":
                if line.startswith("#"):
                    raise BillError("the column header row is missing after the section line",
                                    entry=name, line=n)
                columns = _check_columns(_split(line), SUMMARY_COLUMNS, name, n)
                index = {c: i for i, c in enumerate(columns)}
                state = "rows"
            elif state == "rows":
                if _SUMMARY_END.fullmatch(line):
                    state = "footer"
                    continue
                if line.startswith("#"):
                    raise BillError(f"a comment line among the rows: {line[:60]!r}",
                                    entry=name, line=n)
                cells = _split(line)
                if len(cells) != len(index):
                    raise BillError(f"{len(cells)} cells; the header has {len(index)}",
                                    entry=name, line=n)
                if cells[index["门店名称"]] == "合计":
                    total = (cells, n)
        if state != "footer":
            raise BillError("the file ends before the section's end line #---业务汇总列表结束---",
                            entry=name, line=last)
        if total is None:
            raise BillError("no 合计 row in the summary", entry=name, line=last)
        cells, n = total

        def number(column: str) -> int:
            text = cells[index[column]]
            if column.endswith("（元）"):
                value = _fen(text)
            else:
                value = int(text) if text.isdigit() else None
            if value is None:
                raise BillError(f"malformed {column} {text!r}", entry=name, line=n)
            return value

        checks = (
            ("交易订单总笔数", found.payments, False),
            ("退款订单总笔数", found.refunds, False),
            ("订单金额（元）", found.amount_fen, True),
            ("商家实收（元）", found.payments_fen + found.refunds_fen, True),
            ("服务费（元）", found.fee_fen, True),
        )
        for column, expected, money in checks:
            stated = number(column)
            if stated != expected:
                show = _yuan if money else str
                raise BillError(
                    f"the summary does not match the detail: {column} says {show(stated)}; "
                    f"the detail's rows hold {show(expected)}",
                    entry=name, line=n,
                )

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> BillReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _source_name(source: Any) -> str:
    if isinstance(source, str | os.PathLike):
        return os.fspath(source)
    name = getattr(source, "name", None)
    return name if isinstance(name, str) else "bill"


def _check_columns(cells: list[str], expected: tuple[str, ...], name: str, n: int) -> list[str]:
    """The header must name exactly the expected columns (any order: rows are read by
    name); a missing or unknown column means a format this reader does not know."""
    missing = [c for c in expected if c not in cells]
    unknown = [c for c in cells if c not in expected]
    if missing or unknown or len(set(cells)) != len(cells):
        raise BillError(
            f"unexpected column header: missing {missing}, unknown {unknown}"
            + ("" if len(set(cells)) == len(cells) else ", a column twice"),
            entry=name, line=n,
        )
    return cells


def _time(text: str, column: str, name: str, n: int) -> datetime:
    try:
        if _TIME.fullmatch(text) is None:
            raise ValueError(text)
        # the regex fixes the shape; fromisoformat checks the calendar, in C
        return datetime.fromisoformat(text).replace(tzinfo=SHANGHAI).astimezone(UTC)
    except ValueError as exc:
        raise BillError(f"malformed {column} {text!r}", entry=name, line=n) from exc


def _detail_row(
    cells: list[str], index: dict[str, int], columns: list[str], name: str, n: int
) -> BillRow:
    kind_text = cells[index[_COL_TYPE]]
    kind = _KINDS.get(kind_text)
    if kind is None:
        raise BillError(f"unknown 业务类型 {kind_text!r} (known: 交易, 退款)", entry=name, line=n)
    amounts = []
    for column in (_COL_AMOUNT, _COL_RECEIVED):
        text = cells[index[column]]
        fen = _fen(text)
        if fen is None:
            raise BillError(f"malformed amount {text!r} in {column}", entry=name, line=n)
        if (fen < 0) if kind is RowKind.PAYMENT else (fen > 0):
            raise BillError(f"{column} {text} has the wrong sign for a {kind_text} row",
                            entry=name, line=n)
        amounts.append(fen)
    if _MONEY_CELLS.fullmatch(",".join([cells[index[c]] for c in _OTHER_MONEY])) is None:
        for column in _OTHER_MONEY:
            text = cells[index[column]]
            if text and _MONEY.fullmatch(text) is None:
                raise BillError(f"malformed amount {text!r} in {column}", entry=name, line=n)
    trade_no = cells[index[_COL_TRADE_NO]]
    if not trade_no:
        raise BillError("a row without 支付宝交易号", entry=name, line=n)
    request_no = cells[index[_COL_REQUEST_NO]] if kind is RowKind.REFUND else ""
    fee_text = cells[index[_COL_FEE]]  # checked above with the other money cells
    return BillRow(
        kind=kind,
        trade_no=trade_no,
        out_trade_no=cells[index[_COL_OUT_TRADE_NO]],
        request_no=request_no or None,
        subject=cells[index[_COL_SUBJECT]],
        amount_fen=amounts[0],
        merchant_received_fen=amounts[1],
        fee_fen=(_fen(fee_text) or 0) if fee_text else 0,
        created_at=_time(cells[index[_COL_CREATED]], _COL_CREATED, name, n),
        finished_at=_time(cells[index[_COL_FINISHED]], _COL_FINISHED, name, n),
        line_no=n,
        raw=dict(zip(columns, cells, strict=True)),
    )
