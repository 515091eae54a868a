"""Storage: migrations match the tables, `declic db upgrade` works, and serve refuses a stale schema."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from aiohttp.test_utils import TestServer
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from click.testing import CliRunner
from sqlmodel import SQLModel

from conftest import postgres_database
from declic_gateway.cli.main import cli
from declic_gateway.errors import ConfigError
from declic_gateway.http.app import create_app, load
from declic_gateway.store import Database, jobqueue
from declic_gateway.store.db import PriorityLane
from declic_gateway.store.inbox import NewCall, commit_calls
from declic_gateway.testing import write_deployment


def test_migrations_produce_exactly_the_tables_the_code_declares(db_url: str) -> None:
    database = Database(db_url)
    database.upgrade()
    with database.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    database.close()
    assert diff == []


def test_db_upgrade_command_then_current(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/x.db"
    path = write_deployment(tmp_path, f"storage: {{url: '{url}'}}\n")
    result = CliRunner().invoke(cli, ["db", "upgrade", "--config", str(path)], env={"DECLIC_DATABASE_URL": ""})
    assert result.exit_code == 0 and result.output == "database is current\n"
    database = Database(url)
    assert database.is_current()
    database.close()


@pytest.mark.postgres
async def test_serve_refuses_a_postgresql_database_that_is_not_migrated(tmp_path: Path) -> None:
    import os
    import uuid

    base = os.environ.get("DECLIC_TEST_POSTGRES_URL")
    if not base:
        pytest.skip("PostgreSQL tests run when DECLIC_TEST_POSTGRES_URL is set")
    name = f"declic_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(sa.make_url(base).set(drivername="postgresql+psycopg"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        url = sa.make_url(base).set(database=name).render_as_string(hide_password=False)
        path = write_deployment(tmp_path, f"storage: {{url: '{url}'}}\n")
        settings, pm, _ = load(str(path))
        server = TestServer(create_app(settings, pm=pm))
        with pytest.raises(ConfigError, match="run `declic db upgrade"):
            await server.start_server()
        await server.close()
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


async def test_a_second_process_on_one_sqlite_file_refuses_to_start(tmp_path: Path) -> None:
    path = write_deployment(tmp_path, f"storage: {{url: 'sqlite:///{tmp_path}/one.db'}}\n")
    settings, pm, _ = load(str(path))
    first = TestServer(create_app(settings, pm=pm))
    await first.start_server()
    try:
        second = TestServer(create_app(settings, pm=pm))
        with pytest.raises(ConfigError, match="in use by another declic process: SQLite serves one process"):
            await second.start_server()
        await second.close()
    finally:
        await first.close()
    again = TestServer(create_app(settings, pm=pm))  # the lock went with the first process's shutdown
    await again.start_server()
    await again.close()


@pytest.fixture
def pg_url() -> Iterator[str]:
    yield from postgres_database()


@pytest.mark.postgres
@pytest.mark.parametrize("ended_by", ["the server", "the network"])
def test_a_dead_pooled_connection_is_replaced_before_a_transaction_uses_it(pg_url: str, ended_by: str) -> None:
    """A server restart, a failover or a network cut ends the pooled connections: the next transaction runs on
    a new one instead of failing (the pool's check is the BEGIN each transaction sends anyway, store/db.py)."""
    database = Database(pg_url)
    backend = sa.text("SELECT pg_backend_pid()")
    try:
        first, driver = database.transaction(
            lambda conn: (conn.execute(backend).scalar_one(), conn.connection.driver_connection)
        )
        if ended_by == "the server":
            admin = sa.create_engine(database.engine.url, poolclass=sa.pool.NullPool)
            with admin.connect() as conn:
                assert conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": first}).scalar()
            admin.dispose()
        else:
            driver.pgconn.finish()  # the socket closed on this side, the connection still in the pool
        assert database.transaction(lambda conn: conn.execute(backend).scalar_one()) != first
    finally:
        database.close()


def test_urgent_work_runs_before_the_backlog_queued_ahead_of_it() -> None:
    """Acknowledging a webhook waits for no queued step: with every lane busy, urgent work queued last runs
    first once a lane frees, and the rest in the order it came."""
    lanes = PriorityLane(2)
    busy, release, ran = threading.Barrier(3), threading.Event(), []

    def occupy() -> None:
        busy.wait()  # both lanes are taken before anything else is queued
        release.wait()

    try:
        blockers = [lanes.submit(occupy) for _ in range(2)]
        busy.wait()
        queued = [lanes.submit(ran.append, f"step {n}") for n in range(3)]
        urgent = lanes.submit_with(True, ran.append, "ack")
        release.set()
        for future in [*blockers, *queued, urgent]:
            future.result(timeout=10)
        assert ran[0] == "ack"
        assert [name for name in ran if name != "ack"] == ["step 0", "step 1", "step 2"]
    finally:
        release.set()
        lanes.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):  # refused, not queued where no thread runs it
        lanes.submit(ran.append, "too late")


