"""The jobs table as a durable queue: add, claim with a lease, finish, retry, dead-letter."""

from __future__ import annotations

import json
import os
import random
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import ENROLMENTS, IDENTITIES, INBOX, JOBS, appends, sql

J = JOBS.c
MAX_RETRY_AFTER = 86400.0
#: What a job does: process a stored call, run a journey step, fire a date or inactivity trigger,
#: poll a provider, or run the clock's own work.
KINDS = ("inbox", "step", "trigger", "poll", "tick")
#: The PostgreSQL channel on which a transaction that queued work wakes every replica's worker.
CHANNEL = "declic_jobs"
#: This process, as its notifications say: its own worker wakes without them (see `notify`).
ORIGIN = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
_NOTIFY = sa.text(f"NOTIFY {CHANNEL}, '{ORIGIN}'").execution_options(**{appends.NO_TABLE: True})
#: What a job may be.
STATUSES = ("pending", "running", "done", "dead", "cancelled")


def status_is(status: str, column: sa.ColumnElement[str] = J.status) -> sa.ColumnElement[bool]:
    """`jobs.status = 'pending'` (of `column`, an alias's), the state written into the SQL rather than bound.

    SQLite compares a bound value with the constant of a partial index's WHERE (uq_jobs_pending_key's
    `status = 'pending'`) to know whether the index may serve, and then prepares the statement again each time
    a value is bound, that is on every run: the claim took 150-170 µs in sqlite3 alone, 25 with its states
    written in (docs/performance.md, session 13). A constant is also what PostgreSQL's planner reads best.
    """
    if status not in STATUSES:
        raise ValueError(f"not a job status: {status!r}")
    return column == sa.literal_column(f"'{status}'", J.status.type)


#: How many times work on this connection made a job pending (queued one, or put one back): work that reads the
#: count before and after knows whether it gave a worker something to claim (`pending_made`).
_PENDING_MADE = "declic.pending_made"


def pending_made(conn: Connection) -> int:
    """The count of jobs made pending on this connection so far; compare two readings."""
    count: int = conn.info.get(_PENDING_MADE, 0)
    return count


def _made_pending(conn: Connection) -> None:
    conn.info[_PENDING_MADE] = pending_made(conn) + 1


def notify(conn: Connection) -> None:
    """On PostgreSQL, wake the workers listening (jobs/wakeup.py) once this transaction commits.

    PostgreSQL holds a NOTIFY until the commit (a rolled-back job wakes nobody) and folds repeats within
    one transaction; the flag on the connection spares sending it again. The process that
    queued the work wakes its own worker already (a commit of calls, new steps): its listener skips
    notifications from `ORIGIN`, which would only cost an empty claim. SQLite: one process.
    """
    _made_pending(conn)
    if conn.dialect.name != "postgresql":
        return
    transaction = conn.get_transaction()
    if conn.info.get("declic_notified") is not transaction:
        appends.append(conn, _NOTIFY, {})  # held until the commit anyway: it goes out with the queued rows
        conn.info["declic_notified"] = transaction


@dataclass(frozen=True)
class ClaimedJob:
    id: int
    kind: str
    inbox_id: int | None
    enrolment_id: int | None
    step: int
    due_at: datetime
    attempts: int
    rule: str | None = None
    contact_id: int | None = None
    occurrence: str | None = None
    first_due_at: datetime | None = None
    created_at: datetime | None = None
    failing_since: datetime | None = None

    def retried_too_long(self, now: datetime, retry_for: timedelta, max_attempts: int) -> bool:
        """Whether a job failing now has had its attempts, or its time since it first failed (now, at its first
        failure: a step deferred for days by quiet hours or the pressure cap was waiting, not failing)."""
        return self.attempts >= max_attempts or now - (self.failing_since or now) >= retry_for


def add_step(
    conn: Connection,
    enrolment_id: int,
    step: int,
    due_at: datetime,
    now: datetime,
    priority: int = 0,
    rule: str | None = None,
) -> None:
    """Queue a step: written with the transaction's other queued rows (store/appends.py). Its job names its rule:
    the worker knows the sinks a claimed step is for before it prepares it (jobs/backlog.py)."""
    appends.append(
        conn,
        _INSERT,
        {
            "kind": "step",
            "enrolment_id": enrolment_id,
            "rule": rule,
            "step": step,
            "due_at": due_at,
            "first_due_at": due_at,
            "priority": priority,
            "status": "pending",
            "attempts": 0,
            "created_at": now,
            "updated_at": now,
        },
    )
    notify(conn)


