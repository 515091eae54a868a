"""A deployment's database opened so that nothing can write to it: one consistent, read-only snapshot.

`declic backtest` reads the live database this way. SQLite is opened with `mode=ro` (the file
cannot be written, not even its journal mode switched); PostgreSQL reads in a `REPEATABLE READ
READ ONLY` transaction, so every query sees the same moment and the server refuses any write.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ..errors import ConfigError
from .db import normalize_url


def read_only_engine(url: str) -> Engine:
    parsed = sa.make_url(normalize_url(url))
    if parsed.get_backend_name() == "sqlite":
        path = Path(parsed.database or "")
        if not parsed.database or not path.is_file():
            raise ConfigError([f"no SQLite database at {parsed.database or '(memory)'}"])
        uri = path.resolve().as_uri() + "?mode=ro"
        engine = sa.create_engine("sqlite://", creator=lambda: sqlite3.connect(uri, uri=True, check_same_thread=False))
        # pysqlite would begin lazily, per statement kind; one explicit BEGIN makes the reads one snapshot.
        sa.event.listen(engine, "connect", lambda dbapi_conn, _: setattr(dbapi_conn, "isolation_level", None))
        sa.event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN"))
        return engine
    engine = sa.create_engine(parsed, pool_size=1, connect_args={"connect_timeout": 5})
    sa.event.listen(
        engine,
        "begin",
        lambda conn: conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"),
    )
    return engine


@contextlib.contextmanager
def snapshot(url: str) -> Iterator[Connection]:
    """A connection in one read-only transaction, rolled back at the end (there is nothing to keep)."""
    engine = read_only_engine(url)
    try:
        with engine.connect() as conn, conn.begin() as transaction:
            yield conn
            transaction.rollback()
    finally:
        engine.dispose()
