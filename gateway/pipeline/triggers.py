"""Triggers that are not one event: contact dates, inactivity and lead-score thresholds.

Each pending date or inactivity trigger is one row in `jobs` (kind `trigger`) due when it
should fire, keyed so that it exists at most once per (rule, contact). Contacts' changes and
activity move those rows; nothing scans all contacts every minute. A `reconcile` job at
start-up schedules what a config change added (a new date rule, a new time zone).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection

from ..config import RuleSpec
from ..store import CONTACTS, ENROLMENTS, EVENTS, JOBS, jobqueue, jsoncodec, sql

log = structlog.get_logger("declic.triggers")
J = JOBS.c


def zone_of(contact: dict[str, Any], default: str) -> ZoneInfo:
    try:
        return ZoneInfo(contact.get("timezone") or default)
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo(default)


def parse_date(value: Any, zone: ZoneInfo | None = None) -> date | None:
    """A contact date as sources send it: 1990-02-28, a date, or a date-time. A date-time with an offset
    (2026-06-02T01:00:00Z) falls on the day it is in `zone`, the contact's: 1 June in New York."""
    if isinstance(value, str) and len(value) > 10:
        with contextlib.suppress(ValueError):  # "1990-02-28 (approx.)": the date it starts with, as before
            value = datetime.fromisoformat(value)
    if isinstance(value, datetime):
        return value.astimezone(zone).date() if value.tzinfo and zone else value.date()
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(str(value)[:10])
    except ValueError:
        return None


def in_year(day: date, year: int) -> date:
    """The same day in another year; 29 February falls on the 28th when the year has none."""
    try:
        return day.replace(year=year)
    except ValueError:
        return day.replace(year=year, day=28)


@dataclass(frozen=True)
class Occurrence:
    day: date  # the date the rule is about (the birthday of that year, the trial end)
    fire_at: datetime  # UTC
    event_id: str | None = None  # the event that carried the date, for a date rule on event.properties

    @property
    def key(self) -> str:
        """The enrolment's occurrence: once per date, and per event when an event carried it."""
        return f"date:{self.day.isoformat()}" + (f"@{self.event_id}" if self.event_id else "")


def occurrences(rule: RuleSpec, value: date, zone: ZoneInfo, around: datetime) -> list[Occurrence]:
    """Candidate firings near `around`: three years for yearly rules, the one date otherwise."""
    days = [in_year(value, year) for year in range(around.year - 1, around.year + 2)] if rule.yearly else [value]
    found = []
    for day in days:
        try:
            local = datetime.combine(day, rule.at, tzinfo=zone) + rule.offset
            found.append(Occurrence(day, local.astimezone(UTC)))
        except OverflowError:  # a date such as 0001-01-01 shifted before year 1: no such moment
            continue
    return sorted(found, key=lambda o: o.fire_at)


def next_occurrence(
    conn: Connection, rule: RuleSpec, contact: dict[str, Any], default_zone: str, now: datetime
) -> Occurrence | None:
    """The first firing not older than `catch_up` and not already enrolled."""
    if rule.date_from_event:
        return _next_of_events(conn, rule, contact, default_zone, now)
    zone = zone_of(contact, default_zone)
    value = parse_date(contact.get("attributes", {}).get(rule.date_attribute), zone)
    if value is None:
        return None
    done = set(conn.execute(_ENROLLED, {"rule": rule.name, "contact_id": contact["id"]}).scalars())
    for occurrence in occurrences(rule, value, zone, now):
        if occurrence.fire_at >= now - rule.catch_up and occurrence.key not in done:
            return occurrence
    return None


def _next_of_events(
    conn: Connection, rule: RuleSpec, contact: dict[str, Any], default_zone: str, now: datetime
) -> Occurrence | None:
    """The soonest firing to come among the dates the contact's events carry (for previews and plans)."""
    rows = conn.execute(
        sa.select(EVENTS.c.id, EVENTS.c.properties).where(
            EVENTS.c.contact_id == contact["id"], EVENTS.c.type.in_(rule.of)
        )
    )
    found = [
        next_event_occurrence(conn, rule, contact, row.id, jsoncodec.loads(row.properties), default_zone, now)
        for row in rows
    ]
    coming = [o for o in found if o is not None and o.fire_at >= now - rule.catch_up]
    return min(coming, key=lambda o: o.fire_at) if coming else None


def schedule_date(conn: Connection, rule: RuleSpec, contact: dict[str, Any], default_zone: str, now: datetime) -> None:
    """Put the contact's next firing of a date rule in the queue, replacing an outdated one."""
    occurrence = next_occurrence(conn, rule, contact, default_zone, now)
    key = f"date:{rule.name}:{contact['id']}"
    if occurrence is None:
        _cancel(conn, key, now)
        return
    _put(conn, key, rule, contact["id"], occurrence.key, occurrence.fire_at, now)


