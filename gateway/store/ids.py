"""Ids known before their rows are written, so that an INSERT whose id is needed can still be queued."""

from __future__ import annotations

import functools
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import appends

#: Where the values taken ahead wait, per table, on the connection, and how many are taken at a time.
_IDS = "declic.ids"
AT_ONCE = 32
_TAKE = sa.text("SELECT nextval(pg_get_serial_sequence(:table, 'id')) FROM generate_series(1, :n)").execution_options(
    **{appends.NO_TABLE: True}  # reads no table: the queued rows need not go out first
)


def next_id(conn: Connection, insert: sa.Insert) -> int:
    """An id for a new row that `insert` (given ids, `.inline()`) will write from the queue (store/appends.py),
    where a RETURNING statement of its own made the transaction wait for the id.

    PostgreSQL: ids come from the table's sequence AT_ONCE at a time, in one round trip; a sequence never hands
    a value out twice, even to a transaction that rolls back, so those left over serve the connection's next
    transactions. SQLite: the transaction holds the database's only write lock from its BEGIN (IMMEDIATE), so
    the next ids are the table's largest and up, counted from the rows still queued; once they are written (any
    statement naming the table writes them first), the table's largest is read again. That is the id SQLite
    would give itself; it costs a statement per table and transaction where each row took one."""
    table = insert.table
    assert isinstance(table, sa.Table)
    if conn.dialect.name != "postgresql":
        queued = appends.pending(conn, insert)
        if queued:
            return int(queued[-1]["id"]) + 1
        return (conn.execute(_largest(table)).scalar_one() or 0) + 1
    pools: dict[str, list[int]] = conn.info.setdefault(_IDS, {})
    pool = pools.setdefault(table.name, [])
    if not pool:
        pool.extend(reversed(conn.execute(_TAKE, {"table": table.name, "n": AT_ONCE}).scalars().all()))
    return pool.pop()


@functools.cache
def _largest(table: sa.Table) -> sa.Select[Any]:
    return sa.select(sa.func.max(table.c.id))
