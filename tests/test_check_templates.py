"""`declic check` reports every mistake at once, templates and expressions included, each at its line with
a "did you mean"; at run time, what the check cannot see fails its step once, in the journal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import structlog
from click.testing import CliRunner
from structlog.testing import capture_logs

from conftest import Factory, fixture_bytes
from declic_gateway.cli.main import cli
from declic_gateway.kit.context import CONTACT_FIELDS, CONTACT_HELPERS, EVENT_FIELDS
from declic_gateway.pipeline import contacts
from declic_gateway.pipeline.contacts import ContactView
from declic_gateway.pipeline.eventlog import load_event
from declic_gateway.testing import SmtpCatcher, write_deployment

ORDER = fixture_bytes("shopify/order.json")

GOOD = """\
public_url: https://hooks.example.com
timezone: Europe/Paris
sources:
  shop: {plugin: shopify, secret: s3cret}
sinks:
  email:
    plugin: smtp
    host: mail.example.com
    sender: "Shop <shop@example.com>"
rules:
  - name: cart
    when: checkout.started
    if: "event.properties.total_price > 20"
    steps:
      - wait: 1h
        send: {via: email, template: cart}
      - wait: 1d
        if: "not contact.opened(rule='cart', step=1)"
        send: {via: email, template: cart}
  - name: receipt
    when: order.placed
    kind: transactional
    send: {via: email, template: receipt}
"""
GOOD_TEMPLATES = {
    "cart.subject.j2": "Your cart, {{ contact.first_name or 'friend' }}",
    "cart.txt.j2": "Hello {{ contact.first_name | default('there') }},\n"
    "{{ event.properties.total_price }} {{ event.properties.currency | upper }}\n"
    "Stop: {{ unsubscribe_url }}\n",
    "receipt.txt.j2": "{% include 'footer.j2' %}\nOrder {{ event.properties.name }} ({{ rule }}, step {{ step }})\n"
    "{{ unsubscribe_url | default('') }}",
    "footer.j2": "Shop",
}

#: Ten mistakes, one of each kind, all in one config and its templates.
BROKEN = """\
public_url: https://hooks.example.com
timezon: Europe/Paris
sources:
  shop: {plugin: shopify, secret: s3cret}
sinks:
  email:
    plugin: smtp
    hots: mail.example.com
    sender: "Shop <shop@example.com>"
rules:
  - name: cart
    when: checkout.startd
    if: "event.total_price > 20"
    steps:
      - wait: 1 hour
        send: {via: email, template: cart}
      - wait: 1d
        if: "contact.cuont('order.placed') == 0"
        send: {via: emial, template: cart}
  - name: receipt
    when: order.placed
    kind: transactional
    send: {via: email, template: receipt}