def next_event_occurrence(
    conn: Connection,
    rule: RuleSpec,
    contact: dict[str, Any],
    event_id: str,
    properties: dict[str, Any],
    default_zone: str,
    now: datetime,
) -> Occurrence | None:
    """The firing a date carried by an event calls for, keyed by that event; None without a date or once done.

    A moment past by more than `catch_up` is returned all the same (so due at once): firing it journals
    why it was skipped, where dropping it would leave no trace.
    """
    zone = zone_of(contact, default_zone)
    value = parse_date(property_at(properties, rule.date_property), zone)
    if value is None:
        return None
    done = set(conn.execute(_ENROLLED, {"rule": rule.name, "contact_id": contact["id"]}).scalars())
    found = [Occurrence(o.day, o.fire_at, event_id) for o in occurrences(rule, value, zone, now)]
    found = [o for o in found if o.key not in done]
    coming = [o for o in found if o.fire_at >= now - rule.catch_up]
    return coming[0] if coming else (found[-1] if found else None)


def schedule_event_date(
    conn: Connection,
    rule: RuleSpec,
    contact: dict[str, Any],
    event_id: str,
    properties: dict[str, Any],
    default_zone: str,
    now: datetime,
) -> bool:
    """Queue the firing for a date an event carries (a ticket's event start, minus a day); False when the
    event carries no date there. One pending trigger per (rule, contact, event): two tickets for two
    concerts are two reminders, a redelivered event is the same one."""
    if parse_date(property_at(properties, rule.date_property)) is None:
        return False
    occurrence = next_event_occurrence(conn, rule, contact, event_id, properties, default_zone, now)
    if occurrence is not None:
        key = f"date:{rule.name}:{contact['id']}:{event_id}"
        _put(conn, key, rule, contact["id"], occurrence.key, occurrence.fire_at, now)
    return True


def property_at(properties: dict[str, Any], path: tuple[str, ...]) -> Any:
    """properties["venue"]["opens_at"] for ("venue", "opens_at"); None when any part is missing."""
    value: Any = properties
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def event_date_occurrence(occurrence: str) -> tuple[str, str | None]:
    """`date:2026-12-10@E1` -> ("2026-12-10", "E1"); a contact date has no event: ("1990-02-28", None)."""
    day, _, event_id = occurrence.removeprefix("date:").partition("@")
    return day, event_id or None


def arm_inactivity(
    conn: Connection, rule: RuleSpec, contact_id: int, event_id: str, base: datetime, now: datetime
) -> None:
    """Each activity restarts the countdown: one firing per period of inactivity (more with repeat_every)."""
    assert rule.inactive_for is not None
    period = f"inactive-since:{event_id}"
    _put(conn, _inactive_key(rule, contact_id), rule, contact_id, period, base + rule.inactive_for, now)


def inactivity_period(occurrence: str) -> tuple[str, int]:
    """`inactive-since:E1#3` -> (`inactive-since:E1`, 3): the period of inactivity and which firing in it."""
    period, _, times = occurrence.partition("#")
    return period, int(times) if times.isdigit() else 1


def repeat_inactivity(
    conn: Connection, rule: RuleSpec, contact_id: int, occurrence: str, due: datetime, now: datetime
) -> None:
    """After a firing, schedule the next one of the same period, while `max_times` allows.

    The next occurrence is a new key for the enrolment (`...#2`), so a firing can never be doubled; it
    is added only when no trigger is pending, as new activity may already have started a new period.
    """
    if rule.repeat_every is None:
        return
    period, times = inactivity_period(occurrence)
    if rule.max_times is not None and times >= rule.max_times:
        return
    # On schedule from the firing that was due; after a long downtime, one interval from now (not a burst).
    following = due + rule.repeat_every if due + rule.repeat_every > now else now + rule.repeat_every
    row = _row(_inactive_key(rule, contact_id), rule, contact_id, f"{period}#{times + 1}", following, now)
    conn.execute(_insert_once(conn.dialect.name), row)


def skip_inactivity_before(conn: Connection, rule: RuleSpec, moment: datetime) -> int:
    """Move each pending trigger of this inactivity rule that fell due before `moment` to its first
    firing at or after it (a repeat of the same period), or drop it when no firing is left; returns how
    many were dropped. For `declic backtest`: the firings before its period happened in the live
    deployment, whose journeys the backtest does not copy, and must not all fire at its start."""
    dropped = 0
    rows = conn.execute(
        sa.select(J.id, J.due_at, J.occurrence).where(
            J.kind == "trigger", J.rule == rule.name, jobqueue.status_is("pending"), J.due_at < moment
        )
    ).all()
    for job_id, due, occurrence in rows:
        period, times = inactivity_period(occurrence)
        while due < moment and rule.repeat_every is not None and (rule.max_times is None or times < rule.max_times):
            due, times = due + rule.repeat_every, times + 1
        if due < moment:
            conn.execute(sa.delete(JOBS).where(J.id == job_id))
            dropped += 1
        else:
            following = period if times == 1 else f"{period}#{times}"
            conn.execute(_MOVE, {"job_id": job_id, "due": due, "occurrence": following, "now": moment})
    return dropped


def _inactive_key(rule: RuleSpec, contact_id: int) -> str:
    return f"inactive:{rule.name}:{contact_id}"


