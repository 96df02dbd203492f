"""Auth against every route that needs it, over HTTP: no token, a malformed one, an
expired one, one signed with another secret, `alg: none`, another algorithm,
missing claims: 401 and no data. Another user's order or ticket: 404, never data."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from chalicelib import config
from tests.reliability.harness import SCOREBOARD, Row, Stack, audit

pytestmark = pytest.mark.rabbitmq

OWNER, OTHER = "alice", "mallory"


@pytest.fixture
def stack(rmq_vhost: str, tables: Any, keys: dict[str, Path]) -> Iterator[Stack]:
    s = Stack(keys=keys, rmq_url=str(rmq_vhost), check_delay=600)
    yield s
    s.close()


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def bad_tokens() -> dict[str, str | None]:
    secret = config.get().jwt_secret
    now = int(time.time())
    claims = {"sub": OWNER, "iat": now, "exp": now + 3600}
    return {
        "no header": None,
        "empty": "",
        "Bearer alone": "Bearer",
        "Basic": "Basic " + base64.b64encode(b"alice:secret").decode(),
        "garbage": "Bearer not.a.jwt",
        "expired": "Bearer " + jwt.encode({**claims, "exp": now - 60}, secret, "HS256"),
        "other secret": "Bearer " + jwt.encode(claims, "another-secret-0123456789abcdef!!",
                                               "HS256"),
        "alg none": f"Bearer {_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}.",
        "alg none, signature kept": "Bearer " + ".".join(
            [_b64({"alg": "none", "typ": "JWT"}), _b64(claims),
             jwt.encode(claims, secret, "HS256").split(".")[2]]),
        "HS512": "Bearer " + jwt.encode(claims, secret, "HS512"),
        "no exp": "Bearer " + jwt.encode({"sub": OWNER}, secret, "HS256"),
        "no sub": "Bearer " + jwt.encode({"exp": now + 3600}, secret, "HS256"),
        "bad sub": "Bearer " + jwt.encode({**claims, "sub": "alice/../bob"}, secret, "HS256"),
        "sub not a string": "Bearer " + jwt.encode({**claims, "sub": 42}, secret, "HS256"),
        "tampered payload": "Bearer " + ".".join(
            [jwt.encode(claims, secret, "HS256").split(".")[0],
             _b64({**claims, "sub": "bob"}), jwt.encode(claims, secret, "HS256").split(".")[2]]),
    }


def auth_routes(order_id: str) -> list[tuple[str, str, bytes | None]]:
    from app import app

    fill = {"goods_id": "r-tea", "order_id": order_id, "sale_id": "any-sale",
            "ticket_id": "any-ticket", "refund_id": f"REFUND_{order_id}_1",
            "day": "2026-12-01", "difference_id": "0" * 20, "sub_id": "WH_0123456789abcdef",
            "delivery_id": "DLV_" + "0" * 32}
    found = []
    for path, methods in sorted(app.routes.items()):
        for method, entry in sorted(methods.items()):
            if entry.authorizer is not None:
                body = b'{"num": 1}' if method == "PUT" else (b"{}" if method == "POST" else None)
                found.append((method, path.format(**fill), body))
    return found


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
def test_auth(stack: Stack) -> None:
    started = time.monotonic()
    row = Row("auth")
    stack.store.set_cart_line(OWNER, "r-tea", 2)
    order = stack.order(OWNER, {"r-tea": 1})
    assert order is not None
    secret_bits = [order["id"].encode(), b"r-tea\", \"name\"", b'"totalMoney"']
    routes = auth_routes(order["id"])
    assert len(routes) >= 9
    gateway_shaped: set[str] = set()
    for label, header in bad_tokens().items():
        headers = {"Content-Type": "application/json",
                   **({"Authorization": header} if header is not None else {})}
        for method, path, body in routes:
            answer = stack.http.request(method, path, body=body, headers=headers)
            row.runs += 1
            leaked = any(bit in answer.body for bit in secret_bits)
            if answer.status != 401 or leaked:
                row.violations += 1
                row.notes.append(f"{label}: {method} {path} -> {answer.status} "
                                 f"{answer.body[:120]!r}")
            elif set(json.loads(answer.body)) != {"Code", "Message"}:
                # With no Authorization header the gateway answers before the
                # authorizer runs: its GatewayResponse (.chalice/resources.json, which
                # local/api.py serves too) must still be the contract's shape.
                gateway_shaped.add(label)
    # another user's order: 404 everywhere, and never in their lists
    for method, path in (("GET", f"/orders/{order['id']}"),
                         ("POST", f"/orders/{order['id']}/pay"),
                         ("POST", f"/orders/{order['id']}/cancel")):
        answer = stack.http.api(method, path, OTHER)
        row.runs += 1
        # the 404 may repeat the id the caller sent, and nothing of the order
        if answer.status != 404 or any(bit in answer.body for bit in secret_bits[1:]) \
                or OWNER.encode() in answer.body or b"payUrl" in answer.body:
            row.violations += 1
            row.notes.append(f"{OTHER}: {method} {path} -> {answer.status} {answer.body[:120]!r}")
    for path in ("/orders", "/cart"):
        answer = stack.http.api("GET", path, OTHER)
        row.runs += 1
        if answer.status != 200 or order["id"].encode() in answer.body \
                or b"r-tea" in answer.body:
            row.violations += 1
            row.notes.append(f"{OTHER}: GET {path} shows {OWNER}'s data")
    if gateway_shaped:
        row.violations += 1
        row.notes.append(f"401 not in the contract's shape for: {sorted(gateway_shaped)}")
    owner_view = stack.http.api("GET", f"/orders/{order['id']}", OWNER)
    assert owner_view.status == 200 and owner_view.json()["status"] == "UNPAID"
    audit(stack.store, stack.start_stock, stack.store.transitions, settled=False).into(row)
    row.http_5xx = stack.http.count_5xx
    row.seconds = time.monotonic() - started
    SCOREBOARD.record(row)
    row.assert_zeros()
