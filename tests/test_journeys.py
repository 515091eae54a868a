"""Every trigger kind and guard rail, as timelines: through `declic simulate`, and through the real
server over HTTP with a real SMTP server. Both must make the same decisions at the same times."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from pydantic import SecretStr

from declic_gateway import PluginConfig, Source, hookimpl
from declic_gateway.cli.main import cli
from declic_gateway.cli.simulate import TimelineItem, TimelineSource, decisions, load_timeline, play
from declic_gateway.config import load_config
from declic_gateway.http.app import create_app
from declic_gateway.http.running import GATEWAY_KEY, RunningGateway
from declic_gateway.pipeline import plan
from declic_gateway.plugins import collect, get_plugin_manager
from declic_gateway.store.inbox import NewCall
from declic_gateway.testing import FakeClock, ScriptedPlugin, SmtpCatcher, write_deployment

Expected = tuple[str, str, int | None, str, str, str | None]  # at, rule, step, contact, action, reason prefix


@dataclass
class Scenario:
    name: str
    rules: str
    timeline: str
    expected: list[Expected]
    policies: str = "policies: {consent: {email: required}}\n"
    extra: str = ""
    ids: list[str] = field(default_factory=list)
    #: Whether `expected` lists the enrolment decisions too (enrolled, not_enrolled).
    enrolments: bool = False


SCENARIOS = [
    Scenario(
        "cart reminder cancelled by the order",
        """\
  - name: abandoned-cart
    when: checkout.started
    if: "event.properties.total_price > 20"
    exit_on: [order.placed]
    steps:
      - wait: 1h
        send: {via: email, template: t}
      - wait: 1d
        send: {via: email, template: t}
""",
        """\
- {at: "2026-03-14T09:00:00Z", type: checkout.started, correlation: "checkout:abc",
   contact: {email: camille@example.org, consent: {email: granted}}, properties: {total_price: 59.9}}
- {at: "2026-03-14T09:30:00Z", type: checkout.started, correlation: "checkout:def",
   contact: {email: noah@example.org, consent: {email: granted}}, properties: {total_price: 80}}
- {at: "2026-03-14T09:35:00Z", type: checkout.started, correlation: "checkout:ghi",
   contact: {email: low@example.org, consent: {email: granted}}, properties: {total_price: 15}}
- {at: "2026-03-14T09:40:00Z", type: order.placed, correlation: ["order:1", "checkout:abc"],
   contact: {email: camille@example.org}}
""",
        [
            ("2026-03-14T09:40:00Z", "abandoned-cart", 1, "camille@example.org", "exited", "exit_on order.placed"),
            ("2026-03-14T10:30:00Z", "abandoned-cart", 1, "noah@example.org", "send", None),
            ("2026-03-15T10:30:00Z", "abandoned-cart", 2, "noah@example.org", "send", None),
        ],
    ),
    Scenario(
        "birthday at 10:00 in Paris and in New York",
        """\
  - name: birthday
    on_date: contact.birthday
    at: "10:00"
    send: {via: email, template: t}
""",
        """\
- {at: "2026-06-01T00:00:00Z", type: profile.updated,
   contact: {email: paris@example.org, timezone: Europe/Paris, birthday: "1990-06-15", consent: {email: granted}}}
- {at: "2026-06-01T00:00:00Z", type: profile.updated,
   contact: {email: ny@example.org, timezone: America/New_York, birthday: "1985-06-15", consent: {email: granted}}}
- {at: "2026-06-20T00:00:00Z", end: true}
""",
        [
            ("2026-06-15T08:00:00Z", "birthday", 1, "paris@example.org", "send", None),
            ("2026-06-15T14:00:00Z", "birthday", 1, "ny@example.org", "send", None),
        ],
    ),
    Scenario(
        "29 February: the 28th in common years, the 29th in leap years",
        """\
  - name: birthday
    on_date: contact.birthday
    at: "10:00"
    send: {via: email, template: t}
""",
        """\
- {at: "2027-01-01T00:00:00Z", type: profile.updated,
   contact: {email: leap@example.org, timezone: UTC, birthday: "2000-02-29", consent: {email: granted}}}
