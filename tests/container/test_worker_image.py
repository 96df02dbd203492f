"""The worker's image, built and run with podman: it holds the product and nothing of
the development tooling, and the container (`python -m chalicelib.worker`, its
settings from its environment only) closes an unpaid order against the machine's
RabbitMQ (a fresh vhost), moto's DynamoDB and the local Alipay sandbox, then stops
with exit code 0 on SIGTERM (`podman stop`).

The order is made through the handlers in this process; `Shop` below is the only
code that knows their names and the settings' fields."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import tarfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from chalicelib import broker, config, handlers
from chalicelib.alipay_gateway import AlipayGateway
from chalicelib.context import Deps
from chalicelib.store import Store
from local.alipay_sandbox import LOCAL_APP_ID, LOCAL_SELLER_ID, make_server
from local.alipay_sandbox.keys import ensure_keys
from tests.conftest import DYNAMODB_URL
from tests.container.conftest import WorkerImage, podman, podman_env
from tests.integration.conftest import RabbitURL, rabbitmqctl
from tests.waiting import wait_until

pytestmark = [pytest.mark.container, pytest.mark.rabbitmq]

CHECK_DELAY_S = 1  # the worker's ORDER_CHECK_DELAY_SECONDS (queue.order.delay's TTL)
STOP_GRACE_S = 30  # podman stop's wait before SIGKILL (which would be exit code 137)
SITE_PACKAGES = "opt/venv/lib/python3.11/site-packages"
DEV_ONLY = {"moto", "chalice", "pytest", "playwright", "hypothesis", "schemathesis", "ruff"}


# --- the image's files ----------------------------------------------------------


def image_files(image_id: str) -> list[str]:
    """Every path in the image's filesystem (`podman export` of a created container)."""
    cid = podman("create", image_id).stdout.strip()
    try:
        proc = subprocess.Popen(["podman", "export", cid], stdout=subprocess.PIPE,
                                env=podman_env())
        assert proc.stdout is not None
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            names = [m.name.removeprefix("./").rstrip("/") for m in tar]
        assert proc.wait(timeout=120) == 0, "podman export failed"
    finally:
        podman("rm", "--force", cid, check=False)
    return [n for n in names if n]


def test_the_image_holds_the_product_only(worker_image: WorkerImage) -> None:
    started = time.monotonic()
    names = image_files(worker_image.id)
    listed = time.monotonic() - started
    app = sorted(n.removeprefix("app/") for n in names if n.startswith("app/"))
    site = {n.split("/")[5] for n in names if n.startswith(SITE_PACKAGES + "/")}
    print(f"\nimage {worker_image.tag} {worker_image.id[:12]}: "
          f"{worker_image.size_bytes / 1e6:.0f} MB, {len(names)} paths, "
          f"{len(app)} under /app; wheelhouse {worker_image.timings['wheelhouse']:.1f} s, "
          f"build {worker_image.timings['build']:.1f} s, listing {listed:.1f} s")

    assert {a.split("/")[0] for a in app} == {"chalicelib", "requirements.txt"}, app
    assert {"chalicelib/__init__.py", "chalicelib/worker/__main__.py"} <= set(app)
    assert not [a for a in app if a.endswith((".pem", ".pyc"))], "keys or bytecode in /app"
    assert not [n for n in names if n.startswith("keys/")], "something in /keys"
    for name in names:
        parts = name.split("/")
        assert "alipay_sandbox" not in parts, name
        assert not any(p == "moto" or p.startswith("moto-") for p in parts), name
        assert not any(p.startswith("bench") and p.endswith(".py") for p in parts), name
    for top in ("local", "tests", "app.py", ".chalice", ".git", ".venv"):
        assert not [a for a in app if a.split("/")[0] == top], top
    # requirements.txt is installed, and nothing of requirements-dev.txt
    assert {"pynamodb", "pika", "alipay", "jwt", "botocore"} <= site, sorted(site)
    assert not {p.split("-")[0].lower() for p in site} & DEV_ONLY, sorted(site)


