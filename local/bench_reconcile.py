"""Stage 8 of `python -m local bench`: a day's reconciliation beside its floor.

For each size N (FULL 20,000 and 200,000 bill rows; QUICK 2,000 and 20,000):

- a fresh set of tables (its own TABLE_PREFIX) on the bench's moto, which runs in
  its own process, so moto's memory is never counted as the reconciler's;
- the shop's side seeded to match `synthetic_records(N, day)` exactly: a PAID
  order per payment row (transaction_id the trade number, total_fen the amount,
  pay_time the row's finish time, pay_day the day), a SUCCEEDED refund per
  refund row (id the request number, amount_fen, finish_time, finish_day), in
  the store's own format (pynamodb's serialisation of the models), written with
  BatchWriteItem from a few threads;
- the bill written once to a temporary file with the sandbox's `write_bill`;
- two measurements, each in a fresh interpreter (`python -m local.bench_reconcile
  floor|reconcile ...`) so that each peak RSS is that child's own:
  the floor reads the same rows the bare way (the two GSI queries through the
  store to the end, the bill parsed with BillReader to its totals);
  the reconciliation is `run_day(deps, day, follow=False)` with the real store, no
  archive, and a gateway whose download copies the file.

The reconciliation must come back BALANCED with the two sides' sums equal and
equal to what was seeded; anything else stops the stage with the report in the
message. The tables are deleted after each size.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import resource
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from datetime import time as daytime
from pathlib import Path
from typing import IO, Any

from local.bench import REPO, Row, StageResult, World, progress

log = logging.getLogger("local.bench_reconcile")

# moto applies one request at a time (its own process): a few client threads keep it
# busy while the next batches are made and sent; 1 -> 3 threads: 900 -> 1,350 items/s
# at 20,000 on 2 cores, 2 or 3 the same.
SEED_THREADS = 3
BATCH = 25  # BatchWriteItem's limit
TARGET_RATIO = 0.5  # reconcile at >= 0.5 of its floor (floor s / reconcile s) at the big N
TARGET_GROWTH = 1.5  # the reconciler's peak RSS at the big N < 1.5x the small N's
DAYS_BACK = 10  # the bill day: this many days before today's, so its bill "exists"
# A measurement child is stopped after this: on moto 5.2.5 a GSI Query page costs time
# in proportion to the whole table (it sorts every item for each page), so a day of
# 200,000 rows does not finish within the store's 10 s read timeout a page, nor in
# minutes; the stage then reports the size as not measured instead of waiting on.
CHILD_TIMEOUT_S = 300


# --- the shop's side, seeded ------------------------------------------------------------


@dataclass
class Seeded:
    payments: int = 0
    payments_fen: int = 0
    refunds: int = 0
    refunds_fen: int = 0  # negative, as the bill and the report's Side say it
    seconds: float = 0.0


def _bill_day() -> date:
    from chalicelib.domain.reconciliation import bill_day

    return bill_day(datetime.now(UTC)) - timedelta(days=DAYS_BACK)


def _order_item(rec: Any, i: int, fen: int, pay_day: str) -> dict[str, Any]:
    """A PAID order of one bill row, in DynamoDB's JSON, as the store writes it (one
    line at the paid price; what mark_paid sets: pay_time, transaction_id, notify_id,
    pay_day). Made by hand: pynamodb's serialisation took most of the seeding's CPU;
    `_check_format` holds it to the models'."""
    from chalicelib.domain import iso

    def s(v: str) -> dict[str, str]:
        return {"S": v}

    created = rec.created
    return {
        "id": s(rec.out_trade_no), "username": s(f"rec-user-{i % 5000}"), "status": s("PAID"),
        "source_type": s("1"), "pay_type": s("1"),
        "lines": {"L": [{"M": {"goods_id": s("bench-a"), "name": s("Bench cup"),
                               "num": {"N": "1"}, "price_fen": {"N": str(fen)}}}]},
        "total_fen": {"N": str(fen)}, "create_time": s(iso(created)),
        "update_time": s(iso(rec.finished)),
        "expire_time": s(iso(created + timedelta(minutes=30))),
        "check_time": s(iso(created + timedelta(minutes=35))),
        "pay_time": s(iso(rec.finished)), "transaction_id": s(rec.trade_no),
        "notify_id": s(f"bench-notify-{i}"), "pay_day": s(pay_day),
    }