- {at: "2028-03-05T00:00:00Z", end: true}
""",
        [
            ("2027-02-28T10:00:00Z", "birthday", 1, "leap@example.org", "send", None),
            ("2028-02-29T10:00:00Z", "birthday", 1, "leap@example.org", "send", None),
        ],
    ),
    Scenario(
        "trial ending 5 days before, once",
        """\
  - name: trial-ending
    on_date: contact.attributes.trial_ends_at
    offset: -5d
    at: "09:30"
    send: {via: email, template: t}
""",
        """\
- {at: "2026-04-01T00:00:00Z", type: profile.updated,
   contact: {email: trial@example.org, timezone: UTC, attributes: {trial_ends_at: "2026-04-20"},
             consent: {email: granted}}}
- {at: "2027-06-01T00:00:00Z", end: true}
""",
        [("2026-04-15T09:30:00Z", "trial-ending", 1, "trial@example.org", "send", None)],
    ),
    Scenario(
        "concert reminder the day before at 10:00, from the date each ticket carries; too late is skipped",
        """\
  - name: concert-reminder
    on_date: event.properties.starts_at
    of: [ticket.ordered]
    offset: -1d
    at: "10:00"
    send: {via: email, template: t}
""",
        """\
- {at: "2026-05-01T00:00:00Z", type: ticket.ordered, properties: {starts_at: "2026-05-20T18:00:00Z"},
   contact: {email: paris@example.org, timezone: Europe/Paris, consent: {email: granted}}}
- {at: "2026-05-02T00:00:00Z", type: ticket.ordered, properties: {starts_at: "2026-06-10T17:00:00Z"},
   contact: {email: paris@example.org}}
- {at: "2026-05-25T12:00:00Z", type: ticket.ordered, properties: {starts_at: "2026-05-25T20:00:00Z"},
   contact: {email: late@example.org, timezone: UTC, consent: {email: granted}}}
- {at: "2026-05-26T00:00:00Z", type: ticket.ordered, properties: {note: "no date"},
   contact: {email: nodate@example.org, timezone: UTC, consent: {email: granted}}}
- {at: "2026-07-01T00:00:00Z", end: true}
""",
        [
            ("2026-05-19T08:00:00Z", "concert-reminder", None, "paris@example.org", "enrolled", None),
            ("2026-05-19T08:00:00Z", "concert-reminder", 1, "paris@example.org", "send", None),
            ("2026-05-25T12:00:00Z", "concert-reminder", 1, "late@example.org", "suppressed", "missed: due 2026-05-24"),
            ("2026-05-26T00:00:00Z", "concert-reminder", None, "nodate@example.org", "not_enrolled", "no date at "),
            ("2026-06-09T08:00:00Z", "concert-reminder", None, "paris@example.org", "enrolled", None),
            ("2026-06-09T08:00:00Z", "concert-reminder", 1, "paris@example.org", "send", None),
        ],
        enrolments=True,
    ),
    Scenario(
        "membership anniversary, yearly, from a nested date the event carries",
        """\
  - name: anniversary
    on_date: event.properties.member.joined_on
    of: track.member_joined
    repeat: yearly
    send: {via: email, template: t}
""",
        """\
- {at: "2026-03-10T00:00:00Z", type: track.member_joined, properties: {member: {joined_on: "2025-03-20"}},
   contact: {email: member@example.org, timezone: UTC, consent: {email: granted}}}
- {at: "2027-04-01T00:00:00Z", end: true}
""",
        [
            ("2026-03-20T09:00:00Z", "anniversary", 1, "member@example.org", "send", None),
            ("2027-03-20T09:00:00Z", "anniversary", 1, "member@example.org", "send", None),
        ],
    ),
    Scenario(
        "inactivity fires once per quiet period and is re-armed by the next order",
        """\
  - name: win-back
    inactive_for: 30d
    of: [order.placed]
    send: {via: email, template: t}
""",
        """\
- {at: "2026-01-01T12:00:00Z", type: order.placed, correlation: "order:1",
   contact: {email: buyer@example.org, consent: {email: granted}}}
- {at: "2026-01-11T12:00:00Z", type: order.placed, correlation: "order:2", contact: {email: buyer@example.org}}
- {at: "2026-02-20T12:00:00Z", type: order.placed, correlation: "order:3", contact: {email: buyer@example.org}}
- {at: "2026-05-01T00:00:00Z", end: true}
""",
        [
            ("2026-02-10T12:00:00Z", "win-back", 1, "buyer@example.org", "send", None),
            ("2026-03-22T12:00:00Z", "win-back", 1, "buyer@example.org", "send", None),
        ],
    ),
    Scenario(
        "a score crossing 50 twice fires twice; staying above does not",
        """\
  - name: hot-lead
    score_reaches: 50
    kind: transactional
    send: {via: email, template: t}
