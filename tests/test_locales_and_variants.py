"""Messages in the customer's language, and A/B variants of a step, as timelines: through `declic simulate`,
and through the real server over HTTP with a real SMTP server (SQLite and PostgreSQL). Both must make
the same decisions; the live run also checks what each person received."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jinja2
import pytest
import yaml
from click.testing import CliRunner
from test_config import VALID, check
from test_dashboard import Visitor, login
from test_journeys import Plugin

from declic_gateway.cli.main import cli
from declic_gateway.cli.simulate import TimelineItem, decisions, load_timeline, play
from declic_gateway.config import RuleSpec, load_config
from declic_gateway.errors import TemplateProblem
from declic_gateway.http.app import create_app
from declic_gateway.http.running import GATEWAY_KEY, RunningGateway
from declic_gateway.insight.kpis import rule_kpis
from declic_gateway.kit.locales import locale_chain
from declic_gateway.kit.templating import make_environment, render_message
from declic_gateway.plugins import collect, get_plugin_manager
from declic_gateway.send.variants import template_for, variant_for
from declic_gateway.testing import FakeClock, SmtpCatcher, write_deployment

Expected = tuple[str, str, int, str, str, str | None]  # at, rule, step, contact, action, reason
NBSP = "\xa0"  # Babel writes `59,90 €` with a no-break space, as French typography wants

CONFIG = """\
public_url: https://hooks.example.com
timezone: Europe/Paris
locale: {locale}
storage: {{url: '{db_url}'}}
{sources}sinks:
  email: {{plugin: smtp, host: 127.0.0.1, port: {port}, tls: none, sender: shop@example.com}}
policies: {{consent: {{email: required}}}}
{extra}rules:
{rules}"""


@dataclass
class Scenario:
    name: str
    rules: str
    templates: dict[str, str]
    timeline: str
    #: The journal, enrolments left out.
    expected: list[Expected]
    #: What each person received: (to, subject, text), sorted by address.
    mails: list[tuple[str, str, str]]
    locale: str = "fr"
    extra: str = ""


VOUCHER = "{{ event.properties.voucher | format_currency('EUR') }}"
UNTIL = "{{ event.properties.expires | format_date('long') }}"
WELCOME_RULE = """\
  - name: welcome
    when: customer.created
    send: {via: email, template: welcome}
