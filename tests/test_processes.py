"""Real `declic serve` processes, real HTTP, a real SMTP server and real time.

These tests check what only separate processes can show: an acknowledged webhook survives
SIGKILL, a restart sends each pending step once, and two workers sharing one PostgreSQL
database never send the same step twice; a served process's /metrics counts what it did.
"""

from __future__ import annotations

import json
import signal
import socket
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import sqlalchemy as sa

from conftest import SECRET, postgres_database
from declic_gateway.testing import SmtpCatcher, free_port, write_deployment
from processes import Servers, buyer, post_order, recipients, sqlite_rows, wait_until

# The start-up `reconcile` tick is a job too; these tests count webhook and step jobs.
JOBS_BY_KIND = (
    "SELECT kind, status, count(*) FROM jobs WHERE kind IN ('inbox', 'step') GROUP BY kind, status ORDER BY kind"
)

TEMPLATES = {
    "followup.subject.j2": "Order {{ event.properties.name }}",
    "followup.txt.j2": "Thanks {{ contact.first_name }} for order {{ event.properties.name }}",
}

CONFIG = """\
public_url: https://hooks.example.com
timezone: Europe/Paris
storage:
  url: {db_url}
  busy_timeout: 2s
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
  poll_interval: 200ms
  lease: 30s
  batch_size: {batch_size}
  concurrency: {concurrency}
  retry_base: {retry_base}
  retry_max: {retry_max}
  max_attempts: {max_attempts}
rules:
  - name: order-followup
    when: order.placed
    kind: transactional
    steps:
      - wait: {wait}
        send: {{via: email, template: followup}}
"""


def make_config(
    db_url: str,
    smtp_port: int,
    *,
    wait: str,
    batch_size: int = 50,
    concurrency: int = 20,
    retry_base: str = "1s",
    retry_max: str = "1h",
    max_attempts: int = 5,
) -> str:
    return CONFIG.format(
        db_url=db_url,
        secret=SECRET,
        smtp_port=smtp_port,
        wait=wait,
        batch_size=batch_size,
        concurrency=concurrency,
        retry_base=retry_base,
        retry_max=retry_max,
        max_attempts=max_attempts,
    )


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    with Servers.running(tmp_path) as pool:
        yield pool


@pytest.fixture
def pg_url() -> Iterator[str]:
    yield from postgres_database()


# --- tests -------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_sigkill_with_steps_pending_each_email_goes_out_exactly_once(
    tmp_path: Path, smtp: SmtpCatcher, servers: Servers
) -> None:
    n, wait = 20, 3.0
    database = tmp_path / "declic.db"
    config = write_deployment(tmp_path, make_config(f"sqlite:///{database}", smtp.port, wait="3s"), TEMPLATES)
    with servers.logs_on_failure():
        first = servers.start(config, name="first")
        started = time.monotonic()
        answers = [post_order(first.url, i) for i in range(n)]
        assert [answer.status for answer in answers] == [200] * n, answers
        assert {answer.body["status"] for answer in answers} == {"accepted"}
        first.sigkill()
        killed_after = time.monotonic() - started
        assert killed_after < wait, f"too slow to test a kill before the steps are due ({killed_after:.2f}s)"
        assert first.proc is not None and first.proc.returncode == -signal.SIGKILL

        assert smtp.messages == []
        # Every acknowledged call is on disk, whatever the killed process had time to do with it.
        assert sqlite_rows(database, "SELECT count(*) FROM inbox") == [(n,)]

        second = servers.start(config, name="second")
        took = wait_until(lambda: len(smtp.messages) >= n, 20, f"{n} mails after the restart")
        time.sleep(1.5)  # several poll intervals: a duplicate would have gone out by now
        assert second.alive()

        got = recipients(smtp)
        assert sum(got.values()) == n, got
        assert got == Counter(buyer(i) for i in range(n))
        assert len({m["Message-ID"] for m in smtp.messages}) == n
        assert sqlite_rows(database, "SELECT status, count(*) FROM deliveries GROUP BY status") == [("sent", n)]
        assert sqlite_rows(
            database,
            JOBS_BY_KIND,
        ) == [
            ("inbox", "done", n),
            ("step", "done", n),
        ]
        print(f"killed {killed_after:.2f}s after the first post; {n} mails {took:.2f}s after the restart")


