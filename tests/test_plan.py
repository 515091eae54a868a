"""`declic plan`: what a new config would do to the running deployment, said before it is deployed, logged
when it starts, and then done by the worker as said. A database filled by real webhooks (Shopify over HTTP,
Segment identify calls to the track source), SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import functools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from structlog.testing import capture_logs

from conftest import BASE_CONFIG, SECRET, TEMPLATES, Deployment, fixture_json
from declic_gateway.cli import logs
from declic_gateway.cli.main import cli
from declic_gateway.http.app import create_app, load
from declic_gateway.http.running import GATEWAY_KEY
from declic_gateway.testing import FakeClock, SmtpCatcher, write_deployment

SITE_SECRET = "site-secret-key-for-servers"
T0 = datetime(2026, 3, 14, 8, 0, tzinfo=UTC)

OLD_RULES = """\
  - name: abandoned-cart
    when: checkout.started
    exit_on: [order.placed]
    steps:
      - wait: 1h
        send: {via: email, template: cart-reminder}
      - wait: 1d
        send: {via: email, template: cart-reminder}
  - name: welcome
    when: customer.created
    steps:
      - wait: 2h
        send: {via: email, template: welcome}
  - name: order-confirmation
    when: order.placed
    kind: transactional
    send: {via: email, template: order-confirmation}
"""

NEW_RULES = """\
  - name: abandoned-cart
    when: checkout.started
    exit_on: [order.placed]
    steps:
      - wait: 2h
        send: {via: email, template: cart-reminder}
  - name: order-confirmation
    when: order.placed
    kind: transactional
    send: {via: email, template: order-confirmation}
  - name: birthday
    on_date: contact.birthday
    at: "10:00"
    kind: transactional
    send: {via: email, template: welcome}
  - name: win-back
    inactive_for: 3d
    of: [order.placed]
    kind: transactional
    send: {via: email, template: welcome}