""",
        """\
- {at: "2026-01-01T00:00:00Z", type: email.clicked, contact: {email: lead@example.org}}
- {at: "2026-01-01T01:00:00Z", type: email.clicked, contact: {email: lead@example.org}}
- {at: "2026-01-01T02:00:00Z", type: email.clicked, contact: {email: lead@example.org}}
- {at: "2026-01-04T00:00:00Z", type: email.clicked, contact: {email: lead@example.org}}
- {at: "2026-01-04T01:00:00Z", type: email.clicked, contact: {email: lead@example.org}}
- {at: "2026-01-05T00:00:00Z", end: true}
""",
        [
            ("2026-01-01T01:00:00Z", "hot-lead", 1, "lead@example.org", "send", None),
            ("2026-01-04T01:00:00Z", "hot-lead", 1, "lead@example.org", "send", None),
        ],
        extra="scoring: {email.clicked: 30, half_life: 1d}\n",
    ),
    Scenario(
        "marketing waits out quiet hours and the pressure cap; transactional goes through",
        """\
  - name: promo
    when: track.promo
    send: {via: email, template: t}
  - name: receipt
    when: order.placed
    kind: transactional
    send: {via: email, template: t}
""",
        """\
- {at: "2026-01-10T21:00:00Z", type: track.promo, correlation: "promo:1",
   contact: {email: p@example.org, timezone: Europe/Paris, consent: {email: granted}}}
- {at: "2026-01-10T21:05:00Z", type: order.placed, correlation: "order:9", contact: {email: p@example.org}}
- {at: "2026-01-11T09:00:00Z", type: track.promo, correlation: "promo:2", contact: {email: p@example.org}}
- {at: "2026-01-15T00:00:00Z", end: true}
""",
        [
            ("2026-01-10T21:00:00Z", "promo", 1, "p@example.org", "deferred", "quiet hours until 08:30 Europe/Paris"),
            ("2026-01-10T21:05:00Z", "receipt", 1, "p@example.org", "send", None),
            ("2026-01-11T07:30:00Z", "promo", 1, "p@example.org", "send", None),
            ("2026-01-11T09:00:00Z", "promo", 1, "p@example.org", "deferred", "marketing pressure: 1 of 1 per 1d"),
            ("2026-01-12T07:30:00Z", "promo", 1, "p@example.org", "send", None),
        ],
        policies="""\
policies:
  consent: {email: required}
  quiet_hours: {start: "21:00", end: "08:30"}
  pressure: {max: 1, per: 1d}
""",
    ),
    Scenario(
        "over the cap past max_delay, the step is dropped with the reason",
        """\
  - name: promo
    when: track.promo
    send: {via: email, template: t}
""",
        """\
- {at: "2026-01-10T10:00:00Z", type: track.promo, correlation: "promo:1",
   contact: {email: p@example.org, consent: {email: granted}}}
- {at: "2026-01-10T11:00:00Z", type: track.promo, correlation: "promo:2", contact: {email: p@example.org}}
""",
        [
            ("2026-01-10T10:00:00Z", "promo", 1, "p@example.org", "send", None),
            (
                "2026-01-10T11:00:00Z",
                "promo",
                1,
                "p@example.org",
                "suppressed",
                "marketing pressure: 1 of 1 per 1d; dropped: would wait past max_delay",
            ),
        ],
        policies="policies: {consent: {email: required}, pressure: {max: 1, per: 1d, max_delay: 2h}}\n",
    ),
    Scenario(
        "an unsubscribe between step 1 and step 2 suppresses step 2, with the reason",
        """\
  - name: nurture
    when: track.signed_up
    steps:
      - send: {via: email, template: t}
      - wait: 2d
        send: {via: email, template: t}
""",
        """\
- {at: "2026-02-01T10:00:00Z", type: track.signed_up, correlation: "signup:1",
   contact: {email: u@example.org, consent: {email: granted}}}
