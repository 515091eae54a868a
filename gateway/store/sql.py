"""SQL both databases speak, where their dialects differ."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from .tables import META


def insert(dialect: str, table: sa.Table) -> postgresql.Insert | sqlite.Insert:
    """An INSERT that takes ON CONFLICT clauses, in the flavour of `dialect` (`conn.dialect.name`)."""
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)


def put_meta(conn: Connection, key: str, value: str) -> None:
    """Set one of the deployment's own values (a poll cursor, the triggers' fingerprint)."""
    statement = insert(conn.dialect.name, META).values(key=key, value=value)
    conn.execute(statement.on_conflict_do_update(index_elements=["key"], set_={"value": value}))
