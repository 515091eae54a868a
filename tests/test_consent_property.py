"""Property: over 10,000 random consent timelines, no marketing message goes to a contact whose
latest consent statement, among those received by then, was a withdrawal or none.

Each statement is a real payload of a source that carries e-mail consent, normalised by its
plugin: Shopify customer snapshots (dated by consent_updated_at, or undated) and consent
updates, Mailchimp subscribe/unsubscribe (fired_at), Mandrill unsubscribes (ts), the site's
`identify` signed with the secret key, and Declic's own unsubscribe link (dated on arrival).
They arrive late and out of order, and run through the real router, scheduler and send-time
checks under a fake clock (the machinery of `declic simulate`, with a recording sink). The
calls go straight to the inbox, as after verification (signatures are tested per source).
Set DECLIC_PROPERTY_SEED to replay another draw.
"""

from __future__ import annotations

import json
import logging
import os
import random
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import sqlalchemy as sa
import structlog

from gateway.cli.simulate import RecordingSink, TimelineItem, run_until, timeline_source
from gateway.config import load_config
from gateway.http.app import build_gateway
from gateway.kit.clock import FakeClock
from gateway.plugins import collect, get_plugin_manager
from gateway.store import CONTACTS, DECISIONS
from gateway.store.inbox import NewCall, commit_calls
from gateway.testing import write_deployment

TIMELINES = int(os.environ.get("DECLIC_PROPERTY_TIMELINES", "10000"))
START = datetime(2026, 5, 1, 8, 0, tzinfo=UTC)
#: Arrivals fall on whole minutes and steps on half minutes: no send shares a moment with an arrival.
STEP_WAIT = timedelta(minutes=30, seconds=30)
CONFIG = """\
public_url: https://hooks.example.com
storage: {{url: 'sqlite:///{folder}/property.db'}}
sources:
  shop: {{plugin: shopify, secret: shop-secret}}
  mc: {{plugin: mailchimp, url_token: mailchimp-url-token}}
  mail: {{plugin: mandrill, webhook_key: mandrill-key}}
  site: {{plugin: track, write_key: site-write-key, secret_key: site-secret-key-0123456789}}
sinks:
  email: {{plugin: smtp, host: 127.0.0.1, port: 9, tls: none, sender: shop@example.com}}
policies:
  consent: {{email: required}}
rules:
  - name: cart
    when: checkout.started
    steps:
      - wait: {wait}s
        send: {{via: email, template: t}}
"""


@dataclass(frozen=True)
class Statement:
    arrives: datetime
    state: str
    stated_at: datetime | None  # None: an undated snapshot
    source: str  # shopify | shopify-consent | mailchimp | mandrill | identify | unsubscribe-link


def draw_timeline(rng: random.Random) -> tuple[list[Statement], list[datetime]]:
    """A few statements and one or two checkouts, arriving within four hours, in any order."""
    minutes = rng.sample(range(240), rng.randint(2, 6))
    arrivals = [START + timedelta(minutes=m) for m in minutes]
    checkouts, statements = arrivals[: rng.randint(1, 2)], []
    for arrives in arrivals[len(checkouts) :]:
        source = rng.choice(["shopify", "shopify", "shopify-consent", "mailchimp", "mandrill", "identify", "link"])
        state = "withdrawn" if source in ("mandrill", "link") else rng.choice(["granted", "withdrawn"])
        # Stated up to three hours before it arrives (a late webhook, a stale snapshot), in whole seconds.
        stated: datetime | None = arrives - timedelta(seconds=rng.randint(0, 3 * 3600))
        if source == "shopify" and rng.random() < 0.3:
            stated = None  # Shopify's consent_updated_at is null for a state never changed
        if source == "link":
            stated = arrives  # dated when the click reaches Declic
        statements.append(Statement(arrives, state, stated, source))
    return statements, checkouts


def declic_ids(conn: Any) -> dict[str, int]:
    return {row.email: row.id for row in conn.execute(sa.select(CONTACTS.c.email, CONTACTS.c.id))}


def state_by(statements: list[Statement], moment: datetime) -> str:
    """The oracle: the latest dated statement received before `moment` (a withdrawal wins a tie);
    with none dated, the first undated snapshot received; with nothing received, none."""
    received = [s for s in statements if s.arrives < moment]
    dated = [s for s in received if s.stated_at is not None]
    if dated:
        latest = max(s.stated_at for s in dated if s.stated_at is not None)
        states = {s.state for s in dated if s.stated_at == latest}
        return "withdrawn" if "withdrawn" in states else states.pop()
    undated = sorted(received, key=lambda s: s.arrives)
    return undated[0].state if undated else "none"


def checkouts_for(contact: int, checkouts: list[datetime]) -> list[tuple[datetime, NewCall]]:
    email = f"c{contact}@example.org"
    return [
        (
            at,
            _timeline(
                TimelineItem(
                    at=at, type="checkout.started", contact={"email": email}, correlation=f"checkout:{contact}.{n}"
                )
            ),
        )
        for n, at in enumerate(checkouts)
    ]


def _timeline(item: TimelineItem) -> NewCall:
    return NewCall("~timeline", f"t-{uuid.uuid4().hex}", item.at, {}, item.model_dump_json().encode())


