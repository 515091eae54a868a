"""/admin/ over real HTTP: the login form, the session cookie, CSRF, scopes, and what the pages
show after real webhooks and real sends (SMTP on 127.0.0.1). The browser test is test_dashboard_browser.py."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import pytest

from conftest import Deployment, Factory, fixture_bytes, refuse
from declic_gateway.cli import logs
from declic_gateway.http.dashboard.sessions import COOKIE
from declic_gateway.testing import SmtpCatcher

ORDER = fixture_bytes("shopify/order.json")
CAMILLE = "camille.durand@example.org"
ADMIN_TOKEN = "admin-token-0123456789abcdef"
READ_TOKEN = "read-token-0123456789abcdef"
ADMIN = f"""\
admin:
  token: {ADMIN_TOKEN}
  tokens:
    - {{token: {READ_TOKEN}, scope: read, name: viewer}}
"""


@dataclass
class Visitor:
    """A person's browser, as far as the session cookie goes: keeps `declic_admin` from Set-Cookie
    and sends it back (the test client's jar keeps a `Secure` cookie off plain http, as browsers do)."""

    d: Deployment
    cookie: str | None = None

    async def get(self, path: str, **options: Any) -> Any:
        return await self.request("GET", path, **options)

    async def post(self, path: str, data: dict[str, str], **options: Any) -> Any:
        return await self.request("POST", path, data=data, **options)

    async def request(self, method: str, path: str, **options: Any) -> Any:
        headers = {"Cookie": f"{COOKIE}={self.cookie}"} if self.cookie else {}
        response = await self.d.client.request(method, path, headers=headers, allow_redirects=False, **options)
        for header in response.headers.getall("Set-Cookie", []):
            if header.startswith(f"{COOKIE}="):
                self.cookie = header.split(";")[0].split("=", 1)[1].strip('"') or None
        return response


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, html
    return found.group(1)


async def login(v: Visitor, token: str) -> Any:
    """Through the form, as a person does: open it (a session with a CSRF token), post the token."""
    page = await v.get("/admin/login")
    assert page.status == 200
    return await v.post("/admin/login", {"csrf": csrf_of(await page.text()), "token": token})


async def a_dead_step(d: Deployment, smtp: SmtpCatcher) -> int:
    """Camille's order confirmation, refused for good by the SMTP server: one job in the dead letter."""
    smtp.replies = ["554 5.7.1 message refused"]
    assert (await d.post_shopify("orders/create", ORDER)).status == 200
    await d.advance(seconds=1)
    [job_id] = [row.id for row in d.rows("SELECT id FROM jobs WHERE status = 'dead'")]
    return int(job_id)


async def test_without_a_session_every_page_sends_to_the_login_form(deploy: Factory) -> None:
    v = Visitor(await deploy(extra=ADMIN))
    for path in ("/admin/", "/admin/rules/welcome", "/admin/contacts?q=a@b.c", "/admin/contacts/1", "/admin/failures"):
        response = await v.get(path)
        assert (response.status, response.headers["Location"]) == (303, "/admin/login"), path
    response = await v.post("/admin/failures/jobs/1/replay", {"csrf": "x"})
    assert (response.status, response.headers["Location"]) == (303, "/admin/login")


async def test_a_wrong_token_is_refused_and_opens_nothing(deploy: Factory) -> None:
    v = Visitor(await deploy(extra=ADMIN))
    for wrong in ("", "not-a-token", ADMIN_TOKEN + "x", ADMIN_TOKEN[:-1], ADMIN_TOKEN.upper()):
        response = await login(v, wrong)
        assert response.status == 403, wrong
        assert "not one of this deployment" in await response.text()
        assert (await v.get("/admin/")).status == 303


async def test_the_login_form_itself_needs_its_csrf_token(deploy: Factory) -> None:
    v = Visitor(await deploy(extra=ADMIN))
    await v.get("/admin/login")
    response = await v.post("/admin/login", {"csrf": "guessed", "token": ADMIN_TOKEN})
    assert response.status == 403
    assert (await v.get("/admin/")).status == 303


async def test_the_session_cookie_is_httponly_samesite_secure_and_holds_no_token(deploy: Factory) -> None:
    v = Visitor(await deploy(extra=ADMIN))  # public_url is https: the cookie is Secure
    before = (await v.get("/admin/login"), v.cookie)[1]
    response = await v.post(
        "/admin/login", {"csrf": csrf_of(await (await v.get("/admin/login")).text()), "token": ADMIN_TOKEN}
    )
    assert (response.status, response.headers["Location"]) == (303, "/admin/")
    [cookie] = [c for c in response.headers.getall("Set-Cookie") if c.startswith(f"{COOKIE}=")]
    attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "secure", "samesite", "path", "max-age"} <= attributes
    assert "SameSite=Lax" in cookie and "Path=/admin/" in cookie
    assert ADMIN_TOKEN not in cookie and READ_TOKEN not in cookie
    assert v.cookie != before  # a new session at login: one planted before it is worth nothing
    page = await v.get("/admin/")
    assert page.status == 200
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp  # no script may run
    assert page.headers["Cache-Control"] == "no-store"
    assert "<script" not in await page.text()