- {at: "2026-02-02T10:00:00Z", type: email.unsubscribed, contact: {email: u@example.org, consent: {email: withdrawn}}}
""",
        [
            ("2026-02-01T10:00:00Z", "nurture", 1, "u@example.org", "send", None),
            (
                "2026-02-03T10:00:00Z",
                "nurture",
                2,
                "u@example.org",
                "suppressed",
                "no email consent (state: withdrawn)",
            ),
        ],
    ),
    Scenario(
        "a goal ends the journey and is counted",
        """\
  - name: nurture
    when: track.signed_up
    goal: order.placed
    steps:
      - send: {via: email, template: t}
      - wait: 2d
        send: {via: email, template: t}
""",
        """\
- {at: "2026-02-01T10:00:00Z", type: track.signed_up, correlation: "signup:1",
   contact: {email: g@example.org, consent: {email: granted}}}
- {at: "2026-02-02T10:00:00Z", type: order.placed, correlation: "order:5", contact: {email: g@example.org}}
""",
        [
            ("2026-02-01T10:00:00Z", "nurture", 1, "g@example.org", "send", None),
            ("2026-02-02T10:00:00Z", "nurture", 2, "g@example.org", "goal", "goal order.placed"),
        ],
    ),
    Scenario(
        "why a matching event did not enrol: the if, the occurrence already enrolled, reenter",
        """\
  - name: cart
    when: checkout.started
    if: "event.properties.total_price > 20"
    reenter: {after: 30d}
    steps:
      - wait: 1h
        send: {via: email, template: t}
""",
        """\
- {at: "2026-03-01T10:00:00Z", type: checkout.started, correlation: "checkout:1",
   properties: {total_price: 9.5}, contact: {email: w@example.org, consent: {email: granted}}}
- {at: "2026-03-01T10:05:00Z", type: checkout.started, correlation: "checkout:2",
   properties: {total_price: 80}, contact: {email: w@example.org}}
- {at: "2026-03-01T10:10:00Z", type: checkout.started, correlation: "checkout:2",
   properties: {total_price: 80}, contact: {email: w@example.org}}
- {at: "2026-03-05T10:00:00Z", type: checkout.started, correlation: "checkout:3",
   properties: {total_price: 90}, contact: {email: w@example.org}}
""",
        [
            ("2026-03-01T10:00:00Z", "cart", None, "w@example.org", "not_enrolled", "if false: event.properties.total"),
            ("2026-03-01T10:05:00Z", "cart", None, "w@example.org", "enrolled", None),
            ("2026-03-01T10:10:00Z", "cart", None, "w@example.org", "not_enrolled", "reenter after 30d: enrolled 2026"),
            ("2026-03-01T11:05:00Z", "cart", 1, "w@example.org", "send", None),
            ("2026-03-05T10:00:00Z", "cart", None, "w@example.org", "not_enrolled", "reenter after 30d: enrolled 2026"),
        ],
        enrolments=True,
    ),
    Scenario(
        "a goal counts within the attribution window after a message, with its revenue; not before, not after",
        """\
  - name: cart
    when: checkout.started
    goal: order.placed
    exit_on: order.placed
    attribution: 2d
    steps:
      - wait: 1h
        send: {via: email, template: t}
""",
        """\
- {at: "2026-03-01T10:00:00Z", type: checkout.started, correlation: "checkout:1",
   contact: {email: a@example.org, consent: {email: granted}}}
- {at: "2026-03-01T10:30:00Z", type: order.placed, correlation: "checkout:1",
   properties: {total_price: 42.5, currency: eur},
   contact: {email: a@example.org}}
- {at: "2026-03-01T10:00:00Z", type: checkout.started, correlation: "checkout:2",
   contact: {email: b@example.org, consent: {email: granted}}}
- {at: "2026-03-02T09:00:00Z", type: order.placed, correlation: "checkout:2",
   properties: {total_price: 59.9, currency: EUR},
   contact: {email: b@example.org}}
- {at: "2026-03-01T10:01:00Z", type: checkout.started, correlation: "checkout:3",
   contact: {email: c@example.org, consent: {email: granted}}}
- {at: "2026-03-04T09:00:00Z", type: order.placed, correlation: "checkout:3",
   properties: {total_price: 10, currency: EUR},
   contact: {email: c@example.org}}