def _refund_item(rec: Any, fen: int, pay_day: str) -> dict[str, Any]:
    """A SUCCEEDED refund of one bill row, as settle_refund leaves it (finish_day)."""
    from chalicelib.domain import iso

    return {"id": {"S": rec.out_request_no}, "order_id": {"S": rec.out_trade_no},
            "amount_fen": {"N": str(fen)}, "reason": {"S": "bench"},
            "status": {"S": "SUCCEEDED"}, "operator": {"S": "bench"},
            "create_time": {"S": iso(rec.created)}, "finish_time": {"S": iso(rec.finished)},
            "finish_day": {"S": pay_day}}


def _check_format(models: Any, rec: Any, i: int, fen: int, pay_day: str,
                  item: dict[str, Any]) -> None:
    """The hand-made item must be what the store's models serialise for that row."""
    from chalicelib.domain import PAID, Line, Order, Refund, RefundStatus, iso
    from chalicelib.store.models import model_from_order, model_from_refund
    from local.alipay_sandbox.bills import PAYMENT

    if rec.type == PAYMENT:
        order = Order(id=rec.out_trade_no, username=f"rec-user-{i % 5000}", status=PAID,
                      source_type="1", lines=[Line("bench-a", "Bench cup", fen, 1)],
                      create_time=rec.created, update_time=rec.finished,
                      expire_time=rec.created + timedelta(minutes=30),
                      check_time=rec.created + timedelta(minutes=35))
        m = model_from_order(models, order)
        m.pay_time, m.transaction_id = iso(rec.finished), rec.trade_no
        m.notify_id, m.pay_day = f"bench-notify-{i}", pay_day
    else:
        m = model_from_refund(models, Refund(
            id=rec.out_request_no, order_id=rec.out_trade_no, amount_fen=fen, reason="bench",
            status=RefundStatus.SUCCEEDED, operator="bench", create_time=rec.created,
            finish_time=rec.finished))
        m.finish_day = pay_day
    want = json.loads(json.dumps(m.serialize()))  # enums -> their values
    if want != item:
        raise RuntimeError(f"the bench's {rec.type} item is not the store's format:\n"
                           f"{item}\nthe models write\n{want}")


def _items(models: Any, n: int, day: date, seeded: Seeded) -> Iterator[tuple[str, dict[str, Any]]]:
    """(table, item) for each of the day's bill rows, in the bill's order."""
    from chalicelib.domain import parse_amount
    from local.alipay_sandbox.bills import PAYMENT, synthetic_records

    orders, refunds = models.Order.Meta.table_name, models.Refund.Meta.table_name
    pay_day = day.isoformat()
    checked: set[str] = set()
    for i, rec in enumerate(synthetic_records(n, day)):
        fen = parse_amount(str(rec.amount))
        if fen is None:
            raise ValueError(f"synthetic_records gave an amount that is not one: {rec.amount!r}")
        if rec.type == PAYMENT:
            table, item = orders, _order_item(rec, i, fen, pay_day)
            seeded.payments += 1
            seeded.payments_fen += fen
        else:
            table, item = refunds, _refund_item(rec, fen, pay_day)
            seeded.refunds += 1
            seeded.refunds_fen -= fen  # negative, as the bill and the report say it
        if rec.type not in checked:
            _check_format(models, rec, i, fen, pay_day, item)
            checked.add(rec.type)
        yield table, item


def _write_batch(client: Any, batch: list[tuple[str, dict[str, Any]]]) -> None:
    request: dict[str, list[dict[str, Any]]] = {}
    for table, item in batch:
        request.setdefault(table, []).append({"PutRequest": {"Item": item}})
    for _ in range(20):
        done = client.batch_write_item(RequestItems=request)
        request = done.get("UnprocessedItems") or {}
        if not request:
            return
        time.sleep(0.05)
    raise RuntimeError(f"BatchWriteItem left items unprocessed: {list(request)}")