"""

EXPECTED = [
    "~ changed abandoned-cart (on checkout.started)",
    "    steps: 2 -> 1",
    "    wait of step 1: 1h -> 2h",
    "    template cart-reminder edited",
    "    2 active journeys",
    "    1 pending step 1: continue with the new step 1 (wait, template's text), due when set before: "
    "a new wait applies to steps not yet scheduled",
    "    1 pending step 2: cancelled when due (the rule has 1 step now)",
    "+ added birthday (on contact.birthday, yearly)",
    "    fires for 1 contact in the next 24 h, 2 in the next 7 days",
    "+ added win-back (after 3d without order.placed)",
    "    fires for 0 contacts in the next 24 h, 1 in the next 7 days",
    "- removed welcome",
    "    1 active journey",
    "    1 pending step 1: cancelled when due (the rule is no longer in the config)",
    "= unchanged: order-confirmation",
]

Start = Callable[..., Awaitable[Any]]


@pytest.fixture
async def start(aiohttp_client: Any, tmp_path: Path, db_url: str, smtp: SmtpCatcher) -> AsyncIterator[Start]:
    """Start (or restart) the deployment on one database and clock, with a Shopify shop and a site."""
    clock = FakeClock(T0)

    async def run(rules: str, templates: dict[str, str], serve: bool = True) -> Any:
        """The deployment started with these rules; with serve=False, only its config file."""
        text = BASE_CONFIG.format(
            db_url=db_url, secret=SECRET, smtp_port=smtp.port, rules=rules, max_attempts=5, worker=""
        ).replace("sources:\n", f"sources:\n  site: {{plugin: track, write_key: k, secret_key: {SITE_SECRET}}}\n")
        folder = tmp_path / f"config-{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        path = write_deployment(folder, text, templates)
        if not serve:
            return path
        settings, pm, _ = load(str(path))
        app = create_app(settings, pm=pm, clock=clock, role="web")
        return Deployment(await aiohttp_client(app), app[GATEWAY_KEY], clock, path)

    yield run


def text_of(message: EmailMessage) -> str:
    body = message.get_body(("plain",))
    assert body is not None
    return str(body.get_content()).strip()


async def declic(path: Path, *args: str) -> tuple[int, str]:
    invoke = functools.partial(CliRunner().invoke, cli, [*args, "--config", str(path)], catch_exceptions=False)
    try:
        result = await asyncio.to_thread(invoke)
    finally:
        logs.reset()  # the command configured logging for the whole process
    return result.exit_code, result.output


async def shopify(d: Deployment, topic: str, body: dict[str, Any], webhook_id: str) -> None:
    assert (await d.post_shopify(topic, json.dumps(body).encode(), webhook_id)).status == 200


async def identify(d: Deployment, user: str, birthday: str) -> None:
    body = {"type": "identify", "userId": user, "messageId": f"m-{user}", "traits": {"email": f"{user}@example.org"}}
    body["traits"]["birthday"] = birthday
    headers = {"Authorization": "Basic " + base64.b64encode(f"{SITE_SECRET}:".encode()).decode()}
    assert (await d.client.post("/hooks/site", json=body, headers=headers)).status == 200


async def fill(d: Deployment) -> None:
    """Journeys at each stage, contacts with birthdays, a buyer: all through webhooks."""
    await shopify(d, "checkouts/create", fixture_json("shopify/checkout.json"), "c1")  # Camille's cart
    await shopify(d, "customers/create", fixture_json("shopify/customer.json"), "u1")  # Noah: welcome in 2h
    order = fixture_json("shopify/order.json")
    order.update(email="buyer@example.org", checkout_token="other", customer={"id": 1, "email": "buyer@example.org"})
    await shopify(d, "orders/create", order, "o1")
    for user, birthday in (("soon", "1990-03-15"), ("week", "1985-03-18"), ("may", "1970-05-01")):
        await identify(d, user, birthday)
    await d.advance(seconds=1)
    await d.advance(hours=1, seconds=1)  # Camille's first reminder goes: her step 2 is pending
    cart = fixture_json("shopify/checkout.json")
    cart.update(
        token="second", email="lea@example.org", customer={**cart["customer"], "id": 2, "email": "lea@example.org"}
    )
    await shopify(d, "checkouts/create", cart, "c2")  # Léa's step 1 is pending, due at 10:00:02
    await d.advance(seconds=1)


async def test_plan_says_what_a_new_config_does_and_the_deployment_then_does_it(
    start: Start, smtp: SmtpCatcher
) -> None:
    d = await start(OLD_RULES, TEMPLATES)
    await fill(d)
    new_templates = {**TEMPLATES, "cart-reminder.txt.j2": "Still {{ event.properties.total_price }}?"}
    new = await start(NEW_RULES, new_templates, serve=False)  # the plan's NEW config
    at = d.clock.now()
    before = d.rows("SELECT id, status, due_at FROM jobs ORDER BY id")

    code, output = await declic(new, "plan", "--at", f"{at:%Y-%m-%d %H:%M:%S}")
    assert code == 0, output
    lines = output.splitlines()
    assert lines[0].endswith("against the rules the deployment started with at 2026-03-14T08:00 UTC:")
    assert lines[1:-1] == EXPECTED
    assert lines[-1] == "nothing was changed"
    assert d.rows("SELECT id, status, due_at FROM jobs ORDER BY id") == before

    # Deployed: the deployment logs the same plan when it starts with the new rules.
    await d.client.close()
    with capture_logs() as logs:
        d = await start(NEW_RULES, new_templates)
    [logged] = [entry for entry in logs if entry["event"] == "rules changed since the last start"]
    assert logged["plan"] == EXPECTED
    sent = len(smtp.messages)

    # And the worker does what the plan said.
    await d.advance(hours=1)
    assert [(m["To"], text_of(m)) for m in smtp.messages[sent:]] == [("lea@example.org", "Still 59.90?")]
    cancelled = d.rows(
        "SELECT e.rule, j.step, j.last_error FROM jobs j JOIN enrolments e ON e.id = j.enrolment_id "
        "WHERE j.status = 'cancelled' ORDER BY e.rule"
    )
    assert cancelled == [("welcome", 0, "rule no longer in the config")]
    await d.advance(days=1)  # Camille's step 2 falls due: cancelled, the rule has one step now
    assert d.scalar("SELECT count(*) FROM jobs WHERE kind = 'step' AND status = 'cancelled'") == 2
    # Neither journey stays active with nothing left to run (the plan's "active journeys" would count it).
    ended = "SELECT status, ended_by FROM enrolments WHERE rule = :rule AND status <> 'active'"
    assert d.rows(ended, rule="welcome") == [("exited", "rule removed")]
    left_active = (
        "SELECT count(*) FROM enrolments e JOIN jobs j ON j.enrolment_id = e.id "
        "WHERE j.status = 'cancelled' AND e.status = 'active'"
    )
    assert d.scalar(left_active) == 0
    assert not [m for m in smtp.messages[sent:] if m["To"] == "camille.durand@example.org"]
    fired = "SELECT count(*) FROM enrolments WHERE rule = :rule"
    assert d.scalar(fired, rule="birthday") == 1  # within 24 h of the plan
    assert d.scalar(fired, rule="win-back") == 0
    for _ in range(6):  # a day at a time, as the clock goes: a jump would skip past catch_up
        await d.advance(days=1)
    assert d.scalar(fired, rule="birthday") == 2  # within 7 days
    assert d.scalar(fired, rule="win-back") == 1


async def test_serve_logs_nothing_when_the_rules_did_not_change(start: Start) -> None:
    d = await start(OLD_RULES, TEMPLATES)
    await d.client.close()
    with capture_logs() as logs:
        d = await start(OLD_RULES, TEMPLATES)
    assert not [entry for entry in logs if entry["event"] == "rules changed since the last start"]
    code, output = await declic(d.path, "plan")
    assert code == 0
    assert output.splitlines()[1:] == [
        "= unchanged: abandoned-cart, welcome, order-confirmation",
        "nothing was changed",
    ]


def test_the_readme_shows_this_plan() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    assert "\n".join(EXPECTED) + "\nnothing was changed\n" in readme


BIRTHDAY = """\
  - name: birthday
    on_date: contact.birthday
    at: "{at}"
    kind: transactional
    send: {{via: email, template: welcome}}
