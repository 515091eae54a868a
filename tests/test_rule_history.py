"""Conditions on a contact's history (`contact.count/has/last/sent`), repeated inactivity rules and
compound durations, as timelines: through `declic simulate`, and through the real server over HTTP with
a real SMTP server, on SQLite and PostgreSQL (the harness of test_journeys.py)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from test_config import check as check_config
from test_config import edit
from test_journeys import Plugin, Scenario, check, write

from declic_gateway.cli.main import cli
from declic_gateway.cli.simulate import TimelineItem, decisions, load_timeline, play, run_until
from declic_gateway.config import load_config
from declic_gateway.http.app import create_app
from declic_gateway.http.running import GATEWAY_KEY, RunningGateway
from declic_gateway.plugins import collect, get_plugin_manager
from declic_gateway.testing import FakeClock, SmtpCatcher

# The README's recipes (## Recipes), word for word: a test below checks they are there.
PRICING = """\
  - name: pricing-interest
    when: page.viewed
    if: >-
      event.properties.path == '/pricing'
      and contact.count('page.viewed', within='7d', where="event.properties.path == '/pricing'") >= 2
    reenter: {after: 30d}
    send: {via: email, template: t}
"""
CROSS_SELL = """\
  - name: ipad-case
    when: order.placed
    if: "'iPad' in event.properties.line_items | map(attribute='title') | list"
    steps:
      - wait: 3d
        if: >-
          not contact.has('order.placed',
                          where="'iPad case' in event.properties.line_items | map(attribute='title') | list")
        send: {via: email, template: t}
"""
WIN_BACK = """\
  - name: win-back
    inactive_for: 90d
    repeat_every: 90d
    max_times: 3
    of: [order.placed]
    send: {via: email, template: t}
"""
RECIPES = {"cross-sell": CROSS_SELL, "win-back": WIN_BACK, "pricing": PRICING}

SCENARIOS = [
    Scenario(
        "visited /pricing twice within 7 days",
        PRICING,
        """\
- {at: "2026-03-02T10:00:00Z", type: page.viewed, properties: {path: /pricing},
   contact: {email: a@example.org, consent: {email: granted}}}
- {at: "2026-03-03T10:00:00Z", type: page.viewed, properties: {path: /about}, contact: {email: a@example.org}}
- {at: "2026-03-06T10:00:00Z", type: page.viewed, properties: {path: /pricing}, contact: {email: a@example.org}}
- {at: "2026-03-02T11:00:00Z", type: page.viewed, properties: {path: /pricing},
   contact: {email: b@example.org, consent: {email: granted}}}
- {at: "2026-03-12T11:00:00Z", type: page.viewed, properties: {path: /pricing}, contact: {email: b@example.org}}
- {at: "2026-03-02T12:00:00Z", type: page.viewed, properties: {path: /pricing},
   contact: {email: c@example.org, consent: {email: granted}}}
- {at: "2026-03-02T13:00:00Z", type: page.viewed, properties: {path: /pricing}, contact: {email: c@example.org}}
- {at: "2026-03-03T12:00:00Z", type: page.viewed, properties: {path: /pricing}, contact: {email: c@example.org}}
- {at: "2026-03-20T00:00:00Z", end: true}
""",
        [
            ("2026-03-02T13:00:00Z", "pricing-interest", 1, "c@example.org", "send", None),
            ("2026-03-06T10:00:00Z", "pricing-interest", 1, "a@example.org", "send", None),
        ],
    ),
    Scenario(
        "cross-sell: bought the iPad but not yet the case",
        CROSS_SELL,
        """\
- {at: "2026-03-02T10:00:00Z", type: order.placed, correlation: "order:1", properties: {line_items: [{title: iPad}]},
   contact: {email: a@example.org, consent: {email: granted}}}
- {at: "2026-03-03T10:00:00Z", type: order.placed, correlation: "order:2",
   properties: {line_items: [{title: iPad case}]}, contact: {email: a@example.org}}
