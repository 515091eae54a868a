"""Property: over 10,000 random consent timelines, no marketing message goes out on a channel while the
latest consent statement received on that channel was a withdrawal or none.

Each timeline is one person (most have a phone number) and a few calls from every source that carries
consent, each a real payload normalised by its plugin:
- e-mail: Shopify customer snapshots (dated by consent_updated_at, or undated) and consent updates,
  Mailchimp subscribe/unsubscribe (fired_at), Mandrill unsubscribes (ts), the site's `identify` signed
  with the secret key, Declic's own unsubscribe link (dated on arrival), and HubSpot: changes of a
  consent property (hs_email_optout, or a newsletter_opt_in the config names) and of another property,
  after each of which the plugin fetches the contact from a fake CRM v3 API (a real aiohttp server on
  127.0.0.1, tests/fake_hubspot.py). It answers the record as HubSpot held it at that change: consent
  properties dated by their history, hours old when the value was set long before (stale snapshots),
  or undated when the answer leaves the history out. HubSpot also changes consent without notifying.
- SMS: Twilio STOP and START replies, in any case, with and without Advanced Opt-Out (dated on
  arrival), Shopify SMS consent updates and the sms_marketing_consent of its customer snapshots.
A checkout starts a marketing e-mail and, when the person has a phone, a marketing SMS, under
`policies.consent: {email: required, sms: required}`. Calls arrive late and out of order, and run
through the real router, scheduler and send-time checks under a fake clock (the machinery of
`declic simulate`, with recording sinks). They go straight to the inbox, as after verification
(signatures are tested per source). Set DECLIC_PROPERTY_SEED to replay another draw.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import sqlalchemy as sa
import structlog

from declic_gateway.cli.simulate import RecordingSink, TimelineItem, run_until, timeline_source
from declic_gateway.config import load_config
from declic_gateway.http.app import build_gateway
from declic_gateway.kit.clock import FakeClock
from declic_gateway.plugins import collect, get_plugin_manager
from declic_gateway.store import CONTACTS, DECISIONS
from declic_gateway.store.inbox import NewCall, commit_calls
from declic_gateway.testing import write_deployment
from fake_hubspot import FakeHubSpot, contact_record, property_change, serving

TIMELINES = int(os.environ.get("DECLIC_PROPERTY_TIMELINES", "10000"))
START = datetime(2026, 5, 1, 8, 0, tzinfo=UTC)
#: Arrivals fall on whole minutes and steps on half minutes: no send shares a moment with an arrival.
STEP_WAIT = timedelta(minutes=30, seconds=30)
HUBSPOT_TOKEN = "pat-eu1-property-test"
PORTAL = 7700001
SHOPIFY_IDS, HUBSPOT_IDS = 10**6, 5 * 10**6
CONFIG = """\
public_url: https://hooks.example.com
storage: {{url: 'sqlite:///{folder}/property.db'}}
sources:
  shop: {{plugin: shopify, secret: shop-secret}}
  mc: {{plugin: mailchimp, url_token: mailchimp-url-token}}
  mail: {{plugin: mandrill, webhook_key: mandrill-key}}
  site: {{plugin: track, write_key: site-write-key, secret_key: site-secret-key-0123456789}}
  crm:
    plugin: hubspot
    client_secret: hubspot-client-secret
    app_token: {token}
    api_base: '{api}'
    consent:
      - {{property: newsletter_opt_in, granted: ['true'], withdrawn: ['false']}}
  sms: {{plugin: twilio_status, auth_token: twilio-auth-token}}
sinks:
  email: {{plugin: smtp, host: 127.0.0.1, port: 9, tls: none, sender: shop@example.com}}
  text:
    plugin: twilio
    account_sid: AC0123456789abcdef0123456789abcdef
    auth_token: twilio-auth-token
    sender: '+33700000000'
    api_base: 'http://127.0.0.1:9'