@pytest.mark.postgres
@pytest.mark.timeout(90)
def test_two_processes_on_one_postgresql_never_send_a_step_twice(
    tmp_path: Path, smtp: SmtpCatcher, pg_url: str, servers: Servers
) -> None:
    n = 200
    # batch_size 5 and every step due about the same second: both workers must take a share.
    text = make_config(pg_url, smtp.port, wait="1s", batch_size=5, concurrency=10)
    config = write_deployment(tmp_path, text, TEMPLATES)
    engine = sa.create_engine(sa.make_url(pg_url).set(drivername="postgresql+psycopg"))
    try:
        with servers.logs_on_failure():
            a = servers.start(config, name="a")
            b = servers.start(config, name="b")
            urls = [a.url, b.url]
            with ThreadPoolExecutor(max_workers=16) as pool:
                answers = list(pool.map(lambda i: post_order(urls[i % 2], i), range(n)))
            assert Counter(answer.status for answer in answers) == Counter({200: n}), answers
            assert {answer.body["status"] for answer in answers} == {"accepted"}

            took = wait_until(lambda: len(smtp.messages) >= n, 45, f"{n} mails")
            time.sleep(1.5)  # several poll intervals: a duplicate would have gone out by now
            assert a.alive() and b.alive()

            got = recipients(smtp)
            duplicates = {to: count for to, count in got.items() if count > 1}
            assert not duplicates, f"sent more than once: {duplicates}"
            assert got == Counter(buyer(i) for i in range(n))

            with engine.connect() as conn:
                deliveries = conn.execute(
                    sa.text("SELECT status, count(*), count(DISTINCT enrolment_id) FROM deliveries GROUP BY status")
                ).all()
                enrolments = conn.execute(sa.text("SELECT count(*) FROM enrolments")).scalar()
                jobs = conn.execute(sa.text(JOBS_BY_KIND)).all()
                workers = dict(
                    conn.execute(
                        sa.text("SELECT locked_by, count(*) FROM jobs WHERE kind = 'step' GROUP BY locked_by")
                    ).all()
                )
            assert [tuple(row) for row in deliveries] == [("sent", n, n)]
            assert enrolments == n
            assert [tuple(row) for row in jobs] == [("inbox", "done", n), ("step", "done", n)]
            # Worker ids are host:pid:random; both processes must have run steps for this to prove anything.
            pids = {int(worker.rsplit(":", 2)[1]): count for worker, count in workers.items()}
            assert set(pids) == {a.pid, b.pid}, workers
            print(f"{n} mails {took:.2f}s after the posts; steps per process: {pids}")
    finally:
        engine.dispose()


@pytest.mark.timeout(60)
def test_webhook_taken_while_smtp_is_down_goes_out_once_after_a_restart(tmp_path: Path, servers: Servers) -> None:
    database = tmp_path / "declic.db"
    smtp_port = free_port()  # nothing listens there yet: every send is refused and retried
    text = make_config(
        f"sqlite:///{database}", smtp_port, wait="0s", retry_base="500ms", retry_max="1s", max_attempts=50
    )
    config = write_deployment(tmp_path, text, TEMPLATES)
    smtp = SmtpCatcher(port=smtp_port)
    try:
        with servers.logs_on_failure():
            first = servers.start(config, name="first")
            answer = post_order(first.url, 1)
            assert (answer.status, answer.body["status"]) == (200, "accepted")
            wait_until(
                lambda: sqlite_rows(database, "SELECT status FROM deliveries") == [("retrying",)],
                15,
                "a failed attempt recorded as retrying",
            )
            assert first.stop() == 0

            smtp.start()
            second = servers.start(config, name="second")
            wait_until(lambda: len(smtp.messages) >= 1, 15, "the mail after SMTP came back")
            time.sleep(1.5)
            assert second.alive()
            assert recipients(smtp) == Counter({buyer(1): 1})
            [(status, attempts)] = sqlite_rows(database, "SELECT status, attempts FROM deliveries")
            assert status == "sent" and attempts >= 2
    finally:
        smtp.stop()


