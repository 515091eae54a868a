"""Shared fixtures: a database per test (SQLite, and PostgreSQL when enabled), a real SMTP server,
and a deployment factory that serves the real app over real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import sqlite3
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp.web_app
import pytest
import sqlalchemy as sa
import structlog
from aiohttp.test_utils import TestClient

from declic_gateway.http.app import create_app, load
from declic_gateway.http.running import GATEWAY_KEY, RunningGateway
from declic_gateway.store import Database
from declic_gateway.store.db import normalize_url
from declic_gateway.testing import FakeClock, SmtpCatcher, shopify_headers, write_deployment

POSTGRES_ENV = "DECLIC_TEST_POSTGRES_URL"
FIXTURES = Path(__file__).parent / "fixtures"
SHARED_PAYLOADS = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "payloads"
SECRET = "test-shopify-secret"

TEMPLATES = {
    "cart-reminder.subject.j2": "Your cart, {{ contact.first_name }}",
    "cart-reminder.txt.j2": "Total {{ event.properties.total_price }} {{ event.properties.currency }}: "
    "{{ event.properties.recovery_url }}",
    "cart-reminder.html.j2": "<p>Hello {{ contact.first_name }}, {{ event.properties.line_items[0].title }}</p>",
    "cart-sms.txt.j2": "Still there? {{ event.properties.recovery_url }}",
    "welcome.subject.j2": "Welcome {{ contact.first_name }}",
    "welcome.txt.j2": "Hello {{ contact.first_name }}",
    "order-confirmation.subject.j2": "Order {{ event.properties.name }}",
    "order-confirmation.txt.j2": "Thanks for order {{ event.properties.name }}",
}

BASE_CONFIG = """\
public_url: https://hooks.example.com
timezone: Europe/Paris
storage:
  url: {db_url}
  busy_timeout: 1s
sources:
  shop:
    plugin: shopify
    secret: {secret}
sinks:
  email:
    plugin: smtp
    host: 127.0.0.1
    port: {smtp_port}
    tls: none
    sender: "Boutique <shop@example.com>"
    timeout: 5
worker:
  retry_base: 10s
  max_attempts: {max_attempts}
{worker}policies:
  consent: {{email: required}}
rules:
{rules}
"""

DEFAULT_RULES = """\
  - name: abandoned-cart
    when: checkout.started
    if: "event.properties.total_price > 20"
    exit_on: [order.placed]
    steps:
      - wait: 1h
        send: {via: email, template: cart-reminder}
      - wait: 1d
        send: {via: email, template: cart-reminder}
  - name: welcome
    when: customer.created
    send: {via: email, template: welcome}
  - name: order-confirmation
    when: order.placed
    kind: transactional
    send: {via: email, template: order-confirmation}
"""


#: Marker -> what CI must have for it; a test with that marker that skips in CI fails the run.
_REQUIRED_IN_CI = {
    "postgres": f"PostgreSQL (is {POSTGRES_ENV} set?)",
    "browser": "headless Chromium and the analytics.js bundle (apt-get install chromium; npm ci in tests/browser)",
}
_SKIPPED_IN_CI: dict[str, list[str]] = {marker: [] for marker in _REQUIRED_IN_CI}


#: Test processes at most (`-n auto`, pytest-xdist): each PostgreSQL test opens up to a dozen connections (its
#: pools, replicas' processes), and a default server allows 100.
MAX_TEST_PROCESSES = 4


#: Where test folders go when nothing else is said: memory (tmpfs), where the machine has it. SQLite commits with
#: `synchronous=FULL`, an fsync each: 1.2 ms on this machine's disk against 0.01 ms in memory, and the suite commits
#: some hundred thousand times. Durability against a power cut is not what a test checks (a killed process loses
#: nothing either way: its writes are in the kernel). pytest's own variable; a run that sets it is left alone.
MEMORY_FOLDER = Path("/dev/shm")


def pytest_configure(config: pytest.Config) -> None:
    if config.option.basetemp is None and MEMORY_FOLDER.is_dir() and os.access(MEMORY_FOLDER, os.W_OK):
        os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", str(MEMORY_FOLDER))


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """One more than the cores: tests wait for servers, subprocesses and timers, and a third process on two cores
    fills those waits (the suite without slow tests: 323 s on two processes, 240 s on three)."""
    return max(1, min(MAX_TEST_PROCESSES, (os.cpu_count() or 1) + 1))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    for marker, skipped in _SKIPPED_IN_CI.items():
        if report.skipped and marker in report.keywords:
            skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI the PostgreSQL half of the suite and the browser tests must run: a skip there is a failure."""
    while _migrated:
        _drop_database(os.environ[POSTGRES_ENV], _migrated.pop())
    if not os.environ.get("CI"):
        return
    for marker, skipped in _SKIPPED_IN_CI.items():
        if skipped:
            print(f"\nCI: {len(skipped)} {marker} tests were skipped; they need {_REQUIRED_IN_CI[marker]}:")
            for nodeid in skipped[:10]:
                print(f"  {nodeid}")
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True)
def _logging_as_it_was() -> Iterator[None]:
    """The CLI's commands (simulate, kpis, backtest...) set up logging for a command line, at warning:
    put back what the test found, so that a later test's captured info lines are there to read."""
    saved = structlog.get_config()
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    structlog.configure(**saved)
    root.setLevel(level)
    root.handlers[:] = handlers


