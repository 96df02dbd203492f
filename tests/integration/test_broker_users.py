"""The API's and the worker's RabbitMQ users against the real broker: each can do
what its side does over AMQP and nothing more.

Each test has a fresh vhost and two fresh users (guest is the admin that makes
them with rabbitmqctl), all deleted afterwards. Raw pika channels look at the
broker and try what the code under test never does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pika
import pika.exceptions
import pytest
from pika.adapters.blocking_connection import BlockingChannel

from chalicelib import broker, cli, config, handlers
from chalicelib.broker import users
from chalicelib.context import Deps
from tests.conftest import fake_pay_msg
from tests.integration.conftest import RABBIT_HOST, RABBIT_PORT, RabbitURL, rabbitmqctl
from tests.waiting import wait_until

pytestmark = pytest.mark.rabbitmq

CHECK_DELAY_S = 60
PROJECT = Path(__file__).resolve().parents[2]
PAY_MSG = {"orderId": "ORDER_1", "tradeNo": "T1", "totalAmount": "1.00",
           "payTime": "2026-01-01T00:00:00Z", "notifyId": "n1"}


@dataclass(frozen=True)
class TwoUsers:
    vhost: str
    api: str  # the API's amqp URL
    worker: str  # the worker's
    names: tuple[str, str]


def url(user: str, password: str, vhost: str) -> str:
    return (f"amqp://{quote(user, safe='')}:{quote(password, safe='')}@{RABBIT_HOST}:"
            f"{RABBIT_PORT}/{quote(vhost, safe='')}")


@pytest.fixture
def two_users(rmq_vhost: RabbitURL) -> Iterator[TwoUsers]:
    """The API's and the worker's users in a fresh vhost, made by the product's
    `users.apply` (rabbitmqctl); deleted after the test."""
    tag = uuid.uuid4().hex[:8]
    api = url(f"pytest-api-{tag}", f"pw-{uuid.uuid4().hex}", rmq_vhost.vhost)
    worker = url(f"pytest-worker-{tag}", f"pw-{uuid.uuid4().hex}", rmq_vhost.vhost)
    made = users.service_users(api, worker)
    try:
        users.apply(made)
        yield TwoUsers(rmq_vhost.vhost, api, worker, (made[0].name, made[1].name))
    finally:
        for user in made:
            rabbitmqctl("delete_user", user.name, check=False)


@contextmanager
def raw_channel(amqp_url: str) -> Iterator[BlockingChannel]:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        yield connection.channel()
    finally:
        if connection.is_open:
            connection.close()


def refused(amqp_url: str, operation: Callable[[BlockingChannel], Any]) -> str:
    """The broker's 403 text for `operation`, on a fresh channel (a refusal closes it)."""
    with raw_channel(amqp_url) as channel:
        channel.confirm_delivery()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as caught:
            operation(channel)
        assert caught.value.reply_code == 403, caught.value
        return str(caught.value.reply_text)


def depth(admin_url: str, queue: str) -> int:
    with raw_channel(admin_url) as channel:
        return int(channel.queue_declare(queue, passive=True).method.message_count)


def permissions(vhost: str) -> dict[str, tuple[str, str, str]]:
    out = rabbitmqctl("-q", "list_permissions", "-p", vhost, "--formatter", "json")
    return {p["user"]: (p["configure"], p["write"], p["read"]) for p in json.loads(out)}


# --- the definitions ---------------------------------------------------------------


def test_users_get_exactly_the_permissions_of_the_topology_module(two_users: TwoUsers) -> None:
    api, worker = two_users.names
    got = permissions(two_users.vhost)
    a, w = broker.topology.API_PERMISSIONS, broker.topology.WORKER_PERMISSIONS
    assert got[api] == (a.configure, a.write, a.read) == ("^$", got[api][1], "^$")
    assert got[worker] == (w.configure, w.write, w.read)
    tags = json.loads(rabbitmqctl("-q", "list_users", "--formatter", "json"))
    assert {u["user"]: u["tags"] for u in tags if u["user"] in (api, worker)} == {
        api: [], worker: []}


def test_apply_again_is_harmless_and_sets_a_changed_password(two_users: TwoUsers) -> None:
    api_user, worker_user = two_users.names
    changed = url(api_user, "another-password", two_users.vhost)
    users.apply(users.service_users(changed, two_users.worker))
    rabbitmqctl("authenticate_user", api_user, "another-password")
    assert set(permissions(two_users.vhost)) >= {api_user, worker_user}