"""
WELCOME = {
    "welcome.subject.j2": "Welcome {{ contact.first_name }}",
    "welcome.txt.j2": f"Your voucher: {VOUCHER}, valid until {UNTIL}.",
    "welcome.fr.subject.j2": "Bienvenue {{ contact.first_name }}",
    "welcome.fr.txt.j2": f"Votre bon : {VOUCHER}, valable jusqu’au {UNTIL}.",
    "welcome.de.subject.j2": "Willkommen {{ contact.first_name }}",
    "welcome.de.txt.j2": f"Ihr Gutschein: {VOUCHER}, gültig bis {UNTIL}.",
}


def joined(at: str, email: str, first_name: str, locale: str | None, **more: Any) -> str:
    contact = {"email": email, "first_name": first_name, "consent": {"email": "granted"}, **more}
    if locale is not None:
        contact["locale"] = locale
    item = {
        "at": at,
        "type": "customer.created",
        "correlation": f"customer:{email}",
        "contact": contact,
        "properties": {"voucher": "59.90", "expires": "2026-04-14"},
    }
    return "- " + json.dumps(item) + "\n"


LOCALE_SCENARIOS = [
    Scenario(
        "welcome in the customer's language: fr_CA falls back to fr, an unknown language to the default",
        WELCOME_RULE,
        WELCOME,
        joined("2026-03-14T09:00:00Z", "camille@example.org", "Camille", "fr-CA", timezone="America/Montreal")
        + joined("2026-03-14T09:01:00Z", "hans@example.org", "Hans", "de_DE")
        + joined("2026-03-14T09:02:00Z", "noah@example.org", "Noah", "en_US")
        + joined("2026-03-14T09:03:00Z", "zoe@example.org", "Zoé", None)
        + joined("2026-03-14T09:04:00Z", "odd@example.org", "Odd", "no such locale"),
        [
            ("2026-03-14T09:00:00Z", "welcome", 1, "camille@example.org", "send", "template welcome.fr"),
            ("2026-03-14T09:01:00Z", "welcome", 1, "hans@example.org", "send", "template welcome.de"),
            ("2026-03-14T09:02:00Z", "welcome", 1, "noah@example.org", "send", None),
            # No locale, or one Babel does not know: the deployment's (`locale: fr`).
            ("2026-03-14T09:03:00Z", "welcome", 1, "zoe@example.org", "send", "template welcome.fr"),
            ("2026-03-14T09:04:00Z", "welcome", 1, "odd@example.org", "send", "template welcome.fr"),
        ],
        [
            ("camille@example.org", "Bienvenue Camille", f"Votre bon : 59,90{NBSP}€, valable jusqu’au 14 avril 2026."),
            ("hans@example.org", "Willkommen Hans", f"Ihr Gutschein: 59,90{NBSP}€, gültig bis 14. April 2026."),
            ("noah@example.org", "Welcome Noah", "Your voucher: €59.90, valid until April 14, 2026."),
            ("odd@example.org", "Bienvenue Odd", f"Votre bon : 59,90{NBSP}€, valable jusqu’au 14 avril 2026."),
            ("zoe@example.org", "Bienvenue Zoé", f"Votre bon : 59,90{NBSP}€, valable jusqu’au 14 avril 2026."),
        ],
    ),
    Scenario(
        "the default locale is English: a contact without one gets the untranslated template",
        WELCOME_RULE,
        WELCOME,
        joined("2026-03-14T09:00:00Z", "zoe@example.org", "Zoé", None),
        [("2026-03-14T09:00:00Z", "welcome", 1, "zoe@example.org", "send", None)],
        [("zoe@example.org", "Welcome Zoé", "Your voucher: €59.90, valid until April 14, 2026.")],
        locale="en",
    ),
    Scenario(
        "times in the contact's time zone and locale, the deployment's when it has none",
        """\
  - name: receipt
    when: order.placed
    kind: transactional
    send: {via: email, template: receipt}
""",
        {
            "receipt.subject.j2": "{{ event.properties.total | format_decimal }}",
            "receipt.txt.j2": "{{ event.occurred_at | format_datetime('short') }}",
        },
        """\
- {at: "2026-03-14T16:30:00Z", type: order.placed, correlation: "order:1",
   contact: {email: m@example.org, locale: fr_CA, timezone: America/Montreal}, properties: {total: 1234.5}}
- {at: "2026-03-14T16:31:00Z", type: order.placed, correlation: "order:2",
   contact: {email: n@example.org, locale: en-US, timezone: America/New_York}, properties: {total: 1234.5}}
- {at: "2026-03-14T16:32:00Z", type: order.placed, correlation: "order:3",
   contact: {email: p@example.org}, properties: {total: 1234.5}}
""",
        [
            ("2026-03-14T16:30:00Z", "receipt", 1, "m@example.org", "send", None),
            ("2026-03-14T16:31:00Z", "receipt", 1, "n@example.org", "send", None),
            ("2026-03-14T16:32:00Z", "receipt", 1, "p@example.org", "send", None),
        ],
        [
            ("m@example.org", f"1{NBSP}234,5", "2026-03-14 12 h 30"),
            ("n@example.org", "1,234.5", "3/14/26, 12:31\u202fPM"),
            ("p@example.org", "1\u202f234,5", "14/03/2026 17:32"),  # fr groups with a narrow no-break space
        ],
    ),
    Scenario(
        "a voucher that is not a number fails the step for good, with the reason",
        WELCOME_RULE,
        WELCOME,
        joined("2026-03-14T09:00:00Z", "camille@example.org", "Camille", "fr").replace('"59.90"', '"n/a"'),
        [
            (
                "2026-03-14T09:00:00Z",
                "welcome",
                1,
                "camille@example.org",
                "failed",
                "welcome.fr.txt.j2:1: ValueError: 'n/a' is not a number",  # the template's line too
            )
        ],
        [],
    ),
]

AB_RULE = """\
  - name: welcome
    when: customer.created
    send:
      via: email
      variants:
        - {name: plain, weight: 50, template: welcome-plain}
        - {name: voucher, weight: 50, template: welcome-voucher}
