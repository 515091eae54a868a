"""The router: rules indexed by event type turn events into enrolments, exits and goals.

Also the non-event triggers' entry points: scoring crossings, inactivity re-arming, date
rescheduling when a contact's date or time zone changes, and firing a due trigger job.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import jinja2
import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection

from ..config import ReenterAfter, RuleSpec, ScoringSpec
from ..insight import conversions, journal
from ..kit.context import EVENT_FIELDS, Known
from ..kit.durations import format_duration
from ..kit.events import ContactRef, Event
from ..kit.templating import compile_condition, evaluate
from ..store import ENROLMENTS, META, ids, jobqueue, sql
from . import contacts, history, moments, triggers
from .eventlog import event_properties, store_event

log = structlog.get_logger("declic.router")
_FINGERPRINT = "reconcile:fingerprint"
E = ENROLMENTS.c


@dataclass(frozen=True)
class CompiledRule:
    spec: RuleSpec
    condition: Any | None
    step_conditions: tuple[Any | None, ...]
    #: Steps' `at` and `to` templates (None where the step has none, or a literal `to`).
    step_moments: tuple[jinja2.Template | None, ...] = ()
    step_recipients: tuple[jinja2.Template | None, ...] = ()
    #: The time zone of contacts who have none, for steps due at a local time.
    timezone: str = "UTC"

    @property
    def name(self) -> str:
        return self.spec.name

    def moment(self, step: int) -> jinja2.Template | None:
        return self.step_moments[step] if step < len(self.step_moments) else None

    def recipient(self, step: int) -> jinja2.Template | None:
        return self.step_recipients[step] if step < len(self.step_recipients) else None


class Router:
    def __init__(
        self,
        rules: list[RuleSpec],
        env: jinja2.Environment,
        scoring: ScoringSpec | None = None,
        timezone: str = "UTC",
        double_opt_in: frozenset[str] = frozenset(),
    ):
        self.rules: dict[str, CompiledRule] = {}
        self.timezone = timezone
        #: Channels whose grants stay pending until confirmed (the confirmation rule is among `rules`).
        self.double_opt_in = double_opt_in
        #: Whether opens and clicks flagged as a machine's are routed (start, end, score journeys) like people's.
        self.machine_events = False
        #: Rules whose `if` failed at least once: their failures are logged once, journaled every time.
        self.warned: set[str] = set()
        self.scoring = scoring or ScoringSpec()
        #: `where=` expressions of contact.count(...) and the other history helpers, compiled once.
        self.wheres = history.Wheres(env)
        self._points = {
            t: (s.points, compile_condition(env, s.if_) if s.if_ else None) for t, s in self.scoring.points.items()
        }
        self._by: dict[str, defaultdict[str, list[CompiledRule]]] = {
            kind: defaultdict(list) for kind in ("when", "exit_on", "goal", "of")
        }
        self.date_rules: list[CompiledRule] = []
        self.score_rules: list[CompiledRule] = []
        for spec in rules:
            rule = CompiledRule(
                spec,
                compile_condition(env, spec.if_) if spec.if_ else None,
                tuple(compile_condition(env, s.if_) if s.if_ else None for s in spec.steps),
                tuple(env.from_string(s.at) if s.at else None for s in spec.steps),
                tuple(env.from_string(s.send.to) if s.send.to_template and s.send.to else None for s in spec.steps),
                timezone,
            )
            self.rules[spec.name] = rule
            for kind, index in self._by.items():
                types = getattr(spec, kind)
                for event_type in [types] if isinstance(types, str) else types or ():
                    index[event_type].append(rule)
            if spec.on_date and not spec.date_from_event:
                self.date_rules.append(rule)
            if spec.score_reaches is not None:
                self.score_rules.append(rule)

    def route(
        self,
        conn: Connection,
        event: Event,
        contact: dict[str, Any],
        base: datetime,
        changed: frozenset[str] = frozenset(),
    ) -> None:
        """Goals, then exits, then enrolments: an event that both ends and starts a journey leaves the
        new one alone, and one that is a rule's goal and exit both converts and ends the journey."""
        for rule in self._by["goal"].get(event.type, ()):
            end_journeys(conn, rule, event, contact["id"], base, "goal", f"goal {event.type}")
        for rule in self._by["exit_on"].get(event.type, ()):
            end_journeys(conn, rule, event, contact["id"], base, "exited", f"exit_on {event.type}")
        for rule in self._by["of"].get(event.type, ()):
            if rule.spec.date_from_event:
                if not triggers.schedule_event_date(
                    conn, rule.spec, contact, event.id, event.properties, self.timezone, base
                ):
                    why = f"no date at {rule.spec.on_date}"
                    journal.record(conn, base, rule.name, contact["id"], "not_enrolled", reason=why, event_id=event.id)
            else:
                triggers.arm_inactivity(conn, rule.spec, contact["id"], event.id, base, base)
        view = history.ContactView(contact, conn, base, self.wheres)
        context = {"event": event_context(event), "contact": view}
        self._score(conn, event, contact, context, base)
        for rule in self._by["when"].get(event.type, ()):
            ruled_out = _ruled_out(rule, context, self.warned)
            history.record_problems(conn, view, rule.name, base, event_id=event.id)
            if ruled_out is not None:
                action, why = ruled_out
                journal.record(conn, base, rule.name, contact["id"], action, reason=why, event_id=event.id)
                continue
            enrol(conn, rule, contact["id"], event.id, _occurrence(event), _first(event.correlation), base)
        self.reschedule_dates(conn, contact, changed, base)

    def reschedule_dates(
        self, conn: Connection, contact: dict[str, Any], changed: frozenset[str], now: datetime
    ) -> None:
        """A date rule's next firing moves only when the contact's date or time zone really changed."""
        for rule in self.date_rules:
            if "timezone" in changed or f"attributes.{rule.spec.date_attribute}" in changed:
                triggers.schedule_date(conn, rule.spec, contact, self.timezone, now)

    def _score(
        self, conn: Connection, event: Event, contact: dict[str, Any], context: dict[str, Any], base: datetime
    ) -> None:
        points, condition = self._points.get(event.type, (0.0, None))
        if not points:
            return
        if condition is not None:
            counts = _truthy("scoring", condition, context, self.warned)
            for problem in context["contact"]._take_problems():  # no rule to journal it under: the log says it
                log.warning("scoring condition", event_type=event.type, problem=problem)
            if not counts:
                return
        before, after = triggers.add_points(conn, contact["id"], points, self.scoring.half_life, base)
        for rule in self.score_rules:
            threshold = rule.spec.score_reaches
            assert threshold is not None
            if before < threshold <= after:  # crossing upward; staying above fires nothing
                enrol(conn, rule, contact["id"], event.id, f"score:{threshold:g}:{event.id}", None, base)

    def fire(
        self,
        conn: Connection,
        rule_name: str,
        contact_id: int,
        occurrence: str,
        due: datetime,
        now: datetime,
        trigger_id: int,
    ) -> None:
        """A due date or inactivity trigger: enrol, then schedule the next yearly firing."""
        rule = self.rules.get(rule_name)
        if rule is None:
            return
        contact = contacts.load(conn, contact_id)
        spec = rule.spec
        if spec.on_date and now - due > spec.catch_up:
            journal.record(
                conn,
                now,
                rule.name,
                contact_id,
                "suppressed",
                step=1,
                reason=f"missed: due {due:%Y-%m-%d %H:%M} UTC, more than catch_up ago",
            )
        else:
            event = self.synthetic_event(conn, rule, contact, occurrence, due, trigger_id)
            enrol(conn, rule, contact_id, event.id, occurrence, None, now)
        if spec.inactive_for is not None:
            triggers.repeat_inactivity(conn, spec, contact_id, occurrence, due, now)
        if spec.on_date:
            self._schedule_next(conn, spec, contact, occurrence, now)

    def _schedule_next(
        self, conn: Connection, spec: RuleSpec, contact: dict[str, Any], occurrence: str, now: datetime
    ) -> None:
        """After a date rule fired: the contact's next date (next year's birthday), or the event's."""
        _, event_id = triggers.event_date_occurrence(occurrence)
        if event_id is None:
            triggers.schedule_date(conn, spec, contact, self.timezone, now)
        elif spec.yearly:
            properties = event_properties(conn, event_id)
            triggers.schedule_event_date(conn, spec, contact, event_id, properties, self.timezone, now)

    def synthetic_event(
        self,
        conn: Connection,
        rule: CompiledRule,
        contact: dict[str, Any],
        occurrence: str,
        due: datetime,
        trigger_id: int,
    ) -> Event:
        properties: dict[str, Any]
        if rule.spec.on_date:
            # A date carried by an event keeps that event's properties: the reminder names the concert.
            day, event_id = triggers.event_date_occurrence(occurrence)
            carried = event_properties(conn, event_id) if event_id else {}
            kind, properties = "date.reached", {**carried, "rule": rule.name, "date": day}
        else:
            period, times = triggers.inactivity_period(occurrence)
            kind, properties = "contact.inactive", {"rule": rule.name, "since": period, "firing": times}
        event = Event(
            id=f"t{trigger_id}",
            source="declic",
            type=kind,
            occurred_at=due,
            contact=ContactRef(),
            properties=properties,
        )
        store_event(conn, event, contact["id"])
        return event

    #: Contacts per reconcile transaction: acknowledgements wait for at most one chunk, not the whole run.
    RECONCILE_CHUNK = 500

    def reconcile(self, conn: Connection, now: datetime) -> int:
        """All of a reconcile in one transaction (tests, `declic simulate`); the worker runs it in chunks."""
        if not self.reconcile_needed(conn):
            return 0
        units = self.reconcile_units(conn)
        self.reconcile_chunk(conn, units, now)
        self.reconcile_done(conn)
        return len(units)

    def reconcile_needed(self, conn: Connection) -> bool:
        """Schedule the date and inactivity triggers a config change added; nothing to do when those rules
        and the deployment's time zone are what the last run saw (contacts' own changes reschedule theirs)."""
        stored = conn.execute(sa.select(META.c.value).where(META.c.key == _FINGERPRINT)).scalar()
        return stored != self._trigger_fingerprint()

    def reconcile_units(self, conn: Connection) -> list[tuple[CompiledRule, Any]]:
        """(rule, contact) for each date rule, (rule, last activity) for each inactivity rule."""
        units: list[tuple[CompiledRule, Any]] = []
        for rule in self.date_rules:
            units += [(rule, contact) for contact in triggers.contacts_with(conn, rule.spec.date_attribute)]
        for rule in self.rules.values():
            if rule.spec.date_from_event:
                units += [(rule, carrier) for carrier in triggers.events_carrying(conn, rule.spec.of)]
            if rule.spec.inactive_for is not None:
                units += [(rule, activity) for activity in triggers.last_activity(conn, rule.spec.of)]
        return units

    def reconcile_chunk(self, conn: Connection, units: list[tuple[CompiledRule, Any]], now: datetime) -> None:
        for rule, unit in units:
            if rule.spec.date_from_event:
                contact_id, event_id, properties = unit
                contact = contacts.load(conn, contact_id)
                triggers.schedule_event_date(conn, rule.spec, contact, event_id, properties, self.timezone, now)
            elif rule.spec.on_date:
                triggers.schedule_date(conn, rule.spec, unit, self.timezone, now)
            else:
                contact_id, event_id, at = unit
                triggers.arm_inactivity(conn, rule.spec, contact_id, event_id, at, now)

    def reconcile_done(self, conn: Connection) -> None:
        sql.put_meta(conn, _FINGERPRINT, self._trigger_fingerprint())

    def _trigger_fingerprint(self) -> str:
        rules = [_trigger_fields(r.spec) for r in self.rules.values() if r.spec.on_date or r.spec.inactive_for]
        text = json.dumps({"timezone": self.timezone, "rules": rules}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


_TRIGGER_FIELDS = frozenset({"name", "on_date", "at", "offset", "repeat", "catch_up", "inactive_for", "of"})
_REPEAT_FIELDS = ("repeat_every", "max_times")


def _trigger_fields(spec: RuleSpec) -> dict[str, Any]:
    """What schedules a rule's triggers. The repeat keys count only when set: an upgrade alone must not change
    the fingerprint, as a changed one re-arms every contact's triggers."""
    repeats = {key for key in _REPEAT_FIELDS if getattr(spec, key) is not None}
    return spec.model_dump(mode="json", include=set(_TRIGGER_FIELDS | repeats))


def event_context(event: Event) -> dict[str, Any]:
    """The event as `if:` and templates see it, the same at enrolment and at send time."""
    return Known("event", event.model_dump(mode="python", include=set(EVENT_FIELDS)))


def _first(keys: list[str]) -> str | None:
    return keys[0] if keys else None


def _occurrence(event: Event) -> str:
    return _first(event.correlation) or f"event:{event.id}"


def _ruled_out(rule: CompiledRule, context: dict[str, Any], warned: set[str]) -> tuple[str, str] | None:
    """Why the rule's `if` keeps this event from enrolling, with the expression: `not_enrolled` when it is
    false, `failed` when it raised (recorded in the journal, warned once); None when it lets it in."""
    if rule.condition is None:
        return None
    try:
        if evaluate(rule.condition, context):
            return None
    except Exception as exc:  # a bad expression on odd data: the journal says so for each event
        warn_once(warned, rule.name, exc)
        return "failed", f"if failed: {rule.spec.if_}: {type(exc).__name__}: {exc}"
    return "not_enrolled", f"if false: {rule.spec.if_}"


def _truthy(where: str, condition: Any, context: dict[str, Any], warned: set[str]) -> bool:
    try:
        return bool(evaluate(condition, context))
    except Exception as exc:  # a bad expression on odd data skips the points
        warn_once(warned, where, exc)
        return False


def warn_once(warned: set[str], where: str, exc: Exception) -> None:
    """One log line per rule: the journal has each failure, the log need not repeat it per event."""
    if where not in warned:
        warned.add(where)
        log.warning(
            "condition failed; further failures of this rule go to the journal only", rule=where, error=str(exc)
        )


def enrol(
    conn: Connection,
    rule: CompiledRule,
    contact_id: int,
    event_id: str,
    occurrence: str,
    correlation: str | None,
    base: datetime,
) -> int | None:
    """One enrolment per (rule, contact, occurrence), within the rule's re-entry policy; the journal
    says which, and why not when it is not."""
    reenter = rule.spec.reenter
    if reenter != "always":
        # `never`: any earlier enrolment counts; `after`: only those since then.
        since = base - reenter.after if isinstance(reenter, ReenterAfter) else _EPOCH
        earlier = conn.execute(_EARLIER, {"rule": rule.name, "contact_id": contact_id, "since": since}).first()
        if earlier is not None:
            policy = f"after {format_duration(reenter.after)}" if isinstance(reenter, ReenterAfter) else "never"
            why = f"reenter {policy}: enrolled {earlier.created_at:%Y-%m-%d %H:%M} UTC"
            journal.record(conn, base, rule.name, contact_id, "not_enrolled", reason=why, event_id=event_id)
            return None
    held_out = in_holdout(rule, contact_id)
    row = {
        "rule": rule.name,
        "contact_id": contact_id,
        "event_id": event_id,
        "occurrence": occurrence,
        "correlation": correlation,
        "status": "active",
        "held_out": held_out,
        "created_at": base,
    }
    if _first_for(conn, contact_id, rule.name, occurrence):
        enrolment_id: int | None = ids.queue_insert(conn, _ENROL_NEW, row)
    else:
        enrolment_id = conn.execute(_enrol_once(conn.dialect.name), row).scalar_one_or_none()
    if enrolment_id is None:
        why = f"already enrolled for occurrence {occurrence}"
        journal.record(conn, base, rule.name, contact_id, "not_enrolled", reason=why, event_id=event_id)
        return None
    first = rule.spec.steps[0]
    due = moments.due_at(conn, first, rule.moment(0), event_id, contact_id, rule.timezone, base)
    jobqueue.add_step(conn, enrolment_id, 0, due, base, rule.spec.priority, rule.name)
    held = f"held out ({rule.spec.holdout:.0%} holdout): no message will be sent" if held_out else None
    journal.record(conn, base, rule.name, contact_id, "enrolled", reason=held, event_id=event_id)
    # At debug, as a send that went through (jobs/worker.py): the journal just recorded it.
    log.debug("enrolled", rule=rule.name, event_id=event_id, contact_id=contact_id, held_out=held_out)
    return enrolment_id


def in_holdout(rule: CompiledRule, contact_id: int) -> bool:
    """A stable draw per (rule, contact): the same people are held out every time they enter."""
    if not rule.spec.holdout:
        return False
    digest = hashlib.sha256(f"holdout:{rule.name}:{contact_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < rule.spec.holdout


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EARLIER = (
    sa.select(E.id, E.created_at)
    .where(E.rule == sa.bindparam("rule"), E.contact_id == sa.bindparam("contact_id"))
    .where(E.created_at > sa.bindparam("since", type_=E.created_at.type))
    .limit(1)
)


def _first_for(conn: Connection, contact_id: int, rule: str, occurrence: str) -> bool:
    """Whether this enrolment is known to be the contact's first for (rule, occurrence) without asking (a round
    trip on PostgreSQL, a statement of its own on SQLite): the contact is new in this batch of calls, and the
    batch has not enrolled it for that pair yet (contacts.enrolled_since_created). The pair then counts as
    enrolled."""
    enrolled = contacts.enrolled_since_created(conn, contact_id)
    if enrolled is None or (rule, occurrence) in enrolled:
        return False
    enrolled.add((rule, occurrence))
    return True


#: An enrolment that cannot conflict (`_first_for`), queued with its id (store/ids.py): nothing to wait for. Had
#: it conflicted after all, the INSERT would fail and the batch with it, never enrol twice (no ON CONFLICT).
_ENROL_NEW = sa.insert(ENROLMENTS).inline()


@functools.cache
def _enrol_once(dialect: str) -> sa.Insert:
    return (
        sql.insert(dialect, ENROLMENTS)
        .on_conflict_do_nothing(index_elements=["rule", "contact_id", "occurrence"])
        .returning(E.id)
    )


def end_journeys(
    conn: Connection, rule: CompiledRule, event: Event, contact_id: int, now: datetime, how: str, reason: str
) -> list[int]:
    """End the rule's journeys that this event concerns.

    A journey keyed `checkout:abc` ends on an event carrying `checkout:abc`. When the event
    carries no key of that kind (an order placed without a checkout, a sign-up journey and an
    order), the journey of the same contact ends. `exited` ends active journeys; a `goal` also
    counts journeys that sent their last step within the attribution window, and is counted as
    a conversion when one of the rule's messages came within that window before it.
    """
    kinds = sorted({key.split(":", 1)[0] for key in event.correlation})
    same_story = E.correlation.in_(event.correlation) if event.correlation else sa.false()
    story_unknown: sa.ColumnElement[bool] = sa.true()
    if kinds:
        story_unknown = sa.or_(E.correlation.is_(None), sa.and_(*[~E.correlation.startswith(f"{k}:") for k in kinds]))
    same_contact = sa.and_(E.contact_id == contact_id, story_unknown)
    open_journey: sa.ColumnElement[bool] = E.status == "active"
    if how == "goal":
        recent = sa.and_(E.status == "completed", E.ended_at >= now - rule.spec.attribution)
        open_journey = sa.or_(open_journey, recent)
    ended = conn.execute(
        sa.update(ENROLMENTS)
        .where(E.rule == rule.name, open_journey, sa.or_(same_story, same_contact))
        .values(status="exited" if how == "exited" else "converted", ended_by=event.id, ended_at=now)
        .returning(E.id, E.contact_id)
    ).all()
    if not ended:
        return []
    pending = dict(jobqueue.cancel_pending(conn, [row.id for row in ended], now))
    converted = None
    if how == "goal":
        converted = conversions.attribute(
            conn,
            rule.name,
            [row.id for row in ended],
            contact_id,
            event.id,
            event.properties,
            now,
            rule.spec.attribution,
            rule.spec.revenue,
        )
    for row in ended:
        step = pending.get(row.id)
        said = reason
        if how == "goal" and converted is not None and converted.enrolment_id == row.id:
            said += f": {converted.describe()}"
        elif how == "goal":
            said += f": not counted, no message within {format_duration(rule.spec.attribution)} before"
        journal.record(
            conn,
            now,
            rule.name,
            row.contact_id,
            how,
            step=None if step is None else step + 1,
            reason=said,
            event_id=event.id,
        )
    log.info("journeys " + how, rule=rule.name, event_id=event.id, enrolments=len(ended))
    return [row.id for row in ended]