LEAKY = {
    "bearer": "Bearer s3cr3t-T0KEN-value",
    "email": "jürgen@münchen.example",
    "phone": "(415) 555-0132",
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "request_head",
    [
        pytest.param(  # one header over aiohttp's 8 KiB line limit
            "GET /readyz HTTP/1.1\r\nHost: x\r\nAuthorization: {bearer}\r\n"
            "X-Note: {bearer} {email} {phone} " + "p" * 9000 + "\r\n\r\n",
            id="header-too-long",
        ),
        pytest.param("GET /readyz?{email} {bearer} {phone}\r\nHost: x\r\n\r\n", id="bad-status-line"),
        pytest.param(
            "GET /readyz HTTP/1.1\r\nHost: x\r\nBad Header {bearer} {email}: {phone}\r\n\r\n", id="bad-header"
        ),
    ],
)
def test_a_malformed_request_is_one_json_line_without_its_raw_headers(
    tmp_path: Path, servers: Servers, request_head: str
) -> None:
    config = write_deployment(tmp_path, make_config(f"sqlite:///{tmp_path}/d.db", free_port(), wait="0s"), TEMPLATES)
    with servers.logs_on_failure():
        server = servers.start(config)
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as conn:
            conn.sendall(request_head.format(**LEAKY).encode())
            assert b" 400 " in conn.recv(100)
        wait_until(lambda: "Error handling request" in server.log_text(), 10, "the error logged")
        assert server.stop() == 0
        lines = [line for line in server.log_text().splitlines() if line and not line.startswith("-----")]
        records = [json.loads(line) for line in lines]  # every line is one JSON object: no loose traceback
        [error] = [r for r in records if r["event"].startswith("Error handling request")]
        assert error["logger"] == "aiohttp.server" and error["status"] == 400 and "exception" not in error
        text = server.log_text()
        for leaked in (*LEAKY.values(), "s3cr3t", "münchen", "555-0132"):
            assert leaked not in text


def scrape(base_url: str, token: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """GET /metrics with the token, parsed by prometheus_client: sample values by name and labels."""
    from prometheus_client.parser import text_string_to_metric_families

    request = urllib.request.Request(base_url + "/metrics", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value for f in text_string_to_metric_families(text) for s in f.samples
    }


@pytest.mark.timeout(60)
def test_a_served_process_counts_its_webhooks_and_sends_in_metrics(
    tmp_path: Path, smtp: SmtpCatcher, servers: Servers, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = "process-metrics-token-" + uuid.uuid4().hex
    monkeypatch.setenv("DECLIC_TEST_METRICS_TOKEN", token)  # the config reads it, as a deployment would
    text = make_config(f"sqlite:///{tmp_path / 'declic.db'}", smtp.port, wait="0s")
    config = write_deployment(tmp_path, text + "metrics:\n  token: ${DECLIC_TEST_METRICS_TOKEN}\n", TEMPLATES)
    sent = ("declic_sends_total", frozenset({("sink", "email"), ("outcome", "sent")}))
    with servers.logs_on_failure():
        server = servers.start(config)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(server.url + "/metrics", timeout=5)
        assert refused.value.code == 401
        refused.value.close()
        for i in range(5):
            assert post_order(server.url, i).status == 200
        wait_until(lambda: scrape(server.url, token)[sent] == 5, 20, "five sends counted")
        backlog = ("declic_inbox_backlog_calls", frozenset())
        # The queue gauges come from a read of the database at most 5 s old.
        wait_until(lambda: scrape(server.url, token)[backlog] == 0, 10, "the backlog read again, empty")
        metrics = scrape(server.url, token)
        assert (
            metrics[("declic_webhooks_total", frozenset({("source", "shop"), ("status", "accepted"), ("code", "200")}))]
            == 5
        )
        assert metrics[("declic_webhook_ack_duration_seconds_count", frozenset({("source", "shop")}))] == 5
        assert metrics[("declic_due_jobs", frozenset())] == 0
        assert metrics[("declic_dead_letter_jobs", frozenset({("kind", "step")}))] == 0
        assert metrics[("declic_storage_errors_total", frozenset())] == 0
        assert metrics[("process_resident_memory_bytes", frozenset())] > 0
        assert recipients(smtp) == Counter({buyer(i): 1 for i in range(5)})
