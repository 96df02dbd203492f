"""The reliability suite's common parts: the scoreboard, the audit that counts lost
orders, double transitions and invariant violations, and the local stack (the API
over HTTP, the Alipay sandbox, a real Broker, the bridge) the scenarios drive.

Definitions (the issue's, made exact):

- lost: an order not in a final state (PAID, CLOSED, REFUNDED) once the scenario
  has settled (after the sweep), or money that came (the sandbox's trade was
  paid, a notify was answered `success`, or a pay message was published) for an
  order that is neither PAID nor REFUNDED.
- double transition: an order whose winning conditional writes hold a kind twice,
  or PAID beside CLOSED, or REFUNDED without CLOSED, or a kind its final state does
  not explain; or money moved twice (a PAID order refunded, a refund done twice).
- invariant violation: for some goods, stock now + units in PAID and UNPAID orders
  differs from the stock at the start; or an order whose fields disagree with its
  one state (e.g. PAID with a close time, UNPAID missing from the sweeper's index).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import pika.exceptions

from chalicelib import broker, config, deps
from chalicelib.alipay_gateway import AlipayGateway
from chalicelib.broker.connection import close_quietly, open_connection, parameters
from chalicelib.context import Deps
from chalicelib.domain import CLOSED, PAID, REFUNDED, STATES, UNPAID, Goods, Order, to_fen
from chalicelib.store import Store
from chalicelib.store.models import order_from_model
from local.alipay_sandbox import LOCAL_APP_ID, LOCAL_SELLER_ID, make_server
from tests.conftest import MODELS, operator_bearer, token
from tests.counting import CountingStore, read_transitions
from tests.waiting import wait_until

log = logging.getLogger("reliability")

FINAL = (PAID, CLOSED, REFUNDED)

# Goods of the reliability scenarios, next to the test catalogue (g1, g2, g3).
RELIABILITY_GOODS = [
    Goods("r-tea", "Reliability tea", 1250, 100_000),
    Goods("r-cup", "Reliability cup", 399, 100_000),
    Goods("r-rare", "Reliability rare tea", 88800, 40),
]


# --- the scoreboard -------------------------------------------------------------


@dataclass
class Row:
    scenario: str
    runs: int = 0
    orders: int = 0
    lost: int = 0
    double: int = 0
    violations: int = 0
    http_5xx: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def assert_zeros(self) -> None:
        bad = {k: getattr(self, k) for k in ("lost", "double", "violations", "http_5xx")
               if getattr(self, k)}
        assert not bad, f"{self.scenario}: {bad}; {self.notes[:20]}"


class Scoreboard:
    """One row per scenario run in this session; printed by pytest_terminal_summary."""

    def __init__(self) -> None:
        self.rows: list[Row] = []

    def record(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def table(self) -> str:
        head = ("scenario", "runs", "orders", "lost", "double transitions",
                "invariant violations", "5xx answers", "seconds")
        body = [(r.scenario, str(r.runs), str(r.orders), str(r.lost), str(r.double),
                 str(r.violations), str(r.http_5xx), f"{r.seconds:.1f}") for r in self.rows]
        widths = [max(len(x) for x in col) for col in zip(head, *body, strict=False)]

        def line(cells: Iterable[str]) -> str:
            cells = list(cells)
            return "| " + " | ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))) + " |"

        sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        return "\n".join([line(head), sep, *(line(b) for b in body)])

    def to_json(self) -> list[dict[str, Any]]:
        return [dataclasses.asdict(r) for r in self.rows]


SCOREBOARD = Scoreboard()


# --- the audit ------------------------------------------------------------------


def all_orders() -> list[tuple[Order, Any]]:
    return [(order_from_model(m), m) for m in MODELS.Order.scan(consistent_read=True)]


def stock(store: Store) -> dict[str, int]:
    return {g.id: g.stock for g in store.list_goods()}


@dataclass
class Findings:
    orders: int = 0
    lost: list[str] = field(default_factory=list)
    double: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    uncounted: list[str] = field(default_factory=list)

    def into(self, row: Row) -> Row:
        row.orders += self.orders
        row.lost += len(self.lost)
        row.double += len(self.double)
        row.violations += len(self.violations)
        row.notes += self.lost + self.double + self.violations
        if self.uncounted:
            row.notes.append(f"{len(self.uncounted)} winning write(s) not seen by the counter "
                             f"(a SIGKILL between DynamoDB's answer and the log line): "
                             f"{self.uncounted[:3]}")
        return row


_EXPECTED = {UNPAID: set(), PAID: {PAID}, CLOSED: {CLOSED}, REFUNDED: {CLOSED, REFUNDED}}
_REFUNDED_AFTER_PAID = {PAID, REFUNDED}  # paid, then refunded in full by an operator


def audit(
    store: Store,
    start_stock: Mapping[str, int],
    transitions: Iterable[tuple[str, str]],
    *,
    money_in: Iterable[str] = (),
    trades: Mapping[str, Mapping[str, Any]] | None = None,
    attempted: Iterable[tuple[str, str]] | None = None,
    settled: bool = True,
    start_sales: Mapping[str, int] | None = None,
) -> Findings:
    """Checks every order in the table against the stock at the start, the winning
    writes counted and the money that came. `attempted`: None when every winning
    write was counted (in-process); else the writes a killed subprocess began, which
    explain a count it could not write (a SIGKILL between DynamoDB's commit and the
    count): a missing count is a violation unless such an attempt explains it."""
    tried = set(attempted or ())
    found = Findings()
    orders = all_orders()
    found.orders = len(orders)
    by_id = {o.id: o for o, _ in orders}
    counted: dict[str, Counter[str]] = {}
    for kind, order_id in transitions:
        counted.setdefault(order_id, Counter())[kind] += 1

    # the invariant: stock now + units held by PAID and UNPAID orders = stock at start;
    # a flash-sale order holds units of its sale's stock, not of the goods' stock
    now = stock(store)
    sales_now = {s.id: s.stock for s in store.list_sales()} if start_sales is not None else {}
    held: Counter[str] = Counter()
    held_by_sales: Counter[str] = Counter()
    for o, _ in orders:
        # a refund gives money back, not stock: a paid order refunded keeps its units
        if o.status in (PAID, UNPAID) or (o.status == REFUNDED and o.pay_time is not None):
            for line in o.lines:
                if o.sale_id:
                    held_by_sales[o.sale_id] += line.num
                else:
                    held[line.goods_id] += line.num
    for gid in sorted(set(start_stock) | set(now) | set(held)):
        if now.get(gid, 0) + held[gid] != start_stock.get(gid, 0):
            found.violations.append(f"stock of {gid}: {now.get(gid, 0)} now + {held[gid]} held "
                                    f"!= {start_stock.get(gid, 0)} at start")
    for sid in sorted(set(start_sales or {}) | set(held_by_sales)):
        at_start = (start_sales or {}).get(sid, 0)
        if sales_now.get(sid, 0) + held_by_sales[sid] != at_start:
            found.violations.append(f"stock of sale {sid}: {sales_now.get(sid, 0)} now + "
                                    f"{held_by_sales[sid]} held != {at_start} at start")

    for o, m in orders:
        found.violations += _state_problems(o, m)
        if settled and o.status not in FINAL:
            found.lost.append(f"{o.id} still {o.status} after settling")
        kinds = counted.get(o.id, Counter())
        expected = _EXPECTED.get(o.status, set())
        if o.status == REFUNDED and o.pay_time is not None:
            expected = _REFUNDED_AFTER_PAID
        if any(n > 1 for n in kinds.values()):
            found.double.append(f"{o.id}: transitions {dict(kinds)}")
        elif kinds.keys() - expected:
            found.double.append(f"{o.id} is {o.status} but won {dict(kinds)}")
        elif expected - kinds.keys():
            missing = expected - kinds.keys()
            explained = attempted is not None and all((k, o.id) in tried for k in missing)
            (found.uncounted if explained else found.violations).append(
                f"{o.id} is {o.status}, counted {dict(kinds)}")
    for order_id in counted.keys() - by_id.keys():
        found.violations.append(f"transitions {dict(counted[order_id])} of unknown {order_id}")

    for order_id in sorted(set(money_in)):
        o = by_id.get(order_id)
        if o is None or o.status not in (PAID, REFUNDED):
            found.lost.append(f"money came for {order_id}, which is "
                              f"{o.status if o else 'missing'}")
    for order_id, trade in (trades or {}).items():
        found.lost += _money_problems(by_id.get(order_id), order_id, trade, found)
    return found


def _state_problems(o: Order, m: Any) -> list[str]:
    why: list[str] = []
    if o.status not in STATES:
        return [f"{o.id} has unknown status {o.status!r}"]
    in_index = m.unpaid is not None
    if in_index != (o.status == UNPAID):
        why.append(f"{o.id} is {o.status} and {'in' if in_index else 'not in'} the unpaid index")
    if o.status == UNPAID and (o.pay_time or o.close_time or o.transaction_id):
        why.append(f"{o.id} UNPAID with pay/close fields")
    if o.status == PAID and (o.close_time or not o.pay_time or not o.transaction_id
                             or o.refund_request_no):
        why.append(f"{o.id} PAID with close/refund fields or without its trade")
    if o.refunded_fen > o.refund_reserved_fen or o.refund_reserved_fen > o.total_fen:
        why.append(f"{o.id} refunded {o.refunded_fen} / reserved {o.refund_reserved_fen} "
                   f"of {o.total_fen}")
    if (o.status == REFUNDED) != (o.refunded_fen == o.total_fen > 0):
        why.append(f"{o.id} is {o.status} with {o.refunded_fen} of {o.total_fen} refunded")
    if o.status == CLOSED and (not o.close_time or o.pay_time or o.transaction_id):
        why.append(f"{o.id} CLOSED with payment fields or without a close time")
    # REFUNDED: money that came after the order closed went back (a close time, no pay
    # time), or a paid order was refunded in full (a pay time, no close time).
    if o.status == REFUNDED and not o.transaction_id:
        why.append(f"{o.id} REFUNDED without its trade")
    if o.status == REFUNDED and o.pay_time is None and (not o.close_time
                                                        or not o.refund_request_no):
        why.append(f"{o.id} REFUNDED after closing without close time or refund number")
    return why


def _money_problems(o: Order | None, order_id: str, trade: Mapping[str, Any],
                    found: Findings) -> list[str]:
    """The sandbox's side: a paid trade's order is PAID or REFUNDED, and Alipay refunded
    exactly what the order's succeeded refunds say (a late payment: once, in full)."""
    paid = trade.get("gmt_payment") is not None
    refunds = trade.get("refunds") or []
    refunded = to_fen(str(trade.get("refunded_amount") or "0.00"))
    status = o.status if o else "missing"
    if not paid:
        if o is not None and o.status in (PAID, REFUNDED):
            found.violations.append(f"{order_id} is {status} but Alipay has no payment")
        return []
    if status not in (PAID, REFUNDED):
        return [f"{order_id} paid at Alipay but {status}"]
    assert o is not None
    if refunded != o.refunded_fen:
        found.double.append(f"{order_id} {status}: Alipay refunded {refunded}, the shop's "
                            f"succeeded refunds {o.refunded_fen}")
    if status == REFUNDED and o.pay_time is None and len(refunds) != 1:
        found.double.append(f"{order_id} REFUNDED after closing with refunds {refunds}")
    requests = [r.get("out_request_no") for r in refunds]
    if len(requests) != len(set(requests)):
        found.double.append(f"{order_id}: a request number refunded twice: {requests}")
    return []


