"""The config contract: `declic check` says ok with a summary, or every error as file:line:col: path: message."""

from __future__ import annotations

import textwrap
import types
import typing
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from declic_gateway.cli.main import cli
from declic_gateway.config import Settings, load_config
from declic_gateway.errors import ConfigError
from declic_gateway.http.app import create_app, load
from declic_gateway.http.running import GATEWAY_KEY
from declic_gateway.kit.durations import Between
from declic_gateway.kit.sinks import SinkConfig
from declic_gateway.plugins import collect, get_plugin_manager
from declic_gateway.testing import write_deployment

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
        "as 90s, 5m, 1h, 3d or 2w (or 250ms), several as 1h30m, or ISO 8601 as P1DT12H",
    ),
    (
        "ISO 8601 months",
        edit("wait: 3d", "wait: P1M"),
        "28:15: rules[1].steps[1].wait: invalid duration 'P1M': years and months vary in length; write days, as P30D",
    ),
    (
        "units out of order",
        edit("wait: 3d", "wait: 30m1h"),
        "28:15: rules[1].steps[1].wait: invalid duration '30m1h': write each unit once, largest first, as 1h30m",
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
        "7:13: sources.shop.plugin: unknown plugin 'shopifi' (did you mean 'shopify'? available: {available}; "
        "see `declic plugins`)",
    ),
    (
        "plugin option typo",
        edit("    host: ${SMTP_HOST", "    hots: ${SMTP_HOST"),
        "12:5: sinks.email.hots: unknown key (did you mean 'host'?)",
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
        "holdout too large",
        edit("    exit_on: [order.placed]\n", "    exit_on: [order.placed]\n    holdout: 60%\n"),
        "25:14: rules[1].holdout: must be a percentage from 0% to 50%, such as 10%",
    ),
    (
        "holdout as a fraction",
        edit("    exit_on: [order.placed]\n", "    exit_on: [order.placed]\n    holdout: 0.1\n"),
        "25:14: rules[1].holdout: must be a percentage from 0% to 50%, such as 10%",
    ),
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
    ("unknown top-level key", VALID + "sink: {}\n", "31:1: sink: unknown key (did you mean 'sinks'?)"),
    (
        "duplicate key",
        edit("timezone: Europe/Paris\n", "timezone: Europe/Paris\ntimezone: UTC\n"),
        "3:1: timezone: duplicate key",
    ),
    (
        "weak admin token",
        VALID + "admin: {token: s3cr3t}\n",
        "31:16: admin.token: the token is shorter than 16 characters: make one with "
        "`python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`",
    ),
    (
        "weak read token",
        VALID + "admin: {tokens: [{token: short, scope: read}]}\n",
        "31:26: admin.tokens[0].token: the token is shorter than 16 characters: make one with "
        "`python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`",
    ),
    (
        "unknown scope",
        VALID + "admin: {tokens: [{token: a-long-enough-read-token, scope: write}]}\n",
        "31:59: admin.tokens[0].scope: Input should be 'read' or 'admin'",
    ),
    ("admin key misspelt", VALID + "admin: {tokns: []}\n", "31:9: admin.tokns: unknown key (did you mean 'tokens'?)"),
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
        "a date on events without of",
        edit("    when: customer.created\n", "    on_date: event.properties.starts_at\n"),
        "18:5: rules[0]: a date rule on event.properties needs `of`: the event types that carry the date",
    ),
    (
        "of on an event rule",
        edit("    when: customer.created\n", "    when: customer.created\n    of: [order.placed]\n"),
        "18:5: rules[0]: `of` is for inactive_for rules and for date rules on event.properties",
    ),
    (
        "a date from nowhere",
        edit("    when: customer.created\n", "    on_date: event.starts_at\n    of: ticket.ordered\n"),
        "18:5: rules[0]: on_date must name a date, as contact.birthday, contact.attributes.NAME or "
        "event.properties.NAME, not 'event.starts_at'",
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
    # A value error no longer hides what is checked after: the plugin, sinks, event types, templates.
    text = text.replace("when: customer.created", "when: customer.create").replace("via: email", "via: mail", 1)
    code, output = check(tmp_path, text)
    places = [line.removeprefix(f"{tmp_path / 'declic.yaml'}:").split(": ")[:2] for line in output.splitlines()]
    assert places == [
        ["7:13", "sources.shop.plugin"],
        ["19:11", "rules[0].when"],
        ["20:17", "rules[0].send.via"],
        ["26:15", "rules[1].steps[0].wait"],
    ]


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
    """docs/config-reference.md is generated: regenerate it with
    `declic reference --builtin-only > docs/config-reference.md`."""
    result = CliRunner().invoke(cli, ["reference", "--builtin-only"])
    documented = (Path(__file__).resolve().parents[1] / "docs" / "config-reference.md").read_text()
    assert result.output == documented


def test_every_config_key_is_described() -> None:
    output = CliRunner().invoke(cli, ["reference"]).output
    undocumented = [line for line in output.splitlines() if line.startswith("| `") and line.endswith("|  |")]
    assert undocumented == []


# Configs that `declic check` passed or answered with a traceback (issue 10): each now gets an error line.
# (case, config text, the exact error line after "declic.yaml:")
HOSTILE = [
    (
        "huge lease",
        VALID + "worker: {lease: 999999999d}\n",
        "31:17: worker.lease: duration '999999999d' is longer than 10 years (3650d), the longest Declic accepts",
    ),
    (
        "lease out of its range",
        VALID + "worker: {lease: 2d}\n",
        "31:17: worker.lease: 2d is too long: write 10s to 1d",
    ),
    (
        "negative duration",
        VALID + "worker: {lease: -5}\n",
        "31:17: worker.lease: invalid duration -5: a duration cannot be negative",
    ),
    (
        "huge wait",
        edit("wait: 3d", "wait: 999999999d"),
        "28:15: rules[1].steps[1].wait: duration '999999999d' is longer than 10 years (3650d), "
        "the longest Declic accepts",
    ),
    (
        "waits adding up past 10 years",
        edit("wait: 1h", "wait: 3000d").replace("wait: 3d", "wait: 3000d"),
        "21:5: rules[1]: the steps' waits add up to more than 10 years (3650d)",
    ),
    (
        "huge offset",
        edit("    when: customer.created\n", "    on_date: contact.birthday\n    offset: -999999999y\n"),
        "20:13: rules[0].offset: offset '-999999999y' is longer than 10 years (3650d), the longest Declic accepts",
    ),
    (
        "NUL byte",
        edit("timezone: Europe/Paris", "timezone: Europe\0Paris"),
        "2:17: invalid YAML: character U+0000 is not allowed",
    ),
    ("list as a key", VALID + "[a, b]: 1\n", "31:1: a key must be a name, not a list"),
    ("dict as a key", VALID + "{a: 1}: 1\n", "31:1: a key must be a name, not a mapping"),
    (
        "plugin as a list",
        edit("plugin: shopify", "plugin: [x]"),
        "7:13: sources.shop.plugin: `plugin` names a plugin (available: {available}; see `declic plugins`), not ['x']",
    ),
    (
        "bad !!int",
        edit("timezone: Europe/Paris", "timezone: !!int Paris"),
        "2:11: timezone: invalid !!int value 'Paris' (invalid literal for int() with base 10: 'Paris')",
    ),
    (
        "bad !!timestamp",
        edit("timezone: Europe/Paris", "timezone: !!timestamp Paris"),
        "2:11: timezone: invalid !!timestamp value 'Paris' (not a date or a date and time)",
    ),
    (
        "python tag",
        edit("timezone: Europe/Paris", "timezone: !!python/object:os.system x"),
        "2:11: timezone: invalid YAML: could not determine a constructor for the tag "
        "'tag:yaml.org,2002:python/object:os.system'",
    ),
    (
        "escape past Unicode",
        edit("timezone: Europe/Paris", 'timezone: "\\U10010000"'),
        "2:14: invalid YAML: chr() arg not in range(0x110000)",
    ),
    ("deep nesting", VALID + "x: " + "[" * 2000 + "]" * 2000 + "\n", "31:53: nested deeper than 50 levels"),
    ("self-referencing alias", VALID + "x: &a [*a]\n", "31:4: x[0]: an alias refers to a node that contains it"),
    (
        "300-character template name",
        edit("template: welcome}\n  - name", "template: " + "w" * 300 + "}\n  - name"),
        "20:34: rules[0].send.template: String should have at most 100 characters",
    ),
    (
        "101-character source name (PostgreSQL stores 100: every call to it answered 503, forever)",
        edit("sources:\n  shop:", "sources:\n  " + "s" * 101 + ":"),
        "7:5: sources." + "s" * 101 + ": String should have at most 100 characters",
    ),
    (
        "101-character rule name",
        edit("  - name: welcome", "  - name: " + "w" * 101),
        "18:11: rules[0].name: String should have at most 100 characters",
    ),
    (
        "sink rate of nothing per 0s",
        edit("    plugin: smtp\n", "    plugin: smtp\n    rate: 5/0s\n"),
        "12:11: sinks.email.rate: invalid rate '5/0s': COUNT from 1 to 1000000, DURATION from 1ms to 7d",
    ),
    (
        "infinite sink timeout",
        edit("    plugin: smtp\n", "    plugin: smtp\n    timeout: .inf\n"),
        "12:14: sinks.email.timeout: Input should be a finite number",
    ),
    (
        "NaN points",
        VALID + "scoring: {email.opened: .nan}\n",
        "31:25: scoring.email.opened: Input should be a finite number",
    ),
    (
        "storage url serve cannot open",
        edit("url: sqlite:///data/declic.db", "url: data/declic.db"),
        "4:8: storage.url: 'data/declic.db' is not sqlite:///FILE or postgresql://user@host/db",
    ),
]


@pytest.mark.parametrize(("case", "text", "expected"), HOSTILE, ids=[e[0] for e in HOSTILE])
def test_hostile_configs_get_an_error_line(tmp_path: Path, case: str, text: str, expected: str) -> None:
    code, output = check(tmp_path, text)
    assert code == 2, output
    expected = expected.replace("{available}", ", ".join(sorted(collect(get_plugin_manager()).sources)))
    assert f"{tmp_path / 'declic.yaml'}:{expected}" in output.splitlines(), output


def test_a_file_that_is_not_utf8_gets_an_error_line(tmp_path: Path) -> None:
    path = write_deployment(tmp_path, VALID, TEMPLATES)
    path.write_bytes(VALID.replace("Europe/Paris", "Europe/Par\xeds").encode("latin-1"))
    result = CliRunner().invoke(cli, ["check", "--config", str(path)], env={"SHOP_SECRET": "x"})
    assert result.exit_code == 2
    assert result.output == f"{path}:2:21: not UTF-8 (byte 0xed): save the file as UTF-8\n"


def _number_fields() -> Iterator[tuple[str, FieldInfo, Any]]:
    """(dotted key, field, base type) of every int, float and duration setting of the core and of SinkConfig."""
    models: list[tuple[str, type[BaseModel]]] = [("", Settings), ("sinks.NAME.", SinkConfig)]
    while models:
        prefix, model = models.pop()
        for name, field in model.model_fields.items():
            key = prefix + (field.alias or name)
            for arg in _union_members(field.annotation):
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    models.append((key + ".", arg))
                elif arg in (int, float, timedelta):
                    yield key, field, arg


def _union_members(annotation: Any) -> Iterator[Any]:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list, dict):
        for arg in args:
            yield from _union_members(arg)
    elif typing.get_origin(annotation) is typing.Annotated:
        yield args[0]
    else:
        yield annotation


