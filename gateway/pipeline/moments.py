"""When a step is due: `wait` after the previous one, or at a moment the event carries (`at`, `offset`, `time`).

`at: "{{ event.properties.starts_at }}"` with `offset: -1d` and `time: 10:00` is 10:00, in the contact's time
zone, on the day before the event starts. The moment is computed when the step is scheduled (its job is a
row like any other) and again at send time, where a moment that had already passed when the step was
scheduled skips the step with the reason rather than sending it late.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import jinja2
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..config import StepSpec
from ..store import ENROLMENTS
from . import contacts
from .eventlog import load_event
from .triggers import zone_of

#: A rendered `at` longer than this is not a date-time: it is refused before any parsing.
MAX_RENDERED = 100


class MomentProblem(ValueError):
    """`at` did not give a date-time: the step is skipped with this reason."""


@dataclass(frozen=True)
class Moment:
    at: datetime | None  # UTC; None when `at` did not give one
    problem: str | None = None


def parse_moment(text: str, zone: ZoneInfo) -> datetime:
    """An ISO 8601 date-time (`Z` or an offset; without one, in `zone`) or a date (midnight in `zone`), in UTC."""
    text = text.strip()
    if not text or len(text) > MAX_RENDERED:
        raise MomentProblem(f"{text[:40]!r} is not a date-time")
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise MomentProblem(f"{text!r} is not an ISO 8601 date-time, such as 2026-06-02T19:00:00+02:00") from None
    return (value if value.tzinfo else value.replace(tzinfo=zone)).astimezone(UTC)


def shifted(moment: datetime, step: StepSpec, zone: ZoneInfo) -> datetime:
    """`offset` counted in the contact's days (a day before 19:00 is 19:00, across a clock change), then `time`."""
    local = moment.astimezone(zone)
    if step.offset:
        local = (local.replace(tzinfo=None) + step.offset).replace(tzinfo=zone)
    if step.time is not None:
        local = datetime.combine(local.date(), step.time, tzinfo=zone)
    return local.astimezone(UTC)


def step_moment(template: jinja2.Template, step: StepSpec, context: dict[str, Any], zone: ZoneInfo) -> Moment:
    try:
        rendered = template.render(**context)
        return Moment(shifted(parse_moment(rendered, zone), step, zone))
    except MomentProblem as exc:
        return Moment(None, f"at: {step.at}: {exc}")
    except (jinja2.TemplateError, OverflowError, ValueError, TypeError) as exc:
        return Moment(None, f"at: {step.at}: {type(exc).__name__}: {exc}")


def moment_of(
    conn: Connection,
    template: jinja2.Template,
    step: StepSpec,
    event_id: str,
    contact_id: int,
    default_zone: str,
    now: datetime,
) -> Moment:
    """The step's moment for this enrolment, from its stored event and its contact (time zone included)."""
    contact = contacts.view(conn, contact_id, now)
    context = {"event": load_event(conn, event_id), "contact": contact}
    return step_moment(template, step, context, zone_of(contact, default_zone))


def due_at(
    conn: Connection,
    step: StepSpec,
    template: jinja2.Template | None,
    enrolment: int | str,
    contact_id: int,
    default_zone: str,
    now: datetime,
) -> datetime:
    """When to run the step scheduled now: `wait` from now, or its moment (now when it has passed, or failed:
    the step is then skipped at once, with the reason). `enrolment` is its id, or the triggering event's."""
    if template is None:
        return now + step.wait
    event_id = enrolment if isinstance(enrolment, str) else _event_of(conn, enrolment)
    moment = moment_of(conn, template, step, event_id, contact_id, default_zone, now)
    return max(moment.at, now) if moment.at is not None else now


def _event_of(conn: Connection, enrolment_id: int) -> str:
    found: str = conn.execute(sa.select(ENROLMENTS.c.event_id).where(ENROLMENTS.c.id == enrolment_id)).scalar_one()
    return found


def describe(moment: datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M} UTC"