"""


async def test_a_retimed_date_rule_moves_its_pending_triggers(start: Start) -> None:
    d = await start(BIRTHDAY.format(at="09:00"), TEMPLATES)
    for user, birthday in (("soon", "1990-03-15"), ("week", "1985-03-18")):
        await identify(d, user, birthday)
    await d.advance(seconds=1)
    dues = "SELECT due_at FROM jobs WHERE kind = 'trigger' AND status = 'pending' ORDER BY due_at"
    assert [str(row[0])[:16] for row in d.rows(dues)] == ["2026-03-15 08:00", "2026-03-18 08:00"]
    new = await start(BIRTHDAY.format(at="10:00"), TEMPLATES, serve=False)

    code, output = await declic(new, "plan", "--at", "2026-03-14 08:00")
    assert code == 0, output
    assert output.splitlines()[1:] == [
        "~ changed birthday (on contact.birthday, yearly)",
        "    at: 09:00 -> 10:00",
        "    2 pending triggers: re-timed when the deployment starts with it",
        "    fires for 0 contacts in the next 24 h, 2 in the next 7 days",
        "nothing was changed",
    ]
    await d.client.close()
    d = await start(BIRTHDAY.format(at="10:00"), TEMPLATES)
    await d.advance(seconds=1)  # the start-up reconcile runs
    assert [str(row[0])[:16] for row in d.rows(dues)] == ["2026-03-15 09:00", "2026-03-18 09:00"]


async def test_without_a_record_of_the_running_rules_only_the_work_in_flight_is_compared(start: Start) -> None:
    d = await start(OLD_RULES, TEMPLATES)
    await shopify(d, "checkouts/create", fixture_json("shopify/checkout.json"), "c1")
    await d.advance(seconds=1)
    forget = sa.text("DELETE FROM meta WHERE key = 'plan:rules'")
    d.gateway.db.transaction(lambda conn: conn.execute(forget))  # as a version before `plan` left it
    new = await start(NEW_RULES, TEMPLATES, serve=False)
    code, output = await declic(new, "plan", "--at", "2026-03-14 08:00")
    assert code == 0, output
    assert output.splitlines() == [
        "no record of the rules the deployment runs (`declic serve` records them when it starts):",
        "only the work in flight is compared",
        "? not compared abandoned-cart (on checkout.started)",
        "    1 active journey",
        "    1 pending step 1: continue",
        "? not compared order-confirmation (on order.placed)",
        "? not compared birthday (on contact.birthday, yearly)",
        "? not compared win-back (after 3d without order.placed)",
        "nothing was changed",
    ]
