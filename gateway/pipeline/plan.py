"""What a new config would do to a running deployment: rules added, removed and changed, the journeys and
pending steps each touches and what becomes of them, and whom new date and inactivity rules will fire for.

The database keeps journeys and jobs by rule name, not the rules themselves; so each start of
`declic serve` stores a snapshot of its rules (their definitions and a digest of their templates) in the
`meta` table, and a plan compares a config against that snapshot. What it says becomes of pending work
is what the worker does (send/delivery.py, router.fire), and tests/test_plan.py holds it to that:

- a pending step of a removed rule is cancelled when due, and so is one past a changed rule's last step;
- any other pending step keeps its due time and runs the rule's new definition of that step (a new wait
  applies from the next step on: due times are set when the previous step runs);
- a pending date or inactivity trigger of a removed rule fires nothing; one whose timing changed is moved
  by the start-up reconcile (re-timed).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel
from sqlalchemy.engine import Connection

from ..config import RuleSpec
from ..kit.durations import format_duration
from ..kit.templating import template_files
from ..store import ENROLMENTS, JOBS, META, jsoncodec, sql
from . import contacts, triggers

SNAPSHOT_KEY = "plan:rules"
#: What moves a date or inactivity rule's pending triggers (the router's reconcile fingerprint reads the same).
TIMING = ("on_date", "at", "offset", "repeat", "catch_up", "inactive_for", "of")
#: How far ahead a plan counts the firings of date and inactivity rules.
HORIZONS = (timedelta(hours=24), timedelta(days=7))
STEP_FIELDS = ("wait", "if", "via", "template")


def snapshot(rules: Iterable[RuleSpec], templates_dir: Path) -> dict[str, Any]:
    """Each rule as its config defines it, and a digest of each of its templates' files."""
    return {
        rule.name: {
            "definition": _plain(rule.model_dump(by_alias=True, exclude={"send"})),
            "templates": {name: _digest(templates_dir, name) for step in rule.steps for name in step.send.templates},
        }
        for rule in rules
    }


def load_snapshot(conn: Connection) -> dict[str, Any] | None:
    """The rules as the deployment last started with them; None before any start that recorded them."""
    stored = conn.execute(sa.select(META.c.value).where(META.c.key == SNAPSHOT_KEY)).scalar()
    return None if stored is None else dict(jsoncodec.loads(stored)["rules"])


def store_snapshot(conn: Connection, rules: dict[str, Any], now: datetime) -> None:
    sql.put_meta(conn, SNAPSHOT_KEY, jsoncodec.dumps({"at": now.isoformat(), "rules": rules}))


@dataclass
class RuleChange:
    """One rule in a plan: how it changes, the work in flight it touches, and what becomes of that work."""

    name: str
    status: str  # added | removed | changed | unchanged | unknown (no snapshot to compare with)
    summary: str = ""
    changes: list[str] = field(default_factory=list)
    journeys: int = 0
    #: Pending step jobs by step number (1-based) and what becomes of them.
    steps: list[tuple[int, int, str]] = field(default_factory=list)
    #: Pending date or inactivity triggers and what becomes of them.
    triggers: tuple[int, str] | None = None
    #: Contacts a date or inactivity rule fires for within each of HORIZONS.
    fires: tuple[int, ...] | None = None

    def lines(self) -> list[str]:
        sign = {"added": "+", "removed": "-", "changed": "~", "unknown": "?"}.get(self.status, "=")
        status = "not compared" if self.status == "unknown" else self.status
        head = f"{sign} {status} {self.name}" + (f" ({self.summary})" if self.summary else "")
        lines = [head]
        lines += [f"    {change}" for change in self.changes]
        if self.journeys or self.steps:
            lines.append(f"    {_count(self.journeys, 'active journey')}")
        lines += [f"    {_count(count, 'pending step')} {number}: {fate}" for number, count, fate in self.steps]
        if self.triggers:
            lines.append(f"    {_count(self.triggers[0], 'pending trigger')}: {self.triggers[1]}")
        if self.fires is not None:
            day, week = self.fires
            lines.append(f"    fires for {_count(day, 'contact')} in the next 24 h, {week} in the next 7 days")
        return lines


