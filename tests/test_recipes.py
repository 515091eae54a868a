"""The README's recipes (issue 12): a reminder the day before an event, an alert to the sales rep, SMS or else
e-mail. Each runs as a timeline through `declic simulate` and through the real server over HTTP, with a real
SMTP server and a server that answers as Twilio does, on SQLite and PostgreSQL: both must make the same
decisions at the same times, and the live one must send exactly the messages those decisions say."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from click.testing import CliRunner
from test_config import check as config_check
from test_config import edit as config_edit
from test_journeys import Plugin
from test_twilio import ACCOUNT, TOKEN, FakeTwilio, created, error

from declic_gateway.cli.main import cli
from declic_gateway.cli.simulate import TimelineItem, decisions, load_timeline, play
from declic_gateway.config import load_config
from declic_gateway.http.app import create_app
from declic_gateway.http.running import GATEWAY_KEY, RunningGateway
from declic_gateway.insight.kpis import rule_kpis
from declic_gateway.plugins import collect, get_plugin_manager
from declic_gateway.testing import FakeClock, SmtpCatcher, write_deployment

#: at, rule, step, contact, action, via, reason prefix (None: any)
Expected = tuple[str, str, int | None, str, str, str | None, str | None]


@dataclass
class Recipe:
    name: str
    rules: str
    timeline: str
    expected: list[Expected]
    policies: str = "policies: {consent: {email: required, sms: required}}\n"
    extra: str = ""


REMINDER = """\
  - name: event-reminder
    when: ticket.ordered
    kind: transactional
    exit_on: [ticket.refunded]
    steps:
      - at: "{{ event.properties.starts_at }}"
        offset: -1d
        time: "10:00"
        send: {via: email, template: t}
"""

LEAD_ALERT = """\
  - name: lead-alert
    score_reaches: 50
    send: {via: email, to: "sales@example.com", template: t}
  - name: owner-alert
    score_reaches: 50
    send: {via: email, to: "{{ contact.attributes.owner_email }}", template: t}
"""

SMS_OR_EMAIL = """\
  - name: shipping-news
    when: order.fulfilled
    send: {via: [sms, email], template: t}
"""

RECIPES = [
    Recipe(
        "event reminder the day before at 10:00 local; skipped when bought too late",
        REMINDER,
        """\
- {at: "2026-05-12T09:30:00Z", type: ticket.ordered, contact: {email: paris@example.org},
   properties: {event_name: Atelier, starts_at: "2026-06-02T17:00:00+00:00"}}
- {at: "2026-05-12T09:31:00Z", type: ticket.ordered, contact: {email: ny@example.org, timezone: America/New_York},
   properties: {event_name: Atelier, starts_at: "2026-06-02T17:00:00+00:00"}}
- {at: "2026-05-12T09:32:00Z", type: ticket.ordered, contact: {email: naive@example.org},
   properties: {event_name: Atelier, starts_at: "2026-06-10T19:00:00"}}
- {at: "2026-06-01T12:00:00Z", type: ticket.ordered, contact: {email: late@example.org},
   properties: {event_name: Atelier, starts_at: "2026-06-02T17:00:00+00:00"}}
- {at: "2026-06-01T12:05:00Z", type: ticket.ordered, contact: {email: nodate@example.org},
   properties: {event_name: Atelier}}
- {at: "2026-06-12T00:00:00Z", end: true}
""",
        [
            # 10:00 in Paris (the deployment's zone: the contact has none) on 1 June
            ("2026-06-01T08:00:00Z", "event-reminder", 1, "paris@example.org", "send", "email", None),
            (
                "2026-06-01T12:00:00Z",
                "event-reminder",
                1,
                "late@example.org",
                "suppressed",
                "email",
                "skipped: its moment (2026-06-01 08:00 UTC) had passed when the step was scheduled",
            ),
            (
                "2026-06-01T12:05:00Z",
                "event-reminder",
                1,
                "nodate@example.org",
                "suppressed",
                "email",
                "skipped: at: {{ event.properties.starts_at }}: '' is not a date-time",
            ),
            ("2026-06-01T14:00:00Z", "event-reminder", 1, "ny@example.org", "send", "email", None),
            # a start without an offset is read in the contact's zone: 19:00 Paris on the 10th
            ("2026-06-09T08:00:00Z", "event-reminder", 1, "naive@example.org", "send", "email", None),
        ],
    ),
    Recipe(
        "lead alert to the sales team and to the lead's owner, whatever the lead's consent and quiet hours",
        LEAD_ALERT,
        """\
