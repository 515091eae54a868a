"""The decisions journal: what the engine decided for whom, and why. Also `declic simulate`'s output."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..store import DECISIONS

#: send | suppressed | deferred | exited | goal | failed
ACTIONS = frozenset({"send", "suppressed", "deferred", "exited", "goal", "failed"})


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
    conn.execute(
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


_INSERT = sa.insert(DECISIONS)
