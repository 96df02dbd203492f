"""moto's DynamoDB in server mode, with its requests applied one at a time.

moto's backend does not lock: two concurrent UpdateItem `ADD` or two
TransactWriteItems on the same item can interleave their read-modify-write and
lose an update, which real DynamoDB never does (conditions and ADD are atomic
per item, transactions serializable). The server below keeps moto's threaded
HTTP front (keep-alive connections) and serializes the calls into the backend,
so the stock conditions tested here hold as they do on AWS.

A fault front may stand before it (`FaultSettings`; `python -m local dynamodb
--fault-rate 0.1 --faults throttle,internal,conflict,slow --slow-ms 800`, or the
environment: DYNAMODB_FAULT_RATE, DYNAMODB_FAULTS, DYNAMODB_SLOW_MS): a chosen
fraction of the DynamoDB calls gets one of DynamoDB's own failures, in the shape
DynamoDB sends it, without the call reaching moto (nothing of it is written), or
reaches moto only after a delay:

- throttle: HTTP 400 ProvisionedThroughputExceededException (botocore retries it);
- internal: HTTP 500 InternalServerError (botocore retries it);
- conflict: TransactWriteItems cancelled with a TransactionConflict reason, a
  single-item write HTTP 400 TransactionConflictException (botocore retries
  neither); calls that read only get another of the chosen kinds;
- slow: forwarded after `slow_ms`.

`GET /fault-front` shows the settings and what was injected; `PUT /fault-front`
with JSON `{"rate": 0.1, "kinds": ["throttle"], "slow_ms": 800}` changes them
(fields left out keep their value), `DELETE /fault-front` turns faults off.
"""

from __future__ import annotations

import copy
import gc
import inspect
import json
import os
import random
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import BaseWSGIServer, make_server

# DynamoDB operations that change nothing: any other request (and any S3 request)
# ends the sorted results the paged queries below reuse.
_READ_OPERATIONS = frozenset({"GetItem", "BatchGetItem", "Query", "Scan", "DescribeTable",
                              "ListTables", "DescribeTimeToLive", "ListTagsOfResource",
                              "DescribeContinuousBackups"})


class _OneAtATime:
    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self._app = app
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        with self._lock:
            operation = str(environ.get("HTTP_X_AMZ_TARGET", "")).rsplit(".", 1)[-1]
            if operation not in _READ_OPERATIONS:
                _PAGES.forget()
            return list(self._app(environ, start_response))


class _SortedPages:
    """The sorted results of the index queries being paged through, kept from one
    page to the next while nothing is written (requests are applied one at a time,
    and every write forgets them)."""

    def __init__(self) -> None:
        # key -> [the sorted items, their positions by table key (made on a later page)]
        self.sorted: dict[tuple[Any, ...], list[Any]] = {}

    def forget(self) -> None:
        self.sorted.clear()


_PAGES = _SortedPages()


def _key_json(value: Any) -> str:
    return json.dumps(value.to_json() if hasattr(value, "to_json") else value, sort_keys=True)