"""
AB = {
    "welcome-plain.subject.j2": "Welcome!",
    "welcome-plain.txt.j2": "Hello {{ contact.first_name }} ({{ variant }})",
    "welcome-plain.fr.subject.j2": "Bienvenue !",
    "welcome-plain.fr.txt.j2": "Bonjour {{ contact.first_name }} ({{ variant }})",
    "welcome-voucher.subject.j2": "{{ contact.first_name }}, your voucher is waiting",
    "welcome-voucher.txt.j2": "Hello {{ contact.first_name }} ({{ variant }})",
}
PLAIN, VOUCHER = "variant plain, template welcome-plain", "variant voucher, template welcome-voucher"

VARIANT_SCENARIOS = [
    Scenario(
        "A/B test a subject line: each contact keeps its variant when it comes back, in its language",
        AB_RULE,
        AB,
        joined("2026-03-14T09:00:00Z", "ana@example.org", "Ana", "en")
        + joined("2026-03-14T09:01:00Z", "ben@example.org", "Ben", "en")
        + joined("2026-03-14T09:02:00Z", "cleo@example.org", "Cléo", "fr")
        + joined("2026-03-14T09:03:00Z", "dan@example.org", "Dan", "en")
        + joined("2026-03-20T09:00:00Z", "ana@example.org", "Ana", "en").replace("customer:ana", "customer:ana-2")
        + joined("2026-03-20T09:01:00Z", "ben@example.org", "Ben", "en").replace("customer:ben", "customer:ben-2"),
        [
            ("2026-03-14T09:00:00Z", "welcome", 1, "ana@example.org", "send", PLAIN),
            ("2026-03-14T09:01:00Z", "welcome", 1, "ben@example.org", "send", VOUCHER),
            ("2026-03-14T09:02:00Z", "welcome", 1, "cleo@example.org", "send", PLAIN + ".fr"),
            ("2026-03-14T09:03:00Z", "welcome", 1, "dan@example.org", "send", VOUCHER),
            ("2026-03-20T09:00:00Z", "welcome", 1, "ana@example.org", "send", PLAIN),
            ("2026-03-20T09:01:00Z", "welcome", 1, "ben@example.org", "send", VOUCHER),
        ],
        [
            ("ana@example.org", "Welcome!", "Hello Ana (plain)"),
            ("ana@example.org", "Welcome!", "Hello Ana (plain)"),
            ("ben@example.org", "Ben, your voucher is waiting", "Hello Ben (voucher)"),
            ("ben@example.org", "Ben, your voucher is waiting", "Hello Ben (voucher)"),
            ("cleo@example.org", "Bienvenue !", "Bonjour Cléo (plain)"),
            ("dan@example.org", "Dan, your voucher is waiting", "Hello Dan (voucher)"),
        ],
    ),
]

SCENARIOS = LOCALE_SCENARIOS + VARIANT_SCENARIOS


def write(tmp_path: Path, scenario: Scenario, db_url: str, port: int, live: bool = True) -> tuple[Path, Path]:
    sources = "sources:\n  tl: {plugin: test_timeline, url_token: tok}\n" if live else ""
    text = CONFIG.format(
        db_url=db_url, port=port, rules=scenario.rules, sources=sources, extra=scenario.extra, locale=scenario.locale
    )
    config = write_deployment(tmp_path, text, scenario.templates)
    timeline = tmp_path / "timeline.yaml"
    timeline.write_text(scenario.timeline)
    return config, timeline


def journal(seen: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [
        (d["at"], d["rule"], d["step"], d["contact"], d["action"], d["reason"])
        for d in seen
        if d["action"] not in ("enrolled", "not_enrolled")
    ]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_simulated(scenario: Scenario, tmp_path: Path) -> None:
    config, timeline = write(tmp_path, scenario, f"sqlite:///{tmp_path}/never-touched.db", 1, live=False)
    result = CliRunner().invoke(cli, ["simulate", "--config", str(config), str(timeline)])
    failed = any(expected[4] == "failed" for expected in scenario.expected)
    assert result.exit_code == (1 if failed else 0), result.output  # a failed step makes simulate say so
    assert journal([json.loads(line) for line in result.stdout.splitlines()]) == scenario.expected


async def run_live(
    scenario: Scenario, tmp_path: Path, db_url: str, smtp: SmtpCatcher, aiohttp_client: Any
) -> tuple[RunningGateway, Any]:
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
    return gateway, client


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
async def test_live(scenario: Scenario, tmp_path: Path, db_url: str, smtp: SmtpCatcher, aiohttp_client: Any) -> None:
    gateway, _ = await run_live(scenario, tmp_path, db_url, smtp, aiohttp_client)
    assert journal(await gateway.db.run(decisions)) == scenario.expected
    received = sorted((m["To"], m["Subject"], m.get_content().strip()) for m in smtp.messages)
    assert received == scenario.mails


async def test_kpis_per_variant(tmp_path: Path, db_url: str, smtp: SmtpCatcher, aiohttp_client: Any) -> None:
    """Sent, converted and revenue per variant, adding up to the step's; through the CLI and the API too."""
    token = "admin-token-for-the-variant-tests-0123456789"
    orders = "".join(
        f'- {{at: "2026-03-15T10:00:00Z", type: order.placed, correlation: "order:{who}", '
        f"contact: {{email: {who}@example.org}}, properties: {{total_price: {total}}}}}\n"
        for who, total in (("ana", 30), ("ben", 10), ("cleo", 5))
    )
    scenario = Scenario(
        "kpis",
        AB_RULE.replace("    when: customer.created\n", "    when: customer.created\n    goal: order.placed\n"),
        AB,
        VARIANT_SCENARIOS[0].timeline.split('- {"at": "2026-03-20')[0] + orders,
        [],
        [],
        extra=f"admin: {{token: {token}}}\n",
    )
    gateway, client = await run_live(scenario, tmp_path, db_url, smtp, aiohttp_client)
    since, until = datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC)
    [kpis] = await gateway.db.run(rule_kpis, ["welcome"], since, until)
    [step] = kpis.steps
    # Ana (plain) bought for 30, Cléo (plain) for 5, Ben (voucher) for 10; Dan (voucher) bought nothing.
    by_variant = {v.variant: (v.sent, v.converted, v.revenue) for v in step.variants}
    assert by_variant == {"plain": (2, 2, 35.0), "voucher": (2, 1, 10.0)}
    assert (step.sent, step.converted, step.revenue) == (4, 3, 45.0)

    cli_config, _ = write(tmp_path / "cli", scenario, db_url, smtp.port, live=False)  # without the test source
    result = CliRunner().invoke(
        cli, ["kpis", "--config", str(cli_config), "--since", "2026-03-01", "--until", "2026-04-01"]
    )
    assert result.exit_code == 0, result.output
    lines = [line.split() for line in result.output.splitlines()]
    assert ["1", "plain", "2", "0", "0", "0", "0", "0", "0", "2", "35.00"] in lines
    assert ["1", "voucher", "2", "0", "0", "0", "0", "0", "0", "1", "10.00"] in lines

    bearer = {"Authorization": f"Bearer {token}"}
    response = await client.get("/api/v1/rules/welcome", params={"since": "2026-03-01T00:00:00Z"}, headers=bearer)
    assert response.status == 200, await response.text()
    [api_step] = (await response.json())["kpis"]["steps"]
    assert [(v["variant"], v["sent"], v["converted"], v["revenue"]) for v in api_step["variants"]] == [
        ("plain", 2, 2, 35.0),
        ("voucher", 2, 1, 10.0),
    ]

    visitor = Visitor(SimpleNamespace(client=client))  # type: ignore[arg-type]
    await login(visitor, token)
    page = await (await visitor.get("/admin/rules/welcome", params={"days": "90"})).text()
    for variant, sent, converted in (("plain", 2, 2), ("voucher", 2, 1)):
        row = re.search(rf'<tr class="variant" data-step="1" data-variant="{variant}">(.*?)</tr>', page)
        assert row is not None, page
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row.group(1))
        assert (cells[1], cells[8]) == (str(sent), str(converted))