# --- waiting --------------------------------------------------------------------


def queue_names(retry_delays_ms: Iterable[int]) -> list[str]:
    """Every queue of the topology: the publisher declares the default retry queues,
    a consumer those of its own delays."""
    delays = sorted(set(retry_delays_ms) | set(broker.DEFAULT_RETRY_DELAYS_MS))
    names = [broker.QUEUE_DELAY]
    for q in broker.CONSUMED_QUEUES:
        names += [q, broker.parked_queue_name(q)]
        names += [broker.retry_queue_name(q, d) for d in delays]
    return names


def queue_depths(url: str, names: Iterable[str]) -> dict[str, int]:
    """Ready messages per queue (unacked ones come back once their consumer is gone),
    asked of whichever of the URL's nodes answers."""
    depths: dict[str, int] = {}
    conn = open_connection(parameters(url))
    try:
        for name in names:
            ch = conn.channel()
            try:
                depths[name] = int(ch.queue_declare(name, passive=True).method.message_count)
                ch.close()
            except pika.exceptions.ChannelClosedByBroker:
                depths[name] = 0  # never declared: nothing in it
    finally:
        close_quietly(conn)
    return depths


# --- HTTP -----------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    body: bytes
    headers: Mapping[str, str]

    def json(self) -> Any:
        return json.loads(self.body)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


