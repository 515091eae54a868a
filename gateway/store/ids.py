"""Rows whose id is needed at once, queued all the same: the id is known before the row is written."""

from __future__ import annotations

import functools
import threading
import weakref
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from . import appends

#: Where the values taken ahead wait, per table, for the whole process (its database threads share them, so ids
#: go out in order within a process), and how many are taken at a time.
_IDS: weakref.WeakKeyDictionary[Engine, dict[str, list[int]]] = weakref.WeakKeyDictionary()
_TAKING = threading.Lock()
AT_ONCE = 32
_TAKE = sa.text("SELECT nextval(pg_get_serial_sequence(:table, 'id')) FROM generate_series(1, :n)").execution_options(
    **{appends.NO_TABLE: True}  # reads no table: the queued rows need not go out first
)


def queue_insert(conn: Connection, insert: sa.Insert, row: dict[str, Any]) -> int:
    """Queue `row` for `insert` (built `.inline()`, the id given) with the transaction's other rows
    (store/appends.py), and return its id, where an `INSERT ... RETURNING` of its own made the transaction wait.

    PostgreSQL: ids come from the table's sequence AT_ONCE at a time, in one round trip; a sequence never hands
    a value out twice, even to a transaction that rolls back, so those left over serve the process's next
    transactions, on either database thread (in order within a process; replicas interleave). SQLite: the
    transaction holds the database's only write lock from its BEGIN (IMMEDIATE), so
    the next id is the largest of the rows still queued plus one, or, once they are written (any statement
    naming the table writes them first), the table's largest plus one: the id SQLite would give itself, for a
    statement per table and transaction where each row took one."""
    row_id = _next_id(conn, insert)
    appends.append(conn, insert, {**row, "id": row_id})
    return row_id


def _next_id(conn: Connection, insert: sa.Insert) -> int:
    table = insert.table
    assert isinstance(table, sa.Table)
    if conn.dialect.name != "postgresql":
        queued = appends.pending(conn, insert)
        if queued:
            return int(queued[-1]["id"]) + 1
        return (conn.execute(_largest(table)).scalar_one() or 0) + 1
    with _TAKING:  # the other database thread waits at most one round trip, every AT_ONCE ids
        pool = _IDS.setdefault(conn.engine, {}).setdefault(table.name, [])
        if not pool:
            pool.extend(reversed(conn.execute(_TAKE, {"table": table.name, "n": AT_ONCE}).scalars().all()))
        return pool.pop()


@functools.cache
def _largest(table: sa.Table) -> sa.Select[Any]:
    return sa.select(sa.func.max(table.c.id))
