"""A sink's `rate` shared by every replica on one PostgreSQL: one send schedule per sink, in the database.

The schedule is GCRA's (the generic cell rate algorithm): `tat`, the theoretical arrival time, is
when the sink would be idle again at the rate. A send reserves the next slot in one atomic
statement and learns how long to wait for it; `count` sends may go at once after a quiet spell,
as the in-process token bucket allows (`kit/limits.py`). Times are the database's, so replicas on
hosts whose clocks differ share one schedule. SQLite serves one process: its limiter is enough.
"""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Connection

#: Reserve the next slot: tat moves on by one interval from itself, or from now after a quiet spell;
#: the wait is how far the slot lies beyond the burst tolerance.
_RESERVE = sa.text(
    """
    INSERT INTO sink_rates AS r (sink, tat) VALUES (:sink, statement_timestamp() + :interval)
    ON CONFLICT (sink) DO UPDATE SET tat = GREATEST(r.tat, statement_timestamp()) + :interval
    RETURNING EXTRACT(EPOCH FROM (r.tat - :interval - :tolerance - statement_timestamp()))
    """
)


def reserve(conn: Connection, sink: str, count: int, period: timedelta) -> float:
    """Take a slot in the sink's schedule: the seconds to wait before sending (0 when it may go now)."""
    interval = period / count
    values = {"sink": sink, "interval": interval, "tolerance": period - interval}
    return max(float(conn.execute(_RESERVE, values).scalar_one()), 0.0)
