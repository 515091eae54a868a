"""On PostgreSQL, the hot path's reads stay cheap whatever the tables' statistics say.

A new deployment's tables have no statistics until autovacuum's first ANALYZE (up to a minute after they
fill), and a small table is scanned rather than probed. These tests run the real statements, then ask
PostgreSQL how it ran them (EXPLAIN ANALYZE, the same statement and parameters, rolled back): a batch's
claim and contact lookup must read the rows they are about, not every processed call or identity kept.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from conftest import postgres_database
from declic_gateway.pipeline import contacts
from declic_gateway.store import jobqueue
from declic_gateway.store.db import make_engine

pytestmark = pytest.mark.postgres

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def engine() -> Iterator[sa.Engine]:
    for url in postgres_database():
        engine = make_engine(url)
        try:
            yield engine
        finally:
            engine.dispose()


def plans_of(
    engine: sa.Engine, work: Callable[[sa.Connection], Any], table: str, explain: str = "ANALYZE, FORMAT JSON"
) -> tuple[Any, list[dict[str, Any]]]:
    """Run `work`, then EXPLAIN ANALYZE each statement it ran that names `table`; its result and their plans."""
    ran: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if f" {table}" in statement:
            ran.append((statement, parameters))

    sa.event.listen(engine, "before_cursor_execute", capture)
    try:
        with engine.begin() as conn:
            result = work(conn)
    finally:
        sa.event.remove(engine, "before_cursor_execute", capture)
    plans = []
    for statement, parameters in ran:
        with engine.connect() as conn:  # rolled back: EXPLAIN ANALYZE of an UPDATE runs it
            cursor = conn.connection.driver_connection.cursor()
            cursor.execute(f"EXPLAIN ({explain}) " + statement, parameters)
            plans.append(cursor.fetchone()[0][0]["Plan"])
            conn.rollback()
    return result, plans


def nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from nodes(child)


def rows_read_for_nothing(plan: dict[str, Any]) -> int:
    """Rows a plan read and then threw away (filtered out, or rechecked out of a bitmap)."""
    return sum(n.get("Rows Removed by Filter", 0) + n.get("Rows Removed by Index Recheck", 0) for n in nodes(plan))


def fill_jobs(engine: sa.Engine, n: int, values: str) -> None:
    """n jobs, `values` for i in 1..n (:t an hour ago), with autovacuum off for the table: no ANALYZE, no VACUUM."""
    columns = "kind, inbox_id, enrolment_id, step, priority, due_at, status, attempts, created_at, updated_at"
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE jobs SET (autovacuum_enabled = false)")
        conn.execute(
            sa.text(f"INSERT INTO jobs ({columns}) SELECT {values} FROM generate_series(1, :n) AS i"),
            {"t": NOW - timedelta(hours=1), "n": n},
        )


def test_a_claim_reads_none_of_the_processed_calls_kept_before_the_first_analyze(engine: sa.Engine) -> None:
    """The claim asks for the oldest call still to be processed (steps never overtake one). Asked as
    `status IN ('pending', 'running')`, PostgreSQL read ix_jobs_backlog by kind alone on a table without
    statistics and filtered out every processed call still kept, on every claim."""
    fill_jobs(engine, 3000, "'inbox', i, NULL, 0, 0, :t - i * interval '1 ms', 'done', 1, :t - i * interval '1 ms', :t")
    with engine.begin() as conn:
        jobqueue.add_step(conn, 7, 0, NOW - timedelta(seconds=1), NOW - timedelta(minutes=1))
    claimed, plans = plans_of(engine, lambda conn: jobqueue.claim(conn, "w", NOW, timedelta(minutes=1), 10), "jobs")
    assert [job.enrolment_id for job in claimed] == [7]
    assert plans, "the claim ran no statement on jobs"
    assert max(rows_read_for_nothing(plan) for plan in plans) < 100


def test_after_a_sweep_a_claim_does_not_read_what_the_jobs_processed_before_left_in_its_index(
    engine: sa.Engine,
) -> None:
    """Each job leaves an entry in ix_jobs_claim per state it passed through, until a VACUUM (on a large table,
    days apart). The claim's bitmap scans read them all, on every claim: 43 ms a claim after 500,000 jobs. The
    worker's sweep reads them once in plain index scans, which mark them dead; bitmap scans skip marked entries."""
    fill_jobs(engine, 20000, "'step', NULL, i, 0, 0, :t, 'pending', 0, :t, :t")
    for state in ("running", "done"):  # as the worker takes them through, a transaction each
        with engine.begin() as conn:
            conn.exec_driver_sql(f"UPDATE jobs SET status = '{state}' WHERE status != 'done'")
    with engine.begin() as conn:
        jobqueue.add_step(conn, 7, 0, NOW - timedelta(seconds=1), NOW - timedelta(minutes=1))
        pages = conn.exec_driver_sql("SELECT pg_relation_size('jobs') / 8192").scalar_one()

    # The worker sweeps every minute; here three sweeps a moment apart. An entry is marked dead only once no
    # snapshot can still see its row; one sweep, beside a busy test run on the shared server, once left 287 of
    # 741 pages to read (an autovacuum ANALYZE of the new database, say, holds a snapshot for a moment).
    for _ in range(3):
        with engine.begin() as conn:
            jobqueue.sweep_claim_index(conn, NOW)
        time.sleep(0.1)
    claim = lambda conn: jobqueue.claim(conn, "w", NOW, timedelta(minutes=1), 10)  # noqa: E731
    claimed, plans = plans_of(engine, claim, "jobs", explain="ANALYZE, BUFFERS, FORMAT JSON")
    assert [job.enrolment_id for job in claimed] == [7]
    [claiming] = [plan for plan in plans if plan["Node Type"] == "ModifyTable"]  # the claim's UPDATE
    read = claiming["Shared Hit Blocks"] + claiming["Shared Read Blocks"]
    assert read < pages / 4, f"the claim read {read} blocks of a {pages}-page table for one job"