@dataclass
class Plan:
    rules: list[RuleChange]
    #: When the snapshot compared against was taken; None when there was none.
    since: str | None = None

    def lines(self) -> list[str]:
        kept = [rule.name for rule in self.rules if rule.status == "unchanged"]
        lines = [line for rule in self.rules if rule.status != "unchanged" for line in rule.lines()]
        if kept:
            lines.append(f"= unchanged: {', '.join(kept)}")
        return lines or ["no rules"]


def plan(conn: Connection, rules: list[RuleSpec], templates_dir: Path, timezone: str, now: datetime) -> Plan:
    """Compare `rules` with the rules the deployment last started with; reads only."""
    stored = conn.execute(sa.select(META.c.value).where(META.c.key == SNAPSHOT_KEY)).scalar()
    recorded = jsoncodec.loads(stored) if stored is not None else None
    before: dict[str, Any] | None = recorded["rules"] if recorded else None
    after = snapshot(rules, templates_dir)
    specs = {rule.name: rule for rule in rules}
    journeys, steps, pending_triggers = _in_flight(conn)
    names = list(specs) + sorted({*(before or {}), *journeys, *steps, *pending_triggers} - set(specs))
    changes = []
    for name in names:
        spec, old, new = specs.get(name), (before or {}).get(name), after.get(name)
        change = RuleChange(name, _status(spec, old, new, before is not None), journeys=journeys.get(name, 0))
        change.summary = spec.summary if spec else ""
        if old is not None and new is not None:
            change.changes = _differences(old, new)
        change.steps = [(i + 1, n, _step_fate(spec, old, new, i)) for i, n in sorted(steps.get(name, {}).items())]
        if name in pending_triggers:
            change.triggers = (pending_triggers[name], _trigger_fate(spec, old, new))
        timed = spec is not None and (spec.on_date or spec.inactive_for) is not None
        if timed and spec is not None and new is not None and change.status != "unknown" and _retimed(old, new):
            change.fires = _firings(conn, spec, timezone, now)
        changes.append(change)
    return Plan(changes, recorded["at"] if recorded else None)


def on_start(conn: Connection, rules: list[RuleSpec], templates_dir: Path, timezone: str, now: datetime) -> Plan | None:
    """At start-up: the plan from the rules of the last start to these, when they differ; these become the
    snapshot. None at the first start and when nothing changed."""
    previous = load_snapshot(conn)
    current = snapshot(rules, templates_dir)
    if previous == current:
        return None
    found = plan(conn, rules, templates_dir, timezone, now) if previous is not None else None
    store_snapshot(conn, current, now)
    return found


