"""Writes done at the end of their transaction: the events, the decisions journal, the consent ledger, the
copies of sent messages, new steps and finished ones are queued on the connection and written with one
executemany per statement, instead of one statement each.

A transaction applies ten calls or records many sends: that is about seven statements fewer per e-mail, and on
PostgreSQL as many round trips fewer on the path that applies calls one batch after another
(docs/performance.md). Only Database.transaction opens a queue (and drops it when its work raises); anywhere
else `append` writes at once. Nothing is read stale: before any statement that names a table with queued rows
(or whose tables are unknown, such as text), the queue is written first (`write_first`, an engine event).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.util import find_tables

from . import sql

#: Where the queue lives while a transaction runs: the connection's `info` (removed when it ends).
_KEY = "declic.appends"
#: Execution option of a statement that reads and writes no table (PostgreSQL's NOTIFY): it never writes the queue.
NO_TABLE = "declic_no_table"
T = TypeVar("T")
_PG = postgresql.dialect()
#: A type's length in its name, `VARCHAR(100)`.
_TYPE_LENGTH = re.compile(r"\(\d+\)")


class _Queue:
    """The rows waiting, by statement in the order statements first came, and the tables those statements name:
    each statement run checks its tables against that one set (it was checked against each queued statement's,
    a few percent of a busy process's time)."""

    __slots__ = ("rows", "tables")

    def __init__(self) -> None:
        self.rows: dict[sa.Executable, list[dict[str, Any]]] = {}
        self.tables: set[str] = set()

    def __bool__(self) -> bool:
        return bool(self.rows)

    def add(self, statement: sa.Executable, row: dict[str, Any]) -> None:
        rows = self.rows.get(statement)
        if rows is None:
            rows = self.rows[statement] = []
            self.tables |= _tables(statement) or frozenset()
        rows.append(row)


def append(conn: Connection, statement: sa.Insert | sa.Update | sa.TextClause, row: dict[str, Any]) -> None:
    """Run `statement` with `row` before this transaction commits (at once when no queue is open): for writes
    whose outcome (a row count, a returned id) nobody needs. An INSERT is built `.inline()`, so that SQLAlchemy
    reads no generated id back: on PostgreSQL the queue goes out in a pipeline, where nothing is read."""
    queued: _Queue | None = conn.info.get(_KEY)
    if queued is None:
        conn.execute(statement, row)
    else:
        queued.add(statement, row)


def pending(conn: Connection, statement: sa.Executable) -> list[dict[str, Any]]:
    """The rows of `statement` still queued in this transaction, in the order they came (none when nothing is)."""
    queued: _Queue | None = conn.info.get(_KEY)
    return queued.rows.get(statement, []) if queued else []


def flush(conn: Connection) -> None:
    """Write what is queued now, table by table, each table's rows in the order they came. The queue is swapped
    for an empty one first: nothing runs between its statements, so none of them need look at the rest."""
    queued: _Queue | None = conn.info.get(_KEY)
    if not queued:
        return
    conn.info[_KEY] = _Queue()
    for statement, rows in queued.rows.items():
        _executemany(conn, statement, rows)


def commit(conn: Connection) -> None:
    """Write what is queued, then commit. On PostgreSQL the rows go out with the COMMIT in one pipeline
    (`sql.pipelined`): two round trips (the COMMIT's and the pipeline's end) for any number of statements,
    where each took one before the COMMIT's own."""
    queued: _Queue | None = conn.info.get(_KEY)
    if not queued:
        conn.commit()
        return
    with sql.pipelined(conn):
        flush(conn)
        conn.commit()


def _executemany(conn: Connection, statement: sa.Executable, rows: list[dict[str, Any]]) -> None:
    """`conn.execute(statement, rows)`, with each row's values bound as SQLAlchemy binds them (the columns' own
    types) and handed to the driver in the compiled statement's order. SQLAlchemy builds and processes each row's
    parameters again on every run, a cost per row that is most of what writing one costs Python here: 8.75 ->
    8.32 M instructions per e-mail (docs/performance.md, session 18). A statement this does not cover (defaults
    computed in Python, expanding or escaped parameters, rows naming different columns) goes through SQLAlchemy."""
    keys = rows[0].keys()
    plan = _plan(statement, conn.dialect, tuple(keys)) if isinstance(statement, (sa.Insert, sa.Update)) else None
    if plan is None or any(row.keys() != keys for row in rows):
        conn.execute(statement, rows)
        return
    if plan.arrays is not None and len(rows) >= ARRAYS_FROM:
        columns = zip(*(plan.values(row) for row in rows), strict=True)
        conn.exec_driver_sql(plan.arrays, dict(zip(plan.names, map(list, columns), strict=True)))
        return
    conn.exec_driver_sql(plan.sql, [plan.parameters(row) for row in rows])


class _Plan:
    """A statement compiled for one set of row keys, and how each of its parameters is bound. `arrays`: on
    PostgreSQL, the same INSERT taking all its rows at once, a column per array (see `_arrays`)."""

    __slots__ = ("arrays", "binds", "names", "positional", "sql")

    def __init__(self, sql: str, binds: list[tuple[str, Any, Any]], positional: bool, arrays: str | None) -> None:
        self.sql, self.binds, self.positional, self.arrays = sql, binds, positional, arrays
        self.names = [name for name, _, _ in binds]

    def parameters(self, row: dict[str, Any]) -> tuple[Any, ...] | dict[str, Any]:
        """`values(row)` in the statement's order (qmark: SQLite) or by name (pyformat: psycopg)."""
        values = self.values(row)
        return tuple(values) if self.positional else dict(zip(self.names, values, strict=True))

    def values(self, row: dict[str, Any]) -> list[Any]:
        """The row's values (or the statement's own, for parameters the row does not name), each through its
        type's bind processor, in the statement's order."""
        return [
            (value if process is None else process(value))
            for name, default, process in self.binds
            for value in (row.get(name, default),)
        ]


#: Plans by (statement id, dialect, row keys): see `_memo`.
_PLANS: dict[tuple[int, str, tuple[str, ...]], tuple[Any, _Plan | None]] = {}


def _plan(statement: sa.Insert | sa.Update, dialect: Any, keys: tuple[str, ...]) -> _Plan | None:
    return _memo(_PLANS, statement, (id(statement), dialect.name, keys), lambda: _make_plan(statement, dialect, keys))


def _make_plan(statement: sa.Insert | sa.Update, dialect: Any, keys: tuple[str, ...]) -> _Plan | None:
    compiled = statement.compile(dialect=dialect, column_keys=list(keys), for_executemany=True)
    assert isinstance(compiled, SQLCompiler)
    if compiled.insert_prefetch or compiled.update_prefetch or compiled.escaped_bind_names:
        return None  # defaults SQLAlchemy computes per row, names the driver sees otherwise
    names = compiled.positiontup if compiled.positional else list(compiled.bind_names.values())
    if names is None or not set(names) <= compiled.binds.keys():
        return None
    binds = []
    for name in names:
        bind = compiled.binds[name]
        if bind.expanding or bind.literal_execute or bind.callable is not None:
            return None
        if bind.required and name not in keys:
            return None  # SQLAlchemy says which value is missing
        process = bind.type.dialect_impl(dialect).bind_processor(dialect)
        binds.append((name, None if bind.required else bind.value, process))
    arrays = _arrays(statement, compiled.string, names) if dialect.name == "postgresql" else None
    return _Plan(compiled.string, binds, compiled.positional, arrays)


#: Rows of one INSERT from which PostgreSQL takes them as arrays (`_arrays`): `bench/transactions.py`, four
#: statements with N rows each, against one statement per row: at 3 rows 15 % more CPU here and 6-15 % more in
#: the database (the arrays are built and parsed as text); at 8, 7-15 % less here and 19 % less there; at 16, 20 %
#: less there (docs/performance.md, session 24).
ARRAYS_FROM = 8
#: A compiled INSERT's VALUES on PostgreSQL: its bind parameters, each with the cast SQLAlchemy gives it, if any.
_VALUES = re.compile(r" VALUES \(((?:%\(\w+\)s(?:::[A-Z ]+)?(?:, )?)+)\)")
_VALUE = re.compile(r"%\((\w+)\)s(?:::([A-Z ]+))?")


def _arrays(statement: sa.Insert | sa.Update, compiled: str, names: list[str]) -> str | None:
    """`INSERT INTO t (a, b) VALUES (%(a)s, %(b)s)` as `INSERT INTO t (a, b) SELECT * FROM unnest(%(a)s::A[], ...)`:
    one statement for all the rows, where psycopg's executemany sends one per row, each executed on its own (an
    e-mail's contact alone writes four identities). The rows go in the arrays' order (a function scan's). Each
    array is cast to its column's type without length (a length would cut a value too long where the column
    refuses it). Not for an upsert: `ON CONFLICT DO UPDATE` cannot change a row twice in one statement, as two
    rows of the queue might."""
    if not isinstance(statement, sa.Insert) or not isinstance(statement.table, sa.Table) or " DO UPDATE " in compiled:
        return None
    found = _VALUES.search(compiled)
    if found is None:
        return None
    values = [_VALUE.fullmatch(item) for item in found.group(1).split(", ")]
    if any(value is None for value in values) or [value[1] for value in values if value] != names:
        return None
    columns = statement.table.c
    casts = []
    for value in values:
        assert value is not None
        if value[1] not in columns:
            return None
        cast = value[2] or _TYPE_LENGTH.sub("", columns[value[1]].type.compile(dialect=_PG))
        casts.append(f"%({value[1]})s::{cast}[]")
    return f"{compiled[: found.start()]} SELECT * FROM unnest({', '.join(casts)}){compiled[found.end() :]}"


@contextlib.contextmanager
def queued(conn: Connection) -> Iterator[None]:
    """Queue appended rows while the block runs; the block flushes them before it commits (Database.transaction
    sends both together). Rows still queued when the block ends are dropped: it raised, the transaction rolls
    back anyway."""
    conn.info[_KEY] = _Queue()
    try:
        yield
    finally:
        conn.info.pop(_KEY, None)


def write_first(conn: Connection, statement: Any, *_: Any) -> None:
    """`before_execute` listener: a statement that may read or change a table with queued rows runs after them."""
    queued: _Queue | None = conn.info.get(_KEY)
    if not queued:
        return
    if isinstance(statement, sa.Executable) and statement.get_execution_options().get(NO_TABLE):
        return
    names = _tables(statement)
    if names is None or not names.isdisjoint(queued.tables):
        with sql.pipelined(conn):  # on PostgreSQL, one round trip for all the statements queued
            flush(conn)


#: The tables each statement names, by id: see `_memo`.
_TABLES: dict[int, tuple[Any, frozenset[str] | None]] = {}


def _tables(statement: Any) -> frozenset[str] | None:
    """The tables a statement names, subqueries included; None when that cannot be known (text)."""

    def named() -> frozenset[str] | None:
        tables = find_tables(statement, include_crud=True) if isinstance(statement, sa.ClauseElement) else []
        return frozenset(table.name for table in tables if isinstance(table, sa.Table)) or None

    return _memo(_TABLES, statement, id(statement), named)


def _memo(cache: dict[Any, tuple[Any, T]], statement: Any, key: Any, make: Callable[[], T]) -> T:
    """`make()`, kept in `cache` under `key`, which holds the statement's id: the statement is kept beside the value
    so that its id is not reused. The hot paths' statements are built once, so caches stay small; those built on
    each call are found again, and a cache is emptied past 4,096."""
    found = cache.get(key)
    if found is None or found[0] is not statement:
        if len(cache) >= 4096:
            cache.clear()
        found = cache[key] = (statement, make())
    return found[1]
