"""Consent decided by the latest statement, whatever order webhooks arrive in, with evidence.

Each scenario goes through real HTTP into the real app (SQLite and PostgreSQL): signed
webhooks from Shopify, Mailchimp, Mandrill and Twilio, and the one-click unsubscribe link
taken from an e-mail a real SMTP server received.
"""

from __future__ import annotations

import base64
import copy
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest

from conftest import SECRET, TEMPLATES, Deployment, Factory, fixture_bytes, fixture_json
from declic_gateway.config import load_config
from declic_gateway.errors import ConfigError
from declic_gateway.http.app import create_app, load
from declic_gateway.http.running import GATEWAY_KEY
from declic_gateway.kit.events import ConsentStatement
from declic_gateway.pipeline import contacts
from declic_gateway.pipeline.consent import PENDING_REASON, rule_on
from declic_gateway.plugins import collect, get_plugin_manager
from declic_gateway.store.inbox import NewCall
from declic_gateway.testing import FakeClock, SmtpCatcher, write_deployment
from declic_plugins.mandrill import sign as mandrill_sign
from declic_plugins.twilio_status import signatures as twilio_signatures

MC_TOKEN = "mc-url-token-0123456789"
MANDRILL_KEY = "mandrill-key"
TWILIO_TOKEN = "twilio-auth-token"
PUBLIC = "https://hooks.example.com"
NEW_ADDRESS = "c.durand@another-company.example"

CONFIG = """\
public_url: {public}
timezone: Europe/Paris
storage: {{url: '{db_url}'}}
sources:
  shop: {{plugin: shopify, secret: {secret}}}
  mc: {{plugin: mailchimp, url_token: {mc}}}
  mail: {{plugin: mandrill, webhook_key: {mandrill}}}
  sms: {{plugin: twilio_status, auth_token: {twilio}}}
sinks:
  email: {{plugin: smtp, host: 127.0.0.1, port: {smtp_port}, tls: none, sender: "Boutique <shop@example.com>"}}
{policies}rules:
  - name: abandoned-cart
    when: checkout.started
    steps:
      - wait: 1h
        send: {{via: email, template: cart-reminder}}
"""


@pytest.fixture
async def consent_deploy(aiohttp_client: Any, tmp_path: Path, db_url: str, smtp: SmtpCatcher) -> AsyncIterator[Factory]:
    async def start(policies: str = "policies: {consent: {email: required}}\n") -> Deployment:
        text = CONFIG.format(
            public=PUBLIC,
            db_url=db_url,
            secret=SECRET,
            mc=MC_TOKEN,
            mandrill=MANDRILL_KEY,
            twilio=TWILIO_TOKEN,
            smtp_port=smtp.port,
            policies=policies,
        )
        settings, pm, _ = load(str(write_deployment(tmp_path, text, TEMPLATES)))
        clock = FakeClock(datetime(2026, 3, 14, 8, 0, tzinfo=UTC))
        app = create_app(settings, pm=pm, clock=clock, role="web")
        client = await aiohttp_client(app)
        return Deployment(client, app[GATEWAY_KEY], clock, tmp_path)

    yield start


def checkout(token: str, consent: dict[str, Any] | None = None) -> bytes:
    """Camille's checkout; her customer snapshot says `subscribed`, as of 2 January, unless told otherwise."""
    body = fixture_json("shopify/checkout.json")
    body.update(token=token, id=abs(hash(token)) % 10**9)
    if consent is not None:
        body["customer"]["email_marketing_consent"] = consent
    return json.dumps(body).encode()


def customer_update(state: str, stated: str | None) -> bytes:
    body = copy.deepcopy(fixture_json("shopify/checkout.json")["customer"])
    body["email_marketing_consent"] = {"state": state, "opt_in_level": "single_opt_in", "consent_updated_at": stated}
    return json.dumps(body).encode()


