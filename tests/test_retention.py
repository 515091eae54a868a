"""Retention: a deployment built through real Shopify webhooks under a fake clock, moved past the
retention periods; the retention job removes what aged out and nothing still needed. SQLite and
PostgreSQL.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from click.testing import CliRunner

from conftest import Deployment, Factory, fixture_json
from declic_gateway.cli.main import cli
from declic_gateway.config import RetentionSpec, Settings
from declic_gateway.http.app import load
from declic_gateway.insight import kpis
from declic_gateway.jobs import retention
from declic_gateway.jobs.retention import Periods
from declic_gateway.testing import SmtpCatcher

RULES = """\
  - name: cart
    when: checkout.started
    exit_on: [order.placed]
    goal: [order.placed]
    attribution: 3d
    steps:
      - wait: 1h
        send: {via: email, template: cart-reminder}
  - name: slow
    when: customer.created
    exit_on: [order.placed]
    steps:
      - wait: 1h
        send: {via: email, template: welcome}
      - wait: 450d
        send: {via: email, template: welcome}
"""
A, B, C, D, E = 1, 2, 3, 4, 5


def email(who: int) -> str:
    return f"person{who}@example.org"


def _now(d: Deployment) -> str:
    return d.clock.now().isoformat()


def _customer(d: Deployment, who: int, base: dict[str, Any], consent: bool) -> dict[str, Any]:
    customer = {**base, "id": 9000 + who, "email": email(who), "phone": None}
    customer.pop("sms_marketing_consent", None)
    if consent:
        customer["email_marketing_consent"] = {
            "state": "subscribed",
            "opt_in_level": "single_opt_in",
            "consent_updated_at": _now(d),
        }
    else:
        customer.pop("email_marketing_consent", None)
    return customer


async def checkout(d: Deployment, who: int, token: str, consent: bool = True) -> None:
    body = fixture_json("shopify/checkout.json")
    body.update(id=abs(hash(token)) % 10**9, token=token, email=email(who), phone=None)
    body.update(created_at=_now(d), updated_at=_now(d), customer=_customer(d, who, body["customer"], consent))
    await _post(d, "checkouts/create", body, token)


async def customer(d: Deployment, who: int, webhook_id: str) -> None:
    body = _customer(d, who, fixture_json("shopify/customer.json"), consent=True)
    body.update(created_at=_now(d), updated_at=_now(d))
    await _post(d, "customers/create", body, webhook_id)


async def order(d: Deployment, who: int, token: str) -> None:
    body = fixture_json("shopify/order.json")
    body.update(id=7000 + who, name=f"#{7000 + who}", email=email(who), phone=None, checkout_token=token)
    body.update(created_at=_now(d), updated_at=_now(d), customer=_customer(d, who, body["customer"], False))
    await _post(d, "orders/create", body, f"order{who}")


async def _post(d: Deployment, topic: str, body: dict[str, Any], webhook_id: str) -> None:
    response = await d.post_shopify(topic, json.dumps(body).encode(), webhook_id)
    assert response.status == 200, await response.text()


async def test_retention_removes_what_aged_out_and_nothing_still_needed(deploy: Factory, smtp: SmtpCatcher) -> None:
    d = await deploy(RULES)
    d.gateway.worker.retention_batch = 2  # several batches per part, as a large table would need
    start = d.clock.now()
    # What a process with workers does at start-up (these tests run the worker themselves, role web).
    await d.gateway.db.run(retention.schedule, start + retention.EVERY, start)
    # Day 0. A starts three carts (the first states consent); B and C sign up for a long journey;
    # E checks out and is erased; one call cannot be read (failed, replayable).
    await checkout(d, A, "tok-a1")
    await d.advance(minutes=1)
    await checkout(d, A, "tok-a2", consent=False)
    await d.advance(minutes=1)
    await checkout(d, A, "tok-a3", consent=False)
    await customer(d, B, "customer2")
    await customer(d, C, "customer3")
    await d.advance(minutes=1)
    await customer(d, B, "customer2-again")  # Shopify says it twice: B's journey runs once, from the first
    await checkout(d, E, "tok-e")
    assert (await d.post_shopify("orders/create", b'{"this": "is not an order"}', "unreadable")).status == 200
    await d.advance(seconds=1)
    erased = CliRunner().invoke(cli, ["contacts", "erase", "--config", str(d.path), email(E), "--yes"])
    assert erased.exit_code == 0, erased.output
    await d.advance(hours=1, minutes=1)  # A's three reminders, B's and C's first welcome
    webhook = {row.id: row.dedupe_key.split(":", 1)[1] for row in d.rows("SELECT id, dedupe_key FROM inbox")}
    assert sorted(str(m["To"]) for m in smtp.messages) == sorted([email(A)] * 3 + [email(B), email(C)])
    assert d.scalar("SELECT count(*) FROM rendered_messages") == 5

    # Day 380: D's cart, reminded, then converted. These are within every period at day 401.
    await d.advance(days=380)
    await checkout(d, D, "tok-d")
    await d.advance(hours=1, minutes=1)
    await order(d, D, "tok-d")
    await d.advance(minutes=1)
    webhook.update({row.id: row.dedupe_key.split(":", 1)[1] for row in d.rows("SELECT id, dedupe_key FROM inbox")})
    window = (start + timedelta(days=375), start + timedelta(days=400))
    kpis_before = await d.gateway.db.run(kpis.rule_kpis, ["cart", "slow"], *window)
    assert kpis_before[0].converted == 1 and kpis_before[0].steps[0].sent == 1
    ledger_before = d.rows(LEDGER)
    erased_before = snapshot_of_erased(d)

    # Day 401: past every default period for day 0.
    await d.advance(days=21)
    assert d.clock.now() - start > RetentionSpec().events  # type: ignore[operator]

    # Inbox: the calls stating the consent in force (A's first cart, B's second sign-up, C's) keep their
    # body; failed and erased calls are as they were; day 0's other calls are gone (blanked at day 30,
    # deleted at day 400).
    inbox = {(row.dedupe_key.split(":", 1)[1], row.status, len(row.body) > 0) for row in d.rows(INBOX)}
    assert inbox == {
        ("tok-a1", "processed", True),
        ("customer2-again", "processed", True),
        ("customer3", "processed", True),
        ("tok-e", "erased", False),
        ("tok-d", "processed", True),
        ("order4", "processed", True),
        ("unreadable", "failed", True),
    }
    # Events: A's second cart went; its first (consent in force) and third (A's latest checkout, which
    # an inactivity rule would read) stay; B's first sign-up stays for its open journey, the second as
    # the consent in force; C's, and E's emptied one.
    events = {(row.email, row.type, webhook[row.inbox_id]) for row in d.rows(EVENTS)}
    assert events == {
        (email(A), "checkout.started", "tok-a1"),
        (email(A), "checkout.started", "tok-a3"),
        (email(B), "customer.created", "customer2"),
        (email(B), "customer.created", "customer2-again"),
        (email(C), "customer.created", "customer3"),
        (None, "checkout.started", "tok-e"),  # emptied by the erasure
        (email(D), "checkout.started", "tok-d"),
        (email(D), "order.placed", "order4"),
    }
    # Deliveries: day 0's finished journeys went; the open journeys' first step stays (it guards against
    # a second send) and so does day 380.
    deliveries = {(row.rule, row.email, row.step) for row in d.rows(DELIVERIES)}
    assert deliveries == {("slow", email(B), 1), ("slow", email(C), 1), ("cart", email(D), 1)}
    # Each message as it was rendered goes with its delivery, and only then.
    kept = {row[0] for row in d.rows("SELECT idempotency_key FROM deliveries")}
    assert {row[0] for row in d.rows("SELECT delivery_key FROM rendered_messages")} == kept
    cutoff = d.clock.now() - timedelta(days=400)
    assert d.scalar("SELECT count(*) FROM decisions WHERE at < :cutoff", cutoff=cutoff.replace(tzinfo=None)) == 0
    assert d.scalar("SELECT count(*) FROM decisions") > 0
    # Jobs: those that finished more than 30 days ago went (day 0's and their retries); day 380's finished
    # ones, the retention tick and B's and C's pending second steps stay.
    finished = "SELECT count(*) FROM jobs WHERE status IN ('done', 'cancelled') AND updated_at < :cutoff"
    month_ago = (d.clock.now() - timedelta(days=30)).replace(tzinfo=None)
    assert d.scalar(finished, cutoff=month_ago) == 0
    assert d.scalar("SELECT count(*) FROM jobs WHERE status = 'done'") > 0
    assert d.scalar("SELECT count(*) FROM jobs WHERE kind = 'step' AND status = 'pending'") == 2
    assert d.rows(LEDGER) == ledger_before
    assert snapshot_of_erased(d) == erased_before
    assert await d.gateway.db.run(kpis.rule_kpis, ["cart", "slow"], *window) == kpis_before

    # What remains works: C's open journey exits on its order; B's pending step still goes out.
    await d.advance(days=9)
    await order(d, C, "none")
    await d.advance(minutes=1)
    assert d.scalar(f"SELECT e.status FROM enrolments e {OF} WHERE c.email = :e AND e.rule = 'slow'", e=email(C)) == (
        "exited"
    )
    sent = len(smtp.messages)
    await d.advance(days=41)
    assert [str(m["To"]) for m in smtp.messages[sent:]] == [email(B)]
    assert d.scalar("SELECT count(*) FROM jobs WHERE kind = 'step' AND status = 'dead'") == 0


async def test_a_period_left_empty_keeps_that_table_forever(deploy: Factory, smtp: SmtpCatcher) -> None:
    d = await deploy(RULES)
    d.gateway.worker.retention_periods = Periods.of(settings_with(d, "{events: null, decisions: null}"))
    await d.gateway.db.run(retention.schedule, d.clock.now(), d.clock.now())
    await checkout(d, A, "tok-a1")
    await checkout(d, A, "tok-a2", consent=False)
    await d.advance(hours=2)
    events, decisions = d.scalar("SELECT count(*) FROM events"), d.scalar("SELECT count(*) FROM decisions")
    await d.advance(days=3000)
    assert (d.scalar("SELECT count(*) FROM events"), d.scalar("SELECT count(*) FROM decisions")) == (events, decisions)
    assert d.scalar("SELECT count(*) FROM deliveries") == 0
    assert [row.status for row in d.rows("SELECT status FROM inbox")] == ["processed"]  # the consent in force


async def test_messages_are_kept_for_the_longest_attribution_and_pressure_windows(deploy: Factory) -> None:
    d = await deploy(RULES.replace("attribution: 3d", "attribution: 90d"))
    periods = Periods.of(settings_with(d, "{deliveries: 1d}"))
    assert periods.deliveries == timedelta(days=90)
    assert Periods.of(settings_with(d, "{deliveries: 1d}", "policies: {pressure: {max: 3, per: 120d}}")).deliveries == (
        timedelta(days=120)
    )


def settings_with(d: Deployment, retention: str, policies: str = "") -> Settings:
    """The deployment's config with other retention periods (and policies), as `declic serve` would load it."""
    text = d.path.read_text().replace("  busy_timeout: 1s\n", f"  busy_timeout: 1s\n  retention: {retention}\n")
    if policies:
        text = text.replace("policies:\n  consent: {email: required}\n", policies + "\n")
    other = d.path.with_name("other.yaml")
    other.write_text(text)
    settings, _, _ = load(str(other))
    return settings


def snapshot_of_erased(d: Deployment) -> list[Any]:
    return [
        *d.rows("SELECT id, email, first_name, email_status, consent FROM contacts WHERE email_status = 'erased'"),
        *d.rows("SELECT id, status, body, headers FROM inbox WHERE status = 'erased'"),
        *d.rows(
            "SELECT e.id, e.properties, n.status FROM events e JOIN enrolments n ON n.event_id = e.id "
            "JOIN contacts c ON c.id = e.contact_id WHERE c.email_status = 'erased'"
        ),
    ]


OF = "JOIN contacts c ON c.id = e.contact_id"
LEDGER = "SELECT id, contact_id, channel, state, event_id, evidence, applied FROM consents ORDER BY id"
INBOX = "SELECT dedupe_key, status, body FROM inbox"
EVENTS = f"SELECT c.email, e.type, e.inbox_id FROM events e {OF}"
DELIVERIES = "SELECT d.rule, c.email, d.step FROM deliveries d JOIN contacts c ON c.id = d.contact_id"
