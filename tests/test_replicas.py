"""Replicas on one PostgreSQL database, as real `declic serve` processes: what design.md promises
for scale-out (issue 15). Work queued by one replica wakes the others at once (LISTEN/NOTIFY); calls
are applied in the order they arrived whichever replica took them; a sink's rate holds for the whole
deployment; clock jobs run once and survive the loss of the replica running them.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from conftest import SECRET, fixture_json, postgres_database
from declic_gateway.jobs import polls, wakeup
from declic_gateway.store import Database, jobqueue, sinkrates
from declic_gateway.testing import SmtpCatcher, shopify_headers, write_deployment
from processes import Answer, Servers, Store, request, wait_until

pytestmark = pytest.mark.postgres

TEMPLATES = {
    "cart.subject.j2": "Your cart",
    "cart.txt.j2": "Come back",
    "confirmation.subject.j2": "Order {{ event.properties.name }}",
    "confirmation.txt.j2": "Thanks",
    "followup.subject.j2": "More for you",
    "followup.txt.j2": "News",
}

CONFIG = """\
public_url: https://hooks.example.com
timezone: Europe/Paris
storage:
  url: {db_url}
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
{rate}
worker:
  poll_interval: {poll_interval}
  lease: {lease}
  batch_size: 20
  concurrency: 20
rules:
  - name: cart
    when: checkout.started
    exit_on: [order.placed]
    steps:
      - wait: {wait}
        send: {{via: email, template: cart}}
  - name: confirmation
    when: order.placed
    kind: transactional
    send: {{via: email, template: confirmation}}
  - name: followup
    when: order.placed
    steps:
      - wait: {wait}
        send: {{via: email, template: followup}}
