"""E-mail addresses from webhook to wire, through real HTTP, the real worker and a real SMTP server:
checked once on the way in, in ASCII form for an IDN domain, and never retried when they cannot work."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from structlog.testing import capture_logs

from conftest import Deployment, Factory, fixture_bytes
from declic_gateway import ContactRef, Event
from declic_gateway.pipeline.inbound import fit
from declic_gateway.testing import SmtpCatcher

IDN = "info@münchen.example"
IDN_ASCII = "info@xn--mnchen-3ya.example"
UMLAUT = "jörg@example.org"


def order(email: str) -> bytes:
    """The Shopify order fixture, placed by `email` (the order-confirmation rule sends at once)."""
    body = json.loads(fixture_bytes("shopify/order.json"))
    body["email"] = body["customer"]["email"] = email
    return json.dumps(body).encode()


async def confirm_order(d: Deployment, email: str) -> None:
    response = await d.post_shopify("orders/create", order(email))
    assert response.status == 200
    await d.advance(seconds=1)


@pytest.fixture
def utf8_smtp() -> Iterator[SmtpCatcher]:
    catcher = SmtpCatcher(smtputf8=True).start()
    yield catcher
    catcher.stop()


async def test_an_idn_address_is_stored_and_sent_in_ascii_form(deploy: Factory, smtp: SmtpCatcher) -> None:
    d = await deploy()
    await confirm_order(d, IDN)
    assert d.scalar("SELECT email FROM contacts") == IDN_ASCII
    assert d.rows("SELECT status, attempts FROM deliveries") == [("sent", 1)]
    assert smtp.envelopes == [("shop@example.com", [IDN_ASCII])]
    [mail] = smtp.messages
    assert [a.addr_spec for a in mail["To"].addresses] == [IDN_ASCII]


async def test_the_same_address_written_either_way_is_one_contact(deploy: Factory, smtp: SmtpCatcher) -> None:
    d = await deploy()
    await confirm_order(d, IDN)
    await d.post_shopify("orders/create", order(IDN_ASCII.upper()).replace(b"7001002003", b"7001002004"))
    await d.advance(seconds=1)
    assert d.scalar("SELECT count(*) FROM contacts") == 1
    assert [env[1] for env in smtp.envelopes] == [[IDN_ASCII], [IDN_ASCII]]


@pytest.mark.parametrize(
    "bad",
    ["camille.durand@example.org\r\nBcc: x@evil.example", "camille@@example.org", "camille@shop.local", "Camille"],
    ids=["CR/LF", "two @", "special-use domain", "no @"],
)
async def test_an_invalid_address_is_dropped_and_the_rest_of_the_call_kept(
    deploy: Factory, smtp: SmtpCatcher, bad: str
) -> None:
    d = await deploy()
    with capture_logs() as logs:
        await confirm_order(d, bad)
    assert d.scalar("SELECT status FROM inbox") == "processed"
    assert d.rows("SELECT email, first_name FROM contacts") == [(None, "Camille")]
    assert d.scalar("SELECT count(*) FROM events WHERE type = 'order.placed'") == 1
    [(status, reason)] = d.rows("SELECT status, reason FROM deliveries")
    assert (status, reason) == ("suppressed", "contact has no email address")
    assert smtp.messages == []
    [line] = [entry for entry in logs if entry["event"] == "invalid e-mail address dropped"]
    assert (line["field"], line["event_type"], line["source"]) == ("email", "order.placed", "shop")
    assert bad not in repr(logs) and bad.split("@")[0] not in repr(line), "addresses are personal data"


async def test_a_non_ascii_local_part_goes_out_over_smtputf8(deploy: Factory, utf8_smtp: SmtpCatcher) -> None:
    d = await deploy(smtp_port=utf8_smtp.port)
    await confirm_order(d, UMLAUT)
    assert d.rows("SELECT status, attempts FROM deliveries") == [("sent", 1)]
    assert utf8_smtp.envelopes == [("shop@example.com", [UMLAUT])]
    [raw] = utf8_smtp.raw
    assert f"\r\nTo: {UMLAUT}\r\n".encode() in raw, "the address itself, never an RFC 2047 encoded-word"
    [mail] = utf8_smtp.messages
    [to] = mail["To"].addresses
    assert (to.username, to.domain) == ("jörg", "example.org")


async def test_a_non_ascii_local_part_without_smtputf8_fails_once_for_good(deploy: Factory, smtp: SmtpCatcher) -> None:
    d = await deploy(max_attempts=12)
    await confirm_order(d, UMLAUT)
    await d.advance(hours=6)
    [(status, reason, attempts)] = d.rows("SELECT status, reason, attempts FROM deliveries")
    assert (status, attempts) == ("failed", 1) and "SMTPUTF8" in reason
    assert d.scalar("SELECT status FROM jobs WHERE kind = 'step'") == "dead"
    assert d.scalar("SELECT email_status FROM contacts") == "ok", "the address is fine; this server is not"
    assert smtp.messages == []


async def test_a_stored_address_with_cr_lf_is_invalid_at_send_time_not_retried(
    deploy: Factory, smtp: SmtpCatcher
) -> None:
    """Contacts stored before addresses were checked on the way in may hold anything."""
    d = await deploy(max_attempts=12)
    await d.post_shopify("checkouts/create", fixture_bytes("shopify/checkout.json"))
    await d.advance(minutes=1)  # the contact exists, the reminder is due in an hour
    stored = "camille.durand@example.org\r\nBcc: x@evil.example"
    with d.gateway.db.engine.begin() as conn:
        conn.execute(sa.text("UPDATE contacts SET email = :email"), {"email": stored})
    with capture_logs() as logs:
        await d.advance(hours=6)
    assert d.rows("SELECT status, reason, attempts FROM deliveries") == [
        ("address_invalid", "the recipient is not a valid e-mail address", 1)
    ]
    assert d.scalar("SELECT email_status FROM contacts") == "bouncing"
    assert smtp.messages == []
    assert "evil" not in repr(logs) and "camille" not in repr(logs), "addresses are personal data"


def test_the_previous_address_is_checked_the_same_way() -> None:
    """An address change finds the contact by the old address, which is stored in the same form."""
    ref = ContactRef(email=" zoe@münchen.example ", previous_email="zoe@@old.example")
    event = Event(type="profile.updated", occurred_at=datetime(2026, 3, 14, tzinfo=UTC), contact=ref)
    with capture_logs() as logs:
        fitted = fit(event).contact
    assert (fitted.email, fitted.previous_email) == ("zoe@xn--mnchen-3ya.example", None)
    assert [entry["field"] for entry in logs] == ["previous_email"]
