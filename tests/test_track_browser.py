"""analytics.js (`@segment/analytics-next`, as npm publishes it) in headless Chromium, feeding the track source.

The page comes from a test server on another origin (http://localhost:PORT) than Declic
(http://127.0.0.1:PORT), so every call is a cross-origin fetch with a preflight: analytics.js sends
the write key as Basic auth. With the page's origin in `allowed_origins` each call is answered, read
and not sent again, and becomes an e-mail through a rule; without it, the browser refuses the calls.

Needs Debian's `chromium` and `npm ci` in tests/browser (.ci/run does both).
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, web

from conftest import Deployment
from declic_gateway.testing import SmtpCatcher
from segment_site import CAMILLE, EVENT_OF_CALL, SECRET_KEY, WRITE_KEY, mailed, start_site

pytestmark = [pytest.mark.slow, pytest.mark.browser, pytest.mark.timeout(120)]

BUNDLE = Path(__file__).parent / "browser" / "node_modules" / "@segment" / "analytics-next" / "dist" / "umd"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
#: After the last call, how long the page stays open: analytics.js retries a failed call within a
#: second or two (backoff from 0.5 s), so a resend would show in this window.
WATCH_FOR_RESENDS_SECONDS = 4

#: The site's page: the calls a visitor's session makes, one after the other, as a site would.
PAGE = """<!doctype html>
<html><head><title>Boutique</title><script src="/ajs/index.js"></script></head>
<body><script>
const writeKey = "WRITE_KEY";
const analytics = AnalyticsNext.AnalyticsBrowser.load({writeKey, cdnSettings: {integrations: {"Segment.io": {
  apiKey: writeKey, apiHost: "API_HOST", protocol: "http"}}}});
window.visit = async () => {
  await analytics.page("Pricing");                     // an anonymous visitor
  await analytics.alias("cus_1042");                   // she signs up: her server identified her
  await analytics.identify("cus_1042", {firstName: "Camille"});
  await analytics.track("Signed Up", {plan: "pro"});
  await analytics.screen("Onboarding", "Welcome");
  await analytics.group("acme", {name: "Acme SAS"});
  await analytics.page("Docs");
};
</script></body></html>
"""


def browser_parts_missing() -> str | None:
    if not Path(CHROMIUM).exists():
        return "chromium is not installed (apt-get install chromium; .ci/run does it)"
    if not (BUNDLE / "index.js").exists():
        return "the analytics.js bundle is missing: run `npm ci` in tests/browser (.ci/run does it)"
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "playwright is not installed: pip install -e '.[test]'"
    return None


@pytest.fixture
def browser_parts() -> None:
    if (missing := browser_parts_missing()) is not None:
        pytest.skip(missing)


async def no_icon(_: web.Request) -> web.Response:
    return web.Response(status=204)  # a 404 would be a console error


async def serve_page(aiohttp_server: Any) -> tuple[str, dict[str, str]]:
    """The site, on its own origin: the page and the analytics.js bundle (its chunks load beside it).
    Returns its URL, and where to write the `apiHost` once Declic runs."""
    settings: dict[str, str] = {}

    async def page(_: web.Request) -> web.Response:
        html = PAGE.replace("WRITE_KEY", WRITE_KEY).replace("API_HOST", settings["api_host"])
        return web.Response(text=html, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_get("/favicon.ico", no_icon)
    app.router.add_static("/ajs/", BUNDLE)
    server = await aiohttp_server(app)
    return f"http://localhost:{server.port}", settings


async def server_identifies_her(d: Deployment) -> None:
    """Her sign-up, as the site's server tells Declic: with the secret key, her address and opt-in."""
    message = {
        "userId": "cus_1042",
        "traits": {"email": CAMILLE, "firstName": "Camille", "consent": {"email": "granted"}},
        "context": {"ip": "203.0.113.9"},
    }
    auth = "Basic " + base64.b64encode(f"{SECRET_KEY}:".encode()).decode()
    async with ClientSession() as http:
        url = d.client.make_url("/hooks/site/v1/identify")
        async with http.post(url, json=message, headers={"Authorization": auth}) as response:
            assert response.status == 200, await response.text()
    await d.advance(seconds=1)


async def visit(url: str) -> tuple[list[tuple[str, str]], list[str]]:
    """Run the visit in Chromium: the posts it made to Declic (path, messageId) and its console errors."""
    from playwright.async_api import async_playwright

    posts: list[tuple[str, str]] = []
    errors: list[str] = []
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = await browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))

            def record(request: Any) -> None:
                if request.method == "POST" and "/hooks/site/" in request.url:
                    body = json.loads(request.post_data or "{}")
                    posts.append((request.url.rsplit("/hooks/site", 1)[1], body.get("messageId", "")))

            page.on("request", record)
            await page.goto(url)
            await page.evaluate("window.visit()")
            await asyncio.sleep(WATCH_FOR_RESENDS_SECONDS)
        finally:
            await browser.close()
    return posts, errors


async def test_analytics_js_from_an_allowed_origin_is_answered_once_and_each_call_mails_her(
    aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path, db_url: str, smtp: SmtpCatcher, browser_parts: None
) -> None:
    origin, page = await serve_page(aiohttp_server)
    d = await start_site(aiohttp_client, tmp_path, db_url, smtp, allowed_origins=[origin])
    page["api_host"] = f"127.0.0.1:{d.client.port}/hooks/site"
    await server_identifies_her(d)

    posts, errors = await visit(origin + "/")
    await d.advance(seconds=1)

    assert [path for path, _ in posts] == ["/p", "/a", "/i", "/t", "/s", "/g", "/p"]
    assert len({message_id for _, message_id in posts}) == 7  # each call sent once: no resend
    assert errors == []  # no CORS error, no failed load
    assert d.scalar("SELECT count(*) FROM inbox") == 8
    sent = mailed(smtp)
    assert {recipient for recipient, _, _ in sent} == {CAMILLE}
    # The first page view was an anonymous visitor's: nobody to mail then. The alias folded that
    # visitor into her contact, so the rest of the visit mails her.
    from_the_page = sorted(kind for _, kind, message_id in sent if message_id.startswith("ajs-"))
    assert from_the_page == sorted(EVENT_OF_CALL.values())
    [contact] = d.rows("SELECT id FROM contacts WHERE email = :e", e=CAMILLE)
    anonymous = d.scalar(
        "SELECT count(*) FROM identities WHERE kind = 'site_anonymous' AND contact_id = :c", c=contact.id
    )
    assert anonymous == 1


async def test_analytics_js_from_an_origin_not_allowed_is_refused_by_the_browser(
    aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path, db_url: str, smtp: SmtpCatcher, browser_parts: None
) -> None:
    origin, page = await serve_page(aiohttp_server)
    d = await start_site(aiohttp_client, tmp_path, db_url, smtp)  # no allowed_origins: the default
    page["api_host"] = f"127.0.0.1:{d.client.port}/hooks/site"

    posts, errors = await visit(origin + "/")
    await d.advance(seconds=1)

    assert posts  # analytics.js tried; the browser asked Declic first (preflight), was refused, sent nothing
    assert any("blocked by CORS policy" in error for error in errors)
    assert d.scalar("SELECT count(*) FROM inbox") == 0 and mailed(smtp) == []
