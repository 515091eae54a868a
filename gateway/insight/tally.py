"""The decisions journal counted per rule: who entered, what was sent at each step, and why the rest was not.

`declic backtest` prints it for a replay. Reasons are grouped by kind: the parts that name a
moment or an occurrence ("quiet hours until 08:00 Europe/Paris (until 2026-03-15 07:00 UTC)")
are dropped, so that one cause is one line.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..store import DECISIONS, ENROLMENTS, JOBS

J, E, DE = JOBS.c, ENROLMENTS.c, DECISIONS.c


@dataclass
class RuleTally:
    rule: str
    entered: int = 0
    #: Steps (1-based) to how many messages went out, or would have gone for the holdout group.
    sent: Counter[int] = field(default_factory=Counter)
    held_out: Counter[int] = field(default_factory=Counter)
    #: Reason to count.
    not_entered: Counter[str] = field(default_factory=Counter)
    suppressed: Counter[str] = field(default_factory=Counter)
    deferred: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    exited: int = 0
    goals: int = 0
    #: Steps still due when the period ended.
    waiting: int = 0

    def as_dict(self) -> dict[str, Any]:
        def steps(counts: Counter[int]) -> dict[str, int]:
            return {str(step): counts[step] for step in sorted(counts)}

        def reasons(counts: Counter[str]) -> dict[str, int]:
            return dict(counts.most_common())

        return {
            "rule": self.rule,
            "entered": self.entered,
            "sent": steps(self.sent),
            "held_out": steps(self.held_out),
            "not_entered": reasons(self.not_entered),
            "suppressed": reasons(self.suppressed),
            "deferred": reasons(self.deferred),
            "failed": reasons(self.failed),
            "exited": self.exited,
            "goals": self.goals,
            "waiting": self.waiting,
        }


def tally(conn: Connection, rules: list[str], start: datetime, end: datetime) -> list[RuleTally]:
    """Each rule's decisions in [start, end); a rule not in `rules` is added when it decided something."""
    found = {name: RuleTally(name) for name in rules}
    rows = conn.execute(
        sa.select(DE.rule, DE.action, DE.step, DE.reason, sa.func.count().label("n"))
        .where(DE.at >= start, DE.at < end)
        .group_by(DE.rule, DE.action, DE.step, DE.reason)
    )
    for row in rows:
        count(found.setdefault(row.rule, RuleTally(row.rule)), row.action, row.step, row.reason, row.n)
    waiting = conn.execute(
        sa.select(E.rule, sa.func.count())
        .select_from(JOBS.join(ENROLMENTS, E.id == J.enrolment_id))
        .where(J.kind == "step", J.status == "pending")
        .group_by(E.rule)
    )
    for rule, n in waiting:
        found.setdefault(rule, RuleTally(rule)).waiting = n
    return list(found.values())


def count(tally: RuleTally, action: str, step: int | None, reason: str | None, n: int) -> None:
    kind = reason_kind(reason)
    if action == "enrolled":
        tally.entered += n
    elif action == "not_enrolled":
        tally.not_entered[kind] += n
    elif action == "send":
        tally.sent[step or 1] += n
    elif action == "held_out":
        tally.held_out[step or 1] += n
    elif action == "suppressed":
        tally.suppressed[kind] += n
    elif action == "deferred":
        tally.deferred[kind] += n
    elif action == "failed":
        tally.failed[kind] += n
    elif action == "exited":
        tally.exited += n
    elif action == "goal":
        tally.goals += n


#: Reasons that start so name one cause whatever follows (a time, a count, an occurrence).
_CAUSES = {
    "quiet hours": "quiet hours",
    "marketing pressure": "marketing pressure",
    "already enrolled for occurrence": "already enrolled for this occurrence",
}


def reason_kind(reason: str | None) -> str:
    """The cause a reason states, without the moment or the occurrence it names."""
    if not reason:
        return "(no reason)"
    for prefix, cause in _CAUSES.items():
        if reason.startswith(prefix):
            return cause
    head, colon, _ = reason.partition(": ")
    # "if false: EXPRESSION" is one cause per rule; in "no email consent (state: none)" the colon
    # inside brackets is part of the cause; otherwise what follows ": " names a moment or an error.
    if colon and head.count("(") == head.count(")") and not head.startswith("if "):
        return head
    return reason
