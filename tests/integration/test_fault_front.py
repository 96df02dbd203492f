"""The local stack's fault fronts, seen from the product's own clients.

DynamoDB's (local/dynamodb.py, before the session's moto server): each fault
reaches botocore, through pynamodb and the store, as the exception DynamoDB's
failure would be; botocore retries what it retries on AWS (throttling, 500s) and
not the rest; and a faulted write is never applied, in whole or in part.

Alipay's (local/alipay_sandbox/faults.py): a slow, 5xx, unsigned or wrongly
signed answer is AlipayUnavailable to the gateway adapter, never an answer.
"""

from __future__ import annotations

import json
import threading
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pynamodb.exceptions import TransactWriteError
from pynamodb.transactions import TransactWrite

from chalicelib.alipay_gateway import AlipayGateway, AlipayUnavailable
from chalicelib.domain import Goods, Unavailable
from chalicelib.store import Store
from chalicelib.store.base import reasons, retryable
from local.alipay_sandbox import LOCAL_APP_ID, LOCAL_SELLER_ID, ensure_keys, make_server
from local.alipay_sandbox.faults import GatewayFaults
from local.dynamodb import CONTROL_PATH
from tests.conftest import DYNAMODB_URL, MODELS


def faults(**change: Any) -> dict[str, Any]:
    """PUT the front's settings (or DELETE them with no argument); its report."""
    data = json.dumps(change).encode() if change else None
    req = urllib.request.Request(DYNAMODB_URL + CONTROL_PATH, data=data,
                                 method="PUT" if change else "DELETE")
    with urllib.request.urlopen(req, timeout=10) as answer:
        return dict(json.loads(answer.read()))


def report() -> dict[str, Any]:
    with urllib.request.urlopen(DYNAMODB_URL + CONTROL_PATH, timeout=10) as answer:
        return dict(json.loads(answer.read()))


@pytest.fixture
def store(tables: Store) -> Iterator[Store]:
    yield tables
    faults()


def test_throttling_is_retried_by_botocore_then_unavailable(store: Store) -> None:
    faults(rate=1.0, kinds=["throttle"])
    with pytest.raises(Unavailable) as caught:
        store.get_goods(["g1"])
    cause = caught.value.__cause__
    assert getattr(cause, "cause_response_code", None) == "ProvisionedThroughputExceededException"
    # pynamodb's client: 1 + MAX_RETRY_ATTEMPTS attempts, all of them throttled
    assert report()["injected"] == {"throttle": 3}
    faults()
    assert store.get_goods(["g1"])["g1"].stock == 100


def test_an_internal_error_is_retried_and_a_faulted_write_never_applies(store: Store) -> None:
    faults(rate=1.0, kinds=["internal"])
    with pytest.raises(Unavailable) as caught:
        store.set_cart_line("ivy", "g1", 2)
    assert getattr(caught.value.__cause__, "cause_response_code", None) == "InternalServerError"
    assert report()["injected"] == {"internal": 3}
    faults()
    assert store.get_cart("ivy") == {}


def test_a_transaction_conflict_cancels_the_whole_transaction(store: Store) -> None:
    faults(rate=1.0, kinds=["conflict"])
    m = MODELS
    with pytest.raises(TransactWriteError) as caught, TransactWrite(
            connection=store.connection) as tx:
        tx.save(m.Goods("g-tx", name="Tx", price_fen=100, stock=3))
        tx.update(m.Goods("g1"), actions=[m.Goods.stock.add(-1)])
    exc = caught.value
    assert exc.cause_response_code == "TransactionCanceledException"
    why = reasons(exc)
    assert len(why) == 2 and why.count("TransactionConflict") == 1 and why.count(None) == 1
    assert retryable(exc)
    assert report()["injected"] == {"conflict": 1}  # botocore does not retry a cancellation
    faults()
    goods = store.get_goods(["g-tx", "g1"])
    assert "g-tx" not in goods and goods["g1"].stock == 100


def test_a_single_write_conflict_is_unavailable_and_reads_get_other_faults(store: Store
                                                                         ) -> None:
    faults(rate=1.0, kinds=["conflict"])
    with pytest.raises(Unavailable) as caught:
        store.set_cart_line("jo", "g1", 2)
    assert getattr(caught.value.__cause__, "cause_response_code", None) == (
        "TransactionConflictException")
    # a read cannot conflict: with conflict the only kind chosen, it goes through
    assert store.get_goods(["g1"])["g1"].stock == 100
    assert report()["injected"] == {"conflict": 1}
    faults()
    assert store.get_cart("jo") == {}


def test_a_slow_call_is_answered(store: Store) -> None:
    faults(rate=1.0, kinds=["slow"], slow_ms=300)
    store.put_goods(Goods("g-slow", "Slow", 100, 5))
    assert store.get_goods(["g-slow"])["g-slow"].stock == 5
    assert report()["injected"] == {"slow": 2}


def test_bad_settings_are_refused() -> None:
    req = urllib.request.Request(DYNAMODB_URL + CONTROL_PATH, method="PUT",
                                 data=json.dumps({"rate": 2}).encode())
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(req, timeout=10)
    assert caught.value.code == 400
    assert report()["rate"] == 0.0


# --- the sandbox's gateway faults ---------------------------------------------------


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    keys = ensure_keys(tmp_path_factory.mktemp("fault-keys"))
    server = make_server("127.0.0.1", 0, keys["app_private"].parent, [0.1],
                         faults=GatewayFaults())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.test_keys = keys
    yield server
    server.shutdown()
    server.server_close()


def gateway(sandbox: Any, timeout: float = 5.0) -> AlipayGateway:
    keys: dict[str, Path] = sandbox.test_keys
    return AlipayGateway(LOCAL_APP_ID, LOCAL_SELLER_ID, sandbox.gateway_url,
                         keys["app_private"].read_text(), keys["alipay_public"].read_text(),
                         None, None, timeout=timeout)


def set_faults(sandbox: Any, **change: Any) -> dict[str, Any]:
    req = urllib.request.Request(sandbox.base_url + "/sandbox/faults", method="PUT",
                                 data=json.dumps(change).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as answer:
        return dict(json.loads(answer.read()))


@pytest.mark.parametrize("kind", ["5xx", "unsigned", "badsign"])
def test_a_faulty_alipay_answer_is_unavailable_never_an_answer(sandbox: Any, kind: str) -> None:
    gw = gateway(sandbox)
    set_faults(sandbox, rate=1.0, kinds=[kind])
    try:
        for _ in range(3):  # 5xx: each of 502, 503, 504 may come
            with pytest.raises(AlipayUnavailable):
                gw.query_trade("NO_SUCH_ORDER")  # the lie says TRADE_NOT_EXIST: not believed
            with pytest.raises(AlipayUnavailable):
                gw.refund_payment("NO_SUCH_ORDER", Decimal("1.00"), "R1")
        assert set_faults(sandbox)["injected"] == {}  # the PUT resets the counts
    finally:
        set_faults(sandbox, rate=0.0)
    assert gw.query_trade("NO_SUCH_ORDER") is None  # the true, signed answer


def test_a_slow_alipay_answer_past_the_timeout_is_unavailable(sandbox: Any) -> None:
    set_faults(sandbox, rate=1.0, kinds=["slow"], slow_seconds=1.5)
    try:
        with pytest.raises(AlipayUnavailable):
            gateway(sandbox, timeout=0.5).query_trade("NO_SUCH_ORDER")
        assert gateway(sandbox, timeout=5).query_trade("NO_SUCH_ORDER") is None
    finally:
        set_faults(sandbox, rate=0.0)
