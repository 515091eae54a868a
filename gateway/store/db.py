"""The database handle: one engine, a thread to run blocking work on, and migrations."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import IO, Any, Generic, TypeVar

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine

from ..errors import ConfigError, StorageUnavailable, TransactionConflict
from . import appends

__all__ = ["Database", "StorageUnavailable", "make_engine", "normalize_url"]

T = TypeVar("T")
I = TypeVar("I")  # noqa: E741
R = TypeVar("R")
MIGRATIONS = Path(__file__).parent / "migrations"
#: Threads running transactions on PostgreSQL: two, so that one runs Python while the other waits for the
#: server. More only contend for the GIL, and work that queues is committed in bigger batches: with eight,
#: bench/e2e.py mailed 20-45 % less for 20-40 % more CPU per e-mail (docs/performance.md, session 10).
POSTGRES_LANES = 2
#: Unique keys that a transaction on PostgreSQL counts on staying free after reading them free, without asking
#: again (a new contact's identities, queued with the transaction's other rows: pipeline/contacts.py). When a
#: concurrent transaction takes one first, the write fails on the key and the whole transaction runs again: it
#: then reads the key as theirs. At most RUNS times, for a key that keeps being taken from under it.
FOUND_FREE = frozenset({"identities_pkey"})
RUNS = 3
#: PostgreSQL's SQLSTATEs for a transaction given up for another's sake (lock_timeout, deadlock, serialisation
#: failure): psycopg raises them as OperationalError, as it does a server gone away (TransactionConflict).
CONFLICTS = frozenset({"55P03", "40P01", "40001"})


def normalize_url(url: str) -> str:
    """Let users write postgresql:// and still get the psycopg 3 driver Declic ships with."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def make_engine(url: str, busy_timeout: timedelta = timedelta(seconds=2)) -> Engine:
    url = normalize_url(url)
    # hide_parameters: SQLAlchemy's errors would quote the statement's values (a search, an address, a
    # webhook's body) in the log, and in a job's last error that the dashboard and API show.
    if url.startswith("sqlite"):
        engine = sa.create_engine(
            url,
            connect_args={"timeout": busy_timeout.total_seconds(), "check_same_thread": False},
            hide_parameters=True,
        )
        sa.event.listen(engine, "connect", _sqlite_on_connect)
        # Take the write lock up front: a transaction never fails half-way on a lock upgrade.
        sa.event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
    else:
        timeout_ms = int(busy_timeout.total_seconds() * 1000)
        engine = sa.create_engine(
            url,
            pool_size=8,
            connect_args={"connect_timeout": 5, "options": f"-c lock_timeout={timeout_ms}"},
            hide_parameters=True,
        )
        sa.event.listen(engine, "checkout", _begin_or_reconnect)
    sa.event.listen(engine, "before_execute", appends.write_first)
    return engine