async def test_a_forged_or_altered_cookie_opens_nothing(deploy: Factory) -> None:
    v = Visitor(await deploy(extra=ADMIN))
    await login(v, ADMIN_TOKEN)
    assert v.cookie is not None and (await v.get("/admin/")).status == 200
    genuine = v.cookie
    for forged in ("A" * 120, genuine[:-2] + ("AA" if genuine[-2:] != "AA" else "BB"), genuine + "x" * 2000):
        v.cookie = forged
        assert (await v.get("/admin/")).status == 303


async def test_replaying_needs_the_csrf_token_of_the_session(deploy: Factory, smtp: SmtpCatcher) -> None:
    d = await deploy(extra=ADMIN, max_attempts=1)
    job_id = await a_dead_step(d, smtp)
    v = Visitor(d)
    await login(v, ADMIN_TOKEN)
    for form in ({}, {"csrf": ""}, {"csrf": "forged-by-another-site"}):
        response = await v.post(f"/admin/failures/jobs/{job_id}/replay", form)
        assert response.status == 403, form
    assert d.scalar("SELECT status FROM jobs WHERE id = :id", id=job_id) == "dead"


async def test_a_read_token_sees_the_dead_letter_but_may_not_replay(deploy: Factory, smtp: SmtpCatcher) -> None:
    d = await deploy(extra=ADMIN, max_attempts=1)
    job_id = await a_dead_step(d, smtp)
    v = Visitor(d)
    assert (await login(v, READ_TOKEN)).status == 303
    page = await v.get("/admin/failures")
    html = await page.text()
    assert page.status == 200 and "554 5.7.1 message refused" in html
    assert "/replay" not in html  # no button for a read session
    response = await v.post(f"/admin/failures/jobs/{job_id}/replay", {"csrf": csrf_of(html)})
    assert response.status == 403
    assert "admin scope" in await response.text()
    assert d.scalar("SELECT status FROM jobs WHERE id = :id", id=job_id) == "dead"


