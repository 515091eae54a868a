"""Retention: old webhook bodies, events, journal entries and messages are removed, a batch per
transaction, never what something still needs (docs/retention.md says what and why, table by table).

The run is a `tick` job (one pending across replicas, like polls) that schedules the next run
when it closes. Every batch is its own short transaction, so SQLite's one writer is never held
from webhooks for long; a run stopped anywhere (a crash, a deploy) loses nothing and the next
one carries on, because every condition is read afresh from the tables.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..config import Settings
from ..store import CONSENTS, DECISIONS, DELIVERIES, ENROLMENTS, EVENTS, INBOX, JOBS, RENDERED, jobqueue

#: Rows per transaction: a webhook waits at most one batch for SQLite's writer.
BATCH = 1000
#: How often a run starts; each removes what aged out since the last (periods are counted in days).
EVERY = timedelta(days=1)
NAME = "retention"
#: What each run reports, in this order (the log line, the metric's `table` label).
PARTS = ("inbox_bodies", "inbox_keys", "events", "decisions", "deliveries", "jobs")

IN, E, J, N, D, DE = INBOX.c, EVENTS.c, JOBS.c, ENROLMENTS.c, DELIVERIES.c, DECISIONS.c


@dataclass(frozen=True)
class Periods:
    """How long each part is kept; None keeps it forever."""

    inbox_bodies: timedelta | None
    inbox_keys: timedelta | None
    events: timedelta | None
    decisions: timedelta | None
    deliveries: timedelta | None
    jobs: timedelta | None

    @classmethod
    def of(cls, settings: Settings) -> Periods:
        """The configured periods; messages are kept at least as long as attribution and pressure read them."""
        spec = settings.storage.retention
        deliveries = spec.deliveries
        if deliveries is not None:
            pressure = settings.policies.pressure
            deliveries = max(
                [deliveries, *(rule.attribution for rule in settings.rules), *([pressure.per] if pressure else [])]
            )
        return cls(spec.inbox_bodies, spec.inbox_keys, spec.events, spec.decisions, deliveries, spec.jobs)


def schedule(conn: Connection, due: datetime, now: datetime) -> None:
    """Queue the next run unless one is pending (another replica's, or this one's from before a restart)."""
    jobqueue.add_unique(conn, "tick", f"tick:{NAME}", NAME, due, now)


def _open_journeys() -> sa.Select[tuple[int]]:
    """Enrolments that may still send: active, or with a step still to run (a dead one may be replayed)."""
    steps = sa.select(J.enrolment_id).where(J.enrolment_id.is_not(None), J.status.in_(("pending", "running", "dead")))
    return sa.select(N.id).where(sa.or_(N.status == "active", N.id.in_(steps)))


def _evidence_in_force(event_id: sa.ColumnElement[str]) -> sa.Exists:
    """The event carried the consent statement in force (the latest applied one of its contact and channel).

    The ledger itself is never deleted: each row holds its own evidence (IP, user agent, form, webhook id,
    times). The raw call and event behind the statement that allows messaging someone today are kept too.
    """
    ledger, later = CONSENTS.c, CONSENTS.alias("later").c
    superseded = sa.exists().where(
        later.contact_id == ledger.contact_id, later.channel == ledger.channel, later.applied, later.id > ledger.id
    )
    return sa.exists().where(ledger.event_id == event_id, ledger.applied, ~superseded)


def prune_bodies(conn: Connection, cutoff: datetime, limit: int) -> int:
    """Processed calls lose their body and headers, keep their row (the dedupe key); not the evidence of
    consent in force.

    Failed calls keep theirs (they are replayed after a fix), unprocessed ones too (not read yet).
    """
    evidence = sa.exists().where(E.inbox_id == IN.id, _evidence_in_force(E.id))
    chosen = sa.select(IN.id).where(IN.status == "processed", IN.received_at < cutoff, ~evidence).limit(limit)
    return _count(
        conn.execute(
            sa.update(INBOX).where(IN.id.in_(chosen.scalar_subquery())).values(body=b"", headers="{}", status="pruned")
        )
    )


def delete_keys(conn: Connection, cutoff: datetime, limit: int) -> int:
    """Bodiless calls go, dedupe key and all: a provider redelivers within days, not a year on."""
    chosen = sa.select(IN.id).where(IN.status == "pruned", IN.received_at < cutoff).limit(limit)
    return _count(conn.execute(sa.delete(INBOX).where(IN.id.in_(chosen.scalar_subquery()))))


def delete_events(conn: Connection, cutoff: datetime, limit: int) -> int:
    """Old events go, but not one that enrolled an open journey (its steps render it), one that carried the
    consent in force, nor a contact's latest of its type (inactivity rules read the last activity)."""
    newer = EVENTS.alias("newer")
    superseded = sa.exists().where(
        newer.c.contact_id == E.contact_id,
        newer.c.type == E.type,
        sa.or_(newer.c.occurred_at > E.occurred_at, sa.and_(newer.c.occurred_at == E.occurred_at, newer.c.id > E.id)),
    )
    enrolling = sa.select(N.event_id).where(N.id.in_(_open_journeys()))
    chosen = (
        sa.select(E.id)
        .where(E.occurred_at < cutoff, superseded, ~_evidence_in_force(E.id), E.id.not_in(enrolling))
        .limit(limit)
    )
    return _count(conn.execute(sa.delete(EVENTS).where(E.id.in_(chosen.scalar_subquery()))))


