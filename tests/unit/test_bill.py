"""Alipay's daily trade bill: the shop's streaming parser (chalicelib/bill.py) against
the shared sample and against the sandbox's writer (local/alipay_sandbox/bills.py),
and every bad bill the reconciliation must refuse, named by entry and line."""

from __future__ import annotations

import io
import zipfile
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from chalicelib.bill import BillError, BillReader, BillRow, BillTotals, RowKind
from local.alipay_sandbox.bills import (
    PAYMENT,
    REFUND,
    BillRecord,
    WrittenTotals,
    bill_bytes,
    entry_names,
    synthetic_records,
    write_bill,
)
from local.alipay_sandbox.constants import LOCAL_SELLER_ID
from local.alipay_sandbox.signer import SHANGHAI

SHARED = Path(__file__).resolve().parents[3] / "shared" / "alipay"
SAMPLE_ZIP = SHARED / "trade-bill-sample.zip"
DAY = date(2026, 12, 1)
DETAIL, SUMMARY = entry_names(DAY, LOCAL_SELLER_ID)

needs_sample = pytest.mark.skipif(not SAMPLE_ZIP.exists(), reason=f"no sample at {SAMPLE_ZIP}")


def shanghai(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(tzinfo=SHANGHAI)


def utc(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)


# The rows of the shared sample (../shared/alipay/make_bill_sample.py), as records.
SAMPLE_RECORDS = [
    BillRecord(PAYMENT, "2026120122001400000000000001", "ORDER_1796100000000_0123456789abcdef",
               "Celadon tea cup and 1 more", "99.70", shanghai("2026-12-01 10:02:11"),
               shanghai("2026-12-01 10:02:40")),
    BillRecord(PAYMENT, "2026120122001400000000000002", "ORDER_1796100360000_fedcba9876543210",
               "Yixing clay teapot", "59.90", shanghai("2026-12-01 11:15:03"),
               shanghai("2026-12-01 11:15:20")),
    BillRecord(REFUND, "2026120122001400000000000001", "ORDER_1796100000000_0123456789abcdef",
               "Celadon tea cup and 1 more", "19.90", shanghai("2026-12-01 10:02:11"),
               shanghai("2026-12-01 16:40:05"),
               out_request_no="REFUND_ORDER_1796100000000_0123456789abcdef_1"),
]
SAMPLE_EXPORTED = shanghai("2026-12-02 09:12:44")


def read_all(data: bytes) -> tuple[list[BillRow], BillTotals]:
    with BillReader(io.BytesIO(data)) as bill:
        rows = list(bill.rows())
        return rows, bill.totals()


def bill_error(data: bytes) -> BillError:
    with pytest.raises(BillError) as caught, BillReader(io.BytesIO(data)) as bill:
        for _ in bill.rows():
            pass
    return caught.value


class _GbkName(zipfile.ZipInfo):
    def _encodeFilenameFlags(self) -> tuple[bytes, int]:  # noqa: N802 (zipfile's own name)
        return self.filename.encode("gbk"), self.flag_bits & ~0x800


def zip_of(files: dict[str, bytes]) -> bytes:
    """A zip as Alipay writes one: GBK names, no UTF-8 flag."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        for name, content in files.items():
            z.writestr(_GbkName(name, date_time=(2026, 12, 2, 9, 12, 44)), content)
    return buffer.getvalue()


def texts(data: bytes) -> tuple[str, str]:
    """The detail's and the summary's text of a good bill, to be edited by a test."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        by_name = {i.filename.encode("cp437").decode("gbk"): z.read(i).decode("gbk")
                   for i in z.infolist()}
    return by_name[DETAIL], by_name[SUMMARY]


def rezip(detail: str, summary: str) -> bytes:
    return zip_of({DETAIL: detail.encode("gbk"), SUMMARY: summary.encode("gbk")})


def sample_bill() -> bytes:
    return bill_bytes(SAMPLE_RECORDS, day=DAY, exported_at=SAMPLE_EXPORTED)


def line_of(text: str, prefix: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), 1) if line.startswith(prefix))


# -- the shared sample -------------------------------------------------------------


