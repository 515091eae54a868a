"""SQL both databases speak, where their dialects differ."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from .tables import META


def insert(dialect: str, table: sa.Table) -> postgresql.Insert | sqlite.Insert:
    """An INSERT that takes ON CONFLICT clauses, in the flavour of `dialect` (`conn.dialect.name`)."""
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)


@contextlib.contextmanager
def pipelined(conn: Connection) -> Iterator[None]:
    """On PostgreSQL, send the block's statements without waiting for each answer (psycopg's pipeline mode):
    for statements whose results nobody reads, ending with the COMMIT, which waits for all of them at once and
    raises the first error as SQLAlchemy raises any. Elsewhere, the block runs as it is."""
    if conn.dialect.name != "postgresql":
        yield
        return
    from psycopg import pq  # PostgreSQL's driver is an extra: imported where only PostgreSQL gets

    driver = conn.connection.driver_connection
    assert driver is not None  # a connection in use has its driver's
    try:
        with driver.pipeline():
            yield
    finally:
        # A statement refused in the pipeline aborts the COMMIT after it, which then never ends the transaction:
        # end it, or the pool hands out a connection in a failed transaction (SQLAlchemy thinks it committed).
        if not driver.closed and driver.pgconn.transaction_status == pq.TransactionStatus.INERROR:
            driver.rollback()


def put_meta(conn: Connection, key: str, value: str) -> None:
    """Set one of the deployment's own values (a poll cursor, the triggers' fingerprint)."""
    statement = insert(conn.dialect.name, META).values(key=key, value=value)
    conn.execute(statement.on_conflict_do_update(index_elements=["key"], set_={"value": value}))


def storable(text: str, length: int | None = None) -> str:
    """`text` as both databases can hold it: a NUL (which PostgreSQL refuses in text) and a lone surrogate (which
    has no UTF-8) written as escapes; longer than `length` characters, cut to fit, its last one an ellipsis."""
    held = text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")
    return held if length is None or len(held) <= length else held[: length - 1] + "\u2026"
