"""The benchmarks still run: each script of bench/, at a tiny size, against this checkout.

bench/ measures issue 15's targets; a script that no longer starts measures nothing, and two had
stopped (a config key had changed under them) without any test noticing. These run each script as a
user would (a subprocess, its own `declic serve` where it starts one) and check the line that says the
work was done, never a timing. Slow: CI runs them, `-m "not slow"` skips them locally.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import POSTGRES_ENV

#: Each script waits at most 30 s for its last e-mails (`--timeout`), then says what was missing: well within the
#: tests' own limit, so that a failure shows the script's report rather than pytest-timeout's traceback.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
WAIT = ("--timeout", "30")

ROOT = Path(__file__).resolve().parent.parent


def bench(script: str, *args: str, timeout: float = 300) -> str:
    """Run bench/SCRIPT with ARGS; its output, after checking that it ended well."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert done.returncode == 0, f"{script} exited with {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def postgres_url() -> str:
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        pytest.skip(f"runs when {POSTGRES_ENV} is set")
    return url


def test_e2e_mails_every_order_once_and_says_where_its_cpu_went() -> None:
    out = bench("e2e.py", "--orders", "20", "--concurrency", "4", *WAIT)
    assert "20/20 received (0 duplicates)" in out
    # The database's share comes from the server's own /metrics: the bench's token opened it.
    assert re.search(r"where: per e-mail, the event loop's thread [\d.]+ ms .* of which database transactions", out)


def test_the_floor_mails_every_order_once_and_records_each_send() -> None:
    out = bench("e2e.py", "--floor", "--orders", "20", "--concurrency", "4", *WAIT)
    assert "server: the floor" in out
    assert "20/20 received (0 duplicates)" in out
    assert "20 deliveries recorded as sent" in out
    assert "where: per e-mail, the event loop's thread" in out and "database transactions" not in out  # no /metrics
    assert "mail: 5/5 received, 0 duplicates" in bench(
        "latency.py", "--floor", "--rates", "5", "--seconds", "1", "--warmup", "0", *WAIT
    )


def test_e2e_prints_declics_cost_as_a_multiple_of_the_floors_in_the_same_run() -> None:
    out = bench("e2e.py", "--against-floor", "--orders", "20", "--concurrency", "4", *WAIT)
    floor, declic = out.split("--- Declic")
    assert "20 deliveries recorded as sent; the floor used" in floor and "20/20 received (0 duplicates)" in floor
    assert "20 deliveries recorded as sent; Declic used" in declic and "20/20 received (0 duplicates)" in declic
    assert re.search(r"against the floor, same run: Declic's CPU per e-mail [\d.]+ ms = [\d.]+ x the floor's", out)


def test_e2e_replays_declics_statements_on_the_bare_sqlite_cursor() -> None:
    out = bench("e2e.py", "--statements", "--orders", "20", "--concurrency", "4", *WAIT)
    assert "20/20 received (0 duplicates)" in out
    # The replay did the server's work again, every statement of it: the copy records the 20 sends too.
    assert re.search(r"replayed on the bare sqlite3 cursor .*: [\d.]+ ms of CPU .* 20 deliveries recorded as sent", out)
    assert "failed in the replay" not in out


@pytest.mark.postgres
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs: one for the server, one for the load")
def test_latency_can_run_the_server_alone_on_one_cpu() -> None:
    cpu = max(os.sched_getaffinity(0))
    out = bench("latency.py", "--cpu", str(cpu), "--rates", "5", "--seconds", "1", "--warmup", "0", *WAIT)
    assert re.search(rf"the server \(pid \d+\) may run on CPUs \[{cpu}\]", out), out
    assert "mail: 5/5 received, 0 duplicates" in out


def test_e2e_on_postgresql_mails_every_order_once() -> None:
    out = bench("e2e.py", "--orders", "20", "--concurrency", "4", "--postgres", postgres_url(), *WAIT)
    assert "20/20 received (0 duplicates)" in out
    assert "PostgreSQL's processes for it used" in out


def test_latency_mails_every_webhook_of_each_phase_and_counts_its_statements() -> None:
    out = bench("latency.py", "--rates", "5", "--seconds", "1", "--warmup", "0", "--statements", *WAIT)
    assert "mail: 5/5 received, 0 duplicates" in out
    assert re.search(r"statements: \d+ SQL statements in \d+ transactions", out)
    assert "   1.00  INSERT INTO inbox " in out  # per e-mail: each webhook stored once
    assert "of which database transactions" in out


@pytest.mark.postgres
def test_latency_on_postgresql_mails_every_webhook_of_each_phase() -> None:
    out = bench("latency.py", "--rates", "5,10", "--seconds", "1", "--warmup", "0", "--postgres", postgres_url(), *WAIT)
    assert "mail: 5/5 received, 0 duplicates" in out
    assert "mail: 10/10 received, 0 duplicates" in out


def test_ingest_stores_one_row_per_acknowledgement() -> None:
    out = bench("ingest.py", "--seconds", "1", "--warmup", "0", "--concurrency", "4")
    assert "rows in inbox -> equal" in out


@pytest.mark.postgres
def test_replicas_lose_and_double_nothing() -> None:
    out = bench("replicas.py", "--replicas", "1,2", "--orders", "20", "--postgres", postgres_url(), *WAIT)
    assert out.count("lost 0, doubled 0") == 2


def test_journeys_clock_phase_fires_and_sends_the_birthdays() -> None:
    out = bench("journeys.py", "--phases", "clock", "--contacts", "50", "--morning", "50")
    assert "sent 50 in" in out


def test_history_and_kpis_run() -> None:
    assert bench("history.py", "--sizes", "100", "--own", "10", "--runs", "1")
    assert bench("kpis.py", "--deliveries", "200", "--rules", "2", "--runs", "1")
