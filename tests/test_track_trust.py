"""The site's public write key against its secret key, through real HTTP into the real app.

The write key is in every page, so anyone may sign with it: what it signs may name a contact and
add to it, never move its address. A cart reminder, recovery link included, is received by a
real SMTP server (SQLite and PostgreSQL).
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from conftest import SECRET, TEMPLATES, Deployment, Factory, fixture_bytes
from declic_gateway.http.app import create_app, load
from declic_gateway.http.running import GATEWAY_KEY
from declic_gateway.testing import FakeClock, SmtpCatcher, write_deployment

WRITE_KEY = "site-write-key"
SECRET_KEY = "site-secret-key-for-servers"
VICTIM = "camille.durand@example.org"
MALLORY = "mallory@attacker.example"

CONFIG = """\
public_url: https://hooks.example.com
timezone: Europe/Paris
storage: {{url: '{db_url}'}}
sources:
  shop: {{plugin: shopify, secret: {secret}}}
  site: {{plugin: track, write_key: {write_key}, secret_key: {secret_key}}}
sinks:
  email: {{plugin: smtp, host: 127.0.0.1, port: {smtp_port}, tls: none, sender: "Boutique <shop@example.com>"}}
policies: {{consent: {{email: required}}}}
rules:
  - name: abandoned-cart
    when: checkout.started
    steps:
      - wait: 1h
        send: {{via: email, template: cart-reminder}}
"""


@pytest.fixture
async def site(aiohttp_client: Any, tmp_path: Path, db_url: str, smtp: SmtpCatcher) -> AsyncIterator[Factory]:
    async def start() -> Deployment:
        text = CONFIG.format(
            db_url=db_url, secret=SECRET, write_key=WRITE_KEY, secret_key=SECRET_KEY, smtp_port=smtp.port
        )
        settings, pm, _ = load(str(write_deployment(tmp_path, text, TEMPLATES)))
        clock = FakeClock(datetime(2026, 3, 14, 8, 0, tzinfo=UTC))
        app = create_app(settings, pm=pm, clock=clock, role="web")
        return Deployment(await aiohttp_client(app), app[GATEWAY_KEY], clock, tmp_path)

    yield start


def basic(user: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:".encode()).decode()


async def identify(d: Deployment, traits: dict[str, Any], signed: str, **fields: Any) -> None:
    """An identify call, signed as a page does (`writeKey` in the body) or as a server does (Basic)."""
    message = {"type": "identify", "anonymousId": "mallory-browser", "messageId": uuid.uuid4().hex, "traits": traits}
    message.update(fields)
    headers = {"Content-Type": "text/plain"}
    if signed == "page":
        message["writeKey"] = WRITE_KEY
    else:
        headers["Authorization"] = basic({"server, write key": WRITE_KEY, "server, secret key": SECRET_KEY}[signed])
    response = await d.client.post("/hooks/site", data=json.dumps(message).encode(), headers=headers)
    assert response.status == 200, await response.text()
    await d.advance(seconds=1)


async def abandoned_cart(d: Deployment) -> None:
    response = await d.post_shopify("checkouts/create", fixture_bytes("shopify/checkout.json"))
    assert response.status == 200
    await d.advance(seconds=1)


def reminders(smtp: SmtpCatcher) -> list[tuple[list[str], str]]:
    """Who each e-mail went to, and whether it held the checkout's recovery link."""
    texts = [str(part.get_content()) for m in smtp.messages if (part := m.get_body(("plain",))) is not None]
    return [(rcpts, "recover?key=k1" in text) for (_, rcpts), text in zip(smtp.envelopes, texts, strict=True)]


@pytest.mark.parametrize("signed", ["page", "server, write key"])
async def test_two_identify_calls_with_the_write_key_do_not_take_over_a_contact(
    site: Factory, smtp: SmtpCatcher, signed: str
) -> None:
    d = await site()
    await abandoned_cart(d)
    await identify(d, {"email": VICTIM}, signed)  # names Camille: the attacker's browser id now points to her
    await identify(d, {"email": MALLORY, "phone": "+33700000666", "firstName": "Cam"}, signed)
    await d.advance(hours=1, seconds=1)
    assert reminders(smtp) == [([VICTIM], True)]
    [contact] = d.rows("SELECT id, email, phone, first_name FROM contacts")
    assert (contact.email, contact.phone, contact.first_name) == (VICTIM, "+33612345678", "Cam")  # traits: yes
    assert d.rows("SELECT kind, value FROM identities WHERE value IN (:m, :p)", m=MALLORY, p="+33700000666") == []


async def test_the_same_identify_with_the_secret_key_changes_the_address(site: Factory, smtp: SmtpCatcher) -> None:
    d = await site()
    await abandoned_cart(d)
    await identify(d, {"email": VICTIM}, "page")
    await identify(d, {"email": MALLORY}, "server, secret key")  # the site's server: she changed her address
    await d.advance(hours=1, seconds=1)
    assert reminders(smtp) == [([MALLORY], True)]
    assert d.scalar("SELECT email FROM contacts") == MALLORY