"""
BROKEN_TEMPLATES = {
    "cart.subject.j2": "Your cart, {{ contact.firstname }}",
    "cart.txt.j2": "Hello,\n{{ event.properties.total_price | money }}\nStop: {{ unsubscribe_url }}\n",
    "receipt.txt.j2": "Order {{ event.properties.name }}\n{% if event.properties.paid %}paid{% endfi %}\n"
    "Stop: {{ unsubscribe_url }}",
    "footer.j2": "Shop",
}


def run_check(folder: Path, config: str, templates: dict[str, str], *options: str) -> tuple[int, str]:
    path = write_deployment(folder, config, templates)
    result = CliRunner().invoke(cli, ["check", "--config", str(path), *options], env={"DECLIC_DATABASE_URL": ""})
    return result.exit_code, result.output


def test_a_good_config_with_templates_and_expressions_is_ok(tmp_path: Path) -> None:
    code, output = run_check(tmp_path, GOOD, GOOD_TEMPLATES)
    assert code == 0, output


def test_ten_mistakes_are_reported_in_one_run_each_at_its_line(tmp_path: Path) -> None:
    code, output = run_check(tmp_path, BROKEN, BROKEN_TEMPLATES)
    assert code == 2
    config, templates = tmp_path / "declic.yaml", tmp_path / "templates"
    assert output.splitlines() == [
        f"{config}:2:1: timezon: unknown key (did you mean 'timezone'?)",
        f"{config}:8:5: sinks.email.hots: unknown key (did you mean 'host'?)",
        f"{config}:12:11: rules[0].when: unknown event type 'checkout.startd' (did you mean 'checkout.started'?)",
        f"{config}:13:16: rules[0].if: event has no field 'total_price' "
        "(an event's data is under event.properties: event.properties.total_price)",
        f"{config}:15:15: rules[0].steps[0].wait: invalid duration '1 hour': write a number and a unit, "
        "as 90s, 5m, 1h, 3d or 2w (or 250ms), several as 1h30m, or ISO 8601 as P1DT12H",
        f"{config}:18:22: rules[0].steps[1].if: contact has no helper cuont() (did you mean 'count'?); helpers here: "
        "contact.count(EVENT, within=DURATION, where=EXPR), contact.has(EVENT, within=DURATION, where=EXPR), "
        "contact.last(EVENT, where=EXPR), contact.sent(rule=..., step=..., within=DURATION), "
        "contact.opened(rule=..., step=...), contact.clicked(rule=..., step=...)",
        f"{config}:19:21: rules[0].steps[1].send.via: no sink named 'emial' under `sinks:` "
        "(did you mean 'email'? configured: email)",
        f"{templates}/cart.subject.j2:1:23: rules[0].steps[0].send.template: contact has no field 'firstname' "
        "(did you mean 'first_name'?)",
        f"{templates}/cart.txt.j2:2:35: rules[0].steps[0].send.template: unknown filter 'money'",
        f"{templates}/receipt.txt.j2:2:1: rules[1].send.template: invalid template: Encountered unknown tag "
        "'endfi'. Jinja was looking for the following tags: 'elif' or 'else' or "
        "'endif'. The innermost block that needs to be closed is 'if'.",
    ]


def test_the_same_ten_mistakes_as_json_for_editors_and_ci(tmp_path: Path) -> None:
    code, output = run_check(tmp_path, BROKEN, BROKEN_TEMPLATES, "--format", "json")
    assert code == 2
    document = json.loads(output)
    assert document["ok"] is False
    assert len(document["problems"]) == 10
    first = document["problems"][0]
    assert first == {
        "file": str(tmp_path / "declic.yaml"),
        "line": 2,
        "column": 1,
        "path": "timezon",
        "message": "unknown key (did you mean 'timezone'?)",
    }
    assert document["problems"][-1]["file"] == str(tmp_path / "templates" / "receipt.txt.j2")
    code, output = run_check(tmp_path, GOOD, GOOD_TEMPLATES, "--format", "json")
    assert code == 0 and json.loads(output)["rules"][0] == {
        "name": "cart",
        "trigger": "on checkout.started",
        "steps": 2,
    }


# (what is wrong, config edit (old, new), templates edit, the error line after the file name)
TEMPLATE_MISTAKES = [
    (
        "unsubscribe_url in a transactional message",
        None,
        {"receipt.txt.j2": "Order {{ event.properties.name }}\n{{ unsubscribe_url }}"},
        "receipt.txt.j2:2:4: rules[1].send.template: unsubscribe_url is not set here: rule 'receipt' is "
        "transactional, and only marketing e-mail carries an unsubscribe link (write "
        "`{{ unsubscribe_url | default('') }}` in a template shared with marketing e-mail)",
    ),
    (
        "an included file that is missing",
        None,
        {"receipt.txt.j2": "{% include 'footr.j2' %}"},
        "receipt.txt.j2:1:1: rules[1].send.template: template 'footr.j2' not found in {templates}",
    ),
    (
        "an unknown name",
        None,
        {"receipt.txt.j2": "{{ stpe }}"},
        "receipt.txt.j2:1:4: rules[1].send.template: unknown name 'stpe' (did you mean 'step'?)",
    ),
    (
        "a misspelt test",
        None,
        {"receipt.txt.j2": "{% if event.properties.paid is tru %}paid{% endif %}"},
        "receipt.txt.j2:1:32: rules[1].send.template: unknown test 'tru' (did you mean 'true'?)",
    ),
    (
        "a mistake in a translation",
        None,
        {"receipt.fr_CA.txt.j2": "Commande {{ event.properties.name | format_curency }}"},
        "receipt.fr_CA.txt.j2:1:37: rules[1].send.template: unknown filter 'format_curency' "
        "(did you mean 'format_currency'?)",
    ),
    (
        "a helper's duration that is not one",
        ('if: "event.properties.total_price > 20"', "if: \"contact.has('order.placed', within='2 weeks')\""),
        {},
        "declic.yaml:13:9: rules[0].if: within=: invalid duration '2 weeks': write a number and a unit, as 90s, "
        "5m, 1h, 3d or 2w (or 250ms), several as 1h30m, or ISO 8601 as P1DT12H",
    ),
    (
        "a scoring if",
        ("rules:\n", "scoring:\n  page.viewed: {points: 2, if: \"'/pricing' in event.path\"}\nrules:\n"),
        {},
        "declic.yaml:11:53: scoring.page.viewed.if: event has no field 'path' "
        "(an event's data is under event.properties: event.properties.path)",
    ),
]


@pytest.mark.parametrize(
    ("case", "edit", "templates", "expected"),
    TEMPLATE_MISTAKES,
    ids=[m[0] for m in TEMPLATE_MISTAKES],
)
def test_template_and_expression_mistakes(
    tmp_path: Path, case: str, edit: tuple[str, str] | None, templates: dict[str, str], expected: str
) -> None:
    config = GOOD.replace(*edit) if edit else GOOD
    code, output = run_check(tmp_path, config, GOOD_TEMPLATES | templates)
    assert code == 2
    folder = tmp_path if expected.startswith("declic.yaml") else tmp_path / "templates"
    expected = expected.replace("{templates}", str(tmp_path / "templates"))
    assert output.splitlines() == [f"{folder}/{expected}"]


def test_unsubscribe_url_without_a_public_url_is_an_error_not_none(tmp_path: Path) -> None:
    code, output = run_check(tmp_path, GOOD.replace("public_url: https://hooks.example.com\n", ""), GOOD_TEMPLATES)
    assert code == 2
    assert output.splitlines() == [
        f"{tmp_path}/declic.yaml:10:5: rules[0]: marketing e-mail (rule 'cart') needs `public_url:`: its one-click "
        "unsubscribe links point there",
        f"{tmp_path}/templates/cart.txt.j2:3:10: rules[0].steps[0].send.template: unsubscribe_url is not set here: "
        "the unsubscribe link needs `public_url:`, where it points",
    ]


def test_the_known_names_table_is_what_the_code_builds() -> None:
    """kit/context.py lists what templates see; adding a field or a helper without it fails here."""
    helpers = {name for name in vars(ContactView) if not name.startswith("_") and callable(getattr(ContactView, name))}
    assert helpers == set(CONTACT_HELPERS)
    assert {"id", "source", "type", "occurred_at", "correlation", "properties"} == EVENT_FIELDS


async def test_what_templates_see_at_send_time_is_the_table(deploy: Factory, smtp: SmtpCatcher) -> None:
    d = await deploy()
    assert (await d.post_shopify("orders/create", ORDER)).status == 200
    await d.advance(seconds=1)
    [(contact_id, event_id)] = d.rows("SELECT contact_id, event_id FROM enrolments")
    contact = await d.gateway.db.run(contacts.view, contact_id, d.clock.now())
    event = await d.gateway.db.run(load_event, event_id)
    assert set(contact) == CONTACT_FIELDS
    assert set(event) == EVENT_FIELDS


async def test_a_template_broken_after_start_fails_its_step_once_with_the_reason(
    deploy: Factory, smtp: SmtpCatcher
) -> None:
    """Templates are read when used: one edited after `declic serve` started is only seen at send time."""
    d = await deploy(max_attempts=12)
    (d.path.parent / "templates" / "order-confirmation.txt.j2").write_text("Thanks {{ contact.firstname }}")
    with capture_logs() as logs:
        assert (await d.post_shopify("orders/create", ORDER)).status == 200
        await d.advance(seconds=1)
        await d.advance(hours=3)
    reason = (
        "order-confirmation.txt.j2:1: UndefinedError: contact has no field 'firstname' (did you mean 'first_name'?)"
    )
    assert d.rows("SELECT status, reason, attempts FROM deliveries") == [("failed", reason, 1)]
    assert d.rows("SELECT action, reason FROM decisions WHERE action = 'failed'") == [("failed", reason)]
    assert [e for e in logs if "firstname" in json.dumps(e, default=str)] != []
    assert len([e for e in logs if "firstname" in json.dumps(e, default=str)]) == 1
    assert smtp.messages == []


async def test_an_if_that_raises_is_journaled_as_failed_and_logged_once(deploy: Factory, smtp: SmtpCatcher) -> None:
    rules = """\
  - name: big-order
    when: order.placed
    kind: transactional
    if: "event.properties.discount > 5"
    send: {via: email, template: order-confirmation}
