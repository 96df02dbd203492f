"""Alipay's daily trade bill as the sandbox serves it: the zip behind
``bill_download_url`` for ``bill_type=trade``.

``write_bill(out, records, day=...)`` writes the zip Alipay serves (layout:
../shared/alipay/, whose sample this writer reproduces byte for byte): two entries,
``<account>_<yyyyMMdd>_业务明细.csv`` and ``<account>_<yyyyMMdd>_业务明细(汇总).csv``
(the account is the seller pid followed by ``0156``), with GBK names stored without
the zip's UTF-8 flag and GBK text; in the detail the ``#`` comment lines, the
section lines, the column header, one row per record (text ids ending in a tab,
refunds negative with their out_request_no), and the footer totals; in the summary
the day's 合计 row. Records are written as they come, straight into the zip
entry's stream, so a day of 200,000 rows never exists as one string.

``corrupt`` writes one of the bad bills the reconciliation must refuse:

- ``not-zip``: the detail's text served bare, not zipped;
- ``utf8``: both entries' text in UTF-8 instead of GBK;
- ``no-footer``: the detail without its footer lines (the totals and 导出时间);
- ``bad-total``: the footer's 交易合计 one fen more than the rows add up to;
- ``bad-amount``: the first row's 商家实收 written with one decimal (``59.9``).

``measure_parse_memory(rows)`` writes a bill of that many rows to a temporary file
and reports the peak memory (tracemalloc) of writing it and of parsing it with
``chalicelib.bill``: ``python -m local.alipay_sandbox.bills 20000 200000``.
"""

from __future__ import annotations

import io
import logging
import sys
import tempfile
import tracemalloc
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import IO, Any, Literal

from .constants import LOCAL_SELLER_ID
from .signer import ALIPAY_TIME_FORMAT, SHANGHAI

logger = logging.getLogger(__name__)

PAYMENT = "交易"
REFUND = "退款"

Corruption = Literal["not-zip", "utf8", "no-footer", "bad-total", "bad-amount"]
CORRUPTIONS: tuple[str, ...] = ("not-zip", "utf8", "no-footer", "bad-total", "bad-amount")

DEFAULT_FEE_RATE = Decimal("0.006")
"""Alipay's usual service fee on a payment (0.6%), given back in proportion on a refund."""

DEFAULT_BUYER_ACCOUNT = "buyer***@example.com"
"""对方账户 as the bill shows it: the buyer's login, masked."""

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
_DASHES = "-" * 41
_END_DASHES = "-" * 36


@dataclass(frozen=True)
class BillRecord:
    """One payment or refund of the day. ``amount`` is what moved, positive: a refund
    is written negative, as Alipay does. ``created`` is the trade's creation, ``finished``
    its payment or (for a refund) the refund; aware datetimes, written in Asia/Shanghai."""

    type: str  # PAYMENT (交易) or REFUND (退款)
    trade_no: str
    out_trade_no: str
    subject: str
    amount: Decimal | str
    created: datetime
    finished: datetime
    out_request_no: str | None = None  # a refund's
    receipt_amount: Decimal | str | None = None  # 商家实收; the amount when None
    fee: Decimal | str | None = None  # 服务费 as written (signed); from the fee rate when None


@dataclass(frozen=True)
class WrittenTotals:
    """What the footer says: counts and 商家实收 sums in fen (refunds negative)."""

    payments: int
    payments_fen: int
    refunds: int
    refunds_fen: int


def account_of(seller_id: str) -> str:
    """The bill's account: the seller pid followed by 0156."""
    return f"{seller_id}0156"


def entry_names(day: date, seller_id: str = LOCAL_SELLER_ID) -> tuple[str, str]:
    """The detail's and the summary's entry names for ``day``."""
    prefix = f"{account_of(seller_id)}_{day:%Y%m%d}"
    return f"{prefix}_业务明细.csv", f"{prefix}_业务明细(汇总).csv"


def _fen(value: Decimal | str) -> int:
    amount = Decimal(value)
    cents = amount.quantize(Decimal("0.01"))
    if cents != amount:
        raise ValueError(f"not an amount in fen: {value!r}")
    return int(cents * 100)


def _yuan(fen: int) -> str:
    sign = "-" if fen < 0 else ""
    return f"{sign}{abs(fen) // 100}.{abs(fen) % 100:02d}"


def _fee_fen(amount_fen: int, rate: Decimal) -> int:
    return int((Decimal(amount_fen) * rate).quantize(Decimal("1"), rounding=ROUND_HALF_UP))


def _text(value: str) -> str:
    """A cell of free text: one line, quoted the CSV way when it holds a comma or a quote."""
    value = value.replace("\r", " ").replace("\n", " ")
    if "," in value or '"' in value:
        return '"' + value.replace('"', '""') + '"'
    return value


def _local(moment: datetime) -> str:
    return moment.astimezone(SHANGHAI).strftime(ALIPAY_TIME_FORMAT)


