"""The deployment at a glance, for the dashboard: what came in and went out lately, what failed,
and how far behind the queue is. Small grouped queries over indexed columns."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..store import DECISIONS, ENROLMENTS, INBOX, JOBS

J, IN, DE = JOBS.c, INBOX.c, DECISIONS.c
#: Decisions that say what became of a message, as the overview counts them per channel.
SEND_ACTIONS = ("send", "failed", "suppressed", "deferred", "held_out")


@dataclass
class Overview:
    since: datetime
    #: source -> status (received, processed, failed) -> calls received since `since`
    webhooks: dict[str, dict[str, int]] = field(default_factory=dict)
    #: channel (the sink's name) -> decision (send, failed, suppressed...) -> count since `since`
    sends: dict[str, dict[str, int]] = field(default_factory=dict)
    dead_jobs: int = 0
    failed_calls: int = 0
    due_now: int = 0
    running: int = 0
    #: How long the oldest job due has waited past its due time; zero when nothing is due.
    lateness: timedelta = timedelta(0)


def overview(conn: Connection, now: datetime, since: datetime) -> Overview:
    found = Overview(since)
    # inbox has no index on received_at: the scan is bounded by the inbox's size (docs/dashboard.md).
    for source, status, count in conn.execute(
        sa.select(IN.source, IN.status, sa.func.count()).where(IN.received_at >= since).group_by(IN.source, IN.status)
    ):
        found.webhooks.setdefault(source, {})[status] = count
    for via, action, count in conn.execute(
        sa.select(DE.via, DE.action, sa.func.count())
        .where(DE.at >= since, DE.via.is_not(None), DE.action.in_(SEND_ACTIONS))
        .group_by(DE.via, DE.action)
    ):
        found.sends.setdefault(via, {})[action] = count
    # (status, due_at) is ix_jobs_claim: each of these reads one index range.
    found.dead_jobs = conn.execute(sa.select(sa.func.count()).where(J.status == "dead")).scalar_one()
    found.running = conn.execute(sa.select(sa.func.count()).where(J.status == "running")).scalar_one()
    due, oldest = conn.execute(
        sa.select(sa.func.count(), sa.func.min(J.due_at)).where(J.status == "pending", J.due_at <= now)
    ).one()
    found.due_now = due
    if oldest is not None:
        found.lateness = max(timedelta(0), now.replace(tzinfo=None) - oldest.replace(tzinfo=None))
    found.failed_calls = conn.execute(sa.select(sa.func.count()).where(IN.status == "failed")).scalar_one()
    return found


@dataclass(frozen=True)
class DeadJob:
    id: int
    kind: str
    rule: str | None
    step: int
    contact_id: int | None
    source: str | None
    attempts: int
    updated_at: datetime
    error: str


@dataclass(frozen=True)
class FailedCall:
    id: int
    source: str
    received_at: datetime
    error: str


def dead_jobs(conn: Connection, limit: int, rule: str | None = None) -> list[DeadJob]:
    """The dead letter, newest first: what each job was about (a rule's step, a stored call...)."""
    about_rule = sa.func.coalesce(ENROLMENTS.c.rule, J.rule)
    query = (
        sa.select(
            J.id,
            J.kind,
            about_rule.label("rule"),
            J.step,
            sa.func.coalesce(ENROLMENTS.c.contact_id, J.contact_id).label("contact_id"),
            IN.source,
            J.attempts,
            J.updated_at,
            J.last_error,
        )
        .outerjoin(ENROLMENTS, ENROLMENTS.c.id == J.enrolment_id)
        .outerjoin(INBOX, IN.id == J.inbox_id)
        .where(J.status == "dead")
        .order_by(J.updated_at.desc(), J.id.desc())
        .limit(limit)
    )
    if rule is not None:
        query = query.where(about_rule == rule)
    return [
        DeadJob(r.id, r.kind, r.rule, r.step, r.contact_id, r.source, r.attempts, r.updated_at, r.last_error or "")
        for r in conn.execute(query)
    ]


def failed_calls(conn: Connection, limit: int) -> list[FailedCall]:
    """Stored calls their source could not read, newest first."""
    rows = conn.execute(
        sa.select(IN.id, IN.source, IN.received_at, IN.error)
        .where(IN.status == "failed")
        .order_by(IN.id.desc())
        .limit(limit)
    )
    return [FailedCall(r.id, r.source, r.received_at, r.error or "") for r in rows]