"""
    d = await deploy(rules)
    with capture_logs() as logs:
        for webhook in ("1", "2"):
            assert (await d.post_shopify("orders/create", ORDER, webhook_id=webhook)).status == 200
            await d.advance(seconds=1)
    failed = d.rows("SELECT action, reason FROM decisions WHERE rule = 'big-order'")
    assert len(failed) == 2
    assert {action for action, _ in failed} == {"failed"}
    assert failed[0][1].startswith("if failed: event.properties.discount > 5: UndefinedError")
    assert len([e for e in logs if e.get("event", "").startswith("condition failed")]) == 1
    assert smtp.messages == []


SIMULATED = """\
- {at: "2026-03-14T09:00:00Z", type: checkout.started, correlation: "checkout:abc",
   contact: {email: camille@example.org, first_name: Camille, consent: {email: granted}},
   properties: {total_price: 59.9, currency: eur}}
- {at: "2026-03-14T09:30:00Z", type: checkout.started, correlation: "checkout:def",
   contact: {email: dominique@example.org, consent: {email: granted}}, properties: {total_price: 5}}
- {at: "2026-03-16T00:00:00Z", end: true}
"""


def simulate(folder: Path, templates: dict[str, str], timeline: str, *options: str) -> tuple[int, str, str]:
    path = write_deployment(folder, GOOD, templates)
    (folder / "timeline.yaml").write_text(timeline)
    saved = structlog.get_config()  # the command sets the log level for the process: keep it to this test
    try:
        result = CliRunner().invoke(cli, ["simulate", "--config", str(path), *options, str(folder / "timeline.yaml")])
    finally:
        structlog.configure(**saved)
    return result.exit_code, result.stdout, result.stderr


def test_simulate_shows_each_rendered_message_and_why_not_enrolled(tmp_path: Path) -> None:
    code, out, err = simulate(tmp_path, GOOD_TEMPLATES, SIMULATED, "--show-messages")
    assert (code, err) == (0, "")
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(d["action"], d["contact"]) for d in lines] == [
        ("enrolled", "camille@example.org"),
        ("not_enrolled", "dominique@example.org"),
        ("send", "camille@example.org"),
        ("message", "camille@example.org"),
        ("send", "camille@example.org"),
        ("message", "camille@example.org"),
    ]
    assert lines[1]["reason"] == "if false: event.properties.total_price > 20"
    message = lines[3]
    assert (message["rule"], message["step"], message["to"]) == ("cart", 1, "camille@example.org")
    assert message["subject"] == "Your cart, Camille"
    assert message["text"].startswith("Hello Camille,\n59.9 EUR\nStop: https://hooks.example.com/u/")


def test_simulate_refuses_a_misspelt_event_type(tmp_path: Path) -> None:
    code, out, err = simulate(
        tmp_path, GOOD_TEMPLATES, SIMULATED.replace("type: checkout.started", "type: checkout.start", 1)
    )
    assert (code, out) == (2, "")
    assert err == (
        f"{tmp_path / 'timeline.yaml'}: item at 2026-03-14T09:00:00+00:00: unknown event type 'checkout.start' "
        "(did you mean 'checkout.started'?)\n"
    )


def test_simulate_fails_on_a_step_that_fails(tmp_path: Path) -> None:
    """A template that passes the check but fails on this contact's data: a non-zero exit and the reason."""
    broken = GOOD_TEMPLATES | {"cart.txt.j2": "{{ event.properties.total_price | round(event.properties.digits) }}"}
    code, out, err = simulate(tmp_path, broken, SIMULATED)
    assert code == 1
    failed = [json.loads(line) for line in out.splitlines() if json.loads(line)["action"] == "failed"]
    assert [(d["rule"], d["step"], d["contact"]) for d in failed] == [("cart", 1, "camille@example.org")]
    assert failed[0]["reason"].startswith("cart.txt.j2:1: ")
    assert err.startswith(f"failed: rule cart, camille@example.org: {failed[0]['reason']}\n")