def _paged_query(original: Callable[..., Any]) -> Callable[..., Any]:
    """moto's Table.query, an index's page costing time in proportion to the page.

    For every page moto collects and sorts all the index's items of the hash key and
    then walks past the pages before (so reading a day of 200,000 orders took past
    10 s a page), which DynamoDB's never does. Here the first page's sort is kept
    and each later page is given to moto's own query as just its window of that
    sorted list, so moto still decides the page, its size and its last key. Only
    plain queries take this path (an index, its hash key only, forward, no legacy
    QueryFilter);
    anything else, and any page whose start key is not in the kept list, is moto's.
    """
    from moto.dynamodb.models.table import RESULT_SIZE_LIMIT

    signature = inspect.signature(original)

    def query(self: Any, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(self, *args, **kwargs)
        a = bound.arguments
        # A FilterExpression is applied by moto to the page it chose, after the
        # choosing: it does not change the window.
        plain = (a.get("index_name") and a.get("range_comparison") is None
                 and not a.get("range_key_conditions") and not a.get("filter_kwargs")
                 and a.get("scan_index_forward", True) and a.get("hash_key_conditions"))
        if not plain:
            return original(self, *args, **kwargs)
        key = (id(self), self.name, a["index_name"],
               tuple((name, _key_json(value)) for name, value in a["hash_key_conditions"]))
        kept = _PAGES.sorted.get(key)
        start = a.get("exclusive_start_key")
        if kept is None:
            captured: list[Any] = []
            sort = self.sorted_items

            def capture(hash_attrs: Any, range_attrs: Any, items: list[Any]) -> list[Any]:
                result = sort(hash_attrs, range_attrs, items)
                captured[:] = list(result)
                return result

            self.sorted_items = capture
            try:
                answer = original(self, *args, **kwargs)
            finally:
                del self.sorted_items
            _PAGES.sorted[key] = [captured, None]
            return answer
        items, positions = kept
        if start:
            if positions is None:  # most queries are one page: no positions for them
                positions = kept[1] = {
                    (_key_json(item.hash_key), _key_json(item.range_key)): n
                    for n, item in enumerate(items)}
            first = positions.get((_key_json(start.get(self.hash_key_attr)),
                                   _key_json(start.get(self.range_key_attr))
                                   if self.range_key_attr else _key_json(None)))
            if first is None:
                return original(self, *args, **kwargs)
        else:
            first = -1
        limit = a.get("limit")
        end, size = first + 1, 0
        while end < len(items):  # up to the item that ends the page, which moto sees
            size += items[end].size()
            end += 1
            if size > RESULT_SIZE_LIMIT or (limit and end - first - 1 > limit):
                break
        window = items[max(first, 0):end]
        self.all_items = lambda: list(window)
        try:
            return original(self, *args, **kwargs)
        finally:
            del self.all_items

    query._paged = True  # type: ignore[attr-defined]
    return query


class _TableCopier:
    """Stands in for the `copy` module inside moto's DynamoDB backend during a
    transaction: its rollback copy of a whole Table is skipped (the touched items
    are saved instead, see `_transact_write_items`); anything else is copied as before."""

    def __init__(self) -> None:
        self.skip_tables = threading.local()

    def deepcopy(self, value: Any, memo: Any = None) -> Any:
        from moto.dynamodb.models.table import Table

        if getattr(self.skip_tables, "on", False) and isinstance(value, Table):
            return value
        return copy.deepcopy(value, memo)

    def __getattr__(self, name: str) -> Any:
        return getattr(copy, name)


_COPIER = _TableCopier()


def _transact_write_items(original: Callable[..., None]) -> Callable[..., None]:
    """moto's TransactWriteItems with a rollback of the touched items only.

    moto backs up every table a transaction names with a deepcopy, so one
    transaction costs time in proportion to the whole table (about 1 s with 10,000
    orders), which DynamoDB's never does. Requests are applied one at a time here,
    so saving the few items the transaction touches and putting them back on
    failure is the same rollback.
    """

    def transact(self: Any, transact_items: list[dict[str, Any]]) -> None:
        from moto.dynamodb.models.dynamo_type import DynamoType

        saved: list[tuple[Any, Any, Any, Any]] = []
        for entry in transact_items:
            op = next(iter(entry.values()), None)
            table = self.tables.get(op.get("TableName")) if isinstance(op, dict) else None
            if table is None:
                continue
            key = op.get("Key") or {k: v for k, v in (op.get("Item") or {}).items()
                                    if k in (table.hash_key_attr, table.range_key_attr)}
            if table.hash_key_attr not in key:
                continue
            hash_value = DynamoType(key[table.hash_key_attr])
            range_value = (DynamoType(key[table.range_key_attr])
                           if table.range_key_attr and table.range_key_attr in key else None)
            item = table.get_item(hash_value, range_value)
            saved.append((table, hash_value, range_value, copy.deepcopy(item)))
        _COPIER.skip_tables.on = True
        try:
            original(self, transact_items)
        except BaseException:
            for table, hash_value, range_value, item in reversed(saved):
                if table.range_key_attr and range_value is not None:
                    bucket = table.items[hash_value]
                    if item is None:
                        bucket.pop(range_value, None)
                    else:
                        bucket[range_value] = item
                elif item is None:
                    table.items.pop(hash_value, None)
                else:
                    table.items[hash_value] = item
            raise
        finally:
            _COPIER.skip_tables.on = False

    return transact


def _cheap_transactions() -> None:
    from moto.dynamodb import models
    from moto.dynamodb.models.table import Table

    if not getattr(Table.query, "_paged", False):
        Table.query = _paged_query(Table.query)  # type: ignore[method-assign]

    backend = models.DynamoDBBackend
    if not getattr(backend.transact_write_items, "_touched_items_only", False):
        models.copy = _COPIER  # type: ignore[attr-defined]
        patched = _transact_write_items(backend.transact_write_items)
        patched._touched_items_only = True  # type: ignore[attr-defined]
        backend.transact_write_items = patched  # type: ignore[method-assign]


class _Quiet(MotoRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """No line per request: a test run or a benchmark makes tens of thousands."""


def make(host: str = "127.0.0.1", port: int = 8002, faults: FaultSettings | None = None,
         ) -> BaseWSGIServer:
    _cheap_transactions()
    app = FaultFront(_OneAtATime(DomainDispatcherApplication(create_backend_app)),
                     faults or FaultSettings())
    server = make_server(host, port, app, threaded=True, request_handler=_Quiet)
    server.fault_front = app  # type: ignore[attr-defined]
    return server


def start_in_thread(host: str, port: int, faults: FaultSettings | None = None,
                    ) -> BaseWSGIServer:
    server = make(host, port, faults)
    threading.Thread(target=server.serve_forever, name="moto", daemon=True).start()
    return server


FREEZE_EVERY_SECONDS = 5.0


def _freeze_survivors() -> None:
    """moto keeps every item as Python objects: with tens of thousands of items a
    full collection walks millions of them and stops the server for about a second
    (the bench saw a close's lateness jump to 1.2 s mid-run). What survives a few
    seconds is the tables: moved out of the collector's sight (gc.freeze) every few
    seconds, after the young garbage went, so a collection walks only what is new."""

    def loop() -> None:
        while True:
            time.sleep(FREEZE_EVERY_SECONDS)
            gc.collect(1)
            gc.freeze()

    threading.Thread(target=loop, name="gc-freeze", daemon=True).start()


def serve(host: str, port: int, faults: FaultSettings | None = None) -> None:
    server = make(host, port, faults if faults is not None else FaultSettings.from_env())
    _freeze_survivors()  # its own process (python -m local dynamodb): a long-lived server

    def stop(signum: int, frame: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.serve_forever()


# --- the fault front --------------------------------------------------------------

FAULT_KINDS = ("throttle", "internal", "conflict", "slow")
CONTROL_PATH = "/fault-front"
_TARGET_PREFIX = "DynamoDB_20120810."
_ERROR_TYPE = "com.amazonaws.dynamodb.v20120810#"
_SINGLE_WRITES = frozenset({"PutItem", "UpdateItem", "DeleteItem"})


@dataclass(frozen=True)
class FaultSettings:
    """`rate`: the fraction of DynamoDB calls that get a fault (0: none); `kinds`:
    which faults, one picked at random per faulted call; `slow_ms`: the delay of a
    slow call; `seed`: for a repeatable sequence of faults."""

    rate: float = 0.0
    kinds: tuple[str, ...] = FAULT_KINDS
    slow_ms: int = 800
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"the fault rate must be within 0..1: {self.rate}")
        unknown = set(self.kinds) - set(FAULT_KINDS)
        if unknown or not self.kinds:
            raise ValueError(f"faults must be some of {','.join(FAULT_KINDS)}: {self.kinds}")
        if self.slow_ms < 0:
            raise ValueError(f"slow_ms must not be negative: {self.slow_ms}")

    @classmethod
    def parse(cls, rate: str | float | None = None, kinds: str | None = None,
              slow_ms: str | int | None = None, seed: str | int | None = None,
              ) -> FaultSettings:
        return cls(
            rate=float(rate) if rate not in (None, "") else 0.0,
            kinds=(tuple(k.strip() for k in kinds.split(",") if k.strip())
                   if kinds else FAULT_KINDS),
            slow_ms=int(slow_ms) if slow_ms not in (None, "") else 800,
            seed=int(seed) if seed not in (None, "") else None)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> FaultSettings:
        env = os.environ if env is None else env
        return cls.parse(env.get("DYNAMODB_FAULT_RATE"), env.get("DYNAMODB_FAULTS"),
                         env.get("DYNAMODB_SLOW_MS"), env.get("DYNAMODB_FAULT_SEED"))

    def to_json(self) -> dict[str, Any]:
        return {"rate": self.rate, "kinds": list(self.kinds), "slow_ms": self.slow_ms,
                "seed": self.seed}


@dataclass
class _Injected:
    calls: int = 0
    faults: Counter[str] = field(default_factory=Counter)


class FaultFront:
    """WSGI middleware before moto: DynamoDB's failures for a fraction of the calls.

    An error is answered here, before moto sees the call, so a faulted write never
    happens, in part or whole; a slow call waits here, outside moto's lock, so it
    holds up no other call."""

    def __init__(self, app: Callable[..., Iterable[bytes]], settings: FaultSettings) -> None:
        self._app = app
        self._lock = threading.Lock()
        self._settings = settings
        self._random = random.Random(settings.seed)
        self._injected = _Injected()

    @property
    def settings(self) -> FaultSettings:
        return self._settings

    def configure(self, settings: FaultSettings) -> None:
        with self._lock:
            self._settings = settings
            self._random = random.Random(settings.seed)

    def report(self) -> dict[str, Any]:
        with self._lock:
            return {**self._settings.to_json(), "calls": self._injected.calls,
                    "injected": dict(self._injected.faults)}

    def reset_counts(self) -> None:
        with self._lock:
            self._injected = _Injected()

    def _pick(self, operation: str) -> str | None:
        with self._lock:
            self._injected.calls += 1
            settings = self._settings
            if settings.rate <= 0 or self._random.random() >= settings.rate:
                return None
            kinds = [k for k in settings.kinds if k != "conflict"
                     or operation == "TransactWriteItems" or operation in _SINGLE_WRITES]
            if not kinds:
                return None
            kind = self._random.choice(kinds)
            self._injected.faults[kind] += 1
            return kind

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any],
                 ) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == CONTROL_PATH:
            return self._control(environ, start_response)
        target = str(environ.get("HTTP_X_AMZ_TARGET") or "")
        if not target.startswith(_TARGET_PREFIX):
            return self._app(environ, start_response)
        operation = target.removeprefix(_TARGET_PREFIX)
        kind = self._pick(operation)
        if kind is None:
            return self._app(environ, start_response)
        if kind == "slow":
            time.sleep(self._settings.slow_ms / 1000)
            return self._app(environ, start_response)
        body = self._read_body(environ)
        with self._lock:
            which = self._random.random()
        status, payload = _fault_answer(kind, operation, body, which)
        return _answer(start_response, status, payload, "application/x-amz-json-1.0")

    @staticmethod
    def _read_body(environ: dict[str, Any]) -> bytes:
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        return environ["wsgi.input"].read(length) if length > 0 else b""

    def _control(self, environ: dict[str, Any], start_response: Callable[..., Any],
                 ) -> list[bytes]:
        method = environ.get("REQUEST_METHOD")
        try:
            if method == "PUT":
                change = json.loads(self._read_body(environ) or b"{}")
                if not isinstance(change, dict) or set(change) - {"rate", "kinds", "slow_ms",
                                                                  "seed"}:
                    raise ValueError("a JSON object of rate, kinds, slow_ms, seed")
                now = self._settings
                kinds = change.get("kinds", list(now.kinds))
                self.configure(FaultSettings(
                    rate=float(change.get("rate", now.rate)),
                    kinds=tuple(kinds.split(",") if isinstance(kinds, str) else kinds),
                    slow_ms=int(change.get("slow_ms", now.slow_ms)),
                    seed=change.get("seed", now.seed)))
                self.reset_counts()
            elif method == "DELETE":
                self.configure(FaultSettings(kinds=self._settings.kinds,
                                             slow_ms=self._settings.slow_ms))
            elif method != "GET":
                return _answer(start_response, 405, {"error": "GET, PUT or DELETE"})
        except (ValueError, TypeError) as exc:
            return _answer(start_response, 400, {"error": str(exc)})
        return _answer(start_response, 200, self.report())


