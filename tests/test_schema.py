"""`declic schema`: the JSON Schema editors use to complete and check `declic.yaml`, and every
config example in the docs validated against it."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from click.testing import CliRunner
from pydantic import Field

from declic_gateway import SinkConfig, hookimpl
from declic_gateway.cli.main import cli
from declic_gateway.config import Settings
from declic_gateway.config.schema import build
from declic_gateway.kit.sinks import Sink
from declic_gateway.plugins import collect, get_plugin_manager

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_FILE = ROOT / "docs" / "declic.schema.json"


@functools.cache
def committed() -> jsonschema.Draft202012Validator:
    return validator(json.loads(SCHEMA_FILE.read_text()))


def validator(schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def problems(data: Any, checker: jsonschema.Draft202012Validator | None = None) -> list[str]:
    checker = checker or committed()
    return [f"{error.json_path}: {error.message[:300]}" for error in checker.iter_errors(data)]


def test_the_committed_schema_is_current() -> None:
    """docs/declic.schema.json is generated: regenerate it with
    `declic schema --builtin-only > docs/declic.schema.json`."""
    result = CliRunner().invoke(cli, ["schema", "--builtin-only"])
    assert result.exit_code == 0, result.output
    assert result.output == SCHEMA_FILE.read_text(), "run: declic schema --builtin-only > docs/declic.schema.json"


def test_the_demo_config_names_the_schema_for_editors_and_validates() -> None:
    demo = ROOT / "config" / "declic.yaml"
    first = demo.read_text().splitlines()[0]
    match = re.fullmatch(r"# yaml-language-server: \$schema=(\S+)", first)
    assert match, first
    assert (demo.parent / match.group(1)).resolve() == SCHEMA_FILE
    assert problems(yaml.safe_load(demo.read_text())) == []


def yaml_blocks() -> Iterator[tuple[str, str]]:
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        text = path.read_text()
        for block in re.finditer(r"^```ya?ml\n(.*?)^```", text, re.S | re.M):
            line = text.count("\n", 0, block.start()) + 2
            yield f"{path.relative_to(ROOT)}:{line}", block.group(1)


def test_every_config_example_in_the_docs_is_valid() -> None:
    """A mapping whose keys are config keys is a config example: a fragment is a config too, every
    key being optional. Other YAML (simulate timelines, Prometheus, compose files) is not a config."""
    keys = set(Settings.model_fields)
    installed = collect(get_plugin_manager())
    checked, failures = 0, []
    for where, text in yaml_blocks():
        data = yaml.safe_load(text)
        if not (isinstance(data, dict) and keys & set(data)):
            continue
        if where.startswith("docs/plugins.md"):  # writing a plugin: its example names the reader's own
            for table in ("sources", "sinks"):
                entries = data.get(table) or {}
                data[table] = {
                    k: v for k, v in entries.items() if v["plugin"] in {*installed.sources, *installed.sinks}
                }
        failures += [f"{where}: {problem}" for problem in problems(data)]
        checked += 1
    assert failures == []
    assert checked >= 25, checked  # the README and docs/connect hold this many


@pytest.mark.parametrize(
    ("config", "complaint"),
    [
        ({"worker": {"retry_fro": "3d"}}, "Additional properties are not allowed ('retry_fro' was unexpected)"),
        ({"worker": {"retry_for": "3 days"}}, "is not valid under any of the given schemas"),
        ({"sinks": {"email": {"plugin": "smtpp"}}}, "'smtpp' is not one of"),
        ({"sinks": {"email": {"plugin": "smtp", "sender": "a@example.com", "hots": "x"}}}, "'hots' was unexpected"),
        ({"sinks": {"email": {"plugin": "smtp"}}}, "'sender' is a required property"),
        ({"sinks": {"email": {"host": "smtp.example.com"}}}, "'plugin' is a required property"),
        ({"sinks": {"email": {"plugin": "smtp", "sender": "a@example.com", "tls": "maybe"}}}, "is not valid under"),
        ({"rules": [{"name": "x", "when": "order.placed", "holdout": "80 percent"}]}, "is not valid under"),
        ({"sources": {"Shop": {"plugin": "shopify", "secret": "s"}}}, "'Shop' does not match"),
        ({"rules": [{"name": "x", "when": "order.placed", "sned": {}}]}, "'sned' was unexpected"),
    ],
)
def test_the_schema_flags_what_declic_check_would_refuse(config: dict[str, Any], complaint: str) -> None:
    found = problems(config)
    assert any(complaint in problem for problem in found), found


def test_values_from_the_environment_are_accepted_where_a_number_or_a_choice_goes() -> None:
    config = {
        "sinks": {
            "email": {"plugin": "smtp", "sender": "a@example.com", "port": "${SMTP_PORT:-1025}", "tls": "${SMTP_TLS}"}
        },
        "worker": {"retry_for": "${RETRY_FOR:-3d}", "concurrency": "${CONCURRENCY}"},
    }
    assert problems(config) == []


class Pager(Sink):
    """A pager, from a plugin installed beside Declic."""

    name = "pager"
    channel = "pager"

    class Config(SinkConfig):
        endpoint: str = Field(description="Where pages go.")
        level: int = Field(1, ge=1, le=5, description="Urgency, 1 to 5.")


class PagerPlugin:
    @hookimpl
    def register_sinks(self, register: Callable[[type[Sink]], None]) -> None:
        register(Pager)


def test_an_installed_plugins_options_are_in_the_schema() -> None:
    registry = collect(get_plugin_manager(extra=[PagerPlugin()]))
    schema = validator(build(registry))
    good = {"sinks": {"pages": {"plugin": "pager", "endpoint": "https://pager.example", "level": 3}}}
    assert problems(good, schema) == []
    assert any(
        "'endpoint' is a required property" in p for p in problems({"sinks": {"p": {"plugin": "pager"}}}, schema)
    )
    too_urgent = problems({"sinks": {"p": {**good["sinks"]["pages"], "level": 6}}}, schema)
    assert [p.split(":")[0] for p in too_urgent] == ["$.sinks.p.level"], too_urgent
    assert problems(good) != []  # the committed schema knows only the built-in plugins