def rule(variants: str) -> RuleSpec:
    return RuleSpec.model_validate(
        {"name": "promo", "when": "track.promo", "send": {"via": "email", "variants": json.loads(variants)}}
    )


def test_contacts_split_as_the_weights_say_and_keep_their_variant() -> None:
    promo = rule('[{"name": "a", "weight": 3, "template": "pa"}, {"name": "b", "weight": 1, "template": "pb"}]')
    drawn = [variant_for(promo, 0, contact_id) for contact_id in range(1, 20_001)]
    share = sum(1 for v in drawn if v is not None and v.name == "a") / len(drawn)
    assert 0.73 < share < 0.77
    assert [variant_for(promo, 0, c) for c in range(1, 50)] == drawn[:49]  # the same draw every time
    kept = variant_for(promo, 0, 1, kept="b")
    assert kept is not None and kept.name == "b"
    gone = variant_for(promo, 0, 1, kept="c")  # a variant no longer configured: drawn again
    assert gone == drawn[0]
    assert template_for(promo, 0, "b") == "pb"
    with pytest.raises(ValueError, match="has no variant 'c'"):
        template_for(promo, 0, "c")


async def test_a_contact_keeps_its_variant_when_the_weights_change(
    tmp_path: Path, db_url: str, smtp: SmtpCatcher, aiohttp_client: Any
) -> None:
    first = VARIANT_SCENARIOS[0]
    timeline = joined("2026-03-14T09:00:00Z", "ana@example.org", "Ana", "en")
    gateway, _ = await run_live(
        Scenario("before", AB_RULE, AB, timeline, [], []), tmp_path, db_url, smtp, aiohttp_client
    )
    gateway.db.close()  # SQLite serves one process: let the second one in
    assert first.expected[0][5] == PLAIN  # Ana's draw at 50/50
    # Now nearly everyone is drawn into `voucher`: Ana, who had `plain`, keeps it; Ben, new, gets `voucher`.
    skewed = AB_RULE.replace("weight: 50, template: welcome-plain", "weight: 1, template: welcome-plain").replace(
        "weight: 50, template: welcome-voucher", "weight: 10000, template: welcome-voucher"
    )
    again = joined("2026-03-20T09:00:00Z", "ana@example.org", "Ana", "en").replace("customer:ana", "customer:ana-2")
    again += joined("2026-03-20T09:01:00Z", "ben@example.org", "Ben", "en")
    gateway, _ = await run_live(Scenario("after", skewed, AB, again, [], []), tmp_path, db_url, smtp, aiohttp_client)
    sent = [(d["contact"], d["reason"]) for d in await gateway.db.run(decisions) if d["action"] == "send"]
    assert sent == [("ana@example.org", PLAIN), ("ana@example.org", PLAIN), ("ben@example.org", VOUCHER)]