def seed(client: Any, models: Any, n: int, day: date) -> Seeded:
    """The day's orders and refunds through BatchWriteItem from SEED_THREADS threads;
    the items are made in this thread and handed over a bounded queue, so memory
    stays flat at any N."""
    seeded = Seeded()
    work: queue.Queue[list[tuple[str, dict[str, Any]]] | None] = queue.Queue(SEED_THREADS * 4)
    errors: list[BaseException] = []

    def writer() -> None:
        while (batch := work.get()) is not None:
            if not errors:
                try:
                    _write_batch(client, batch)
                except BaseException as exc:  # noqa: BLE001 - raised in the caller below
                    errors.append(exc)

    threads = [threading.Thread(target=writer, name=f"seed-{k}", daemon=True)
               for k in range(SEED_THREADS)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    try:
        batch: list[tuple[str, dict[str, Any]]] = []
        for item in _items(models, n, day, seeded):
            batch.append(item)
            if len(batch) == BATCH:
                work.put(batch)
                batch = []
            if errors:
                break
        if batch:
            work.put(batch)
    finally:
        for _ in threads:
            work.put(None)
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    seeded.seconds = time.perf_counter() - start
    return seeded


def write_bill_file(path: Path, n: int, day: date) -> float:
    from chalicelib.domain.reconciliation import SHANGHAI
    from local.alipay_sandbox.bills import synthetic_records, write_bill

    start = time.perf_counter()
    with path.open("wb") as out:
        write_bill(out, synthetic_records(n, day), day=day,
                   exported_at=datetime.combine(day + timedelta(days=1), daytime(9), SHANGHAI))
    return time.perf_counter() - start


# --- the children -----------------------------------------------------------------------


def _peak() -> dict[str, float]:
    """This process's peak RSS, MiB: VmHWM (of this interpreter's own memory map) and
    ru_maxrss (Linux folds the parent's RSS at fork into it, so VmHWM is the figure)."""
    hwm = float("nan")
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) / 1024.0
    return {"vmhwm_mb": hwm, "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            / 1024.0}


class FileGateway:
    """The gateway's two bill calls, on a local file: the URL names it, the download
    copies it as Alipay's server would send it."""

    def __init__(self, bill: Path) -> None:
        self.bill = bill

    def bill_url(self, day: date) -> str | None:
        return self.bill.as_uri()

    def download_bill(self, url: str, out: IO[bytes]) -> int:
        with open(urllib.parse.unquote(urllib.parse.urlparse(url).path), "rb") as f:
            shutil.copyfileobj(f, out, 1 << 20)
        return out.tell()

    def __getattr__(self, name: str) -> Any:  # nothing else may be called in a balanced day
        raise AttributeError(f"the bench's gateway has no {name}: a balanced day needs none")


class _Unused:
    def __init__(self, what: str) -> None:
        self.what = what

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"the bench's {self.what} was used ({name}): a balanced day "
                             "publishes nothing")


def _store() -> Any:
    from chalicelib import config
    from chalicelib.store import Store

    store = Store.from_settings(config.get())
    store.warm()  # the botocore client is built before the clock starts, in both children
    store.ping()
    return store


def child_floor(day: date, bill: Path) -> dict[str, Any]:
    from chalicelib.bill import BillReader, RowKind

    store = _store()
    out: dict[str, Any] = {}
    cpu = time.process_time()
    start = time.perf_counter()
    p = p_fen = r = r_fen = 0
    for x in store.paid_on(day):
        p += 1
        p_fen += x.total_fen
    for y in store.refunds_succeeded_on(day):
        r += 1
        r_fen -= y.amount_fen
    out["shop_seconds"] = time.perf_counter() - start
    rows = rows_fen = 0
    with BillReader(str(bill)) as reader:
        for row in reader.rows():
            rows += 1
            rows_fen += row.amount_fen if row.kind == RowKind.PAYMENT else 0
        totals = reader.totals()
    out["seconds"] = time.perf_counter() - start
    out["cpu_s"] = time.process_time() - cpu
    out["bill_seconds"] = out["seconds"] - out["shop_seconds"]
    out.update(shop={"payments": p, "payments_fen": p_fen, "refunds": r, "refunds_fen": r_fen},
               bill={"rows": rows, "payments": totals.payments,
                     "payments_fen": totals.payments_fen, "refunds": totals.refunds,
                     "refunds_fen": totals.refunds_fen, "row_payments_fen": rows_fen})
    return out


def child_reconcile(day: date, bill: Path, profile: Path | None) -> dict[str, Any]:
    from chalicelib import config
    from chalicelib.context import Deps
    from chalicelib.reconcile import run_day

    store = _store()
    deps = Deps(settings=config.get(), store=store, broker=_Unused("broker"),  # type: ignore[arg-type]
                gateway=FileGateway(bill), archive=None)  # type: ignore[arg-type]
    profiler = None
    if profile is not None:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    cpu = time.process_time()
    start = time.perf_counter()
    report = run_day(deps, day, follow=False)
    seconds = time.perf_counter() - start
    cpu_s = time.process_time() - cpu
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(str(profile))

    def side(s: Any) -> dict[str, int] | None:
        return None if s is None else s.to_item()

    return {"seconds": seconds, "cpu_s": cpu_s, "status": report.status.value,
            "reason": report.reason, "alipay": side(report.alipay), "shop": side(report.shop),
            "differences": len(report.differences), "carried": len(report.carried)}