@pytest.fixture(autouse=True)
def _forget_finished_apps() -> Iterator[None]:
    """aiohttp caches each app's middleware chain (up to 1,024 apps, each holding its gateway, engine
    and caches): in one test process that kept ~1.6 M objects alive, and full garbage collections of
    that heap took over a second, long enough to fail a render's CPU budget. One app per process in
    production; here, forget each test's app when it is done."""
    yield
    cache = getattr(aiohttp.web_app, "_cached_build_middleware", None)  # aiohttp 3.10+
    if cache is not None:
        cache.cache_clear()


def fixture_bytes(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def fixture_json(name: str) -> dict[str, Any]:
    return json.loads(fixture_bytes(name))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path, migrated_sqlite: Path) -> Iterator[str]:
    """A migrated database for one test: a copy of this process's migrated SQLite file, or a PostgreSQL database."""
    if request.param == "sqlite":
        shutil.copyfile(migrated_sqlite, tmp_path / "declic.db")
        yield f"sqlite:///{tmp_path}/declic.db"
        return
    yield from postgres_database()


@pytest.fixture(scope="session")
def migrated_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Migrated once per test process: a copy takes 1 ms, a migration 70-150 ms, at each of some thousand starts."""
    path = tmp_path_factory.mktemp("migrated") / "declic.db"
    _migrate(f"sqlite:///{path}")
    return path


#: This test process's migrated database, copied for each test (`CREATE DATABASE ... TEMPLATE`): 0.05 s a test
#: instead of 0.3 s for a migration, over some 460 PostgreSQL tests. Nobody connects to it after the migration
#: (a template in use cannot be copied); dropped when the process's session ends.
_migrated: list[str] = []


def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, migrated, dropped afterwards."""
    base = os.environ.get(POSTGRES_ENV)
    if not base:
        pytest.skip(f"PostgreSQL tests run when {POSTGRES_ENV} is set, e.g. postgresql://postgres@127.0.0.1:5432/test")
    if not _migrated:
        _migrated.append(_create_database(base))
        _migrate(_database_url(base, _migrated[0]))
    name = _create_database(base, template=_migrated[0])
    try:
        yield _database_url(base, name)
    finally:
        _drop_database(base, name)


def _migrate(url: str) -> None:
    database = Database(url)
    database.upgrade()
    database.close()


def _database_url(base: str, name: str) -> str:
    return sa.make_url(base).set(database=name).render_as_string(hide_password=False)


def _create_database(base: str, *, template: str | None = None) -> str:
    name = f"declic_test_{uuid.uuid4().hex[:12]}"
    with _admin(base) as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else "")))
    return name


def _drop_database(base: str, name: str) -> None:
    with _admin(base) as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@contextlib.contextmanager