_INSERT = sa.insert(JOBS).inline()  # appended: no id read back (store/appends.py)


def add_next_step(
    conn: Connection,
    finished: ClaimedJob,
    worker: str,
    step: int,
    due_at: datetime,
    now: datetime,
    priority: int = 0,
    rule: str | None = None,
) -> None:
    """Queue the step after `finished`, which this transaction closes with finish_queued: only if this worker
    still held it. Once its lease was taken over, the new holder moves the journey on (it finds the delivery
    recorded); a next step queued by both would be two jobs, each sending it."""
    row = {"job_id": finished.id, "worker": worker, "enrolment_id": finished.enrolment_id, "step": step}
    appends.append(conn, _INSERT_NEXT, {**row, "rule": rule, "due_at": due_at, "priority": priority, "now": now})
    notify(conn)


_INSERT_NEXT = sa.insert(JOBS).from_select(
    [
        "kind",
        "enrolment_id",
        "rule",
        "step",
        "due_at",
        "first_due_at",
        "priority",
        "status",
        "attempts",
        "created_at",
        "updated_at",
    ],
    sa.select(
        sa.literal("step"),
        sa.bindparam("enrolment_id", type_=J.enrolment_id.type),
        sa.bindparam("rule", type_=J.rule.type),
        sa.bindparam("step", type_=J.step.type),
        sa.bindparam("due_at", type_=J.due_at.type),
        sa.bindparam("due_at", type_=J.due_at.type),
        sa.bindparam("priority", type_=J.priority.type),
        sa.literal("pending"),
        sa.literal(0),
        sa.bindparam("now", type_=J.created_at.type),
        sa.bindparam("now", type_=J.created_at.type),
    ).where(  # finish_queued's row, written before this one (store/appends.py writes statements in order)
        sa.exists().where(J.id == sa.bindparam("job_id"), J.locked_by == sa.bindparam("worker"), status_is("done"))
    ),
)


#: How long an unprocessed call holds back the steps due after it arrived, unless the worker says.
ORDERING_TIMEOUT = timedelta(minutes=5)
#: Contacts held back one by one at most; calls about more count as about everyone (safe, coarser).
MAX_HELD_CONTACTS = 100


@dataclass(frozen=True)
class WaitingCall:
    """A call still to be processed, and whom it may be about: None for anyone."""

    inbox_id: int
    arrived: datetime
    contacts: frozenset[int] | None

    def holds(self, due_at: datetime, contact_id: int | None) -> bool:
        return self.arrived < due_at and (self.contacts is None or contact_id in self.contacts)


def claim(
    conn: Connection,
    worker: str,
    now: datetime,
    lease: timedelta,
    limit: int,
    ordering_timeout: timedelta = ORDERING_TIMEOUT,
) -> list[ClaimedJob]:
    """Take up to `limit` due jobs, and jobs whose holder's lease ran out, for this worker.

    A step does not overtake a call received before it was due that may be about its contact:
    while such a call waits to be processed, the step waits too, so an unsubscribe or an order
    lands first. A call never tried yet may be about anyone, and holds every step (also after
    downtime: the backlog goes first). A call tried and waiting for a retry holds only the
    contacts its source says it is about (`Source.about`), or everyone when it cannot tell, and
    only for `ordering_timeout` after it arrived: then the steps go ahead (see `overdue_calls`).
    """
    cutoff = now - ordering_timeout
    in_order = [
        sa.not_(sa.and_(J.due_at >= arrived, _of_contact(contact_id)))
        for contact_id, arrived in _held_contacts(conn, cutoff).items()
    ]
    pg = conn.dialect.name == "postgresql"
    calls = not pg or _calls_turn(conn)
    # Nobody held (the usual case): a statement built once, so SQLAlchemy's compiled cache serves it.
    if in_order:
        statement = _claim_statement(in_order, skip_locked=pg, calls=calls)
    else:
        statement = (_CLAIM_PG if calls else _CLAIM_PG_NO_CALLS) if pg else _CLAIM
    values = {"now": now, "cutoff": cutoff, "limit": limit, "worker": worker, "until": now + lease}
    claimed = sorted(conn.execute(statement, values), key=lambda row: (row.due_at, -row.priority, row.id))
    return [ClaimedJob(*row[:-1]) for row in claimed]