def test_every_number_and_duration_setting_has_bounds_its_description_names() -> None:
    """Issue 10: a value past what the code can take must be an error of `declic check`, stated in the reference."""
    unbounded, unnamed = [], []
    for key, field, kind in _number_fields():
        metadata = [
            *field.metadata,
            *(m for a in typing.get_args(field.annotation) for m in getattr(a, "__metadata__", ())),
        ]
        text = field.description or ""
        if kind is timedelta:
            ranges = [m.func for m in metadata if isinstance(getattr(m, "func", None), Between)]
            words = [ranges[0].low, ranges[0].high] if ranges else ["10 y"]
            if not all(word in text or word.replace(" ", "") in text for word in words):
                unnamed.append(key)
            continue
        low = [getattr(m, a) for m in metadata for a in ("ge", "gt") if getattr(m, a, None) is not None]
        high = [getattr(m, a) for m in metadata for a in ("le", "lt") if getattr(m, a, None) is not None]
        if not low or not high:
            unbounded.append(key)
        elif not all(f"{int(b) if b == int(b) else b}" in text for b in (*low, *high)):
            unnamed.append(key)
    assert unbounded == []
    assert unnamed == []


def test_settings_at_their_bounds_pass_and_serve_builds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bounds are inclusive, and what check accepts at the edge, create_app builds."""
    text = (
        edit("wait: 1h", "wait: 1825d").replace("wait: 3d", "wait: 1825d")
        + "worker: {lease: 1d, poll_interval: 10ms, retry_base: 1d, retry_max: 7d, max_attempts: 100}\n"
        + "storage: {url: 'sqlite:///d.db', busy_timeout: 1m}\n"
        + "limits: {max_body_bytes: 104857600}\n"
        + "scoring: {half_life: 3650d, email.opened: 1000000, email.clicked: -1000000}\n"
    ).replace("storage:\n  url: sqlite:///data/declic.db\n", "")
    text = text.replace(
        "  consent: {email: required}\n",
        "  consent: {email: required}\n  pressure: {max: 1000, per: 366d, max_delay: 3650d}\n",
    )
    text = text.replace("    plugin: smtp\n", "    plugin: smtp\n    rate: 1000000/7d\n    timeout: 600\n")
    text = text.replace(
        "rules:\n",
        """\