def delete_decisions(conn: Connection, cutoff: datetime, limit: int) -> int:
    """The journal is read by people (timelines, the dashboard), never by the engine: old entries go."""
    chosen = sa.select(DE.id).where(DE.at < cutoff).limit(limit)
    return _count(conn.execute(sa.delete(DECISIONS).where(DE.id.in_(chosen.scalar_subquery()))))


def delete_deliveries(conn: Connection, cutoff: datetime, limit: int) -> int:
    """Old messages go, but not one in flight, nor one of an open journey: its row is what stops a step
    from being sent twice. (`Periods.of` keeps the attribution and pressure windows.)"""
    old = sa.and_(D.created_at < cutoff, sa.or_(D.sent_at.is_(None), D.sent_at < cutoff))
    settled = D.status.not_in(("sending", "retrying"))
    chosen = conn.execute(
        sa.select(D.id, D.idempotency_key).where(old, settled, D.enrolment_id.not_in(_open_journeys())).limit(limit)
    ).all()
    if not chosen:
        return 0
    # The message as it was rendered goes with its delivery: it is the same message, and personal data.
    conn.execute(sa.delete(RENDERED).where(RENDERED.c.delivery_key.in_([row.idempotency_key for row in chosen])))
    return _count(conn.execute(sa.delete(DELIVERIES).where(D.id.in_([row.id for row in chosen]))))


def delete_jobs(conn: Connection, cutoff: datetime, limit: int) -> int:
    """Finished jobs go: the inbox, the deliveries and the enrolments hold what they did, and a replay queues a
    new job. Pending, running and dead-lettered jobs stay. (A job is due before it finishes: the claim index
    on (status, due_at) finds them.)"""
    finished = sa.and_(J.status.in_(("done", "cancelled")), J.due_at < cutoff, J.updated_at < cutoff)
    chosen = sa.select(J.id).where(finished).limit(limit)
    return _count(conn.execute(sa.delete(JOBS).where(J.id.in_(chosen.scalar_subquery()))))


def _count(result: sa.CursorResult[tuple[()]]) -> int:
    return int(result.rowcount)


#: Each part's batch, in the order they run: bodies before keys, so a call is blanked before it goes.
BATCHES: dict[str, Callable[[Connection, datetime, int], int]] = {
    "inbox_bodies": prune_bodies,
    "inbox_keys": delete_keys,
    "events": delete_events,
    "decisions": delete_decisions,
    "deliveries": delete_deliveries,
    "jobs": delete_jobs,
}


def cutoffs(periods: Periods, now: datetime) -> dict[str, datetime]:
    """The moment before which each kept-for-a-while part goes; parts kept forever are left out."""
    return {part: now - period for part in PARTS if (period := getattr(periods, part)) is not None}