async def mailchimp(d: Deployment, kind: str, fired_at: str) -> None:
    form = fixture_bytes(f"mailchimp/{kind}.form").decode()
    form = "&".join(p if not p.startswith("fired_at=") else urlencode({"fired_at": fired_at}) for p in form.split("&"))
    response = await d.client.post(
        f"/hooks/mc/{MC_TOKEN}", data=form.encode(), headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert response.status == 200, await response.text()


async def mandrill_unsubscribe(d: Deployment, email: str, at: datetime) -> None:
    item = {"event": "unsub", "_id": uuid.uuid4().hex, "ts": int(at.timestamp()), "msg": {"email": email, "_id": "m1"}}
    fields = {"mandrill_events": json.dumps([item])}
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Mandrill-Signature": mandrill_sign(MANDRILL_KEY, f"{PUBLIC}/hooks/mail", fields),
    }
    response = await d.client.post("/hooks/mail", data=urlencode(fields).encode(), headers=headers)
    assert response.status == 200, await response.text()


async def twilio_stop(d: Deployment, phone: str) -> None:
    params = [("MessageSid", "SM" + uuid.uuid4().hex), ("From", phone), ("To", "+33700000000"), ("Body", "STOP")]
    signature = twilio_signatures(TWILIO_TOKEN, f"{PUBLIC}/hooks/sms", params)[0].decode()
    headers = {"Content-Type": "application/x-www-form-urlencoded", "X-Twilio-Signature": signature}
    response = await d.client.post("/hooks/sms", data=urlencode(params).encode(), headers=headers)
    assert response.status == 200, await response.text()


async def unsubscribe_from_mail(d: Deployment, smtp: SmtpCatcher) -> str:
    """Follow the one-click link of the last e-mail, as Gmail does: a POST from its own user agent."""
    link = str(smtp.messages[-1]["List-Unsubscribe"]).strip()[1:-1]
    response = await d.client.post(
        urlsplit(link).path, data={"List-Unsubscribe": "One-Click"}, headers={"User-Agent": "GoogleOneClick/1.0"}
    )
    assert response.status == 200
    await d.advance(seconds=1)
    return link


def email_consent(d: Deployment) -> str:
    return json.loads(d.scalar("SELECT consent FROM contacts WHERE email = 'camille.durand@example.org'"))["email"][
        "state"
    ]


def ledger(d: Deployment) -> list[tuple[str, str, bool, str]]:
    rows = d.rows("SELECT source, state, applied, reason FROM consents WHERE channel = 'email' ORDER BY id")
    return [(r.source, r.state, bool(r.applied), r.reason) for r in rows]


async def test_a_later_checkout_does_not_undo_a_one_click_unsubscribe(
    consent_deploy: Factory, smtp: SmtpCatcher
) -> None:
    d = await consent_deploy()
    await d.post_shopify("checkouts/create", checkout("first"))
    await d.advance(hours=1, seconds=1)
    assert len(smtp.messages) == 1  # the reminder, granted by the checkout's snapshot
    await unsubscribe_from_mail(d, smtp)
    assert email_consent(d) == "withdrawn"
    await d.post_shopify("checkouts/create", checkout("second"))  # the same stale `subscribed` snapshot
    await d.post_shopify("orders/create", fixture_bytes("shopify/order.json"))
    await d.post_shopify("customers/update", customer_update("subscribed", "2026-01-02T10:00:00+01:00"))
    await d.advance(hours=2)
    assert email_consent(d) == "withdrawn"
    assert len(smtp.messages) == 1, "the second cart reminder went to a contact who unsubscribed"
    assert d.scalar("SELECT reason FROM decisions WHERE action = 'suppressed'") == "no email consent (state: withdrawn)"
    sources_and_outcomes = [(source, applied) for source, _, applied, _ in ledger(d)]
    assert sources_and_outcomes == [
        ("shop", True),
        ("~unsubscribe", True),
        ("shop", False),
        ("shop", False),
        ("shop", False),
    ]


async def test_the_unsubscribe_ledger_row_shows_who_clicked_and_when(
    consent_deploy: Factory, smtp: SmtpCatcher
) -> None:
    d = await consent_deploy()
    await d.post_shopify("checkouts/create", checkout("first"))
    await d.advance(hours=1, seconds=1)
    await unsubscribe_from_mail(d, smtp)
    [row] = d.rows("SELECT * FROM consents WHERE source = '~unsubscribe'")
    evidence = json.loads(row.evidence)
    assert evidence["ip"] == "127.0.0.1" and evidence["user_agent"] == "GoogleOneClick/1.0"
    assert evidence["event"] == "email.unsubscribed" and evidence["inbox_id"] > 0
    assert bool(row.action) and bool(row.applied) and row.stated_at is not None and row.received_at is not None