- {at: "2026-03-02T11:00:00Z", type: order.placed, correlation: "order:3", properties: {line_items: [{title: iPad}]},
   contact: {email: b@example.org, consent: {email: granted}}}
- {at: "2026-03-01T09:00:00Z", type: order.placed, correlation: "order:4",
   properties: {line_items: [{title: iPad case}]}, contact: {email: c@example.org, consent: {email: granted}}}
- {at: "2026-03-02T12:00:00Z", type: order.placed, correlation: "order:5",
   properties: {line_items: [{title: Pencil}, {title: iPad}]}, contact: {email: c@example.org}}
- {at: "2026-03-10T00:00:00Z", end: true}
""",
        [
            ("2026-03-05T10:00:00Z", "ipad-case", 1, "a@example.org", "suppressed", "step condition is false"),
            ("2026-03-05T11:00:00Z", "ipad-case", 1, "b@example.org", "send", None),
            ("2026-03-05T12:00:00Z", "ipad-case", 1, "c@example.org", "suppressed", "step condition is false"),
        ],
    ),
    Scenario(
        "win-back every 90 days while inactive, at most 3 times; an order starts a new period",
        WIN_BACK,
        """\
- {at: "2026-01-01T12:00:00Z", type: order.placed, correlation: "order:1",
   contact: {email: gone@example.org, consent: {email: granted}}}
- {at: "2026-01-01T13:00:00Z", type: order.placed, correlation: "order:2",
   contact: {email: back@example.org, consent: {email: granted}}}
- {at: "2026-05-01T13:00:00Z", type: order.placed, correlation: "order:3", contact: {email: back@example.org}}
- {at: "2027-06-01T00:00:00Z", end: true}
""",
        [
            ("2026-04-01T12:00:00Z", "win-back", 1, "gone@example.org", "send", None),
            ("2026-04-01T13:00:00Z", "win-back", 1, "back@example.org", "send", None),
            ("2026-06-30T12:00:00Z", "win-back", 1, "gone@example.org", "send", None),
            ("2026-07-30T13:00:00Z", "win-back", 1, "back@example.org", "send", None),
            ("2026-09-28T12:00:00Z", "win-back", 1, "gone@example.org", "send", None),
            ("2026-10-28T13:00:00Z", "win-back", 1, "back@example.org", "send", None),
            ("2027-01-26T13:00:00Z", "win-back", 1, "back@example.org", "send", None),
        ],
    ),
    Scenario(
        "durations in every unit combination",
        """\
  - name: receipt
    when: order.placed
    steps:
      - wait: 1h30m
        send: {via: email, template: t}
      - wait: P1DT12H
        send: {via: email, template: t}
      - wait: 2d12h
        send: {via: email, template: t}
""",
        """\
- {at: "2026-03-02T09:00:00Z", type: order.placed, correlation: "order:1",
   contact: {email: a@example.org, consent: {email: granted}}}
- {at: "2026-03-10T00:00:00Z", end: true}
""",
        [
            ("2026-03-02T10:30:00Z", "receipt", 1, "a@example.org", "send", None),
            ("2026-03-03T22:30:00Z", "receipt", 2, "a@example.org", "send", None),
            ("2026-03-06T10:30:00Z", "receipt", 3, "a@example.org", "send", None),
        ],
    ),
    Scenario(
        "last(): remind about the latest cart only; sent(): no nudge within 30 days of the welcome",
        """\
  - name: cart
    when: checkout.started
    steps:
      - wait: 1h
        if: "contact.last('checkout.started').correlation == event.correlation"
        send: {via: email, template: t}
  - name: welcome
    when: customer.created
    send: {via: email, template: t}
  - name: nudge
    when: track.visit
    if: "not contact.sent(rule='welcome', within='30d')"
    send: {via: email, template: t}
""",
        """\
- {at: "2026-03-02T10:00:00Z", type: checkout.started, correlation: "checkout:1",
   contact: {email: e@example.org, consent: {email: granted}}}