def _admin(base: str) -> Iterator[sa.Connection]:
    admin = sa.create_engine(sa.make_url(base).set(drivername="postgresql+psycopg"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            yield conn
    finally:
        admin.dispose()


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    """A migrated database (each of `db_url`'s), closed after the test."""
    database = Database(db_url)
    database.upgrade()
    yield database
    database.close()


@pytest.fixture
def smtp() -> Iterator[SmtpCatcher]:
    catcher = SmtpCatcher().start()
    yield catcher
    catcher.stop()


@dataclass
class Deployment:
    """A running deployment under a fake clock, and the means to drive it."""

    client: TestClient
    gateway: RunningGateway
    clock: FakeClock
    path: Path

    async def post_shopify(
        self,
        topic: str,
        body: bytes,
        webhook_id: str | None = None,
        secret: str = SECRET,
        source: str = "shop",
        **extra: str,
    ) -> Any:
        headers = shopify_headers(body, secret, topic, webhook_id or uuid.uuid4().hex)
        headers.update(extra)
        return await self.client.post(f"/hooks/{source}", data=body, headers=headers)

    async def advance(self, **delta: float) -> int:
        """Move the clock, then run every job that became due; return how many ran."""
        from datetime import timedelta

        self.clock.advance(timedelta(**delta))
        return await self.gateway.worker.drain()

    def rows(self, query: str, **params: Any) -> list[Any]:
        with self.gateway.db.engine.connect() as conn:
            return list(conn.execute(sa.text(query), params))

    def scalar(self, query: str, **params: Any) -> Any:
        with self.gateway.db.engine.connect() as conn:
            return conn.execute(sa.text(query), params).scalar()


Factory = Callable[..., Awaitable[Deployment]]


@pytest.fixture
async def deploy(aiohttp_client: Any, tmp_path: Path, db_url: str, smtp: SmtpCatcher) -> AsyncIterator[Factory]:
    """Start the real app (role web: tests run the worker explicitly with `advance`)."""

    async def start(
        rules: str = DEFAULT_RULES,
        *,
        templates: dict[str, str] | None = None,
        extra: str = "",
        max_attempts: int = 5,
        role: str = "web",
        smtp_port: int | None = None,
        worker: str = "",
        storage: str = "",
        policies: str = "",
    ) -> Deployment:
        text = (
            BASE_CONFIG.format(
                db_url=db_url,
                secret=SECRET,
                smtp_port=smtp_port or smtp.port,
                rules=rules,
                max_attempts=max_attempts,
                worker=worker,
            )
            .replace("  busy_timeout: 1s\n", "  busy_timeout: 1s\n" + storage)
            .replace("  consent: {email: required}\n", "  consent: {email: required}\n" + policies)
            + extra
        )
        path = write_deployment(tmp_path, text, templates or TEMPLATES)
        settings, pm, _ = load(str(path))
        clock = FakeClock(datetime(2026, 3, 14, 8, 0, tzinfo=UTC))
        app = create_app(settings, pm=pm, clock=clock, role=role)  # type: ignore[arg-type]
        client = await aiohttp_client(app)
        return Deployment(client, app[GATEWAY_KEY], clock, path)

    yield start


@contextlib.contextmanager
def locked(db_url: str, postgresql: str, **params: Any) -> Iterator[None]:
    """Hold a lock from another connection while the block runs (longer than the 1s busy timeout, as another
    process, replica or API write would): SQLite's whole file; on PostgreSQL, what `postgresql` locks."""
    if db_url.startswith("sqlite"):
        locker = sqlite3.connect(db_url.removeprefix("sqlite:///"), isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        return
    engine = sa.create_engine(normalize_url(db_url))
    try:
        with engine.connect() as conn, conn.begin():
            conn.execute(sa.text(postgresql), params)
            yield
    finally:
        engine.dispose()


def refuse(d: Deployment, table: str, when: str = "true") -> None:
    """From now on the database refuses new rows of `table` for which `when` holds, as it refuses a value it cannot
    hold (a string too long for its column, a NUL on PostgreSQL): an error of the data's, not the database away."""
    if d.gateway.db.is_sqlite:
        statements = [
            f"CREATE TRIGGER refuse BEFORE INSERT ON {table} WHEN {when} BEGIN SELECT RAISE(ABORT, 'no'); END"
        ]
    else:
        statements = [
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'no'; END $$",
            f"CREATE TRIGGER refuse BEFORE INSERT ON {table} FOR EACH ROW WHEN ({when}) EXECUTE FUNCTION refuse()",
        ]
    with d.gateway.db.engine.begin() as conn:
        for statement in statements:
            conn.exec_driver_sql(statement)


def locked_inbox(db_url: str) -> contextlib.AbstractContextManager[None]:
    """The inbox locked: no webhook can be stored."""
    return locked(db_url, "LOCK TABLE inbox IN ACCESS EXCLUSIVE MODE")


async def until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    """Wait for something the running worker does on its own; fail after `seconds`."""
    for _ in range(int(seconds / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the condition never held")