async def test_a_delayed_shopify_update_loses_to_the_newer_one(consent_deploy: Factory) -> None:
    d = await consent_deploy()
    await d.post_shopify("customers/update", customer_update("unsubscribed", "2026-03-10T10:00:00+01:00"))
    await d.post_shopify("customers/update", customer_update("subscribed", "2026-03-01T10:00:00+01:00"))
    await d.advance(seconds=1)
    assert email_consent(d) == "withdrawn"
    assert ledger(d)[-1][2:] == (
        False,
        "not newer than the statement in force (withdrawn, stated 2026-03-10 09:00:00 UTC)",
    )


async def test_a_late_mailchimp_subscribe_does_not_undo_a_newer_unsubscribe(consent_deploy: Factory) -> None:
    d = await consent_deploy()
    await mailchimp(d, "unsubscribe", "2026-03-14 09:30:00")
    await mailchimp(d, "subscribe", "2026-03-14 09:12:40")  # retried by Mailchimp, reaches us last
    await d.advance(seconds=1)
    assert email_consent(d) == "withdrawn"
    [row] = d.rows("SELECT evidence FROM consents WHERE state = 'granted'")
    assert json.loads(row.evidence)["ip_opt"] == "203.0.113.7"  # the opt-in's evidence is kept, unapplied


async def test_a_mandrill_unsubscribe_is_not_undone_by_an_older_shopify_state(consent_deploy: Factory) -> None:
    d = await consent_deploy()
    await d.post_shopify("customers/update", customer_update("subscribed", "2026-01-02T10:00:00+01:00"))
    await mandrill_unsubscribe(d, "camille.durand@example.org", datetime(2026, 3, 14, 7, 0, tzinfo=UTC))
    await d.post_shopify("customers/update", customer_update("subscribed", "2026-01-02T10:00:00+01:00"))
    await d.advance(seconds=1)
    assert email_consent(d) == "withdrawn"


async def test_a_twilio_stop_is_not_undone_by_an_older_shopify_sms_state(consent_deploy: Factory) -> None:
    d = await consent_deploy()
    d.clock.set(datetime(2026, 3, 22, 8, 0, tzinfo=UTC))
    await twilio_stop(d, "+33698765432")
    await d.post_shopify("customers/marketing_consent/update", fixture_bytes("shopify/sms_consent_update.json"))
    await d.advance(seconds=1)
    states = json.loads(d.scalar("SELECT consent FROM contacts WHERE phone = '+33698765432'"))
    assert states["sms"]["state"] == "withdrawn"


async def test_an_unsubscribe_reaches_the_contact_that_holds_the_address(
    consent_deploy: Factory, smtp: SmtpCatcher
) -> None:
    """Shopify first makes Camille a contact by her customer id and number (an SMS opt-in), and Mailchimp
    another by her e-mail address, which Declic cannot tell is hers. Shopify's customer update, found by
    the customer id, unsubscribes that address: the withdrawal goes to the contact that holds the address,
    the one her guest checkout reaches, and no reminder is sent."""
    d = await consent_deploy()
    sms_opt_in = json.loads(fixture_bytes("shopify/sms_consent_update.json")) | {"id": 5550001, "phone": "+33612345678"}
    await d.post_shopify("customers/marketing_consent/update", json.dumps(sms_opt_in).encode())
    await mailchimp(d, "subscribe", "2026-03-14 09:12:40")
    await d.post_shopify("customers/update", customer_update("unsubscribed", "2026-03-14T11:00:00+01:00"))
    guest = json.loads(checkout("guest"))
    del guest["customer"]
    await d.post_shopify("checkouts/create", json.dumps(guest).encode())
    await d.advance(hours=1, seconds=1)
    assert smtp.messages == [], "the cart reminder went to an address Shopify had unsubscribed"
    assert email_consent(d) == "withdrawn"
    assert [tuple(row) for row in d.rows("SELECT email, phone FROM contacts ORDER BY id")] == [
        (None, "+33612345678"),  # the customer update's e-mail address is not given to it: another holds it
        ("camille.durand@example.org", None),
    ]
    assert [row[:3] for row in ledger(d)] == [("mc", "granted", True), ("shop", "withdrawn", True)]