_NOW = sa.bindparam("now", type_=J.due_at.type)
_CUTOFF = sa.bindparam("cutoff", type_=J.created_at.type)


def _tried(cutoff: sa.ColumnElement[datetime]) -> sa.ColumnElement[bool]:
    """A call tried before and still unprocessed, that arrived before the cutoff."""
    retried = sa.or_(sa.and_(status_is("pending"), J.attempts > 0), sa.and_(status_is("running"), J.attempts > 1))
    return sa.and_(J.kind == "inbox", retried, J.created_at < cutoff)


#: The states of a call still to be processed. Each is asked with `status = ...`, never `IN`: with the IN,
#: PostgreSQL may read ix_jobs_backlog by kind alone and filter out every processed call still kept, on each
#: claim (seen before a table's first ANALYZE: 1.2-1.5 ms per subquery with 3,000 calls; docs/performance.md).
_OPEN = ("pending", "running")


def _waiting(*columns: sa.ColumnElement[Any], where: sa.ColumnElement[bool]) -> sa.Subquery:
    """`columns` of the calls still to be processed that hold steps back and match `where`: one SELECT per
    state of _OPEN, as one subquery."""
    return sa.union_all(
        *(
            sa.select(*columns).where(J.kind == "inbox", status_is(status), sa.not_(_tried(_CUTOFF)), where)
            for status in _OPEN
        )
    ).subquery()


#: The advisory lock a claim of calls takes on PostgreSQL (see `_calls_turn`).
CALLS_LOCK = 0x6465636C6963_01  # "declic", 1


def _calls_turn(conn: Connection) -> bool:
    """Whether this claim may take calls, on PostgreSQL, where replicas share the queue.

    Calls are applied in the order they arrived, across replicas: one replica at a time holds calls,
    and it applies them in order (`Worker._apply_ready`). A claim takes calls only under an advisory lock,
    which makes "no other replica holds calls" and "take them" one step; a replica that does not get
    the lock at once claims steps only this time, and never waits for it.
    """
    return bool(conn.execute(_TRY_CALLS_LOCK).scalar())


_TRY_CALLS_LOCK = sa.select(sa.func.pg_try_advisory_xact_lock(CALLS_LOCK))


def _claim_statement(
    in_order: list[sa.ColumnElement[bool]], skip_locked: bool = False, calls: bool = True
) -> sa.Update:
    """UPDATE ... RETURNING of the claim; `in_order` holds back the steps of the contacts held by a call.

    On PostgreSQL (`skip_locked`), calls are taken only while no other worker holds calls on a live
    lease, and, with `calls` False, not at all (see `_calls_turn`). This runs in a statement after the
    lock's: its snapshot sees the calls the last holder of the lock claimed.
    """
    due = sa.or_(
        sa.and_(status_is("pending"), J.due_at <= _NOW),
        sa.and_(status_is("running"), J.locked_until < _NOW),
    )
    firsts = _waiting(sa.func.min(J.created_at).label("at"), where=J.about.is_(None))
    anyone = sa.select(sa.func.min(firsts.c.at)).scalar_subquery()
    call = J.kind == "inbox"
    if skip_locked:
        others = JOBS.alias("others")
        held_elsewhere = sa.exists().where(
            others.c.kind == "inbox",
            status_is("running", others.c.status),
            others.c.locked_by != sa.bindparam("worker"),
            others.c.locked_until >= _NOW,
        )
        call = sa.and_(call, sa.not_(held_elsewhere)) if calls else sa.false()
    # Among steps due at the same moment (freed by the pressure cap), the rule's priority decides; among the
    # calls of one group commit (one due_at), arrival: a claim that takes some must take the first ones. Without
    # the id, PostgreSQL returns ties in the order it finds the rows, which drifts as the table is rewritten.
    candidates = (
        sa.select(J.id)
        .where(due, sa.or_(call, sa.and_(J.kind != "inbox", sa.or_(anyone.is_(None), J.due_at < anyone), *in_order)))
        .order_by(J.due_at, J.priority.desc(), J.id)
        .limit(sa.bindparam("limit", type_=sa.Integer))
    )
    if skip_locked:
        # Two replicas never claim the same row, and neither waits for the other's locks.
        candidates = candidates.with_for_update(skip_locked=True)
    return (
        sa.update(JOBS)
        .where(J.id.in_(candidates.scalar_subquery()))
        .values(
            status="running",
            locked_by=sa.bindparam("worker"),
            locked_until=sa.bindparam("until", type_=J.locked_until.type),
            attempts=J.attempts + 1,
            updated_at=_NOW,
        )
        .returning(
            J.id,
            J.kind,
            J.inbox_id,
            J.enrolment_id,
            J.step,
            J.due_at,
            J.attempts,
            J.rule,
            J.contact_id,
            J.occurrence,
            J.first_due_at,
            J.created_at,
            J.failing_since,
            J.priority,
        )
    )