policies:
  consent: {{email: required, sms: required}}
rules:
  - name: cart
    when: checkout.started
    steps:
      - wait: {wait}s
        send: {{via: email, template: t}}
  - name: cart-sms
    when: checkout.started
    if: "contact.phone"
    steps:
      - wait: {wait}s
        send: {{via: text, template: t}}
"""
#: What HubSpot's consent properties mean under that config: hs_email_optout "true" withdraws (the plugin's
#: default), newsletter_opt_in grants or withdraws; any other value states nothing.
HUBSPOT_MEANS = {
    ("hs_email_optout", "true"): "withdrawn",
    ("newsletter_opt_in", "true"): "granted",
    ("newsletter_opt_in", "false"): "withdrawn",
}
#: The changes drawn: grants as often as withdrawals, and now and then a value that states nothing.
HUBSPOT_CHANGES = [*HUBSPOT_MEANS, ("newsletter_opt_in", "true"), ("hs_email_optout", "false")]
#: Twilio's default opt-out and opt-in keywords (twilio.com/docs/messaging/tutorials/advanced-opt-out).
TWILIO_STOP = ["STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT"]
TWILIO_START = ["START", "YES", "UNSTOP"]
EMAIL_SOURCES = [
    *["shopify", "shopify", "shopify-consent", "mailchimp", "mandrill"],
    *["identify", "link", "hubspot-change", "hubspot-update"],
]
SMS_SOURCES = ["twilio", "twilio", "shopify-sms-consent"]
_hubspot_events = itertools.count(1)


@dataclass(frozen=True)
class Statement:
    channel: str  # email | sms
    state: str  # granted | withdrawn | none
    stated_at: datetime | None  # None: an undated snapshot


@dataclass
class Call:
    """One call of a source and the statements its payload carries."""

    arrives: datetime
    #: shopify | shopify-consent | shopify-sms-consent | mailchimp | mandrill | identify | link |
    #: hubspot-change | hubspot-update | twilio
    source: str
    statements: list[Statement]
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Person:
    number: int
    phone: str | None
    calls: list[Call]
    checkouts: list[datetime]

    @property
    def email(self) -> str:
        return f"c{self.number}@example.org"


def earlier(rng: random.Random, moment: datetime) -> datetime:
    """Up to three hours before `moment` (a late webhook, a stale snapshot), in whole seconds."""
    return moment - timedelta(seconds=rng.randint(0, 3 * 3600))


def draw_person(number: int, rng: random.Random) -> Person:
    """A few calls and one or two checkouts, arriving within four hours, in any order."""
    phone = f"+336{number:08d}" if rng.random() < 0.8 else None
    minutes = rng.sample(range(240), rng.randint(2, 6))
    arrivals = [START + timedelta(minutes=m) for m in minutes]
    checkouts = arrivals[: rng.randint(1, 2)]
    hubspot: list[tuple[str, str, datetime]] = []  # the person's consent property changes in HubSpot
    calls = [
        draw_call(rng, rng.choice(EMAIL_SOURCES + (SMS_SOURCES if phone else [])), arrives, phone, hubspot)
        for arrives in arrivals[len(checkouts) :]
    ]
    for call in calls:
        if call.source.startswith("hubspot"):
            fetched_record(rng, call, number, phone, hubspot)
    return Person(number, phone, calls, checkouts)


def draw_call(
    rng: random.Random, source: str, arrives: datetime, phone: str | None, hubspot: list[tuple[str, str, datetime]]
) -> Call:
    stated = earlier(rng, arrives)
    either = rng.choice(["granted", "withdrawn"])
    if source == "shopify":  # the customer, as customers/update (or any order) repeats it
        statements = [Statement("email", either, None if rng.random() < 0.3 else stated)]
        if phone:  # consent_updated_at is null for a state never changed, as `not_subscribed` usually is
            sms = rng.choice(["granted", "withdrawn", "none"])
            sms_at = None if sms == "none" or rng.random() < 0.3 else earlier(rng, arrives)
            statements.append(Statement("sms", sms, sms_at))
        return Call(arrives, source, statements)
    if source in ("shopify-consent", "mailchimp", "identify"):
        return Call(arrives, source, [Statement("email", either, stated)])
    if source == "shopify-sms-consent":
        return Call(arrives, source, [Statement("sms", either, stated)])
    if source == "mandrill":
        return Call(arrives, source, [Statement("email", "withdrawn", stated)])
    if source == "link":  # dated when the click reaches Declic
        return Call(arrives, source, [Statement("email", "withdrawn", arrives)])
    if source == "twilio":  # Twilio gives no time of its own: dated on arrival
        word = rng.choice(TWILIO_STOP if either == "withdrawn" else TWILIO_START)
        body = rng.choice([word, word.lower(), word.capitalize() + " "])
        return Call(
            arrives, source, [Statement("sms", either, arrives)], {"body": body, "advanced": rng.random() < 0.5}
        )
    if source == "hubspot-change":  # a consent property changed; the fetched record comes in fetched_record()
        name, value, moment = hubspot_change(rng, stated, hubspot)
        return Call(arrives, source, [], {"name": name, "value": value, "moment": moment})
    if rng.random() < 0.5:  # consent changed before, and the app is not subscribed to that property
        hubspot_change(rng, earlier(rng, stated), hubspot)
    return Call(arrives, source, [], {"name": "lifecyclestage", "value": "customer", "moment": stated})


def hubspot_change(
    rng: random.Random, moment: datetime, hubspot: list[tuple[str, str, datetime]]
) -> tuple[str, str, datetime]:
    name, value = rng.choice(HUBSPOT_CHANGES)
    while any(n == name and at == moment for n, _, at in hubspot):  # a property has one value per moment
        moment -= timedelta(seconds=1)
    hubspot.append((name, value, moment))
    return name, value, moment


def fetched_record(
    rng: random.Random, call: Call, number: int, phone: str | None, hubspot: list[tuple[str, str, datetime]]
) -> None:
    """The contact as the CRM answers the plugin after this change: as HubSpot held it then, each consent
    property dated by its history, or (one answer in four) without the history, undated."""
    moment, name, value = call.details["moment"], call.details["name"], call.details["value"]
    history: dict[str, list[tuple[str, datetime]]] = defaultdict(list)
    for prop, was, at in hubspot:
        if at <= moment:
            history[prop].append((was, at))
    props = {"email": f"c{number}@example.org", "firstname": f"C{number}", "lifecyclestage": "customer"}
    record = contact_record(str(HUBSPOT_IDS + number), props | ({"phone": phone} if phone else {}), history, START)
    dated = rng.random() >= 0.25
    if not dated:
        del record["propertiesWithHistory"]
    statements = []
    if (state := HUBSPOT_MEANS.get((name, value))) is not None:  # the notification itself
        statements.append(Statement("email", state, moment))
    for prop, entries in history.items():
        was, at = max(entries, key=lambda entry: entry[1])
        if (state := HUBSPOT_MEANS.get((prop, was))) is not None:
            statements.append(Statement("email", state, at if dated else None))
    call.statements, call.details["record"] = statements, record


def state_by(person: Person, channel: str, moment: datetime) -> str:
    """The oracle: on the channel, the latest dated statement received before `moment` (a withdrawal wins a
    tie); with none dated, the first undated snapshot received (a withdrawal wins among those of one call);
    with nothing received, none."""
    received = [
        (c.arrives, s) for c in person.calls if c.arrives < moment for s in c.statements if s.channel == channel
    ]
    dated = [(arrives, s) for arrives, s in received if s.stated_at is not None]
    if dated:
        latest = max(s.stated_at for _, s in dated if s.stated_at is not None)
        tied = [(arrives, s) for arrives, s in dated if s.stated_at == latest]
    elif received:
        first = min(arrives for arrives, _ in received)
        tied = [(arrives, s) for arrives, s in received if arrives == first]
    else:
        return "none"
    states = [s.state for _, s in sorted(tied, key=lambda pair: pair[0])]
    return "withdrawn" if "withdrawn" in states else states[0]


def checkout_calls(person: Person) -> list[tuple[datetime, NewCall]]:
    contact = {"email": person.email} | ({"phone": person.phone} if person.phone else {})
    return [
        (
            at,
            _timeline(
                TimelineItem(
                    at=at, type="checkout.started", contact=contact, correlation=f"checkout:{person.number}.{n}"
                )
            ),
        )
        for n, at in enumerate(person.checkouts)
    ]


def _timeline(item: TimelineItem) -> NewCall:
    return NewCall("~timeline", f"t-{uuid.uuid4().hex}", item.at, {}, item.model_dump_json().encode())


def _shopify_consent(statement: Statement | None) -> dict[str, Any] | None:
    if statement is None:
        return None
    stated = statement.stated_at.isoformat() if statement.stated_at else None
    state = {"granted": "subscribed", "withdrawn": "unsubscribed", "none": "not_subscribed"}[statement.state]
    return {"state": state, "opt_in_level": "single_opt_in", "consent_updated_at": stated}


def payload(person: Person, call: Call, declic_id: int | None) -> NewCall | None:
    """The call each source would make, as its plugin reads it."""
    email, key = person.email, uuid.uuid4().hex
    by_channel = {s.channel: s for s in call.statements}
    stated = call.statements[0].stated_at if call.statements else None
    if call.source.startswith("shopify"):
        topic, body = shopify_body(person, call.source, by_channel)
        headers = {"X-Shopify-Topic": topic, "X-Shopify-Shop-Domain": "shop.example"}
        return NewCall("shop", key, call.arrives, headers, json.dumps(body).encode())
    if call.source == "mailchimp":
        assert stated is not None
        fields = {
            "type": "subscribe" if by_channel["email"].state == "granted" else "unsubscribe",
            "fired_at": stated.strftime("%Y-%m-%d %H:%M:%S"),
            "data[email]": email,
            "data[list_id]": "l1",
            "data[ip_opt]": "203.0.113.7",
        }
        return NewCall("mc", key, call.arrives, {}, urlencode(fields).encode())
    if call.source == "mandrill":
        assert stated is not None
        item = {"event": "unsub", "_id": key, "ts": int(stated.timestamp()), "msg": {"email": email, "_id": key}}
        return NewCall("mail", key, call.arrives, {}, urlencode({"mandrill_events": json.dumps([item])}).encode())
    if call.source == "identify":
        assert stated is not None
        message = {
            "type": "identify",
            "messageId": key,
            "userId": f"user-{person.number}",
            "timestamp": call.arrives.isoformat(),
            "traits": {
                "email": email,
                "consent": {"email": {"state": by_channel["email"].state, "at": stated.isoformat()}},
            },
            "context": {"ip": "198.51.100.4", "userAgent": "server-library"},
        }
        return NewCall("site", f"secret-key:message:{key}", call.arrives, {}, json.dumps(message).encode())
    if call.source == "twilio":
        return NewCall("sms", key, call.arrives, {}, twilio_reply(person, call, key))
    if call.source.startswith("hubspot"):
        details = call.details
        item = property_change(
            HUBSPOT_IDS + person.number,
            details["name"],
            details["value"],
            details["moment"],
            next(_hubspot_events),
            PORTAL,
        )
        return NewCall("crm", key, call.arrives, {"Content-Type": "application/json"}, json.dumps([item]).encode())
    if declic_id is None:  # an unsubscribe link exists only in mail sent to a known contact
        return None
    body = {"contact": declic_id, "channel": "email", "user_agent": "mail client"}
    return NewCall("~unsubscribe", key, call.arrives, {}, json.dumps(body).encode())


def shopify_body(person: Person, source: str, by_channel: dict[str, Statement]) -> tuple[str, dict[str, Any]]:
    """(topic, body): the customer as customers/update (or any order) repeats it, or a consent update."""
    customer = SHOPIFY_IDS + person.number
    if source == "shopify":
        email, sms = (_shopify_consent(by_channel.get(channel)) for channel in ("email", "sms"))
        body = {"id": customer, "email": person.email, "phone": person.phone}
        return "customers/update", body | {"email_marketing_consent": email, "sms_marketing_consent": sms}
    if source == "shopify-consent":
        consent = _shopify_consent(by_channel["email"])
        body = {"customer_id": customer, "email_address": person.email, "email_marketing_consent": consent}
        return "customers_email_marketing_consent/update", body
    sms = {**(_shopify_consent(by_channel["sms"]) or {}), "consent_collected_from": "SHOPIFY"}
    return "customers/marketing_consent/update", {"id": customer, "phone": person.phone, "sms_marketing_consent": sms}


def twilio_reply(person: Person, call: Call, key: str) -> bytes:
    """An incoming SMS as Twilio posts it (form fields of its messaging webhook), Advanced Opt-Out naming the
    keyword's kind in OptOutType when it is on."""
    sid = "SM" + key
    fields = {
        "ToCountry": "FR",
        "SmsMessageSid": sid,
        "NumMedia": "0",
        "SmsSid": sid,
        "SmsStatus": "received",
        "Body": call.details["body"],
        "FromCountry": "FR",
        "To": "+33700000000",
        "MessagingServiceSid": "MG9f8e7d6c5b4a39281706f5e4d3c2b1a0",
        "NumSegments": "1",
        "MessageSid": sid,
        "AccountSid": "AC0123456789abcdef0123456789abcdef",
        "From": person.phone,
        "ApiVersion": "2010-04-01",
    }
    if call.details["advanced"]:
        fields["OptOutType"] = "STOP" if call.statements[0].state == "withdrawn" else "START"
    return urlencode(fields).encode()


