"""Shared fixtures: a moto DynamoDB server for the session, fresh tables per test,
a fake publisher, the Chalice test client and tokens."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
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
from chalicelib.context import Deps  # noqa: E402
from chalicelib.domain import Goods, Unavailable  # noqa: E402
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
        self.refunds: list[str] = []
        self.events: list[dict[str, Any]] = []  # order events, as published
        self.deliveries: list[tuple[str, int | None]] = []  # (delivery id, wait)
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

    def publish_refund(self, refund_id: str) -> None:
        if self.down:
            raise Unavailable("broker down (fake)")
        self.refunds.append(refund_id)

    def publish_event(self, event: Any) -> None:
        if self.down:
            raise Unavailable("broker down (fake)")
        self.events.append(dict(event))

    def publish_delivery(self, delivery_id: str, wait_seconds: int | None = None, *,
                         resend: bool = False) -> None:
        if self.down:
            raise Unavailable("broker down (fake)")
        self.deliveries.append((delivery_id, "resend" if resend else wait_seconds))

    def queue_depth(self, queue: str) -> int:
        if self.down:
            raise Unavailable("broker down (fake)")
        self.depth_reads += 1
        return self.depths.get(queue, 0)

    def parked_counts(self) -> dict[str, int]:
        if self.down:
            raise Unavailable("broker down (fake)")
        return {q: n for q, n in self.depths.items() if q.endswith(".parked")}

    def ping(self) -> None:
        if self.down:
            raise Unavailable("broker down (fake)")


class FakeGateway:
    """The payment port with no trade at the provider unless a test adds one
    (`trades[order_id] = Trade(...)`); refunds are recorded and succeed unless
    `refund_error` is set (raised once per call)."""

    app_id = "app"
    seller_id = "seller"

    def __init__(self) -> None:
        self.trades: dict[str, Any] = {}
        self.closed: list[str] = []
        self.refunds: list[tuple[str, Decimal, str]] = []
        self.refund_error: Exception | None = None
        self.refund_states: dict[str, Any] = {}  # request_no -> RefundState (query_refund)
        self.bills: dict[Any, bytes] = {}  # day -> the bill's zip (none: no trade that day)
        self.bill_error: Exception | None = None  # raised by bill_url
        self.download_error: Exception | None = None  # raised by download_bill

    def page_pay_url(self, order_id: str, amount: Decimal, subject: str, time_expire: Any) -> str:
        return f"https://fake.invalid/pay?out_trade_no={order_id}&total_amount={amount}"

    def read_notice(self, params: Any) -> Any:
        """A notify signed by `fake_notify`, checked as the adapter checks one (the
        real RSA2 path: tests/unit/test_notify.py)."""
        from chalicelib.alipay_gateway import TRADE_STATES
        from chalicelib.domain import parse_amount
        from chalicelib.ports import NoticeRefused, PaymentNotice

        fields = {k: v for k, v in params.items() if k != "sign"}
        if not hmac.compare_digest(str(params.get("sign", "")), _fake_sign(fields)):
            raise NoticeRefused("bad signature")
        if fields.get("app_id") != self.app_id or fields.get("seller_id") != self.seller_id:
            raise NoticeRefused("not for us")
        paid = fields.get("gmt_payment")
        return PaymentNotice(
            order_id=fields.get("out_trade_no", ""), trade_no=fields.get("trade_no", ""),
            state=TRADE_STATES.get(fields.get("trade_status", "")),
            amount_fen=parse_amount(fields.get("total_amount", "")),
            paid_at=(datetime.strptime(paid, "%Y-%m-%d %H:%M:%S").replace(tzinfo=_SHANGHAI)
                     .astimezone(UTC) if paid else None),
            notice_id=fields.get("notify_id"), fields=fields)

    def read_return(self, params: Any) -> str:
        from chalicelib.ports import NoticeRefused

        raise NoticeRefused("the fake gateway verifies nothing")

    def query_trade(self, order_id: str) -> Any:
        return self.trades.get(order_id)

    def close_trade(self, order_id: str) -> None:
        self.closed.append(order_id)

    def refund_payment(self, order_id: str, amount: Decimal, request_no: str) -> Any:
        from chalicelib.domain import to_fen
        from chalicelib.ports import RefundOutcome

        if self.refund_error is not None:
            raise self.refund_error
        first = all(req != request_no for _o, _a, req in self.refunds)
        if first:
            self.refunds.append((order_id, amount, request_no))
        total = sum(to_fen(a) for o, a, _r in self.refunds if o == order_id)
        return RefundOutcome(order_id=order_id, trade_no=f"T-{order_id}", refunded_fen=total,
                             moved=first)

    def bill_url(self, day: Any) -> str | None:
        if self.bill_error is not None:
            raise self.bill_error
        return f"https://fake.invalid/bill/{day.isoformat()}" if day in self.bills else None

    def download_bill(self, url: str, out: Any) -> int:
        from datetime import date

        if self.download_error is not None:
            raise self.download_error
        data = self.bills[date.fromisoformat(url.rsplit("/", 1)[1])]
        out.write(data)
        return len(data)

    def query_refund(self, order_id: str, request_no: str) -> Any:
        from chalicelib.ports import RefundState

        if request_no in self.refund_states:
            return self.refund_states[request_no]
        made = any(req == request_no for _o, _a, req in self.refunds)
        return RefundState.SUCCEEDED if made else RefundState.NOT_MADE


@dataclass(frozen=True)
class FakeAnswer:
    """What a subscriber answered, as chalicelib/webhook_http.py's Answer."""

    status: int | None
    ms: int = 3
    body: str = "ok"
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300 and self.error is None


