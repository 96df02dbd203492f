"""moto's DynamoDB in server mode, with its requests applied one at a time.

moto's backend does not lock: two concurrent UpdateItem `ADD` or two
TransactWriteItems on the same item can interleave their read-modify-write and
lose an update, which real DynamoDB never does (conditions and ADD are atomic
per item, transactions serializable). The server below keeps moto's threaded
HTTP front (keep-alive connections) and serializes the calls into the backend,
so the stock conditions tested here hold as they do on AWS.
"""

from __future__ import annotations

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


class _Quiet(MotoRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """No line per request: a test run or a benchmark makes tens of thousands."""


def make(host: str = "127.0.0.1", port: int = 8002) -> BaseWSGIServer:
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