def declic_ids(conn: Any, emails: list[str]) -> dict[str, int]:
    """These contacts' Declic ids by e-mail address: what an unsubscribe link names."""
    rows = conn.execute(sa.select(CONTACTS.c.email, CONTACTS.c.id).where(CONTACTS.c.email.in_(emails)))
    return {row.email: row.id for row in rows}


@pytest.mark.slow
@pytest.mark.timeout(1500)  # 40,000 calls, 4,500 CRM fetches, 27,000 steps: under 3 min on a quiet 2-core machine
async def test_no_marketing_message_after_a_withdrawal_or_without_a_statement(tmp_path: Path) -> None:
    seed = int(os.environ.get("DECLIC_PROPERTY_SEED", "20261203"))
    rng = random.Random(seed)
    people = {number: draw_person(number, rng) for number in range(TIMELINES)}
    arrivals: dict[datetime, list[tuple[Person, Call] | NewCall]] = defaultdict(list)
    for person in people.values():
        for at, checkout in checkout_calls(person):
            arrivals[at].append(checkout)
        for call in person.calls:
            arrivals[call.arrives].append((person, call))
    async with serving(FakeHubSpot(HUBSPOT_TOKEN)) as api:
        text = CONFIG.format(folder=tmp_path, wait=int(STEP_WAIT.total_seconds()), token=HUBSPOT_TOKEN, api=api.url)
        pm = get_plugin_manager()
        settings = load_config(write_deployment(tmp_path, text, {"t.txt.j2": "x"}), collect(pm), pm)
        clock = FakeClock(START - timedelta(minutes=1))
        gateway = build_gateway(
            settings, pm=pm, clock=clock, role="worker", wrap_sink=RecordingSink, extra_sources=timeline_source
        )
        gateway.db.upgrade()
        saved = structlog.get_config()  # some 40,000 info lines would cost more than the run itself
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
        try:
            for at in sorted(arrivals):
                await run_until(gateway, clock, at)
                # This moment's links only: every contact (up to 10,000), read at each of the 240 moments, took
                # 8 s of the test's 99.
                linking = [e[0].email for e in arrivals[at] if isinstance(e, tuple) and e[1].source == "link"]
                ids = await gateway.db.run(declic_ids, linking) if linking else {}
                calls = []
                for entry in arrivals[at]:
                    if isinstance(entry, NewCall):
                        calls.append(entry)
                        continue
                    person, call = entry
                    new = payload(person, call, ids.get(person.email))
                    if new is None:
                        person.calls.remove(call)  # no link was ever sent: the statement never happened
                        continue
                    if "record" in call.details:  # what the CRM answers when the plugin fetches the contact
                        api.objects["contacts", str(HUBSPOT_IDS + person.number)] = call.details["record"]
                    calls.append(new)
                await gateway.db.run(commit_calls, calls)
                await gateway.worker.drain()
            await run_until(gateway, clock, max(arrivals) + 2 * STEP_WAIT)
            with gateway.db.engine.connect() as conn:
                joined = sa.select(CONTACTS.c.email, CONTACTS.c.phone, DECISIONS.c.at, DECISIONS.c.via).join(
                    CONTACTS, CONTACTS.c.id == DECISIONS.c.contact_id
                )
                sends = conn.execute(joined.where(DECISIONS.c.action == "send")).all()
                suppressed = conn.execute(joined.where(DECISIONS.c.action == "suppressed")).all()
                failed = conn.exec_driver_sql("SELECT source, error FROM inbox WHERE status != 'processed'").all()
                ledger = conn.exec_driver_sql(
                    "SELECT source, channel, stated_at IS NULL, applied, count(*) FROM consents "
                    "GROUP BY source, channel, stated_at IS NULL, applied"
                ).all()
        finally:
            structlog.configure(**saved)
            for source in gateway.sources.values():
                await source.close()
            gateway.db.close()

    wrong: dict[int, list[str]] = defaultdict(list)
    for email, phone, at, via in sends:
        number = int(email.removeprefix("c").partition("@")[0]) if email else int(phone[-8:])
        channel = {"email": "email", "text": "sms"}[via]
        moment = at.replace(tzinfo=UTC) if at.tzinfo is None else at
        state = state_by(people[number], channel, moment)
        if state != "granted":
            wrong[number].append(f"{channel} sent at {moment:%H:%M:%S} while the latest statement was {state}")
    assert not wrong, f"seed {seed}: {len(wrong)} people messaged against their will, e.g. {list(wrong.items())[:3]}"
    # Not vacuous: every call was read by its plugin, every source stated consent on its channels, HubSpot
    # through stale and undated snapshots too, and both outcomes occur on both channels.
    assert failed == [], failed[:3]
    stated = Counter()
    for source, channel, undated, applied, count in ledger:
        stated[source, channel] += count
        stated[source, "undated" if undated else "dated", "applied" if applied else "not applied"] += count
    assert {key for key in stated if len(key) == 2} == {
        *[("shop", "email"), ("mc", "email"), ("mail", "email"), ("site", "email")],
        *[("~unsubscribe", "email"), ("crm", "email"), ("shop", "sms"), ("sms", "sms")],
    }, stated
    assert all(
        stated["crm", dated, applied] for dated in ("dated", "undated") for applied in ("applied", "not applied")
    )
    assert len(api.seen) == sum(c.source.startswith("hubspot") for p in people.values() for c in p.calls)
    outcomes = Counter((via, "send") for *_, via in sends) + Counter((via, "suppressed") for *_, via in suppressed)
    assert all(
        outcomes[via, action] > TIMELINES // 10 for via in ("email", "text") for action in ("send", "suppressed")
    )