def test_the_fallback_chain() -> None:
    assert locale_chain("fr-CA", "en") == ("fr_CA", "fr")
    assert locale_chain("FR", "en") == ("fr",)
    assert locale_chain(None, "de_DE") == ("de_DE", "de")
    assert locale_chain("!!", "fr") == ("fr",)


FILTER_CASES = [
    # (template, context, what it renders or the template problem it raises)
    ("{{ 59.9 | format_currency('EUR') }}", {"locale": "fr_FR"}, f"59,90{NBSP}€"),
    ("{{ '59.90' | format_currency('USD') }}", {"locale": "en_US"}, "$59.90"),
    ("{{ 59.9 | format_currency('EUR', locale='de') }}", {"locale": "fr"}, f"59,90{NBSP}€"),
    ("{{ 1234567.891 | format_decimal('#,##0.00') }}", {"locale": "en"}, "1,234,567.89"),
    ("{{ '2026-12-24' | format_date('full') }}", {"locale": "fr"}, "jeudi 24 décembre 2026"),
    (
        "{{ '2026-12-24T23:30:00Z' | format_date }}",
        {"locale": "en", "timezone": "Asia/Tokyo"},
        "Dec 25, 2026",  # already the 25th in Tokyo
    ),
    ("{{ 1 | format_currency('EUR', locale='zz') }}", {"locale": "fr"}, TemplateProblem("unknown locale 'zz'")),
    ("{{ nothing | format_currency('EUR') }}", {"locale": "fr"}, TemplateProblem("no value to format")),
    ("{{ [1] | format_decimal }}", {"locale": "fr"}, TemplateProblem("list is not a number")),
    ("{{ 'soon' | format_date }}", {"locale": "fr"}, TemplateProblem("Invalid isoformat string")),
    ("{{ ('x' * 100) | format_decimal }}", {"locale": "fr"}, TemplateProblem("is not a number")),
]


