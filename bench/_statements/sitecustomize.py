"""Loaded into `declic serve` by `bench/e2e.py --statements` (through PYTHONPATH): counts the SQL statements
and transactions the server runs, by statement, between SIGUSR1 (start afresh) and SIGUSR2 (write them as
JSON to $DECLIC_STATEMENTS_OUT). A profile, not a timing: the same load gives the same counts."""

from __future__ import annotations

import collections
import json
import os
import signal
import threading

from sqlalchemy import event
from sqlalchemy.engine import Engine

_lock = threading.Lock()
_statements: collections.Counter[str] = collections.Counter()
_transactions = [0]


@event.listens_for(Engine, "before_cursor_execute")
def _statement(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
    text = " ".join(statement.split())
    with _lock:
        _statements[text[:160]] += 1


@event.listens_for(Engine, "begin")
def _begin(conn):  # type: ignore[no-untyped-def]
    with _lock:
        _transactions[0] += 1


def _restart(signum, frame):  # type: ignore[no-untyped-def]
    with _lock:
        _statements.clear()
        _transactions[0] = 0


def _write(signum, frame):  # type: ignore[no-untyped-def]
    with _lock:
        counts = {"transactions": _transactions[0], "statements": dict(_statements)}
    with open(os.environ["DECLIC_STATEMENTS_OUT"], "w") as out:
        json.dump(counts, out)


signal.signal(signal.SIGUSR1, _restart)
signal.signal(signal.SIGUSR2, _write)