def test_the_readme_example_gets_the_output_the_readme_shows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Check a config: `declic check`", 1)[1]
    config = section.split("```yaml mistakes\n", 1)[1].split("```", 1)[0]
    console = section.split("```console\n", 1)[1].split("```", 1)[0].splitlines()
    write_deployment(
        tmp_path / "config",
        config,
        {"cart-reminder.txt.j2": "Hello {{ contact.firstname }},\n{{ event.properties.total_price | money }}\n"},
    )
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["check", "--config", "config/declic.yaml"], env={"DECLIC_DATABASE_URL": ""})
    assert result.exit_code == 2
    assert ["$ declic check --config config/declic.yaml", *result.output.splitlines()] == console


async def test_a_step_if_that_raises_fails_that_step_and_the_journey_goes_on(
    deploy: Factory, smtp: SmtpCatcher
) -> None:
    rules = """\
  - name: follow-up
    when: order.placed
    kind: transactional
    steps:
      - if: "event.properties.discount > 5"
        send: {via: email, template: order-confirmation}
      - wait: 1h
        send: {via: email, template: order-confirmation}
"""
    d = await deploy(rules)
    assert (await d.post_shopify("orders/create", ORDER)).status == 200
    await d.advance(seconds=1)
    await d.advance(hours=1)
    assert d.rows("SELECT step, action FROM decisions WHERE action IN ('failed', 'send') ORDER BY step") == [
        (1, "failed"),
        (2, "send"),
    ]
    assert d.rows("SELECT step, status FROM deliveries ORDER BY step") == [(1, "failed"), (2, "sent")]
    assert len(smtp.messages) == 1
