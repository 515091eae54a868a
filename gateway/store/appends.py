"""Rows that nothing reads back in the transaction that writes them (the decisions journal, the consent
ledger, the copies of sent messages): queued on the connection and written with one executemany per table
just before the transaction commits, instead of one statement each.

A transaction applies ten calls or records many sends: that is two to four statements fewer per e-mail,
and on PostgreSQL as many round trips fewer on the path that applies calls one batch after another
(docs/performance.md). Only Database.transaction opens a queue; anywhere else `append` writes at once.
Code that reads or changes those tables in a transaction that may have queued rows calls `flush` first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

#: Where the queue lives while a transaction runs: the connection's `info` (removed when it ends).
_KEY = "declic.appends"


def append(conn: Connection, statement: sa.Executable, row: dict[str, Any]) -> None:
    """Write `row` with `statement` before this transaction commits (at once when no queue is open)."""
    queued: dict[sa.Executable, list[dict[str, Any]]] | None = conn.info.get(_KEY)
    if queued is None:
        conn.execute(statement, row)
    else:
        queued.setdefault(statement, []).append(row)


def flush(conn: Connection) -> None:
    """Write what is queued now, in the order it was queued (table by table)."""
    queued: dict[sa.Executable, list[dict[str, Any]]] | None = conn.info.get(_KEY)
    while queued:
        statement = next(iter(queued))
        conn.execute(statement, queued.pop(statement))


@contextlib.contextmanager
def queued(conn: Connection) -> Iterator[None]:
    """Queue appended rows while the block runs and write them when it ends without an error; drop them
    when it raises, as the transaction rolls back anyway."""
    conn.info[_KEY] = {}
    try:
        yield
        flush(conn)
    finally:
        conn.info.pop(_KEY, None)
