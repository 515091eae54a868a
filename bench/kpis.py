"""KPI benchmark: `declic kpis` over a million deliveries on SQLite.

    .venv/bin/python bench/kpis.py                      # 1,000,000 deliveries over 20 rules (~1 min)
    .venv/bin/python bench/kpis.py --deliveries 100000  # a quick look

A benchmark, not a test: it prints figures and asserts nothing about timings. A fresh SQLite
file is migrated to the current schema and filled with INSERT ... SELECT: --deliveries sent
messages over --rules rules, 3 steps each, spread over 90 days, a third with provider feedback,
half of them with an A/B variant (a or b);
one enrolment per first step (a tenth held out) and one conversion per twentieth. Then, each
the median of --runs runs:
- baseline: `SELECT count(*) FROM deliveries` (a full pass over the table);
- one rule over 30 days and over the 90 days, and every rule over 30 days (insight/kpis.py);
- the same one-rule query without the KPI indexes, to show what they are worth.
Times are printed with their ratio to the baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from declic_gateway.insight.kpis import rule_kpis
from declic_gateway.store import Database

END = datetime(2026, 12, 1, tzinfo=UTC)
DAYS = 90


def fill(db: Database, deliveries: int, rules: int) -> None:
    """Bulk rows with a recursive counter: seconds, not minutes, for a million."""
    start = (END - timedelta(days=DAYS)).strftime("%Y-%m-%d %H:%M:%S")
    spread = DAYS * 86400
    with db.engine.begin() as conn:
        conn.execute(
            sa.text(
                f"""
            WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {deliveries})
            INSERT INTO deliveries (idempotency_key, enrolment_id, rule, step, contact_id, sink, kind, status,
                                    sent_at, attempts, feedback, variant, created_at, updated_at)
            SELECT 'k' || i, i / 3 + 1, 'rule-' || (i % {rules}), i % 3 + 1, i / 3 + 1, 'email', 'marketing', 'sent',
                   datetime('{start}', '+' || ((i * 7919) % {spread}) || ' seconds'), 1,
                   CASE i % 3 WHEN 0 THEN 'delivered,opened' WHEN 1 THEN 'clicked,delivered,opened' END,
                   CASE WHEN i % 2 = 0 THEN CASE i % 4 WHEN 0 THEN 'a' ELSE 'b' END END,
                   datetime('{start}'), datetime('{start}')
            FROM n
            """
            )
        )
        conn.execute(
            sa.text(
                """
            INSERT INTO enrolments (id, rule, contact_id, event_id, occurrence, status, held_out, created_at)
            SELECT enrolment_id, rule, contact_id, 'e' || enrolment_id, 'o' || enrolment_id, 'completed',
                   enrolment_id % 10 = 0, sent_at
            FROM deliveries WHERE step = 1
            """
            )
        )
        conn.execute(
            sa.text(
                """
            INSERT INTO conversions (rule, contact_id, enrolment_id, step, delivery_id, held_out, event_id, at,
                                     revenue, currency)
            SELECT rule, contact_id, enrolment_id, step, id, 0, 'g' || id, sent_at, 42.5, 'EUR'
            FROM deliveries WHERE id % 20 = 0
            """
            )
        )
        conn.execute(sa.text("ANALYZE"))


#: CPU seconds of the last median_seconds() call's median run: SQLite answers in this thread, so on a
#: machine shared with other work the CPU time is what a quiet machine's wall time would be.
cpu_of_median = 0.0


def median_seconds(work: Callable[[], object], runs: int) -> float:
    global cpu_of_median
    times = []
    for _ in range(runs):
        began, cpu = time.perf_counter(), time.process_time()
        work()
        times.append((time.perf_counter() - began, time.process_time() - cpu))
    times.sort()
    took, cpu_of_median = times[len(times) // 2]
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deliveries", type=int, default=1_000_000)
    parser.add_argument("--rules", type=int, default=20)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        db = Database(f"sqlite:///{folder}/kpis.db")
        db.upgrade()
        began = time.perf_counter()
        fill(db, args.deliveries, args.rules)
        print(f"filled {args.deliveries:,} deliveries over {args.rules} rules in {time.perf_counter() - began:.1f}s")
        month = (END - timedelta(days=30), END)
        quarter = (END - timedelta(days=DAYS), END)
        every = [f"rule-{i}" for i in range(args.rules)]

        def query(rules: list[str], span: tuple[datetime, datetime]) -> Callable[[], object]:
            return lambda: db.transaction(rule_kpis, rules, *span)

        baseline = median_seconds(
            lambda: db.transaction(lambda c: c.execute(sa.text("SELECT count(*) FROM deliveries")).scalar()),
            args.runs,
        )
        print(f"baseline, count(*) over deliveries: {baseline * 1000:.1f} ms")
        cases = [
            ("one rule, 30 days", query(["rule-3"], month)),
            ("one rule, 90 days", query(["rule-3"], quarter)),
            (f"all {args.rules} rules, 30 days", query(every, month)),
        ]
        for name, work in cases:
            took = median_seconds(work, args.runs)
            print(f"{name}: {took * 1000:.1f} ms, CPU {cpu_of_median * 1000:.1f} ms ({took / baseline:.2f}x baseline)")
        with db.engine.begin() as conn:
            for index in ("ix_deliveries_kpi", "ix_enrolments_kpi", "ix_conversions_rule_at"):
                conn.execute(sa.text(f"DROP INDEX {index}"))
        took = median_seconds(query(["rule-3"], month), args.runs)
        print(f"one rule, 30 days, without the KPI indexes: {took * 1000:.1f} ms ({took / baseline:.2f}x baseline)")
        db.close()


if __name__ == "__main__":
    main()
