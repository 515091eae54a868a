"""What the admin API accepts and answers: pydantic models the handlers validate with, and that
the OpenAPI document is generated from (openapi.py), so the two cannot drift apart."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from ...insight.records import MAX_ID

#: Largest page a list answers; the default is smaller.
MAX_LIMIT = 500
DEFAULT_LIMIT = 50
#: Largest id list a replay takes at once; `all: true` replays everything.
MAX_REPLAY_IDS = 1000
#: Ids are INTEGER columns, 32-bit on PostgreSQL: a larger one is a 422, not a driver error (a 500).
DbId = Annotated[int, Field(ge=1, le=MAX_ID)]


def _as_utc(value: datetime) -> datetime:
    """Naive datetimes are UTC (the tables store naive UTC; callers may omit the offset)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


#: A moment, always written with its offset (`Z`) in answers, read as UTC when a query omits it.
Moment = Annotated[datetime, AfterValidator(_as_utc)]

#: The moments a query may name: far wider than any data, and far enough from the calendar's ends that
#: converting one to UTC or counting 30 days back from it cannot overflow (a 500, not a 422).
EARLIEST, LATEST = datetime(1970, 1, 1, tzinfo=UTC), datetime(9999, 1, 1, tzinfo=UTC)
BOUNDS = f"from {EARLIEST:%Y-%m-%d} to {LATEST:%Y-%m-%d}"


def _in_bounds(value: datetime) -> datetime:
    """As UTC, once within bounds: comparing aware moments cannot overflow, converting one near year 1 can."""
    aware = value if value.tzinfo else value.replace(tzinfo=UTC)
    if not EARLIEST <= aware < LATEST:
        raise ValueError(f"must be {BOUNDS}")
    return aware.astimezone(UTC)


#: A moment a query names.
QueryMoment = Annotated[datetime, AfterValidator(_in_bounds)]


def _no_nul(value: str) -> str:
    # SQLite stores a NUL, PostgreSQL refuses it (a driver error): both answer 422 here instead.
    if "\0" in value:
        raise ValueError("must not contain a NUL character")
    return value