def _put(
    conn: Connection, key: str, rule: RuleSpec, contact_id: int, occurrence: str, due: datetime, now: datetime
) -> None:
    current = conn.execute(_PENDING, {"key": key}).first()
    if current is not None:
        if "#" in current.occurrence and inactivity_period(current.occurrence)[0] == occurrence:
            return  # a reconcile re-arming a period of inactivity whose repeats are under way: they go on
        if (current.due_at, current.occurrence) != (due, occurrence):
            conn.execute(_MOVE, {"job_id": current.id, "due": due, "occurrence": occurrence, "now": now})
        return
    conn.execute(_insert_once(conn.dialect.name), _row(key, rule, contact_id, occurrence, due, now))


def _row(key: str, rule: RuleSpec, contact_id: int, occurrence: str, due: datetime, now: datetime) -> dict[str, Any]:
    return {
        "kind": "trigger",
        "rule": rule.name,
        "contact_id": contact_id,
        "key": key,
        "occurrence": occurrence,
        "due_at": due,
        "status": "pending",
        "attempts": 0,
        "priority": rule.priority,
        "created_at": now,
        "updated_at": now,
    }


# Built once: the start-up reconcile runs these for every (date rule, contact).
_ENROLLED = sa.select(ENROLMENTS.c.occurrence).where(
    ENROLMENTS.c.rule == sa.bindparam("rule"), ENROLMENTS.c.contact_id == sa.bindparam("contact_id")
)
_PENDING = sa.select(J.id, J.due_at, J.occurrence).where(J.key == sa.bindparam("key"), jobqueue.status_is("pending"))
_MOVE = (
    sa.update(JOBS)
    .where(J.id == sa.bindparam("job_id"))
    .values(due_at=sa.bindparam("due"), occurrence=sa.bindparam("occurrence"), updated_at=sa.bindparam("now"))
)


@functools.cache
def _insert_once(dialect: str) -> sa.Insert:
    """An INSERT that does nothing when a pending job with the same key exists (another replica's)."""
    return sql.insert(dialect, JOBS).on_conflict_do_nothing(index_elements=["key"], index_where=J.status == "pending")


def _cancel(conn: Connection, key: str, now: datetime) -> None:
    conn.execute(
        sa.update(JOBS).where(J.key == key, jobqueue.status_is("pending")).values(status="cancelled", updated_at=now)
    )


def decayed(score: float, since: datetime | None, now: datetime, half_life: timedelta | None) -> float:
    if since is None or half_life is None or score == 0:
        return score
    return score * 0.5 ** ((now - since) / half_life)


def add_points(
    conn: Connection, contact_id: int, points: float, half_life: timedelta | None, now: datetime
) -> tuple[float, float]:
    """Decay the stored score to `now`, add the points; return (before, after)."""
    row = conn.execute(sa.select(CONTACTS.c.score, CONTACTS.c.score_at).where(CONTACTS.c.id == contact_id)).one()
    before = decayed(row.score, row.score_at, now, half_life)
    after = before + points
    conn.execute(sa.update(CONTACTS).where(CONTACTS.c.id == contact_id).values(score=after, score_at=now))
    return before, after


def contacts_with(conn: Connection, attribute: str) -> list[dict[str, Any]]:
    """Contacts whose attributes mention `attribute` (a text pre-filter, checked after decoding)."""
    rows = conn.execute(
        sa.select(CONTACTS.c.id, CONTACTS.c.attributes, CONTACTS.c.timezone).where(
            CONTACTS.c.attributes.contains(f'"{attribute}"')
        )
    )
    found = []
    for row in rows:
        attributes = jsoncodec.loads(row.attributes)
        if attribute in attributes:
            found.append({"id": row.id, "attributes": attributes, "timezone": row.timezone})
    return found


def events_carrying(conn: Connection, types: list[str]) -> list[tuple[int, str, dict[str, Any]]]:
    """Stored events of these types: (contact_id, event_id, properties), for a new date rule on them."""
    rows = conn.execute(
        sa.select(EVENTS.c.contact_id, EVENTS.c.id, EVENTS.c.properties).where(EVENTS.c.type.in_(types))
    )
    return [(row.contact_id, row.id, jsoncodec.loads(row.properties)) for row in rows]


def last_activity(conn: Connection, types: list[str]) -> list[tuple[int, str, datetime]]:
    """Per contact, its latest event of these types: (contact_id, event_id, occurred_at)."""
    latest = (
        sa.select(EVENTS.c.contact_id, sa.func.max(EVENTS.c.occurred_at).label("at"))
        .where(EVENTS.c.type.in_(types))
        .group_by(EVENTS.c.contact_id)
        .subquery()
    )
    rows = conn.execute(
        sa.select(EVENTS.c.contact_id, sa.func.max(EVENTS.c.id), latest.c.at)
        .join(latest, sa.and_(EVENTS.c.contact_id == latest.c.contact_id, EVENTS.c.occurred_at == latest.c.at))
        .where(EVENTS.c.type.in_(types))
        .group_by(EVENTS.c.contact_id, latest.c.at)
    )
    return [(r[0], r[1], r[2]) for r in rows]


def as_time(value: time) -> str:
    return value.strftime("%H:%M")
