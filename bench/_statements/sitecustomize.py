"""Loaded into `declic serve` by `bench/e2e.py --statements` (through PYTHONPATH): counts the SQL statements
and transactions the server runs, by statement, between SIGUSR1 (start afresh) and SIGUSR2 (write them as
JSON to $DECLIC_STATEMENTS_OUT). A profile, not a timing: the same load gives the same counts.

With $DECLIC_STATEMENTS_LOG set (SQLite), it also keeps each statement as the driver got it (its text and
bound values, one list of rows for an executemany) and each COMMIT and ROLLBACK, in order, and writes them
there (pickle) with the counts: bench/_statements/replay.py runs them again on the bare sqlite3 cursor."""

from __future__ import annotations

import collections
import json
import os
import pickle
import signal
import threading

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.engine.interfaces import ExecuteStyle

_lock = threading.Lock()
_statements: collections.Counter[str] = collections.Counter()
_transactions = [0]
_log: list[tuple[str, str | None, object]] | None = [] if os.environ.get("DECLIC_STATEMENTS_LOG") else None


@event.listens_for(Engine, "before_cursor_execute")
def _statement(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
    text = " ".join(statement.split())
    with _lock:
        _statements[text[:160]] += 1
        if _log is not None:
            # SQLAlchemy's "insertmanyvalues" says executemany for each batch it sends as one multi-row INSERT
            many = executemany and getattr(context, "execute_style", None) is not ExecuteStyle.INSERTMANYVALUES
            _log.append(("many" if many else "one", statement, _plain(parameters)))


@event.listens_for(Engine, "commit")
def _commit(conn):  # type: ignore[no-untyped-def]
    if _log is not None:
        with _lock:
            _log.append(("commit", None, None))


@event.listens_for(Engine, "rollback")
def _rollback(conn):  # type: ignore[no-untyped-def]
    if _log is not None:
        with _lock:
            _log.append(("rollback", None, None))


def _plain(value):  # type: ignore[no-untyped-def]
    """Bound values as pickle can keep them (a memoryview becomes the bytes it shows)."""
    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(item) for item in value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


@event.listens_for(Engine, "begin")
def _begin(conn):  # type: ignore[no-untyped-def]
    with _lock:
        _transactions[0] += 1


def _restart(signum, frame):  # type: ignore[no-untyped-def]
    with _lock:
        _statements.clear()
        _transactions[0] = 0
        if _log is not None:
            _log.clear()


def _write(signum, frame):  # type: ignore[no-untyped-def]
    with _lock:
        counts = {"transactions": _transactions[0], "statements": dict(_statements)}
    if _log is not None:
        with _lock:
            kept = list(_log)
        with open(os.environ["DECLIC_STATEMENTS_LOG"], "wb") as log:
            pickle.dump(kept, log)
    with open(os.environ["DECLIC_STATEMENTS_OUT"], "w") as out:
        json.dump(counts, out)


signal.signal(signal.SIGUSR1, _restart)
signal.signal(signal.SIGUSR2, _write)
