"""local/docker-compose.yml and the local stack's RabbitMQ users, offline.

Every published port is bound to 127.0.0.1 (nothing listens beyond this
machine), and the services connect to RabbitMQ as their own users, never guest:
the API as shop-api, the worker as shop-worker, each URL in a volume that only
its service (and the one-shot that makes it) mounts.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from chalicelib.broker import topology, users
from local import stack

COMPOSE = Path(__file__).resolve().parents[2] / "local" / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def published_not_on_loopback(services: dict[str, Any]) -> list[str]:
    """`service: port` for each published port not bound to 127.0.0.1."""
    bad = []
    for name, service in services.items():
        for port in service.get("ports", []):
            if isinstance(port, dict):  # the long syntax
                ok = port.get("host_ip") == "127.0.0.1"
            else:  # "IP:HOST:CONTAINER[/proto]"; "HOST:CONTAINER" or "PORT" bind everywhere
                ok = str(port).startswith("127.0.0.1:") and str(port).count(":") == 2
            if not ok:
                bad.append(f"{name}: {port}")
    return bad


def test_every_published_port_is_bound_to_loopback(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert published_not_on_loopback(services) == []
    published = {str(p) for s in services.values() for p in s.get("ports", [])}
    assert {"127.0.0.1:5672:5672", "127.0.0.1:15672:15672", "127.0.0.1:8000:8000",
            "127.0.0.1:8001:8001", "127.0.0.1:8002:8002"} <= published
    for name, service in services.items():
        # host networking would put every port of the service on every interface
        assert service.get("network_mode", "") in ("", "service:sandbox"), name


def test_the_port_check_catches_what_binds_everywhere() -> None:
    services = {"a": {"ports": ["8000:8000", "0.0.0.0:1:1", "5672", "127.0.0.1:2:2"]},
                "b": {"ports": [{"target": 80, "published": 8080},
                                {"target": 81, "published": 8081, "host_ip": "127.0.0.1"}]}}
    assert published_not_on_loopback(services) == [
        "a: 8000:8000", "a: 0.0.0.0:1:1", "a: 5672",
        "b: {'target': 80, 'published': 8080}"]


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Volume name -> where the service mounts it (named volumes only)."""
    found = {}
    for volume in service.get("volumes", []):
        source, target = str(volume).split(":")[:2]
        if not source.startswith((".", "/")):
            found[source] = target
    return found


