"""RFC 8058 one-click unsubscribe: the headers on marketing e-mail and the endpoint they point at."""

from __future__ import annotations

import json
from datetime import timedelta
from urllib.parse import urlsplit

import pytest

from conftest import Deployment, Factory, fixture_bytes, locked_inbox
from declic_gateway.cli import logs
from declic_gateway.insight.kpis import rule_kpis
from declic_gateway.pipeline import contacts
from declic_gateway.testing import SmtpCatcher

CUSTOMER = fixture_bytes("shopify/customer.json")  # customers/create with email consent: welcome (marketing)
ORDER = fixture_bytes("shopify/order.json")  # orders/create: order confirmation (transactional)


async def welcome_link(deploy: Factory, smtp: SmtpCatcher) -> tuple[Deployment, str]:
    d = await deploy()
    await d.post_shopify("customers/create", CUSTOMER)
    await d.advance(seconds=1)
    [mail] = smtp.messages
    header = str(mail["List-Unsubscribe"]).strip()  # folded after the colon: long lines are allowed to be
    assert header.startswith("<https://hooks.example.com/u/") and header.endswith(">")
    assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    return d, urlsplit(header[1:-1]).path


async def test_marketing_mail_carries_one_click_headers_transactional_does_not(
    deploy: Factory, smtp: SmtpCatcher
) -> None:
    d, _ = await welcome_link(deploy, smtp)
    await d.post_shopify("orders/create", ORDER)
    await d.advance(seconds=1)
    assert smtp.messages[1]["List-Unsubscribe"] is None


async def test_one_click_post_withdraws_consent_without_any_other_step(deploy: Factory, smtp: SmtpCatcher) -> None:
    d, path = await welcome_link(deploy, smtp)
    page = await d.client.get(path)
    assert page.status == 200 and '<form method="post">' in await page.text()
    assert (await d.client.head(path)).status == 200  # link checkers' HEAD changes nothing either
    assert d.scalar("SELECT consent FROM contacts").count("granted") == 1
    response = await d.client.post(
        path, data={"List-Unsubscribe": "One-Click"}, headers={"User-Agent": "Gmail one-click"}
    )
    assert response.status == 200 and "You are unsubscribed" in await response.text()
    await d.advance(seconds=1)
    assert d.rows("SELECT channel, state, source FROM consents ORDER BY id")[-1] == (
        "email",
        "withdrawn",
        "~unsubscribe",
    )
    assert d.scalar("SELECT type FROM events WHERE source = '~unsubscribe'") == "email.unsubscribed"
    # The link names the message it came in: the welcome rule's KPIs count the unsubscribe.
    assert d.rows("SELECT rule, feedback FROM deliveries") == [("welcome", "unsubscribed")]
    now = d.clock.now()
    [welcome] = await d.gateway.db.run(rule_kpis, ["welcome"], now - timedelta(days=1), now + timedelta(days=1))
    assert [(s.step, s.sent, s.unsubscribed) for s in welcome.steps] == [(1, 1, 1)]


async def test_a_forged_or_damaged_token_is_refused(deploy: Factory, smtp: SmtpCatcher) -> None:
    d, path = await welcome_link(deploy, smtp)
    token = path.removeprefix("/u/")
    flipped = token[:20] + ("A" if token[20] != "A" else "B") + token[21:]
    for forged in (flipped, token[:-2], token + "AA", "MjI.c2lnbmF0dXJl", "nonsense", "1.email"):
        response = await d.client.post(f"/u/{forged}")
        assert response.status == 404, forged
    assert d.scalar("SELECT count(*) FROM inbox WHERE source = '~unsubscribe'") == 0


async def test_the_endpoint_answers_503_with_retry_after_while_storage_is_unavailable(
    deploy: Factory, smtp: SmtpCatcher, db_url: str
) -> None:
    d, path = await welcome_link(deploy, smtp)
    with locked_inbox(db_url):
        response = await d.client.post(path, data={"List-Unsubscribe": "One-Click"})
        assert (response.status, response.headers["Retry-After"]) == (503, "5")
    again = await d.client.post(path, data={"List-Unsubscribe": "One-Click"})
    assert again.status == 200


async def test_an_unsubscribe_is_logged_by_contact_id_never_by_address(
    deploy: Factory, smtp: SmtpCatcher, capsys: pytest.CaptureFixture[str]
) -> None:
    logs.configure("info", redact=False, as_json=True)  # without redaction: the line itself holds no address
    try:
        d, path = await welcome_link(deploy, smtp)
        capsys.readouterr()
        assert (await d.client.post(path, data={"List-Unsubscribe": "One-Click"})).status == 200
        lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    finally:
        logs.reset()
    [line] = [line for line in lines if line["event"] == "unsubscribed"]
    (contact_id, email) = d.rows("SELECT id, email FROM contacts")[0]
    assert (line["contact_id"], line["channel"]) == (contact_id, "email")
    assert email not in json.dumps(lines)


async def test_an_erased_contacts_link_says_unsubscribed_and_keeps_nothing(deploy: Factory, smtp: SmtpCatcher) -> None:
    """An erased person may still click an old link: they see the usual page (nothing of them is kept to write
    to), and nothing is stored about them, nor fails in the lists operators watch: the stored call named a
    contact that no longer exists, and failed."""
    d, path = await welcome_link(deploy, smtp)
    [(contact_id,)] = d.rows("SELECT id FROM contacts")
    await d.gateway.db.run(contacts.erase, contact_id, d.clock.now())
    ledger = d.scalar("SELECT count(*) FROM consents")

    page = await d.client.get(path)
    response = await d.client.post(
        path, data={"List-Unsubscribe": "One-Click"}, headers={"User-Agent": "Gmail one-click"}
    )
    await d.advance(seconds=1)

    assert d.rows("SELECT source, status FROM inbox ORDER BY id") == [("shop", "erased")]
    assert d.scalar("SELECT count(*) FROM jobs WHERE status = 'dead'") == 0
    assert d.rows("SELECT id, email, email_status FROM contacts") == [(contact_id, None, "erased")]
    assert (d.scalar("SELECT count(*) FROM identities"), d.scalar("SELECT count(*) FROM consents")) == (0, ledger)
    assert response.status == 200 and "You are unsubscribed" in await response.text()
    assert page.status == 200 and "You are unsubscribed" in await page.text()