WRONG = [
    ("wrong basic user", {"Authorization": basic("site-secret-key-for-serverS")}, {}),
    ("the secret key in the body", {}, {"writeKey": SECRET_KEY}),
    ("the secret key in the body, write key as basic password", {"Authorization": "Basic " + base64.b64encode(
        f":{WRITE_KEY}".encode()).decode()}, {"writeKey": SECRET_KEY}),
    ("wrong writeKey", {}, {"writeKey": "site-write-kez"}),
]  # fmt: skip


@pytest.mark.parametrize(("case", "headers", "fields"), WRONG, ids=[w[0] for w in WRONG])
async def test_a_wrong_key_is_401_and_nothing_is_stored(
    site: Factory, case: str, headers: dict[str, str], fields: dict[str, str]
) -> None:
    d = await site()
    message = {"type": "identify", "userId": "cus_1042", "traits": {"email": MALLORY}, **fields}
    response = await d.client.post("/hooks/site", data=json.dumps(message).encode(), headers=headers)
    assert response.status == 401
    assert "key" in (await response.json())["error"]
    assert d.scalar("SELECT count(*) FROM inbox") == 0


# --- identify's consent traits: `consent: {email: required}` now lets the site's opt-in count ------------

PAGE_URL = "https://boutique.example/newsletter"
SIGNUP = {"ip": "203.0.113.9", "userAgent": "Mozilla/5.0 (Macintosh) Safari/605.1.15", "page": {"url": PAGE_URL}}
OPT_IN = {
    "email": VICTIM,
    "consent": {"email": {"state": "granted", "at": "2026-03-14T07:30:00Z"}, "push": "granted"},
    "consent_text_version": "newsletter-2026-03",
    "consent_form": "footer",
}


def checkout_without_consent() -> bytes:
    """Camille's checkout, her customer snapshot saying only `not_subscribed`, with no time of its own."""
    body = json.loads(fixture_bytes("shopify/checkout.json"))
    body["customer"]["email_marketing_consent"] = {"state": "not_subscribed", "consent_updated_at": None}
    return json.dumps(body).encode()


def consents(d: Deployment) -> dict[str, Any]:
    rows = d.rows("SELECT channel, state, applied, action, reason, stated_at, evidence FROM consents ORDER BY id")
    return {r.channel: {**r._asdict(), "evidence": json.loads(r.evidence)} for r in rows}


async def test_identify_consent_with_the_secret_key_is_recorded_with_its_evidence_and_lets_mail_go(
    site: Factory, smtp: SmtpCatcher
) -> None:
    d = await site()
    await identify(d, OPT_IN, "server, secret key", userId="cus_1042", context=SIGNUP, timestamp="2026-03-14T07:59:00Z")
    ledger = consents(d)
    assert {c: (r["state"], bool(r["applied"]), bool(r["action"])) for c, r in ledger.items()} == {
        "email": ("granted", True, True),
        "push": ("granted", True, True),
    }
    assert str(ledger["email"]["stated_at"])[:19] == "2026-03-14 07:30:00"  # the channel's own `at`
    assert str(ledger["push"]["stated_at"])[:19] == "2026-03-14 07:59:00"  # the message's timestamp
    evidence = ledger["email"]["evidence"]
    assert {k: evidence[k] for k in ("ip", "visitor_ip", "user_agent", "page_url", "text_version", "form")} == {
        "ip": "127.0.0.1",  # the caller: the site's server
        "visitor_ip": "203.0.113.9",  # the visitor, as the server library reports
        "user_agent": "Mozilla/5.0 (Macintosh) Safari/605.1.15",
        "page_url": PAGE_URL,
        "text_version": "newsletter-2026-03",
        "form": "footer",
    }
    assert evidence["signed_with"] == "secret key" and evidence["event"] == "profile.updated"
    assert evidence["webhook_id"].startswith("secret-key:message:") and evidence["inbox_id"] > 0
    states = json.loads(d.scalar("SELECT consent FROM contacts"))
    assert (states["email"]["state"], states["push"]["state"]) == ("granted", "granted")

    await d.post_shopify("checkouts/create", checkout_without_consent())
    await d.advance(hours=1, seconds=1)
    assert reminders(smtp) == [([VICTIM], True)]


