"""Rows written at the end of a transaction (store/appends.py): with it or not at all, and at once elsewhere."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from conftest import postgres_database
from declic_gateway.insight import journal, rendered
from declic_gateway.pipeline import inbound, router
from declic_gateway.store import DECISIONS, ENROLMENTS, INBOX, JOBS, META, RENDERED, Database, appends, jobqueue

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


def test_queued_rows_with_a_value_too_long_for_its_column_fail_their_transaction_not_cut(db: Database) -> None:
    """On PostgreSQL an INSERT's queued rows go out as one array per column (appends._arrays): a value longer than
    its column must still be refused as a row of its own is, never cut to fit by a cast (a rule's name, an
    identity's value). SQLite keeps the text whole."""
    rules = [f"r{n}" for n in range(appends.ARRAYS_FROM)]
    rules[1] = "r" * 101

    def work(conn: sa.Connection) -> None:
        for rule in rules:
            journal.record(conn, NOW, rule, 1, "enrolled")

    if db.engine.dialect.name == "postgresql":
        with pytest.raises(sa.exc.DataError):
            db.transaction(work)
        assert journalled(db) == []
    else:
        db.transaction(work)
        assert journalled(db) == [(rule, "enrolled") for rule in rules]


AT = datetime(2026, 6, 1, 12, 30, 15, 123456, tzinfo=UTC)
#: Rows for the appended statements, by the table's name: each is written twice, with two ids.
ROWS = {
    "decisions": (
        journal._INSERT,
        {
            "at": AT,
            "rule": "r",
            "step": None,
            "contact_id": 7,
            "action": "enrolled",
            "via": None,
            "reason": "é 例",
            "event_id": "3.0",
        },
    ),
    "enrolments": (
        router._ENROL_NEW,
        {
            "rule": "r",
            "contact_id": 7,
            "event_id": "3.0",
            "occurrence": "o",
            "correlation": None,
            "status": "active",
            "held_out": True,
            "created_at": AT,
        },
    ),
    "jobs": (
        jobqueue._INSERT,
        {
            "kind": "step",
            "enrolment_id": 5,
            "step": 0,
            "due_at": AT,
            "first_due_at": AT,
            "priority": -2,
            "status": "pending",
            "attempts": 0,
            "created_at": AT,
            "updated_at": AT,
        },
    ),
    "rendered_messages": (None, {"contact_id": 7, "at": AT, "body": b"\x00\xffzlib"}),
}


def stored(conn: sa.Connection, table: sa.Table, key: str, values: list[object]) -> list[tuple[object, ...]]:
    """The rows as the driver returns them, without SQLAlchemy's processing, the key column left out."""
    columns = [c.name for c in table.columns if c.name not in ("id", key)]
    select = sa.select(*(table.c[name] for name in columns)).where(table.c[key].in_(values)).order_by(table.c[key])
    sql = str(select.compile(conn, compile_kwargs={"literal_binds": True}))
    return [tuple(row) for row in conn.exec_driver_sql(sql)]


def test_rows_written_from_the_queue_are_stored_as_sqlalchemy_stores_them(db: Database) -> None:
    """The queue binds each row's values itself (appends._executemany): each column must hold what
    `conn.execute` stores for the same row, on both databases: datetimes, NULLs, booleans, bytes, non-ASCII text,
    and in an UPDATE the values the statement holds itself beside those the rows bind."""
    tables = {"decisions": DECISIONS, "enrolments": ENROLMENTS, "jobs": JOBS, "rendered_messages": RENDERED}
    keys = {
        "decisions": "event_id",
        "enrolments": "occurrence",
        "jobs": "enrolment_id",
        "rendered_messages": "delivery_key",
    }

    def rows(name: str, n: int) -> tuple[sa.Insert, dict[str, object]]:
        """The table's row, told apart from its twin by `keys[name]` (and an id where the statement takes one)."""
        statement, row = ROWS[name]
        statement = statement if statement is not None else rendered._insert(db.engine.dialect.name)
        own = {keys[name]: n if name == "jobs" else f"k{n}"} | ({"id": n} if name == "enrolments" else {})
        return statement, {**row, **own}

    def queued(conn: sa.Connection) -> None:
        for name in tables:
            for n in range(1, 2 * appends.ARRAYS_FROM, 2):  # enough rows to go out as arrays on PostgreSQL
                appends.append(conn, *rows(name, n))

    db.transaction(queued)
    with db.engine.begin() as conn:
        for name in tables:
            for n in range(2, 2 * appends.ARRAYS_FROM + 1, 2):
                conn.execute(*rows(name, n))
    with db.engine.connect() as conn:
        for name, table in tables.items():
            numbers = range(1, 2 * appends.ARRAYS_FROM + 1)
            written = stored(conn, table, keys[name], [rows(name, n)[1][keys[name]] for n in numbers])
            assert written[0::2] == written[1::2], name
    dialect = db.engine.dialect.name
    planned = {statement: plan for (_, name, _), (statement, plan) in appends._PLANS.items() if name == dialect}
    assert all(planned.get(rows(name, 1)[0]) for name in tables)  # the queue's own way was taken for each

    def finish(conn: sa.Connection, job_id: int) -> None:
        appends.append(
            conn, jobqueue._FINISH, {"job_id": job_id, "worker": "w", "new_status": "done", "error": "é", "now": AT}
        )

    with db.engine.begin() as conn:
        for enrolment in (111, 112):
            conn.execute(jobqueue._INSERT, {**ROWS["jobs"][1], "enrolment_id": enrolment, "status": "running"})
        conn.execute(sa.update(JOBS).values(locked_by="w", locked_until=AT, about="[]"))
        found = conn.execute(sa.select(JOBS.c.enrolment_id, JOBS.c.id).where(JOBS.c.enrolment_id.in_([111, 112])))
        ids = {row.enrolment_id: row.id for row in found}
    db.transaction(finish, ids[111])
    with db.engine.begin() as conn:
        conn.execute(
            jobqueue._FINISH, [{"job_id": ids[112], "worker": "w", "new_status": "done", "error": "é", "now": AT}]
        )
    with db.engine.connect() as conn:
        queued_job, executed_job = stored(conn, JOBS, "enrolment_id", [111, 112])
    assert queued_job == executed_job
    assert "done" in queued_job and None in queued_job  # status, and locked_until set to NULL by the statement

    with db.engine.begin() as conn:  # a value the statement holds itself: status="processed"
        for key in ("c1", "c2"):
            call = {"source": "s", "dedupe_key": key, "received_at": AT, "headers": "{}", "body": b"{}"}
            conn.execute(sa.insert(INBOX), {**call, "status": "received", "error": "x"})
        calls = {row.dedupe_key: row.id for row in conn.execute(sa.select(INBOX.c.dedupe_key, INBOX.c.id))}
    db.transaction(
        lambda conn: appends.append(conn, inbound._MARK_PROCESSED, {"inbox_id": calls["c1"], "processed_at": AT})
    )
    with db.engine.begin() as conn:
        conn.execute(inbound._MARK_PROCESSED, [{"inbox_id": calls["c2"], "processed_at": AT}])
    with db.engine.connect() as conn:
        queued_call, executed_call = stored(conn, INBOX, "dedupe_key", ["c1", "c2"])
    assert queued_call == executed_call
    assert "processed" in queued_call and "x" not in queued_call


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
