"""moto's DynamoDB in server mode, with its requests applied one at a time.

moto's backend does not lock: two concurrent UpdateItem `ADD` or two
TransactWriteItems on the same item can interleave their read-modify-write and
lose an update, which real DynamoDB never does (conditions and ADD are atomic
per item, transactions serializable). The server below keeps moto's threaded
HTTP front (keep-alive connections) and serializes the calls into the backend,
so the stock conditions tested here hold as they do on AWS.

Two costs of moto that DynamoDB does not have are cut, with the same answers:
a transaction no longer deep-copies whole tables for its rollback, and the
answers of the item operations (their results are already DynamoDB's wire JSON)
are written with json.dumps instead of moto's shape-walking serializer, which
took about 30% of a GetItem. `FAST_ANSWERS.check = True` (the tests' server)
also makes moto's answer for every new shape of answer and records any difference.
"""

from __future__ import annotations

import copy
import json
import signal
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import BaseWSGIServer, make_server


class _OneAtATime:
    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self._app = app
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        with self._lock:
            return list(self._app(environ, start_response))


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

    backend = models.DynamoDBBackend
    if not getattr(backend.transact_write_items, "_touched_items_only", False):
        models.copy = _COPIER  # type: ignore[attr-defined]
        patched = _transact_write_items(backend.transact_write_items)
        patched._touched_items_only = True  # type: ignore[attr-defined]
        backend.transact_write_items = patched  # type: ignore[method-assign]


# Item operations: moto's result for these is DynamoDB's wire JSON already.
_WIRE_READY = frozenset({
    "GetItem", "PutItem", "UpdateItem", "DeleteItem", "Query", "Scan", "BatchGetItem",
    "BatchWriteItem", "TransactGetItems", "TransactWriteItems",
})
_JSON_HEADERS = {"Content-Type": "application/x-amz-json-1.0"}


class _FastAnswers:
    """`check`: compare the fast answer with moto's for every new shape of answer (its
    operation and the set of key paths in it; a difference is one of shape, the values
    are moto's own) and for one in `every` of the rest; the fast answer is served."""

    def __init__(self) -> None:
        self.check = False
        self.every = 25
        self.compared = 0
        self.differences: list[str] = []
        self._seen: dict[tuple[str, frozenset[str]], int] = {}

    def wants(self, operation: str, result: Mapping[str, Any]) -> bool:
        key = (operation, frozenset(_paths(result, "")))
        seen = self._seen.get(key, 0)
        self._seen[key] = seen + 1
        return seen % self.every == 0


def _paths(value: Any, prefix: str) -> Iterable[str]:
    """Key paths of a JSON value; list items share their list's path."""
    if isinstance(value, dict):
        for k, v in value.items():
            path = f"{prefix}.{k}"
            yield path
            yield from _paths(v, path)
    elif isinstance(value, list):
        for v in value:
            yield from _paths(v, prefix + "[]")


FAST_ANSWERS = _FastAnswers()


def _fast_item_answers(original: Callable[..., Any]) -> Callable[..., Any]:
    def execute_result(self: Any, context: Any) -> Any:
        operation = context.operation_model.name
        if (context.service_model.service_name != "dynamodb" or operation not in _WIRE_READY
                or isinstance(self.result, BaseException)):
            return original(self, context)
        members = context.operation_model.output_shape.members
        try:  # moto's serializer keeps the output shape's members only
            answer = {k: v for k, v in self.result.items() if k in members}
            body = json.dumps(answer, separators=(",", ":"))
        except (AttributeError, TypeError, ValueError):  # not a dict, or bytes: moto's way
            return original(self, context)
        if FAST_ANSWERS.check and FAST_ANSWERS.wants(operation, answer):
            status, headers, moto_body = original(self, context)
            FAST_ANSWERS.compared += 1
            if (status, dict(headers), json.loads(moto_body)) != (200, _JSON_HEADERS, answer):
                FAST_ANSWERS.differences.append(
                    f"{operation}: moto {status} {dict(headers)} {moto_body[:400]!r}, "
                    f"fast {body[:400]!r}")
        return 200, dict(_JSON_HEADERS), body

    execute_result._wire_json = True  # type: ignore[attr-defined]
    return execute_result


def _fast_answers() -> None:
    from moto.core.responses import ActionResult

    if not getattr(ActionResult.execute_result, "_wire_json", False):
        ActionResult.execute_result = _fast_item_answers(  # type: ignore[method-assign]
            ActionResult.execute_result)


class _Quiet(MotoRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """No line per request: a test run or a benchmark makes tens of thousands."""


def make(host: str = "127.0.0.1", port: int = 8002) -> BaseWSGIServer:
    _cheap_transactions()
    _fast_answers()
    app = _OneAtATime(DomainDispatcherApplication(create_backend_app))
    return make_server(host, port, app, threaded=True, request_handler=_Quiet)


def start_in_thread(host: str, port: int) -> BaseWSGIServer:
    server = make(host, port)
    threading.Thread(target=server.serve_forever, name="moto", daemon=True).start()
    return server


def serve(host: str, port: int) -> None:
    server = make(host, port)

    def stop(signum: int, frame: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.serve_forever()