- {at: "2026-03-14T20:00:00Z", type: page.viewed, contact: {email: lead@example.org,
   attributes: {owner_email: rep@example.com}}}
- {at: "2026-03-14T20:10:00Z", type: page.viewed, contact: {email: lead@example.org}}
- {at: "2026-03-14T20:20:00Z", type: page.viewed, contact: {email: lead@example.org}}
- {at: "2026-03-14T20:30:00Z", type: page.viewed, contact: {email: lead@example.org}}
- {at: "2026-03-15T09:00:00Z", type: page.viewed, contact: {email: orphan@example.org,
   attributes: {owner_email: "not an address"}}}
- {at: "2026-03-15T09:10:00Z", type: page.viewed, contact: {email: orphan@example.org}}
- {at: "2026-03-15T09:20:00Z", type: page.viewed, contact: {email: orphan@example.org}}
""",
        [
            # the third view crosses 50 at 21:20 in Paris: quiet hours, no consent, and sent at once
            (
                "2026-03-14T20:20:00Z",
                "lead-alert",
                1,
                "lead@example.org",
                "send",
                "email",
                "internal: to sales@example.com",
            ),
            (
                "2026-03-14T20:20:00Z",
                "owner-alert",
                1,
                "lead@example.org",
                "send",
                "email",
                "internal: to rep@example.com",
            ),
            (
                "2026-03-15T09:20:00Z",
                "lead-alert",
                1,
                "orphan@example.org",
                "send",
                "email",
                "internal: to sales@example.com",
            ),
            (
                "2026-03-15T09:20:00Z",
                "owner-alert",
                1,
                "orphan@example.org",
                "failed",
                "email",
                "internal recipient {{ contact.attributes.owner_email }}: 'not an address' is not an e-mail address",
            ),
        ],
        policies="policies: {consent: {email: required}, quiet_hours: {start: '21:00', end: '08:30'}, "
        "pressure: {max: 1, per: 7d}}\n",
        extra="scoring: {page.viewed: 20}\n",
    ),
    Recipe(
        "SMS if they agreed to SMS, otherwise e-mail; nothing without consent",
        SMS_OR_EMAIL,
        """\
- {at: "2026-03-14T10:00:00Z", type: order.fulfilled, correlation: "order:1",
   contact: {email: both@example.org, phone: "+33612345678", consent: {sms: granted, email: granted}}}
- {at: "2026-03-14T10:01:00Z", type: order.fulfilled, correlation: "order:2",
   contact: {email: mail@example.org, phone: "+33612345679", consent: {email: granted}}}
- {at: "2026-03-14T10:02:00Z", type: order.fulfilled, correlation: "order:3",
   contact: {email: nophone@example.org, consent: {sms: granted, email: granted}}}
- {at: "2026-03-14T10:03:00Z", type: order.fulfilled, correlation: "order:4",
   contact: {email: none@example.org, phone: "+33612345670"}}
""",
        [
            ("2026-03-14T10:00:00Z", "shipping-news", 1, "both@example.org", "send", "sms", None),
            (
                "2026-03-14T10:01:00Z",
                "shipping-news",
                1,
                "mail@example.org",
                "fallback",
                "sms",
                "no sms consent (state: none); trying email",
            ),
            ("2026-03-14T10:01:00Z", "shipping-news", 1, "mail@example.org", "send", "email", None),
            (
                "2026-03-14T10:02:00Z",
                "shipping-news",
                1,
                "nophone@example.org",
                "fallback",
                "sms",
                "contact has no sms address; trying email",
            ),
            ("2026-03-14T10:02:00Z", "shipping-news", 1, "nophone@example.org", "send", "email", None),
            (
                "2026-03-14T10:03:00Z",
                "shipping-news",
                1,
                "none@example.org",
                "suppressed",
                "sms",
                "sms: no sms consent (state: none); email: no email consent (state: none)",
            ),
        ],
    ),
]

RECIPES.append(
    Recipe(
        "a date rule reads a date-time attribute on the contact's own day",
        """\
  - name: trial-ending
    on_date: contact.attributes.trial_ends_at
    offset: -1d
    at: "09:00"
    send: {via: email, template: t}