#: Text a query compares with stored text.
Text = Annotated[str, AfterValidator(_no_nul)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- requests ------------------------------------------------------------------------------------


class Page(_Model):
    """Keyset pagination: `after` is the last id of the previous page (its `next_after`)."""

    limit: int = Field(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT, description=f"At most this many items, 1 to {MAX_LIMIT}.")
    after: int = Field(0, ge=0, le=MAX_ID, description="Only items with a larger id: the previous page's cursor.")


class ContactId(_Model):
    """A path's {contact_id}."""

    value: DbId


class RuleName(_Model):
    """A path's {name}."""

    value: Text = Field(max_length=100)


class KpiRange(_Model):
    since: QueryMoment | None = Field(
        None, description=f"Start, ISO 8601 (UTC when no offset), {BOUNDS}; default: 30 days before `until`."
    )
    until: QueryMoment | None = Field(None, description=f"End, excluded, {BOUNDS}; default: now.")

    @model_validator(mode="after")
    def _ordered(self) -> KpiRange:
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise ValueError("since must be before until")
        return self


class ContactSearch(_Model):
    q: Text = Field(
        min_length=1,
        max_length=400,
        description="An e-mail, a phone number, SOURCE_KIND:ID (e.g. shopify:207119551) or #ID (Declic's id).",
    )


class TimelinePage(_Model):
    limit: int = Field(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT, description=f"At most this many entries, 1 to {MAX_LIMIT}.")
    after: int = Field(0, ge=0, le=10**9, description="Skip this many entries: the previous page's `next_after`.")


class DeliveryFilter(Page):
    rule: Text | None = Field(None, max_length=100, description="Only this rule's messages.")
    contact_id: DbId | None = Field(None, description="Only this contact's messages.")
    status: Text | None = Field(None, max_length=20, description="Only this status: sent, failed, suppressed...")


class Replay(_Model):
    """Which items to queue again: some by id, or all of them; an empty body replays nothing."""

    ids: list[DbId] | None = Field(
        None, min_length=1, max_length=MAX_REPLAY_IDS, description=f"These ids, 1 to {MAX_REPLAY_IDS}."
    )
    all: bool = Field(False, description="Every listed item (then leave out `ids`).")

    @model_validator(mode="after")
    def _one_way(self) -> Replay:
        if (self.ids is None) == (not self.all):
            raise ValueError("give either `ids` or `all: true`")
        return self


# --- answers -------------------------------------------------------------------------------------


class Problem(_Model):
    error: str = Field(description="What went wrong, for a person to read.")
    detail: list[dict[str, Any]] | None = Field(None, description="Each invalid field, as pydantic reports it.")


class VariantKpis(_Model):
    variant: str = Field(description="The A/B variant's name, as in the step's `send.variants`.")
    sent: int
    delivered: int
    bounced: int
    opened: int
    clicked: int
    unsubscribed: int
    complained: int
    converted: int
    revenue: float


class StepKpis(_Model):
    step: int
    sent: int
    delivered: int
    bounced: int
    opened: int
    clicked: int
    unsubscribed: int
    complained: int
    converted: int
    revenue: float
    variants: list[VariantKpis] = Field(description="A step with variants: the same figures per variant.")


class Group(_Model):
    enrolled: int
    converted: int
    rate: float | None


class Lift(_Model):
    difference: float = Field(description="Messaged conversion rate minus held-out rate.")
    low: float = Field(description="95 % interval, low end.")
    high: float = Field(description="95 % interval, high end.")
    relative: float | None


class RuleKpis(_Model):
    entered: int
    steps: list[StepKpis]
    converted: int
    revenue: float
    messaged: Group
    held_out: Group
    lift: Lift | None


class Rule(_Model):
    name: str
    kind: Literal["marketing", "transactional"]
    trigger: str = Field(description="What enrols a contact: the event type, date, inactivity or score.")
    condition: str | None = Field(description="The rule's `if` expression.")
    steps: int
    kpis: RuleKpis


class RuleList(_Model):
    since: Moment
    until: Moment
    rules: list[Rule]


class Contact(_Model):
    id: int
    email: str | None
    phone: str | None
    first_name: str | None
    last_name: str | None
    locale: str | None
    timezone: str | None
    email_status: str
    phone_status: str
    score: float
    created_at: Moment
    updated_at: Moment


class Identity(_Model):
    kind: str
    value: str


class ContactView(Contact):
    attributes: dict[str, Any]
    consent: dict[str, Any]
    identities: list[Identity]


class ContactList(_Model):
    contacts: list[Contact]


class EventEntry(_Model):
    at: Moment
    what: Literal["event"]
    type: str
    source: str
    event_id: str
    occurred_at: Moment


class DecisionEntry(_Model):
    at: Moment
    what: Literal["decision"]
    rule: str
    step: int | None
    action: str = Field(description="enrolled, not_enrolled, send, suppressed, deferred, exited, goal, failed...")
    via: str | None
    reason: str | None = Field(description="Why, e.g. `if false: event.properties.total_price > 20`.")
    event_id: str | None


class ConsentEntry(_Model):
    at: Moment
    what: Literal["consent"]
    channel: str
    state: str
    source: str
    applied: bool
    reason: str | None
    event_id: str | None


class MessageEntry(_Model):
    """A sent message as it was rendered (kept unless `storage.keep_rendered` is false)."""

    at: Moment
    what: Literal["message"]
    rule: str
    step: int
    via: str
    to: str
    headers: dict[str, str]
    subject: str | None
    text: str
    html: str | None
    event_id: None


TimelineEntry = Annotated[EventEntry | DecisionEntry | ConsentEntry | MessageEntry, Field(discriminator="what")]


class Timeline(_Model):
    contact_id: int
    entries: list[TimelineEntry]
    next_after: int | None = Field(description="Pass as `after` for the next page; null on the last one.")


class Export(_Model):
    """The whole record (GDPR art. 15 and 20): every row about the contact, columns as stored."""

    contact: dict[str, Any]
    identities: list[Identity]
    consent_ledger: list[dict[str, Any]]
    events: list[dict[str, Any]]
    journeys: list[dict[str, Any]]
    messages: list[dict[str, Any]]
    messages_as_sent: list[dict[str, Any]] = Field(description="Each sent message as rendered, by delivery key.")
    decisions: list[dict[str, Any]]
    conversions: list[dict[str, Any]]


class Erased(_Model):
    erased: int = Field(description="The contact's id; the emptied row stays so counts keep adding up.")


class Delivery(_Model):
    id: int
    rule: str
    step: int
    contact_id: int
    enrolment_id: int
    sink: str
    variant: str | None = Field(description="The A/B variant the step sent, if it has `send.variants`.")
    kind: str
    status: str
    sent_at: Moment | None
    attempts: int
    provider_id: str | None
    feedback: str | None
    feedback_at: Moment | None
    reason: str | None
    created_at: Moment
    updated_at: Moment


class DeliveryList(_Model):
    deliveries: list[Delivery]
    next_after: int | None


class DeadJob(_Model):
    id: int
    kind: str = Field(description="inbox, step, trigger or tick.")
    rule: str | None
    step: int
    enrolment_id: int | None
    contact_id: int | None
    inbox_id: int | None
    attempts: int
    last_error: str | None
    created_at: Moment
    updated_at: Moment


class DeadJobList(_Model):
    jobs: list[DeadJob]
    next_after: int | None


class FailedCall(_Model):
    id: int
    source: str
    received_at: Moment
    error: str | None


class FailedCallList(_Model):
    calls: list[FailedCall]
    next_after: int | None


class Replayed(_Model):
    queued: list[int] = Field(description="The ids queued again; ids not dead-lettered (or not failed) are skipped.")