@pytest.mark.postgres
async def test_on_postgresql_an_acknowledgement_is_not_held_behind_a_transaction_waiting_for_a_lock(
    pg_url: str,
) -> None:
    """A transaction blocked by another process's lock (a migration, a long report, another replica) leaves a
    lane free: webhooks are still acknowledged while it waits."""
    database = Database(pg_url, busy_timeout=timedelta(seconds=30))
    other = sa.create_engine(database.engine.url, poolclass=sa.pool.NullPool)
    meta = sa.table("meta", sa.column("key"), sa.column("value"))
    database.transaction(lambda conn: conn.execute(sa.insert(meta).values(key="held", value="free")))
    waiting = sa.text(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    try:
        with other.connect() as holder, other.connect() as watcher:
            # `holder` keeps its transaction open: the row stays locked until it commits.
            holder.execute(sa.update(meta).where(meta.c.key == "held").values(value="by another process"))
            stuck = asyncio.ensure_future(
                database.run(
                    lambda conn: conn.execute(sa.update(meta).where(meta.c.key == "held").values(value="mine"))
                )
            )
            for _ in range(500):
                if watcher.execute(waiting).scalar_one():
                    break
                await asyncio.sleep(0.01)
                watcher.rollback()  # a fresh snapshot of the activity view each time
            else:
                pytest.fail("the transaction never waited for the lock")
            inbox_rows = await database.run(
                lambda conn: conn.execute(sa.text("SELECT count(*) FROM inbox")).scalar_one(), urgent=True
            )
            assert inbox_rows == 0
            assert not stuck.done()  # still waiting for the lock: the answer above did not wait for it
            holder.commit()
        await stuck
        assert database.transaction(lambda conn: conn.execute(sa.select(meta.c.value)).scalar_one()) == "mine"
    finally:
        other.dispose()
        database.close()


def test_the_queues_statements_carry_the_job_states_in_their_text(db_url: str) -> None:
    """SQLite compares a bound value with the constant of a partial index's WHERE (uq_jobs_pending_key:
    `status = 'pending'`) and then prepares the statement again every time it runs: a claim cost 150-170 µs
    where it runs in 25. The states the queue asks for are written into its statements, never bound."""
    database = Database(db_url)
    database.upgrade()
    ran: list[str] = []

    def capture(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "jobs" in statement:
            ran.append(statement)

    now = datetime(2026, 12, 5, 10, 0, tzinfo=UTC)
    sa.event.listen(database.engine, "before_cursor_execute", capture)
    try:
        with database.engine.begin() as conn:
            jobqueue.add_unique(conn, "tick", "tick:test", "tick:test", now, now)
            claimed = jobqueue.claim(conn, "worker-1", now, timedelta(seconds=30), limit=10)
            jobqueue.renew(conn, [job.id for job in claimed], "worker-1", now + timedelta(seconds=60))
            jobqueue.overdue_calls(conn, now - timedelta(seconds=30))
            jobqueue.next_due(conn)
            jobqueue.cancel_pending(conn, [1], now)
    finally:
        sa.event.remove(database.engine, "before_cursor_execute", capture)
        database.close()
    assert [job.kind for job in claimed] == ["tick"]  # the statements ran and found what they were for
    bound = [statement for statement in ran if re.search(r"\.status (=|!=|IN) (\?|%\()", statement)]
    assert bound == []
    assert any("jobs.status = 'pending'" in statement for statement in ran)


def test_a_claim_that_takes_some_calls_of_a_commit_takes_the_first_ones(db: Database) -> None:
    """The calls of one group commit are due at one moment; a claim with less room takes them in arrival order,
    wherever the database keeps their rows (PostgreSQL rewrites a row elsewhere on every update)."""
    now = datetime(2026, 3, 14, 8, 0, tzinfo=UTC)
    db.transaction(commit_calls, [NewCall("shop", f"call-{n}", now, {}, b"{}") for n in range(60)])
    with db.engine.begin() as conn:  # the first rows touched, as a renewed lease would
        conn.execute(sa.text("UPDATE jobs SET updated_at = updated_at WHERE id IN (SELECT id FROM jobs LIMIT 5)"))
    claimed = db.transaction(jobqueue.claim, "w", now, timedelta(minutes=1), 50)
    assert sorted(job.inbox_id for job in claimed) == list(range(1, 51))
