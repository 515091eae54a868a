"""History benchmark: what `contact.count(...)` and the other helpers of `if:` cost as the events table grows.

    .venv/bin/python bench/history.py                       # 100k and 1M events of other contacts (~1 min)
    .venv/bin/python bench/history.py --sizes 10000,100000  # a quick look

A benchmark, not a test: it prints figures and asserts nothing about timings. For each size, a fresh
SQLite file is migrated to the current schema and filled with INSERT ... SELECT: --sizes events of
other contacts (page views and orders, spread over 90 days), plus one contact with --own events of its
own. Then, each the median of --runs runs of the one contact's questions (pipeline/history.py):
count within 7 days; count with a `where=` over its page views; has; last; sent. Times are printed
with their ratio to the same question at the smallest size: flat ratios are the point (the cost
follows the contact's history, not the table).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from datetime import UTC, datetime

import sqlalchemy as sa

from declic_gateway.kit.templating import compile_condition, evaluate, make_environment
from declic_gateway.pipeline.history import ContactView, Wheres
from declic_gateway.store import Database

NOW = datetime(2026, 12, 1, tzinfo=UTC)
ME = 1
QUESTIONS = {
    "count within 7d": "contact.count('page.viewed', within='7d')",
    "count where=": "contact.count('page.viewed', where=\"event.properties.path == '/pricing'\")",
    "has": "contact.has('order.placed')",
    "last": "contact.last('page.viewed')",
    "sent within 30d": "contact.sent(rule='welcome', within='30d')",
}


def fill(db: Database, others: int, own: int) -> None:
    spread = 90 * 86400
    rows = """
        WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {count})
        INSERT INTO events (id, source, type, occurred_at, contact_id, correlation, properties)
        SELECT '{prefix}' || i, 'bench', CASE i % 5 WHEN 0 THEN 'order.placed' ELSE 'page.viewed' END,
               datetime('2026-09-02', '+' || ((i * 7919) % {spread}) || ' seconds'), {contact},
               '[]', CASE i % 2 WHEN 0 THEN '{{"path": "/pricing"}}' ELSE '{{"path": "/about"}}' END
        FROM n
    """
    with db.engine.begin() as conn:
        conn.execute(sa.text(rows.format(count=others, prefix="o", spread=spread, contact="2 + i % 50000")))
        conn.execute(sa.text(rows.format(count=own, prefix="m", spread=spread, contact=ME)))
        conn.execute(
            sa.text(
                f"""
            WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {others // 10})
            INSERT INTO deliveries (idempotency_key, enrolment_id, rule, step, contact_id, sink, kind, status,
                                    sent_at, attempts, created_at, updated_at)
            SELECT 'k' || i, i, 'welcome', 1, CASE i % 1000 WHEN 0 THEN {ME} ELSE 2 + i % 50000 END, 'email',
                   'marketing', 'sent', datetime('2026-09-02', '+' || ((i * 7919) % {spread}) || ' seconds'), 1,
                   datetime('2026-09-02'), datetime('2026-09-02')
            FROM n
        """
            )
        )
        conn.exec_driver_sql("ANALYZE")


def timed(db: Database, expression: str, runs: int) -> float:
    env = make_environment(None)
    condition, wheres = compile_condition(env, expression), Wheres(env)
    times = []
    with db.engine.begin() as conn:
        for _ in range(runs):
            view = ContactView({"id": ME}, conn, NOW, wheres)
            start = time.perf_counter()
            evaluate(condition, {"contact": view})
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000", help="events of other contacts, comma-separated")
    parser.add_argument("--own", type=int, default=200, help="events of the contact asked about")
    parser.add_argument("--runs", type=int, default=51)
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    results: dict[int, dict[str, float]] = {}
    for size in sizes:
        with tempfile.TemporaryDirectory() as folder:
            db = Database(f"sqlite:///{folder}/history.db")
            db.upgrade()
            started = time.perf_counter()
            fill(db, size, args.own)
            print(f"{size:>9,} other events, {args.own} own: filled in {time.perf_counter() - started:.1f}s")
            results[size] = {name: timed(db, expression, args.runs) for name, expression in QUESTIONS.items()}
            db.close()
    print(f"\n{'question':<18}" + "".join(f"{size:>16,}" for size in sizes))
    for name in QUESTIONS:
        first = results[sizes[0]][name]
        cells = "".join(f"{results[s][name] * 1e3:>9.3f}ms {results[s][name] / first:>4.1f}x" for s in sizes)
        print(f"{name:<18}{cells}")


if __name__ == "__main__":
    main()
