"""Integration fixtures: a real RabbitMQ, one fresh vhost per test.

Nothing is skipped: when RabbitMQ is not running it is started
(`rabbitmq-server -detached`) and waited for; when that fails the tests fail
with the reason.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests import rabbit_node

RABBIT_HOST = "127.0.0.1"
RABBIT_PORT = 5672
START_TIMEOUT_S = 90.0


class RabbitURL(str):
    """An amqp URL (a plain str) that also knows its vhost's name, for rabbitmqctl."""

    vhost: str

    def __new__(cls, vhost: str) -> RabbitURL:
        url = super().__new__(
            cls, f"amqp://guest:guest@{RABBIT_HOST}:{RABBIT_PORT}/{quote(vhost, safe='')}"
        )
        url.vhost = vhost
        return url


def rabbitmqctl(*args: str, timeout: float = 30.0, check: bool = True) -> str:
    """Run `rabbitmqctl ARGS` and return its stdout; fail the test loudly on error."""
    done = subprocess.run(
        ["rabbitmqctl", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        pytest.fail(
            f"rabbitmqctl {' '.join(args)} failed ({done.returncode}): "
            f"{done.stderr.strip() or done.stdout.strip()}",
            pytrace=False,
        )
    return done.stdout


def _rabbit_answers() -> bool:
    try:
        done = subprocess.run(
            ["rabbitmqctl", "-q", "await_startup", "--timeout", "5"],
            capture_output=True,
            timeout=30,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


@pytest.fixture(scope="session")
def rabbitmq_running() -> None:
    """RabbitMQ is up on this machine, started if needed."""
    if shutil.which("rabbitmqctl") is None:
        pytest.fail("rabbitmqctl is not on PATH: install RabbitMQ to run these tests")
    if _rabbit_answers():
        return
    subprocess.run(["rabbitmq-server", "-detached"], capture_output=True, timeout=30, check=False)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if _rabbit_answers():
            return
        time.sleep(1.0)
    pytest.fail(
        f"RabbitMQ did not start within {START_TIMEOUT_S:.0f} s after rabbitmq-server -detached"
    )


@pytest.fixture
def rmq_vhost(rabbitmq_running: None) -> Iterator[RabbitURL]:
    """A fresh vhost for guest, deleted after the test; yields its amqp URL (a str).

    The URL also has a `.vhost` attribute with the vhost's name.
    """
    vhost = f"pytest-{uuid.uuid4().hex[:12]}"
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield RabbitURL(vhost)
    finally:
        rabbitmqctl("delete_vhost", vhost, check=False)


@pytest.fixture
def bridge_threads() -> Iterator[Callable[..., threading.Event]]:
    """`start(deps, **run_kwargs)`: chalicelib.worker.run in a thread (short retry delays, no
    sweeps unless asked); returns its stop event. Every bridge is stopped, and must
    have stopped, when the test ends."""
    from chalicelib import worker

    stops: list[tuple[threading.Event, threading.Thread]] = []

    def start(d: Any, **kwargs: Any) -> threading.Event:
        stop = threading.Event()
        kwargs.setdefault("retry_delays_ms", (100, 200))
        kwargs.setdefault("sweep_interval", 3600)
        t = threading.Thread(target=worker.run, args=(d, stop), kwargs=kwargs, daemon=True)
        t.start()
        stops.append((stop, t))
        return stop

    yield start
    for stop, t in stops:
        stop.set()
        t.join(10)
        assert not t.is_alive(), "the bridge did not stop"


@pytest.fixture(scope="session")
def private_rabbit() -> Iterator[rabbit_node.PrivateRabbit]:
    """A RabbitMQ node of this session's own, to stop, kill and restart: the machine's
    RabbitMQ is shared (other tests, benchmarks, other projects) and never stopped."""
    why = rabbit_node.available()
    if why:
        pytest.fail(f"cannot start a private RabbitMQ node: {why}", pytrace=False)
    node = rabbit_node.PrivateRabbit(Path(tempfile.mkdtemp(prefix="rel-rabbit-")))
    try:
        node.start()
        yield node
    finally:
        node.stop()


@pytest.fixture
def private_vhost(private_rabbit: rabbit_node.PrivateRabbit) -> Iterator[str]:
    """A fresh vhost on the private node, deleted after the test; yields its amqp URL."""
    vhost = f"kill-{uuid.uuid4().hex[:8]}"
    private_rabbit.ctl("add_vhost", vhost)
    private_rabbit.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    yield f"amqp://guest:guest@127.0.0.1:{private_rabbit.port}/{quote(vhost, safe='')}"
    private_rabbit.ctl("delete_vhost", vhost, check=False)


class Sandbox:
    """The local Alipay on a free port, with the merchant's keys, for a test."""

    def __init__(self, keys: dict[str, Path]) -> None:
        from local.alipay_sandbox import make_server

        self.keys = keys
        self.server = make_server("127.0.0.1", 0, keys["app_private"].parent, [0.3] * 7)
        self.gateway_url = self.server.gateway_url
        self.base_url = self.server.base_url
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def gateway(self) -> Any:
        from chalicelib.alipay_gateway import AlipayGateway
        from local.alipay_sandbox import LOCAL_APP_ID, LOCAL_SELLER_ID

        return AlipayGateway(LOCAL_APP_ID, LOCAL_SELLER_ID, self.gateway_url,
                             self.keys["app_private"].read_text(),
                             self.keys["alipay_public"].read_text())

    def env(self) -> dict[str, str]:
        """The payment settings of a worker process that uses this sandbox."""
        from local.alipay_sandbox import LOCAL_APP_ID, LOCAL_SELLER_ID

        return {"ALIPAY_APP_ID": LOCAL_APP_ID, "ALIPAY_SELLER_ID": LOCAL_SELLER_ID,
                "ALIPAY_GATEWAY": self.gateway_url,
                "ALIPAY_APP_PRIVATE_KEY_FILE": str(self.keys["app_private"]),
                "ALIPAY_PUBLIC_KEY_FILE": str(self.keys["alipay_public"])}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="session")
def sandbox_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from local.alipay_sandbox.keys import ensure_keys

    return ensure_keys(tmp_path_factory.mktemp("sandbox-keys"))


@pytest.fixture
def sandbox(sandbox_keys: dict[str, Path]) -> Iterator[Sandbox]:
    s = Sandbox(sandbox_keys)
    yield s
    s.close()