async def test_a_newer_statement_wins_whatever_the_arrival_order(consent_deploy: Factory) -> None:
    d = await consent_deploy()
    await d.post_shopify("customers/update", customer_update("unsubscribed", "2026-03-01T10:00:00+01:00"))
    await d.post_shopify("customers/update", customer_update("subscribed", "2026-03-10T10:00:00+01:00"))
    await d.advance(seconds=1)
    assert email_consent(d) == "granted"


async def test_a_withdrawal_stops_marketing_even_where_consent_is_not_required(
    consent_deploy: Factory, smtp: SmtpCatcher
) -> None:
    d = await consent_deploy(policies="")
    await mandrill_unsubscribe(d, "camille.durand@example.org", datetime(2026, 3, 14, 7, 0, tzinfo=UTC))
    await d.post_shopify("checkouts/create", checkout("first", consent={"state": "not_subscribed"}))
    await d.advance(hours=1, seconds=1)
    assert smtp.messages == []


@pytest.mark.parametrize("shopify_state", ["not_subscribed", "pending"])
async def test_only_a_grant_lifts_an_unsubscribe(
    consent_deploy: Factory, smtp: SmtpCatcher, shopify_state: str
) -> None:
    """No policy: marketing goes where nobody said no. After the one-click unsubscribe, Shopify reports the
    customer as not subscribed, or pending (its own double opt-in, not confirmed), dated later: nobody granted
    anything, the withdrawal stands."""
    d = await consent_deploy(policies="")
    await d.post_shopify("checkouts/create", checkout("first"))
    await d.advance(hours=1, seconds=1)
    assert len(smtp.messages) == 1
    await unsubscribe_from_mail(d, smtp)
    later = {"state": shopify_state, "opt_in_level": "confirmed_opt_in", "consent_updated_at": "2026-03-14T12:00:00Z"}
    d.clock.set(datetime(2026, 3, 14, 12, 0, 5, tzinfo=UTC))
    await d.post_shopify("checkouts/create", checkout("second", consent=later))
    await d.advance(hours=1, seconds=1)
    assert len(smtp.messages) == 1, "marketing resumed to a person who unsubscribed and never granted again"
    assert email_consent(d) == "withdrawn"
    state = {"not_subscribed": "none", "pending": "pending"}[shopify_state]
    assert ledger(d)[-1] == ("shop", state, False, f"a withdrawal is lifted only by a grant, not by {state!r}")
    # A grant made after it still lifts it.
    await d.post_shopify("customers/update", customer_update("subscribed", "2026-03-14T13:10:00Z"))
    await d.advance(seconds=1)
    assert email_consent(d) == "granted"


async def test_a_grant_dated_ahead_of_its_arrival_does_not_outrank_a_later_unsubscribe(
    consent_deploy: Factory, smtp: SmtpCatcher
) -> None:
    """Shopify's clock runs a minute ahead of Declic's: the customer ticks "email me", then, 20 seconds later
    by Declic's clock but 40 seconds before the time Shopify gave the grant, follows the unsubscribe link."""
    d = await consent_deploy()
    await d.post_shopify("checkouts/create", checkout("first"))
    await d.advance(hours=1, seconds=1)
    assert len(smtp.messages) == 1
    d.clock.set(datetime(2026, 3, 14, 9, 0, 10, tzinfo=UTC))
    await d.post_shopify("customers/update", customer_update("subscribed", "2026-03-14T09:01:10Z"))
    await d.advance(seconds=1)
    d.clock.set(datetime(2026, 3, 14, 9, 0, 30, tzinfo=UTC))
    await unsubscribe_from_mail(d, smtp)
    assert email_consent(d) == "withdrawn", ledger(d)[-1]
    # The grant counts as made when it arrived; the time Shopify gave is kept for the auditor.
    [grant] = d.rows(
        "SELECT stated_at, evidence FROM consents WHERE source = 'shop' AND channel = 'email' ORDER BY id DESC LIMIT 1"
    )
    assert str(grant.stated_at)[:19] == "2026-03-14 09:00:10"
    assert json.loads(grant.evidence)["stated_at_given"] == "2026-03-14T09:01:10+00:00"