async def test_a_new_visitors_opt_in_with_the_write_key_counts_and_is_dated_by_its_arrival(
    site: Factory, smtp: SmtpCatcher
) -> None:
    d = await site()
    await identify(d, OPT_IN, "page", context=SIGNUP, timestamp="2025-01-01T00:00:00Z")
    ledger = consents(d)
    assert bool(ledger["email"]["applied"]) and bool(ledger["push"]["applied"])
    assert str(ledger["email"]["stated_at"])[:19] == "2026-03-14 08:00:00"  # a page's clock dates nothing
    evidence = ledger["email"]["evidence"]
    assert evidence["ip"] == "127.0.0.1" and evidence["user_agent"] == SIGNUP["userAgent"]
    assert evidence["page_url"] == PAGE_URL and evidence["signed_with"] == "write key"
    assert "visitor_ip" not in evidence  # what a page says of its own IP proves nothing

    await d.post_shopify("checkouts/create", checkout_without_consent())
    await d.advance(hours=1, seconds=1)
    assert reminders(smtp) == [([VICTIM], True)]


REFUSED = "a public key cannot change an existing contact's consent: use the secret key or the provider"


@pytest.mark.parametrize(
    ("shopify_state", "stated", "in_force"),
    [("subscribed", "withdrawn", "granted"), ("unsubscribed", "granted", "withdrawn")],
)
async def test_the_write_key_cannot_change_an_existing_contacts_consent(
    site: Factory, shopify_state: str, stated: str, in_force: str
) -> None:
    d = await site()
    customer = json.loads(fixture_bytes("shopify/checkout.json"))["customer"]
    customer["email_marketing_consent"] = {"state": shopify_state, "consent_updated_at": "2026-01-02T10:00:00+01:00"}
    assert (await d.post_shopify("customers/update", json.dumps(customer).encode())).status == 200
    await d.advance(seconds=1)
    await identify(d, {"email": VICTIM, "consent": {"email": stated}}, "page", context=SIGNUP)
    rows = d.rows("SELECT state, applied, reason, evidence FROM consents WHERE channel = 'email' ORDER BY id")
    assert [(r.state, bool(r.applied), r.reason) for r in rows][1:] == [(stated, False, REFUSED)]
    assert json.loads(rows[1].evidence)["ip"] == "127.0.0.1"  # kept, unapplied, for whoever looks into it
    assert json.loads(d.scalar("SELECT consent FROM contacts"))["email"]["state"] == in_force


async def page_view(d: Deployment, browser: str = "mallory-browser") -> None:
    page = {"type": "page", "anonymousId": browser, "writeKey": WRITE_KEY, "context": SIGNUP}
    assert (await d.client.post("/hooks/site", data=json.dumps(page).encode())).status == 200
    await d.advance(seconds=1)


async def test_a_visitor_who_browsed_first_signs_up_from_the_page_and_gets_mail(
    site: Factory, smtp: SmtpCatcher
) -> None:
    """analytics.js's usual order: page views make the visitor a contact with no address, then the sign-up
    form's `identify` gives the e-mail and the opt-in, with the write key. That completes the contact as
    creating one would: the address and the evidenced grant count, and the cart reminder goes out."""
    d = await site()
    await page_view(d)
    await identify(d, OPT_IN, "page", context=SIGNUP)
    assert d.scalar("SELECT count(*) FROM contacts") == 1
    assert d.scalar("SELECT email FROM contacts") == VICTIM
    ledger = consents(d)
    assert (ledger["email"]["state"], bool(ledger["email"]["applied"])) == ("granted", True)
    assert ledger["email"]["evidence"]["signed_with"] == "write key"

    await d.post_shopify("checkouts/create", checkout_without_consent())
    await d.advance(hours=1, seconds=1)
    assert reminders(smtp) == [([VICTIM], True)]
    # Completed, the contact is an existing one: the write key can no longer move its address.
    await identify(d, {"email": MALLORY}, "page")
    assert d.scalar("SELECT email FROM contacts WHERE email IS NOT NULL") == VICTIM


async def test_a_visitor_cannot_take_an_address_another_contact_holds_with_the_write_key(
    site: Factory, smtp: SmtpCatcher
) -> None:
    """The address is Camille's (from her checkout): a browser that names it with the write key does not
    get it, nor changes her consent; her reminder still goes to her alone."""
    d = await site()
    await abandoned_cart(d)
    await page_view(d, "other-browser")
    await identify(d, {"email": VICTIM, "consent": {"email": "withdrawn"}}, "page", anonymousId="other-browser")
    assert d.scalar("SELECT count(*) FROM contacts WHERE email = :e", e=VICTIM) == 1
    visitor = d.scalar("SELECT contact_id FROM identities WHERE value = 'other-browser'")
    assert d.rows("SELECT state, applied, reason FROM consents WHERE contact_id = :c", c=visitor) == [
        ("withdrawn", False, REFUSED)
    ]
    assert (
        json.loads(d.scalar("SELECT consent FROM contacts WHERE email = :e", e=VICTIM))["email"]["state"] == "granted"
    )
    await d.advance(hours=1, seconds=1)
    assert reminders(smtp) == [([VICTIM], True)]
