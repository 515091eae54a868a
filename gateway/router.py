"""The router: rules indexed by event type turn events into enrolments and cancellations."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
import sqlalchemy as sa
import structlog
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from . import scheduler
from .config import RuleSpec
from .events import Event
from .store import ENROLMENTS
from .templating import compile_condition

log = structlog.get_logger("declic.router")
E = ENROLMENTS.c


@dataclass(frozen=True)
class CompiledRule:
    spec: RuleSpec
    condition: Any | None
    step_conditions: tuple[Any | None, ...]

    @property
    def name(self) -> str:
        return self.spec.name


class Router:
    def __init__(self, rules: list[RuleSpec], env: jinja2.Environment):
        self.rules: dict[str, CompiledRule] = {}
        self._enrol: dict[str, list[CompiledRule]] = defaultdict(list)
        self._exit: dict[str, list[CompiledRule]] = defaultdict(list)
        for spec in rules:
            rule = CompiledRule(
                spec,
                compile_condition(env, spec.if_) if spec.if_ else None,
                tuple(compile_condition(env, s.if_) if s.if_ else None for s in spec.steps),
            )
            self.rules[spec.name] = rule
            self._enrol[spec.when].append(rule)
            for event_type in spec.exit_on:
                self._exit[event_type].append(rule)

    def route(self, conn: Connection, event: Event, contact: dict[str, Any], base: datetime) -> None:
        """Exits first, so an event that both ends and starts a journey leaves the new one alone."""
        for rule in self._exit.get(event.type, ()):
            exit_journeys(conn, rule.name, event, contact["id"], base)
        context = {"event": event_context(event), "contact": contact}
        for rule in self._enrol.get(event.type, ()):
            if rule.condition is not None and not _truthy(rule, rule.condition, context):
                continue
            enrol(conn, rule, event, contact["id"], base)


def event_context(event: Event) -> dict[str, Any]:
    """The event as `if:` and templates see it, the same at enrolment and at send time."""
    return event.model_dump(mode="python", include={"id", "source", "type", "occurred_at", "correlation", "properties"})


def _truthy(rule: CompiledRule, condition: Any, context: dict[str, Any]) -> bool:
    try:
        return bool(condition(**context))
    except Exception as exc:  # a bad expression on odd data skips the rule, loudly
        log.warning("rule condition failed", rule=rule.name, error=str(exc))
        return False


def enrol(conn: Connection, rule: CompiledRule, event: Event, contact_id: int, base: datetime) -> int | None:
    """One enrolment per (rule, contact, occurrence): a redelivered event enrols nobody twice."""
    correlation = event.correlation[0] if event.correlation else None
    insert = (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(ENROLMENTS)
    enrolment_id = conn.execute(
        insert.values(
            rule=rule.name,
            contact_id=contact_id,
            event_id=event.id,
            occurrence=correlation or f"event:{event.id}",
            correlation=correlation,
            status="active",
            created_at=base,
        )
        .on_conflict_do_nothing(index_elements=["rule", "contact_id", "occurrence"])
        .returning(E.id)
    ).scalar_one_or_none()
    if enrolment_id is None:
        return None
    scheduler.add_step(conn, enrolment_id, 0, base + rule.spec.steps[0].wait, base)
    log.info("enrolled", rule=rule.name, event_id=event.id, contact_id=contact_id)
    return enrolment_id


def exit_journeys(conn: Connection, rule: str, event: Event, contact_id: int, now: datetime) -> list[int]:
    """End the rule's active journeys that share a correlation key with the event (else its contact)."""
    same_story = E.correlation.in_(event.correlation) if event.correlation else sa.false()
    same_contact = sa.and_(E.correlation.is_(None), E.contact_id == contact_id)
    ended = list(
        conn.execute(
            sa.update(ENROLMENTS)
            .where(E.rule == rule, E.status == "active", sa.or_(same_story, same_contact))
            .values(status="exited", ended_by=event.id, ended_at=now)
            .returning(E.id)
        ).scalars()
    )
    if ended:
        scheduler.cancel_pending(conn, ended, now)
        log.info("journeys exited", rule=rule, event_id=event.id, enrolments=len(ended))
    return ended