async def test_an_undated_withdrawal_stands_against_grants_made_before_it_arrived(
    consent_deploy: Factory, smtp: SmtpCatcher
) -> None:
    """A checkout's customer says `unsubscribed` with no time (consent_updated_at null): in force, undated. A
    Mailchimp sign-up from 2025 (a failed call replayed after a fix) cannot tell it was made after that
    withdrawal, so it does not lift it; a sign-up made after the withdrawal reached Declic does."""
    d = await consent_deploy()
    undated_out = {"state": "unsubscribed", "opt_in_level": "single_opt_in", "consent_updated_at": None}
    await d.post_shopify("checkouts/create", checkout("first", consent=undated_out))
    await d.advance(seconds=1)
    assert email_consent(d) == "withdrawn"
    await mailchimp(d, "subscribe", "2025-06-01 10:00:00")
    await d.advance(seconds=1)
    await d.post_shopify("checkouts/create", checkout("second", consent=undated_out))
    await d.advance(hours=1, seconds=1)
    assert smtp.messages == [], ledger(d)
    assert ledger(d)[1][1:3] == ("granted", False)
    assert ledger(d)[1][3].startswith("the withdrawal in force gave no time and reached Declic at 2026-03-14 08:00:00")
    await mailchimp(d, "subscribe", "2026-03-14 09:30:00")
    await d.advance(seconds=1)
    assert email_consent(d) == "granted"


async def test_internal_sources_are_not_served_under_hooks(consent_deploy: Factory) -> None:
    d = await consent_deploy()
    for path in ("/hooks/~unsubscribe", "/hooks/%7Eunsubscribe"):
        response = await d.client.post(path, data=b"1.email")
        assert response.status == 404
    assert d.scalar("SELECT count(*) FROM inbox") == 0


async def test_a_declic_id_cannot_be_reserved_for_a_future_contact(consent_deploy: Factory, smtp: SmtpCatcher) -> None:
    """An unsubscribe naming a contact that does not exist yet fails; it creates nobody."""
    d = await consent_deploy()
    call = NewCall("~unsubscribe", "forged", d.clock.now(), {}, json.dumps({"contact": 1, "channel": "email"}).encode())
    await d.gateway.committer.submit(call)
    await d.advance(seconds=1)
    assert d.scalar("SELECT count(*) FROM contacts") == 0
    assert d.scalar("SELECT status FROM inbox") == "failed"
    await d.post_shopify("checkouts/create", checkout("first"))
    await d.advance(hours=1, seconds=1)
    assert d.scalar("SELECT value FROM identities WHERE kind = 'declic'") == str(
        d.scalar("SELECT id FROM contacts WHERE email = 'camille.durand@example.org'")
    )
    await unsubscribe_from_mail(d, smtp)
    assert email_consent(d) == "withdrawn"


async def test_unsubscribe_tokens_do_not_show_the_contact_id(consent_deploy: Factory, smtp: SmtpCatcher) -> None:
    d = await consent_deploy()
    await d.post_shopify("checkouts/create", checkout("first"))
    await d.advance(hours=1, seconds=1)
    token = str(smtp.messages[-1]["List-Unsubscribe"]).strip()[1:-1].rpartition("/")[2]
    decoded = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    assert b"email" not in decoded and b"1." not in decoded and "." not in token