_CLAIM = _claim_statement([])
_CLAIM_PG = _claim_statement([], skip_locked=True)
_CLAIM_PG_NO_CALLS = _claim_statement([], skip_locked=True, calls=False)


def _held_contacts(conn: Connection, cutoff: datetime) -> dict[int, datetime]:
    """Contact id -> arrival of the oldest waiting call about them, for calls that said whom."""
    held: dict[int, datetime] = {}
    for row in conn.execute(_HELD_CALLS, {"cutoff": cutoff}).all():
        for contact_id in _contacts(conn, row.about):
            held.setdefault(contact_id, row.created_at)
    return held


_SAYING_WHOM = _waiting(J.created_at, J.about, where=J.about.is_not(None))
_HELD_CALLS = (
    sa.select(_SAYING_WHOM.c.created_at, _SAYING_WHOM.c.about)
    .order_by(_SAYING_WHOM.c.created_at)
    .limit(MAX_HELD_CONTACTS)
)


def _contacts(conn: Connection, about: str) -> frozenset[int]:
    """The existing contacts a call's identities name."""
    keys = [tuple(pair) for pair in json.loads(about)]
    if not keys:
        return frozenset()
    found = conn.execute(
        sa.select(IDENTITIES.c.contact_id).where(sa.tuple_(IDENTITIES.c.kind, IDENTITIES.c.value).in_(keys))
    )
    return frozenset(found.scalars())


def _of_contact(contact_id: int) -> sa.ColumnElement[bool]:
    """A step of one of the contact's journeys, or a trigger about them (never NULL: NOT must hold)."""
    journeys = sa.select(ENROLMENTS.c.id).where(ENROLMENTS.c.contact_id == contact_id)
    return sa.or_(
        sa.and_(J.enrolment_id.is_not(None), J.enrolment_id.in_(journeys)),
        sa.and_(J.contact_id.is_not(None), J.contact_id == contact_id),
    )


def overdue_calls(conn: Connection, cutoff: datetime, limit: int = MAX_HELD_CONTACTS) -> list[WaitingCall]:
    """The oldest calls that no longer hold steps back (see `claim`), and whom they are about."""
    rows = conn.execute(_OVERDUE, {"cutoff": cutoff, "limit": limit})
    return [
        WaitingCall(row.inbox_id, row.created_at, None if row.about is None else _contacts(conn, row.about))
        for row in rows
    ]


_OVERDUE = (
    sa.select(J.inbox_id, J.created_at, J.about)
    .where(_tried(_CUTOFF), status_is("pending"))
    .order_by(J.created_at)
    .limit(sa.bindparam("limit", type_=sa.Integer))
)


def next_due(conn: Connection, after_claim: datetime | None = None) -> datetime | None:
    """When the earliest pending job is due.

    `after_claim` (the claim's `now`), on PostgreSQL: only jobs due after it. What was due then and the
    claim left is another replica's to take (calls while it holds the calls turn, `_calls_turn`) or held
    back by calls (`claim`); a worker that counted them as due would claim again every few milliseconds
    for nothing. It hears when they are free: applying calls queues steps, which notifies (`notify`),
    and `worker.poll_interval` remains the fallback.
    """
    if after_claim is not None and conn.dialect.name == "postgresql":
        due: datetime | None = conn.execute(_NEXT_DUE_LATER, {"now": after_claim}).scalar()
    else:
        due = conn.execute(_NEXT_DUE).scalar()
    return due