def payload(contact: int, s: Statement, declic_id: int | None) -> NewCall | None:
    """The call each source would make for the statement, as its plugin reads it."""
    email, key = f"c{contact}@example.org", uuid.uuid4().hex
    stated = s.stated_at.isoformat() if s.stated_at else None
    if s.source in ("shopify", "shopify-consent"):
        shopify_state = {"granted": "subscribed", "withdrawn": "unsubscribed"}[s.state]
        consent = {"state": shopify_state, "opt_in_level": "single_opt_in", "consent_updated_at": stated}
        if s.source == "shopify":  # the customer, as customers/update (or any order) repeats it
            body: dict[str, Any] = {"id": 10**6 + contact, "email": email, "email_marketing_consent": consent}
            topic = "customers/update"
        else:
            body = {"customer_id": 10**6 + contact, "email_address": email, "email_marketing_consent": consent}
            topic = "customers_email_marketing_consent/update"
        headers = {"X-Shopify-Topic": topic, "X-Shopify-Shop-Domain": "shop.example"}
        return NewCall("shop", key, s.arrives, headers, json.dumps(body).encode())
    if s.source == "mailchimp":
        assert s.stated_at is not None
        fields = {
            "type": "subscribe" if s.state == "granted" else "unsubscribe",
            "fired_at": s.stated_at.strftime("%Y-%m-%d %H:%M:%S"),
            "data[email]": email,
            "data[list_id]": "l1",
            "data[ip_opt]": "203.0.113.7",
        }
        return NewCall("mc", key, s.arrives, {}, urlencode(fields).encode())
    if s.source == "mandrill":
        assert s.stated_at is not None
        item = {"event": "unsub", "_id": key, "ts": int(s.stated_at.timestamp()), "msg": {"email": email, "_id": key}}
        return NewCall("mail", key, s.arrives, {}, urlencode({"mandrill_events": json.dumps([item])}).encode())
    if s.source == "identify":
        assert s.stated_at is not None
        message = {
            "type": "identify",
            "messageId": key,
            "userId": f"user-{contact}",
            "timestamp": s.arrives.isoformat(),
            "traits": {"email": email, "consent": {"email": {"state": s.state, "at": stated}}},
            "context": {"ip": "198.51.100.4", "userAgent": "server-library"},
        }
        return NewCall("site", f"secret-key:message:{key}", s.arrives, {}, json.dumps(message).encode())
    if declic_id is None:  # an unsubscribe link exists only in mail sent to a known contact
        return None
    body = {"contact": declic_id, "channel": "email", "user_agent": "mail client"}
    return NewCall("~unsubscribe", key, s.arrives, {}, json.dumps(body).encode())


@pytest.mark.slow
@pytest.mark.timeout(1500)  # some 45,000 calls and 20,000 steps: about 2 minutes on a quiet 2-core machine
async def test_no_marketing_message_after_a_withdrawal_or_without_a_statement(tmp_path: Path) -> None:
    seed = int(os.environ.get("DECLIC_PROPERTY_SEED", "20261203"))
    rng = random.Random(seed)
    timelines = {contact: draw_timeline(rng) for contact in range(TIMELINES)}
    checkout_calls = [call for contact, (_, c) in timelines.items() for call in checkouts_for(contact, c)]
    statements = [(s.arrives, contact, s) for contact, (ss, _) in timelines.items() for s in ss]
    arrivals: dict[datetime, list[tuple[int, Statement] | NewCall]] = defaultdict(list)
    for at, call in checkout_calls:
        arrivals[at].append(call)
    for at, contact, s in statements:
        arrivals[at].append((contact, s))
    pm = get_plugin_manager()
    path = write_deployment(
        tmp_path, CONFIG.format(folder=tmp_path, wait=int(STEP_WAIT.total_seconds())), {"t.txt.j2": "x"}
    )
    settings = load_config(path, collect(pm), pm)
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
            ids = await gateway.db.run(declic_ids)
            calls = []
            for entry in arrivals[at]:
                if isinstance(entry, NewCall):
                    calls.append(entry)
                    continue
                contact, s = entry
                call = payload(contact, s, ids.get(f"c{contact}@example.org"))
                if call is None:
                    timelines[contact][0].remove(s)  # no link was ever sent: the statement never happened
                else:
                    calls.append(call)
            await gateway.db.run(commit_calls, calls)
            await gateway.worker.drain()
        await run_until(gateway, clock, max(arrivals) + 2 * STEP_WAIT)
        with gateway.db.engine.connect() as conn:
            joined = sa.select(CONTACTS.c.email, DECISIONS.c.at).join(CONTACTS, CONTACTS.c.id == DECISIONS.c.contact_id)
            sends = conn.execute(joined.where(DECISIONS.c.action == "send")).all()
            suppressed = len(conn.execute(joined.where(DECISIONS.c.action == "suppressed")).all())
            failed = conn.exec_driver_sql("SELECT source, error FROM inbox WHERE status != 'processed'").all()
            ledger = dict(conn.exec_driver_sql("SELECT source, count(*) FROM consents GROUP BY source").all())
    finally:
        structlog.configure(**saved)
        gateway.db.close()

    wrong: dict[int, list[str]] = defaultdict(list)
    for email, at in sends:
        contact = int(email.removeprefix("c").partition("@")[0])
        moment = at.replace(tzinfo=UTC) if at.tzinfo is None else at
        state = state_by(timelines[contact][0], moment)
        if state != "granted":
            wrong[contact].append(f"sent at {moment:%H:%M:%S} while the latest statement was {state}")
    assert not wrong, f"seed {seed}: {len(wrong)} contacts mailed against their will, e.g. {list(wrong.items())[:3]}"
    # Not vacuous: every call was read by its plugin, every source stated consent, both outcomes occur.
    assert failed == [], failed[:3]
    assert set(ledger) == {"shop", "mc", "mail", "site", "~unsubscribe"}, ledger
    assert len(sends) > TIMELINES // 10 and suppressed > TIMELINES // 10, (len(sends), suppressed)