@pytest.mark.parametrize(
    ("current", "statement", "applied", "reason"),
    [
        (None, ConsentStatement(state="granted"), True, "first statement on this channel"),
        (
            {"state": "withdrawn", "at": "2026-03-10T00:00:00+00:00"},
            ConsentStatement(state="granted"),
            False,
            "no stated time: a snapshot never overrides",
        ),
        (
            {"state": "granted", "at": None},
            ConsentStatement(state="withdrawn", stated_at=datetime(2026, 1, 1, tzinfo=UTC), action=True),
            True,
            "newer than the statement in force",
        ),
        (
            {"state": "granted", "at": "2026-03-10T00:00:00+00:00"},
            ConsentStatement(state="withdrawn", stated_at=datetime(2026, 3, 10, tzinfo=UTC)),
            True,
            "stated at the same time as the statement in force: a withdrawal wins a tie",
        ),
        (
            {"state": "withdrawn", "at": "2026-03-10T00:00:00+00:00"},
            ConsentStatement(state="granted", stated_at=datetime(2026, 3, 10, tzinfo=UTC), action=True),
            False,
            "stated at the same time as the statement in force, which it does not outrank",
        ),
        (
            {"state": "granted", "at": "2026-03-10T00:00:00"},  # stored by 0.1, without a zone: UTC
            ConsentStatement(state="granted", stated_at=datetime(2026, 3, 10, 1, tzinfo=UTC)),
            True,
            "restates the state in force",
        ),
        (
            {"state": "withdrawn", "at": "2026-03-10T00:00:00+00:00"},
            ConsentStatement(state="none", stated_at=datetime(2026, 3, 11, tzinfo=UTC)),
            False,
            "a withdrawal is lifted only by a grant, not by 'none'",
        ),
        (
            {"state": "withdrawn", "at": None, "received": "2026-03-10T00:00:00+00:00"},
            ConsentStatement(state="granted", stated_at=datetime(2026, 3, 9, tzinfo=UTC), action=True),
            False,
            "the withdrawal in force gave no time and reached Declic at 2026-03-10 00:00:00 UTC, after this "
            "statement was made",
        ),
        (
            {"state": "withdrawn", "at": None, "received": "2026-03-10T00:00:00+00:00"},
            ConsentStatement(state="granted", stated_at=datetime(2026, 3, 10, 0, 0, 1, tzinfo=UTC), action=True),
            True,
            "newer than the statement in force",
        ),
        (
            {"state": "withdrawn", "at": None},  # recorded before Declic kept the arrival: as before
            ConsentStatement(state="granted", stated_at=datetime(2026, 3, 9, tzinfo=UTC), action=True),
            True,
            "newer than the statement in force",
        ),
    ],
)
def test_rulings(current: dict[str, Any] | None, statement: ConsentStatement, applied: bool, reason: str) -> None:
    ruling = rule_on(current, "email", statement, "shop")
    assert (ruling.applied, ruling.reason) == (applied, reason)


MARKETING_EMAIL = """\
{head}storage: {{url: 'sqlite:///{folder}/d.db'}}
sinks:
  email: {{plugin: smtp, host: 127.0.0.1, port: 2525, tls: none, sender: shop@example.com}}
rules:
  - name: welcome
    when: customer.created
    send: {{via: email, template: welcome}}
"""


@pytest.mark.parametrize(
    ("head", "problem"),
    [
        ("", "declic.yaml:5:5: rules[0]: marketing e-mail (rule 'welcome') needs `public_url:`"),
        ("public_url: http://shop.example.com\n", "declic.yaml:1:13: public_url: marketing e-mail (rule 'welcome')"),
        (
            "public_url: shop.example.com\n",
            "declic.yaml:1:13: public_url: 'shop.example.com' is not an absolute",
        ),
    ],
)
def test_check_refuses_marketing_email_without_an_https_public_url(tmp_path: Path, head: str, problem: str) -> None:
    pm = get_plugin_manager()
    path = write_deployment(tmp_path, MARKETING_EMAIL.format(head=head, folder=tmp_path), TEMPLATES)
    with pytest.raises(ConfigError) as raised:
        load_config(path, collect(pm), pm)
    assert any(problem in line for line in raised.value.problems), raised.value.problems


def test_http_public_url_is_accepted_when_allowed_for_local_testing(tmp_path: Path) -> None:
    pm = get_plugin_manager()
    head = "public_url: http://127.0.0.1:8080\nallow_http_public_url: true\n"
    path = write_deployment(tmp_path, MARKETING_EMAIL.format(head=head, folder=tmp_path), TEMPLATES)
    assert load_config(path, collect(pm), pm).public_url == "http://127.0.0.1:8080"


