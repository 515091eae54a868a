"""Hostile configs: `declic check` says ok or prints `file:line:col: path: message` lines, never a traceback.

Seeds are the shipped demo config and every YAML example of the README and docs (alone, and merged
into the demo so that they pass and the mutations reach deep into validation). Each example mutates
one seed at three levels: the parsed tree (wrong types, hostile values, odd keys, deep nesting),
the text (tags, anchors and aliases, truncation, control characters) and the bytes (invalid
UTF-8), then loads it as `declic check` does. A config that passes must also build the app that
`declic serve` would run.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import re
import shutil
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pluggy
import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from declic_gateway.cli.main import cli
from declic_gateway.config import Settings, load_config
from declic_gateway.errors import ConfigError
from declic_gateway.http.app import create_app
from declic_gateway.http.running import GATEWAY_KEY
from declic_gateway.kit.registry import Registry
from declic_gateway.plugins import collect, get_plugin_manager

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "config" / "declic.yaml"
#: Every ${VAR} of the seeds is set, so that the seeds pass and mutations start from a valid config.
ENV = {
    name: f"a-dummy-{name.lower()}-value"  # one per name: some settings must differ (track's two keys)
    for name in re.findall(
        r"\$\{([A-Za-z_][A-Za-z0-9_]*)",
        "".join(p.read_text() for p in [DEMO, ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]),
    )
} | {"DECLIC_DATABASE_URL": "sqlite:///declic-demo.db"}
for _name in ("SMTP_HOST", "SMTP_PORT", "SMTP_TLS", "SMTP_SENDER", "DECLIC_PUBLIC_URL"):
    ENV.pop(_name, None)  # the demo's defaults are the valid values
ENV |= {
    "MAILCHIMP_API_KEY": "0123456789abcdef0123456789abcdef-us6",
    "TWILIO_ACCOUNT_SID": "AC" + "0" * 32,
    "APP_WEBHOOK_SECRET": "whsec_" + base64.b64encode(b"k" * 32).decode(),
    "DECLIC_WEBHOOK_SECRET": "whsec_" + base64.b64encode(b"k" * 32).decode(),
    "VAPID_PRIVATE_KEY": base64.urlsafe_b64encode(b"\x01" * 32).rstrip(b"=").decode(),
}
#: Examples that cannot pass here: a file only a real deployment has, a community plugin, and
#: Prometheus' own config (a scrape job, alert rules) beside Declic's.
NOT_RUNNABLE = {
    "docs/connect/fcm.md#0+demo",
    "docs/plugins.md#0+demo",
    "docs/metrics.md#1+demo",
    "docs/metrics.md#2+demo",
}


@dataclass(frozen=True)
class Seed:
    name: str
    text: str
    data: Any


def _doc_examples() -> list[tuple[str, str]]:
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for i, block in enumerate(re.findall(r"```yaml\n(.*?)```", path.read_text(), re.S)):
            found.append((f"{path.relative_to(ROOT)}#{i}", block))
    return found


def _merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if key == "rules" and isinstance(value, list) and isinstance(out.get(key), list):
            names = {rule.get("name") for rule in value if isinstance(rule, dict)}
            out[key] = [rule for rule in out[key] if rule.get("name") not in names] + value
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        elif isinstance(value, list) and isinstance(out.get(key), list):
            out[key] = out[key] + value
        else:
            out[key] = value
    return out


def _dump(data: Any) -> str:
    return yaml.dump(data, Dumper=yaml.CSafeDumper, allow_unicode=True, sort_keys=False, width=1000)


def _seeds() -> list[Seed]:
    demo_text = DEMO.read_text()
    demo = yaml.safe_load(demo_text)
    seeds = [Seed("config/declic.yaml", demo_text, demo)]
    for name, text in _doc_examples():
        data = yaml.safe_load(text)
        seeds.append(Seed(name, text, data))
        if isinstance(data, dict):
            both = _merged(demo, data)
            seeds.append(Seed(name + "+demo", _dump(both), both))
    return seeds


SEEDS = _seeds()


def _template_names(data: Any) -> Iterator[str]:
    if isinstance(data, dict):
        if isinstance(data.get("template"), str):
            yield data["template"]
        for value in data.values():
            yield from _template_names(value)
    elif isinstance(data, list):
        for value in data:
            yield from _template_names(value)


def _keys(model: type[BaseModel], seen: set[type[BaseModel]]) -> Iterator[str]:
    """Every key a config may hold, to put wrong types under."""
    if model in seen:
        return
    seen.add(model)
    for name, field in model.model_fields.items():
        yield field.alias or name
        for arg in _flatten(field.annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                yield from _keys(arg, seen)


def _flatten(annotation: Any) -> Iterator[Any]:
    yield annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        yield from _flatten(arg)


# ---- what a mutation may put in a config ---------------------------------------------------------

HOSTILE_SCALARS: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1,
    2**31,
    2**63,
    10**30,
    -(10**30),
    0.5,
    -0.0,
    1e308,
    float("inf"),
    float("-inf"),
    float("nan"),
    "",
    " ",
    "0s",
    "1ms",
    "-5d",
    "+1y",
    "-999999999y",
    "999999999d",
    "99999999999999999999999999w",
    "3651d",
    "25:00",
    "23:59",
    "10:00",
    "1/0s",
    "0/1s",
    "1000001/1s",
    "5/999999d",
    "${UNSET_VARIABLE}",
    "${X:-}",
    "x" * 300,
    "y" * 20_000,
    "é" * 200,
    "a\nb",
    "\0",
    "\x07",
    "\u2028",
    "../../etc/passwd",
    "/dev/zero",
    "https://",
    "http://127.0.0.1:8080",
    "postgresql://",
    "sqlite:///:memory:",
    "sqlite:///" + "d/" * 200 + "x.db",
    "{{ 1/0 }}",
    "{% for %}",
    "event.properties.total_price >",
    "contact.attributes.9x",
    "customer.created",
    "order.placed",
    "email",
    "smtp",
    "shopify",
    "required",
    "transactional",
    dt.date(1, 1, 1),
    dt.date(9999, 12, 31),
    dt.datetime(9999, 12, 31, 23, 59),
    b"\x00\xff",
]

scalars = st.one_of(
    st.sampled_from(HOSTILE_SCALARS),
    st.integers(),
    st.floats(),
    st.text(max_size=30),
    st.from_regex(r"-?[0-9]{1,25}(ms|[smhdwy])", fullmatch=True),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
KNOWN_KEYS = sorted(set(_keys(Settings, set())) | {"plugin", "secret", "host", "port", "sender", "concurrency"})
keys = st.one_of(
    st.sampled_from(KNOWN_KEYS), st.sampled_from([None, 0, 1.5, True, "", "x" * 300, "a b", "\t"]), st.text(max_size=12)
)


def _nodes(data: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _nodes(value, (*path, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from _nodes(value, (*path, i))


def _get(data: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        data = data[part]
    return data


@st.composite
def tree_mutation(draw: st.DrawFn, data: Any) -> Any:
    """Change the parsed config at one place: a hostile value, a wrong type, an odd key, deep nesting."""
    paths = list(_nodes(data))
    path = paths[draw(st.integers(0, len(paths) - 1))]
    target = _get(data, path)
    kind = draw(st.sampled_from(["set", "set", "set", "delete", "add", "rekey", "wrap", "nest", "number"]))
    if kind == "add" and isinstance(target, dict):
        target[draw(keys)] = draw(values)
        return data
    if kind == "rekey" and isinstance(target, dict) and target:
        old = draw(st.sampled_from(list(target)))
        target[draw(keys)] = target.pop(old)
        return data
    if not path:
        return draw(values) if kind == "set" else data
    parent, last = _get(data, path[:-1]), path[-1]
    if kind == "delete":
        del parent[last]
    elif kind == "wrap":
        parent[last] = draw(st.sampled_from([[target], {"x": target}, {last: target}]))
    elif kind == "nest":
        for _ in range(draw(st.integers(1, 120))):
            target = [target]
        parent[last] = target
    elif kind == "number":
        scale = draw(st.sampled_from([-1, 10**3, 10**9, 10**20, 0]))
        parent[last] = target * scale if isinstance(target, int | float) and not isinstance(target, bool) else scale
    else:
        parent[last] = draw(values)
    return data


TAGS = [
    "!!int",
    "!!float",
    "!!bool",
    "!!null",
    "!!timestamp",
    "!!binary",
    "!!str",
    "!!set",
    "!!omap",
    "!!pairs",
    "!!seq",
    "!!map",
    "!!merge",
    "!!value",
    "!!python/object:os.system",
    "!!python/object/apply:os.system",
    "!!python/name:os.system",
    "!!python/tuple",
    "!local",
    "!<tag:example.com,2000:x>",
]
SNIPPETS = [
    "\0",
    "\x01",
    "\x7f",
    "\t",
    "\r",
    "\ufeff",
    "\ud7ff",
    "\U0001f600",
    "&a ",
    "*a",
    "*missing",
    "<<: *a\n",
    "<<: [1]\n",
    "[",
    "]",
    "{",
    "}",
    ": ",
    "- ",
    "? ",
    "'",
    '"',
    "\\",
    "#",
    "%YAML 1.1\n",
    "---\n",
    "...\n",
    "${",
    "${UNSET}",
    "9" * 400,
    "-" + "9" * 5000,
    "1e999",
]
APPENDIX = [
    "x: &a [*a]\n",
    "x: &a {b: *a}\n",
    "x: &a {<<: *a}\n",
    "x: &a [1, 2]\ny: {<<: *a}\n",
    "d: &d {timezone: UTC}\ne: {<<: [*d, *d], timezone: x}\n",
    "[a, b]: 1\n",
    "{a: 1}: 1\n",
    "? [a, b]\n: 1\n",
    "? {a: 1}\n: 1\n",
    "? - a\n: 1\n",
    "sources: {[x]: {plugin: shopify}}\n",
    "scoring: {[x]: 1}\n",
    "x: " + "[" * 60 + "]" * 60 + "\n",
    "x: " + "[" * 3000 + "]" * 3000 + "\n",
    "x: " + "{a: " * 80 + "1" + "}" * 80 + "\n",
    "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 10)).replace("*l0", "lol"),
    "".join(f"c{i}: &c{i} [*c{i - 1}]\n" for i in range(1, 200)).replace("[*c0]", "[0]"),
    "x: !!binary ===\n",
    "x: !!timestamp 2024-13-45\n",
    "x: !!int 0x\n",
    "x: !!float .\n",
    "x: !!set {a: 1}\n",
    "x: !!omap [a]\n",
    "x: !!python/object/new:object {}\n",
    "timezone: x\ntimezone: y\n",
    "worker: {lease: 999999999d}\n",
    "worker: {lease: -1}\n",
    "worker: {poll_interval: 0s}\n",
    "storage: {busy_timeout: 99999999999999999999s}\n",
    "limits: {max_body_bytes: 99999999999999999999}\n",
    "scoring: {half_life: 0s, x.y: .nan}\n",
]


@st.composite
def text_mutation(draw: st.DrawFn, text: str) -> str:
    """Change the written text: tags before values, anchors and aliases, truncation, control characters."""
    kind = draw(st.sampled_from(["tag", "tag", "insert", "append", "truncate", "cut", "copy", "replace"]))
    lines = text.splitlines(keepends=True) or [""]
    i = draw(st.integers(0, len(lines) - 1))
    if kind == "tag":
        tag = draw(st.sampled_from(TAGS))
        lines[i] = re.sub(r"(:\s+|-\s+)", lambda m: m.group(1) + tag + " ", lines[i], count=1)
    elif kind == "insert":
        at = draw(st.integers(0, len(lines[i])))
        lines[i] = lines[i][:at] + draw(st.sampled_from(SNIPPETS) | st.text(max_size=4)) + lines[i][at:]
    elif kind == "append":
        lines.append(draw(st.sampled_from(APPENDIX)))
    elif kind == "truncate":
        return text[: draw(st.integers(0, len(text)))]
    elif kind == "cut":
        del lines[i : i + draw(st.integers(1, 3))]
    elif kind == "copy":
        lines.insert(draw(st.integers(0, len(lines))), lines[i])
    else:
        lines[i] = re.sub(r":\s.*", lambda _: ": " + draw(st.sampled_from(APPENDIX)).split(": ", 1)[-1], lines[i])
    return "".join(lines)


@st.composite
def byte_mutation(draw: st.DrawFn, raw: bytes) -> bytes:
    """Change the bytes: invalid UTF-8 (a lone continuation, a cut sequence, an encoded surrogate), NUL."""
    at = draw(st.integers(0, len(raw)))
    kind = draw(st.sampled_from(["insert", "truncate", "flip"]))
    if kind == "truncate":
        return raw[:at]
    if kind == "flip" and raw:
        at = min(at, len(raw) - 1)
        return raw[:at] + bytes([raw[at] ^ draw(st.integers(1, 255))]) + raw[at + 1 :]
    junk = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b"\xef\xbb\xbf", b"\x80\x80"]))
    return raw[:at] + junk + raw[at:]


@st.composite
def hostile_configs(draw: st.DrawFn) -> tuple[str, bytes]:
    seed = draw(st.sampled_from(SEEDS))
    text = seed.text
    tree_steps = draw(st.integers(0, 3))
    if tree_steps:
        data = copy.deepcopy(seed.data)
        for _ in range(tree_steps):
            data = draw(tree_mutation(data))
        text = _dump(data)
    for _ in range(draw(st.integers(0, 2))):
        text = draw(text_mutation(text))
    raw = text.encode("utf-8")
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        raw = draw(byte_mutation(raw))
    return seed.name, raw


# ---- the harness ---------------------------------------------------------------------------------


@dataclass
class Tally:
    examples: int = 0
    passed: int = 0
    apps: int = 0
    cli: int = 0


class Deployment:
    """One folder with the seeds' templates: each example overwrites its declic.yaml."""

    def __init__(self, folder: Path):
        self.folder = folder
        shutil.copytree(ROOT / "config" / "templates", folder / "templates", dirs_exist_ok=True)
        for name in {n for seed in SEEDS for n in _template_names(seed.data)}:
            for part in ("subject", "txt"):
                target = folder / "templates" / f"{name}.{part}.j2"
                if not target.exists():
                    target.write_text("{{ contact.email }}\n")
        self.path = folder / "declic.yaml"
        self.pm: pluggy.PluginManager = get_plugin_manager()
        self.registry: Registry = collect(self.pm)
        line = re.escape(str(self.path)) + r":(\d+):(\d+): (\S.*)"
        self.line = re.compile(line)
        # A problem in a template the config names points at the template.
        self.template_line = re.compile(re.escape(str(folder / "templates")) + r"/([^/:]+\.j2):(\d+):(\d+): (\S.*)")

    def check(self, raw: bytes) -> Settings | None:
        """load_config as `declic check` runs it: Settings, or None after checking every error line."""
        self.path.write_bytes(raw)
        try:
            return load_config(self.path, self.registry, self.pm, env=ENV)
        except ConfigError as exc:
            self.assert_error_lines(exc.problems, raw)
            return None

    def assert_error_lines(self, problems: list[str], raw: bytes) -> None:
        assert problems, "a ConfigError without problems"
        # Lines as YAML counts them: \r, NEL and the Unicode separators end a line too.
        last_line = len(re.findall(r"\r\n|[\r\n\x85\u2028\u2029]", raw.decode("utf-8", "replace"))) + 1
        for problem in problems:
            in_template = self.template_line.fullmatch(problem)
            if in_template:
                text = (self.folder / "templates" / in_template.group(1)).read_text()
                assert 1 <= int(in_template.group(2)) <= len(text.splitlines()) + 1, problem
                continue
            match = self.line.fullmatch(problem)
            assert match, f"not file:line:col: path: message: {problem!r}"
            assert problem.isprintable(), f"not printable: {problem!r}"
            assert 1 <= int(match.group(1)) <= last_line, problem
            assert int(match.group(2)) >= 1, problem
            assert len(problem) < 2000, f"an error line of {len(problem)} characters"

    def check_cli(self, passed: bool) -> None:
        """The real `declic check` on the file last written: exit 0 and a summary, or exit 2 and error lines."""
        result = CliRunner().invoke(cli, ["check", "--config", str(self.path)], env=ENV)
        if passed:
            assert result.exit_code == 0, result.output
            assert result.output.startswith(f"ok: {self.path}\n"), result.output
        else:
            assert result.exit_code == 2, (result.exception, result.output)
            self.assert_error_lines(result.output.splitlines(), self.path.read_bytes())

    def build_app(self, checked: Settings) -> None:
        """`declic serve` builds what `declic check` passed (without starting it)."""
        app = create_app(checked, pm=self.pm)
        app[GATEWAY_KEY].db.close()