_NEXT_DUE = sa.select(sa.func.min(J.due_at)).where(status_is("pending"))
_NEXT_DUE_LATER = _NEXT_DUE.where(J.due_at > _NOW)


def sweep_claim_index(conn: Connection, now: datetime) -> None:
    """PostgreSQL: read the ranges of `ix_jobs_claim` that claims read, in plain index scans, so that the entries
    left by jobs since processed are marked dead and every claim after skips them.

    Each job leaves an entry there for each state it passed through, until a VACUUM, which on a large `jobs` table
    comes days apart. The claim reads the index by bitmap scans (PostgreSQL's choice, whatever the statement's
    shape), which visit those entries and their rows again on every claim and never mark them: 20 ms a claim
    after 300,000 jobs, 43 ms after 500,000. A plain index scan marks each entry whose row is gone for good, and
    bitmap scans skip marked entries (docs/performance.md, session 15). The worker sweeps every SWEEP_EVERY."""
    for statement in _SWEEP:
        conn.execute(statement, {"now": now})


#: Seconds between a worker's sweeps of the claim's index on PostgreSQL (`sweep_claim_index`).
SWEEP_EVERY = 60.0
_SWEEP = (
    sa.text("SET LOCAL enable_bitmapscan = off"),
    sa.text("SET LOCAL enable_seqscan = off"),
    # count(attempts), a column the index lacks: a plain index scan, which visits the rows, not an index-only one.
    sa.select(sa.func.count(J.attempts)).where(status_is("pending"), J.due_at <= _NOW),
    sa.select(sa.func.count(J.attempts)).where(status_is("running")),
)


def renew(conn: Connection, job_ids: list[int], worker: str, until: datetime) -> None:
    conn.execute(
        sa.update(JOBS).where(J.id.in_(job_ids), J.locked_by == worker, status_is("running")).values(locked_until=until)
    )


def finish(
    conn: Connection, job: ClaimedJob, worker: str, now: datetime, status: str = "done", error: str | None = None
) -> bool:
    """Close a claimed job; False when this worker no longer held it (its lease was taken over)."""
    result = conn.execute(
        _FINISH, {"job_id": job.id, "worker": worker, "new_status": status, "error": error, "now": now}
    )
    return result.rowcount == 1


def finished_by(conn: Connection, job: ClaimedJob, worker: str) -> bool:
    """Whether `worker` closed the job (done, dead or cancelled; not put back in the queue)."""
    found = conn.execute(_FINISHED_BY, {"job_id": job.id, "worker": worker}).first()
    return found is not None


_FINISHED_BY = sa.select(J.id).where(
    J.id == sa.bindparam("job_id"),
    J.locked_by == sa.bindparam("worker"),
    sa.or_(*(status_is(closed) for closed in ("done", "dead", "cancelled"))),
)


def finish_queued(conn: Connection, job: ClaimedJob, worker: str, now: datetime) -> None:
    """finish() as done, written with the transaction's other queued rows: for a caller that does not need to
    know whether it still held the job: a step whose outcome is recorded (a later claim sees the delivery; what
    follows it is queued only if this worker held it, `add_next_step`), calls marked processed (a later claim
    finds nothing left to do)."""
    appends.append(conn, _FINISH, {"job_id": job.id, "worker": worker, "new_status": "done", "error": None, "now": now})


#: Only while this worker holds the job: after a lost lease, another worker owns it.
_HELD = sa.and_(J.id == sa.bindparam("job_id"), J.locked_by == sa.bindparam("worker"), status_is("running"))
_FINISH = (
    sa.update(JOBS)
    .where(_HELD)
    .values(
        status=sa.bindparam("new_status"),
        locked_until=None,
        about=None,
        last_error=sa.bindparam("error"),
        updated_at=sa.bindparam("now"),
    )
)


def reschedule(
    conn: Connection,
    job: ClaimedJob,
    worker: str,
    due_at: datetime,
    now: datetime,
    error: str,
    about: list[tuple[str, str]] | None = None,
) -> bool:
    """Put a job that failed back until `due_at`; a call may say whom it is about (see `claim`). Its first failure
    is kept (`failing_since`, for `retry_for`); a job that had no `first_due_at` (only steps are given one) keeps
    the due date it failed at there."""
    _made_pending(conn)
    values = {"job_id": job.id, "worker": worker, "due": due_at, "error": error, "now": now}
    statement = _RESCHEDULE if about is None else _RESCHEDULE.values(about=json.dumps(about))
    return conn.execute(statement, values).rowcount == 1


