"""/admin/ in headless Chromium (Debian's `chromium`, driven by Playwright): log in through the
form, read a rule's funnel after real sends (Shopify webhooks over HTTP, SMTP on 127.0.0.1), press
Replay on a dead-lettered step and see it sent. No console error: the stylesheet and icon load
under the Content-Security-Policy, and the pages need no script.

DECLIC_DASHBOARD_SCREENSHOT=docs/dashboard.png saves the rule page as the README shows it.
"""

from __future__ import annotations

import os
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from test_conversions import checkout, order

from conftest import SECRET, TEMPLATES, Deployment
from declic_gateway.http.app import create_app, load
from declic_gateway.http.running import GATEWAY_KEY
from declic_gateway.testing import FakeClock, SmtpCatcher, write_deployment

pytestmark = [pytest.mark.slow, pytest.mark.browser, pytest.mark.timeout(120)]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ADMIN_TOKEN = "admin-token-0123456789abcdef"
BUYERS = 24
CONFIG = """\
public_url: http://127.0.0.1
allow_http_public_url: true
timezone: Europe/Paris
storage: {{url: "{db_url}"}}
sources:
  shop: {{plugin: shopify, secret: {secret}}}
sinks:
  email: {{plugin: smtp, host: 127.0.0.1, port: {smtp_port}, tls: none, sender: "Boutique <shop@example.com>"}}
worker: {{max_attempts: 1}}
policies:
  consent: {{email: required}}
admin: {{token: {token}}}
rules:
  - name: abandoned-cart
    when: checkout.started
    goal: order.placed
    exit_on: order.placed
    holdout: 25%
    attribution: 3d
    steps:
      - wait: 1h
        send: {{via: email, template: cart-reminder}}
      - wait: 1d
        send: {{via: email, template: cart-reminder}}
"""


@pytest.fixture
def browser_parts() -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run does it)")
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        pytest.skip("playwright is not installed: pip install -e '.[test]'")


async def shop_with_a_dead_step(aiohttp_client: Any, tmp_path: Path, db_url: str, smtp: SmtpCatcher) -> Deployment:
    """Carts, reminders, orders from some reminded buyers, then a second reminder the SMTP server refuses once."""
    text = CONFIG.format(db_url=db_url, secret=SECRET, smtp_port=smtp.port, token=ADMIN_TOKEN)
    settings, pm, _ = load(str(write_deployment(tmp_path, text, TEMPLATES)))
    clock = FakeClock(datetime(2026, 3, 14, 8, 0, tzinfo=UTC))
    app = create_app(settings, pm=pm, clock=clock, role="web")
    d = Deployment(await aiohttp_client(app), app[GATEWAY_KEY], clock, tmp_path / "declic.yaml")
    for n in range(BUYERS):
        assert (await d.post_shopify("checkouts/create", checkout(n), f"c{n}")).status == 200
    await d.advance(hours=1, seconds=1)
    reminded = sorted(int(re.findall(r"\d+", str(m["To"]))[0]) for m in smtp.messages)
    for n in reminded[::3]:  # a third of the reminded buyers order
        assert (await d.post_shopify("orders/create", order(n, "42.50"), f"o{n}")).status == 200
    await d.advance(hours=1)
    smtp.replies = ["554 5.7.1 message refused"]  # the first second reminder: refused for good
    await d.advance(days=1)
    assert d.scalar("SELECT count(*) FROM jobs WHERE status = 'dead'") == 1
    return d


def sent_on_page(html: str, step: int) -> int:
    found = re.search(rf'<tr data-step="{step}"><td>{step}</td><td class="sent">(\d+)</td>', html)
    assert found, html
    return int(found.group(1))


async def test_log_in_read_the_funnel_replay_the_dead_step_and_see_it_sent(
    aiohttp_client: Any, tmp_path: Path, db_url: str, smtp: SmtpCatcher, browser_parts: None
) -> None:
    from playwright.async_api import async_playwright

    d = await shop_with_a_dead_step(aiohttp_client, tmp_path, db_url, smtp)
    sent = {
        step: d.scalar("SELECT count(*) FROM deliveries WHERE step = :s AND status = 'sent'", s=step) for step in (1, 2)
    }
    assert len(smtp.messages) == sent[1] + sent[2] and sent[1] > 0
    [dead_to] = [
        r.email
        for r in d.rows(
            "SELECT c.email FROM deliveries d JOIN contacts c ON c.id = d.contact_id WHERE d.status = 'failed'"
        )
    ]
    base = str(d.client.make_url("/admin/"))
    errors: list[str] = []
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = await browser.new_page(viewport={"width": 1100, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))

            await page.goto(base)
            assert page.url.endswith("/admin/login")  # no session: the login form
            await page.fill("#token", "not-the-token")
            await page.click("button[type=submit]")
            assert "not one of this deployment" in await page.inner_text("main")
            assert errors == ["Failed to load resource: the server responded with a status of 403 (Forbidden)"]
            errors.clear()  # that refusal was the point; from here on, no error at all
            await page.fill("#token", ADMIN_TOKEN)
            await page.click("form.login button[type=submit]")
            assert page.url == base and await page.inner_text("h1") == "Overview"
            [cookie] = [c for c in await page.context.cookies() if c["name"] == "declic_admin"]
            assert cookie["httpOnly"] and cookie["sameSite"] == "Lax" and ADMIN_TOKEN not in cookie["value"]

            await page.click("text=abandoned-cart")
            html = await page.content()
            assert (sent_on_page(html, 1), sent_on_page(html, 2)) == (sent[1], sent[2])
            bar = page.locator("svg.funnel g.stage.sent[data-step='1'] text.value")
            assert await bar.text_content() == str(sent[1])  # the chart says it too
            assert "lift" in await page.inner_text("#holdout")
            if target := os.environ.get("DECLIC_DASHBOARD_SCREENSHOT"):
                await page.screenshot(path=target, full_page=True)

            await page.click("a[href='/admin/failures']")
            row = page.locator("#dead tr[data-job]")
            assert await row.count() == 1 and "554 5.7.1" in await row.inner_text()
            await row.locator("button", has_text="Replay").click()
            assert "Queued again" in await page.inner_text("main")
            await d.advance(seconds=1)  # the worker's next turn
            assert len(smtp.to(dead_to)) == 2  # her first reminder, and now the second

            await page.reload()
            assert "The dead letter is empty" in await page.inner_text("#dead")
            await page.goto(base + "rules/abandoned-cart")
            assert sent_on_page(await page.content(), 2) == sent[2] + 1

            # Why did she get what she got: her timeline, each message as it was sent.
            await page.click("a[href='/admin/contacts']")
            await page.fill("#q", dead_to)
            await page.click("form.search button[type=submit]")
            await page.locator("#found a").click()
            messages = page.locator("#timeline tr.message")
            assert await messages.count() == 2
            newest = messages.last.locator("details")  # the timeline reads oldest first
            text = newest.locator("pre.message")
            assert not await text.is_visible()  # folded: the timeline stays readable
            await newest.locator("summary").click()
            assert await text.is_visible()
            summary = await newest.locator("summary").inner_text()
            last = smtp.to(dead_to)[-1]
            assert summary.startswith(f"{last['Subject']} to {dead_to}") and "step 2 via email" in summary
            body = last.get_body(("plain",))
            assert body is not None and str(body.get_content()).strip() in await text.inner_text()
        finally:
            await browser.close()
    assert errors == []