def _status(spec: RuleSpec | None, old: dict[str, Any] | None, new: dict[str, Any] | None, known: bool) -> str:
    if spec is None:
        return "removed"
    if old is None:
        return "added" if known else "unknown"
    return "unchanged" if old == new else "changed"


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What changed, one line each: `wait of step 2: 1d -> 2d`, `template cart-reminder edited`."""
    before, after = old["definition"], new["definition"]
    found = [
        f"{key}: {_shown(before.get(key))} -> {_shown(after.get(key))}"
        for key in after
        if key != "steps" and before.get(key) != after.get(key)
    ]
    old_steps, new_steps = before["steps"], after["steps"]
    if len(old_steps) != len(new_steps):
        found.append(f"steps: {len(old_steps)} -> {len(new_steps)}")
    for number, (a, b) in enumerate(zip(old_steps, new_steps, strict=False), 1):
        for key in STEP_FIELDS:
            if _step_field(a, key) != _step_field(b, key):
                found.append(f"{key} of step {number}: {_shown(_step_field(a, key))} -> {_shown(_step_field(b, key))}")
    for template, digest in new["templates"].items():
        if old["templates"].get(template, digest) != digest:
            found.append(f"template {template} edited")
    return found


def _step_fate(spec: RuleSpec | None, old: dict[str, Any] | None, new: dict[str, Any] | None, index: int) -> str:
    """What the worker does with a pending step when it falls due (StepRunner.prepare)."""
    if spec is None:
        return "cancelled when due (the rule is no longer in the config)"
    if index >= len(spec.steps):
        return f"cancelled when due (the rule has {_count(len(spec.steps), 'step')} now)"
    if old is None or new is None:
        return "continue"
    before, after = old["definition"]["steps"], new["definition"]["steps"]
    if index >= len(before):
        return f"continue with the new step {index + 1}"
    fields = [key for key in STEP_FIELDS if _step_field(before[index], key) != _step_field(after[index], key)]
    template = after[index]["send"]["template"]
    if old["templates"].get(template, new["templates"][template]) != new["templates"][template]:
        fields.append("template's text")
    if not fields:
        return "continue"
    fate = f"continue with the new step {index + 1} ({', '.join(fields)})"
    if "wait" in fields:
        fate += ", due when set before: a new wait applies to steps not yet scheduled"
    return fate


def _trigger_fate(spec: RuleSpec | None, old: dict[str, Any] | None, new: dict[str, Any] | None) -> str:
    if spec is None:
        return "fire nothing when due (the rule is no longer in the config)"
    if old is not None and new is not None and _retimed(old, new):
        return "re-timed when the deployment starts with it"
    return "continue"


def _retimed(old: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    return old is None or any(old["definition"].get(k) != new["definition"].get(k) for k in TIMING)


def _firings(conn: Connection, spec: RuleSpec, timezone: str, now: datetime) -> tuple[int, ...]:
    """Contacts the rule fires for within each horizon, by the triggers' own scheduling logic."""
    if spec.date_from_event:
        carriers = triggers.events_carrying(conn, spec.of)
        found = [
            triggers.next_event_occurrence(conn, spec, contacts.load(conn, contact_id), event_id, props, timezone, now)
            for contact_id, event_id, props in carriers
        ]
        dues = [o.fire_at for o in found if o is not None and o.fire_at >= now - spec.catch_up]
    elif spec.on_date:
        with_date = triggers.contacts_with(conn, spec.date_attribute)
        found = [triggers.next_occurrence(conn, spec, contact, timezone, now) for contact in with_date]
        dues = [occurrence.fire_at for occurrence in found if occurrence is not None]
    else:
        assert spec.inactive_for is not None
        dues = [at + spec.inactive_for for _, _, at in triggers.last_activity(conn, spec.of)]
    return tuple(sum(_utc(due) <= now + horizon for due in dues) for horizon in HORIZONS)


def _in_flight(conn: Connection) -> tuple[dict[str, int], dict[str, dict[int, int]], dict[str, int]]:
    """Active journeys by rule; pending steps by rule and step; pending date and inactivity triggers by rule."""
    e, j = ENROLMENTS.c, JOBS.c
    active = conn.execute(sa.select(e.rule, sa.func.count()).where(e.status == "active").group_by(e.rule))
    waiting = j.status.in_(("pending", "running"))
    steps: dict[str, dict[int, int]] = {}
    rows = conn.execute(
        sa.select(e.rule, j.step, sa.func.count())
        .join(ENROLMENTS, e.id == j.enrolment_id)
        .where(j.kind == "step", waiting)
        .group_by(e.rule, j.step)
    )
    for rule, step, count in rows:
        steps.setdefault(rule, {})[step] = count
    pending = conn.execute(sa.select(j.rule, sa.func.count()).where(j.kind == "trigger", waiting).group_by(j.rule))
    return {r[0]: r[1] for r in active}, steps, {r[0]: r[1] for r in pending}


def _step_field(step: dict[str, Any], key: str) -> Any:
    return step["send"][key] if key in ("via", "template") else step.get(key)


def _digest(templates_dir: Path, name: str) -> str:
    files = template_files(templates_dir, name)
    digest = hashlib.sha256()
    for part, path in sorted(files.items()):
        digest.update(part.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _plain(value: Any) -> Any:
    """A definition in the config's own spelling (1d, 10:00), JSON-ready."""
    if isinstance(value, timedelta):
        return format_duration(value)
    if isinstance(value, time):
        return value.strftime("%H:%M")
    if isinstance(value, BaseModel):
        return _plain(value.model_dump(by_alias=True))
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}{'s' * (n != 1)}"


def _utc(moment: datetime) -> datetime:
    """Stored datetimes are naive UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
