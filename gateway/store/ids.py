"""Ids taken ahead from PostgreSQL's sequences, so that an INSERT whose id is needed can still be queued."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import appends

#: Where the values taken ahead wait, per table, on the connection, and how many are taken at a time.
_IDS = "declic.ids"
AT_ONCE = 32
_TAKE = sa.text("SELECT nextval(pg_get_serial_sequence(:table, 'id')) FROM generate_series(1, :n)").execution_options(
    **{appends.NO_TABLE: True}  # reads no table: the queued rows need not go out first
)


def next_id(conn: Connection, table: sa.Table) -> int:
    """An id for a new row of `table`, on PostgreSQL: its INSERT can then be queued (store/appends.py) where
    RETURNING made the transaction wait for the server. Ids come from the table's sequence AT_ONCE at a time, in
    one round trip; a sequence never hands a value out twice, even to a transaction that rolls back, so those
    left over serve the connection's next transactions."""
    pools: dict[str, list[int]] = conn.info.setdefault(_IDS, {})
    pool = pools.setdefault(table.name, [])
    if not pool:
        pool.extend(reversed(conn.execute(_TAKE, {"table": table.name, "n": AT_ONCE}).scalars().all()))
    return pool.pop()