def test_a_batch_of_calls_finds_its_contacts_by_probing_the_identities_key(engine: sa.Engine) -> None:
    """Ten calls look up their thirty identities in one statement. Asked as `kind IN (...) AND value IN (...)`,
    PostgreSQL counted a probe per kind and value crossed and scanned the table instead (12,000 identities,
    analysed or not); asked as pairs, it probes the primary key once per pair."""
    kinds = ["email", "phone", "shopify_customer", "declic"]
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO identities (kind, value, contact_id)"
                " SELECT k, k || ':' || i, i FROM generate_series(1, 3000) AS i, unnest(CAST(:kinds AS text[])) AS k"
            ),
            {"kinds": kinds},
        )
        conn.exec_driver_sql("ANALYZE identities")
    known = [("email", "email:17"), ("phone", "phone:2999")]
    unknown = [(kind, f"{kind}:new-{n}") for kind in kinds[:3] for n in range(10)]
    found, plans = plans_of(engine, lambda conn: contacts._lookup(conn, known + unknown), "identities")
    assert found == {("email", "email:17"): 17, ("phone", "phone:2999"): 2999}
    assert len(plans) == 1
    scanned = [n["Relation Name"] for n in nodes(plans[0]) if n["Node Type"] == "Seq Scan"]
    assert scanned == [], json.dumps(plans[0], indent=1)
    assert rows_read_for_nothing(plans[0]) < 100


def test_a_batch_of_calls_on_a_new_deployment_never_tests_every_identity_against_every_pair(
    engine: sa.Engine,
) -> None:
    """While the table is small and has no statistics (a new deployment's first days), PostgreSQL ran the pairs
    asked as `(kind, value) IN ((...), ...)` as a filter of one OR per pair on every row: 2,000 identities and
    thirty calls' ninety pairs, 180,000 comparisons, 10-30 ms a batch and 40 % of the database's CPU in
    `bench/e2e.py`. Joined to the pairs, each identity is at most looked up once, in a hash of them."""
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE identities SET (autovacuum_enabled = false)")
        conn.execute(
            sa.text(
                "INSERT INTO identities (kind, value, contact_id)"
                " SELECT k, k || ':' || i, i FROM generate_series(1, 500) AS i, unnest(CAST(:kinds AS text[])) AS k"
            ),
            {"kinds": ["email", "phone", "shopify", "declic"]},
        )
    wanted = [(kind, f"{kind}:{n}") for kind in ("email", "phone", "shopify") for n in range(470, 500)]
    found, [plan] = plans_of(engine, lambda conn: contacts._lookup(conn, wanted), "identities")
    assert found == {pair: int(pair[1].split(":")[1]) for pair in wanted}
    filters = [n.get("Filter", "") + n.get("Recheck Cond", "") for n in nodes(plan)]
    assert max(f.count(" OR ") for f in filters) < 3, json.dumps(plan, indent=1)