- {at: "2026-03-02T10:30:00Z", type: checkout.started, correlation: "checkout:2", contact: {email: e@example.org}}
- {at: "2026-03-03T10:00:00Z", type: customer.created, contact: {email: f@example.org, consent: {email: granted}}}
- {at: "2026-03-04T10:00:00Z", type: track.visit, contact: {email: f@example.org}}
- {at: "2026-03-04T11:00:00Z", type: track.visit, contact: {email: g@example.org, consent: {email: granted}}}
- {at: "2026-03-10T00:00:00Z", end: true}
""",
        [
            ("2026-03-02T10:00:00Z", "cart", None, "e@example.org", "enrolled", None),
            ("2026-03-02T10:30:00Z", "cart", None, "e@example.org", "enrolled", None),
            ("2026-03-02T11:00:00Z", "cart", 1, "e@example.org", "suppressed", "step condition is false"),
            ("2026-03-02T11:30:00Z", "cart", 1, "e@example.org", "send", None),
            ("2026-03-03T10:00:00Z", "welcome", None, "f@example.org", "enrolled", None),
            ("2026-03-03T10:00:00Z", "welcome", 1, "f@example.org", "send", None),
            ("2026-03-04T10:00:00Z", "nudge", None, "f@example.org", "not_enrolled", "if false"),
            ("2026-03-04T11:00:00Z", "nudge", None, "g@example.org", "enrolled", None),
            ("2026-03-04T11:00:00Z", "nudge", 1, "g@example.org", "send", None),
        ],
        enrolments=True,
    ),
    Scenario(
        "a where= that raises counts as false and is journalled once",
        """\
  - name: big-spender
    when: track.visit
    if: "contact.count('order.placed', where='event.properties.total > 100') >= 1"
    send: {via: email, template: t}
""",
        """\
- {at: "2026-03-01T10:00:00Z", type: order.placed, correlation: "order:1", properties: {total: 250},
   contact: {email: d@example.org, consent: {email: granted}}}
- {at: "2026-03-02T10:00:00Z", type: order.placed, correlation: "order:2", contact: {email: d@example.org}}
- {at: "2026-03-03T10:00:00Z", type: order.placed, correlation: "order:3", properties: {total: lots},
   contact: {email: d@example.org}}