class FakeSender:
    """The webhook port without HTTP: records each POST and answers from `answers`
    in turn (200 when none is left). A URL in `refused` is not one it calls."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, bytes, dict[str, str], float]] = []
        self.answers: list[FakeAnswer] = []
        self.refused: set[str] = set()

    def check_url(self, url: str) -> str:
        if url in self.refused or not url.startswith(("http://", "https://")):
            raise ValueError("not an address webhooks may call")
        return url

    def post(self, url: str, body: bytes, headers: Any, *, timeout: float) -> FakeAnswer:
        self.posts.append((url, body, dict(headers), timeout))
        return self.answers.pop(0) if self.answers else FakeAnswer(200)


class DictArchive:
    """The bills archive port in a dict; it closes what it is given, as boto3's
    upload_fileobj does (a caller must not reuse that handle)."""

    def __init__(self) -> None:
        self.kept: dict[str, bytes] = {}

    def keep(self, day: Any, name: str, source: Any) -> str:
        key = f"bills/trade/{day}/{len(self.kept)}-{name}"
        self.kept[key] = source.read()
        source.close()
        return key


_SHANGHAI = timezone(timedelta(hours=8))
_FAKE_KEY = b"fake-gateway-key"  # stands in for Alipay's RSA2 key pair


def _fake_sign(fields: dict[str, str]) -> str:
    text = "&".join(f"{k}={v}" for k, v in sorted(fields.items()))
    return hmac.new(_FAKE_KEY, text.encode(), hashlib.sha256).hexdigest()


def fake_notify(order_id: str, trade_no: str, amount: str, **changes: str) -> dict[str, str]:
    """A payment notify as FakeGateway.read_notice accepts it (signed, for its ids)."""
    fields = {"notify_id": "n1", "app_id": FakeGateway.app_id,
              "seller_id": FakeGateway.seller_id, "out_trade_no": order_id,
              "trade_no": trade_no, "trade_status": "TRADE_SUCCESS",
              "total_amount": amount, "gmt_payment": "2026-11-26 15:00:00", **changes}
    return {**fields, "sign": _fake_sign(fields)}


def check_due(d: Any, order_id: str) -> Any:
    """The order's check message, handled at its check time (the handler parks one
    that comes earlier: a forged check)."""
    from chalicelib import handlers

    order = d.store.get_order(order_id)
    if order is not None and d.clock() < order.check_time:
        d.clock.now = order.check_time
    return handlers.on_check(d, {"orderId": order_id})


def alipay_pay_msg(keys: Any, order_id: str, trade_no: str, amount: str,
                   paid_at: datetime | None = None) -> dict[str, Any]:
    """A pay message as the notify route publishes it, its notify signed with the
    sandbox's (Alipay's) key: what a notify that was lost would have said."""
    from chalicelib.domain import iso
    from local.alipay_sandbox import LOCAL_APP_ID, LOCAL_SELLER_ID
    from local.alipay_sandbox.keys import load_private_key
    from local.alipay_sandbox.signer import sign_params

    paid_at = paid_at or datetime.now(UTC)
    gmt = paid_at.astimezone(_SHANGHAI).strftime("%Y-%m-%d %H:%M:%S")
    notify_id = f"N{trade_no}"[:64]
    form = sign_params({
        "notify_time": gmt, "notify_type": "trade_status_sync", "notify_id": notify_id,
        "app_id": LOCAL_APP_ID, "charset": "utf-8", "version": "1.0", "trade_no": trade_no,
        "out_trade_no": order_id, "seller_id": LOCAL_SELLER_ID,
        "trade_status": "TRADE_SUCCESS", "total_amount": amount, "gmt_payment": gmt,
    }, load_private_key(keys["alipay_private"]))
    return {"orderId": order_id, "tradeNo": trade_no, "totalAmount": amount,
            "payTime": iso(paid_at.replace(microsecond=0)), "notifyId": notify_id,
            "notify": form}


def fake_pay_msg(order_id: str, trade_no: str, amount: str) -> dict[str, Any]:
    """A pay message as the notify route publishes it, its notify signed for the fake."""
    return {"orderId": order_id, "tradeNo": trade_no, "totalAmount": amount,
            "payTime": "2026-11-26T07:00:00.000Z", "notifyId": "n1",
            "notify": fake_notify(order_id, trade_no, amount)}


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    from local.dynamodb import start_in_thread

    server = start_in_thread("127.0.0.1", _MOTO_PORT)
    yield DYNAMODB_URL
    server.shutdown()


@pytest.fixture(scope="session")
def created_tables(moto_server: str) -> Store:
    """The test tables, made once per session (moto makes a table with its indexes in
    about a second; emptying the few items a test leaves takes milliseconds)."""
    urllib.request.urlopen(
        urllib.request.Request(f"{moto_server}/moto-api/reset", method="POST"), timeout=10
    ).read()
    store = Store.from_settings(SETTINGS)
    store.create_tables()
    return store


@pytest.fixture
def tables(created_tables: Store) -> Store:
    """Empty tables with the test catalogue."""
    for model in MODELS.all:
        items = list(model.scan(consistent_read=True))
        if items:
            with model.batch_write() as batch:
                for item in items:
                    batch.delete(item)
    for g in CATALOGUE:
        created_tables.put_goods(g)
    return created_tables


class Clock:
    def __init__(self) -> None:
        self.now: datetime | None = None

    def __call__(self) -> datetime:
        return self.now or datetime.now(UTC)


@pytest.fixture
def app_deps(tables: Store) -> Iterator[Deps]:
    d = Deps(settings=config.load(), store=tables, broker=FakePublisher(), clock=Clock(),
             gateway=FakeGateway(), webhooks=FakeSender())
    deps.use(d)
    yield d
    deps.use(None)


@pytest.fixture
def client(app_deps: Deps, tmp_path: Any) -> Any:
    from chalice.test import Client

    from app import app

    with Client(app, stage_name="test", project_dir=str(tmp_path)) as c:
        yield c


def token(username: str, ttl: int = 3600, role: str | None = None) -> str:
    return auth.issue(config.get().jwt_secret, username, ttl, role=role)


def operator_bearer(username: str = "carol") -> dict[str, str]:
    return {"Authorization": f"Bearer {token(username, role=auth.OPERATOR)}",
            "Content-Type": "application/json"}


def bearer(username: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(username)}", "Content-Type": "application/json"}


def body(response: Any) -> Any:
    return json.loads(response.body)