@needs_sample
def test_the_shared_sample_parses_to_its_rows_and_totals() -> None:
    rows, totals = read_all(SAMPLE_ZIP.read_bytes())

    assert [(r.kind, r.trade_no, r.out_trade_no, r.request_no, r.amount_fen,
             r.merchant_received_fen, r.fee_fen, r.line_no) for r in rows] == [
        (RowKind.PAYMENT, "2026120122001400000000000001", "ORDER_1796100000000_0123456789abcdef",
         None, 9970, 9970, -60, 6),
        (RowKind.PAYMENT, "2026120122001400000000000002", "ORDER_1796100360000_fedcba9876543210",
         None, 5990, 5990, -36, 7),
        (RowKind.REFUND, "2026120122001400000000000001", "ORDER_1796100000000_0123456789abcdef",
         "REFUND_ORDER_1796100000000_0123456789abcdef_1", -1990, -1990, 12, 8),
    ]
    refund = rows[2]
    assert refund.created_at == utc("2026-12-01 02:02:11")
    assert refund.finished_at == utc("2026-12-01 08:40:05")  # 16:40:05 in Shanghai
    assert refund.subject == "Celadon tea cup and 1 more"
    # raw holds every cell by column, the tab after the ids trimmed
    assert refund.raw["支付宝交易号"] == "2026120122001400000000000001"
    assert refund.raw["退款批次号/请求号"] == "REFUND_ORDER_1796100000000_0123456789abcdef_1"
    assert refund.raw["对方账户"] == "buyer***@example.com"
    assert len(refund.raw) == 25
    assert totals == BillTotals(payments=2, payments_fen=15960, refunds=1, refunds_fen=-1990,
                                amount_fen=13970, fee_fen=-84)


@needs_sample
def test_the_reader_names_the_sample_entries_account_and_day() -> None:
    with BillReader(SAMPLE_ZIP) as bill:
        assert (bill.detail_name, bill.summary_name) == (DETAIL, SUMMARY)
        assert bill.account == "20880000000000010156"
        assert bill.bill_date == DAY


@needs_sample
def test_the_sandbox_writes_the_sample_byte_for_byte() -> None:
    assert sample_bill() == SAMPLE_ZIP.read_bytes()


# -- the writer and the parser ---------------------------------------------------------


def test_written_entries_have_gbk_names_without_the_utf8_flag() -> None:
    with zipfile.ZipFile(io.BytesIO(sample_bill())) as z:
        infos = z.infolist()
    assert [i.flag_bits & 0x800 for i in infos] == [0, 0]
    assert [i.filename.encode("cp437") for i in infos] == [DETAIL.encode("gbk"),
                                                          SUMMARY.encode("gbk")]
    assert DETAIL == "20880000000000010156_20261201_业务明细.csv"
    assert SUMMARY == "20880000000000010156_20261201_业务明细(汇总).csv"


def test_round_trip_of_payments_and_refunds() -> None:
    records = [
        BillRecord(PAYMENT, "2026120122001400000000000011", "ORDER_A", "青瓷茶杯 一对", "0.01",
                   shanghai("2026-12-01 00:00:01"), shanghai("2026-12-01 00:00:09")),
        BillRecord(PAYMENT, "2026120122001400000000000012", "ORDER_B", "宜兴紫砂壶, \"限量\"版",
                   Decimal("99999.99"), shanghai("2026-12-01 12:00:00"),
                   shanghai("2026-12-01 12:00:30")),
        BillRecord(REFUND, "2026120122001400000000000012", "ORDER_B", "宜兴紫砂壶, \"限量\"版",
                   "0.01", shanghai("2026-12-01 12:00:00"), shanghai("2026-12-01 23:59:59"),
                   out_request_no="REFUND_ORDER_B_1"),
        BillRecord(REFUND, "2026120122001400000000000012", "ORDER_B", "宜兴紫砂壶, \"限量\"版",
                   "99999.98", shanghai("2026-12-01 12:00:00"), shanghai("2026-12-01 23:59:59"),
                   out_request_no="REFUND_ORDER_B_2", fee="0.00"),
    ]
    buffer = io.BytesIO()
    written = write_bill(buffer, records, day=DAY)
    rows, totals = read_all(buffer.getvalue())

    assert [(r.kind, r.trade_no, r.out_trade_no, r.request_no, r.subject, r.amount_fen,
             r.merchant_received_fen) for r in rows] == [
        (RowKind.PAYMENT, "2026120122001400000000000011", "ORDER_A", None, "青瓷茶杯 一对", 1, 1),
        (RowKind.PAYMENT, "2026120122001400000000000012", "ORDER_B", None,
         "宜兴紫砂壶, \"限量\"版", 9999999, 9999999),
        (RowKind.REFUND, "2026120122001400000000000012", "ORDER_B", "REFUND_ORDER_B_1",
         "宜兴紫砂壶, \"限量\"版", -1, -1),
        (RowKind.REFUND, "2026120122001400000000000012", "ORDER_B", "REFUND_ORDER_B_2",
         "宜兴紫砂壶, \"限量\"版", -9999998, -9999998),
    ]
    # a second after midnight in Shanghai is still the day before in UTC
    assert rows[0].created_at == utc("2026-11-30 16:00:01")
    assert rows[3].finished_at == utc("2026-12-01 15:59:59")
    assert [r.fee_fen for r in rows] == [0, -60000, 0, 0]  # 0.6%, rounded half up
    assert totals == BillTotals(payments=2, payments_fen=10000000, refunds=2,
                                refunds_fen=-9999999, amount_fen=1, fee_fen=-60000)
    assert written == WrittenTotals(2, 10000000, 2, -9999999)