""",
        [
            ("2026-03-01T10:30:00Z", "cart", 1, "a@example.org", "goal", "goal order.placed: not counted, no message"),
            ("2026-03-01T11:00:00Z", "cart", 1, "b@example.org", "send", None),
            ("2026-03-01T11:01:00Z", "cart", 1, "c@example.org", "send", None),
            (
                "2026-03-02T09:00:00Z",
                "cart",
                None,
                "b@example.org",
                "goal",
                "goal order.placed: converted: step 1 of 2026-03-01 11:00 UTC (59.90 EUR)",
            ),
            # c's order comes 2 days after the journey completed: out of the window, nothing to end or count.
        ],
    ),
    Scenario(
        "re-entry only after 30 days; a behavioural absence journey exits on the order",
        """\
  - name: browse
    when: page.viewed
    reenter: {after: 30d}
    exit_on: [order.placed]
    steps:
      - wait: 1d
        send: {via: email, template: t}
""",
        """\
- {at: "2026-03-01T10:00:00Z", type: page.viewed, contact: {email: v@example.org, consent: {email: granted}}}
- {at: "2026-03-11T10:00:00Z", type: page.viewed, contact: {email: v@example.org}}
- {at: "2026-04-10T10:00:00Z", type: page.viewed, contact: {email: v@example.org}}
- {at: "2026-04-10T15:00:00Z", type: order.placed, correlation: "order:8", contact: {email: v@example.org}}
""",
        [
            ("2026-03-02T10:00:00Z", "browse", 1, "v@example.org", "send", None),
            ("2026-04-10T15:00:00Z", "browse", 1, "v@example.org", "exited", "exit_on order.placed"),
        ],
    ),
    Scenario(
        "reenter: never, once per contact whatever the occurrence, a year later included",
        """\
  - name: first-order
    when: order.placed
    kind: transactional
    reenter: never
    send: {via: email, template: t}
""",
        """\
- {at: "2026-03-01T10:00:00Z", type: order.placed, correlation: "order:1", contact: {email: n@example.org}}
- {at: "2027-03-01T10:00:00Z", type: order.placed, correlation: "order:2", contact: {email: n@example.org}}
- {at: "2027-03-01T10:00:00Z", type: order.placed, correlation: "order:3", contact: {email: m@example.org}}
""",
        [
            ("2026-03-01T10:00:00Z", "first-order", 1, "n@example.org", "send", None),
            ("2027-03-01T10:00:00Z", "first-order", 1, "m@example.org", "send", None),
        ],
    ),
]

CONFIG = """\
public_url: https://hooks.example.com
timezone: Europe/Paris
storage: {{url: '{db_url}'}}
{sources}sinks:
  email: {{plugin: smtp, host: 127.0.0.1, port: {port}, tls: none, sender: shop@example.com}}
{policies}{extra}rules:
{rules}"""
TEMPLATES = {"t.txt.j2": "Hello {{ contact.first_name or contact.email }}", "t.subject.j2": "{{ rule }} {{ step }}"}


class TimelineConfig(PluginConfig):
    url_token: SecretStr


class HttpTimeline(TimelineSource):
    """Test-only: the simulator's timeline items, posted over real HTTP."""

    name = "test_timeline"
    Config = TimelineConfig
    needs_url_token = True


class Plugin:
    @hookimpl
    def register_sources(self, register: Callable[[type[Source]], None]) -> None:
        register(HttpTimeline)


def write(tmp_path: Path, scenario: Scenario, db_url: str, port: int, live: bool = True) -> tuple[Path, Path]:
    sources = "sources:\n  tl: {plugin: test_timeline, url_token: tok}\n" if live else ""
    text = CONFIG.format(
        db_url=db_url,
        port=port,
        policies=scenario.policies,
        extra=scenario.extra,
        rules=scenario.rules,
        sources=sources,
    )
    config = write_deployment(tmp_path, text, TEMPLATES)
    timeline = tmp_path / "timeline.yaml"
    timeline.write_text(scenario.timeline)
    return config, timeline


ENROLMENT_DECISIONS = ("enrolled", "not_enrolled")


