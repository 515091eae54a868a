"""Replicas on one PostgreSQL: each running process registers the plugins it loaded, with a heartbeat,
and a process whose plugin set differs from a live replica's does not start.

Two replicas with different plugins would read the same jobs differently (a source one of them
lacks, a sink at another version), so the second one is refused with the difference named. On
SQLite there is one process (it holds the file's lock): nothing to compare with.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import REPLICAS

R = REPLICAS.c
#: A live replica beats this often...
HEARTBEAT = timedelta(seconds=10)
#: ...and one silent this long is gone (SIGKILLed, its host down): no longer compared with.
STALE = timedelta(seconds=60)
#: Serialises start-ups, so two replicas starting together with different sets cannot both pass.
_LOCK_KEY = 0x6465636C6963  # "declic"


def join(conn: Connection, replica: str, plugins: dict[str, str], now: datetime) -> str | None:
    """Register this replica, unless a live one runs another plugin set: then say how they differ."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_LOCK_KEY)))
    live = conn.execute(
        sa.select(R.id, R.plugins).where(R.heartbeat_at >= now - STALE, R.id != replica).order_by(R.started_at)
    ).all()
    for row in live:
        theirs = json.loads(row.plugins)
        if theirs != plugins:
            return f"plugin set differs from running replica {row.id}: {difference(plugins, theirs)}"
    conn.execute(sa.delete(REPLICAS).where(R.heartbeat_at < now - STALE))  # the departed, for tidiness
    _insert(conn, replica, plugins, now)
    return None


def difference(here: dict[str, str], there: dict[str, str]) -> str:
    """`extra: 1.2 here, 1.3 there; plus: absent here, declic-plus 0.1 there` (versions alone when the
    distribution is the same)."""
    parts = []
    for name in sorted(here.keys() | there.keys()):
        mine, theirs = here.get(name), there.get(name)
        if mine == theirs:
            continue
        if mine and theirs and mine.split(" ")[0] == theirs.split(" ")[0]:
            mine, theirs = mine.split(" ", 1)[-1], theirs.split(" ", 1)[-1]  # same distribution: versions only
        parts.append(f"{name}: {mine or 'absent'} here, {theirs or 'absent'} there")
    return "; ".join(parts)


def beat(conn: Connection, replica: str, plugins: dict[str, str], now: datetime) -> None:
    """Say this replica still runs; back in the table if a long silence had it tidied away."""
    if conn.execute(sa.update(REPLICAS).where(R.id == replica).values(heartbeat_at=now)).rowcount == 0:
        _insert(conn, replica, plugins, now)


def _insert(conn: Connection, replica: str, plugins: dict[str, str], now: datetime) -> None:
    row = {"id": replica, "plugins": json.dumps(plugins, sort_keys=True), "started_at": now, "heartbeat_at": now}
    conn.execute(sa.insert(REPLICAS).values(**row))


def leave(conn: Connection, replica: str) -> None:
    conn.execute(sa.delete(REPLICAS).where(R.id == replica))