async def test_an_admin_replays_a_dead_step_and_it_is_sent(deploy: Factory, smtp: SmtpCatcher) -> None:
    d = await deploy(extra=ADMIN, max_attempts=1)
    job_id = await a_dead_step(d, smtp)
    v = Visitor(d)
    await login(v, ADMIN_TOKEN)
    page = await (await v.get("/admin/failures")).text()
    assert f'action="/admin/failures/jobs/{job_id}/replay"' in page
    response = await v.post(f"/admin/failures/jobs/{job_id}/replay", {"csrf": csrf_of(page)})
    assert (response.status, response.headers["Location"]) == (303, "/admin/failures?replayed=job")
    await d.advance(seconds=1)
    assert len(smtp.to(CAMILLE)) == 1
    rule = await (await v.get("/admin/rules/order-confirmation")).text()
    assert re.search(r'<td class="sent">1</td>', rule)
    assert "The dead letter is empty" in await (await v.get("/admin/failures")).text()
    # Replaying twice (a double click, a second tab) queues nothing more.
    again = await v.post(f"/admin/failures/jobs/{job_id}/replay", {"csrf": csrf_of(page)})
    assert again.headers["Location"] == "/admin/failures?replayed=none"
    await d.advance(seconds=1)
    assert len(smtp.to(CAMILLE)) == 1


async def test_a_dead_step_whose_message_went_out_is_not_sent_again_by_its_replay_button(
    deploy: Factory, smtp: SmtpCatcher
) -> None:
    """The e-mail went out but the database refused its record: nothing but the job knows it was sent. Replay from
    the dashboard would send it again; it queues nothing and says how to send it all the same."""
    d = await deploy(extra=ADMIN)
    refuse(d, "deliveries", "NEW.status = 'sent'")
    await d.post_shopify("orders/create", fixture_bytes("shopify/order.json"))
    await d.advance(seconds=1)
    assert len(smtp.to(CAMILLE)) == 1
    job_id = d.scalar("SELECT id FROM jobs WHERE kind = 'step' AND status = 'dead'")
    v = Visitor(d)
    await login(v, ADMIN_TOKEN)
    page = await (await v.get("/admin/failures")).text()
    response = await v.post(f"/admin/failures/jobs/{job_id}/replay", {"csrf": csrf_of(page)})
    assert (response.status, response.headers["Location"]) == (303, "/admin/failures?replayed=went_out")
    told = await (await v.get("/admin/failures?replayed=went_out")).text()
    assert "Not replayed: its message went out" in told and "declic replay --resend ID" in told
    await d.advance(hours=1)
    assert len(smtp.to(CAMILLE)) == 1
    assert d.scalar("SELECT status FROM jobs WHERE id = :id", id=job_id) == "dead"


async def test_logging_out_ends_the_session(deploy: Factory) -> None:
    v = Visitor(await deploy(extra=ADMIN))
    await login(v, ADMIN_TOKEN)
    page = await (await v.get("/admin/")).text()
    response = await v.post("/admin/logout", {"csrf": csrf_of(page)})
    assert (response.status, response.headers["Location"]) == (303, "/admin/login")
    assert v.cookie is None
    assert (await v.get("/admin/")).status == 303


async def test_pages_show_the_webhooks_the_sends_the_contact_and_the_timeline(
    deploy: Factory, smtp: SmtpCatcher
) -> None:
    d = await deploy(extra=ADMIN)
    assert (await d.post_shopify("orders/create", ORDER)).status == 200
    await d.advance(seconds=1)
    assert len(smtp.to(CAMILLE)) == 1
    v = Visitor(d)
    await login(v, READ_TOKEN)
    overview = await (await v.get("/admin/")).text()
    assert re.search(r"<td>shop</td><td>1</td><td>1</td>", overview)  # received 1, processed 1
    assert re.search(r'<td>email</td><td class="send">1</td>', overview)
    found = await (await v.get("/admin/contacts", params={"q": CAMILLE.upper()})).text()
    [contact_id] = re.findall(r'href="/admin/contacts/(\d+)"', found)
    timeline = await (await v.get(f"/admin/contacts/{contact_id}")).text()
    assert CAMILLE in timeline and "order.placed" in timeline
    assert re.search(r'<tr class="decision send">', timeline)
    # The message as she received it: its subject, and its text inside, escaped.
    subject = smtp.to(CAMILLE)[0]["Subject"]
    assert re.search(rf'<tr class="message">.*<summary>{re.escape(subject)} ', timeline, re.S)
    assert '<pre class="message">Thanks for order' in timeline
    rule = await v.get("/admin/rules/order-confirmation")
    assert rule.status == 200 and "1 sent" in await rule.text()