""",
        """\
- {at: "2026-05-20T00:00:00Z", type: profile.updated, contact: {email: ny@example.org, timezone: America/New_York,
   attributes: {trial_ends_at: "2026-06-02T01:00:00Z"}, consent: {email: granted}}}
- {at: "2026-05-20T00:00:00Z", type: profile.updated, contact: {email: paris@example.org,
   attributes: {trial_ends_at: "2026-06-02T01:00:00Z"}, consent: {email: granted}}}
- {at: "2026-06-05T00:00:00Z", end: true}
""",
        [
            # 1 June 09:00 in Paris: the trial ends at 03:00 on 2 June there
            ("2026-06-01T07:00:00Z", "trial-ending", 1, "paris@example.org", "send", "email", None),
            # 31 May 09:00 in New York: the trial ends at 21:00 on 1 June there
            ("2026-05-31T13:00:00Z", "trial-ending", 1, "ny@example.org", "send", "email", None),
        ],
    )
)

WELCOME_SERIES = """\
  - name: welcome-series
    when: customer.created
    steps:
      - send: {via: email, template: t}
      - wait: 3d
        send: {via: email, template: t}
"""

ABANDONED_CART = """\
  - name: abandoned-cart
    when: checkout.started
    if: "event.properties.total_price > 20"
    exit_on: [order.placed]
    steps:
      - wait: 1h
        send: {via: email, template: t}
"""

BIRTHDAY = """\
  - name: birthday
    on_date: contact.birthday
    at: "10:00"
    send: {via: email, template: t}
"""

RECIPES += [
    Recipe(
        "welcome series: now, then three days later",
        WELCOME_SERIES,
        """\
- {at: "2026-03-14T10:00:00Z", type: customer.created, contact: {email: ada@example.org, consent: {email: granted}}}
- {at: "2026-03-14T10:05:00Z", type: customer.created, contact: {email: nobody@example.org}}
- {at: "2026-03-18T00:00:00Z", end: true}
""",
        [
            ("2026-03-14T10:00:00Z", "welcome-series", 1, "ada@example.org", "send", "email", None),
            ("2026-03-14T10:05:00Z", "welcome-series", 1, "nobody@example.org", "suppressed", "email", "no email"),
            ("2026-03-17T10:00:00Z", "welcome-series", 2, "ada@example.org", "send", "email", None),
            ("2026-03-17T10:05:00Z", "welcome-series", 2, "nobody@example.org", "suppressed", "email", "no email"),
        ],
    ),
    Recipe(
        "abandoned cart: one hour later, not when the order came, not for a small cart",
        ABANDONED_CART,
        """\
- {at: "2026-03-14T10:00:00Z", type: checkout.started, correlation: "checkout:1",
   contact: {email: left@example.org, consent: {email: granted}}, properties: {total_price: 59.90}}
- {at: "2026-03-14T10:00:00Z", type: checkout.started, correlation: "checkout:2",
   contact: {email: bought@example.org, consent: {email: granted}}, properties: {total_price: 59.90}}
- {at: "2026-03-14T10:00:00Z", type: checkout.started, correlation: "checkout:3",
   contact: {email: small@example.org, consent: {email: granted}}, properties: {total_price: 12}}
- {at: "2026-03-14T10:30:00Z", type: order.placed, correlation: "checkout:2", contact: {email: bought@example.org}}
- {at: "2026-03-15T00:00:00Z", end: true}
""",
        [
            ("2026-03-14T10:30:00Z", "abandoned-cart", 1, "bought@example.org", "exited", None, "exit_on order.placed"),
            ("2026-03-14T11:00:00Z", "abandoned-cart", 1, "left@example.org", "send", "email", None),
        ],
    ),
    Recipe(
        "birthday at 10:00 in the contact's time zone, every year",
        BIRTHDAY,
        """\
- {at: "2026-03-14T10:00:00Z", type: profile.updated,
   contact: {email: ada@example.org, birthday: "1990-03-20", consent: {email: granted}}}
- {at: "2026-03-14T10:00:00Z", type: profile.updated,
   contact: {email: ny@example.org, birthday: "1985-03-21", timezone: America/New_York, consent: {email: granted}}}