NO_ANSWER = 599  # the server gave no answer at all: counted with the 5xx answers


class Http:
    """HTTP to one base URL (a new connection per request), every status recorded."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.statuses: list[int] = []
        self._lock = threading.Lock()

    def request(self, method: str, path: str, *, body: bytes | None = None,
                headers: Mapping[str, str] | None = None, timeout: float = 30.0) -> Answer:
        url = path if path.startswith("http") else self.base + path
        req = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
        try:
            with _OPENER.open(req, timeout=timeout) as r:
                answer = Answer(r.status, r.read(), dict(r.headers))
        except urllib.error.HTTPError as exc:
            answer = Answer(exc.code, exc.read(), dict(exc.headers or {}))
        except OSError as exc:  # reset, refused, timed out: no answer at all
            log.warning("%s %s: no answer (%r)", method, path[:80], exc)
            answer = Answer(NO_ANSWER, repr(exc).encode(), {})
        with self._lock:
            self.statuses.append(answer.status)
        return answer

    def api(self, method: str, path: str, user: str, body: bytes = b"{}") -> Answer:
        return self.request(method, path, body=body, headers={
            "Authorization": f"Bearer {token(user)}", "Content-Type": "application/json"})

    def admin(self, method: str, path: str, operator: str = "carol", body: Any = None,
              headers: Mapping[str, str] | None = None) -> Answer:
        """An operator's call: JSON in and out, with an operator token."""
        data = None if body is None else json.dumps(body).encode()
        return self.request(method, path, body=data, headers={
            **operator_bearer(operator), **(headers or {})})

    @property
    def count_5xx(self) -> int:
        with self._lock:
            return sum(1 for s in self.statuses if s >= 500)


