"""What the browser tests share: the whole local stack on free ports against a
fresh RabbitMQ vhost, and Debian's headless Chromium driven by Playwright.

Each fixture is per module: every test file gets a stack of its own (fresh
DynamoDB, fresh queues), so one walk's orders never show in another's.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from chalicelib.config import LOCAL_JWT_SECRET

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
READY_TIMEOUT_S = 90.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rabbitmqctl(*args: str) -> None:
    done = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=60,
                          check=False)
    if done.returncode != 0:
        pytest.fail(f"rabbitmqctl {' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")


@pytest.fixture(scope="module")
def vhost() -> Iterator[str]:
    if shutil.which("rabbitmqctl") is None:
        pytest.fail("rabbitmqctl is not on PATH: the stack needs the local RabbitMQ")
    name = f"e2e-{uuid.uuid4().hex[:12]}"
    _rabbitmqctl("add_vhost", name)
    try:
        _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield f"amqp://guest:guest@127.0.0.1:5672/{quote(name, safe='')}"
    finally:
        subprocess.run(["rabbitmqctl", "delete_vhost", name], capture_output=True, timeout=60,
                       check=False)


@pytest.fixture(scope="module")
def stack(vhost: str) -> Iterator[dict[str, str]]:
    """`python -m local run` on free ports; yields its URLs once it printed `ready`."""
    ports = {"API_PORT": _free_port(), "SANDBOX_PORT": _free_port(),
             "DYNAMODB_PORT": _free_port()}
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ALIPAY_", "AWS_")) and k not in (
               "STAGE", "GOODS_TABLE", "CARTS_TABLE", "ORDERS_TABLE", "TABLE_PREFIX",
               "JWT_SECRET", "SALES_TABLE", "SECKILL_TABLE")}
    env.update({k: str(v) for k, v in ports.items()})
    env.update({"RMQ_URL": vhost, "STAGE": "local", "JWT_SECRET": LOCAL_JWT_SECRET,
                "PYTHONUNBUFFERED": "1",
                # The walks reconcile today: Alipay (and so the sandbox) serves past days only.
                "SANDBOX_BILLS_TODAY": "1"})
    proc = subprocess.Popen([sys.executable, "-m", "local", "run"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip())
            if line.startswith("ready"):
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ready.wait(0.2):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("the stack did not get ready:\n" + "\n".join(lines))
        yield {"api": f"http://127.0.0.1:{ports['API_PORT']}",
               "sandbox": f"http://127.0.0.1:{ports['SANDBOX_PORT']}"}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()