def child_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m local.bench_reconcile")
    parser.add_argument("what", choices=("floor", "reconcile"))
    parser.add_argument("--day", required=True)
    parser.add_argument("--bill", required=True, type=Path)
    parser.add_argument("--profile", type=Path, help="reconcile: cProfile stats to this file")
    args = parser.parse_args(argv)
    # The service's warnings (e.g. "no bills bucket") to stderr, which the bench keeps.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s %(message)s")
    day = date.fromisoformat(args.day)
    if args.what == "floor":
        result = child_floor(day, args.bill)
    else:
        result = child_reconcile(day, args.bill, args.profile)
    result.update(_peak())
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


def _child_env(prefix: str) -> dict[str, str]:
    # A table named on its own (ORDERS_TABLE, ...) would win over the prefix.
    env = {k: v for k, v in os.environ.items() if not k.endswith("_TABLE")}
    env["TABLE_PREFIX"] = prefix
    return env


class ChildFailed(RuntimeError):
    """A measurement that did not finish (moto too slow, a child that crashed): the size
    is reported as not measured. A run that finished but is not BALANCED is not this."""


def run_child(what: str, prefix: str, day: date, bill: Path, log_dir: Path,
              profile: Path | None = None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "local.bench_reconcile", what, "--day", day.isoformat(),
           "--bill", str(bill)]
    if profile is not None:
        cmd += ["--profile", str(profile)]
    log_file = log_dir / f"reconcile-{what}-{prefix}.log"
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=REPO, env=_child_env(prefix), capture_output=True,
                              text=True, timeout=CHILD_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        log_file.write_text(err)
        raise ChildFailed(f"the {what} child did not finish within {CHILD_TIMEOUT_S} s "
                          "(stopped)") from exc
    log_file.write_text(done.stderr)
    if done.returncode != 0:
        # the exception and its causes (a read timeout under "dynamodb is not answering")
        errors = [x.strip() for x in done.stderr.splitlines() if "Error: " in x
                  or x.startswith("chalicelib.")]
        said = " <- ".join(dict.fromkeys(reversed(errors[-4:]))) or done.stderr[-300:]
        raise ChildFailed(f"the {what} child failed after {time.perf_counter() - start:.0f} s: "
                          f"{said}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# --- the stage ------------------------------------------------------------------------


def _check_balanced(n: int, seeded: Seeded, floor: dict[str, Any], rec: dict[str, Any]) -> None:
    want = {"payments": seeded.payments, "payments_fen": seeded.payments_fen,
            "refunds": seeded.refunds, "refunds_fen": seeded.refunds_fen}
    problems = []
    if floor["shop"] != want:
        problems.append(f"the floor read {floor['shop']} from the store, seeded {want}")
    if floor["bill"]["rows"] != n:
        problems.append(f"the floor parsed {floor['bill']['rows']} bill rows of {n}")
    if rec["status"] != "BALANCED":
        problems.append(f"the reconciliation is {rec['status']} ({rec['differences']} "
                        f"differences, {rec['carried']} carried, reason {rec['reason']!r})")
    if rec["alipay"] != rec["shop"]:
        problems.append(f"alipay {rec['alipay']} != shop {rec['shop']}")
    if rec["alipay"] != want:
        problems.append(f"alipay {rec['alipay']} != seeded {want}")
    if problems:
        raise RuntimeError(f"8 reconcile at {n:,} rows is not BALANCED as seeded: "
                           + "; ".join(problems))


def _top_costs(stats_file: Path, limit: int = 12) -> list[dict[str, Any]]:
    """The profile's heaviest functions by their own time, and by cumulative time."""
    import pstats

    stats = pstats.Stats(str(stats_file))
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    rows = [{"function": f"{Path(f).name}:{line}({name})", "calls": nc, "tottime_s": tt,
             "cumtime_s": ct} for (f, line, name), (_, nc, tt, ct, _) in raw.items()]
    by_own = sorted(rows, key=lambda x: x["tottime_s"], reverse=True)[:limit]
    by_cum = sorted(rows, key=lambda x: x["cumtime_s"], reverse=True)[:limit]
    return [{"by": "own", **x} for x in by_own] + [{"by": "cumulative", **x} for x in by_cum]


@dataclass
class DayTables:
    """One size's fresh tables on the bench's moto, and its bill file."""

    n: int
    prefix: str
    store: Any
    bill: Path

    def delete(self) -> None:
        client = self.store.connection.client
        # a set by name: the tickets' table holds two models
        for name in sorted({model.Meta.table_name for model in self.store.models.all}):
            client.delete_table(TableName=name)
        self.bill.unlink(missing_ok=True)


def _seed_client() -> Any:
    """A botocore client for the seeding alone, without botocore's client-side check of
    each request's parameters (a third of the seeding's CPU here): the items are held
    to the store's format by `_check_format`, and moto validates what it is sent."""
    import botocore.session
    from botocore.config import Config

    from chalicelib import config

    return botocore.session.get_session().create_client(
        "dynamodb", region_name=config.get().aws_region,
        config=Config(parameter_validation=False, retries={"max_attempts": 3},
                      max_pool_connections=SEED_THREADS + 1))


def prepare(world: World, n: int, day: date) -> tuple[DayTables, dict[str, Any]]:
    from chalicelib import config
    from chalicelib.store import Store

    prefix = f"shop-bench-rec{n}-{uuid.uuid4().hex[:6]}"
    settings = config.load(_child_env(prefix))
    tables = DayTables(n, prefix, Store(settings.tables, settings.aws_region),
                    world.tmp / f"bill-{n}.zip")
    tables.store.create_tables()
    progress(f"8 reconcile: {n:,} rows: writing the bill, seeding the shop's side "
             f"(BatchWriteItem, {SEED_THREADS} threads)")
    bill_s = write_bill_file(tables.bill, n, day)
    seeded = seed(_seed_client(), tables.store.models, n, day)
    progress(f"8 reconcile: {n:,} rows: bill written in {bill_s:.1f} s, seeded in "
             f"{seeded.seconds:.1f} s ({n / seeded.seconds:,.0f} items/s)")
    return tables, {"n": n, "prefix": prefix, "day": day.isoformat(),
                    "bill_bytes": tables.bill.stat().st_size, "bill_write_s": bill_s,
                    "seed_s": seeded.seconds, "seeded": seeded}


def measure(world: World, tables: DayTables, point: dict[str, Any], day: date) -> None:
    n = tables.n
    seeded = point["seeded"]
    point["seeded"] = {"payments": seeded.payments, "payments_fen": seeded.payments_fen,
                       "refunds": seeded.refunds, "refunds_fen": seeded.refunds_fen}
    progress(f"8 reconcile: {n:,} rows: the floor (a child process)")
    try:
        floor = run_child("floor", tables.prefix, day, tables.bill, world.tmp)
        progress(f"8 reconcile: {n:,} rows: floor {floor['seconds']:.1f} s; run_day (a child "
                 "process)")
        rec = run_child("reconcile", tables.prefix, day, tables.bill, world.tmp)
    except ChildFailed as exc:
        point["failed"] = str(exc)
        progress(f"8 reconcile: {n:,} rows: NOT MEASURED: {exc}")
        return
    if rec["status"] == "FAILED" and str(rec["reason"]).startswith(
            "the shop's records could not be read"):  # moto did not answer in time
        point.update(floor=floor, reconcile=rec,
                     failed=f"run_day FAILED after {rec['seconds']:.0f} s: {rec['reason']}")
        progress(f"8 reconcile: {n:,} rows: NOT MEASURED: {point['failed']}")
        return
    _check_balanced(n, seeded, floor, rec)
    point.update(floor=floor, reconcile=rec, ratio=floor["seconds"] / rec["seconds"],
                 cpu_ratio=floor["cpu_s"] / rec["cpu_s"])
    progress(f"8 reconcile: {n:,} rows: run_day {rec['seconds']:.1f} s, {rec['status']}")


def profile(world: World, tables: DayTables, point: dict[str, Any], day: date) -> None:
    stats = world.tmp / f"reconcile-{tables.n}.prof"
    progress(f"8 reconcile: {tables.n:,} rows: run_day once more under cProfile ({stats})")
    again = run_child("reconcile", tables.prefix, day, tables.bill, world.tmp, profile=stats)
    point["profiled"] = {"seconds": again["seconds"], "status": again["status"],
                         "stats_file": str(stats), "top": _top_costs(stats)}


def _get(point: dict[str, Any], *path: str) -> Any:
    """A figure of a point, None when the size was not measured."""
    value: Any = point
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def stage_reconcile(world: World) -> StageResult:
    small, big = world.sizes["reconcile_n"]
    day = _bill_day()
    res = StageResult("reconcile", [])
    points: list[dict[str, Any]] = []
    kept: list[DayTables] = []
    try:
        for n in (small, big):
            tables, point = prepare(world, n, day)
            kept.append(tables)
            points.append(point)
            measure(world, tables, point, day)
            if n == big:  # the small size's tables stay for a profile, in case it is needed
                kept.remove(tables)
                tables.delete()
        lo, hi = points
        ratio = hi.get("ratio")
        if (ratio is None or ratio < TARGET_RATIO) and "ratio" in lo:
            profile(world, kept[0], lo, day)  # where the time goes, on the small size
    finally:
        for tables in kept:
            tables.delete()
    lo_mb, hi_mb = _get(lo, "reconcile", "vmhwm_mb"), _get(hi, "reconcile", "vmhwm_mb")
    growth = hi_mb / lo_mb if lo_mb and hi_mb and "failed" not in hi else None
    stage = "8 reconcile"
    for p in points:
        n = p["n"]
        res.rows += [
            Row(stage, f"s at {n:,} rows (floor vs run_day)", _get(p, "floor", "seconds"),
                _get(p, "reconcile", "seconds") if "ratio" in p else None, "s",
                ratio=p.get("ratio")),
            Row(stage, f"child CPU s at {n:,} rows (floor vs run_day)",
                _get(p, "floor", "cpu_s"), _get(p, "reconcile", "cpu_s") if "ratio" in p
                else None, "s", ratio=p.get("cpu_ratio")),
        ]
    res.rows += [
        Row(stage, f"reconcile at X of its floor, {big:,} rows", None, ratio, "",
            f">= {TARGET_RATIO:g}", ratio is not None and ratio >= TARGET_RATIO, ratio=ratio),
        Row(stage, f"run_day peak RSS {small:,} vs {big:,} rows", lo_mb,
            hi_mb if growth is not None else None, "MiB", f"< {TARGET_GROWTH:g}x (flat)",
            growth is not None and growth < TARGET_GROWTH, ratio=growth),
        Row(stage, f"floor peak RSS {small:,} vs {big:,} rows", _get(lo, "floor", "vmhwm_mb"),
            _get(hi, "floor", "vmhwm_mb"), "MiB"),
    ]
    for p in points:
        alipay = _get(p, "reconcile", "alipay") if "ratio" in p else None
        res.rows.append(Row(stage, f"rows BALANCED, alipay == shop == seeded ({p['n']:,})",
                            p["n"], alipay["payments"] + alipay["refunds"] if alipay else None,
                            "", "all", alipay is not None))
    res.data.update(day=day.isoformat(), sizes=[small, big], ratio=ratio,
                    ratio_target=TARGET_RATIO, rss_growth=growth, rss_growth_target=TARGET_GROWTH,
                    seed_threads=SEED_THREADS, child_timeout_s=CHILD_TIMEOUT_S, points=points)
    res.notes.append(
        "8 reconcile: per size a fresh set of tables on moto (own process), seeded to match "
        "synthetic_records(N) exactly (PAID orders with pay_day, SUCCEEDED refunds with "
        f"finish_day; BatchWriteItem from {SEED_THREADS} threads: "
        + ", ".join(f"{p['n']:,} in {p['seed_s']:.0f} s" for p in points)
        + "); each measurement a fresh interpreter. Floor = the two GSI queries through the "
        "store to the end + BillReader over the file to its totals; project = run_day(follow="
        "False), a gateway copying the file, no archive. Ratio = floor s / run_day s "
        "(1 = no cost beyond reading the rows); child CPU = the child's own CPU time (moto's "
        "work is not in it). RSS = the child's VmHWM"
        + (f"; a cProfile of the {small:,} run is in the JSON (points[0].profiled.top)."
           if "profiled" in lo else "."))
    for p in points:
        if "failed" in p:
            res.notes.append(f"8 reconcile: {p['n']:,} rows NOT MEASURED: {p['failed']}")
    return res


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