def _date_range(day: date) -> str:
    nxt = day + timedelta(days=1)
    return (f"#起始日期：[{day:%Y年%m月%d日} 00:00:00]   "
            f"终止日期：[{nxt:%Y年%m月%d日} 00:00:00]\n")


class _GbkName(zipfile.ZipInfo):
    """An entry whose name is stored as GBK bytes with no UTF-8 flag, as Alipay's are."""

    def _encodeFilenameFlags(self) -> tuple[bytes, int]:  # noqa: N802 (zipfile's own name)
        return self.filename.encode("gbk"), self.flag_bits & ~0x800


class _Totals:
    def __init__(self) -> None:
        self.payments = self.payments_fen = self.refunds = self.refunds_fen = 0
        self.amount_fen = self.fee_fen = 0


def _write_detail(
    text: IO[str],
    records: Iterable[BillRecord],
    *,
    day: date,
    seller_id: str,
    corrupt: str | None,
    exported_at: datetime,
    fee_rate: Decimal,
    buyer_account: str,
) -> _Totals:
    text.write("#支付宝业务明细查询\n")
    text.write(f"#账号：[{account_of(seller_id)}]\n")
    text.write(_date_range(day))
    text.write(f"#{_DASHES}业务明细列表{_DASHES[:-1]}\n")
    text.write(",".join(DETAIL_COLUMNS) + "\n")
    totals = _Totals()
    first = True
    for record in records:
        if record.type not in (PAYMENT, REFUND):
            raise ValueError(f"a bill row is {PAYMENT} or {REFUND}, not {record.type!r}")
        amount = _fen(record.amount)
        received = amount if record.receipt_amount is None else _fen(record.receipt_amount)
        if amount < 0 or received < 0:
            raise ValueError(f"amounts are given positive (refunds are written negative): {record}")
        sign = 1 if record.type == PAYMENT else -1
        fee = (-sign * _fee_fen(received, fee_rate)) if record.fee is None else _fen(record.fee)
        amount, received = sign * amount, sign * received
        if record.type == PAYMENT:
            totals.payments += 1
            totals.payments_fen += received
        else:
            totals.refunds += 1
            totals.refunds_fen += received
        totals.amount_fen += amount
        totals.fee_fen += fee
        received_cell = _yuan(received)
        if first and corrupt == "bad-amount":
            received_cell = received_cell[:-1]  # one decimal: "59.90" -> "59.9"
        first = False
        request_no = record.out_request_no if record.type == REFUND else None
        cells = (
            record.trade_no + "\t", record.out_trade_no + "\t", record.type,
            _text(record.subject), _local(record.created), _local(record.finished),
            "", "", "", "", buyer_account, _yuan(amount), received_cell,
            "0.00", "0.00", "0.00", "0.00", "0.00", "", "0.00", "0.00",
            (request_no + "\t") if request_no else "", _yuan(fee), "0.00", "",
        )
        text.write(",".join(cells) + "\n")
    if first and corrupt == "bad-amount":
        raise ValueError("bad-amount corrupts the first row: the bill has none")
    text.write(f"#{_DASHES}业务明细列表结束{_END_DASHES}\n")
    if corrupt != "no-footer":
        stated_payments = totals.payments_fen + (1 if corrupt == "bad-total" else 0)
        text.write(f"#交易合计：{totals.payments}笔，商家实收共{_yuan(stated_payments)}元，"
                   "商家优惠共0.00元\n")
        text.write(f"#退款合计：{totals.refunds}笔，商家实收退款共{_yuan(totals.refunds_fen)}元，"
                   "商家优惠退款共0.00元\n")
        text.write(f"#导出时间：[{exported_at.astimezone(SHANGHAI):%Y年%m月%d日 %H:%M:%S}]\n")
    return totals


def _write_summary(
    text: IO[str], totals: _Totals, *, day: date, seller_id: str, exported_at: datetime
) -> None:
    text.write("#支付宝业务汇总查询\n")
    text.write(f"#账号：[{account_of(seller_id)}]\n")
    text.write(_date_range(day))
    text.write(f"#{_DASHES}业务汇总列表{_DASHES[:-1]}\n")
    text.write(",".join(SUMMARY_COLUMNS) + "\n")
    received = totals.payments_fen + totals.refunds_fen
    text.write(
        f",合计,{totals.payments},{totals.refunds},{_yuan(totals.amount_fen)},{_yuan(received)},"
        f"0.00,0.00,0.00,{_yuan(totals.fee_fen)},0.00,{_yuan(received + totals.fee_fen)}\n"
    )
    text.write(f"#{_DASHES}业务汇总列表结束{_END_DASHES}\n")
    text.write(f"#导出时间：[{exported_at.astimezone(SHANGHAI):%Y年%m月%d日 %H:%M:%S}]\n")


