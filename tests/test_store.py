"""Storage: migrations match the tables, `declic db upgrade` works, and serve refuses a stale schema."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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
from declic_gateway.store import Database
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