@pytest.mark.parametrize(("source", "context", "expected"), FILTER_CASES, ids=[c[0] for c in FILTER_CASES])
def test_the_babel_filters(source: str, context: dict[str, Any], expected: str | TemplateProblem) -> None:
    env = make_environment(None)
    env.loader = jinja2.DictLoader({"t.txt.j2": source})
    if isinstance(expected, TemplateProblem):
        with pytest.raises(TemplateProblem, match=str(expected)):
            render_message(env, "t", context)
    else:
        assert render_message(env, "t", context)["txt"] == expected


CONFIG_ERRORS = [
    (
        "both template and variants",
        "send: {via: email, template: welcome, variants: [{name: a, template: welcome}, {name: b, template: welcome}]}",
        "20:11: rules[0].send: `send` needs exactly one of `template` or `variants`",
    ),
    (
        "one variant only",
        "send: {via: email, variants: [{name: a, template: welcome}]}",
        "20:34: rules[0].send.variants: List should have at least 2 items after validation, not 1",
    ),
    (
        "a weight of zero",
        "send: {via: email, variants: [{name: a, weight: 0, template: welcome}, {name: b, template: welcome}]}",
        "20:53: rules[0].send.variants[0].weight: Input should be greater than or equal to 1",
    ),
    (
        "a name given twice",
        "send: {via: email, variants: [{name: a, template: welcome}, {name: a, template: welcome}]}",
        "20:11: rules[0].send: variant names must be unique: a given twice",
    ),
    (
        "a variant's template missing",
        "send: {via: email, variants: [{name: a, template: welcome}, {name: b, template: nope}]}",
        "20:85: rules[0].send.variants[1].template: template nope.txt.j2 not found in {templates}",
    ),
]


@pytest.mark.parametrize(("case", "send", "expected"), CONFIG_ERRORS, ids=[c[0] for c in CONFIG_ERRORS])
def test_bad_variants_are_config_errors(tmp_path: Path, case: str, send: str, expected: str) -> None:
    text = VALID.replace("send: {via: email, template: welcome}\n  - name: cart", f"{send}\n  - name: cart", 1)
    code, output = check(tmp_path, text, {"SHOP_SECRET": "x"})
    assert code == 2
    expected = expected.replace("{templates}", str(tmp_path / "templates"))
    assert f"{tmp_path / 'declic.yaml'}:{expected}" in output.splitlines(), output


def test_an_unknown_locale_is_a_config_error(tmp_path: Path) -> None:
    code, output = check(tmp_path, VALID.replace("timezone: Europe/Paris\n", "locale: klingon\n"), {"SHOP_SECRET": "x"})
    assert code == 2
    expected = "2:9: locale: unknown locale 'klingon' (use a language, or language_TERRITORY, such as fr or fr_FR)"
    assert f"{tmp_path / 'declic.yaml'}:{expected}" in output.splitlines(), output


def readme_recipe(title: str) -> dict[str, Any]:
    text = (Path(__file__).parents[1] / "README.md").read_text()
    section = text.split(f"### {title}\n", 1)[1]
    return yaml.safe_load(section.split("```yaml\n", 1)[1].split("```", 1)[0])


@pytest.mark.parametrize(
    ("title", "rules"),
    [("Welcome in the customer's language", WELCOME_RULE), ("A/B test a subject line", AB_RULE)],
)
def test_the_readme_recipes_are_the_rules_tested_here(title: str, rules: str) -> None:
    assert readme_recipe(title)["rules"] == yaml.safe_load(rules)