- {at: "2027-03-22T00:00:00Z", end: true}
""",
        [
            ("2026-03-20T09:00:00Z", "birthday", 1, "ada@example.org", "send", "email", None),  # CET, UTC+1
            ("2026-03-21T14:00:00Z", "birthday", 1, "ny@example.org", "send", "email", None),  # EDT, UTC-4
            ("2027-03-20T09:00:00Z", "birthday", 1, "ada@example.org", "send", "email", None),
            ("2027-03-21T14:00:00Z", "birthday", 1, "ny@example.org", "send", "email", None),
        ],
    ),
]

CONFIG = """\
public_url: https://hooks.example.com
timezone: Europe/Paris
storage: {{url: '{db_url}'}}
{sources}sinks:
  email: {{plugin: smtp, host: 127.0.0.1, port: {port}, tls: none, sender: shop@example.com}}
  sms: {{plugin: twilio, account_sid: {account}, auth_token: {token}, sender: '+33700000000', api_base: '{twilio}'}}
{policies}{extra}rules:
{rules}"""
TEMPLATES = {
    "t.txt.j2": "{{ rule }} {{ step }} about {{ contact.email }}",
    "t.subject.j2": "{{ rule }} {{ step }}",
    "t.html.j2": '<p>{{ rule }} <a href="https://shop.example.com/">shop</a></p>',
}


def write(tmp_path: Path, recipe: Recipe, db_url: str, port: int, twilio: str, live: bool = True) -> tuple[Path, Path]:
    text = CONFIG.format(
        db_url=db_url,
        port=port,
        twilio=twilio,
        account=ACCOUNT,
        token=TOKEN,
        policies=recipe.policies,
        extra=recipe.extra,
        rules=recipe.rules,
        sources="sources:\n  tl: {plugin: test_timeline, url_token: tok}\n" if live else "",
    )
    config = write_deployment(tmp_path, text, TEMPLATES)
    timeline = tmp_path / "timeline.yaml"
    timeline.write_text(recipe.timeline)
    return config, timeline


def check(seen: list[dict[str, Any]], recipe: Recipe) -> None:
    got = [
        (d["at"], d["rule"], d["step"], d["contact"], d["action"], d["via"], d["reason"])
        for d in seen
        if d["action"] not in ("enrolled", "not_enrolled")
    ]
    # Decisions made at the same moment may be journalled in either order by concurrent jobs.
    got.sort(key=lambda d: tuple(map(str, d[:5])))
    expected = sorted(recipe.expected, key=lambda d: tuple(map(str, d[:5])))
    shown = "\n".join(map(str, got))
    assert [g[:6] for g in got] == [e[:6] for e in expected], shown
    for actual, wanted in zip(got, expected, strict=True):
        assert wanted[6] is None or (actual[6] or "").startswith(wanted[6]), shown


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_simulated(recipe: Recipe, tmp_path: Path) -> None:
    config, timeline = write(tmp_path, recipe, f"sqlite:///{tmp_path}/never.db", 1, "http://127.0.0.1:1", live=False)
    result = CliRunner().invoke(cli, ["simulate", "--config", str(config), str(timeline)])
    failed = [e for e in recipe.expected if e[4] == "failed"]
    assert result.exit_code == (1 if failed else 0), result.output  # a failed step makes simulate say so
    assert result.stderr.count("failed: rule ") == len(failed)
    check([json.loads(line) for line in result.stdout.splitlines()], recipe)


@pytest.fixture
async def twilio() -> Any:
    app = web.Application()
    server = TestServer(app, host="127.0.0.1")
    fake = FakeTwilio(server)
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    await server.start_server()
    yield fake
    fake.release.set()
    await server.close()


@dataclass
class Live:
    gateway: RunningGateway
    clock: FakeClock
    items: list[TimelineItem]
    client: Any

    async def play(self) -> list[dict[str, Any]]:
        async def post(gateway: RunningGateway, item: TimelineItem, index: int) -> None:
            response = await self.client.post("/hooks/tl/tok", data=item.model_dump_json().encode())
            assert response.status == 200

        await play(self.gateway, self.clock, self.items, inject=post)
        seen: list[dict[str, Any]] = await self.gateway.db.run(decisions)
        return seen

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        with self.gateway.db.engine.connect() as conn:
            return [tuple(row) for row in conn.exec_driver_sql(sql)]


async def start(
    tmp_path: Path, recipe: Recipe, db_url: str, smtp: SmtpCatcher, twilio: FakeTwilio, aiohttp_client: Any
) -> Live:
    pm = get_plugin_manager(extra=[Plugin()])
    config, timeline = write(tmp_path, recipe, db_url, smtp.port, twilio.base)
    settings = load_config(config, collect(pm), pm)
    items = load_timeline(timeline, settings.timezone)
    clock = FakeClock(items[0].at)
    app = create_app(settings, pm=pm, clock=clock, role="web")
    client = await aiohttp_client(app)
    return Live(app[GATEWAY_KEY], clock, items, client)


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
async def test_live(
    recipe: Recipe, tmp_path: Path, db_url: str, smtp: SmtpCatcher, twilio: FakeTwilio, aiohttp_client: Any
) -> None:
    live = await start(tmp_path, recipe, db_url, smtp, twilio, aiohttp_client)
    seen = await live.play()
    check(seen, recipe)
    sent = [(d["via"], d["reason"], d["contact"], d["rule"], d["step"]) for d in seen if d["action"] == "send"]
    mails = sorted((m["To"], m["Subject"]) for m in smtp.messages)
    texts = sorted((r.form["To"][0], r.form["Body"][0]) for r in twilio.requests)
    internal = "internal: to "
    assert mails == sorted(
        ((reason or internal + contact).removeprefix(internal), f"{rule} {step}")
        for via, reason, contact, rule, step in sent if via == "email"
    )  # fmt: skip
    phones = dict(live.rows("SELECT email, phone FROM contacts"))
    assert texts == sorted(
        (phones[contact], f"{rule} {step} about {contact}") for via, _, contact, rule, step in sent if via == "sms"
    )


README = Path(__file__).parent.parent / "README.md"


def test_the_readme_recipes_are_the_ones_tested() -> None:
    """The README's recipes are these rules, template names aside: what a reader copies works."""
    section = README.read_text(encoding="utf-8").split("\n## Recipes\n", 1)[1].split("\n## ", 1)[0]
    documented = {
        title: yaml.safe_load(body) for title, body in re.findall(r"### (.+?)\n.*?```yaml\n(.*?)```", section, re.S)
    }
    tested = {"Event reminder": RECIPES[0], "Lead alert": RECIPES[1], "SMS or e-mail": RECIPES[2]}
    tested |= {"Welcome series": RECIPES[4], "Abandoned cart": RECIPES[5], "Birthday": RECIPES[6]}
    assert set(tested) <= set(documented)  # other recipes may follow
    for title, recipe in tested.items():
        config = documented[title]
        for rule in config["rules"]:
            for step in rule.get("steps") or [rule]:
                step["send"]["template"] = "t"
        assert config["rules"] == yaml.safe_load(recipe.rules), title
        assert config.get("scoring") == (yaml.safe_load(recipe.extra) or {}).get("scoring"), title
        consent = yaml.safe_load(recipe.policies)["policies"]["consent"]
        assert config.get("policies", {"consent": consent})["consent"] == consent, title