_PUT_BACK = (
    sa.update(JOBS)
    .where(_HELD)
    .values(
        status="pending",
        due_at=sa.bindparam("due"),
        locked_until=None,
        locked_by=None,
        last_error=sa.bindparam("error"),
        updated_at=sa.bindparam("now"),
        first_due_at=sa.func.coalesce(J.first_due_at, J.due_at),  # the due date before this statement's
    )
)
_RESCHEDULE = _PUT_BACK.values(
    failing_since=sa.func.coalesce(J.failing_since, sa.bindparam("now", type_=J.due_at.type))
)


def cancel_pending(conn: Connection, enrolment_ids: list[int], now: datetime) -> list[tuple[int, int]]:
    """Cancel the journeys' pending steps; return (enrolment id, step) for each."""
    rows = conn.execute(
        sa.update(JOBS)
        .where(J.enrolment_id.in_(enrolment_ids), status_is("pending"))
        .values(status="cancelled", updated_at=now)
        .returning(J.enrolment_id, J.step)
    )
    return [(row.enrolment_id, row.step) for row in rows]


def defer(
    conn: Connection, job: ClaimedJob, worker: str, until: datetime, now: datetime, reason: str, afresh: bool = False
) -> bool:
    """Put a step back until `until` without spending an attempt: waiting is not failing. `afresh`: its failures
    so far no longer count (it falls back to another channel)."""
    _made_pending(conn)
    values = {"job_id": job.id, "worker": worker, "due": until, "error": reason, "now": now}
    return conn.execute(_DEFER_AFRESH if afresh else _DEFER, values).rowcount == 1


_DEFER = _PUT_BACK.values(attempts=J.attempts - 1)
_DEFER_AFRESH = _DEFER.values(failing_since=None)


def retry_delay(
    attempt: int, base: timedelta, cap: timedelta, retry_after: float | None = None, rng: random.Random | None = None
) -> timedelta:
    """Exponential backoff with jitter; a provider's Retry-After wins when it asks for longer."""
    ceiling = min(cap.total_seconds(), base.total_seconds() * 2 ** min(max(attempt - 1, 0), 30))
    delay = ceiling * (rng or random).uniform(0.5, 1.0)
    # A provider's Retry-After wins when longer, up to a day: a typo'd header must not park a job for years.
    return timedelta(seconds=max(delay, min(retry_after or 0.0, MAX_RETRY_AFTER)))


#: In a dead job's error, a message that went out though the database refused its record (`Worker.record_send`):
#: nothing else knows it was sent, so a replay would send it again.
WENT_OUT = "(the message went out)"


def requeue(conn: Connection, job_ids: list[int] | None, now: datetime, resend: bool = False) -> list[int]:
    """Put dead-lettered jobs back in the queue with a fresh attempt budget; the ids queued. A job whose message
    went out is left where it is unless `resend` says to send it again."""
    where = _dead(job_ids) if resend else sa.and_(_dead(job_ids), sa.not_(_WENT_OUT))
    fresh = {"status": "pending", "attempts": 0, "due_at": now, "locked_by": None, "locked_until": None}
    queued = conn.execute(
        sa.update(JOBS).where(where).values(**fresh, failing_since=None, updated_at=now).returning(J.id)
    )
    notify(conn)
    return sorted(queued.scalars())


def went_out(conn: Connection, job_ids: list[int] | None) -> list[int]:
    """The dead jobs among `job_ids` (all with None) that `requeue` leaves unless told to resend."""
    return list(conn.execute(sa.select(J.id).where(_dead(job_ids), _WENT_OUT).order_by(J.id)).scalars())


def _dead(job_ids: list[int] | None) -> sa.ColumnElement[bool]:
    """The dead-lettered jobs among `job_ids` (all with None)."""
    return status_is("dead") if job_ids is None else sa.and_(status_is("dead"), J.id.in_(job_ids))


_WENT_OUT = sa.func.coalesce(J.last_error, "").contains(WENT_OUT, autoescape=True)


