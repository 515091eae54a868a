"""The tables. Datetimes are naive UTC; JSON columns are text written by gateway.jsoncodec."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy import Column, Index, LargeBinary, Table, Text, UniqueConstraint, text
from sqlmodel import Field, SQLModel

#: A clock job (jobqueue.add_unique) still to run or running: at most one per key.
CLOCK_JOB_LIVE = "kind IN ('poll', 'tick') AND status IN ('pending', 'running')"


class InboxCall(SQLModel, table=True):
    """Every accepted webhook call, byte for byte, before anything interprets it."""

    __tablename__ = "inbox"
    __table_args__ = (UniqueConstraint("source", "dedupe_key", name="uq_inbox_dedupe"),)

    id: int | None = Field(default=None, primary_key=True)
    source: str = Field(max_length=100)
    dedupe_key: str = Field(max_length=300)
    received_at: datetime
    headers: str = Field(sa_column=Column(Text, nullable=False))
    body: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    status: str = Field(default="received", max_length=20, index=True)  # received|processed|failed
    error: str | None = Field(default=None, sa_column=Column(Text))
    processed_at: datetime | None = None


class Job(SQLModel, table=True):
    """A unit of durable work: normalise an inbox call, run a journey step, or fire a trigger."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_claim", "status", "due_at"),
        Index("ix_jobs_backlog", "kind", "status", "created_at"),
        # The few calls waiting for a retry that said whom they are about (jobqueue.claim reads them).
        Index(
            "ix_jobs_about",
            "created_at",
            sqlite_where=text("about IS NOT NULL"),
            postgresql_where=text("about IS NOT NULL"),
        ),
        # One pending job per trigger key: scheduling a date or inactivity trigger twice is a no-op.
        Index(
            "uq_jobs_pending_key",
            "key",
            unique=True,
            sqlite_where=text("status = 'pending'"),
            postgresql_where=text("status = 'pending'"),
        ),
        # One live clock job (a poll, a tick) per key: queued again while one runs, it is not doubled.
        Index(
            "uq_jobs_clock_key",
            "key",
            unique=True,
            sqlite_where=text(CLOCK_JOB_LIVE),
            postgresql_where=text(CLOCK_JOB_LIVE),
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(max_length=20)  # inbox | step | trigger | tick
    inbox_id: int | None = Field(default=None, index=True)
    enrolment_id: int | None = Field(default=None, index=True)
    step: int = 0
    #: Trigger jobs: which rule fires for which contact, and the occurrence it stands for.
    rule: str | None = Field(default=None, max_length=100)
    contact_id: int | None = Field(default=None)
    key: str | None = Field(default=None, max_length=300)
    occurrence: str | None = Field(default=None, max_length=300)
    priority: int = 0
    #: A call waiting for a retry: JSON list of the [kind, value] identities it is about, as its
    #: source read them; NULL when it could not tell (then it holds back everyone's steps).
    about: str | None = Field(default=None, sa_column=Column(Text))
    #: When a step was first due, before quiet hours or pressure deferred it (for `max_delay`).
    first_due_at: datetime | None = None
    #: When the job first failed (`retry_for` counts from it); NULL until then, and again once replayed.
    failing_since: datetime | None = None
    due_at: datetime
    status: str = Field(default="pending", max_length=20)  # pending|running|done|cancelled|dead
    attempts: int = 0
    locked_until: datetime | None = None
    locked_by: str | None = Field(default=None, max_length=100)
    last_error: str | None = Field(default=None, sa_column=Column(Text))
    created_at: datetime
    updated_at: datetime


class Contact(SQLModel, table=True):
    __tablename__ = "contacts"

    id: int | None = Field(default=None, primary_key=True)
    email: str | None = Field(default=None, max_length=320)
    phone: str | None = Field(default=None, max_length=40)
    first_name: str | None = Field(default=None, max_length=200)
    last_name: str | None = Field(default=None, max_length=200)
    locale: str | None = Field(default=None, max_length=35)
    timezone: str | None = Field(default=None, max_length=64)
    attributes: str = Field(default="{}", sa_column=Column(Text, nullable=False))
    consent: str = Field(default="{}", sa_column=Column(Text, nullable=False))
    email_status: str = Field(default="ok", max_length=20)  # ok | bouncing | erased
    phone_status: str = Field(default="ok", max_length=20)  # ok | invalid
    #: Lead score as of `score_at`; decays with the configured half-life.
    score: float = 0.0
    score_at: datetime | None = None
    created_at: datetime
    updated_at: datetime


class Identity(SQLModel, table=True):
    """One way to recognise a contact: ("email", "a@b.c"), ("shopify", "207119551")..."""

    __tablename__ = "identities"

    kind: str = Field(primary_key=True, max_length=50)
    value: str = Field(primary_key=True, max_length=320)
    contact_id: int = Field(index=True)


class PushSubscription(SQLModel, table=True):
    """Where a contact's devices receive push: a Web Push endpoint (with its keys) or an FCM token."""

    __tablename__ = "push_subscriptions"
    __table_args__ = (UniqueConstraint("kind", "address", name="uq_push_address"),)

    id: int | None = Field(default=None, primary_key=True)
    contact_id: int = Field(index=True)
    kind: str = Field(max_length=20)  # webpush | fcm
    address: str = Field(max_length=2000)
    keys: str = Field(default="{}", sa_column=Column(Text, nullable=False))
    created_at: datetime


class Meta(SQLModel, table=True):
    """Deployment-wide values Declic keeps for itself, e.g. the key that signs unsubscribe links."""

    __tablename__ = "meta"

    key: str = Field(primary_key=True, max_length=100)
    value: str = Field(sa_column=Column(Text, nullable=False))


class ConsentRecord(SQLModel, table=True):
    """The consent ledger: every consent statement received, applied or not, with why and what shows it."""

    __tablename__ = "consents"

    id: int | None = Field(default=None, primary_key=True)
    contact_id: int = Field(index=True)
    channel: str = Field(max_length=20)
    state: str = Field(max_length=20)
    source: str = Field(max_length=100)
    #: Indexed: retention keeps the events (and their calls) the ledger points to.
    event_id: str | None = Field(default=None, max_length=60, index=True)
    #: JSON: the webhook's id and inbox row, the event, and what the source gives (IP, user agent, form).
    evidence: str | None = Field(default=None, sa_column=Column(Text))
    #: When the person stated it, as the source says; None for a snapshot that gives no time.
    stated_at: datetime | None = None
    #: When the call carrying it reached Declic.
    received_at: datetime | None = None
    #: Something the person did (an unsubscribe, a STOP), not a snapshot of a state.
    action: bool = Field(default=False, sa_column=Column(sa.Boolean, nullable=False, server_default=sa.false()))
    #: Whether it became the state in force; `reason` says why or why not.
    applied: bool = Field(default=True, sa_column=Column(sa.Boolean, nullable=False, server_default=sa.true()))
    reason: str | None = Field(default=None, sa_column=Column(Text))
    recorded_at: datetime


class Decision(SQLModel, table=True):
    """Append-only journal of what the engine decided: send, suppressed, deferred, exited, goal, failed."""

    __tablename__ = "decisions"
    __table_args__ = (Index("ix_decisions_rule_action", "rule", "action"),)

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(index=True)
    rule: str = Field(max_length=100)
    step: int | None = None
    contact_id: int = Field(index=True)
    action: str = Field(max_length=20)
    via: str | None = Field(default=None, max_length=100)
    reason: str | None = Field(default=None, sa_column=Column(Text))
    event_id: str | None = Field(default=None, max_length=60)


class StoredEvent(SQLModel, table=True):
    __tablename__ = "events"
    __table_args__ = (
        Index(
            "uq_events_dedupe",
            "source",
            "dedupe_key",
            unique=True,
            sqlite_where=text("dedupe_key IS NOT NULL"),
            postgresql_where=text("dedupe_key IS NOT NULL"),
        ),
        # `if:` asks a contact's history (contact.count('page.viewed', within='7d')): one range of this
        # index per question, as long as that contact's history and no longer (pipeline/history.py).
        Index("ix_events_contact_history", "contact_id", "type", "occurred_at"),
    )

    id: str = Field(primary_key=True, max_length=60)
    dedupe_key: str | None = Field(default=None, max_length=300)
    inbox_id: int | None = Field(default=None, index=True)
    source: str = Field(max_length=100)
    type: str = Field(max_length=100, index=True)
    occurred_at: datetime
    contact_id: int = Field(index=True)
    correlation: str = Field(default="[]", sa_column=Column(Text, nullable=False))
    properties: str = Field(default="{}", sa_column=Column(Text, nullable=False))


class Enrolment(SQLModel, table=True):
    """A contact's run through one rule, once per occurrence (its correlation key)."""

    __tablename__ = "enrolments"
    __table_args__ = (
        UniqueConstraint("rule", "contact_id", "occurrence", name="uq_enrolment_occurrence"),
        Index("ix_enrolments_exit", "rule", "status", "correlation"),
        Index("ix_enrolments_kpi", "rule", "created_at", "held_out"),
    )

    id: int | None = Field(default=None, primary_key=True)
    rule: str = Field(max_length=100)
    contact_id: int = Field(index=True)
    event_id: str = Field(max_length=60)
    occurrence: str = Field(max_length=300)
    correlation: str | None = Field(default=None, max_length=300)
    status: str = Field(default="active", max_length=20)  # active|completed|exited|converted|failed
    ended_by: str | None = Field(default=None, max_length=60)
    #: In the rule's holdout group: the journey runs, its messages are not sent (for measuring lift).
    held_out: bool = Field(default=False, sa_column=Column(sa.Boolean, nullable=False, server_default=sa.false()))
    created_at: datetime
    ended_at: datetime | None = None


class Conversion(SQLModel, table=True):
    """A goal reached within a rule's attribution window after its last message (or held-out step)."""

    __tablename__ = "conversions"
    __table_args__ = (
        UniqueConstraint("rule", "event_id", name="uq_conversion_event"),
        Index("ix_conversions_rule_at", "rule", "at"),
        Index("ix_conversions_enrolment", "enrolment_id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    rule: str = Field(max_length=100)
    contact_id: int = Field(index=True)
    enrolment_id: int
    #: The message it is attributed to: its step and delivery row (status sent, or held_out).
    step: int
    delivery_id: int
    held_out: bool = Field(sa_column=Column(sa.Boolean, nullable=False))
    event_id: str = Field(max_length=60)
    at: datetime
    #: Reporting figures, summed by KPIs: a float is exact enough for sums of prices.
    revenue: float | None = None
    currency: str | None = Field(default=None, max_length=3)


#: deliveries.kind of a message about the contact sent to someone else (`to:`): not the contact's message,
#: so not in its KPIs, conversions or pressure.
INTERNAL_KIND = "internal"


class Delivery(SQLModel, table=True):
    """What happened to one (rule, contact, step, occurrence): at most one row, at most one send."""

    __tablename__ = "deliveries"
    __table_args__ = (
        # The KPI funnel reads a rule's range of sends from this index alone (insight/kpis.py).
        Index("ix_deliveries_kpi", "rule", "sent_at", "step", "status", "feedback", "kind", "variant"),
        # `contact.sent(rule=..., within=...)` in `if:` reads one contact's sends (pipeline/history.py).
        Index("ix_deliveries_contact_history", "contact_id", "rule", "status", "sent_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    idempotency_key: str = Field(max_length=400, unique=True)
    enrolment_id: int = Field(index=True)
    rule: str = Field(max_length=100)
    step: int
    contact_id: int = Field(index=True)
    sink: str = Field(max_length=100)
    #: The A/B variant the step sent (its `send.variants`), None for a step without variants.
    variant: str | None = Field(default=None, max_length=40)
    #: The rule's kind, for pressure caps; `internal` for a message about the contact to someone else (`to:`).
    kind: str = Field(default="marketing", max_length=20)
    status: str = Field(max_length=20)  # sending|retrying|sent|held_out|suppressed|failed|address_invalid|opted_out
    sent_at: datetime | None = Field(default=None, index=True)
    reason: str | None = Field(default=None, sa_column=Column(Text))
    attempts: int = 0
    provider_id: str | None = Field(default=None, max_length=300, index=True)
    #: The provider's later word on it: delivered, failed, bounced, opened, clicked...
    feedback: str | None = Field(default=None, max_length=200)
    feedback_at: datetime | None = None
    created_at: datetime
    updated_at: datetime


class RenderedMessage(SQLModel, table=True):
    """A sent message as it was rendered (to, headers, subject, text, html), for the contact's timeline."""

    __tablename__ = "rendered_messages"

    delivery_key: str = Field(primary_key=True, max_length=400)  # deliveries.idempotency_key
    contact_id: int = Field(index=True)
    at: datetime = Field(index=True)
    #: zlib-compressed JSON: HTML mail shrinks 4-8 times, and nothing queries inside it.
    body: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class Replica(SQLModel, table=True):
    """A running `declic serve` process on a shared PostgreSQL, with the plugins it loaded."""

    __tablename__ = "replicas"

    id: str = Field(primary_key=True, max_length=100)
    #: JSON object: plugin (entry point) name -> "distribution version".
    plugins: str = Field(sa_column=Column(Text, nullable=False))
    started_at: datetime
    #: Renewed while the process runs; a replica whose beat is old is gone and no longer compared with.
    heartbeat_at: datetime


class SinkRate(SQLModel, table=True):
    """A rated sink's send schedule, shared by the replicas on one PostgreSQL (store/sinkrates.py)."""

    __tablename__ = "sink_rates"

    sink: str = Field(primary_key=True, max_length=100)
    #: GCRA's theoretical arrival time: when the sink is idle again at its rate.
    tat: datetime


def _table(model: type[SQLModel]) -> Table:
    return model.__table__  # type: ignore[attr-defined]


# The same tables as SQLAlchemy Core objects, for the set-based queries of the hot paths.
INBOX = _table(InboxCall)
JOBS = _table(Job)
CONTACTS = _table(Contact)
IDENTITIES = _table(Identity)
EVENTS = _table(StoredEvent)
ENROLMENTS = _table(Enrolment)
DELIVERIES = _table(Delivery)
CONSENTS = _table(ConsentRecord)
DECISIONS = _table(Decision)
CONVERSIONS = _table(Conversion)
PUSH_SUBSCRIPTIONS = _table(PushSubscription)
META = _table(Meta)
RENDERED = _table(RenderedMessage)
REPLICAS = _table(Replica)
SINK_RATES = _table(SinkRate)