def test_the_printed_commands_make_the_users(rmq_vhost: RabbitURL, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    api = url(f"pytest-api-{tag}", "it's a \"pass\" word", rmq_vhost.vhost)
    # (No $ or ` here: Debian's rabbitmqctl wrapper, run as root, expands them in its
    # arguments, and authenticate_user below takes the password as one.)
    worker = url(f"pytest-worker-{tag}", "pw;|&<>*? x", rmq_vhost.vhost)
    out = tmp_path / "out"
    env = {"RMQ_URL": api, "RMQ_WORKER_URL": worker}
    try:
        with out.open("w") as sink, pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            config.get.cache_clear()
            assert cli.main(["broker-users"], out=sink) == 0
        config.get.cache_clear()
        done = subprocess.run(["sh", "-e"], input=out.read_text(), capture_output=True,
                              text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        rabbitmqctl("authenticate_user", f"pytest-api-{tag}", "it's a \"pass\" word")
        rabbitmqctl("authenticate_user", f"pytest-worker-{tag}", "pw;|&<>*? x")
        a = broker.topology.API_PERMISSIONS
        assert permissions(rmq_vhost.vhost)[f"pytest-api-{tag}"] == (a.configure, a.write, a.read)
    finally:
        config.get.cache_clear()
        for name in (f"pytest-api-{tag}", f"pytest-worker-{tag}"):
            rabbitmqctl("delete_user", name, check=False)


def test_definitions_import_into_rabbitmq(rabbitmq_running: None) -> None:
    """What the compose file loads at boot (and Amazon MQ imports): hashed passwords
    that RabbitMQ accepts, the vhost and the permissions."""
    tag = uuid.uuid4().hex[:8]
    vhost = f"pytest-defs-{tag}"
    made = users.service_users(url(f"pytest-api-{tag}", "api-secret", vhost),
                               url(f"pytest-worker-{tag}", "worker-secret", vhost))
    # Readable by all: rabbitmqctl may run as the rabbitmq user (Debian's wrapper), who
    # cannot enter pytest's tmp_path.
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=tempfile.gettempdir()) as file:
        file.write(json.dumps(users.definitions(made)))
        file.flush()
        os.chmod(file.name, 0o644)
        try:
            rabbitmqctl("import_definitions", file.name)
        except BaseException:
            for user in made:
                rabbitmqctl("delete_user", user.name, check=False)
            rabbitmqctl("delete_vhost", vhost, check=False)
            raise
    try:
        rabbitmqctl("authenticate_user", f"pytest-api-{tag}", "api-secret")
        rabbitmqctl("authenticate_user", f"pytest-worker-{tag}", "worker-secret")
        w = broker.topology.WORKER_PERMISSIONS
        assert permissions(vhost)[f"pytest-worker-{tag}"] == (w.configure, w.write, w.read)
    finally:
        for user in made:
            rabbitmqctl("delete_user", user.name, check=False)
        rabbitmqctl("delete_vhost", vhost, check=False)


# --- the API's user: publish to the exchanges, nothing else ---------------------------


def test_api_user_publishes_with_confirms_and_reads_depths(
    two_users: TwoUsers, rmq_vhost: RabbitURL
) -> None:
    broker.declare_at(two_users.worker, CHECK_DELAY_S)
    api = broker.Broker(two_users.api, CHECK_DELAY_S, declare=False)
    try:
        api.ping()
        api.publish_check("ORDER_1")
        api.publish_pay(PAY_MSG)
        api.publish_seckill({"ticketId": "t1"})
        api.publish_refund("R1")
        # The seckill 429 and the operators' page: passive declares, no permission needed.
        assert api.queue_depth(broker.QUEUE_SECKILL) == 1
        assert api.parked_counts() == {broker.parked_queue_name(q): 0
                                       for q in broker.CONSUMED_QUEUES}
        with pytest.raises(LookupError):
            api.queue_depth("queue.order.nothing")
        api.publish_pay(PAY_MSG)  # the channel is reopened after the 404 above
    finally:
        api.close()
    assert {q: depth(rmq_vhost, q) for q in (broker.QUEUE_DELAY, broker.QUEUE_PAY,
                                             broker.QUEUE_SECKILL, broker.QUEUE_REFUND)} == {
        broker.QUEUE_DELAY: 1, broker.QUEUE_PAY: 2, broker.QUEUE_SECKILL: 1,
        broker.QUEUE_REFUND: 1}


def test_a_declaring_publisher_with_the_api_user_falls_back_to_checking(
    two_users: TwoUsers, rmq_vhost: RabbitURL
) -> None:
    """A Broker left to declare (the default) works with the publish-only user: the
    declare is refused once, then it only checks the exchanges."""
    broker.declare_at(two_users.worker, CHECK_DELAY_S)
    api = broker.Broker(two_users.api, CHECK_DELAY_S)
    try:
        api.publish_pay(PAY_MSG)
        api.close()  # a new connection: no second declare attempt
        api.publish_pay(PAY_MSG)
    finally:
        api.close()
    assert depth(rmq_vhost, broker.QUEUE_PAY) == 2


def test_api_user_answers_unavailable_before_the_worker_declared(
    two_users: TwoUsers
) -> None:
    api = broker.Broker(two_users.api, CHECK_DELAY_S, declare=False)
    try:
        with pytest.raises(broker.TopologyMissing, match="worker declares"):
            api.publish_pay(PAY_MSG)
        with pytest.raises(broker.BrokerUnavailable):
            api.ping()
        broker.declare_at(two_users.worker, CHECK_DELAY_S)
        api.publish_pay(PAY_MSG)  # the next request works, nothing to restart
    finally:
        api.close()


def test_api_user_cannot_consume_declare_delete_or_bypass_the_exchanges(
    two_users: TwoUsers, rmq_vhost: RabbitURL
) -> None:
    broker.declare_at(two_users.worker, CHECK_DELAY_S)
    api = two_users.api
    body = json.dumps(PAY_MSG).encode()
    assert "queue 'queue.order.pay'" in refused(
        api, lambda ch: ch.basic_get(broker.QUEUE_PAY, auto_ack=True))
    assert "queue 'queue.order.pay'" in refused(
        api, lambda ch: ch.basic_consume(broker.QUEUE_PAY, lambda *a: None))
    assert "queue 'queue.order.pay'" in refused(
        api, lambda ch: ch.queue_purge(broker.QUEUE_PAY))
    refused(api, lambda ch: ch.queue_declare("queue.order.new", durable=True))
    refused(api, lambda ch: ch.queue_delete(broker.QUEUE_PAY))
    refused(api, lambda ch: ch.exchange_delete(broker.EXCHANGE_PAY))
    refused(api, lambda ch: ch.exchange_declare(broker.EXCHANGE_PAY, "direct", durable=True))
    # Straight into a queue, or into the parked queue, through the default exchange.
    for queue in (broker.QUEUE_PAY, broker.QUEUE_PAY_PARKED):
        assert "exchange 'amq.default'" in refused(
            api, lambda ch, q=queue: ch.basic_publish("", q, body, mandatory=True))
    # Another exchange than the contract's.
    refused(api, lambda ch: ch.basic_publish("amq.direct", broker.QUEUE_PAY, body))
    # The operator's parked tools are the worker's user's.
    with raw_channel(rmq_vhost) as admin:
        admin.basic_publish("", broker.QUEUE_PAY_PARKED, body)
    for tool in (broker.list_parked, broker.replay_parked):
        with pytest.raises(broker.BrokerUnavailable, match="ACCESS_REFUSED"):
            tool(api, broker.QUEUE_PAY)
    assert depth(rmq_vhost, broker.QUEUE_PAY) == 0
    assert depth(rmq_vhost, broker.QUEUE_PAY_PARKED) == 1


# --- the worker's user: declare, consume, retry, park, replay ---------------------------


def test_worker_user_consumes_retries_parks_and_replays(
    two_users: TwoUsers, rmq_vhost: RabbitURL
) -> None:
    seen: list[dict[str, Any]] = []
    failing = threading.Event()
    failing.set()

    def on_pay(msg: dict[str, Any]) -> None:
        seen.append(msg)
        if failing.is_set():
            raise RuntimeError("Alipay is down (test)")

    stop = threading.Event()
    consumer = threading.Thread(
        target=broker.run_consumer, args=(two_users.worker, {broker.QUEUE_PAY: on_pay}),
        kwargs={"max_attempts": 2, "retry_delays_ms": (100,),
                "check_delay_seconds": CHECK_DELAY_S, "stop": stop, "reconnect_delays": (0.2,)},
        daemon=True)
    consumer.start()
    try:
        api = broker.Broker(two_users.api, CHECK_DELAY_S)
        wait_until(lambda: _declared(rmq_vhost), 10, "the worker declared the topology")
        try:
            api.publish_pay(PAY_MSG)
        finally:
            api.close()
        # Tried, retried through queue.order.pay.retry.100ms, then parked.
        wait_until(lambda: depth(rmq_vhost, broker.QUEUE_PAY_PARKED) == 1, 10, "the park")
        assert len(seen) == 2
        [parked] = broker.list_parked(two_users.worker, broker.QUEUE_PAY)
        assert parked["body"] == PAY_MSG
        assert parked["headers"]["x-attempts"] == 2
        failing.clear()
        assert broker.replay_parked(two_users.worker, broker.QUEUE_PAY) == 1
        wait_until(lambda: len(seen) == 3, 10, "the replayed message handled")
        wait_until(lambda: depth(rmq_vhost, broker.QUEUE_PAY) == 0, 5, "acked")
        assert depth(rmq_vhost, broker.QUEUE_PAY_PARKED) == 0
    finally:
        stop.set()
        consumer.join(10)
    assert not consumer.is_alive()


def _declared(admin_url: str) -> bool:
    try:
        depth(admin_url, broker.retry_queue_name(broker.QUEUE_PAY, 100))
    except pika.exceptions.ChannelClosedByBroker:
        return False
    return True


def test_worker_user_cannot_touch_other_resources(two_users: TwoUsers) -> None:
    worker = two_users.worker
    refused(worker, lambda ch: ch.queue_declare("other.queue", durable=True))
    refused(worker, lambda ch: ch.exchange_declare("other.exchange", "direct"))
    refused(worker, lambda ch: ch.basic_publish("amq.direct", "x", b"{}"))


# --- the whole flow with the two users ------------------------------------------------


def test_create_then_check_and_pay_with_the_two_users(
    two_users: TwoUsers, app_deps: Deps, bridge_threads: Callable[..., threading.Event]
) -> None:
    """The API's side (create, pay notify) publishes as the API's user; the worker
    consumes as its own: an unpaid order is closed after the delay, a paid one PAID."""
    delay = 2
    settings = dataclasses.replace(config.load(), rmq_url=two_users.api,
                                   rmq_worker_url=two_users.worker, check_delay_seconds=delay)
    api_broker = broker.Broker(settings.rmq_url, delay, declare=False)
    d = dataclasses.replace(app_deps, settings=settings, broker=api_broker)
    try:
        bridge_threads(d)
        wait_until(lambda: _can_publish(api_broker, settings.rmq_url), 30,
                   "the worker declared the topology")
        before = {g.id: g.stock for g in d.store.list_goods()}
        d.store.set_cart_line("alice", "g1", 2)
        unpaid = handlers.create_order(d, "alice")
        d.store.set_cart_line("bob", "g2", 1)
        paid = handlers.create_order(d, "bob")
        d.broker.publish_pay(fake_pay_msg(paid["id"], "T1", paid["totalMoney"]))
        wait_until(lambda: _status(d, paid["id"]) == "PAID", 30, "the paid order PAID")
        wait_until(lambda: _status(d, unpaid["id"]) == "CLOSED", delay + 30,
                   "the unpaid order CLOSED")
        assert {g.id: g.stock for g in d.store.list_goods()} == {
            **before, "g2": before["g2"] - 1}
    finally:
        api_broker.close()


def _can_publish(api_broker: broker.Broker, url: str) -> bool:
    """The worker has declared the whole topology: it consumes only after declaring
    every queue and binding (the exchanges alone come first: a delay message
    published then would be returned)."""
    try:
        api_broker.ping()
        with pika.BlockingConnection(pika.URLParameters(url)) as conn:
            check = conn.channel().queue_declare(broker.QUEUE_CHECK, passive=True)
            return check.method.consumer_count > 0
    except (broker.BrokerUnavailable, pika.exceptions.AMQPError):
        return False


def _status(d: Deps, order_id: str) -> str:
    found = d.store.get_order(order_id)
    assert found is not None
    return found.status


# --- the HTTP API with its user ---------------------------------------------------------


def test_the_api_reports_health_and_takes_orders_with_its_user(
    two_users: TwoUsers, rmq_vhost: RabbitURL, app_deps: Deps, client: Any
) -> None:
    """As deps.build makes it (a publisher left to declare), with the API's user:
    503 naming the missing topology, then orders go through once the worker declared."""
    from chalicelib import deps
    from tests.conftest import bearer, body

    api_broker = broker.Broker(two_users.api, CHECK_DELAY_S)
    deps.use(dataclasses.replace(app_deps, broker=api_broker))
    try:
        r = client.http.get("/health")
        assert r.status_code == 503
        assert body(r)["checks"] == {"dynamodb": "ok", "rabbitmq": "down: TopologyMissing"}
        broker.declare_at(two_users.worker, CHECK_DELAY_S)
        r = client.http.get("/health")
        assert r.status_code == 200, r.body
        client.http.put("/cart/items/g1", headers=bearer("alice"), body=b'{"num": 1}')
        r = client.http.post("/orders", headers=bearer("alice"), body=b"{}")
        assert r.status_code == 201, r.body
        assert depth(rmq_vhost, broker.QUEUE_DELAY) == 1
    finally:
        api_broker.close()
    dead = broker.Broker(two_users.api.replace(f":{RABBIT_PORT}/", ":1/"), CHECK_DELAY_S)
    deps.use(dataclasses.replace(app_deps, broker=dead))
    r = client.http.get("/health")
    assert r.status_code == 503
    assert body(r)["checks"]["rabbitmq"] == "down: BrokerUnavailable"


def test_the_declare_command_uses_the_workers_user(
    two_users: TwoUsers, rmq_vhost: RabbitURL, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("RMQ_URL", two_users.api)
    monkeypatch.setenv("RMQ_WORKER_URL", two_users.worker)
    config.get.cache_clear()
    try:
        with (tmp_path / "out").open("w") as out:
            assert cli.main(["declare"], out=out) == 0
        assert depth(rmq_vhost, broker.QUEUE_PAY_PARKED) == 0  # declared
        monkeypatch.setenv("RMQ_WORKER_URL", two_users.api)  # the API's may not declare
        config.get.cache_clear()
        with (tmp_path / "out").open("w") as out:
            assert cli.main(["declare"], out=out) == 1
    finally:
        config.get.cache_clear()


def test_the_worker_process_connects_only_as_its_own_user(
    two_users: TwoUsers, rmq_vhost: RabbitURL, app_deps: Deps, sandbox: Any, tmp_path: Path
) -> None:
    """`python -m chalicelib.worker` as the compose file runs it: its URL in a file
    (RMQ_WORKER_URL_FILE), no RMQ_URL; it closes an unpaid order whose check the
    API's user published, and every connection it opens is the worker's user's."""
    settings = app_deps.settings
    url_file = tmp_path / "url"
    url_file.write_text(two_users.worker + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RMQ_")}
    env.update({"STAGE": "test", "RMQ_WORKER_URL_FILE": str(url_file),
                "ORDER_CHECK_DELAY_SECONDS": str(CHECK_DELAY_S),
                "GOODS_TABLE": settings.goods_table, "CARTS_TABLE": settings.carts_table,
                "ORDERS_TABLE": settings.orders_table, "SWEEP_INTERVAL_SECONDS": "3600",
                **sandbox.env()})
    broker.declare_at(two_users.worker, CHECK_DELAY_S)
    app_deps.store.set_cart_line("alice", "g1", 1)
    # Made three hours ago: its check time has passed (an earlier check is parked).
    app_deps.clock.now = datetime.now(UTC) - timedelta(hours=3)
    order = handlers.create_order(app_deps, "alice")
    app_deps.clock.now = None
    api = broker.Broker(two_users.api, CHECK_DELAY_S, declare=False)
    try:  # a check message straight into queue.order.check, as if its delay had passed
        api.publish(broker.EXCHANGE_DELAY, broker.QUEUE_CHECK, {"orderId": order["id"]})
    finally:
        api.close()
    log = tmp_path / "worker.log"
    with log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "chalicelib.worker"], cwd=PROJECT,
                                env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        closed = lambda: _status(app_deps, order["id"]) == "CLOSED"  # noqa: E731
        wait_until(lambda: closed() or proc.poll() is not None, 30, "the order CLOSED")
        assert closed(), log.read_text()[-3000:]
        connections = json.loads(rabbitmqctl("-q", "list_connections", "user", "vhost",
                                             "--formatter", "json"))
        mine = {c["user"] for c in connections if c["vhost"] == two_users.vhost}
        assert mine == {two_users.names[1]}
    finally:
        proc.terminate()
        proc.wait(30)
    assert proc.returncode == 0, log.read_text()[-3000:]