def _begin_or_reconnect(dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
    """A connection taken from the pool starts its transaction at once, and that BEGIN is the check that it is
    alive: psycopg sends no BEGIN of its own in a transaction already open. `pool_pre_ping` would spend a
    round trip of its own (SELECT 1) before psycopg's BEGIN, on every transaction (docs/performance.md).
    A dead connection (the server restarted) makes the pool drop every connection and open a new one."""
    import psycopg  # PostgreSQL's driver is an extra: imported where only PostgreSQL gets
    from psycopg import pq

    pgconn = dbapi_conn.pgconn  # idle: the pool rolled back whatever its last user left open
    try:
        began = pgconn.status == pq.ConnStatus.OK and pgconn.exec_(b"BEGIN").status == pq.ExecStatus.COMMAND_OK
    except psycopg.Error:  # no answer at all: the socket is gone
        began = False
    if not began:
        raise sa.exc.InvalidatePoolError(pgconn.get_error_message().strip())


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # SQLAlchemy's begin event issues BEGIN itself
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # FULL: a 2xx means the call survives a power cut, not only a process crash.
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


class Database:
    """Runs blocking SQLAlchemy work off the event loop, one transaction per call."""

    def __init__(self, url: str, busy_timeout: timedelta = timedelta(seconds=2)):
        self.engine = make_engine(url, busy_timeout)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        self._lock: IO[str] | None = None
        # Urgent work (acknowledging webhooks) goes before the worker's backlog. SQLite has one writer: one
        # thread serialises writes instead of contending. PostgreSQL gets POSTGRES_LANES threads.
        self._executor = PriorityLane(1 if self.is_sqlite else POSTGRES_LANES, lambda *spent: self.on_work(*spent))
        #: Called (from a database thread) each time storage is unavailable: the metrics count it.
        self.on_unavailable: Callable[[], None] = lambda: None
        #: Called (from a database thread) after each piece of work with its wall and CPU seconds: the metrics
        #: add them up, so that a database thread always busy (where calls queue near capacity) shows.
        self.on_work: Callable[[float, float], None] = lambda busy, cpu: None
        #: SQLite's database thread keeps its connection between transactions (`_on_kept`).
        self._kept: Connection | None = None

    def transaction(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(conn, *args) in one transaction, in the calling thread; again when a key it found free was
        taken meanwhile (FOUND_FREE)."""
        runs = 1
        while True:
            try:
                with self.engine.connect() as conn:  # closing a connection rolls back
                    return _committed(conn, fn, args)
            except sa.exc.OperationalError as exc:
                raise self._unavailable(exc) from exc
            except sa.exc.IntegrityError as exc:
                if runs == RUNS or getattr(getattr(exc.orig, "diag", None), "constraint_name", None) not in FOUND_FREE:
                    raise
                runs += 1

    async def run(self, fn: Callable[..., T], *args: Any, urgent: bool = False) -> T:
        """Run fn(conn, *args) in one transaction on a database thread; `urgent` work goes first."""
        work = self._on_kept if self.is_sqlite else self.transaction
        return await asyncio.wrap_future(self._executor.submit_with(urgent, work, fn, *args))

    def _on_kept(self, fn: Callable[..., T], *args: Any) -> T:
        """`transaction` on the connection that SQLite's one database thread keeps between transactions: taking
        one from the pool and giving it back (its reset, SQLAlchemy's Connection) cost 3.8 % of the instructions
        per e-mail when webhooks come one at a time (docs/performance.md, session 14). PostgreSQL's threads still
        take one per transaction: their BEGIN at check-out is the check that the server is still there."""
        conn = self._kept
        if conn is None:
            conn = self._kept = self.engine.connect()
        try:
            return _committed(conn, fn, args)
        except sa.exc.OperationalError as exc:
            self._drop_kept(conn)  # whatever state it is in, the next transaction starts on a fresh connection
            raise self._unavailable(exc) from exc
        except BaseException:
            try:
                conn.rollback()  # as giving it back to the pool would
            except sa.exc.DBAPIError:
                self._drop_kept(conn)
            raise

    def _drop_kept(self, conn: Connection) -> None:
        self._kept = None
        conn.invalidate()

    def _unavailable(self, exc: sa.exc.OperationalError) -> StorageUnavailable:
        self.on_unavailable()  # a lock past busy_timeout counts too (docs/metrics.md)
        said = str(exc.orig or exc).splitlines()[0]
        return (TransactionConflict if getattr(exc.orig, "sqlstate", None) in CONFLICTS else StorageUnavailable)(said)

    def lock_sqlite_file(self) -> None:
        """SQLite serves one process: a second `declic serve` on the same file refuses to start.

        The lock is the kernel's (flock), so a killed process never leaves it behind.
        """
        database = self.engine.url.database
        if not self.is_sqlite or not database or database == ":memory:":
            return
        handle = open(f"{database}.lock", "a+")  # noqa: SIM115  (held for the process's life)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise ConfigError(
                [
                    f"{database} is in use by another declic process: SQLite serves one process "
                    "(use PostgreSQL to run several)"
                ]
            ) from None
        self._lock = handle

    def upgrade(self) -> None:
        with self.engine.begin() as conn:
            config = _alembic_config()
            config.attributes["connection"] = conn
            command.upgrade(config, "head")

    def is_current(self) -> bool:
        with self.engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
        return current == ScriptDirectory.from_config(_alembic_config()).get_current_head()

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        if self._kept is not None:
            self._kept.close()
            self._kept = None
        self.engine.dispose()
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def _committed(conn: Connection, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
    """fn(conn, *args), then what it queued and the COMMIT (store/appends.py); raises before committing."""
    with appends.queued(conn):
        result = fn(conn, *args)
        appends.commit(conn)
        return result


class Grouped(Generic[I, R]):
    """`await grouped(item)` runs work(conn, item); items that arrive while a transaction runs share the
    next one, so a busy worker pays one commit for many steps and an idle one waits for nobody. The items of a
    transaction run inside `ahead(conn, items)`, when given.

    If a shared transaction fails, its items run again one transaction each, so a bad item fails alone.

    The transactions run in a task of their own. A caller that ran them until no item waited stayed there as long
    as items kept coming: seconds, at a few hundred webhooks/s, with its own step prepared and not sent
    (docs/performance.md, session 17).
    """

    def __init__(
        self,
        db: Database,
        work: Callable[[Any, I], R],
        ahead: Callable[[Any, list[I]], AbstractContextManager[object]] | None = None,
    ) -> None:
        self._db, self._work, self._ahead = db, work, ahead
        self._pending: list[tuple[I, asyncio.Future[R]]] = []
        self._flushing: asyncio.Task[None] | None = None

    async def __call__(self, item: I) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._flushing is None:
            self._flushing = asyncio.create_task(self._flush_pending())
        return await future

    async def finish(self) -> None:
        """Wait for the transactions under way and those of the items waiting (a stopping worker). A waiter
        cancelled meanwhile (a second Ctrl-C) leaves them to commit: a send's record dropped would send it again."""
        if self._flushing is not None:
            await asyncio.wait([self._flushing])  # gather would cancel the flush with its waiter

    async def _flush_pending(self) -> None:
        batch: list[tuple[I, asyncio.Future[R]]] = []
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                await self._flush(batch)
        finally:
            self._flushing = None
            for _, waiting in batch:  # cancelled mid-flush: nobody may wait forever
                if not waiting.done():
                    waiting.cancel()

    def _all(self, conn: Any, items: list[I]) -> list[R]:
        # `ahead`: e.g. one statement reads for all the items what each would read on its own.
        with self._ahead(conn, items) if self._ahead else contextlib.nullcontext():
            return [self._work(conn, item) for item in items]

    async def _flush(self, batch: list[tuple[I, asyncio.Future[R]]]) -> None:
        try:
            outcomes = await together_or_alone(self._db, self._all, [item for item, _ in batch])
        except StorageUnavailable as exc:  # every item hears it
            outcomes = [Failed(exc)] * len(batch)
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if future.done():  # its caller was cancelled
                continue
            if isinstance(outcome, Failed):
                future.set_exception(outcome.error)
            else:
                future.set_result(outcome)


@dataclass(frozen=True)
class Failed:
    """An item that failed in its own transaction (see together_or_alone)."""

    error: Exception


async def together_or_alone(
    db: Database, work: Callable[[Any, list[I]], list[R]], items: list[I], conflicts_alone: bool = True
) -> list[R | Failed]:
    """work(conn, items) in one transaction, giving one result per item. If that fails, each item runs
    again in a transaction of its own, so a bad item fails alone and the others go through.

    StorageUnavailable is the database, not an item: raised when the shared transaction meets it (nothing is
    written); met while the items run alone, it ends the run, and it is the outcome of that item and of every
    item after it, while the items before keep theirs (they are written: told otherwise, a caller would do them
    again). A TransactionConflict is an item's (`conflicts_alone`): one step's contact locked elsewhere must not
    fail a send's record that shared its transaction (the send would be made again). Without it, a conflict is
    the database's: for calls, a lock of the moment must not fail a call for good.
    """

    try:
        return list(await db.run(work, items))
    except Exception as exc:
        if _the_database(exc, conflicts_alone):
            raise
        if len(items) == 1:
            return [Failed(exc)]
    return await one_by_one(db, work, items, conflicts_alone)


async def one_by_one(
    db: Database,
    work: Callable[[Any, list[I]], list[R]],
    items: list[I],
    conflicts_alone: bool = True,
    urgent: bool = False,
) -> list[R | Failed]:
    """work(conn, [item]) for each item in a transaction of its own: together_or_alone's second half, for a
    caller whose shared transaction failed otherwise (the inbox's group commit)."""
    outcomes: list[R | Failed] = []
    for item in items:
        try:
            outcomes += await db.run(work, [item], urgent=urgent)
        except Exception as exc:
            if _the_database(exc, conflicts_alone):
                return outcomes + [Failed(exc)] * (len(items) - len(outcomes))
            outcomes.append(Failed(exc))
    return outcomes


def _the_database(exc: Exception, conflicts_alone: bool) -> bool:
    return isinstance(exc, StorageUnavailable) and not (conflicts_alone and isinstance(exc, TransactionConflict))


class PriorityLane(Executor):
    """A few threads, two queues in one: urgent work runs before everything queued behind it. `on_work` hears the
    wall and CPU seconds each piece of work took, on its thread."""

    def __init__(self, threads: int = 1, on_work: Callable[[float, float], None] = lambda busy, cpu: None) -> None:
        self._on_work = on_work
        self._queue: queue.PriorityQueue[tuple[int, int, Any]] = queue.PriorityQueue()
        self._order = itertools.count()
        self._closed, self._closing = False, threading.Lock()
        self._threads = [
            threading.Thread(target=self._serve, name=f"declic-db-{n}", daemon=True) for n in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        return self.submit_with(False, fn, *args, **kwargs)

    def submit_with(self, urgent: bool, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        with self._closing:
            if self._closed:  # as any Executor: no thread would ever run it
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._queue.put((0 if urgent else 1, next(self._order), (future, fn, args, kwargs)))
        return future

    def _serve(self) -> None:
        while True:
            _, _, work = self._queue.get()
            if work is None:
                return
            future, fn, args, kwargs = work
            if not future.set_running_or_notify_cancel():
                continue
            began, cpu = time.perf_counter(), time.thread_time()
            result, error = None, None
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                error = exc
            self._on_work(time.perf_counter() - began, time.thread_time() - cpu)  # before the caller hears
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._closing:
            self._closed = True
            alive = [thread for thread in self._threads if thread.is_alive()]
            for _ in alive:  # one stop per thread, after everything already queued
                self._queue.put((2, next(self._order), None))
        if wait:
            for thread in alive:
                thread.join()


def _alembic_config() -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config