rules:
  - name: birthday
    on_date: contact.birthday
    offset: -10y
    catch_up: 366d
    reenter: {after: 3650d}
    priority: -1000
    send: {via: email, template: welcome}
  - name: idle
    inactive_for: 3650d
    of: order.placed
    send: {via: email, template: welcome}
""",
    )
    code, output = check(tmp_path, text)
    assert code == 0, output
    monkeypatch.setenv("SHOP_SECRET", "x")
    monkeypatch.delenv("DECLIC_DATABASE_URL", raising=False)
    settings, pm, _ = load(str(tmp_path / "declic.yaml"))
    app = create_app(settings, pm=pm)
    app[GATEWAY_KEY].db.close()


def test_merge_keys_share_settings_and_errors_point_where_the_value_is_written(tmp_path: Path) -> None:
    """`<<: *anchor` (which used to be a traceback) merges; keys written beside it win."""
    text = VALID.replace(
        "rules:\n",
        "x-step: &step {wait: 1h, send: {via: email, template: welcome}}\n"
        "rules:\n  - name: merged\n    when: order.placed\n    steps:\n      - {<<: *step, wait: 2h}\n      - *step\n",
    ).replace("x-step:", "worker: {<<: {lease: 2d}, poll_interval: 1s}\nx-step:")
    code, output = check(tmp_path, text)
    assert code == 2
    assert output.splitlines() == [
        f"{tmp_path / 'declic.yaml'}:17:22: worker.lease: 2d is too long: write 10s to 1d",
        f"{tmp_path / 'declic.yaml'}:18:1: x-step: unknown key",
    ]


def test_an_empty_variable_takes_the_default_as_in_the_shell(tmp_path: Path) -> None:
    path = write_deployment(
        tmp_path, edit("url: sqlite:///data/declic.db", "url: ${DB_URL:-sqlite:///d.db}"), TEMPLATES
    )
    pm = get_plugin_manager()
    settings = load_config(path, collect(pm), pm, env={"SHOP_SECRET": "x", "DB_URL": ""})
    assert settings.storage.url == "sqlite:///d.db"


def test_a_huge_value_echoed_in_an_error_is_shortened(tmp_path: Path) -> None:
    code, output = check(tmp_path, edit("plugin: shopify", "plugin: " + "9" * 5000 + "shopify"))
    assert code == 2
    [line] = output.splitlines()
    assert line.startswith(f"{tmp_path / 'declic.yaml'}:7:13: sources.shop.plugin: unknown plugin '999")
    assert "9999...9999999999999999999999shopify' (available: " in line
    assert len(line) < 400 + len(str(tmp_path))