def test_the_demo_marketing_mail_shows_its_unsubscribe_link_in_the_body() -> None:
    templates = Path(__file__).resolve().parents[1] / "config" / "templates"
    for name in ("welcome", "cart-reminder", "cart-last-call"):
        assert "{{ unsubscribe_url }}" in (templates / f"{name}.txt.j2").read_text()


DOUBLE_OPT_IN = """\
public_url: https://hooks.example.com
storage: {{url: '{db_url}'}}
sources:
  shop: {{plugin: shopify, secret: {secret}}}
  mc: {{plugin: mailchimp, url_token: {mc}}}
sinks:
  email: {{plugin: smtp, host: 127.0.0.1, port: {smtp_port}, tls: none, sender: "Boutique <shop@example.com>"}}
policies:
  consent: {{email: double_opt_in}}
  confirmation: {{via: email, template: confirm}}
rules:
  - name: abandoned-cart
    when: checkout.started
    steps:
      - wait: 1h
        send: {{via: email, template: cart-reminder}}
"""


@pytest.fixture
async def double_opt_in(aiohttp_client: Any, tmp_path: Path, db_url: str, smtp: SmtpCatcher) -> Deployment:
    text = DOUBLE_OPT_IN.format(db_url=db_url, secret=SECRET, mc=MC_TOKEN, smtp_port=smtp.port)
    templates = {**TEMPLATES, "confirm.subject.j2": "Please confirm", "confirm.txt.j2": "Confirm: {{ confirm_url }}"}
    settings, pm, _ = load(str(write_deployment(tmp_path, text, templates)))
    app = create_app(settings, pm=pm, clock=FakeClock(datetime(2026, 3, 14, 8, 0, tzinfo=UTC)), role="web")
    client = await aiohttp_client(app)
    return Deployment(client, app[GATEWAY_KEY], app[GATEWAY_KEY].clock, tmp_path)  # type: ignore[arg-type]


async def test_double_opt_in_grants_consent_only_once_the_link_is_followed(
    double_opt_in: Deployment, smtp: SmtpCatcher
) -> None:
    d = double_opt_in
    await mailchimp(d, "subscribe", "2026-03-14 07:59:00")  # a sign-up form: a grant, not yet confirmed
    await d.advance(seconds=1)
    assert email_consent(d) == "pending"
    [confirmation] = smtp.messages
    assert confirmation["Subject"] == "Please confirm" and confirmation["List-Unsubscribe"] is None
    link = confirmation.get_content().strip().removeprefix("Confirm: ")
    await d.post_shopify("checkouts/create", checkout("first"))  # the snapshot says subscribed: still pending
    await d.advance(hours=1, seconds=1)
    assert len(smtp.messages) == 1, "marketing went to a subscriber who had not confirmed"
    assert email_consent(d) == "pending"

    path = urlsplit(link).path
    assert path.startswith("/c/")
    page = await d.client.get(path)  # a link scanner's GET confirms nothing
    assert page.status == 200 and "Confirm" in await page.text()
    assert (await d.client.post(f"/u/{path.removeprefix('/c/')}")).status == 404  # not an unsubscribe token
    confirmed = await d.client.post(path, headers={"User-Agent": "Firefox/140"})
    assert confirmed.status == 200 and "confirmed" in await confirmed.text()
    await d.advance(seconds=1)
    assert email_consent(d) == "granted"
    [row] = d.rows("SELECT source, applied, evidence FROM consents WHERE source = '~confirm'")
    assert row.applied and json.loads(row.evidence)["user_agent"] == "Firefox/140"

    await d.post_shopify("checkouts/create", checkout("second"))
    await d.advance(hours=1, seconds=1)
    assert [m["Subject"] for m in smtp.messages] == ["Please confirm", "Your cart, Camille"]
    assert d.scalar("SELECT count(*) FROM deliveries WHERE rule = 'declic-double-opt-in'") == 1  # asked once