def check(seen: list[dict[str, Any]], scenario: Scenario) -> None:
    expected = scenario.expected
    if not scenario.enrolments:
        seen = [d for d in seen if d["action"] not in ENROLMENT_DECISIONS]
    got = [(d["at"], d["rule"], d["step"], d["contact"], d["action"], d["reason"]) for d in seen]
    assert len(got) == len(expected), "\n".join(map(str, got))
    for actual, wanted in zip(got, expected, strict=True):
        assert actual[:5] == wanted[:5], "\n".join(map(str, got))
        if wanted[5] is not None:
            assert (actual[5] or "").startswith(wanted[5]), actual


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_simulated(scenario: Scenario, tmp_path: Path) -> None:
    config, timeline = write(tmp_path, scenario, f"sqlite:///{tmp_path}/never-touched.db", 1, live=False)
    result = CliRunner().invoke(cli, ["simulate", "--config", str(config), str(timeline)])
    assert result.exit_code == 0, result.output
    check([json.loads(line) for line in result.output.splitlines()], scenario)
    assert not (tmp_path / "never-touched.db").exists()


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
async def test_live(scenario: Scenario, tmp_path: Path, db_url: str, smtp: SmtpCatcher, aiohttp_client: Any) -> None:
    pm = get_plugin_manager(extra=[Plugin()])
    config, timeline = write(tmp_path, scenario, db_url, smtp.port)
    settings = load_config(config, collect(pm), pm)
    items = load_timeline(timeline, settings.timezone)
    clock = FakeClock(items[0].at)
    app = create_app(settings, pm=pm, clock=clock, role="web")
    client = await aiohttp_client(app)
    gateway: RunningGateway = app[GATEWAY_KEY]

    async def post(gateway: RunningGateway, item: TimelineItem, index: int) -> None:
        response = await client.post("/hooks/tl/tok", data=item.model_dump_json().encode())
        assert response.status == 200

    await play(gateway, clock, items, inject=post)
    seen = await gateway.db.run(decisions)
    check(seen, scenario)
    sent = sorted((d["contact"], d["rule"], d["step"]) for d in seen if d["action"] == "send")
    assert sorted((m["To"], *m["Subject"].rsplit(" ", 1)) for m in smtp.messages) == [
        (to, rule, str(step)) for to, rule, step in sent
    ]


async def test_downtime_catch_up(tmp_path: Path, db_url: str, smtp: SmtpCatcher, aiohttp_client: Any) -> None:
    """The worker is down from 09:00 to 13:00 on the birthday (10:00): one e-mail at 13:00, never two.
    A year later it is down for three days: that birthday is skipped, with the reason."""
    scenario = SCENARIOS[1]
    pm = get_plugin_manager(extra=[Plugin()])
    config, timeline = write(tmp_path, scenario, db_url, smtp.port)
    settings = load_config(config, collect(pm), pm)
    clock = FakeClock(datetime(2026, 6, 1, tzinfo=UTC))
    app = create_app(settings, pm=pm, clock=clock, role="web")
    client = await aiohttp_client(app)
    gateway: RunningGateway = app[GATEWAY_KEY]
    item = load_timeline(timeline, settings.timezone)[0]
    assert (await client.post("/hooks/tl/tok", data=item.model_dump_json().encode())).status == 200
    await gateway.worker.drain()
    clock.set(datetime(2026, 6, 15, 11, 0, tzinfo=UTC))  # 13:00 in Paris: three hours late
    await gateway.worker.drain()
    clock.set(datetime(2026, 6, 16, tzinfo=UTC))
    await gateway.worker.drain()
    assert [m["To"] for m in smtp.messages] == ["paris@example.org"]
    clock.set(datetime(2027, 6, 18, tzinfo=UTC))  # down over the whole of next year's birthday
    await gateway.worker.drain()
    seen = [d for d in await gateway.db.run(decisions) if d["action"] not in ENROLMENT_DECISIONS]
    assert [(d["at"], d["action"]) for d in seen] == [
        ("2026-06-15T11:00:00Z", "send"),
        ("2027-06-18T00:00:00Z", "suppressed"),
    ]
    assert seen[1]["reason"].startswith("missed: due 2027-06-15 08:00 UTC")
    assert len(smtp.messages) == 1


