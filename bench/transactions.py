"""What one of Declic's transactions costs on PostgreSQL, in round trips' worth of time.

    .venv/bin/python bench/transactions.py [--postgres URL] [--transactions 2000] [--rounds 5] [--delay MS]
                                           [--emails N]

On a fresh database (dropped afterwards), in this process, it times `Database.transaction` for
two kinds of work, each `--transactions` times per round:
- `empty`: one SELECT 1, what every transaction pays around its work (checkout, BEGIN, COMMIT);
- `queued`: four rows queued on the transaction (an event, a journal row, a step and a finished job, as
  applying a call queues them: store/appends.py), then written with the COMMIT; with `--emails N`, N
  such sets, as a transaction that applies N calls writes N rows with each statement.
The baseline, measured in the same run on a connection of its own: one bare round trip (a SELECT 1
in autocommit, psycopg alone). Each kind is printed as wall time and CPU per transaction, and as
round trips' worth of wall time: what a change to the transaction's round trips saves shows there,
whatever the machine's speed. Beside it, the CPU the database's server processes used per transaction
(the bench database's backends and the WAL writer; the server must run on this machine). `--delay MS`
puts a proxy (a process of its own) between this process and the server that holds each packet MS
milliseconds each way: a database on another host, where every round trip costs what the network does, as
in most deployments on PostgreSQL. Run it from each checkout to compare two commits. A benchmark, not a
test: it asserts nothing about timings.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa
from _common import cpu_seconds, delaying_proxy, machine

from declic_gateway.insight import journal
from declic_gateway.kit.events import ContactRef, Event
from declic_gateway.pipeline.eventlog import store_event
from declic_gateway.store import ENROLMENTS, Database, jobqueue
from declic_gateway.store.db import normalize_url

NOW = datetime(2026, 6, 1, tzinfo=UTC)


SELECT_1 = sa.select(sa.literal(1))
#: As applying a call reads or writes enrolments between its queued rows (which it never writes first).
OWN_STATEMENT = sa.select(ENROLMENTS.c.id).where(ENROLMENTS.c.id == -1)
EVENT_IDS = itertools.count()


def empty(conn: sa.Connection, _: int) -> None:
    conn.execute(SELECT_1)


def queued(conn: sa.Connection, n: int, emails: int = 1) -> None:
    for _ in range(emails):
        event = Event(
            id=f"e{next(EVENT_IDS)}", source="bench", type="order.placed", occurred_at=NOW, contact=ContactRef()
        )
        store_event(conn, event, 1)
        journal.record(conn, NOW, "bench", 1, "enrolled", event_id=event.id)
        conn.execute(OWN_STATEMENT)
        jobqueue.add_step(conn, n, 0, NOW, NOW, 0)
        jobqueue.finish_queued(conn, jobqueue.ClaimedJob(n, "step", None, n, 0, NOW, 1), "bench", NOW)


def timed(run: Callable[[int], Any], count: int, server: Callable[[], float]) -> tuple[float, float, float]:
    """Wall, CPU and the database server's CPU seconds per call of run(i), for i in range(count)."""
    wall, cpu, served = time.perf_counter(), time.process_time(), server()
    for i in range(count):
        run(i)
    return (time.perf_counter() - wall) / count, (time.process_time() - cpu) / count, (server() - served) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test", metavar="URL")
    parser.add_argument("--transactions", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--delay", type=float, default=0.0, metavar="MS", help="network delay each way (ms)")
    parser.add_argument("--emails", type=int, default=1, metavar="N", help="e-mails' rows per queued transaction")
    args = parser.parse_args()
    print("machine:", machine())

    base = sa.make_url(normalize_url(args.postgres))
    name = f"declic_bench_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    target = base.set(database=name)
    delayed = None
    if args.delay:
        delayed, port = delaying_proxy(base.host or "127.0.0.1", base.port or 5432, args.delay)
        target = target.set(host="127.0.0.1", port=port)
        print(f"through a proxy that holds each packet {args.delay} ms each way")
    db = Database(target.render_as_string(hide_password=False))
    try:
        db.upgrade()
        bare = psycopg.connect(target.set(drivername="postgresql").render_as_string(False), autocommit=True)
        kinds: dict[str, Callable[[int], Any]] = {
            "round trip": lambda i: bare.execute("SELECT 1").fetchone(),
            "empty": lambda i: db.transaction(empty, i),
            "queued": lambda i: db.transaction(queued, i, args.emails),
        }
        server = lambda: sum(server_cpu(admin, name).values())  # noqa: E731
        for run in kinds.values():  # warm up: connections, compiled statements, prepared statements
            timed(run, 200, server)
        results: dict[str, list[tuple[float, float, float]]] = {kind: [] for kind in kinds}
        for _ in range(args.rounds):  # interleaved, so that a slower minute weighs on each kind alike
            for kind, run in kinds.items():
                results[kind].append(timed(run, args.transactions, server))
        bare.close()
    finally:
        db.close()
        if delayed is not None:
            delayed.terminate()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    trip = statistics.median(wall for wall, _, _ in results["round trip"])
    print(f"{args.rounds} rounds of {args.transactions} each ({args.emails} e-mails' rows queued); medians:")
    for kind, rounds in results.items():
        wall = statistics.median(w for w, _, _ in rounds)
        cpu = statistics.median(c for _, c, _ in rounds)
        served = statistics.median(s for _, _, s in rounds)
        print(
            f"  {kind:>10}: {wall * 1e6:6.0f} us wall, {cpu * 1e6:6.0f} us CPU here, {served * 1e6:6.0f} us the"
            f" database's, {wall / trip:4.1f} round trips' worth"
        )


def server_cpu(admin: sa.Engine, name: str) -> dict[int, float]:
    """CPU seconds so far of the database's backends connected to `name`, and of its WAL writer."""
    query = "SELECT pid FROM pg_stat_activity WHERE datname = :name OR backend_type = 'walwriter'"
    with admin.connect() as conn:
        pids = conn.execute(sa.text(query), {"name": name}).scalars().all()
    return {pid: cpu_seconds(pid) for pid in pids if Path(f"/proc/{pid}").exists()}


if __name__ == "__main__":
    main()
