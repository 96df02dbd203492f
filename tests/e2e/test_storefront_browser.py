"""A shopper's walk in a real browser (Debian's headless Chromium, driven by
Playwright): log in with a token, add goods, order, go to the sandbox's cashier,
press Pay, land on the return page and see the order PAID.

The test starts the whole local stack itself (`python -m local run` on free
ports, against a fresh RabbitMQ vhost; the fixtures are in conftest.py) and stops
it with SIGTERM. A screenshot of each step goes to tests/e2e/screenshots/
(ignored by git).
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import pytest

from chalicelib import auth
from chalicelib.config import LOCAL_JWT_SECRET

pytestmark = pytest.mark.browser

SHOTS = Path(__file__).resolve().parent / "screenshots"
STEP_TIMEOUT_MS = 15_000


def test_a_shopper_orders_and_pays_in_the_browser(stack: dict[str, str], browser: Any) -> None:
    from playwright.sync_api import expect

    SHOTS.mkdir(exist_ok=True)
    for old in SHOTS.glob("[0-9]*.png"):  # its own; the operator's walk keeps its own
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
    assert sorted(p.name for p in SHOTS.glob("[0-9]*.png")) == [
        "01-storefront.png", "02-logged-in.png", "03-cart.png", "04-order-placed.png",
        "05-cashier.png", "06-return-paid.png", "07-orders-paid.png"]