def test_services_use_their_own_broker_users_and_never_guest(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        env = service.get("environment") or {}
        for key, value in env.items():
            assert "guest" not in str(value), (name, key)
    api, bridge = services["api"], services["bridge"]
    assert "RMQ_URL" not in api["environment"]
    assert api["environment"]["RMQ_URL_FILE"] == "/broker/api/url"
    assert mounts(api)["broker-api"] == "/broker/api"
    # The worker gets its own URL and no other.
    assert bridge["environment"]["RMQ_WORKER_URL_FILE"] == "/broker/worker/url"
    assert not {"RMQ_URL", "RMQ_URL_FILE"} & set(bridge["environment"])
    assert mounts(bridge)["broker-worker"] == "/broker/worker"
    holders = {volume: sorted(n for n, s in services.items() if volume in mounts(s))
               for volume in ("broker-api", "broker-worker", "broker-rabbitmq")}
    assert holders == {"broker-api": ["api", "broker-users"],
                       "broker-worker": ["bridge", "broker-users"],
                       "broker-rabbitmq": ["broker-users", "rabbitmq"]}
    for volume in holders:
        assert volume in compose["volumes"]
        for name in holders[volume]:
            if name != "broker-users":
                assert any(str(v).startswith(f"{volume}:") and str(v).endswith(":ro")
                           for v in services[name]["volumes"]), (name, volume)


def test_rabbitmq_loads_the_users_made_on_first_start(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    services = compose["services"]
    maker = services["broker-users"]
    assert maker["command"] == ["python", "-m", "local.stack", "compose-broker", "/broker"]
    assert services["rabbitmq"]["depends_on"]["broker-users"]["condition"] == (
        "service_completed_successfully")
    for name in ("api", "bridge"):
        assert services[name]["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
    [config] = services["rabbitmq"]["configs"]
    assert config["target"].startswith("/etc/rabbitmq/conf.d/")
    conf = dict(line.split(" = ", 1) for line in
                compose["configs"][config["source"]]["content"].strip().splitlines())
    assert conf["load_definitions"] == "/broker/rabbitmq/definitions.json"
    assert conf["loopback_users.guest"] == "true"

    # What the one-shot makes, at the paths the services read.
    root = tmp_path / "broker"
    stack.compose_broker(root)
    api_url = (root / "api" / "url").read_text()
    worker_url = (root / "worker" / "url").read_text()
    assert api_url.startswith("amqp://shop-api:") and "@rabbitmq:5672/" in api_url
    assert worker_url.startswith("amqp://shop-worker:") and "@rabbitmq:5672/" in worker_url
    definitions = json.loads((root / "rabbitmq" / "definitions.json").read_text())
    assert [u["name"] for u in definitions["users"]] == ["shop-api", "shop-worker", "shop-admin"]
    assert all("password" not in u for u in definitions["users"])  # hashes only
    assert definitions["vhosts"] == [{"name": "/"}]
    rights = {p["user"]: (p["configure"], p["write"], p["read"])
              for p in definitions["permissions"]}
    a, w = topology.API_PERMISSIONS, topology.WORKER_PERMISSIONS
    assert rights["shop-api"] == (a.configure, a.write, a.read)
    assert rights["shop-worker"] == (w.configure, w.write, w.read)

    # A second start keeps the passwords (RabbitMQ and the services agree on them).
    stack.compose_broker(root)
    assert (root / "api" / "url").read_text() == api_url
    assert (root / "worker" / "url").read_text() == worker_url


# --- the users, as the product's command makes them ------------------------------------


def test_users_come_from_the_two_urls() -> None:
    api, worker = users.service_users(
        "amqp://shop-api:p%40ss@node1:5672/shop,amqp://shop-api:p%40ss@node2:5672/shop",
        "amqps://shop-worker:w@b-1.mq.example.com:5671/shop")
    assert (api.name, api.password, api.vhost) == ("shop-api", "p@ss", "shop")
    assert (worker.name, worker.password, worker.vhost) == ("shop-worker", "w", "shop")
    assert api.permissions == topology.API_PERMISSIONS
    assert worker.permissions == topology.WORKER_PERMISSIONS
    assert users.credentials("amqp://u:p@h:5672/%2F")[2] == "/"
    assert users.credentials("amqp://u:p@h:5672")[2] == "/"


@pytest.mark.parametrize(("api", "worker", "error"), [
    ("amqp://shop:a@h/%2F", "amqp://shop:b@h/%2F", "both connect as 'shop'"),
    ("amqp://a:a@h/one", "amqp://b:b@h/two", "vhost"),
    ("amqp://h/%2F", "amqp://b:b@h/%2F", "no user and password"),
    ("http://a:a@h/", "amqp://b:b@h/%2F", "not an amqp"),
])
def test_users_that_would_not_be_separated_are_refused(api: str, worker: str,
                                                       error: str) -> None:
    with pytest.raises(ValueError, match=error):
        users.service_users(api, worker)


def test_the_api_may_only_publish_to_the_contracts_exchanges() -> None:
    a, w = topology.API_PERMISSIONS, topology.WORKER_PERMISSIONS
    assert a.configure == a.read == "^$"
    for exchange in topology.EXCHANGES:
        assert re.fullmatch(a.write, exchange)
    for other in ("amq.default", "", "queue.order.pay", "exchange.order.pay.x", "amq.direct"):
        assert not re.fullmatch(a.write, other), other
    worker_names = [*topology.EXCHANGES, topology.QUEUE_DELAY, topology.QUEUE_PAY_PARKED,
                    topology.retry_queue_name(topology.QUEUE_PAY, 1000)]
    for name in worker_names:
        assert re.fullmatch(w.configure, name) and re.fullmatch(w.read, name), name
        assert re.fullmatch(w.write, name), name
    assert re.fullmatch(w.write, "amq.default")
    assert not re.fullmatch(w.configure, "amq.default")
    assert not re.fullmatch(w.configure, "other.queue")


def test_password_hash_is_rabbitmqs_salted_sha256() -> None:
    salt = b"\x01\x02\x03\x04"
    encoded = users.password_hash("secret", salt)
    raw = base64.b64decode(encoded)
    assert raw[:4] == salt and raw[4:] == hashlib.sha256(salt + b"secret").digest()
    assert users.password_hash("secret") != users.password_hash("secret")  # a fresh salt


# --- make run's users ------------------------------------------------------------------


@pytest.fixture
def local_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The local stack's settings with local/.keys/ in tmp_path and no RMQ_URL given."""
    monkeypatch.setattr(stack, "KEYS_DIR", tmp_path)
    for key in ("RMQ_URL", "RMQ_URL_FILE", "RMQ_WORKER_URL", "RMQ_WORKER_URL_FILE"):
        monkeypatch.delenv(key, raising=False)
    return tmp_path


def test_make_run_gives_the_api_and_the_bridge_their_own_users(local_env: Path) -> None:
    before = stack.local_environment()
    assert "guest" in before["RMQ_URL"] and "RMQ_WORKER_URL" not in before  # not made yet
    for user in (stack.API_USER, stack.WORKER_USER):
        stack.password(local_env, user)
    env = stack.local_environment()
    api, worker = stack.broker_users(env)
    assert (api.name, worker.name) == ("shop-api", "shop-worker")
    assert api.password == (local_env / "rabbitmq-shop-api.password").read_text()
    assert (local_env / "rabbitmq-shop-api.password").stat().st_mode & 0o077 == 0
    assert env["RMQ_URL"].endswith("@127.0.0.1:5672/%2F")
    assert stack.local_environment()["RMQ_URL"] == env["RMQ_URL"]  # the same passwords


def test_a_given_rmq_url_serves_both_as_it_is(local_env: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    for user in (stack.API_USER, stack.WORKER_USER):
        stack.password(local_env, user)
    monkeypatch.setenv("RMQ_URL", "amqp://guest:guest@127.0.0.1:5672/e2e")
    env = stack.local_environment()
    assert env["RMQ_URL"] == "amqp://guest:guest@127.0.0.1:5672/e2e"
    assert "RMQ_WORKER_URL" not in env
    assert stack.broker_users(env) == []


def test_the_compose_apis_url_file_wins_over_the_stage(local_env: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    file = local_env / "url"
    file.write_text("amqp://shop-api:x@rabbitmq:5672/%2F\n")
    monkeypatch.setenv("RMQ_URL_FILE", str(file))
    env = stack.local_environment()
    assert env["RMQ_URL"] == "amqp://shop-api:x@rabbitmq:5672/%2F"
    assert "RMQ_WORKER_URL" not in env