def test_a_subject_outside_gbk_is_written_with_a_question_mark() -> None:
    record = BillRecord(PAYMENT, "2026120122001400000000000021", "ORDER_C", "茶🍵杯", "1.00",
                        shanghai("2026-12-01 09:00:00"), shanghai("2026-12-01 09:00:05"))
    rows, _ = read_all(bill_bytes([record], day=DAY))
    assert rows[0].subject == "茶?杯"


def test_a_day_without_rows_reads_as_zero_totals() -> None:
    rows, totals = read_all(bill_bytes([], day=DAY))
    assert rows == []
    assert totals == BillTotals(0, 0, 0, 0, 0, 0)


def test_the_writer_refuses_an_unknown_corruption_and_a_negative_amount() -> None:
    with pytest.raises(ValueError, match="unknown corruption"):
        bill_bytes(SAMPLE_RECORDS, day=DAY, corrupt="truncated")
    negative = BillRecord(REFUND, "1", "O", "s", "-1.00", shanghai("2026-12-01 09:00:00"),
                          shanghai("2026-12-01 09:00:00"), out_request_no="R")
    with pytest.raises(ValueError, match="positive"):
        bill_bytes([negative], day=DAY)


# -- streaming -------------------------------------------------------------------------


def test_rows_stream_before_the_footer_is_checked() -> None:
    """A caller sees each row as it is read, and learns at the end that the file was not
    whole; totals() is never given for a bill read only in part."""
    data = bill_bytes(SAMPLE_RECORDS, day=DAY, corrupt="bad-total")
    seen: list[str] = []
    with BillReader(io.BytesIO(data)) as bill:
        with pytest.raises(BillError, match="totals do not add up"):
            for row in bill.rows():
                seen.append(row.trade_no)
        with pytest.raises(RuntimeError):
            bill.totals()
    assert len(seen) == 3


def test_totals_before_the_rows_are_read_is_a_mistake() -> None:
    with BillReader(io.BytesIO(sample_bill())) as bill:
        rows = bill.rows()
        next(rows)
        with pytest.raises(RuntimeError):
            bill.totals()


# -- bad bills ---------------------------------------------------------------------------


def test_corruption_not_zip() -> None:
    err = bill_error(bill_bytes(SAMPLE_RECORDS, day=DAY, corrupt="not-zip"))
    assert "not a zip" in str(err)
    assert err.line is None


def test_corruption_utf8() -> None:
    err = bill_error(bill_bytes(SAMPLE_RECORDS, day=DAY, corrupt="utf8"))
    assert (err.entry, err.line) == (DETAIL, 1)
    assert "UTF-8, not GBK" in err.reason
    assert str(err).startswith(f"{DETAIL}, line 1: ")


def test_corruption_no_footer() -> None:
    data = bill_bytes(SAMPLE_RECORDS, day=DAY, corrupt="no-footer")
    err = bill_error(data)
    detail, _ = texts(data)
    assert (err.entry, err.line) == (DETAIL, len(detail.splitlines()))
    assert "#交易合计 is missing" in err.reason