# --- the local stack ------------------------------------------------------------


class Stack:
    """The API (chalice's local server, with `make run`'s handler) and the Alipay
    sandbox in this process, a real Broker on `rmq_url`, a CountingStore, and, when
    asked, the bridge as a thread."""

    def __init__(self, *, keys: Mapping[str, Path], rmq_url: str, check_delay: int = 60,
                 notify_schedule: list[float] | None = None,
                 retry_delays_ms: tuple[int, ...] = (100, 200), max_attempts: int = 5,
                 sweep_interval: float = 3600.0, check_skew: int | None = None) -> None:
        """`check_skew`: how early a check is still taken (None: a whole delay, so that
        `check_now` stands for the delay having passed; forged-check scenarios set it)."""
        from chalice.config import Config

        from app import app
        from local.api import local_server

        self.keys = keys
        self.retry_delays_ms = retry_delays_ms
        self.sweep_interval = sweep_interval
        self.sandbox = make_server("127.0.0.1", 0, keys["app_private"].parent,
                                   notify_schedule or [0.3] * 7)
        self.api_server = local_server(app, Config.create(), "127.0.0.1", 0)
        self.api_url = f"http://127.0.0.1:{self.api_server.server.server_address[1]}"
        self._threads = [threading.Thread(target=s, daemon=True) for s in
                         (self.sandbox.serve_forever, self.api_server.server.serve_forever)]
        for t in self._threads:
            t.start()
        self.settings = dataclasses.replace(
            config.load(), rmq_url=rmq_url, check_delay_seconds=check_delay,
            bridge_max_attempts=max_attempts,
            check_skew_seconds=check_delay if check_skew is None else check_skew)
        self.store = CountingStore()
        self.broker = broker.Broker(rmq_url, check_delay)
        self.gateway = self.make_gateway()
        self.deps = Deps(settings=self.settings, store=self.store, broker=self.broker,
                         gateway=self.gateway)
        deps.use(self.deps)
        self.http = Http(self.api_url)
        self.sandbox_http = Http(self.sandbox.base_url)
        self._bridge: tuple[threading.Event, threading.Thread] | None = None
        for g in RELIABILITY_GOODS:
            self.store.put_goods(g)
        self.start_stock = stock(self.store)

    def make_gateway(self, timeout: float = 5.0) -> AlipayGateway:
        return AlipayGateway(
            LOCAL_APP_ID, LOCAL_SELLER_ID, self.sandbox.gateway_url,
            self.keys["app_private"].read_text(), self.keys["alipay_public"].read_text(),
            f"{self.api_url}/alipay/notify", f"{self.api_url}/alipay/return", timeout=timeout)

    # --- the bridge as a thread -------------------------------------------------

    def start_bridge(self, d: Deps | None = None) -> None:
        from chalicelib import worker

        assert self._bridge is None
        stop = threading.Event()
        t = threading.Thread(target=worker.run, args=(d or self.deps, stop), daemon=True,
                             kwargs={"sweep_interval": self.sweep_interval,
                                     "retry_delays_ms": self.retry_delays_ms})
        t.start()
        self._bridge = (stop, t)

    def stop_bridge(self) -> None:
        if self._bridge is not None:
            stop, t = self._bridge
            stop.set()
            t.join(20)
            assert not t.is_alive(), "the bridge did not stop"
            self._bridge = None

    def close(self) -> None:
        self.stop_bridge()
        deps.use(None)
        self.api_server.shutdown()
        self.sandbox.shutdown()
        self.sandbox.server_close()
        self.broker.close()

    # --- a shopper --------------------------------------------------------------

    def order(self, user: str, cart: Mapping[str, int] | None = None) -> dict[str, Any] | None:
        """Fill the cart (set-up, straight into the table) and POST /orders.
        None when the answer is a 4xx (out of stock)."""
        for gid, num in (cart or {"r-tea": 2, "r-cup": 1}).items():
            self.store.set_cart_line(user, gid, num)
        answer = self.http.api("POST", "/orders", user)
        if answer.status == 201:
            return dict(answer.json())
        assert answer.status < 500, answer.body
        for gid in (cart or {"r-tea": 2, "r-cup": 1}):
            self.store.delete_cart_line(user, gid)
        return None

    def pay_url(self, order: Mapping[str, Any]) -> str | None:
        answer = self.http.api("POST", f"/orders/{order['id']}/pay", order["username"])
        return str(answer.json()["payUrl"]) if answer.status == 200 else None

    def open_cashier(self, url: str) -> int:
        return self.sandbox_http.request("GET", url).status

    def press_pay(self, order_id: str, *, drop_notify: bool = False) -> int:
        form = {"out_trade_no": order_id, **({"notify": "drop"} if drop_notify else {})}
        return self.sandbox_http.request(
            "POST", "/sandbox/pay", body=urllib.parse.urlencode(form).encode(),
            headers={"Content-Type": "application/x-www-form-urlencoded"}).status

    def check_now(self, order_id: str) -> None:
        """A check message straight into queue.order.check, as if its delay had passed."""
        self.broker.publish(broker.EXCHANGE_DELAY, broker.QUEUE_CHECK, {"orderId": order_id})

    def trades(self) -> dict[str, dict[str, Any]]:
        return {t["out_trade_no"]: t for t in self.sandbox.book.snapshot_all()}

    def notify_5xx(self) -> int:
        """5xx answers the API gave to the sandbox's notifies."""
        return sum(1 for t in self.trades().values() for a in t["notify_attempts"]
                   if (a["status"] or 0) >= 500)

    def acknowledged(self) -> set[str]:
        """Orders whose notify was answered `success`."""
        return {oid for oid, t in self.trades().items() if t["notify_acknowledged"]}

    def unpaid(self) -> list[str]:
        return [o.id for o, _ in all_orders() if o.status == UNPAID]

    def depths(self) -> dict[str, int]:
        return queue_depths(self.settings.rmq_url, queue_names(self.retry_delays_ms))

    def drained(self, *, parked_ok: bool = False, waiting_ok: bool = False) -> bool:
        """Every queue empty; `waiting_ok`: but queue.order.delay (messages waiting
        out the check delay); `parked_ok`: but the parked queues."""
        return all(n == 0 for q, n in self.depths().items()
                   if not (parked_ok and q.endswith(broker.PARKED_SUFFIX))
                   and not (waiting_ok and q == broker.QUEUE_DELAY))


