"""A shopper's walk in a real browser (Debian's headless Chromium, driven by
Playwright): log in with a token, add goods, order, go to the sandbox's cashier,
press Pay, land on the return page and see the order PAID.

The test starts the whole local stack itself (`python -m local run` on free
ports, against a fresh RabbitMQ vhost) and stops it with SIGTERM. A screenshot
of each step goes to tests/e2e/screenshots/ (ignored by git).
"""

from __future__ import annotations

import os
import re
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

from chalicelib import auth
from chalicelib.config import LOCAL_JWT_SECRET

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[2]
SHOTS = Path(__file__).resolve().parent / "screenshots"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
READY_TIMEOUT_S = 90.0
STEP_TIMEOUT_MS = 15_000


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
                "PYTHONUNBUFFERED": "1"})
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


def test_a_shopper_orders_and_pays_in_the_browser(stack: dict[str, str], browser: Any) -> None:
    from playwright.sync_api import expect

    SHOTS.mkdir(exist_ok=True)
    for old in SHOTS.glob("*.png"):
        old.unlink()
    context = browser.new_context(viewport={"width": 1200, "height": 820}, locale="en-US")
    page = context.new_page()
    page.set_default_timeout(STEP_TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    def shot(name: str) -> None:
        page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)

    # 1. The storefront, not logged in: the goods are listed.
    page.goto(stack["api"] + "/")
    expect(page.locator("#goods .card")).to_have_count(5)
    expect(page.locator("#who")).to_have_text("not logged in")
    shot("01-storefront")

    # 2. Log in by pasting a token (what `python -m local token shopper` prints).
    shopper = f"shopper-{uuid.uuid4().hex[:6]}"
    page.fill("#token", auth.issue(LOCAL_JWT_SECRET, shopper, 3600))
    page.click("#login")
    expect(page.locator("#who")).to_have_text(f"logged in as {shopper}")
    expect(page.locator("#cart")).to_contain_text("Your cart is empty")
    shot("02-logged-in")

    # 3. Add goods: a teapot and two tea cups.
    page.click("button.add[data-goods-id='teapot']")
    expect(page.locator("#cart-lines tr[data-goods-id='teapot']")).to_be_visible()
    page.click("button.add[data-goods-id='tea-cup']")
    expect(page.locator("#cart-lines tr[data-goods-id='tea-cup']")).to_be_visible()
    page.click("button.add[data-goods-id='tea-cup']")
    expect(page.locator("#cart-lines tr[data-goods-id='tea-cup'] td.num").first).to_have_text("2")
    expect(page.locator("#cart-total")).to_have_text("¥99.70")
    shot("03-cart")

    # 4. Place the order: UNPAID, the cart emptied, the stock down.
    page.click("#place-order")
    row = page.locator("#order-list tr[data-order-id]")
    expect(row).to_have_count(1)
    expect(row.locator(".badge")).to_have_text("UNPAID")
    order_id = row.get_attribute("data-order-id")
    assert order_id and order_id.startswith("ORDER_")
    expect(page.locator("#cart")).to_contain_text("Your cart is empty")
    expect(page.locator(".card[data-goods-id='teapot'] .stock")).to_have_text("49 in stock")
    shot("04-order-placed")

    # 5. Pay: the browser goes to the sandbox's cashier with a signed page-pay URL.
    page.click(f"button.pay[data-order-id='{order_id}']")
    page.wait_for_url(re.compile(re.escape(stack["sandbox"]) + r"/gateway\.do\?"))
    expect(page.locator("body")).to_contain_text("99.70")
    expect(page.locator("button.pay")).to_be_visible()
    shot("05-cashier")

    # 6. Press Pay: the sandbox notifies the API (-> queue -> bridge -> PAID) and sends
    #    the browser back to the return page, which reloads itself until PAID.
    page.click("button.pay")
    page.wait_for_url(re.compile(re.escape(stack["api"]) + r"/alipay/return\?"))
    expect(page.locator("#order-id")).to_have_text(order_id)
    expect(page.locator("#order-status")).to_have_text("PAID", timeout=30_000)
    expect(page.locator(".status strong")).to_have_text("paid")
    shot("06-return-paid")

    # 7. Back to the shop: the order is listed as PAID.
    page.click("text=Back to the shop")
    page.wait_for_url(stack["api"] + "/")
    expect(page.locator(f"#order-list tr[data-order-id='{order_id}'] .badge")).to_have_text(
        "PAID")
    shot("07-orders-paid")

    assert errors == [], errors
    context.close()
    assert sorted(p.name for p in SHOTS.glob("*.png")) == [
        "01-storefront.png", "02-logged-in.png", "03-cart.png", "04-order-placed.png",
        "05-cashier.png", "06-return-paid.png", "07-orders-paid.png"]