def test_corruption_bad_total() -> None:
    data = bill_bytes(SAMPLE_RECORDS, day=DAY, corrupt="bad-total")
    err = bill_error(data)
    detail, _ = texts(data)
    assert (err.entry, err.line) == (DETAIL, line_of(detail, "#交易合计"))
    assert err.reason == ("totals do not add up: #交易合计 says 2 rows, 159.61 yuan; "
                          "the rows hold 2, 159.60 yuan")


def test_corruption_bad_amount() -> None:
    err = bill_error(bill_bytes(SAMPLE_RECORDS, day=DAY, corrupt="bad-amount"))
    assert (err.entry, err.line) == (DETAIL, 6)
    assert err.reason == "malformed amount '99.7' in 商家实收（元）"


def test_a_zip_without_the_detail_entry() -> None:
    _, summary = texts(sample_bill())
    err = bill_error(zip_of({SUMMARY: summary.encode("gbk"), "readme.txt": b"hello"}))
    assert "no detail entry" in err.reason
    assert "readme.txt" in err.reason


def test_a_zip_without_the_summary_entry() -> None:
    detail, _ = texts(sample_bill())
    err = bill_error(zip_of({DETAIL: detail.encode("gbk")}))
    assert "no summary entry" in err.reason


@needs_sample
def test_the_sample_in_utf8_with_utf8_names() -> None:
    """The readable copies zipped the ordinary way (UTF-8 names, flagged): the entries are
    found, and the text is refused as UTF-8."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr(DETAIL, (SHARED / DETAIL.replace(".csv", ".utf8.csv")).read_bytes())
        z.writestr(SUMMARY, (SHARED / SUMMARY.replace(".csv", ".utf8.csv")).read_bytes())
    err = bill_error(buffer.getvalue())
    assert (err.entry, err.line) == (DETAIL, 1)
    assert "UTF-8" in err.reason


def test_text_that_is_not_gbk_further_down() -> None:
    detail, summary = texts(sample_bill())
    raw = detail.encode("gbk").replace(b"Yixing", b"\xff\xfe")
    err = bill_error(zip_of({DETAIL: raw, SUMMARY: summary.encode("gbk")}))
    assert (err.entry, err.line) == (DETAIL, 7)
    assert err.reason.startswith("not GBK text: byte b'\\xff'")


def test_a_row_with_the_wrong_number_of_cells() -> None:
    detail, summary = texts(sample_bill())
    lines = detail.splitlines(keepends=True)
    lines[6] = lines[6].replace(",buyer***@example.com", "", 1)
    err = bill_error(rezip("".join(lines), summary))
    assert (err.entry, err.line) == (DETAIL, 7)
    assert err.reason == "24 cells; the header has 25"


def test_a_refund_total_that_does_not_add_up() -> None:
    detail, summary = texts(sample_bill())
    err = bill_error(rezip(detail.replace("#退款合计：1笔", "#退款合计：2笔"), summary))
    assert (err.entry, err.line) == (DETAIL, line_of(detail, "#退款合计"))
    assert err.reason == ("totals do not add up: #退款合计 says 2 rows, -19.90 yuan; "
                          "the rows hold 1, -19.90 yuan")


def test_a_summary_that_does_not_match_the_detail() -> None:
    detail, summary = texts(sample_bill())
    err = bill_error(rezip(detail, summary.replace(",合计,2,1,", ",合计,3,1,")))
    assert (err.entry, err.line) == (SUMMARY, line_of(summary, ",合计"))
    assert err.reason == ("the summary does not match the detail: 交易订单总笔数 says 3; "
                          "the detail's rows hold 2")


def test_an_unknown_business_type() -> None:
    detail, summary = texts(sample_bill())
    err = bill_error(rezip(detail.replace(",退款,", ",冻结,"), summary))
    assert (err.entry, err.line) == (DETAIL, 8)
    assert "unknown 业务类型 '冻结'" in err.reason


def test_a_refund_with_a_positive_amount() -> None:
    detail, summary = texts(sample_bill())
    err = bill_error(rezip(detail.replace(",-19.90,-19.90,", ",19.90,-19.90,"), summary))
    assert (err.entry, err.line) == (DETAIL, 8)
    assert "wrong sign" in err.reason


def test_a_malformed_time() -> None:
    detail, summary = texts(sample_bill())
    err = bill_error(rezip(detail.replace("2026-12-01 11:15:20", "2026-12-01 11:15"), summary))
    assert (err.entry, err.line) == (DETAIL, 7)
    assert "malformed 完成时间" in err.reason


def test_an_unexpected_column_header() -> None:
    detail, summary = texts(sample_bill())
    err = bill_error(rezip(detail.replace(",备注\n", ",备注说明\n", 1), summary))
    assert (err.entry, err.line) == (DETAIL, 5)
    assert "missing ['备注']" in err.reason
    assert "unknown ['备注说明']" in err.reason


def test_a_missing_column_header() -> None:
    detail, summary = texts(sample_bill())
    header = detail.splitlines(keepends=True)[4]
    err = bill_error(rezip(detail.replace(header, ""), summary))
    assert err.entry == DETAIL
    assert err.line == 5  # the first row, where the header should be
    assert "column header" in err.reason


def test_a_file_cut_short_among_its_rows() -> None:
    detail, summary = texts(sample_bill())
    cut = "".join(detail.splitlines(keepends=True)[:7])
    err = bill_error(rezip(cut, summary))
    assert (err.entry, err.line) == (DETAIL, 7)
    assert "cut short" in err.reason


def test_a_file_cut_short_before_its_header() -> None:
    detail, summary = texts(sample_bill())
    cut = "".join(detail.splitlines(keepends=True)[:4])
    err = bill_error(rezip(cut, summary))
    assert (err.entry, err.line) == (DETAIL, 4)
    assert "ends before the column header" in err.reason


def test_a_summary_without_its_total_row() -> None:
    detail, summary = texts(sample_bill())
    total = next(line for line in summary.splitlines(keepends=True) if line.startswith(",合计"))
    err = bill_error(rezip(detail, summary.replace(total, "")))
    assert err.entry == SUMMARY
    assert err.reason == "no 合计 row in the summary"


def test_crlf_line_ends_read_the_same() -> None:
    detail, summary = texts(sample_bill())
    rows, totals = read_all(rezip(detail.replace("\n", "\r\n"), summary.replace("\n", "\r\n")))
    assert [r.request_no for r in rows] == [None, None,
                                            "REFUND_ORDER_1796100000000_0123456789abcdef_1"]
    assert (totals.payments_fen, totals.refunds_fen) == (15960, -1990)


def test_a_damaged_entry() -> None:
    """A byte of the detail's compressed data changed: zlib refuses it."""
    data = bytearray(sample_bill())
    offset = data.index(DETAIL.encode("gbk")) + len(DETAIL.encode("gbk")) + 40
    data[offset] ^= 0xFF
    err = bill_error(bytes(data))
    assert (err.entry, err.line) == (DETAIL, 1)
    assert err.reason.startswith("the entry is damaged (Error -3 while decompressing")