# --- the bridge as a process ----------------------------------------------------

PROJECT = Path(__file__).resolve().parents[2]


class BridgeProcess:
    """`python -m tests.reliability.bridge_proc` (the bridge's main with a counting
    store) against the stack's broker, DynamoDB and sandbox; killed and restarted."""

    def __init__(self, stack: Stack, workdir: Path, **env: str) -> None:
        self.stack = stack
        self.count_file = workdir / "transitions.log"
        self.log_file = workdir / "bridge.log"
        s = stack.settings
        self.env = {
            **os.environ, "STAGE": "test", "RMQ_URL": s.rmq_url,
            "ORDER_CHECK_DELAY_SECONDS": str(s.check_delay_seconds),
            "CHECK_CLOCK_SKEW_SECONDS": str(s.check_skew_seconds),
            "BRIDGE_MAX_ATTEMPTS": str(s.bridge_max_attempts),
            "BRIDGE_RETRY_DELAYS_MS": ",".join(str(d) for d in stack.retry_delays_ms),
            "SWEEP_INTERVAL_SECONDS": str(stack.sweep_interval),
            "GOODS_TABLE": s.goods_table, "CARTS_TABLE": s.carts_table,
            "ORDERS_TABLE": s.orders_table,
            "ALIPAY_APP_ID": LOCAL_APP_ID, "ALIPAY_SELLER_ID": LOCAL_SELLER_ID,
            "ALIPAY_GATEWAY": stack.sandbox.gateway_url,
            "ALIPAY_APP_PRIVATE_KEY_FILE": str(stack.keys["app_private"]),
            "ALIPAY_PUBLIC_KEY_FILE": str(stack.keys["alipay_public"]),
            "ALIPAY_NOTIFY_URL": f"{stack.api_url}/alipay/notify",
            "ALIPAY_RETURN_URL": f"{stack.api_url}/alipay/return",
            "PYTHONUNBUFFERED": "1", **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills = 0
        self._log_from = 0  # where this run's lines start in the log file

    def start(self, *, ready: bool = False) -> None:
        """Start it; `ready`: and wait until it consumes (its signal handlers are set)."""
        assert self.proc is None or self.proc.poll() is not None
        self._log_from = self.log_file.stat().st_size if self.log_file.exists() else 0
        with open(self.log_file, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.reliability.bridge_proc", str(self.count_file)],
                cwd=PROJECT, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        if ready:
            self._wait_consuming()

    def _consuming(self) -> bool:
        with open(self.log_file, "rb") as log_:
            log_.seek(self._log_from)
            return b"consuming " in log_.read()

    def _wait_consuming(self) -> None:
        def consuming() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.tail()
            return self._consuming()

        wait_until(consuming, 60, "the restarted bridge consumes", step=0.1)

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, whatever it had in hand is unacked."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.kills += 1

    def stop(self) -> int:
        """SIGTERM: finish the message in hand and stop; returns the exit code.
        A bridge still booting (the killer thread may have just restarted it) is let
        reach its consume loop first: before its handlers are set, SIGTERM is the
        interpreter's default, death by signal, which is not what is being tested."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self._wait_consuming()
        self.proc.terminate()
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return -9

    def transitions(self) -> list[tuple[str, str]]:
        return read_transitions([self.count_file])

    def attempts(self) -> list[tuple[str, str]]:
        return read_transitions([self.count_file], attempts=True)

    def tail(self, chars: int = 3000) -> str:
        return self.log_file.read_text(errors="replace")[-chars:] if self.log_file.exists() else ""


def settle(stack: Stack, start: Callable[[], None], stop: Callable[[], None], *,
           done: Callable[[], bool] = lambda: True, timeout: float = 120.0,
           waiting_ok: bool = False, unpaid_ok: bool = False) -> bool:
    """Let the bridge run until every order is out of UNPAID, `done()` holds and the
    queues look empty; then stop it and look again with no consumer (a running
    consumer's prefetched, unacked messages do not show in a queue's ready count, and
    late messages, such as a notify Alipay sent again, may still come). Not empty:
    start it again and repeat. Returns with the bridge stopped; True when drained."""
    deadline = time.monotonic() + timeout
    while True:
        left = max(5.0, deadline - time.monotonic())
        try:
            wait_until(lambda: (unpaid_ok or not stack.unpaid()) and done()
                       and stack.drained(waiting_ok=waiting_ok), left, "settled", step=0.3)
        finally:
            stop()
        if stack.drained(waiting_ok=waiting_ok):
            return True
        if time.monotonic() > deadline:
            return False
        start()
        time.sleep(1.0)