# --- what the table does not show -------------------------------------------------------------------------------


async def test_internal_alerts_are_not_the_contacts_messages(
    tmp_path: Path, db_url: str, smtp: SmtpCatcher, twilio: FakeTwilio, aiohttp_client: Any
) -> None:
    """Neither counted in the rule's KPIs nor under the contact's pressure cap (max 1 per 7 days): the lead still
    gets its own welcome after two internal alerts about it; no unsubscribe link or tracking goes to the rep."""
    recipe = Recipe(
        "",
        LEAD_ALERT + "  - {name: welcome, when: order.placed, send: {via: email, template: t}}\n",
        """\
- {at: "2026-03-14T10:00:00Z", type: page.viewed, contact: {email: lead@example.org, consent: {email: granted},
   attributes: {owner_email: rep@example.com}}}
- {at: "2026-03-14T10:01:00Z", type: page.viewed, contact: {email: lead@example.org}}
- {at: "2026-03-14T10:02:00Z", type: page.viewed, contact: {email: lead@example.org}}
- {at: "2026-03-14T10:05:00Z", type: order.placed, contact: {email: lead@example.org}}
""",
        [],
        policies="policies: {consent: {email: required}, pressure: {max: 1, per: 7d}}\n",
        extra="scoring: {page.viewed: 20}\n",
    )
    live = await start(tmp_path, recipe, db_url, smtp, twilio, aiohttp_client)
    seen = await live.play()
    assert sorted((d["rule"], d["action"]) for d in seen if d["action"] not in ("enrolled", "not_enrolled")) == [
        ("lead-alert", "send"),
        ("owner-alert", "send"),
        ("welcome", "send"),
    ]
    assert sorted(live.rows("SELECT rule, kind, status FROM deliveries")) == [
        ("lead-alert", "internal", "sent"),
        ("owner-alert", "internal", "sent"),
        ("welcome", "marketing", "sent"),
    ]
    [own] = smtp.to("lead@example.org")
    internal = [m for m in smtp.messages if m is not own]
    assert sorted(m["To"] for m in internal) == ["rep@example.com", "sales@example.com"]
    assert own["List-Unsubscribe"] and not any(m["List-Unsubscribe"] for m in internal)
    assert "/t/o/" in own.as_string() and not any("/t/" in m.as_string() for m in internal)
    until = live.clock.now() + timedelta(days=1)
    kpis = {k.rule: sum(s.sent for s in k.steps) for k in await live.gateway.db.run(
        rule_kpis, ["lead-alert", "owner-alert", "welcome"], datetime(2026, 1, 1, tzinfo=UTC), until
    )}  # fmt: skip
    assert kpis == {"lead-alert": 0, "owner-alert": 0, "welcome": 1}


