"""Rows written at the end of a transaction (store/appends.py): with it or not at all, and at once elsewhere."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from conftest import postgres_database
from declic_gateway.insight import journal
from declic_gateway.store import DECISIONS, META, Database, appends

NOW = datetime(2026, 6, 1, tzinfo=UTC)


def journalled(db: Database) -> list[tuple[str, str]]:
    with db.engine.connect() as conn:
        return [(r.rule, r.action) for r in conn.execute(sa.select(DECISIONS).order_by(DECISIONS.c.id))]


def test_rows_queued_in_a_transaction_are_written_by_one_statement_in_order(db: Database) -> None:
    statements: list[str] = []
    sa.event.listen(db.engine, "before_cursor_execute", lambda conn, cursor, sql, *_: statements.append(sql))

    def work(conn: sa.Connection) -> None:
        for rule in ("a", "b", "c"):
            journal.record(conn, NOW, rule, 1, "enrolled")

    db.transaction(work)
    assert len([sql for sql in statements if sql.startswith("INSERT INTO decisions")]) == 1  # an executemany
    assert journalled(db) == [("a", "enrolled"), ("b", "enrolled"), ("c", "enrolled")]


def test_a_statement_on_a_table_with_queued_rows_sees_them(db: Database) -> None:
    def work(conn: sa.Connection) -> tuple[int, int]:
        journal.record(conn, NOW, "a", 1, "enrolled", reason="about ada@example.com")
        before = len(conn.execute(sa.select(DECISIONS)).all())
        conn.execute(sa.update(DECISIONS).values(reason=None))  # as an erasure does
        journal.record(conn, NOW, "b", 1, "enrolled")
        return before, len(conn.execute(sa.text("SELECT * FROM decisions")).all())  # text: tables unknown

    assert db.transaction(work) == (1, 2)
    with db.engine.connect() as conn:
        assert list(conn.execute(sa.select(DECISIONS.c.reason))) == [(None,), (None,)]


def test_rows_of_a_transaction_that_fails_are_never_written(db: Database) -> None:
    def work(conn: sa.Connection) -> None:
        journal.record(conn, NOW, "a", 1, "enrolled")
        raise ValueError("the call cannot be applied")

    with pytest.raises(ValueError):
        db.transaction(work)
    db.transaction(lambda conn: journal.record(conn, NOW, "b", 1, "enrolled"))  # the connection is reused

    assert journalled(db) == [("b", "enrolled")]


def test_outside_a_database_transaction_a_row_is_written_at_once(db: Database) -> None:
    with db.engine.begin() as conn:
        journal.record(conn, NOW, "a", 1, "enrolled")
        assert len(conn.execute(sa.select(DECISIONS)).all()) == 1


def test_a_queued_row_the_database_refuses_fails_its_transaction_as_any_statement_would(db: Database) -> None:
    """On PostgreSQL the queue and the COMMIT go out together (store/sql.py, pipelined): the refusal still
    comes back as SQLAlchemy's error, the transaction writes nothing, and the connection serves the next."""

    def work(conn: sa.Connection) -> None:
        journal.record(conn, NOW, "a", 1, "enrolled")
        refused = {"at": NOW, "rule": "b", "step": None, "contact_id": None, "action": "enrolled"}  # NOT NULL
        appends.append(conn, sa.insert(DECISIONS).inline(), {**refused, "via": None, "reason": None, "event_id": None})

    with pytest.raises(sa.exc.IntegrityError):
        db.transaction(work)
    db.transaction(lambda conn: journal.record(conn, NOW, "c", 1, "enrolled"))
    assert journalled(db) == [("c", "enrolled")]


@pytest.fixture
def pg_db() -> Iterator[Database]:
    for url in postgres_database():
        database = Database(url)
        yield database
        database.close()


@pytest.mark.postgres
def test_on_postgresql_rows_queued_for_several_tables_go_out_in_one_round_trip_before_a_read(
    pg_db: Database, tmp_path: Path
) -> None:
    """A read of a table with queued rows writes the queue first: every queued statement in one pipeline, one
    round trip, where each took one (the claim made along with applying calls reads the jobs just queued)."""
    trace = tmp_path / "libpq.trace"

    def work(conn: sa.Connection) -> int:
        for rule in ("a", "b"):
            journal.record(conn, NOW, rule, 1, "enrolled")
        for key in ("k1", "k2"):
            appends.append(conn, sa.insert(META).inline(), {"key": key, "value": "v"})
        pgconn = conn.connection.driver_connection.pgconn  # type: ignore[union-attr]
        with trace.open("w") as out:
            pgconn.trace(out.fileno())
            try:
                return len(conn.execute(sa.select(DECISIONS)).all())
            finally:
                pgconn.untrace()

    assert pg_db.transaction(work) == 2
    sent = [line.split("\t") for line in trace.read_text().splitlines()]
    # The server ends each exchange the client waits for with ReadyForQuery: the queue's pipeline, then the read.
    assert sum(1 for fields in sent if fields[1:2] == ["B"] and fields[3:4] == ["ReadyForQuery"]) == 2
    with pg_db.engine.connect() as conn:
        assert (
            conn.execute(sa.select(sa.func.count()).select_from(META).where(META.c.key.in_(["k1", "k2"]))).scalar() == 2
        )