# --- the worker, running ----------------------------------------------------------


@dataclasses.dataclass
class Shop:
    """This process's side: the handlers (as the API calls them) on the test tables, the
    real broker on the vhost, and the sandbox as Alipay."""

    deps: Deps
    sandbox_url: str

    def stock(self) -> dict[str, int]:
        return {g["id"]: g["stock"] for g in handlers.list_goods(self.deps)["items"]}

    def unpaid_order(self, user: str, **cart: int) -> dict[str, Any]:
        """An UNPAID order with its stock taken, its Alipay cashier opened (a
        WAIT_BUYER_PAY trade), and only then its delay message published: the worker
        cannot check it before the trade exists."""
        held: list[str] = []
        holding = dataclasses.replace(self.deps, broker=_Held(held))
        for goods_id, num in cart.items():
            handlers.set_cart_item(holding, user, goods_id, num)
        order = handlers.create_order(holding, user)
        pay_url = handlers.start_payment(self.deps, user, order["id"])["payUrl"]
        with urllib.request.urlopen(pay_url, timeout=10) as r:
            assert r.status == 200
        assert self.trade(order["id"])["status"] == "WAIT_BUYER_PAY"
        assert held == [order["id"]]
        self.deps.broker.publish_check(order["id"])
        return order

    def status(self, user: str, order_id: str) -> str:
        return str(handlers.get_order(self.deps, user, order_id)["status"])

    def trade(self, order_id: str) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.sandbox_url}/sandbox/trades/{order_id}",
                                    timeout=10) as r:
            return dict(json.loads(r.read()))


class _Held:
    """create_order's publisher: keeps the delay message for `Shop.unpaid_order`."""

    def __init__(self, into: list[str]) -> None:
        self.into = into

    def publish_check(self, order_id: str) -> None:
        self.into.append(order_id)


def worker_env(settings: config.Settings, rmq_url: str, gateway_url: str) -> dict[str, str]:
    """The container's whole configuration (podman passes no other variable)."""
    return {
        "STAGE": settings.stage,
        "RMQ_URL": rmq_url,
        "GOODS_TABLE": settings.goods_table,
        "CARTS_TABLE": settings.carts_table,
        "ORDERS_TABLE": settings.orders_table,
        "SALES_TABLE": settings.sales_table,
        "SECKILL_TABLE": settings.seckill_table,
        "AWS_ENDPOINT_URL_DYNAMODB": DYNAMODB_URL,
        "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "ALIPAY_APP_ID": LOCAL_APP_ID,
        "ALIPAY_SELLER_ID": LOCAL_SELLER_ID,
        "ALIPAY_GATEWAY": gateway_url,
        "ALIPAY_APP_PRIVATE_KEY_FILE": "/keys/app_private.pem",
        "ALIPAY_PUBLIC_KEY_FILE": "/keys/alipay_public.pem",
        "ORDER_CHECK_DELAY_SECONDS": str(CHECK_DELAY_S),
        "SWEEP_INTERVAL_SECONDS": "3600",  # the delay queue closes it, not the sweeper
    }


@contextmanager
def alipay_sandbox(keys_dir: Path) -> Iterator[Any]:
    sandbox = make_server("127.0.0.1", 0, keys_dir, [0.3] * 7)
    thread = threading.Thread(target=sandbox.serve_forever, daemon=True)
    thread.start()
    try:
        yield sandbox
    finally:
        sandbox.shutdown()
        sandbox.server_close()


@dataclasses.dataclass
class Container:
    name: str

    def state(self, field: str) -> str:
        return podman("inspect", "--format", f"{{{{.State.{field}}}}}", self.name).stdout.strip()

    def logs(self) -> str:
        return podman("logs", self.name, check=False).stdout[-5000:]