FALLBACK = Recipe(
    "",
    SMS_OR_EMAIL,
    """\
- {at: "2026-03-14T10:00:00Z", type: order.fulfilled, correlation: "order:1",
   contact: {email: both@example.org, phone: "+33612345678", consent: {sms: granted, email: granted}}}
""",
    [],
    extra="worker: {retry_base: 10s, max_attempts: 3}\n",
)


async def test_a_permanent_sms_failure_falls_back_to_email_once(
    tmp_path: Path, db_url: str, smtp: SmtpCatcher, twilio: FakeTwilio, aiohttp_client: Any
) -> None:
    twilio.replies = [(400, error(21211, "The 'To' number +33612345678 is not a valid phone number."), {})]
    live = await start(tmp_path, FALLBACK, db_url, smtp, twilio, aiohttp_client)
    seen = await live.play()
    steps = [(d["action"], d["via"], d["reason"]) for d in seen if d["action"] != "enrolled"]
    assert [s[:2] for s in steps] == [("failed", "sms"), ("send", "email")]
    assert steps[0][2].startswith("address invalid: Twilio 21211") and steps[0][2].endswith("; trying email")
    assert len(twilio.requests) == 1 and [m["To"] for m in smtp.messages] == ["both@example.org"]
    assert sorted(live.rows("SELECT sink, status FROM deliveries")) == [("email", "sent"), ("sms", "address_invalid")]
    assert live.rows("SELECT status FROM enrolments") == [("completed",)]
    # the step is over: replaying its job (a dead-letter replay, a crash before the job closed) sends nothing more
    with live.gateway.db.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE jobs SET status = 'pending' WHERE kind = 'step'")
    await live.gateway.worker.drain()
    assert len(twilio.requests) == 1 and len(smtp.messages) == 1


async def test_a_temporary_sms_failure_retries_sms_never_email(
    tmp_path: Path, db_url: str, smtp: SmtpCatcher, twilio: FakeTwilio, aiohttp_client: Any
) -> None:
    twilio.replies = [(503, b"Service Unavailable", {}), (201, created(), {})]
    live = await start(tmp_path, FALLBACK, db_url, smtp, twilio, aiohttp_client)
    seen = await live.play()
    assert [(d["action"], d["via"]) for d in seen if d["action"] != "enrolled"] == [("send", "sms")]
    assert len(twilio.requests) == 2 and smtp.messages == []
    assert live.rows("SELECT sink, status, attempts FROM deliveries") == [("sms", "sent", 2)]


