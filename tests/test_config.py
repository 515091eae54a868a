"""The config contract: `declic check` says ok with a summary, or every error as file:line:col: path: message."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from gateway.cli.main import cli
from gateway.errors import ConfigError
from gateway.http.app import load
from gateway.plugins import collect, get_plugin_manager
from gateway.testing import write_deployment

TEMPLATES = {"welcome.txt.j2": "Hello", "welcome.subject.j2": "Hi"}

VALID = """\
public_url: https://hooks.example.com
timezone: Europe/Paris
storage:
  url: sqlite:///data/declic.db
sources:
  shop:
    plugin: shopify
    secret: ${SHOP_SECRET}
sinks:
  email:
    plugin: smtp
    host: ${SMTP_HOST:-mail.example.com}
    port: ${SMTP_PORT:-2525}
    sender: "Shop <shop@example.com>"
policies:
  consent: {email: required}
rules:
  - name: welcome
    when: customer.created
    send: {via: email, template: welcome}
  - name: cart
    when: checkout.started
    if: "event.properties.total_price > 20"
    exit_on: [order.placed]
    steps:
      - wait: 1h
        send: {via: email, template: welcome}
      - wait: 3d
        if: "contact.email_status == 'ok'"
        send: {via: email, template: welcome}
"""


def check(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    path = write_deployment(tmp_path, text, TEMPLATES)
    result = CliRunner().invoke(cli, ["check", "--config", str(path)], env={"SHOP_SECRET": "x"} if env is None else env)
    return result.exit_code, result.output


def test_valid_config_is_ok_with_a_summary(tmp_path: Path) -> None:
    code, output = check(tmp_path, VALID)
    assert code == 0, output
    assert output.splitlines() == [
        f"ok: {tmp_path / 'declic.yaml'}",
        "sources: shop (shopify)",
        "sinks: email (smtp)",
        "rules: welcome (on customer.created, 1 step), cart (on checkout.started, 2 steps)",
    ]


def test_env_vars_defaults_and_relative_paths_resolve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOP_SECRET", "from-env")
    monkeypatch.setenv("SMTP_PORT", "2626")
    monkeypatch.delenv("SMTP_HOST", raising=False)
    monkeypatch.delenv("DECLIC_DATABASE_URL", raising=False)
    settings, _, _ = load(str(write_deployment(tmp_path, VALID, TEMPLATES)))
    _, shop = settings.source_plugins["shop"]
    _, email = settings.sink_plugins["email"]
    assert shop.secret.get_secret_value() == "from-env"  # type: ignore[attr-defined]
    assert (email.host, email.port) == ("mail.example.com", 2626)  # type: ignore[attr-defined]
    assert settings.database_url == f"sqlite:///{tmp_path / 'data' / 'declic.db'}"
    assert settings.templates_dir == tmp_path / "templates"
    assert [s.wait.total_seconds() for s in settings.rules[1].steps] == [3600, 3 * 86400]


def test_database_url_env_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOP_SECRET", "x")
    monkeypatch.setenv("DECLIC_DATABASE_URL", "postgresql://db.internal/declic")
    settings, _, _ = load(str(write_deployment(tmp_path, VALID, TEMPLATES)))
    assert settings.database_url == "postgresql://db.internal/declic"


def edit(old: str, new: str) -> str:
    assert old in VALID, old
    return VALID.replace(old, new)


# (case, config text, the exact error line after "declic.yaml:")
ERRORS = [
    (
        "missing env var",
        VALID,
        "8:13: sources.shop.secret: environment variable SHOP_SECRET is not set (or write ${SHOP_SECRET:-default})",
    ),
    (
        "bad duration",
        edit("wait: 3d", "wait: 3 days"),
        "28:15: rules[1].steps[1].wait: invalid duration '3 days': write a number and a unit, "
        "as 90s, 5m, 1h, 3d or 2w (or 250ms)",
    ),
    (
        "unknown sink",
        edit(
            "send: {via: email, template: welcome}\n  - name: cart",
            "send: {via: sms, template: welcome}\n  - name: cart",
        ),
        "20:17: rules[0].send.via: no sink named 'sms' under `sinks:` (configured: email)",
    ),
    (
        "unknown plugin",
        edit("plugin: shopify", "plugin: shopifi"),
        "7:13: sources.shop.plugin: unknown plugin 'shopifi' (available: {available}; see `declic plugins`)",
    ),
    (
        "plugin option typo",
        edit("    host: ${SMTP_HOST", "    hots: ${SMTP_HOST"),
        "12:5: sinks.email.hots: unknown key",
    ),
    (
        "plugin option missing",
        edit('    sender: "Shop <shop@example.com>"\n', ""),
        "11:5: sinks.email.sender: required key is missing",
    ),
    (
        "bad sender",
        edit("Shop <shop@example.com>", "Shop"),
        "14:13: sinks.email.sender: not an e-mail address: 'Shop' (An email address must have an @-sign.)",
    ),
    (
        "event type typo",
        edit("when: customer.created", "when: customer.create"),
        "19:11: rules[0].when: unknown event type 'customer.create' (did you mean 'customer.created'?)",
    ),
    (
        "exit_on typo",
        edit("exit_on: [order.placed]", "exit_on: [order.place]"),
        "24:15: rules[1].exit_on[0]: unknown event type 'order.place' (did you mean 'order.placed'?)",
    ),
    (
        "bad expression",
        edit('"event.properties.total_price > 20"', '"event.properties.total_price >"'),
        "23:9: rules[1].if: invalid expression: unexpected 'end of template'",
    ),
    (
        "missing template",
        edit("template: welcome}\n  - name", "template: hello}\n  - name"),
        "20:34: rules[0].send.template: template hello.txt.j2 not found in {templates}",
    ),
    (
        "send and steps",
        edit(
            "    exit_on: [order.placed]\n", "    exit_on: [order.placed]\n    send: {via: email, template: welcome}\n"
        ),
        "21:5: rules[1]: a rule needs exactly one of `send` or `steps`",
    ),
    ("duplicate rule", edit("name: cart", "name: welcome"), "21:11: rules[1].name: duplicate rule name 'welcome'"),
    (
        "bad kind",
        edit("    when: customer.created\n", "    when: customer.created\n    kind: promo\n"),
        "20:11: rules[0].kind: Input should be 'marketing' or 'transactional'",
    ),
    (
        "bad timezone",
        edit("Europe/Paris", "Europe/Pariss"),
        "2:11: timezone: unknown time zone 'Europe/Pariss' (use an IANA name such as Europe/Paris)",
    ),
    ("unknown top-level key", VALID + "sink: {}\n", "31:1: sink: unknown key"),
    (
        "duplicate key",
        edit("timezone: Europe/Paris\n", "timezone: Europe/Paris\ntimezone: UTC\n"),
        "3:1: timezone: duplicate key",
    ),
    (
        "weak admin token",
        VALID + "admin: {token: s3cr3t}\n",
        "31:16: admin.token: the admin token is shorter than 16 characters: make one with "
        "`python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`",
    ),
    ("admin key misspelt", VALID + "admin: {tokens: []}\n", "31:9: admin.tokens: unknown key"),
    (
        "two triggers",
        edit("    when: customer.created\n", "    when: customer.created\n    on_date: contact.birthday\n"),
        "18:5: rules[0]: a rule needs exactly one trigger: when, on_date, inactive_for or score_reaches",
    ),
    (
        "bad time of day",
        edit("    when: customer.created\n", "    on_date: contact.birthday\n    at: '25:00'\n"),
        "20:9: rules[0].at: invalid time of day '25:00': write HH:MM, as 10:00 or 21:30",
    ),
    (
        "inactivity without of",
        edit("    when: customer.created\n", "    inactive_for: 90d\n"),
        "18:5: rules[0]: an inactive_for rule needs `of`: the event types that count as activity",
    ),
    ("invalid yaml", "rules: [\n", "2:1: invalid YAML: expected the node content, but found '<stream end>'"),
]


@pytest.mark.parametrize(("case", "text", "expected"), ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_name_file_line_column_path(tmp_path: Path, case: str, text: str, expected: str) -> None:
    env = {} if case == "missing env var" else {"SHOP_SECRET": "x"}
    code, output = check(tmp_path, text, env)
    assert code == 2
    expected = expected.replace("{templates}", str(tmp_path / "templates"))
    expected = expected.replace("{available}", ", ".join(sorted(collect(get_plugin_manager()).sources)))
    assert f"{tmp_path / 'declic.yaml'}:{expected}" in output.splitlines(), output


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    text = edit("plugin: shopify", "plugin: nope").replace("wait: 1h", "wait: soon")
    with pytest.raises(ConfigError) as caught:
        load(str(write_deployment(tmp_path, text, TEMPLATES)))
    assert len(caught.value.problems) >= 1
    code, output = check(tmp_path, textwrap.dedent(text))
    assert code == 2
    assert "rules[1].steps[0].wait: invalid duration 'soon'" in output


def test_serve_refuses_to_start_on_a_bad_config(tmp_path: Path) -> None:
    path = write_deployment(tmp_path, edit("plugin: shopify", "plugin: nope"), TEMPLATES)
    result = CliRunner().invoke(cli, ["serve", "--config", str(path)], env={"SHOP_SECRET": "x"})
    assert result.exit_code == 2
    assert "sources.shop.plugin: unknown plugin 'nope'" in result.output


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["check", "--config", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "nope.yaml: cannot read config: No such file or directory" in result.output


def test_the_shipped_demo_config_is_valid() -> None:
    demo = Path(__file__).resolve().parents[1] / "config" / "declic.yaml"
    result = CliRunner().invoke(cli, ["check", "--config", str(demo)], env={"DECLIC_DATABASE_URL": ""})
    assert result.exit_code == 0, result.output


def test_config_reference_is_current() -> None:
    """docs/config-reference.md is generated: regenerate it with `declic reference > docs/config-reference.md`."""
    result = CliRunner().invoke(cli, ["reference"])
    documented = (Path(__file__).resolve().parents[1] / "docs" / "config-reference.md").read_text()
    assert result.output == documented


def test_every_config_key_is_described() -> None:
    output = CliRunner().invoke(cli, ["reference"]).output
    undocumented = [line for line in output.splitlines() if line.startswith("| `") and line.endswith("|  |")]
    assert undocumented == []