- {at: "2026-03-04T10:00:00Z", type: track.visit, contact: {email: d@example.org}}
- {at: "2026-03-05T00:00:00Z", end: true}
""",
        [
            (
                "2026-03-04T10:00:00Z",
                "big-spender",
                None,
                "d@example.org",
                "failed",
                "where failed, counted as false: event.properties.total > 100: ",
            ),
            ("2026-03-04T10:00:00Z", "big-spender", 1, "d@example.org", "send", None),
        ],
    ),
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_simulated(scenario: Scenario, tmp_path: Path) -> None:
    config, timeline = write(tmp_path, scenario, f"sqlite:///{tmp_path}/never-touched.db", 1, live=False)
    result = CliRunner().invoke(cli, ["simulate", "--config", str(config), str(timeline)])
    failed = any(expected[4] == "failed" for expected in scenario.expected)
    assert result.exit_code == (1 if failed else 0), result.output  # an `if:` or `where=` that raised: exit 1
    check([json.loads(line) for line in result.stdout.splitlines()], scenario)  # stderr has the log


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


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_the_readme_recipes_are_the_tested_rules(name: str) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    recipes = readme.split("## Recipes", 1)[1]
    assert RECIPES[name] in recipes


INACTIVE = "    inactive_for: 90d\n    of: [order.placed]\n"
# (case, config text, the exact error line after "declic.yaml:")
CONFIG_ERRORS = [
    (
        "repeat_every on an event rule",
        edit("    when: customer.created\n", "    when: customer.created\n    repeat_every: 90d\n"),
        "20:19: rules[0].repeat_every: repeat_every is for inactive_for rules (date rules take `repeat: yearly`)",
    ),
    (
        "max_times without repeat_every",
        edit("    when: customer.created\n", INACTIVE + "    max_times: 3\n"),
        "21:16: rules[0].max_times: max_times needs repeat_every: without it an inactivity rule fires once per period",
    ),
    (
        "repeat_every too short",
        edit("    when: customer.created\n", INACTIVE + "    repeat_every: 30m\n"),
        "21:19: rules[0].repeat_every: 30m is too short: write 1h to 3650d",
    ),
    (
        "max_times zero",
        edit("    when: customer.created\n", INACTIVE + "    repeat_every: 90d\n    max_times: 0\n"),
        "22:16: rules[0].max_times: Input should be greater than or equal to 1",
    ),
    (
        "max_times not a number",
        edit("    when: customer.created\n", INACTIVE + "    repeat_every: 90d\n    max_times: thrice\n"),
        "22:16: rules[0].max_times: Input should be a valid integer, unable to parse string as an integer",
    ),
    (
        "where= that is not an expression",
        edit('total_price > 20"', "total_price > 20 and contact.has('order.placed', where='event.x ==')\""),
        "23:9: rules[1].if: invalid where= expression 'event.x ==': unexpected 'end of template'",
    ),
    (
        "within= that is not a duration",
        edit("contact.email_status == 'ok'", "contact.count('page.viewed', within='P1M') < 3"),
        "29:13: rules[1].steps[1].if: within=: invalid duration 'P1M': years and months vary in length; "
        "write days, as P30D",
    ),
]


@pytest.mark.parametrize(("case", "text", "expected"), CONFIG_ERRORS, ids=[e[0] for e in CONFIG_ERRORS])
def test_bad_values_name_file_line_column_path(tmp_path: Path, case: str, text: str, expected: str) -> None:
    code, output = check_config(tmp_path, text)
    assert code == 2, output
    assert f"{tmp_path / 'declic.yaml'}:{expected}" in output.splitlines(), output


def test_new_keys_have_a_type_and_a_description_in_the_json_schema() -> None:
    from declic_gateway.config import RuleSpec

    properties = RuleSpec.model_json_schema(by_alias=True)["properties"]
    for key in ("repeat_every", "max_times"):
        assert properties[key]["description"], key
        assert {t.get("type") for t in properties[key]["anyOf"]} - {"null"}, key


async def test_repeats_survive_a_restart_and_a_replayed_firing_sends_nothing(
    tmp_path: Path, db_url: str, smtp: SmtpCatcher, aiohttp_client: Any
) -> None:
    """The chain of firings is rows in the database: a new process goes on with it, never doubles it."""
    scenario = SCENARIOS[2]
    pm = get_plugin_manager(extra=[Plugin()])
    config, timeline = write(tmp_path, scenario, db_url, smtp.port)
    settings = load_config(config, collect(pm), pm)
    order = load_timeline(timeline, settings.timezone)[0]
    clock = FakeClock(order.at)

    async def start() -> tuple[Any, RunningGateway]:
        app = create_app(settings, pm=pm, clock=clock, role="web")
        return await aiohttp_client(app), app[GATEWAY_KEY]

    client, first = await start()
    assert (await client.post("/hooks/tl/tok", data=order.model_dump_json().encode())).status == 200
    await run_until(first, clock, datetime(2026, 4, 2, tzinfo=UTC))
    assert len(smtp.messages) == 1
    first.db.close()  # SQLite serves one process: let the second one in

    _, second = await start()
    await run_until(second, clock, datetime(2026, 4, 3, tzinfo=UTC))
    assert len(smtp.messages) == 1
    with second.db.engine.begin() as conn:
        [(contact_id, occurrence)] = conn.exec_driver_sql("SELECT contact_id, occurrence FROM enrolments").all()
        second.router.fire(conn, "win-back", contact_id, occurrence, clock.now(), clock.now(), 999)
    await run_until(second, clock, datetime(2027, 6, 1, tzinfo=UTC))
    assert [m["To"] for m in smtp.messages] == ["gone@example.org"] * 3
    with second.db.engine.connect() as conn:
        occurrences = sorted(conn.exec_driver_sql("SELECT occurrence FROM enrolments").scalars())
    assert occurrences == [occurrence, f"{occurrence}#2", f"{occurrence}#3"]