async def test_when_every_channel_fails_for_good_the_journey_goes_on(
    tmp_path: Path, db_url: str, smtp: SmtpCatcher, twilio: FakeTwilio, aiohttp_client: Any
) -> None:
    twilio.replies = [(400, error(21610, "Attempt to send to unsubscribed recipient"), {})]
    smtp.refuse = {"both@example.org": "550 5.1.1 No such user"}
    live = await start(tmp_path, FALLBACK, db_url, smtp, twilio, aiohttp_client)
    seen = await live.play()
    steps = [(d["action"], d["via"], d["reason"]) for d in seen if d["action"] != "enrolled"]
    assert [s[:2] for s in steps] == [("failed", "sms"), ("failed", "email")]
    assert steps[0][2].startswith("the recipient opted out") and steps[0][2].endswith("; trying email")
    assert "trying" not in steps[1][2]
    assert sorted(live.rows("SELECT sink, status FROM deliveries")) == [
        ("email", "address_invalid"),
        ("sms", "opted_out"),
    ]
    assert live.rows("SELECT status FROM enrolments") == [("completed",)]
    assert len(twilio.requests) == 1 and smtp.messages == []


# --- bad input: `file:line:col: path: message`, and nothing starts ---------------------------------------------

_RULE0 = "send: {via: email, template: welcome}\n  - name: cart"
_STEP = "      - wait: 1h\n        send: {via: email, template: welcome}\n"
_AT = "      - at: '{{ event.properties.starts_at }}'\n"
_SEND = "        send: {via: email, template: welcome}\n"

# (case, (old, new) in test_config's VALID, the error line after "declic.yaml:")
CONFIG_ERRORS = [
    ("to not an address", (_RULE0, 'send: {via: email, to: "sales at example.com", template: welcome}'),
     "20:28: rules[0].send.to: 'sales at example.com' is not an e-mail address: An email address must have an "
     "@-sign."),
    ("to a broken template", (_RULE0, 'send: {via: email, to: "{{ contact.owner", template: welcome}'),
     "20:28: rules[0].send.to: invalid template: unexpected end of template, expected 'end of print statement'."),
    ("to with a fallback list", (_RULE0, 'send: {via: [email, sms], to: "a@example.com", template: welcome}'),
     "20:11: rules[0].send: `to:` names one recipient: give it one sink in `via`, not a fallback list"),
    ("via an empty list", (_RULE0, "send: {via: [], template: welcome}"),
     "20:17: rules[0].send.via: expected a sink name, or a list of sink names tried in turn, such as [sms, email]"),
    ("via a number", (_RULE0, "send: {via: 3, template: welcome}"),
     "20:17: rules[0].send.via: expected a sink name, or a list of sink names tried in turn, such as [sms, email]"),
    ("via a sink twice", (_RULE0, "send: {via: [email, email], template: welcome}"),
     "20:17: rules[0].send.via: a sink is named twice: each channel is tried once"),
    ("via an unknown sink in the list", (_RULE0, "send: {via: [email, sms], template: welcome}"),
     "20:25: rules[0].send.via[1]: no sink named 'sms' under `sinks:` (configured: email)"),
    ("wait and at", (_STEP, "      - wait: 1h\n        at: '{{ event.properties.starts_at }}'\n" + _SEND),
     "26:9: rules[1].steps[0]: a step is due either after `wait` or at `at`, not both"),
    ("offset without at", (_STEP, "      - offset: -1d\n" + _SEND),
     "26:9: rules[1].steps[0]: `offset` and `time` shift the moment of `at`: add `at`"),
    ("at a broken template", (_STEP, "      - at: '{{ event.properties.starts_at'\n" + _SEND),
     "26:13: rules[1].steps[0].at: invalid template: unexpected end of template, expected 'end of print "
     "statement'."),
    ("time not a time", (_STEP, _AT + "        time: '25:00'\n" + _SEND),
     "27:15: rules[1].steps[0].time: invalid time of day '25:00': write HH:MM, as 10:00 or 21:30"),
    ("offset not a duration", (_STEP, _AT + "        offset: -1 day\n" + _SEND),
     "27:17: rules[1].steps[0].offset: invalid duration '1 day': write a number and a unit, as 90s, 5m, 1h, 3d "
     "or 2w (or 250ms), several as 1h30m, or ISO 8601 as P1DT12H"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "change", "expected"), CONFIG_ERRORS, ids=[e[0] for e in CONFIG_ERRORS])
def test_bad_values_name_file_line_column_path(
    tmp_path: Path, case: str, change: tuple[str, str], expected: str
) -> None:
    old, new = change
    new += old[old.index("\n") :] if old == _RULE0 else ""  # the rule after it stays
    code, output = config_check(tmp_path, config_edit(old, new), {"SHOP_SECRET": "x"})
    assert code == 2
    assert f"{tmp_path / 'declic.yaml'}:{expected}" in output.splitlines(), output
