"""The decisions journal: what the engine decided for whom, and why. Also `declic simulate`'s output."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..store import DECISIONS, ENROLMENTS, appends

#: enrolled | not_enrolled (a trigger matched; why not) | send | held_out (holdout group: not sent) |
#: suppressed | deferred | exited | goal | failed | overtook (went ahead of a stuck call) |
#: fallback (a channel of `via: [sms, email]` passed over, the next one tried)
ACTIONS = frozenset(
    {
        "enrolled",
        "not_enrolled",
        "send",
        "held_out",
        "suppressed",
        "deferred",
        "exited",
        "goal",
        "failed",
        "overtook",
        "fallback",
    }
)


def record(
    conn: Connection,
    at: datetime,
    rule: str,
    contact_id: int,
    action: str,
    *,
    step: int | None = None,
    via: str | None = None,
    reason: str | None = None,
    event_id: str | None = None,
) -> None:
    assert action in ACTIONS, action
    appends.append(
        conn,
        _INSERT,
        {
            "at": at,
            "rule": rule,
            "step": step,
            "contact_id": contact_id,
            "action": action,
            "via": via,
            "reason": reason,
            "event_id": event_id,
        },
    )


_INSERT = sa.insert(DECISIONS).inline()  # appended: no id read back (store/appends.py)


def enrolments(conn: Connection, enrolment_ids: list[int]) -> dict[int, tuple[str, int]]:
    """(rule, contact) of each enrolment, for journal entries about their jobs."""
    if not enrolment_ids:
        return {}
    rows = conn.execute(
        sa.select(ENROLMENTS.c.id, ENROLMENTS.c.rule, ENROLMENTS.c.contact_id).where(ENROLMENTS.c.id.in_(enrolment_ids))
    )
    return {row.id: (row.rule, row.contact_id) for row in rows}