async def test_a_date_rule_added_later_reaches_existing_contacts_once(tmp_path: Path, aiohttp_client: Any) -> None:
    pm = get_plugin_manager(extra=[ScriptedPlugin()])
    base = (
        "public_url: https://hooks.example.com\n"
        + f"storage: {{url: 'sqlite:///{tmp_path}/r.db'}}\nsources:\n  in: {{plugin: scripted, url_token: tok}}\n"
    )
    sinks = "sinks:\n  email: {plugin: smtp, host: 127.0.0.1, port: 1, tls: none, sender: s@example.com}\n"
    rule = "rules:\n  - {name: birthday, on_date: contact.birthday, send: {via: email, template: t}}\n"
    clock = FakeClock(datetime(2026, 6, 1, tzinfo=UTC))

    async def start(text: str) -> RunningGateway:
        settings = load_config(write_deployment(tmp_path, text, TEMPLATES), collect(pm), pm)
        app = create_app(settings, pm=pm, clock=clock, role="web")
        await aiohttp_client(app)
        return app[GATEWAY_KEY]

    first = await start(base + sinks)
    contact = [
        {"type": "profile.updated", "contact": {"email": "b@example.org", "attributes": {"birthday": "1990-07-14"}}}
    ]
    await first.committer.submit(NewCall("in", "1", clock.now(), {}, json.dumps(contact).encode()))
    await first.worker.drain()
    first.db.close()  # SQLite serves one process: let the second one in

    second = await start(base + sinks + rule)
    await second.worker.drain()  # the start-up reconcile schedules the new rule for the existing contact
    with second.db.engine.connect() as conn:
        [(key, due)] = conn.exec_driver_sql("SELECT key, due_at FROM jobs WHERE kind = 'trigger'").all()
    assert key.startswith("date:birthday:") and str(due).startswith("2026-07-14 09:00")
    assert await second.db.run(second.router.reconcile, clock.now()) == 0  # unchanged rules: nothing to redo


async def test_a_date_rule_on_events_added_later_reaches_tickets_already_sold_once(
    tmp_path: Path, aiohttp_client: Any
) -> None:
    """Tickets sold before the reminder rule existed get their reminder; those whose moment has passed
    are queued so that firing them says why they were skipped; a second reconcile adds nothing."""
    pm = get_plugin_manager(extra=[ScriptedPlugin()])
    base = (
        "public_url: https://hooks.example.com\ntimezone: UTC\n"
        + f"storage: {{url: 'sqlite:///{tmp_path}/r.db'}}\nsources:\n  in: {{plugin: scripted, url_token: tok}}\n"
        + "sinks:\n  email: {plugin: smtp, host: 127.0.0.1, port: 1, tls: none, sender: s@example.com}\n"
    )
    rule = (
        "rules:\n  - {name: reminder, on_date: event.properties.starts_at, of: ticket.ordered, offset: -1d,"
        " at: '10:00', send: {via: email, template: t}}\n"
    )
    clock = FakeClock(datetime(2026, 6, 1, tzinfo=UTC))

    async def start(text: str) -> RunningGateway:
        settings = load_config(write_deployment(tmp_path, text, TEMPLATES), collect(pm), pm)
        app = create_app(settings, pm=pm, clock=clock, role="web")
        await aiohttp_client(app)
        return app[GATEWAY_KEY]

    first = await start(base)
    tickets = [
        {"type": "ticket.ordered", "contact": {"email": "a@example.org"}, "properties": {"starts_at": start}}
        for start in ("2026-06-20T19:00:00Z", "2026-05-10T19:00:00Z", "2026-06-05T19:00:00Z", "0001-01-01T00:00:00Z")
    ]
    await first.committer.submit(NewCall("in", "1", clock.now(), {}, json.dumps(tickets).encode()))
    await first.worker.drain()
    first.db.close()

    second = await start(base + rule)
    with second.db.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM jobs WHERE kind = 'trigger'").scalar() == 0
    spec = second.router.rules["reminder"].spec
    assert spec.summary == "on event.properties.starts_at of ticket.ordered, once"  # as `declic check` lists it
    # `declic plan` counts what the rule would fire: the 5 June concert's reminder within 7 days, none within 24 h.
    assert await second.db.run(plan._firings, spec, "UTC", clock.now()) == (0, 1)
    assert await second.db.run(second.router.reconcile, clock.now()) == 4  # year 1, minus a day: no such moment
    with second.db.engine.connect() as conn:
        due = sorted(str(row[0]) for row in conn.exec_driver_sql("SELECT due_at FROM jobs WHERE kind = 'trigger'"))
    assert [d[:16] for d in due] == ["2026-05-09 10:00", "2026-06-04 10:00", "2026-06-19 10:00"]
    assert await second.db.run(second.router.reconcile, clock.now()) == 0