def write_bill(
    out: IO[bytes],
    records: Iterable[BillRecord],
    *,
    day: date,
    seller_id: str = LOCAL_SELLER_ID,
    corrupt: str | None = None,
    exported_at: datetime | None = None,
    fee_rate: Decimal = DEFAULT_FEE_RATE,
    buyer_account: str = DEFAULT_BUYER_ACCOUNT,
) -> WrittenTotals:
    """Writes the day's bill zip to ``out`` (a binary file; seekable is best, zipfile
    streams to an unseekable one too) from ``records`` in the order given, and answers
    the totals the footer states (before any ``bad-total``). ``exported_at`` defaults
    to now; subjects are written GBK with ``?`` for what GBK lacks, as a GBK file must."""
    if corrupt is not None and corrupt not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {corrupt!r}; known: {', '.join(CORRUPTIONS)}")
    exported = exported_at or datetime.now(UTC)
    encoding = "utf-8" if corrupt == "utf8" else "gbk"
    detail_name, summary_name = entry_names(day, seller_id)

    def detail(text: IO[str]) -> _Totals:
        return _write_detail(text, records, day=day, seller_id=seller_id, corrupt=corrupt,
                             exported_at=exported, fee_rate=fee_rate, buyer_account=buyer_account)

    if corrupt == "not-zip":
        text = io.TextIOWrapper(out, encoding="gbk", errors="replace", newline="")
        try:
            totals = detail(text)
        finally:
            text.flush()
            text.detach()  # the caller's stream stays open
        return WrittenTotals(totals.payments, totals.payments_fen, totals.refunds,
                             totals.refunds_fen)

    stamp = exported.astimezone(SHANGHAI).timetuple()[:6]
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        info = _GbkName(detail_name, date_time=stamp)
        info.compress_type = zipfile.ZIP_DEFLATED
        with archive.open(info, "w") as raw, io.TextIOWrapper(
            raw, encoding=encoding, errors="replace", newline=""
        ) as text:
            totals = detail(text)
        info = _GbkName(summary_name, date_time=stamp)
        info.compress_type = zipfile.ZIP_DEFLATED
        with archive.open(info, "w") as raw, io.TextIOWrapper(
            raw, encoding=encoding, errors="replace", newline=""
        ) as text:
            _write_summary(text, totals, day=day, seller_id=seller_id, exported_at=exported)
    return WrittenTotals(totals.payments, totals.payments_fen, totals.refunds, totals.refunds_fen)


def bill_bytes(records: Iterable[BillRecord], *, day: date, **options: Any) -> bytes:
    """The bill zip as bytes (a day of a few thousand rows; larger days: ``write_bill``
    to a file)."""
    buffer = io.BytesIO()
    write_bill(buffer, records, day=day, **options)
    return buffer.getvalue()


# -- measuring -------------------------------------------------------------------


def synthetic_records(count: int, day: date) -> Iterator[BillRecord]:
    """``count`` rows for ``day``, one refund after every nine payments, made one at a
    time (for benchmarks and the memory check)."""
    start = datetime.combine(day, time(0, 0), SHANGHAI)
    for i in range(count):
        trade_no = f"{day:%Y%m%d}2200140{i:013d}"
        out_trade_no = f"ORDER_{i:013d}_{i * 7919 % 16**16:016x}"
        created = start + timedelta(seconds=i * 86000 // max(count, 1))
        finished = created + timedelta(seconds=20)
        if i % 10 == 9:
            yield BillRecord(REFUND, trade_no, out_trade_no, f"青瓷茶杯 {i}", "1.00", created,
                             finished, out_request_no=f"REFUND_{out_trade_no}_1")
        else:
            yield BillRecord(PAYMENT, trade_no, out_trade_no, f"青瓷茶杯 {i}",
                             _yuan(100 + i % 1000000), created, finished)


def measure_parse_memory(rows: int, day: date = date(2026, 12, 1)) -> dict[str, int]:
    """Writes a bill of ``rows`` rows to a temporary file, then parses it with
    ``chalicelib.bill``; answers the peak traced memory (bytes) of each step, the
    file's size and the rows read."""
    from chalicelib.bill import BillReader  # the shop's parser, measured against this writer

    with tempfile.TemporaryFile() as f:
        tracemalloc.start()
        write_bill(f, synthetic_records(rows, day), day=day,
                   exported_at=datetime.combine(day + timedelta(days=1), time(9), SHANGHAI))
        _, write_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        size = f.tell()
        f.seek(0)
        tracemalloc.start()
        with BillReader(f) as bill:
            read = sum(1 for _ in bill.rows())
            bill.totals()
        _, parse_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return {"rows": read, "file_bytes": size, "write_peak_bytes": write_peak,
            "parse_peak_bytes": parse_peak}


def _main(argv: list[str]) -> None:
    for count in (int(a) for a in argv or ["20000", "200000"]):
        m = measure_parse_memory(count)
        sys.stdout.write(
            f"{m['rows']:>8} rows  zip {m['file_bytes'] / 1e6:6.1f} MB  "
            f"write peak {m['write_peak_bytes'] / 1024:8.1f} KiB  "
            f"parse peak {m['parse_peak_bytes'] / 1024:8.1f} KiB\n"
        )


if __name__ == "__main__":
    _main(sys.argv[1:])