async def test_bad_addresses_get_a_clear_4xx(deploy: Factory) -> None:
    v = Visitor(await deploy(extra=ADMIN))
    await login(v, READ_TOKEN)
    assert (await v.get("/admin/rules/no-such-rule")).status == 404
    assert (await v.get("/admin/rules/welcome?days=-3")).status == 400
    assert (await v.get("/admin/rules/welcome?days=99999999999999999999")).status == 400
    assert (await v.get("/admin/rules/welcome?days=%C2%B3")).status == 400  # "³": a digit to str.isdigit()
    assert (await v.get("/admin/contacts/999999")).status == 404
    assert (await v.get("/admin/contacts/99999999999")).status == 404  # past the INTEGER column
    # An address under /admin/ that names no page: a page a person can read, with the way back.
    lost = await v.get("/admin/no-such-page")
    assert (lost.status, lost.content_type) == (404, "text/html")
    assert 'href="/admin/"' in await lost.text() and "default-src 'none'" in lost.headers["Content-Security-Policy"]
    assert (await v.request("DELETE", "/admin/")).content_type == "text/html"
    assert (await v.get("/nowhere")).content_type == "application/json"  # elsewhere, machines still get JSON
    assert (await v.get("/admin/contacts", params={"q": "x" * 5000})).status == 200


async def test_a_search_with_a_nul_is_a_400_and_stays_out_of_the_log(
    deploy: Factory, capsys: pytest.CaptureFixture[str]
) -> None:
    """SQLite would search for it, PostgreSQL refuses it: on both, a 400 before any query, and no traceback
    quoting the search."""
    logs.configure("info", redact=True, as_json=True)
    v = Visitor(await deploy(extra=ADMIN))
    await login(v, READ_TOKEN)
    response = await v.get("/admin/contacts?q=camille.durand%00@example.org")
    assert response.status == 400 and "NUL" in await response.text()
    assert "camille.durand" not in capsys.readouterr().err


async def test_ids_past_the_integer_columns_replay_nothing(deploy: Factory) -> None:
    v = Visitor(await deploy(extra=ADMIN))
    await login(v, ADMIN_TOKEN)
    csrf = csrf_of(await (await v.get("/admin/failures")).text())
    for kind in ("jobs", "calls"):
        assert (await v.post(f"/admin/failures/{kind}/99999999999/replay", {"csrf": csrf})).status == 404


async def test_a_form_that_cannot_be_read_is_a_400(deploy: Factory) -> None:
    """An unknown charset or transfer encoding, multipart without its boundary, bytes not in the charset."""
    d = await deploy(extra=ADMIN)
    v = Visitor(d)
    await login(v, ADMIN_TOKEN)
    csrf = csrf_of(await (await v.get("/admin/failures")).text())
    part = 'Content-Disposition: form-data; name="csrf"\r\n'
    unreadable = [
        ("application/x-www-form-urlencoded; charset=x-bogus", f"csrf={csrf}&token=x".encode()),
        ("multipart/form-data", f"csrf={csrf}&token=x".encode()),
        ("application/x-www-form-urlencoded", f"csrf={csrf}&token=\xe9".encode("latin-1")),
        (
            "multipart/form-data; boundary=b",
            f"--b\r\n{part}Content-Transfer-Encoding: x\r\n\r\n{csrf}\r\n--b--".encode(),
        ),
    ]
    for path in ("/admin/login", "/admin/failures/jobs/1/replay"):
        for content_type, body in unreadable:
            headers = {"Cookie": f"{COOKIE}={v.cookie}", "Content-Type": content_type}
            response = await d.client.post(path, data=body, headers=headers, allow_redirects=False)
            assert (response.status, response.content_type) == (400, "text/html"), (path, content_type)
