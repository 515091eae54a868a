"""The deployment config: pydantic models, load_config(), and `file:line:col: path: message` errors."""

from __future__ import annotations

import copy
import hmac
import os
import re
import typing
from collections.abc import Callable
from datetime import time, timedelta
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import jinja2
import pluggy
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ..errors import ConfigError, ConfigProblem
from ..kit.addresses import internal_address, test_recipient
from ..kit.context import Scope
from ..kit.durations import MAX_DURATION, MAX_DURATION_TEXT, Duration, LocalTime, SignedDuration, between
from ..kit.events import is_known_type
from ..kit.lint import check_expression, suggest
from ..kit.locales import parse_locale
from ..kit.registry import Registry
from ..kit.sinks import EmailSinkConfig, Sink, TrackSpec
from ..kit.sources import PluginConfig, Source
from ..kit.templating import make_environment, template_files
from . import conditions, yamlmarks
from . import templates as template_checks

DATABASE_URL_ENV = "DECLIC_DATABASE_URL"

#: A source's, sink's or rule's name: the tables keep at most 100 characters of it (PostgreSQL refuses more, and
#: every call to a longer-named source would fail, answered 503 again and again).
MAX_NAME = 100
Name = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", max_length=MAX_NAME)]

#: Keys of the target design that this version does not run yet.
#: Rejecting them beats accepting a key that would silently do nothing.
NOT_YET: dict[str, str] = {}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _not_yet(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if key in NOT_YET and key not in cls.model_fields:
                    raise ValueError(f"{key}: {NOT_YET[key]} is not in this version of Declic yet")
        return data


#: File systems refuse names over 255 bytes; the name gets `.subject.j2` and may be UTF-8.
MAX_TEMPLATE_NAME = 100
#: Scores and points are plain numbers: this keeps them far from float overflow and readable.
MAX_POINTS = 1_000_000
MAX_PRIORITY = 1000


#: Channels tried in turn by one step: a few is a fallback, more is a broadcast in disguise.
MAX_FALLBACK = 4


def _is_template(text: str) -> bool:
    return "{{" in text or "{%" in text


def _sink_names(value: Any) -> Any:
    """One sink name, or a short list of distinct ones tried in turn."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or not value or not all(isinstance(name, str) for name in value):
        raise ValueError("expected a sink name, or a list of sink names tried in turn, such as [sms, email]")
    if len(value) > MAX_FALLBACK:
        raise ValueError(f"at most {MAX_FALLBACK} sinks to try in turn, not {len(value)}")
    if len(set(value)) != len(value):
        raise ValueError("a sink is named twice: each channel is tried once")
    return value


MAX_VARIANTS = 10
MAX_WEIGHT = 10_000


class VariantSpec(_Strict):
    """One arm of an A/B test: its own template, sent to a share of the contacts given by its weight."""

    name: Name = Field(max_length=40, description="Unique within the step: lower case, digits, - and _.")
    weight: int = Field(
        1,
        ge=1,
        le=MAX_WEIGHT,
        description=f"Share of contacts, relative to the other variants' weights; 1 to {MAX_WEIGHT}.",
    )
    template: str = Field(
        max_length=MAX_TEMPLATE_NAME,
        description=f"Template name, as `send.template`; at most {MAX_TEMPLATE_NAME} characters.",
    )


class SendSpec(_Strict):
    """Which sink sends which template."""

    via: Annotated[str | list[str], BeforeValidator(_sink_names)] = Field(
        description=f"Name of a sink under `sinks:`, or a list of up to {MAX_FALLBACK} tried in order (channel "
        "fallback): the first with consent and an address; on a permanent failure, the next."
    )
    template: str | None = Field(
        None,
        max_length=MAX_TEMPLATE_NAME,
        description=f"Template name: <name>.subject.j2, .txt.j2, .html.j2; at most {MAX_TEMPLATE_NAME} characters.",
    )
    to: str | None = Field(
        None,
        min_length=1,
        max_length=500,
        description="Internal recipient instead of the contact: an address, or a template such as "
        "`{{ contact.attributes.owner_email }}`; no consent, quiet hours or pressure, not in the KPIs.",
    )
    variants: list[VariantSpec] | None = Field(
        None,
        min_length=2,
        max_length=MAX_VARIANTS,
        description="Instead of `template`: an A/B test, [{name, weight, template}, ...]; each contact keeps "
        f"its variant; 2 to {MAX_VARIANTS} variants.",
    )

    @model_validator(mode="after")
    def _one_template(self) -> SendSpec:
        if (self.template is None) == (self.variants is None):
            raise ValueError("`send` needs exactly one of `template` or `variants`")
        names = [variant.name for variant in self.variants or ()]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"variant names must be unique: {', '.join(twice)} given twice")
        return self

    @property
    def templates(self) -> list[str]:
        """Every template this step may send."""
        return [self.template] if self.template else [variant.template for variant in self.variants or ()]

    @model_validator(mode="after")
    def _one_recipient(self) -> SendSpec:
        if self.to is not None and isinstance(self.via, list) and len(self.via) > 1:
            raise ValueError("`to:` names one recipient: give it one sink in `via`, not a fallback list")
        return self

    @property
    def vias(self) -> list[str]:
        """The sinks in the order they are tried (one, without fallback)."""
        return [self.via] if isinstance(self.via, str) else list(self.via)

    @property
    def to_template(self) -> bool:
        """Whether `to:` is rendered at send time rather than a literal address."""
        return self.to is not None and _is_template(self.to)


class StepSpec(_Strict):
    wait: Duration = Field(
        timedelta(0),
        description=f"Delay after the previous step (or the trigger), 0s to {MAX_DURATION_TEXT}; "
        "the waits of a rule's steps add up to at most that too.",
    )
    if_: str | None = Field(None, alias="if", description="Jinja2 expression re-checked at send time.")
    send: SendSpec = Field(description="What to send.")
    at: str | None = Field(
        None,
        min_length=1,
        max_length=500,
        description="Instead of `wait`: due at the date-time this template renders (ISO 8601, e.g. "
        "`{{ event.properties.starts_at }}`); skipped, with the reason, when that moment has passed.",
    )
    offset: SignedDuration | None = Field(
        None, description="With `at`: shift from that moment, e.g. -1d; -10y to +10y."
    )
    time: LocalTime | None = Field(
        None, description="With `at`: the local time of day on the shifted day (contact's time zone), e.g. 10:00."
    )

    @model_validator(mode="after")
    def _when_due(self) -> StepSpec:
        if self.at is not None and "wait" in self.model_fields_set:
            raise ValueError("a step is due either after `wait` or at `at`, not both")
        if self.at is None and (self.offset is not None or self.time is not None):
            raise ValueError("`offset` and `time` shift the moment of `at`: add `at`")
        return self


class ReenterAfter(_Strict):
    after: Annotated[Duration, between("1m", "3650d")] = Field(
        description="Enrol again only this long after the previous enrolment, 1m to 3650d (10 years)."
    )


_PERCENTAGE = r"^\d{1,2}(\.\d{1,2})?%$"


def _percentage(value: Any) -> Any:
    """`10%` -> 0.1; a share above 50% would leave too few messaged contacts to be worth a rule."""
    text = value.strip() if isinstance(value, str) else None
    if text is None or not re.fullmatch(_PERCENTAGE, text) or float(text[:-1]) > 50:
        raise ValueError("must be a percentage from 0% to 50%, such as 10%")
    return float(text[:-1]) / 100


#: What a date rule reads: a contact attribute, or a property (maybe nested) of the triggering events.
_DATE_PATH = r"contact\.(attributes\.)?[A-Za-z_][A-Za-z0-9_]*|event\.properties(\.[A-Za-z_][A-Za-z0-9_]*)+"


class RuleSpec(_Strict):
    name: Name = Field(description=f"Unique name: lower case, digits, - and _; at most {MAX_NAME} characters.")
    when: str | None = Field(None, description="Trigger: the event type that enrols a contact.")
    on_date: str | None = Field(
        None,
        description="Trigger: a date, `contact.birthday`, `contact.attributes.NAME` or, with `of`, "
        "`event.properties.NAME` (the date an event of those types carries).",
    )
    inactive_for: Annotated[Duration, between("1m", "3650d")] | None = Field(
        None, description="Trigger: no event of `of` for this long, 1m to 3650d (10 years)."
    )
    score_reaches: float | None = Field(
        None,
        ge=-MAX_POINTS,
        le=MAX_POINTS,
        allow_inf_nan=False,
        description=f"Trigger: the lead score crosses this value upward; -{MAX_POINTS} to {MAX_POINTS}.",
    )
    at: LocalTime = Field(time(9, 0), description="Date rules: local time of day to fire (contact's time zone).")
    offset: SignedDuration = Field(
        timedelta(0), description="Date rules: shift from the date, e.g. -5d or +1y; -10y to +10y."
    )
    repeat: Literal["yearly", "never"] | None = Field(
        None, description="Date rules: yearly (default for contact.birthday) or never (default otherwise)."
    )
    catch_up: Annotated[Duration, between("0s", "366d")] = Field(
        timedelta(days=1),
        description="Date rules: after downtime, fire what was missed within this, skip older; 0s to 366d.",
    )
    of: list[str] = Field(
        default_factory=list,
        description="Inactivity rules: the event types that count as activity. Date rules on "
        "`event.properties.NAME`: the event types that carry the date.",
    )
    repeat_every: Annotated[Duration, between("1h", "3650d")] | None = Field(
        None,
        description="Inactivity rules: fire again this long after each firing while the contact stays inactive; "
        "1h to 3650d. New activity starts a new period.",
    )
    max_times: int | None = Field(
        None,
        ge=1,
        le=1000,
        description="Inactivity rules with repeat_every: fire at most this many times per period of inactivity "
        "(the first included), 1 to 1000; default: no limit.",
    )
    if_: str | None = Field(None, alias="if", description="Jinja2 expression on event and contact.")
    kind: Literal["marketing", "transactional"] = Field(
        "marketing", description="Marketing messages need consent where `policies.consent` says so."
    )
    exit_on: list[str] = Field(
        default_factory=list, description="Event types that end the journey (same correlation key, else contact)."
    )
    goal: list[str] = Field(
        default_factory=list, description="Event types that end the journey as a conversion (counted)."
    )
    reenter: Literal["always", "never"] | ReenterAfter = Field(
        "always", description="always (once per occurrence), never (once per contact), or {after: 30d}."
    )
    attribution: Annotated[Duration, between("1h", "365d")] = Field(
        timedelta(days=7),
        description="A goal counts as a conversion of this rule when it comes this long at most after the rule's "
        "last message to the contact (1h to 365d); it is attributed to that message.",
    )
    holdout: Annotated[
        float, BeforeValidator(_percentage, json_schema_input_type=Annotated[str, Field(pattern=_PERCENTAGE)])
    ] = Field(
        0.0,
        ge=0,
        le=0.5,
        description="Share of enrolled contacts kept unmessaged to measure what the rule earns, e.g. 10%: the same "
        "contacts every time, journal `held_out`; 0% to 50% (a share of 0 to 0.5).",
    )
    revenue: str | None = Field(
        None,
        max_length=100,
        description="Goal events: the property holding the money a conversion brings (default: the first number "
        "among total_price, revenue, value and total).",
    )
    priority: int = Field(
        0,
        ge=-MAX_PRIORITY,
        le=MAX_PRIORITY,
        description=f"Higher goes first when steps compete for the pressure cap; -{MAX_PRIORITY} to {MAX_PRIORITY}.",
    )
    track: TrackSpec | None = Field(
        None,
        description="E-mail: Declic's own open pixel and click redirects, {opens: bool, clicks: bool}; "
        "default: on for marketing, off for transactional. An e-mail sink's own `track` wins.",
    )
    send: SendSpec | None = Field(None, description="One message, sent at once: short for one step.")
    steps: list[StepSpec] = Field(default_factory=list, description="Messages sent one after the other.")

    @field_validator("goal", "exit_on", "of", mode="before", json_schema_input_type=str | list[str])
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("repeat_every")
    @classmethod
    def _repeat_needs_inactivity(cls, value: timedelta | None, info: ValidationInfo) -> timedelta | None:
        if value is not None and "inactive_for" in info.data and info.data["inactive_for"] is None:
            raise ValueError("repeat_every is for inactive_for rules (date rules take `repeat: yearly`)")
        return value

    @field_validator("max_times")
    @classmethod
    def _times_need_repeat(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and "repeat_every" in info.data and info.data["repeat_every"] is None:
            raise ValueError("max_times needs repeat_every: without it an inactivity rule fires once per period")
        return value

    @model_validator(mode="after")
    def _shape(self) -> RuleSpec:
        triggers = [k for k in ("when", "on_date", "inactive_for", "score_reaches") if getattr(self, k) is not None]
        if len(triggers) != 1:
            raise ValueError("a rule needs exactly one trigger: when, on_date, inactive_for or score_reaches")
        if self.inactive_for is not None and not self.of:
            raise ValueError("an inactive_for rule needs `of`: the event types that count as activity")
        if self.on_date is not None and not re.fullmatch(_DATE_PATH, self.on_date):
            raise ValueError(
                f"on_date must name a date, as contact.birthday, contact.attributes.NAME or "
                f"event.properties.NAME, not {self.on_date!r}"
            )
        if self.date_from_event and not self.of:
            raise ValueError("a date rule on event.properties needs `of`: the event types that carry the date")
        if self.of and not (self.date_from_event or self.inactive_for is not None):
            raise ValueError("`of` is for inactive_for rules and for date rules on event.properties")
        if bool(self.send) == bool(self.steps):
            raise ValueError("a rule needs exactly one of `send` or `steps`")
        if sum((step.wait for step in self.steps), timedelta(0)) > MAX_DURATION:
            raise ValueError(f"the steps' waits add up to more than {MAX_DURATION_TEXT}")
        if self.send:
            self.steps = [StepSpec(send=self.send)]
            self.send = None
        return self

    def tracking(self, sink_config: object) -> TrackSpec:
        """Opens and clicks tracked for a message of this rule sent through a sink with this config."""
        default = self.kind == "marketing"
        rule = TrackSpec(opens=default, clicks=default).model_copy(
            update=self.track.model_dump(exclude_none=True) if self.track else {}
        )
        sink = sink_config.track if isinstance(sink_config, EmailSinkConfig) else None
        return sink.over(rule) if sink else rule

    @property
    def trigger(self) -> str:
        return next(k for k in ("when", "on_date", "inactive_for", "score_reaches") if getattr(self, k) is not None)

    @property
    def summary(self) -> str:
        """The trigger in a few words, for `declic check`."""
        if self.on_date:
            carriers = f" of {' or '.join(self.of)}" if self.date_from_event else ""
            return f"on {self.on_date}{carriers}, {'yearly' if self.yearly else 'once'}"
        if self.inactive_for is not None:
            repeats = f", again every {_days(self.repeat_every)}" if self.repeat_every else ""
            limit = f", {self.max_times} times at most" if self.max_times else ""
            return f"after {_days(self.inactive_for)} without {' or '.join(self.of)}{repeats}{limit}"
        if self.score_reaches is not None:
            return f"when the score reaches {self.score_reaches:g}"
        return f"on {self.when}"

    @property
    def date_attribute(self) -> str:
        """`contact.birthday` and `contact.attributes.birthday` both name attributes["birthday"]."""
        return (self.on_date or "").rsplit(".", 1)[-1]

    @property
    def date_from_event(self) -> bool:
        """The date is carried by each event of `of` (a ticket's event start), not by the contact."""
        return (self.on_date or "").startswith("event.")

    @property
    def date_property(self) -> tuple[str, ...]:
        """`event.properties.venue.opens_at` -> ("venue", "opens_at"): the keys into the event's properties."""
        return tuple((self.on_date or "").split(".")[2:])

    @property
    def yearly(self) -> bool:
        return self.repeat == "yearly" or (self.repeat is None and self.date_attribute == "birthday")


def _days(delta: timedelta) -> str:
    return f"{delta.days}d" if delta.days and not delta.seconds else f"{int(delta.total_seconds())}s"


DATABASE_SCHEMES = ("sqlite://", "postgresql://", "postgres://", "postgresql+psycopg://")


class RetentionSpec(_Strict):
    """How long rows are kept; each period is a floor: a row something still needs is kept longer
    (docs/retention.md). A period left empty (null) keeps that table forever."""

    inbox_bodies: Annotated[Duration, between("1d", "3650d")] | None = Field(
        timedelta(days=30),
        description="Processed webhook calls lose their body and headers after this (the call's row and dedupe "
        "key stay); failed and unprocessed calls, and consent evidence, keep theirs. 1d to 3650d, null: never.",
    )
    inbox_keys: Annotated[Duration, between("7d", "3650d")] | None = Field(
        timedelta(days=400),
        description="Then the bodiless call's row, its dedupe key, is deleted; providers redeliver within days. "
        "7d to 3650d, null: never.",
    )
    events: Annotated[Duration, between("1d", "3650d")] | None = Field(
        timedelta(days=400),
        description="Events older than this are deleted, except those an open journey, the consent ledger or an "
        "inactivity rule (a contact's latest of each type) still needs. 1d to 3650d, null: never.",
    )
    decisions: Annotated[Duration, between("1d", "3650d")] | None = Field(
        timedelta(days=400),
        description="Journal entries (what was decided and why) older than this are deleted. 1d to 3650d, null: never.",
    )
    deliveries: Annotated[Duration, between("1d", "3650d")] | None = Field(
        timedelta(days=400),
        description="Messages (deliveries) older than this are deleted, never within the longest attribution or "
        "pressure window, nor those of an open journey. 1d to 3650d, null: never.",
    )
    jobs: Annotated[Duration, between("1d", "3650d")] | None = Field(
        timedelta(days=30),
        description="Finished jobs (done or cancelled) are deleted this long after they finished; pending, "
        "running and dead-lettered ones stay. 1d to 3650d, null: never.",
    )


class StorageSpec(_Strict):
    url: str = Field(
        "sqlite:///declic.db",
        description="sqlite:///FILE (relative to the config) or postgresql://user@host/db. "
        "Env DECLIC_DATABASE_URL wins.",
    )
    busy_timeout: Annotated[Duration, between("0s", "1m")] = Field(
        timedelta(seconds=2), description="Wait for a locked database before 503; 0s to 1m."
    )
    keep_rendered: bool = Field(
        True, description="Keep each sent message as rendered (compressed), for the contact's timeline and export."
    )
    retention: RetentionSpec = Field(
        default_factory=RetentionSpec, description="How long webhook bodies, events, the journal and messages are kept."
    )

    @field_validator("url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        """What `declic serve` opens must be a URL it can open: check says so rather than serve failing."""
        import sqlalchemy as sa

        if not value.startswith(DATABASE_SCHEMES):
            raise ValueError(f"{value[:60]!r} is not sqlite:///FILE or postgresql://user@host/db")
        try:
            sa.engine.make_url(value)
        except (sa.exc.ArgumentError, ValueError) as exc:
            raise ValueError(f"{value[:60]!r} is not a database URL: {exc}") from None
        return value


class QuietHoursSpec(_Strict):
    start: LocalTime = Field(description="Local time the quiet window starts, 00:00 to 23:59, e.g. 21:00.")
    end: LocalTime = Field(
        description="Local time it ends, 00:00 to 23:59, e.g. 08:30 (the next morning when before start)."
    )


class PressureSpec(_Strict):
    max: int = Field(ge=1, le=1000, description="Messages per contact, all channels together (1 to 1000)...")
    per: Annotated[Duration, between("1m", "366d")] = Field(description="...within this sliding window, 1m to 366d.")
    exempt: list[Literal["marketing", "transactional"]] = Field(
        ["transactional"], description="Rule kinds neither counted nor capped."
    )
    max_delay: Annotated[Duration, between("1m", "3650d")] | None = Field(
        None,
        description="Drop a step deferred this long past its due time (reason recorded), 1m to 3650d (10 years); "
        "default: never.",
    )


#: The rule Declic adds when e-mail needs double opt-in: it sends the confirmation message.
CONFIRM_RULE = "declic-double-opt-in"
#: The event that enrols a contact in it: a grant awaiting confirmation.
CONFIRM_EVENT = "consent.confirmation_requested"


class ConfirmationSpec(_Strict):
    """The message that asks a new subscriber to confirm (double opt-in)."""

    via: str = Field(description="Name of an e-mail sink under `sinks:`.")
    template: str = Field(
        max_length=MAX_TEMPLATE_NAME,
        description="Template with `{{ confirm_url }}`: the link that confirms the subscription; "
        f"at most {MAX_TEMPLATE_NAME} characters.",
    )


class PoliciesSpec(_Strict):
    consent: dict[str, Literal["required", "optional", "double_opt_in"]] = Field(
        default_factory=dict,
        description="Per channel (email, sms...): required = marketing needs granted consent; double_opt_in "
        "(email only) = required, and a grant stays pending until the person follows the link of the "
        "`confirmation` message.",
    )
    confirmation: ConfirmationSpec | None = Field(
        None, description="With `consent: {email: double_opt_in}`: the sink and template of the confirmation message."
    )
    quiet_hours: dict[str, QuietHoursSpec] = Field(
        default_factory=dict,
        description="Marketing is deferred, never dropped, to the window's end in the contact's local time. "
        "{start, end} for every channel, or per channel: {sms: {start, end}}.",
    )
    pressure: PressureSpec | None = Field(None, description="A cross-channel cap on marketing per contact.")

    @field_validator("quiet_hours", mode="before", json_schema_input_type=QuietHoursSpec | dict[str, QuietHoursSpec])
    @classmethod
    def _all_channels(cls, value: Any) -> Any:
        return {"*": value} if isinstance(value, dict) and "start" in value else value

    @model_validator(mode="after")
    def _double_opt_in(self) -> PoliciesSpec:
        confirmed = sorted(channel for channel, policy in self.consent.items() if policy == "double_opt_in")
        if confirmed and confirmed != ["email"]:
            raise ValueError(f"double_opt_in is for e-mail only, not {', '.join(c for c in confirmed if c != 'email')}")
        if confirmed and self.confirmation is None:
            raise ValueError("consent: {email: double_opt_in} needs `confirmation: {via: SINK, template: NAME}`")
        return self

    @property
    def double_opt_in(self) -> frozenset[str]:
        """The channels whose grants wait for a confirmation."""
        return frozenset(channel for channel, policy in self.consent.items() if policy == "double_opt_in")

    def confirmation_rule(self) -> RuleSpec | None:
        """The rule that sends the confirmation message, when double opt-in is on."""
        if self.confirmation is None or not self.double_opt_in:
            return None
        return RuleSpec.model_validate(
            {
                "name": CONFIRM_RULE,
                "when": CONFIRM_EVENT,
                "kind": "transactional",  # asks for consent: it cannot wait for it
                "send": {"via": self.confirmation.via, "template": self.confirmation.template},
            }
        )


class ScoreSpec(_Strict):
    points: float = Field(
        ge=-MAX_POINTS,
        le=MAX_POINTS,
        allow_inf_nan=False,
        description=f"Points added (or removed, when negative), -{MAX_POINTS} to {MAX_POINTS}.",
    )
    if_: str | None = Field(None, alias="if", description="Jinja2 expression: count the event only when true.")


class ScoringSpec(_Strict):
    half_life: Annotated[Duration, between("1m", "3650d")] | None = Field(
        None, description="The score halves over this time, 1m to 3650d (10 years); default: no decay."
    )
    points: dict[str, ScoreSpec] = Field(default_factory=dict, description="Event type -> points.")

    @model_validator(mode="before")
    @classmethod
    def _flat(cls, data: Any) -> Any:
        """`scoring: {email.opened: 1, page.viewed: {points: 2, if: ...}, half_life: 30d}`."""
        if not isinstance(data, dict) or "points" in data:
            return data
        points = {k: v if isinstance(v, dict) else {"points": v} for k, v in data.items() if k != "half_life"}
        return {"half_life": data.get("half_life"), "points": points}


class TemplateLimitsSpec(_Strict):
    """What rendering one message may cost; past either limit the step fails, without retries."""

    cpu_time: Annotated[Duration, between("10ms", "1m")] = Field(
        timedelta(seconds=2),
        description="CPU time to render one message, all its parts together (10ms to 1m).",
    )
    output_bytes: int = Field(
        1024 * 1024,
        ge=1024,
        le=64 * 1024 * 1024,
        description="Size of one rendered message, all its parts together, and of any value built on the way "
        "(1024 to 67108864 bytes: 1 KiB to 64 MiB).",
    )


class WorkerSpec(_Strict):
    poll_interval: Annotated[Duration, between("10ms", "1m")] = Field(
        timedelta(seconds=1),
        description="Look for due jobs at least this often; 10ms to 1m. On PostgreSQL, work another replica "
        "queued wakes the worker at once (LISTEN/NOTIFY): this is the fallback.",
    )
    batch_size: int = Field(50, ge=1, le=1000, description="Jobs claimed per query, 1 to 1000.")
    concurrency: int = Field(100, ge=1, le=500, description="Jobs run at once per process, 1 to 500.")
    processing_share: float = Field(
        0.1,
        gt=0,
        le=1,
        description="When the process is short of CPU and a flood of webhooks (16 or more at once) waits for "
        "its acknowledgement, the share of the CPU that processing stored calls keeps, above 0 and up to 1; "
        "acknowledging gets the rest (1: no limit).",
    )
    lease: Annotated[Duration, between("10s", "1d")] = Field(
        timedelta(seconds=20),
        description="A claimed job returns to the queue if its worker has not renewed its claim for this long, "
        "10s to 1d (a live worker renews four times per lease): a crashed replica's jobs are taken over this fast.",
    )
    sink_wait: Annotated[Duration, between("1s", "1h")] = Field(
        timedelta(seconds=10),
        description="A step that waited this long for its sink (its concurrency or rate) is checked again before "
        "it is sent (the journey, consent, the address), and a step still far back in a busy or hung sink's line "
        "goes back to the queue until about its turn, so that other sinks' mail is not held behind it. 1s to 1h.",
    )
    ordering_timeout: Annotated[Duration, between("1s", "1d")] = Field(
        timedelta(minutes=5),
        description="A step waits for calls received before it was due that may be about its contact; a call "
        "still unprocessed this long after it arrived (its provider keeps failing) holds nobody back: steps go "
        "ahead, noted in the journal. 1s to 1d.",
    )
    retry_for: Annotated[Duration, between("1m", "30d")] = Field(
        timedelta(days=3),
        description="A step or call that keeps failing for a reason that may pass (a server down, a 5xx, a "
        "timeout) is retried this long after it was first due, then goes to the dead letter; 1m to 30d.",
    )
    max_attempts: int = Field(
        500,
        ge=1,
        le=10000,
        description="Attempts at most before the dead letter, whatever `retry_for` says; 1 to 10000.",
    )
    retry_base: Annotated[Duration, between("100ms", "1d")] = Field(
        timedelta(seconds=30), description="First retry delay, 100ms to 1d; doubles each attempt."
    )
    retry_max: Annotated[Duration, between("1s", "7d")] = Field(
        timedelta(hours=1), description="Longest retry delay, 1s to 7d."
    )
    templates: TemplateLimitsSpec = Field(
        default_factory=TemplateLimitsSpec, description="Limits on rendering a message (CPU time, size)."
    )


class TrackingSpec(_Strict):
    """How Declic tells the opens and clicks of people from those of machines."""

    scanner_window: Annotated[Duration, between("0s", "10m")] = Field(
        timedelta(seconds=10),
        description="A click this soon after sending is a link scanner's (people take longer); 0s to 10m.",
    )
    route_machine_events: bool = Field(
        False,
        description="Let opens and clicks flagged as a machine's (Apple Mail Privacy Protection, link scanners, "
        "HEAD requests) start, end and score journeys; by default they are stored, flagged and left out.",
    )


#: Each body is held in memory while it is verified and stored.
MAX_BODY_BYTES = 100 * 1024 * 1024


class LimitsSpec(_Strict):
    max_body_bytes: int = Field(
        1024 * 1024,
        ge=1024,
        le=MAX_BODY_BYTES,
        description=f"Larger webhook bodies get 413; 1024 to {MAX_BODY_BYTES} (100 MiB).",
    )


class LoggingSpec(_Strict):
    redact: bool = Field(True, description="Redact e-mail addresses and phone numbers in logs.")
    level: Literal["debug", "info", "warning", "error"] = Field("info", description="Least severe level logged.")


#: Shorter admin tokens can be guessed over the network.
ADMIN_TOKEN_MIN_LENGTH = 16


def _token_strength(value: SecretStr | None) -> SecretStr | None:
    if value is None or not value.get_secret_value().strip():
        return None  # `${DECLIC_ADMIN_TOKEN:-}` left empty: nobody holds it
    if len(value.get_secret_value()) < ADMIN_TOKEN_MIN_LENGTH:
        raise ValueError(
            f"the token is shorter than {ADMIN_TOKEN_MIN_LENGTH} characters: make one with "
            "`python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`"
        )
    return value


StrongToken = Annotated[SecretStr | None, AfterValidator(_token_strength)]


class ScopedToken(_Strict):
    token: StrongToken = Field(
        description=f"Bearer token, at least {ADMIN_TOKEN_MIN_LENGTH} characters, e.g. ${{DECLIC_READ_TOKEN}}; "
        "empty: this entry grants nothing."
    )
    scope: Literal["read", "admin"] = Field(
        "read", description="read: look only (GET); admin: also act (replay, erase)."
    )
    name: str | None = Field(None, max_length=100, description="Who holds it, for the logs.")


class AdminSpec(_Strict):
    """Who may see and act on the deployment's internals: /readyz details, the API, the dashboard."""

    token: StrongToken = Field(
        None,
        description="Bearer token (`Authorization: Bearer TOKEN`) with the admin scope: /readyz's details, the "
        f"API and the dashboard, reading and acting; at least {ADMIN_TOKEN_MIN_LENGTH} characters, e.g. "
        "${DECLIC_ADMIN_TOKEN}. Empty or unset: no admin token.",
    )
    tokens: list[ScopedToken] = Field(
        default_factory=list,
        max_length=100,
        description="More tokens, each with its scope (`read` or `admin`) and an optional name.",
    )

    def scope_of(self, given: str) -> Literal["read", "admin"] | None:
        """The scope the token grants, compared in constant time with every configured token."""
        return self.scope_matching(lambda secret: hmac.compare_digest(given.encode(), secret.encode()))

    def scope_matching(self, matches: Callable[[str], bool]) -> Literal["read", "admin"] | None:
        """The widest scope among the configured tokens that `matches`; every token is tried (constant time)."""
        found: Literal["read", "admin"] | None = None
        held = [(self.token, "admin"), *((t.token, t.scope) for t in self.tokens)]
        for secret, scope in held:
            if secret is not None and matches(secret.get_secret_value()):
                found = "admin" if scope == "admin" or found == "admin" else "read"
        return found


class MetricsSpec(_Strict):
    """GET /metrics (Prometheus): only for a caller with a token, as nothing internal is open to anyone."""

    token: StrongToken = Field(
        None,
        description="Bearer token a Prometheus server sends to scrape /metrics, and which opens nothing else; "
        f"at least {ADMIN_TOKEN_MIN_LENGTH} characters, e.g. ${{DECLIC_METRICS_TOKEN}}. Admin and read tokens "
        "open /metrics too; with none set, /metrics answers 401 to everyone.",
    )


class Settings(_Strict):
    public_url: str | None = Field(
        None,
        description="This deployment's URL as providers and recipients see it: some providers sign it, and "
        "marketing e-mail's one-click unsubscribe links point to it, so it must be https.",
    )
    allow_http_public_url: bool = Field(
        False, description="Accept an http:// public_url, for local testing only (RFC 8058 wants https)."
    )
    timezone: str = Field("UTC", description="IANA time zone used when a contact has none.")
    locale: str = Field(
        "en",
        max_length=35,
        description="Locale used when a contact has none (or one unknown to Babel), e.g. fr or fr_FR: "
        "for format_currency and the other filters, and for translated templates.",
    )
    phone_region: str | None = Field(
        None, description="ISO country (FR, US...) for phone numbers written without +: stored as E.164."
    )
    storage: StorageSpec = Field(default_factory=StorageSpec, description="Where state is kept.")
    templates: str = Field("templates", description="Template folder, relative to the config file.")
    sources: dict[Name, dict[str, Any]] = Field(
        default_factory=dict, description="NAME: {plugin: ..., options}; served at POST /hooks/NAME."
    )
    sinks: dict[Name, dict[str, Any]] = Field(
        default_factory=dict, description="NAME: {plugin: ..., options}; rules send `via: NAME`."
    )
    policies: PoliciesSpec = Field(default_factory=PoliciesSpec, description="Checked at send time.")
    scoring: ScoringSpec = Field(default_factory=ScoringSpec, description="Lead score points per event type.")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec, description="Opens and clicks: people or machines.")
    rules: list[RuleSpec] = Field(default_factory=list, description="Trigger rules, see the README.")
    worker: WorkerSpec = Field(default_factory=WorkerSpec, description="Job queue tuning.")
    limits: LimitsSpec = Field(default_factory=LimitsSpec, description="Request limits.")
    logging: LoggingSpec = Field(default_factory=LoggingSpec, description="Log output.")
    admin: AdminSpec = Field(default_factory=AdminSpec, description="Access to the deployment's internals.")
    metrics: MetricsSpec = Field(default_factory=MetricsSpec, description="Prometheus metrics at GET /metrics.")
    test_recipients: list[Annotated[str, AfterValidator(test_recipient)]] = Field(
        default_factory=list,
        description="The only addresses `declic send-test` sends to: e-mail addresses, or phone numbers written "
        "with their country code (+33...).",
    )

    _path: Path = PrivateAttr(default=Path("declic.yaml"))
    _sources: dict[str, tuple[type[Source], PluginConfig]] = PrivateAttr(default_factory=dict)
    _sinks: dict[str, tuple[type[Sink], PluginConfig]] = PrivateAttr(default_factory=dict)
    #: Where each rule is written (`rules[i]`): rules with errors are left out while the rest is checked.
    _rule_positions: list[int] | None = PrivateAttr(default=None)

    def numbered_rules(self) -> list[tuple[int, RuleSpec]]:
        """(position in the file, rule): the rules' indexes as written."""
        positions = self._rule_positions or list(range(len(self.rules)))
        return list(zip(positions, self.rules, strict=True))

    @field_validator("public_url")
    @classmethod
    def _absolute_url(cls, value: str | None) -> str | None:
        if value is not None and (urlsplit(value).scheme not in ("http", "https") or not urlsplit(value).hostname):
            raise ValueError(f"{value!r} is not an absolute http(s) URL, such as https://hooks.example.com")
        return value

    @field_validator("phone_region")
    @classmethod
    def _region(cls, value: str | None) -> str | None:
        import phonenumbers

        if value is not None and value.upper() not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"unknown region {value!r}: use an ISO 3166 code such as FR or US")
        return value.upper() if value else value

    @field_validator("locale")
    @classmethod
    def _known_locale(cls, value: str) -> str:
        found = parse_locale(value)
        if found is None:
            raise ValueError(f"unknown locale {value!r} (use a language, or language_TERRITORY, such as fr or fr_FR)")
        return str(found)

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
        raw = path.read_bytes()
    except OSError as exc:
        message = f"cannot read config: {exc.strerror}"
        raise ConfigError([f"{path}: {message}"], [ConfigProblem(str(path), None, None, "", message)]) from None
    report = _Report(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = len(raw[raw.rfind(b"\n", 0, exc.start) + 1 : exc.start].decode("utf-8", "replace")) + 1
        report.add((), f"not UTF-8 (byte {raw[exc.start]:#04x}): save the file as UTF-8", (line, column))
        report.raise_if_any()
    report.lines = text.splitlines()
    try:
        data, report.marks, yaml_problems = yamlmarks.load(text, env)
    except yamlmarks.YamlProblem as exc:
        report.add(exc.path, exc.message, exc.mark)
        report.raise_if_any()
    except yamlmarks.YamlProblems as exc:
        for problem in exc.problems:
            report.add(problem.path, problem.message, problem.mark)
        report.raise_if_any()
    for problem in yaml_problems:
        report.add(problem.path, problem.message, problem.mark)
    if not isinstance(data, dict):
        report.add((), "the config must be a mapping of keys (public_url, sources, sinks, rules...)")
        report.raise_if_any()
    settings, broken = _salvage(data, report)
    if settings is None:
        report.raise_if_any()
        raise AssertionError("unreachable: a config that cannot be validated has a problem")  # pragma: no cover
    settings._path = path.resolve()
    _resolve_plugins(settings, data, registry, report)
    _check_rules(settings, registry, pm, report, broken)
    if ("public_url",) not in broken:
        _check_unsubscribe_links(settings, report)
        _check_tracking(settings, report)
    _check_confirmation(settings, report, pm, broken)
    _check_phone_region(settings, report)
    report.raise_if_any()
    return settings


#: Rounds of leaving out what failed: a part left out may leave another without what it needs.
_SALVAGE_ROUNDS = 5


def _salvage(data: dict[str, Any], report: _Report) -> tuple[Settings | None, set[yamlmarks.Path]]:
    """Validate the config; on errors, report them, leave out the rules and sections that failed and validate
    the rest, so that plugins, rules, templates and expressions are checked in the same run.

    Returns the settings (None when nothing could be kept) and the paths left out: checks that depend on
    them stay quiet rather than report a consequence of an error already reported.
    """
    kept = copy.deepcopy(data)
    rules = data.get("rules")
    positions = list(range(len(rules))) if isinstance(rules, list) else []
    broken: set[yamlmarks.Path] = set()
    for attempt in range(_SALVAGE_ROUNDS):
        try:
            settings = Settings.model_validate(kept)
        except ValidationError as exc:
            if attempt == 0:
                report.add_validation(exc, ())
            if not _leave_out(kept, exc, positions, broken):
                return None, broken
            continue
        settings._rule_positions = positions
        return settings, broken
    return None, broken


def _leave_out(kept: dict[str, Any], exc: ValidationError, positions: list[int], broken: set[yamlmarks.Path]) -> bool:
    """Remove from `kept` the key each error is about (its default applies), else the rule or section holding it;
    False when an error concerns the whole config."""
    bad_rules: set[int] = set()
    for err in exc.errors():
        loc = tuple(part for part in err["loc"] if not (isinstance(part, str) and "[" in part))
        if err["type"] == "missing":
            loc = loc[:-1]
        if not loc:
            return False
        rules = kept.get("rules")
        if loc[0] == "rules" and len(loc) > 1 and isinstance(loc[1], int) and isinstance(rules, list):
            broken.add(("rules", positions[loc[1]], *loc[2:]))
            if not _remove(rules[loc[1]], loc[2:]):
                bad_rules.add(loc[1])
        elif not _remove(kept, loc) and not _remove(kept, loc[:2]):
            kept.pop(str(loc[0]), None)
            broken.add((loc[0],))
        else:
            broken.add(loc)
    if bad_rules:
        kept["rules"] = [rule for i, rule in enumerate(kept["rules"]) if i not in bad_rules]
        positions[:] = [p for i, p in enumerate(positions) if i not in bad_rules]
    return True


def _remove(container: Any, path: tuple[Any, ...]) -> bool:
    """Delete the mapping key at `path`; False when `path` does not end at one."""
    if not path:
        return False
    for part in path[:-1]:
        in_list = isinstance(container, list) and isinstance(part, int) and 0 <= part < len(container)
        if not (in_list or (isinstance(container, dict) and part in container)):
            return False
        container = container[part]
    if isinstance(container, dict) and path[-1] in container:
        del container[path[-1]]
        return True
    return False


def _resolve_plugins(settings: Settings, data: dict[str, Any], registry: Registry, report: _Report) -> None:
    sections: tuple[tuple[str, dict[str, Any], dict[str, Any]], ...] = (
        ("sources", settings._sources, registry.sources),
        ("sinks", settings._sinks, registry.sinks),
    )
    for section, table, known in sections:
        written = data.get(section)
        for key, options in (written if isinstance(written, dict) else {}).items():
            where: yamlmarks.Path = (section, key)
            if not isinstance(options, dict):
                report.add(where, "expected a mapping with a `plugin` key")
                continue
            options = dict(options)
            plugin = options.pop("plugin", None)
            available = ", ".join(sorted(known)) or "none installed"
            if plugin is not None and not isinstance(plugin, str):
                report.add(
                    (*where, "plugin"),
                    f"`plugin` names a plugin (available: {available}; see `declic plugins`), not {_short(plugin)}",
                )
                continue
            if plugin not in known:
                report.add(
                    (*where, "plugin") if plugin else where,
                    f"unknown plugin {plugin!r} ({_did_you_mean(plugin, known)}available: {available}; "
                    "see `declic plugins`)"
                    if plugin
                    else "missing `plugin` key",
                )
                continue
            cls = known[plugin]
            try:
                table[key] = (cls, cls.Config.model_validate(options, context={"config_dir": settings.base_dir}))
            except ValidationError as exc:
                report.add_validation(exc, where, cls.Config)


def _check_rules(
    settings: Settings,
    registry: Registry,
    pm: pluggy.PluginManager | None,
    report: _Report,
    broken: set[yamlmarks.Path],
) -> None:
    extra_types = frozenset().union(*(cls.event_types for cls in registry.sources.values()))
    env = make_environment(settings.templates_dir, pm)
    templates_dir = settings.templates_dir
    seen: set[str] = set()
    for i, rule in settings.numbered_rules():
        where: yamlmarks.Path = ("rules", i)
        if rule.name in seen:
            report.add((*where, "name"), f"duplicate rule name {rule.name!r}")
        seen.add(rule.name)
        named = (
            ("when", [rule.when] if rule.when else []),
            ("exit_on", rule.exit_on),
            ("goal", rule.goal),
            ("of", rule.of),
        )
        for key, types in named:
            for j, event_type in enumerate(types):
                if not is_known_type(event_type, extra_types):
                    sub = (*where, key) if key == "when" else (*where, key, j)
                    report.add(sub, f"unknown event type {event_type!r}{_suggest(event_type, extra_types)}")
        _check_expression(env, rule.if_, (*where, "if"), Scope.at_enrolment(), report)
        for k, step in enumerate(rule.steps):
            step_where = (*where, "steps", k) if (*where, "steps") in report.marks else where
            send_where = (*step_where, "send")
            scope = _step_scope(settings, rule, step.send.vias[0], broken)
            _check_expression(env, step.if_, (*step_where, "if"), scope, report)
            _check_syntax(env, step.at, (*step_where, "at"), report)
            for m, via in enumerate(step.send.vias):
                if via not in settings.sinks and ("sinks", via) not in broken:
                    sinks = ", ".join(sorted(settings.sinks)) or "none configured"
                    via_where = (*send_where, "via", m) if isinstance(step.send.via, list) else (*send_where, "via")
                    hint = _did_you_mean(via, settings.sinks)
                    report.add(via_where, f"no sink named {via!r} under `sinks:` ({hint}configured: {sinks})")
            _check_recipient(settings, env, step.send, (*send_where, "to"), report)
            if ("templates",) not in broken:
                for at, template in _templates_of(step.send, send_where):
                    _check_template(env, templates_dir, template, at, scope, report)
    for event_type, score in settings.scoring.points.items():
        where = report.as_written(("scoring", "points", event_type, "if"))
        _check_expression(env, score.if_, where, Scope.at_enrolment(), report)


def _step_scope(settings: Settings, rule: RuleSpec, via: str, broken: set[yamlmarks.Path]) -> Scope:
    """The names a step's `if:` and template see: its links depend on the rule's kind and the sink's channel."""
    sink = settings._sinks.get(via)
    public_url_known = settings.public_url is not None or ("public_url",) in broken
    channel = sink[0].channel if sink else None
    return Scope.at_send(template_checks.unset_links(rule.kind, channel, public_url_known, rule.name))


def _check_template(
    env: jinja2.Environment, folder: Path, name: str, where: yamlmarks.Path, scope: Scope, report: _Report
) -> bool:
    """The template's text part exists, and every part and what it includes passes kit/lint.py."""
    try:
        found = "txt" in template_files(folder, name)
    except OSError as exc:  # a name the file system refuses, before any length limit applies
        report.add(where, f"cannot look for template {name!r}: {exc.strerror}")
        return False
    if not found:
        report.add(where, f"template {name}.txt.j2 not found in {folder}{_similar_template(folder, name)}")
        return False
    for file, finding in template_checks.check_parts(env, folder, name, scope):
        report.add_in(file, (finding.line, finding.column or 1), where, finding.message)
    return True


def _similar_template(folder: Path, name: str) -> str:
    try:
        names = {p.name.removesuffix(".txt.j2") for p in folder.glob("*.txt.j2")}
    except OSError:
        return ""
    return suggest(name, names)


def _templates_of(send: SendSpec, where: yamlmarks.Path) -> list[tuple[yamlmarks.Path, str]]:
    """Each template a step may send, where the config names it: its own, or each variant's."""
    if send.template:
        return [((*where, "template"), send.template)]
    return [((*where, "variants", j, "template"), v.template) for j, v in enumerate(send.variants or ())]


def _check_syntax(env: jinja2.Environment, text: str | None, where: yamlmarks.Path, report: _Report) -> None:
    """A template written in the config itself (`at:`, `to:`) parses."""
    if text is None:
        return
    try:
        env.from_string(text)
    except jinja2.TemplateSyntaxError as exc:
        report.add(where, f"invalid template: {exc.message}")


#: The channels whose sinks can carry a message to an address given in `to:`.
INTERNAL_CHANNELS = ("email", "sms")


def _check_recipient(
    settings: Settings, env: jinja2.Environment, send: SendSpec, where: yamlmarks.Path, report: _Report
) -> None:
    """`to:` goes through an e-mail or SMS sink; a literal address is checked now, a template at send time."""
    if send.to is None:
        return
    sink = settings._sinks.get(send.vias[0])
    channel = sink[0].channel if sink else None
    if channel is not None and channel not in INTERNAL_CHANNELS:
        report.add(where, f"`to:` needs an e-mail or SMS sink; {send.vias[0]!r} is a {channel} sink")
    elif send.to_template:
        _check_syntax(env, send.to, where, report)
    elif channel is not None:
        try:
            internal_address(channel, send.to)
        except ValueError as exc:
            report.add(where, str(exc))


def _check_unsubscribe_links(settings: Settings, report: _Report) -> None:
    """Marketing e-mail always carries a one-click unsubscribe link (RFC 8058), which needs an https public URL."""
    email_sinks = {key for key, (cls, _) in settings._sinks.items() if cls.channel == "email"}
    rules = [
        (i, rule.name)
        for i, rule in settings.numbered_rules()
        if rule.kind == "marketing"
        and any(set(step.send.vias) & email_sinks for step in rule.steps if step.send.to is None)
    ]
    if not rules:
        return
    position, name = rules[0]
    if settings.public_url is None:
        report.add(
            ("rules", position),
            f"marketing e-mail (rule {name!r}) needs `public_url:`: its one-click unsubscribe links point there",
        )
    elif urlsplit(settings.public_url).scheme != "https" and not settings.allow_http_public_url:
        report.add(
            ("public_url",),
            f"marketing e-mail (rule {name!r}) carries unsubscribe links to this URL, and RFC 8058 wants https; "
            "set `allow_http_public_url: true` for local testing only",
        )


def _check_tracking(settings: Settings, report: _Report) -> None:
    """Tracked e-mail points its pixel and links at the public URL (marketing rules are reported above)."""
    if settings.public_url is not None:
        return
    for i, rule in settings.numbered_rules():
        for step in rule.steps:
            for via in step.send.vias if step.send.to is None else ():  # internal messages are not tracked
                sink = settings._sinks.get(via)
                track = rule.tracking(sink[1]) if sink and sink[0].channel == "email" else None
                if rule.kind != "marketing" and track and (track.opens or track.clicks):
                    report.add(
                        ("rules", i, "track"),
                        f"rule {rule.name!r} tracks opens or clicks: needs `public_url:`, where its pixel and links "
                        "point",
                    )
                    return


def _check_confirmation(
    settings: Settings, report: _Report, pm: pluggy.PluginManager | None, broken: set[yamlmarks.Path]
) -> None:
    """Double opt-in sends its own message: its sink must be an e-mail sink, its template must pass the check."""
    for i, rule in settings.numbered_rules():
        if rule.name == CONFIRM_RULE:
            report.add(("rules", i, "name"), f"{CONFIRM_RULE!r} is the name of Declic's own double opt-in rule")
    confirmation = settings.policies.confirmation
    if confirmation is None or not settings.policies.double_opt_in:
        return
    where: yamlmarks.Path = ("policies", "confirmation")
    sink = settings._sinks.get(confirmation.via)
    if sink is None or sink[0].channel != "email":
        report.add((*where, "via"), f"{confirmation.via!r} is not an e-mail sink under `sinks:`")
    unset = {"unsubscribe_url": "the confirmation message is transactional: it carries no unsubscribe link"}
    scope = Scope.at_send(unset, extra=frozenset({"confirm_url"}))
    env = make_environment(settings.templates_dir, pm)
    if ("templates",) not in broken:
        _check_template(env, settings.templates_dir, confirmation.template, (*where, "template"), scope, report)
    if settings.public_url is None and ("public_url",) not in broken:
        report.add(where, "double opt-in needs `public_url:`: the confirmation link points there")


def _check_phone_region(settings: Settings, report: _Report) -> None:
    """A number written without its country code is stored as a contact's identity read in `phone_region`, and
    texted as read in the SMS sink's `default_region`. Two countries (or one unset) give one number two forms:
    the STOP from +33612345678 would reach another contact than the one stored as 06 12 34 56 78, which would
    still be texted. So a sink's region must be the deployment's."""
    for key, (cls, config) in settings._sinks.items():
        region = getattr(config, "default_region", None)
        if cls.channel != "sms" or region is None or region == settings.phone_region:
            continue
        stored = f"as {settings.phone_region} numbers" if settings.phone_region else "as written"
        report.add(
            ("sinks", key, "default_region"),
            f"numbers without +country code are stored {stored} (`phone_region:`) and this sink texts them as "
            f"{region} numbers: a STOP would not reach the contact it was sent to; set `phone_region: {region}` "
            "at the top level (the sink then needs no default_region)",
        )


def _check_expression(
    env: jinja2.Environment, expression: str | None, where: yamlmarks.Path, scope: Scope, report: _Report
) -> None:
    if expression is None:
        return
    mark = report.mark_of(where)
    line = report.line_text(mark[0])
    findings = list(check_expression(env, expression, scope))
    for finding in findings:
        report.add(where, finding.message, template_checks.expression_mark(mark, line, expression, finding))
    if not findings:  # the literal `within=` and `where=` of history helpers, once the rest holds
        for problem in conditions.argument_problems(env, expression):
            report.add(where, problem)


def _did_you_mean(word: str, choices: Any) -> str:
    """`did you mean 'x'? ` when one of `choices` is close, to open a parenthesis that goes on."""
    hint = suggest(word, choices)
    return hint.strip(" ()") + " " if hint else ""


def _suggest(event_type: str, extra: frozenset[str]) -> str:
    import difflib

    from ..kit.events import CANONICAL_TYPES

    close = difflib.get_close_matches(event_type, sorted(CANONICAL_TYPES | extra), n=1)
    return f" (did you mean {close[0]!r}?)" if close else " (see the event types in the README)"


class _Report:
    """Collects problems, in the config file or in the templates it names, and formats each as
    `file:line:col: path: message`: the config's first, then each template's, by line and column."""

    def __init__(self, path: Path):
        self.path = path
        self.lines: list[str] = []
        self.marks: dict[yamlmarks.Path, yamlmarks.Mark] = {(): (1, 1)}
        self.problems: list[tuple[tuple[bool, str, int, int], str, ConfigProblem]] = []

    def add(self, where: yamlmarks.Path, message: str, mark: yamlmarks.Mark | None = None) -> None:
        self.add_in(self.path, mark or self._mark(where), where, message)

    def add_in(self, file: Path, mark: yamlmarks.Mark, where: yamlmarks.Path, message: str) -> None:
        """A problem in `file` (the config, or a template named at `where`); the same one is reported once."""
        said = _clip(_printable(message))
        file = self._as_given(file)
        text = _printable(f"{file}:{mark[0]}:{mark[1]}: ") + _clip(_printable(f"{_prefix(where)}{message}"))
        found = ConfigProblem(str(file), mark[0], mark[1], _printable(format_path(where)), said)
        if any((f.file, f.line, f.column, f.message) == (str(file), *mark, said) for _, _, f in self.problems):
            return  # a template two steps send: its problems once
        self.problems.append(((file != self.path, str(file), *mark), text, found))

    def _as_given(self, file: Path) -> Path:
        """A template's path as the config's was given (`config/templates/x.txt.j2`, not an absolute path)."""
        try:
            return self.path.parent / file.relative_to(self.path.resolve().parent)
        except ValueError:
            return file

    def add_validation(
        self, exc: ValidationError, prefix: yamlmarks.Path, model: type[BaseModel] | None = None
    ) -> None:
        for err in exc.errors():
            loc = tuple(part for part in err["loc"] if not (isinstance(part, str) and "[" in part))
            where = self.as_written((*prefix, *loc))
            message = _message(err)
            key_mark = None
            if err["type"] == "extra_forbidden":
                key_mark = self.marks.get((*where, yamlmarks.KEY))
                if loc and loc[-1] == err["loc"][-1]:
                    message += suggest(str(loc[-1]), _keys_at(model or Settings, loc[:-1]))
            self.add(where, message, key_mark)

    def as_written(self, where: yamlmarks.Path) -> yamlmarks.Path:
        """The path as the config spells it: `scoring: {email.opened: 1}` is validated as points.email.opened.points."""
        if where[:2] == ("scoring", "points") and len(where) > 2 and ("scoring", "points") not in self.marks:
            where = ("scoring", *where[2:])
            if where[-1] == "points" and where not in self.marks:
                where = where[:-1]
        return where

    def format_at(self, mark: yamlmarks.Mark, where: yamlmarks.Path, message: str) -> str:
        said = _clip(_printable(f"{_prefix(where)}{message}"))
        return _printable(f"{self.path}:{mark[0]}:{mark[1]}: ") + said

    def mark_of(self, where: yamlmarks.Path) -> yamlmarks.Mark:
        return self._mark(self.as_written(where))

    def line_text(self, line: int) -> str:
        return self.lines[line - 1] if 1 <= line <= len(self.lines) else ""

    def _mark(self, where: yamlmarks.Path) -> yamlmarks.Mark:
        for end in range(len(where), -1, -1):
            if where[:end] in self.marks:
                return self.marks[where[:end]]
        return (1, 1)

    def raise_if_any(self) -> None:
        if self.problems:
            ordered = sorted(self.problems, key=lambda p: p[0])
            raise ConfigError([text for _, text, _ in ordered], [found for _, _, found in ordered])


def _prefix(where: yamlmarks.Path) -> str:
    return format_path(where) + ": " if where else ""


def _keys_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys the config accepts where an unknown key was written (`loc`: the mapping holding it)."""
    annotation: Any = model
    for part in (*loc, None):
        annotation = _unwrap(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            fields = annotation.model_fields
            if part is None:
                return [field.alias or name for name, field in fields.items()]
            field = next((f for n, f in fields.items() if part in (n, f.alias)), None)
            if field is None:
                return []
            annotation = field.annotation
        elif typing.get_origin(annotation) in (list, dict) and part is not None:
            annotation = typing.get_args(annotation)[-1]
        else:
            return []
    return []


def _unwrap(annotation: Any) -> Any:
    """`X | None`, `Annotated[X, ...]`, `Literal[...] | X` -> the model, list or dict inside."""
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, UnionType):
        inner = [_unwrap(a) for a in typing.get_args(annotation)]
        structured = [
            a
            for a in inner
            if typing.get_origin(a) in (list, dict) or (isinstance(a, type) and issubclass(a, BaseModel))
        ]
        return structured[0] if structured else annotation
    return annotation


def _clip(text: str) -> str:
    """Shorten each very long word (a 5,000-digit value echoed back, a 300-character key) to its ends."""
    return re.sub(r"\S{120,}", lambda m: f"{m[0][:60]}...{m[0][-30:]}", text)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


def _printable(line: str) -> str:
    """One line of printable text: a key may hold a newline, a control character or a lone surrogate."""
    if line.isprintable():
        return line
    return "".join(c if c.isprintable() and not 0xD800 <= ord(c) <= 0xDFFF else repr(c)[1:-1] for c in line)


def format_path(path: yamlmarks.Path) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not isinstance(part, str) or not part.strip() or part != part.strip():
            out += f"[{part!r}]"  # a key of spaces, or none, must still show in `path: message`
        else:
            out += f".{part}" if out else part
    return out


def _message(err: Any) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    return re.sub(r"^(Value|Assertion) error, ", "", err["msg"])