@contextmanager
def worker_container(image: WorkerImage, env: dict[str, str], keys: Path,
                     ) -> Iterator[Container]:
    """The image's own command on the host's network; removed afterwards (its logs are
    printed when the test fails)."""
    name = f"shop-pay-worker-test-{uuid.uuid4().hex[:8]}"
    env_args = [arg for key, value in env.items() for arg in ("--env", f"{key}={value}")]
    podman("run", "--detach", "--name", name, "--network", "host",
           "--volume", f"{keys}:/keys:ro", *env_args, image.id)
    container = Container(name)
    try:
        yield container
    except BaseException:
        print(f"--- podman logs {name} ---\n{container.logs()}")
        raise
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)


def consumers(vhost: str, queue: str) -> int:
    out = rabbitmqctl("-q", "list_queues", "-p", vhost, "--no-table-headers", "name",
                      "consumers")
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == queue:
            return int(parts[1])
    return 0


def test_the_worker_closes_an_unpaid_order_and_stops_on_sigterm(
    worker_image: WorkerImage, rmq_vhost: RabbitURL, tables: Store, tmp_path: Path,
) -> None:
    keys = ensure_keys(tmp_path / "keys")
    mounted = tmp_path / "mounted-keys"  # what the container's user (uid 10001) may read
    mounted.mkdir(mode=0o755)
    for key in ("app_private", "alipay_public"):
        shutil.copy(keys[key], mounted / keys[key].name)
        (mounted / keys[key].name).chmod(0o644)
    mounted.chmod(0o755)
    settings = dataclasses.replace(config.load(), rmq_url=str(rmq_vhost),
                                   check_delay_seconds=CHECK_DELAY_S)
    timings: dict[str, float] = {}
    with alipay_sandbox(keys["app_private"].parent) as sandbox:
        gateway = AlipayGateway(
            LOCAL_APP_ID, LOCAL_SELLER_ID, sandbox.gateway_url,
            keys["app_private"].read_text(), keys["alipay_public"].read_text(),
            "http://127.0.0.1:9/alipay/notify", "http://127.0.0.1:9/alipay/return",
            timeout=5.0)
        publisher = broker.Broker(settings.rmq_url, settings.check_delay_seconds)
        shop = Shop(Deps(settings=settings, store=tables, broker=publisher, gateway=gateway),
                    sandbox.base_url)
        env = worker_env(settings, str(rmq_vhost), sandbox.gateway_url)
        try:
            started = time.monotonic()
            with worker_container(worker_image, env, mounted) as worker:

                def consuming() -> bool:
                    assert worker.state("Running") == "true", (
                        f"the worker exited ({worker.state('ExitCode')}):\n{worker.logs()}")
                    return consumers(rmq_vhost.vhost, broker.QUEUE_CHECK) >= 1

                wait_until(consuming, 60, "the worker consumes queue.order.check", step=0.5)
                timings["start"] = time.monotonic() - started

                before = shop.stock()
                order = shop.unpaid_order("alice", g1=2, g2=1)
                assert shop.status("alice", order["id"]) == "UNPAID"
                assert shop.stock() == {**before, "g1": before["g1"] - 2,
                                        "g2": before["g2"] - 1}
                published = time.monotonic()
                wait_until(lambda: shop.status("alice", order["id"]) == "CLOSED", 30,
                           "the worker closes the order", step=0.2)
                timings["closed"] = time.monotonic() - published
                assert shop.stock() == before, "the stock is given back, once"
                assert shop.trade(order["id"])["status"] == "TRADE_CLOSED"

                stopping = time.monotonic()
                podman("stop", "--time", str(STOP_GRACE_S), worker.name, timeout=90)
                timings["stop"] = time.monotonic() - stopping
                assert worker.state("Status") == "exited"
                exit_code = worker.state("ExitCode")
                assert exit_code == "0", f"exit code {exit_code} on SIGTERM:\n{worker.logs()}"
                assert timings["stop"] < STOP_GRACE_S
        finally:
            publisher.close()
    print(f"\nworker: consuming {timings['start']:.1f} s after podman run; order closed "
          f"{timings['closed']:.1f} s after its delay message (TTL {CHECK_DELAY_S} s); "
          f"podman stop {timings['stop']:.1f} s, exit code 0")
