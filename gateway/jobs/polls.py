"""Polls: sources Declic asks on a timer, for providers that never call (Mailchimp campaign reports).

A poll is a job in the queue (kind `poll`, one pending per source), so it runs once across
replicas and survives restarts. Each fetched item becomes an inbox call with the provider's
id as its dedupe key: overlapping windows and retried polls never double an event. The
cursor where the next poll resumes is kept in the database, saved with the items.
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..kit.polling import Fetched, PollingSource
from ..kit.sources import Source
from ..store import META, jobqueue, sql
from ..store.inbox import NewCall, commit_calls, fit_key


def schedule(conn: Connection, source: str, due: datetime, now: datetime) -> None:
    """Queue the source's next poll unless one is already pending."""
    jobqueue.add_unique(conn, "poll", f"poll:{source}", source, due, now)


def load_cursor(conn: Connection, source: str) -> str | None:
    value: str | None = conn.execute(sa.select(META.c.value).where(META.c.key == f"cursor:{source}")).scalar()
    return value


def store(conn: Connection, source: str, fetched: Fetched, now: datetime) -> int:
    """The items become inbox calls (duplicates skipped) and the cursor moves on, in one transaction."""
    calls = [NewCall(source, fit_key(key), now, {}, body) for key, body in fetched.items]
    accepted = commit_calls(conn, calls) if calls else []
    if fetched.cursor is not None:
        sql.put_meta(conn, f"cursor:{source}", fetched.cursor)
    return sum(not a.duplicate for a in accepted)


def pollers(sources: dict[str, Source]) -> dict[str, PollingSource]:
    return {key: s for key, s in sources.items() if isinstance(s, PollingSource)}