def add_inbox_jobs(conn: Connection, inbox_ids: list[int], now: datetime) -> None:
    """One job per stored call, in one INSERT ... SELECT: the timestamps are bound once, not per row."""
    conn.execute(_ADD_INBOX_JOBS, {"ids": inbox_ids, "now": now})
    notify(conn)


def _inbox_jobs(**values: Any) -> sa.Insert:
    """INSERT ... SELECT of one job per stored call (`ids`), due `now`, with `values` for its other columns."""
    columns = {"kind": sa.literal("inbox"), "inbox_id": INBOX.c.id, "step": sa.literal(0), "due_at": _NOW}
    columns |= values | {"created_at": _NOW, "updated_at": _NOW}
    rows = sa.select(*columns.values()).where(INBOX.c.id.in_(sa.bindparam("ids", expanding=True)))
    # Job ids in the calls' order: the claim takes the calls of one commit by job id.
    return sa.insert(JOBS).from_select(list(columns), rows.order_by(INBOX.c.id))


_ADD_INBOX_JOBS = _inbox_jobs(status=sa.literal("pending"), attempts=sa.literal(0))


def call_waiting(conn: Connection, now: datetime) -> bool:
    """Whether a stored call is due and not claimed yet: calls stored after it wait behind it."""
    return conn.execute(_CALL_WAITING, {"now": now}).first() is not None


_CALL_WAITING = sa.select(J.id).where(J.kind == "inbox", status_is("pending"), J.due_at <= _NOW).limit(1)


def add_taken_inbox_jobs(
    conn: Connection, inbox_ids: list[int], worker: str, until: datetime, now: datetime
) -> list[ClaimedJob]:
    """Jobs for stored calls that `worker` takes in the transaction storing them: written as its claim would leave
    them (running, its lease, a first attempt), so that no claim of its own is needed."""
    values = {"ids": inbox_ids, "now": now, "worker": worker, "until": until}
    taken = [
        ClaimedJob(row.id, "inbox", row.inbox_id, None, 0, now, 1, created_at=now)
        for row in conn.execute(_ADD_TAKEN_INBOX_JOBS, values)
    ]
    return sorted(taken, key=lambda job: job.inbox_id or 0)


_ADD_TAKEN_INBOX_JOBS = _inbox_jobs(
    status=sa.literal("running"),
    attempts=sa.literal(1),
    locked_by=sa.bindparam("worker", type_=J.locked_by.type),
    locked_until=sa.bindparam("until", type_=J.locked_until.type),
).returning(J.id, J.inbox_id)


def add_unique(conn: Connection, kind: str, key: str, occurrence: str, due: datetime, now: datetime) -> None:
    """Queue a clock job (`poll`, `tick`) unless one with the same key is pending or running: once,
    whatever the replicas (`uq_jobs_clock_key`). A job that queues its own next run finishes first."""
    insert = sql.insert(conn.dialect.name, JOBS)
    conn.execute(
        insert.values(
            kind=kind,
            key=key,
            occurrence=occurrence,
            step=0,
            due_at=due,
            status="pending",
            attempts=0,
            created_at=now,
            updated_at=now,
        ).on_conflict_do_nothing()  # whichever unique index the key meets
    )
    notify(conn)


def add_tick(conn: Connection, name: str, now: datetime) -> None:
    """A one-off maintenance job (e.g. `reconcile`)."""
    add_unique(conn, "tick", f"tick:{name}", name, now, now)


def release(conn: Connection, job_ids: list[int], worker: str, now: datetime) -> int:
    """Claimed jobs that this worker will not run after all (it is stopping) back to the queue at once, their
    attempt not counted; those it finished meanwhile stay finished."""
    released = conn.execute(
        sa.update(JOBS)
        .where(J.id.in_(job_ids), J.locked_by == worker, status_is("running"))
        .values(status="pending", locked_by=None, locked_until=None, attempts=J.attempts - 1, updated_at=now)
    ).rowcount
    if released:
        notify(conn)
    return released


def release_orphans(conn: Connection, now: datetime) -> int:
    """On a single-process SQLite deployment, a job still `running` at start-up lost its worker."""
    result = conn.execute(
        sa.update(JOBS)
        .where(status_is("running"))
        .values(status="pending", locked_by=None, locked_until=None, updated_at=now)
    )
    return result.rowcount