def run_mutations(deployment: Deployment, examples: int, cli_every: int, app_every: int) -> Tally:
    """Feed `examples` mutations to the checker. About one in `cli_every` also goes through the CLI, and
    one passing config in `app_every` through create_app (a hash of the bytes decides: replays agree)."""
    tally = Tally()

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(hostile_configs())
    def property_(case: tuple[str, bytes]) -> None:
        _, raw = case
        lot = zlib.crc32(raw)
        tally.examples += 1
        checked = deployment.check(raw)
        if checked is not None:
            tally.passed += 1
            for rule in checked.rules:
                assert rule.summary  # what `declic check` prints for a rule
            if lot % app_every == 0:
                tally.apps += 1
                deployment.build_app(checked)
        if lot % cli_every == 0:
            tally.cli += 1
            deployment.check_cli(checked is not None)

    property_()
    return tally


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    return Deployment(tmp_path_factory.mktemp("hostile"))


def test_every_seed_passes_check(deployment: Deployment) -> None:
    """The mutations start from valid configs: the demo, and the docs' examples merged into it."""
    failing = {}
    for seed in SEEDS:
        if (seed.name.endswith("+demo") or seed.name == "config/declic.yaml") and seed.name not in NOT_RUNNABLE:
            deployment.path.write_text(seed.text)
            try:
                load_config(deployment.path, deployment.registry, deployment.pm, env=ENV)
            except ConfigError as exc:
                failing[seed.name] = exc.problems
    assert not failing, failing


def test_a_few_hundred_mutations_get_ok_or_error_lines(deployment: Deployment) -> None:
    tally = run_mutations(deployment, examples=300, cli_every=30, app_every=3)
    assert tally.examples >= 300


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_ten_thousand_mutations_get_ok_or_error_lines(deployment: Deployment) -> None:
    tally = run_mutations(deployment, examples=10_000, cli_every=40, app_every=4)
    assert tally.examples >= 10_000
    assert tally.passed >= 200, tally  # enough valid configs to exercise create_app
    assert tally.apps >= 50, tally
    assert tally.cli >= 100, tally
