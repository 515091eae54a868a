"""The deployment config: pydantic models, load_config(), and `file:line:col: path: message` errors."""

from __future__ import annotations

import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import jinja2
import pluggy
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from . import yamlmarks
from .durations import parse_duration
from .errors import ConfigError
from .events import is_known_type
from .plugins import Registry
from .sinks import Sink
from .sources import PluginConfig, Source
from .templating import compile_condition, make_environment, template_files

DATABASE_URL_ENV = "DECLIC_DATABASE_URL"

Duration = Annotated[timedelta, BeforeValidator(parse_duration)]
Name = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")]

#: Rule and policy keys of the target design that this version does not run yet.
#: Rejecting them beats accepting a rule that would silently never fire.
NOT_YET = {
    "on_date": "date rules", "at": "date rules", "offset": "date rules",
    "inactive_for": "inactivity rules", "of": "inactivity rules",
    "score_reaches": "lead-score rules", "goal": "journey goals", "reenter": "re-entry policies",
    "quiet_hours": "quiet hours", "pressure": "marketing pressure caps", "scoring": "lead scoring",
    "admin": "the admin API",
}  # fmt: skip


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _not_yet(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if key in NOT_YET and key not in cls.model_fields:
                    raise ValueError(f"{key}: {NOT_YET[key]} are not supported by this version of Declic yet")
        return data


class SendSpec(_Strict):
    """Which sink sends which template."""

    via: str = Field(description="Name of a sink under `sinks:`.")
    template: str = Field(description="Template name: <name>.subject.j2, .txt.j2, .html.j2.")


class StepSpec(_Strict):
    wait: Duration = Field(timedelta(0), description="Delay after the previous step (or the trigger).")
    if_: str | None = Field(None, alias="if", description="Jinja2 expression re-checked at send time.")
    send: SendSpec = Field(description="What to send.")


class RuleSpec(_Strict):
    name: Name = Field(description="Unique name: lower case, digits, - and _.")
    when: str = Field(description="Event type that enrols a contact.")
    if_: str | None = Field(None, alias="if", description="Jinja2 expression on event and contact.")
    kind: Literal["marketing", "transactional"] = Field(
        "marketing", description="Marketing messages need consent where `policies.consent` says so."
    )
    exit_on: list[str] = Field(
        default_factory=list, description="Event types that end the journey (same correlation key, else contact)."
    )
    send: SendSpec | None = Field(None, description="One message, sent at once: short for one step.")
    steps: list[StepSpec] = Field(default_factory=list, description="Messages sent one after the other.")

    @model_validator(mode="after")
    def _one_of_send_or_steps(self) -> RuleSpec:
        if bool(self.send) == bool(self.steps):
            raise ValueError("a rule needs exactly one of `send` or `steps`")
        if self.send:
            self.steps = [StepSpec(send=self.send)]
            self.send = None
        return self


class StorageSpec(_Strict):
    url: str = Field(
        "sqlite:///declic.db",
        description="sqlite:///FILE (relative to the config) or postgresql://user@host/db. "
        "Env DECLIC_DATABASE_URL wins.",
    )
    busy_timeout: Duration = Field(timedelta(seconds=2), description="Wait for a locked database before 503.")


class PoliciesSpec(_Strict):
    consent: dict[str, Literal["required", "optional"]] = Field(
        default_factory=dict, description="Per channel (email, sms...): required = marketing needs granted consent."
    )


class WorkerSpec(_Strict):
    poll_interval: Duration = Field(timedelta(seconds=1), description="Look for due jobs at least this often.")
    batch_size: int = Field(50, ge=1, le=1000, description="Jobs claimed per query.")
    concurrency: int = Field(20, ge=1, le=500, description="Jobs run at once per process.")
    lease: Duration = Field(
        timedelta(minutes=5), description="A claimed job returns to the queue if its worker is silent this long."
    )
    max_attempts: int = Field(12, ge=1, description="Attempts before a step goes to the dead letter.")
    retry_base: Duration = Field(timedelta(seconds=30), description="First retry delay; doubles each attempt.")
    retry_max: Duration = Field(timedelta(hours=1), description="Longest retry delay.")


class LimitsSpec(_Strict):
    max_body_bytes: int = Field(1024 * 1024, ge=1024, description="Larger webhook bodies get 413.")


class LoggingSpec(_Strict):
    redact: bool = Field(True, description="Redact e-mail addresses and phone numbers in logs.")
    level: Literal["debug", "info", "warning", "error"] = Field("info", description="Least severe level logged.")


class Settings(_Strict):
    public_url: str | None = Field(None, description="This deployment's URL as providers see it (some sign it).")
    timezone: str = Field("UTC", description="IANA time zone used when a contact has none.")
    storage: StorageSpec = Field(default_factory=StorageSpec, description="Where state is kept.")
    templates: str = Field("templates", description="Template folder, relative to the config file.")
    sources: dict[Name, dict[str, Any]] = Field(
        default_factory=dict, description="NAME: {plugin: ..., options}; served at POST /hooks/NAME."
    )
    sinks: dict[Name, dict[str, Any]] = Field(
        default_factory=dict, description="NAME: {plugin: ..., options}; rules send `via: NAME`."
    )
    policies: PoliciesSpec = Field(default_factory=PoliciesSpec, description="Checked at send time.")
    rules: list[RuleSpec] = Field(default_factory=list, description="Trigger rules, see the README.")
    worker: WorkerSpec = Field(default_factory=WorkerSpec, description="Job queue tuning.")
    limits: LimitsSpec = Field(default_factory=LimitsSpec, description="Request limits.")
    logging: LoggingSpec = Field(default_factory=LoggingSpec, description="Log output.")

    _path: Path = PrivateAttr(default=Path("declic.yaml"))
    _sources: dict[str, tuple[type[Source], PluginConfig]] = PrivateAttr(default_factory=dict)
    _sinks: dict[str, tuple[type[Sink], PluginConfig]] = PrivateAttr(default_factory=dict)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (use an IANA name such as Europe/Paris)") from None
        return value

    @property
    def path(self) -> Path:
        return self._path

    @property
    def base_dir(self) -> Path:
        return self._path.parent

    @property
    def templates_dir(self) -> Path:
        return (self.base_dir / self.templates).resolve()

    @property
    def database_url(self) -> str:
        url = os.environ.get(DATABASE_URL_ENV) or self.storage.url
        prefix = "sqlite:///"
        if url.startswith(prefix) and not url.startswith(prefix + "/") and ":memory:" not in url:
            url = prefix + str((self.base_dir / url[len(prefix) :]).resolve())
        return url

    @property
    def source_plugins(self) -> dict[str, tuple[type[Source], PluginConfig]]:
        return self._sources

    @property
    def sink_plugins(self) -> dict[str, tuple[type[Sink], PluginConfig]]:
        return self._sinks


def load_config(
    path: str | Path, registry: Registry, pm: pluggy.PluginManager | None = None, env: dict[str, str] | None = None
) -> Settings:
    """Read, validate and cross-check a deployment config; raise ConfigError with every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config: {exc.strerror}"]) from None
    report = _Report(path)
    try:
        data, report.marks, yaml_problems = yamlmarks.load(text, env)
    except yamlmarks.YamlProblem as exc:
        raise ConfigError([report.format_at(exc.mark, exc.path, exc.message)]) from None
    for problem in yaml_problems:
        report.add(problem.path, problem.message, problem.mark)
    if not isinstance(data, dict):
        report.add((), "the config must be a mapping of keys (public_url, sources, sinks, rules...)")
        report.raise_if_any()
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        report.add_validation(exc, ())
        report.raise_if_any()
        raise  # pragma: no cover  (a validation error always adds a problem)
    settings._path = path.resolve()
    _resolve_plugins(settings, data, registry, report)
    _check_rules(settings, registry, pm, report)
    report.raise_if_any()
    return settings


def _resolve_plugins(settings: Settings, data: dict[str, Any], registry: Registry, report: _Report) -> None:
    sections: tuple[tuple[str, dict[str, Any], dict[str, Any]], ...] = (
        ("sources", settings._sources, registry.sources),
        ("sinks", settings._sinks, registry.sinks),
    )
    for section, table, known in sections:
        for key, options in (data.get(section) or {}).items():
            where: yamlmarks.Path = (section, key)
            if not isinstance(options, dict):
                report.add(where, "expected a mapping with a `plugin` key")
                continue
            options = dict(options)
            plugin = options.pop("plugin", None)
            if plugin not in known:
                available = ", ".join(sorted(known)) or "none installed"
                report.add(
                    (*where, "plugin") if plugin else where,
                    f"unknown plugin {plugin!r} (available: {available}; see `declic plugins`)"
                    if plugin
                    else "missing `plugin` key",
                )
                continue
            cls = known[plugin]
            try:
                table[key] = (cls, cls.Config.model_validate(options))
            except ValidationError as exc:
                report.add_validation(exc, where)


def _check_rules(settings: Settings, registry: Registry, pm: pluggy.PluginManager | None, report: _Report) -> None:
    extra_types = frozenset().union(*(cls.event_types for cls in registry.sources.values()))
    env = make_environment(settings.templates_dir, pm)
    templates_dir = settings.templates_dir
    seen: set[str] = set()
    for i, rule in enumerate(settings.rules):
        where: yamlmarks.Path = ("rules", i)
        if rule.name in seen:
            report.add((*where, "name"), f"duplicate rule name {rule.name!r}")
        seen.add(rule.name)
        for key, types in (("when", [rule.when]), ("exit_on", rule.exit_on)):
            for j, event_type in enumerate(types):
                if not is_known_type(event_type, extra_types):
                    sub = (*where, key) if key == "when" else (*where, key, j)
                    report.add(sub, f"unknown event type {event_type!r}{_suggest(event_type, extra_types)}")
        _check_expression(env, rule.if_, (*where, "if"), report)
        for k, step in enumerate(rule.steps):
            step_where = (*where, "steps", k) if (*where, "steps") in report.marks else where
            _check_expression(env, step.if_, (*step_where, "if"), report)
            send_where = (*step_where, "send")
            if step.send.via not in settings.sinks:
                sinks = ", ".join(sorted(settings.sinks)) or "none configured"
                report.add(
                    (*send_where, "via"), f"no sink named {step.send.via!r} under `sinks:` (configured: {sinks})"
                )
            if "txt" not in template_files(templates_dir, step.send.template):
                report.add(
                    (*send_where, "template"), f"template {step.send.template}.txt.j2 not found in {templates_dir}"
                )


def _check_expression(env: jinja2.Environment, expression: str | None, where: yamlmarks.Path, report: _Report) -> None:
    if expression is None:
        return
    try:
        compile_condition(env, expression)
    except jinja2.TemplateSyntaxError as exc:
        report.add(where, f"invalid expression: {exc.message}")


def _suggest(event_type: str, extra: frozenset[str]) -> str:
    import difflib

    from .events import CANONICAL_TYPES

    close = difflib.get_close_matches(event_type, sorted(CANONICAL_TYPES | extra), n=1)
    return f" (did you mean {close[0]!r}?)" if close else " (see the event types in the README)"


class _Report:
    """Collects problems and formats each as `file:line:col: path: message`."""

    def __init__(self, path: Path):
        self.path = path
        self.marks: dict[yamlmarks.Path, yamlmarks.Mark] = {(): (1, 1)}
        self.problems: list[tuple[yamlmarks.Mark, str]] = []

    def add(self, where: yamlmarks.Path, message: str, mark: yamlmarks.Mark | None = None) -> None:
        mark = mark or self._mark(where)
        self.problems.append((mark, self.format_at(mark, where, message)))

    def add_validation(self, exc: ValidationError, prefix: yamlmarks.Path) -> None:
        for err in exc.errors():
            loc = tuple(part for part in err["loc"] if not (isinstance(part, str) and "[" in part))
            where = (*prefix, *loc)
            key_mark = self.marks.get((*where, yamlmarks.KEY)) if err["type"] == "extra_forbidden" else None
            self.add(where, _message(err), key_mark)

    def format_at(self, mark: yamlmarks.Mark, where: yamlmarks.Path, message: str) -> str:
        dotted = format_path(where)
        return f"{self.path}:{mark[0]}:{mark[1]}: {dotted + ': ' if dotted else ''}{message}"

    def _mark(self, where: yamlmarks.Path) -> yamlmarks.Mark:
        for end in range(len(where), -1, -1):
            if where[:end] in self.marks:
                return self.marks[where[:end]]
        return (1, 1)

    def raise_if_any(self) -> None:
        if self.problems:
            raise ConfigError([text for _, text in sorted(self.problems, key=lambda p: p[0])])


def format_path(path: yamlmarks.Path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _message(err: Any) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    return re.sub(r"^(Value|Assertion) error, ", "", err["msg"])
