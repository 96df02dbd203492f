"""Shared fixtures: a moto DynamoDB server for the session, fresh tables per test,
a fake publisher, the Chalice test client and tokens."""

from __future__ import annotations

import json
import os
import socket
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Settings are read once, lazily; set them before anything of the app is imported.
_MOTO_PORT = _free_port()
os.environ.update(
    {
        "STAGE": "test",
        "AWS_ENDPOINT_URL_DYNAMODB": f"http://127.0.0.1:{_MOTO_PORT}",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "JWT_SECRET": "test-secret-0123456789abcdef0123456789",
        "ORDER_PAY_TIMEOUT_SECONDS": "1800",
        "ORDER_CHECK_DELAY_SECONDS": "2100",
    }
)
for _name in ("GOODS_TABLE", "CARTS_TABLE", "ORDERS_TABLE", "TABLE_PREFIX", "ALIPAY_APP_ID"):
    os.environ.pop(_name, None)

from chalicelib import auth, config, deps  # noqa: E402
from chalicelib.domain import Goods, Unavailable  # noqa: E402
from chalicelib.handlers import Deps  # noqa: E402
from chalicelib.store import Store  # noqa: E402
from chalicelib.store.models import models_for  # noqa: E402

DYNAMODB_URL = os.environ["AWS_ENDPOINT_URL_DYNAMODB"]
SETTINGS = config.load()
# The test tables' pynamodb models, for tests that look at DynamoDB items directly.
MODELS = models_for(SETTINGS.tables, SETTINGS.aws_region)

CATALOGUE = [
    Goods("g1", "Tea cup", 1990, 100),
    Goods("g2", "Teapot", 5990, 10),
    Goods("g3", "Rare tea", 9990, 1),
]


class FakePublisher:
    """Records what would have gone to RabbitMQ. `down=True` fails like a dead broker."""

    def __init__(self) -> None:
        self.checks: list[str] = []
        self.pays: list[dict[str, Any]] = []
        self.seckills: list[dict[str, Any]] = []
        self.depths: dict[str, int] = {}  # what queue_depth answers (0 when not set)
        self.depth_reads = 0
        self.down = False

    def publish_check(self, order_id: str) -> None:
        if self.down:
            raise Unavailable("broker down (fake)")
        self.checks.append(order_id)

    def publish_pay(self, msg: Any) -> None:
        if self.down:
            raise Unavailable("broker down (fake)")
        self.pays.append(dict(msg))

    def publish_seckill(self, msg: Any) -> None:
        if self.down:
            raise Unavailable("broker down (fake)")
        self.seckills.append(dict(msg))

    def queue_depth(self, queue: str) -> int:
        if self.down:
            raise Unavailable("broker down (fake)")
        self.depth_reads += 1
        return self.depths.get(queue, 0)

    def ping(self) -> None:
        if self.down:
            raise Unavailable("broker down (fake)")


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    from local.dynamodb import start_in_thread

    server = start_in_thread("127.0.0.1", _MOTO_PORT)
    yield DYNAMODB_URL
    server.shutdown()


@pytest.fixture
def tables(moto_server: str) -> Store:
    """Empty tables with the test catalogue."""
    urllib.request.urlopen(
        urllib.request.Request(f"{moto_server}/moto-api/reset", method="POST"), timeout=10
    ).read()
    store = Store.from_settings(SETTINGS)
    store.create_tables()
    for g in CATALOGUE:
        store.put_goods(g)
    return store


class Clock:
    def __init__(self) -> None:
        self.now: datetime | None = None

    def __call__(self) -> datetime:
        return self.now or datetime.now(UTC)


@pytest.fixture
def app_deps(tables: Store) -> Iterator[Deps]:
    d = Deps(settings=config.load(), store=tables, broker=FakePublisher(), clock=Clock())
    deps.use(d)
    yield d
    deps.use(None)


@pytest.fixture
def client(app_deps: Deps, tmp_path: Any) -> Any:
    from chalice.test import Client

    from app import app

    with Client(app, stage_name="test", project_dir=str(tmp_path)) as c:
        yield c


def token(username: str, ttl: int = 3600) -> str:
    return auth.issue(config.get().jwt_secret, username, ttl)


def bearer(username: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(username)}", "Content-Type": "application/json"}


def body(response: Any) -> Any:
    return json.loads(response.body)