def test_an_entry_whose_crc_does_not_match() -> None:
    """zipfile checks the CRC when the entry's last block is read: a bill whose bytes
    all inflate but are not the bytes that were zipped is refused too."""
    data = bytearray(bill_bytes(synthetic_records(3000, DAY), day=DAY))
    central = data.index(b"PK\x01\x02")  # the detail's central directory record
    data[central + 16] ^= 0xFF  # its CRC-32
    seen = 0
    with pytest.raises(BillError) as caught, BillReader(io.BytesIO(bytes(data))) as bill:
        for _ in bill.rows():
            seen += 1
    err = caught.value
    assert err.entry == DETAIL
    assert err.reason.startswith("the entry is damaged at or after this line (Bad CRC-32")
    # the rows streamed out before the end of the entry showed the damage
    assert 0 < seen <= 3000


def test_an_account_line_that_is_not_the_entry_names() -> None:
    detail, summary = texts(sample_bill())
    err = bill_error(rezip(detail.replace("#账号：[20880000000000010156]",
                                          "#账号：[20889999999999990156]"), summary))
    assert (err.entry, err.line) == (DETAIL, 2)
    assert "20889999999999990156" in err.reason


def test_a_generated_day_reads_back_with_the_written_totals() -> None:
    buffer = io.BytesIO()
    written = write_bill(buffer, synthetic_records(3000, DAY), day=DAY)
    rows, totals = read_all(buffer.getvalue())
    assert len(rows) == 3000
    assert (totals.payments, totals.payments_fen, totals.refunds, totals.refunds_fen) == (
        written.payments, written.payments_fen, written.refunds, written.refunds_fen)
    assert written.refunds == 300
    assert all(r.amount_fen < 0 for r in rows if r.kind is RowKind.REFUND)