def _fault_answer(kind: str, operation: str, body: bytes, which: float,
                  ) -> tuple[int, dict[str, Any]]:
    """DynamoDB's own answer for the fault (status, JSON body); `which` (0..1) picks
    the action of a transaction that met the conflict."""
    if kind == "throttle":
        return 400, {"__type": _ERROR_TYPE + "ProvisionedThroughputExceededException",
                     "message": "The level of configured provisioned throughput for the table "
                                "was exceeded. Consider increasing your provisioning level "
                                "with the UpdateTable API."}
    if kind == "internal":
        return 500, {"__type": _ERROR_TYPE + "InternalServerError",
                     "message": "Internal server error"}
    if operation != "TransactWriteItems":
        return 400, {"__type": _ERROR_TYPE + "TransactionConflictException",
                     "message": "Transaction is ongoing for the item"}
    try:
        actions = len(json.loads(body or b"{}").get("TransactItems") or []) or 1
    except (ValueError, AttributeError):
        actions = 1
    conflicted = min(int(which * actions), actions - 1)
    reasons: list[dict[str, str]] = [
        {"Code": "TransactionConflict", "Message": "Transaction is ongoing for the item"}
        if i == conflicted else {"Code": "None"} for i in range(actions)]
    codes = ", ".join(r["Code"] for r in reasons)
    return 400, {"__type": _ERROR_TYPE + "TransactionCanceledException",
                 "Message": "Transaction cancelled, please refer cancellation reasons for "
                            f"specific reasons [{codes}]",
                 "CancellationReasons": reasons}


def _answer(start_response: Callable[..., Any], status: int, payload: Mapping[str, Any],
            content_type: str = "application/json") -> list[bytes]:
    data = json.dumps(payload).encode()
    reason = {200: "OK", 400: "Bad Request", 405: "Method Not Allowed",
              500: "Internal Server Error"}[status]
    start_response(f"{status} {reason}", [("Content-Type", content_type),
                                          ("Content-Length", str(len(data))),
                                          ("x-amzn-RequestId", uuid.uuid4().hex.upper())])
    return [data]