async def test_the_confirmation_link_of_an_erased_contact_is_gone_and_brings_nobody_back(
    double_opt_in: Deployment, smtp: SmtpCatcher
) -> None:
    """Camille asked to be erased before confirming: her link no longer confirms anything (410: for good), stores
    nothing about the click, and leaves no failed call behind."""
    d = double_opt_in
    await mailchimp(d, "subscribe", "2026-03-14 07:59:00")
    await d.advance(seconds=1)
    path = urlsplit(smtp.messages[0].get_content().strip().removeprefix("Confirm: ")).path
    [(contact_id,)] = d.rows("SELECT id FROM contacts")
    await d.gateway.db.run(contacts.erase, contact_id, d.clock.now())
    ledger = d.scalar("SELECT count(*) FROM consents")

    page = await d.client.get(path)
    confirmed = await d.client.post(path, headers={"User-Agent": "Firefox/140"})
    await d.advance(seconds=1)

    assert d.rows("SELECT source, status FROM inbox WHERE source = '~confirm' OR status = 'failed'") == []
    assert d.rows("SELECT id, email, email_status FROM contacts") == [(contact_id, None, "erased")]
    assert (d.scalar("SELECT count(*) FROM identities"), d.scalar("SELECT count(*) FROM consents")) == (0, ledger)
    assert confirmed.status == 410 and "no longer valid" in await confirmed.text()
    assert page.status == 410 and "no longer valid" in await page.text()


async def test_a_confirmed_grant_does_not_follow_the_contact_to_a_new_address(
    double_opt_in: Deployment, smtp: SmtpCatcher
) -> None:
    """Camille confirms camille.durand@; then the shop moves her customer record to another address. That
    address confirmed nothing: the grant stays with the old one, and the shop's `subscribed` for the new one
    waits for its own confirmation, sent there."""
    d = double_opt_in
    await mailchimp(d, "subscribe", "2026-03-14 07:59:00")
    await d.advance(seconds=1)
    link = smtp.messages[0].get_content().strip().removeprefix("Confirm: ")
    assert (await d.client.post(urlsplit(link).path)).status == 200
    await d.post_shopify("customers/update", customer_update("subscribed", "2026-01-02T10:00:00+01:00"))
    await d.advance(seconds=1)
    assert email_consent(d) == "granted"
    moved = json.loads(customer_update("subscribed", "2026-01-02T10:00:00+01:00")) | {"email": NEW_ADDRESS}
    await d.post_shopify("customers/update", json.dumps(moved).encode())
    await d.advance(seconds=1)
    cart = json.loads(checkout("cart"))
    cart["email"] = cart["customer"]["email"] = NEW_ADDRESS
    await d.post_shopify("checkouts/create", json.dumps(cart).encode())
    await d.advance(hours=1, seconds=1)
    assert [(str(m["To"]), str(m["Subject"])) for m in smtp.messages] == [
        ("camille.durand@example.org", "Please confirm"),
        (NEW_ADDRESS, "Please confirm"),
    ], "marketing went to an address that never confirmed"
    consent = json.loads(d.scalar("SELECT consent FROM contacts WHERE email = :e", e=NEW_ADDRESS))
    assert consent["email"]["state"] == "pending"
    reason = f"the email changed: {PENDING_REASON} at the new one"
    assert ("shop", "granted", True, reason) in ledger(d)


async def test_a_withdrawal_follows_the_contact_to_a_new_address(double_opt_in: Deployment) -> None:
    d = double_opt_in
    await mailchimp(d, "unsubscribe", "2026-03-14 07:59:00")
    await d.post_shopify("customers/update", customer_update("unsubscribed", None))
    moved = json.loads(customer_update("unsubscribed", None)) | {"email": NEW_ADDRESS}
    await d.post_shopify("customers/update", json.dumps(moved).encode())
    await d.advance(seconds=1)
    consent = json.loads(d.scalar("SELECT consent FROM contacts WHERE email = :e", e=NEW_ADDRESS))
    assert consent["email"]["state"] == "withdrawn"


def test_double_opt_in_needs_its_confirmation_message(tmp_path: Path) -> None:
    pm = get_plugin_manager()
    text = DOUBLE_OPT_IN.format(db_url=f"sqlite:///{tmp_path}/d.db", secret=SECRET, mc=MC_TOKEN, smtp_port=2525)
    path = write_deployment(tmp_path, text, TEMPLATES)  # no confirm template
    with pytest.raises(ConfigError) as raised:
        load_config(path, collect(pm), pm)
    assert any("policies.confirmation.template: template confirm.txt.j2 not found" in p for p in raised.value.problems)