"""


def config(
    tmp_path: Path,
    db_url: str,
    smtp: SmtpCatcher,
    *,
    wait: str = "3s",
    poll_interval: str = "200ms",
    lease: str = "20s",
    rate: str | None = None,
) -> Path:
    text = CONFIG.format(
        db_url=db_url,
        secret=SECRET,
        smtp_port=smtp.port,
        rate=f"    rate: {rate}" if rate else "",
        poll_interval=poll_interval,
        lease=lease,
        wait=wait,
    )
    return write_deployment(tmp_path, text, TEMPLATES)


@pytest.fixture
def pg_url() -> Iterator[str]:
    yield from postgres_database()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    with Servers.running(tmp_path) as pool:
        yield pool


# --- webhooks about contact i --------------------------------------------------------------------------


def email(i: int) -> str:
    return f"shopper{i:04d}@example.org"


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _customer(i: int) -> dict[str, Any]:
    consent = {"state": "subscribed", "opt_in_level": "single_opt_in", "consent_updated_at": "2026-01-02T10:00:00Z"}
    return {"id": 7_000_000 + i, "email": email(i), "first_name": f"S{i}", "email_marketing_consent": consent}


def post(url: str, topic: str, body: dict[str, Any]) -> Answer:
    data = json.dumps(body).encode()
    return request(url + "/hooks/shop", data, shopify_headers(data, SECRET, topic, uuid.uuid4().hex))


def checkout(url: str, i: int) -> Answer:
    body = fixture_json("shopify/checkout.json")
    body.update(
        id=9_000_000 + i, token=f"tok{i}", email=email(i), created_at=_now(), updated_at=_now(), customer=_customer(i)
    )
    return post(url, "checkouts/create", body)


def order(url: str, i: int) -> Answer:
    body = fixture_json("shopify/order.json")
    body.update(
        id=8_000_000 + i,
        name=f"#{i}",
        email=email(i),
        checkout_token=f"tok{i}",
        created_at=_now(),
        updated_at=_now(),
        customer=_customer(i),
    )
    return post(url, "orders/create", body)


def unsubscribe(url: str, i: int) -> Answer:
    consent = {"state": "unsubscribed", "opt_in_level": "single_opt_in", "consent_updated_at": _now()}
    body = {"customer_id": 7_000_000 + i, "email_address": email(i), "email_marketing_consent": consent}
    return post(url, "customers_email_marketing_consent/update", body)


def subjects(smtp: SmtpCatcher) -> Counter[str]:
    return Counter(str(m["Subject"]) for m in list(smtp.messages))


# --- LISTEN/NOTIFY ----------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_the_listener_wakes_on_a_queued_job_and_again_after_its_connection_is_cut(pg_url: str) -> None:
    db = Database(pg_url)
    woken = asyncio.Event()
    listener = asyncio.create_task(wakeup.listen(wakeup.libpq_url(db.engine.url), woken.set))
    admin = sa.create_engine(db.engine.url, isolation_level="AUTOCOMMIT")

    def listening() -> list[int]:
        with admin.connect() as conn:
            query = "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN %'"
            return list(conn.execute(sa.text(query)).scalars())

    def queue_a_tick_in_another_process() -> None:
        script = (
            "import sys; from datetime import UTC, datetime; from declic_gateway.store import Database, jobqueue; "
            "db = Database(sys.argv[1]); db.transaction(jobqueue.add_tick, sys.argv[2], datetime.now(UTC)); db.close()"
        )
        subprocess.run([sys.executable, "-c", script, pg_url, f"test-{uuid.uuid4().hex}"], check=True, timeout=30)

    async def queued_wakes_it() -> None:
        await asyncio.wait_for(woken.wait(), 10)  # connected (it wakes once on connecting)
        woken.clear()
        await asyncio.to_thread(queue_a_tick_in_another_process)
        await asyncio.wait_for(woken.wait(), 5)

    try:
        await queued_wakes_it()
        # A transaction that queues nothing wakes nobody; nor does one of this process, whose worker wakes itself.
        woken.clear()
        await db.run(lambda conn: conn.execute(sa.text("SELECT 1")))
        await db.run(jobqueue.add_tick, f"test-{uuid.uuid4().hex}", datetime.now(UTC))
        await asyncio.sleep(0.5)
        assert not woken.is_set()
        # A failover or a restart cuts the connection: the listener reconnects and hears again.
        [pid] = await asyncio.to_thread(listening)
        with admin.connect() as conn:
            conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        woken.clear()
        await queued_wakes_it()
        assert (await asyncio.to_thread(listening)) != [pid]
    finally:
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
        admin.dispose()
        db.close()


async def test_a_burst_of_notifications_wakes_the_worker_twice_a_lone_one_at_once() -> None:
    woken: list[float] = []
    loop = asyncio.get_running_loop()
    wake_soon = wakeup.Coalesced(lambda: woken.append(loop.time()), gap=0.2)
    started = loop.time()
    for _ in range(50):  # the other replicas' group commits, under load
        wake_soon()
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.4)
    assert len(woken) == 2 and woken[0] - started < 0.05 and woken[1] - woken[0] >= 0.2
    wake_soon()  # a lone one, after a quiet spell
    assert len(woken) == 3


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_worker_replica_hears_of_a_call_taken_by_a_web_replica_at_once(
    tmp_path: Path, smtp: SmtpCatcher, pg_url: str, servers: Servers
) -> None:
    # Polling once a minute: only a notification can make the worker replica take the call within seconds.
    path = config(tmp_path, pg_url, smtp, poll_interval="1m")
    with servers.logs_on_failure():
        web = servers.start(path, name="web", role="web")
        servers.start(path, name="worker", role="worker")
        time.sleep(1)  # the worker's start-up claims are over: it sleeps for its minute
        for i in range(3):
            answer = order(web.url, i)
            assert answer.ok, answer
            took = wait_until(lambda i=i: subjects(smtp)[f"Order #{i}"] == 1, 10, f"the confirmation of order {i}")
            assert took < 5, f"the worker took {took:.1f}s to hear of a call"


# --- calls in arrival order -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_calls_about_a_contact_are_applied_in_arrival_order_whichever_replica_took_them(
    tmp_path: Path, smtp: SmtpCatcher, pg_url: str, servers: Servers
) -> None:
    """Per shopper: a checkout, then the order (which ends the cart journey), then an unsubscribe, each
    sent once the previous one was acknowledged, alternately to either replica. No cart reminder may go
    (the order came after the checkout) and no follow-up either (the unsubscribe came before it was due).

    Shoppers come in waves, each opened on the other replica once the last one's calls are applied: the
    calls turn is then free, and the replica that acknowledged first (its worker wakes without waiting
    for a notification) usually takes it. Six waves at least; more, up to twelve, until both replicas
    have applied calls: the order across them is what this test is about."""
    per_wave, wait = 10, 4.0
    path = config(tmp_path, pg_url, smtp, wait=f"{wait:.0f}s")
    with servers.logs_on_failure(), closing(Store(pg_url)) as store:
        replicas = [servers.start(path, name="a"), servers.start(path, name="b")]

        def shopper(i: int) -> float:
            opening = i // per_wave
            first, second = replicas[opening % 2].url, replicas[(opening + 1) % 2].url
            answers = [checkout(first, i), order(second, i), unsubscribe(first, i)]
            assert all(answer.ok for answer in answers), answers
            return answers[2].at - answers[1].at  # the follow-up is due `wait` after the order

        def applied() -> bool:
            waiting = "SELECT count(*) FROM jobs WHERE kind = 'inbox' AND status IN ('pending', 'running')"
            return store.rows(waiting) == [(0,)]

        def holders() -> list[Any]:
            return store.rows("SELECT count(DISTINCT split_part(locked_by, ':', 2)) FROM jobs WHERE kind = 'inbox'")

        spans: list[float] = []
        n = 0
        with ThreadPoolExecutor(max_workers=per_wave) as pool:
            while n < 6 * per_wave or (holders() != [(2,)] and n < 12 * per_wave):
                spans += pool.map(shopper, range(n, n + per_wave))
                n += per_wave
                wait_until(applied, 30, f"the calls of wave {n // per_wave}")
        assert max(spans) < wait, f"too slow to test: an unsubscribe came {max(spans):.1f}s after its order"
        wait_until(lambda: subjects(smtp)["Order #0"] and sum(subjects(smtp).values()) >= n, 60, "confirmations")
        time.sleep(wait + 2)  # every reminder and follow-up is due by now
        got = subjects(smtp)
        assert got == Counter({f"Order #{i}": 1 for i in range(n)}), got - Counter(f"Order #{i}" for i in range(n))
        assert store.rows("SELECT status, count(*) FROM enrolments WHERE rule = 'cart' GROUP BY status") == [
            ("exited", n)
        ]
        assert holders() == [(2,)], "one replica applied every call in twelve waves"


# --- a sink's rate, for the whole deployment -----------------------------------------------------------


def test_a_sink_schedule_lets_the_burst_go_then_spaces_sends_at_the_rate(pg_url: str) -> None:
    db = Database(pg_url)
    try:
        waits = [db.transaction(sinkrates.reserve, "email", 4, timedelta(seconds=2)) for _ in range(7)]
    finally:
        db.close()
    assert waits[:4] == [0.0] * 4  # 4 at once after a quiet spell
    # Then one per 0.5 s: the 5th waits about 0.5 s, the 7th about 1.5 s (less the time the calls took).
    assert [round(wait * 2) / 2 for wait in waits[4:]] == [0.5, 1.0, 1.5], waits


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_replicas_together_keep_a_sinks_rate(
    tmp_path: Path, smtp: SmtpCatcher, pg_url: str, servers: Servers
) -> None:
    n, count, period = 60, 5, 1.0  # rate 5/1s: a burst of 5, then one per 0.2 s
    path = config(tmp_path, pg_url, smtp, wait="1h", rate=f"{count}/1s")
    with servers.logs_on_failure():
        replicas = [servers.start(path, name="a"), servers.start(path, name="b")]
        with ThreadPoolExecutor(max_workers=12) as pool:
            answers = list(pool.map(lambda i: order(replicas[i % 2].url, i), range(n)))
        assert all(answer.ok for answer in answers), answers
        wait_until(lambda: len(smtp.messages) >= n, 60, f"{n} confirmations")
        arrived = sorted(smtp.arrived)
        # In any stretch of time, at most the burst plus what the rate allows in it (one more for jitter).
        interval = period / count
        worst = max((j - i + 1) - (arrived[j] - arrived[i]) / interval for i in range(n) for j in range(i, n))
        assert worst <= count + 1, (
            f"{worst:.1f} sends above the rate; arrivals {[round(t - arrived[0], 2) for t in arrived]}"
        )
        store = Store(pg_url)
        try:
            senders = store.rows("SELECT count(DISTINCT split_part(locked_by, ':', 2)) FROM jobs WHERE kind = 'step'")
        finally:
            store.close()
        assert senders == [(2,)], "both replicas must have sent for this to prove anything"


# --- clock jobs: once across replicas, taken over when their replica dies ----------------------------------


class SlowMailchimp:
    """Mailchimp's reports API as a real HTTP server: no activity, the first answer `hold` seconds late.
    Keeps when each request came (time.monotonic())."""

    def __init__(self, hold: float):
        self.hold, self.asked = hold, list[float]()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.asked.append(time.monotonic())
                if len(owner.asked) == 1:
                    time.sleep(owner.hold)
                body = json.dumps({"emails": [], "total_items": 0}).encode()
                with contextlib.suppress(OSError):  # the poller was SIGKILLed meanwhile
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> SlowMailchimp:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_poll_runs_once_across_replicas_and_is_taken_over_within_a_lease_when_its_replica_dies(
    tmp_path: Path, smtp: SmtpCatcher, pg_url: str, servers: Servers
) -> None:
    lease = 10.0  # the shortest a config allows
    with SlowMailchimp(hold=8) as mailchimp:
        path = config(tmp_path, pg_url, smtp, lease=f"{lease:.0f}s")
        text = path.read_text().replace(
            "sinks:",
            f"  reports: {{plugin: mailchimp_reports, api_key: k-us1, api_base: '{mailchimp.url}', campaigns: [c1]}}\n"
            "sinks:",
        )
        path.write_text(text)
        store = Store(pg_url)
        with servers.logs_on_failure():
            a = servers.start(path, name="a")
            wait_until(lambda: len(mailchimp.asked) == 1, 10, "the first poll")
            # A second replica starting while the poll runs queues no second one: the poll is polled once.
            b = servers.start(path, name="b")
            time.sleep(1.5)
            assert len(mailchimp.asked) == 1, "a second poll ran while the first one was running"
            [(holder,)] = store.rows("SELECT locked_by FROM jobs WHERE kind = 'poll' AND status = 'running'")
            assert int(holder.split(":")[1]) == a.pid
            a.sigkill()
            killed = time.monotonic()
            wait_until(lambda: len(mailchimp.asked) == 2, lease + 5, "the poll taken over by b")
            took = mailchimp.asked[1] - killed
            assert took <= lease + 1, f"b polled {took:.1f}s after a died: more than a lease"
            wait_until(
                lambda: (
                    store.rows("SELECT status FROM jobs WHERE kind = 'poll' AND status <> 'pending'") == [("done",)]
                ),
                5,
                "the poll done",
            )
            time.sleep(1)
            assert len(mailchimp.asked) == 2  # the next poll is an interval (15 min) away
            assert store.rows("SELECT status, count(*) FROM jobs WHERE kind = 'poll' GROUP BY status ORDER BY 1") == [
                ("done", 1),
                ("pending", 1),
            ]
            assert b.alive()
        store.close()


def test_a_clock_job_is_queued_once_while_it_runs_and_queues_its_next_run_as_it_finishes(db_url: str) -> None:
    db = Database(db_url)
    db.upgrade()
    now = datetime.now(UTC)
    live = "SELECT status FROM jobs WHERE key = 'poll:reports' AND status IN ('pending', 'running')"
    try:
        db.transaction(polls.schedule, "reports", now, now)
        [job] = db.transaction(jobqueue.claim, "w1", now, timedelta(seconds=20), 10)
        db.transaction(polls.schedule, "reports", now, now)  # a replica starting meanwhile
        assert db.transaction(lambda conn: conn.execute(sa.text(live)).all()) == [("running",)]

        def finish_and_queue_next(conn: sa.Connection) -> None:
            jobqueue.finish(conn, job, "w1", now)
            polls.schedule(conn, "reports", now + timedelta(minutes=15), now)

        db.transaction(finish_and_queue_next)
        assert db.transaction(lambda conn: conn.execute(sa.text(live)).all()) == [("pending",)]
    finally:
        db.close()
