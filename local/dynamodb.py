"""moto's DynamoDB in server mode, with its requests applied one at a time.

moto's backend does not lock: two concurrent UpdateItem `ADD` or two
TransactWriteItems on the same item can interleave their read-modify-write and
lose an update, which real DynamoDB never does (conditions and ADD are atomic
per item, transactions serializable). The server below keeps moto's threaded
HTTP front (keep-alive connections) and serializes the calls into the backend,
so the stock conditions tested here hold as they do on AWS.
"""

from __future__ import annotations

import copy
import signal
import threading
from collections.abc import Callable, Iterable
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


class _Quiet(MotoRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """No line per request: a test run or a benchmark makes tens of thousands."""


def make(host: str = "127.0.0.1", port: int = 8002) -> BaseWSGIServer:
    _cheap_transactions()
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
