"""Journeys benchmark: a million pending steps, due steps on time, the clock job, the router.

    .venv/bin/python bench/journeys.py                          # all of it, full size (~5 min)
    .venv/bin/python bench/journeys.py --phases router,clock    # in-process parts only (~1.5 min)
    .venv/bin/python bench/journeys.py --pending 100000 --window 3 --burst 300   # a quick look
    .venv/bin/python bench/journeys.py --phases serve --pending 0 --rates 1000 \
        --log-level warning --batch-size 200 --concurrency 100 --smtp-connections 8 --poll-interval 100ms

A benchmark, not a test: it prints figures and asserts nothing about timings. Three parts:

serve   A real `declic serve` (role all, its own process, SQLite file) with an SMTP sink (`tls: none`)
        to an aiosmtpd catcher in another process (bench/_catcher.py), which timestamps each message.
        Two runs on databases prepared alike: --contacts contacts with a birthday (and a birthday
        rule), and 0 (baseline) or --pending pending journey steps with their enrolments, due 30 to
        365 days ahead (bulk-inserted with INSERT ... SELECT). Each run: the claim query's time and
        plan on that table; start-up, with webhooks posted one at a time while the start-up reconcile
        runs (their ack latency); RSS; idle CPU; then for each rate in --rates, rate x --window steps
        of a `kind: transactional` rule due at that rate from 3 s later (inserted while the server
        runs; the due time is in the subject) -> lateness = arrival - due, p50/p90/p99/max, e-mails/s,
        server CPU per e-mail; then --burst track webhooks, each enrolling a new contact in a rule that
        sends at once; idle again. RSS (VmRSS, and VmHWM, the peak) after each stage, 0 vs --pending.
clock   The clock job: Router.reconcile (what the `reconcile` tick runs at start-up) over --contacts
        contacts with a birthday, for each count in --date-rules, on a fresh database: first pass
        (one trigger job per rule x contact) and second pass (all in place), extrapolated to 10,000
        date rules. Then --morning birthdays due at the same minute, fired and sent by Worker.drain()
        under a fake clock, sinks replaced by recorders (as `declic simulate` does).
router  Router.route() per event with --router-rules rules in the config, of which M = 0, 1, 10, 100
        match the event's type (each with an `if:` and a first step 1 day later), against 10 rules in
        all, on a fresh SQLite file per case, 100 events per transaction; the rule selection and `if:`
        evaluation alone (no database); and route() when the event's contact carries a time zone and
        0, 10 or 100 of the rules are date rules.

In-process parts log at `warning` (the router's own cost, not one log line per enrolment); the server
logs at --log-level (default info, as deployed). Only 127.0.0.1 traffic. Every process started here is
stopped by its PID; temporary folders are removed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _catcher import TimedCatcher  # noqa: E402
from _common import DECLIC, cpu_seconds, free_port, machine, percentile, stop, wait_for_port  # noqa: E402

from declic_gateway.cli import logs  # noqa: E402
from declic_gateway.config import RuleSpec  # noqa: E402
from declic_gateway.kit.events import ContactRef, Event  # noqa: E402
from declic_gateway.store import (  # noqa: E402
    CONTACTS,
    ENROLMENTS,
    EVENTS,
    JOBS,
    Database,
    jsoncodec,
)
from declic_gateway.store.db import make_engine  # noqa: E402

WRITE_KEY = "bench-write-key"
ZONES = ("Europe/Paris", "America/New_York", "Asia/Tokyo", "UTC", "Australia/Sydney")
BATCH = 50_000

SERVE_CONFIG = """\
public_url: http://127.0.0.1:{port}
allow_http_public_url: true   # a local benchmark: no HTTPS in front
timezone: UTC
storage:
  url: sqlite:///{db}
sources:
  site:
    plugin: track
    write_key: {write_key}
sinks:
  email:
    plugin: smtp
    host: 127.0.0.1
    port: {smtp_port}
    tls: none
    sender: "Bench <bench@example.com>"
{sink_extra}policies:
  consent: {{email: required}}
rules:
  - name: nurture                 # the pending steps, bulk-inserted, due weeks ahead
    when: track.nurture_started
    steps:
      - wait: 30d
        send: {{via: email, template: plain}}
      - wait: 30d
        send: {{via: email, template: plain}}
  - name: due-now                 # the due steps of the lateness measure, inserted while serving
    when: track.never_sent
    kind: transactional
    send: {{via: email, template: due}}
  - name: burst                   # what the webhook burst enrols
    when: track.bench_burst
    kind: transactional
    send: {{via: email, template: burst}}
  - name: birthday
    on_date: contact.birthday
    at: "10:00"
    send: {{via: email, template: plain}}
{worker}logging:
  level: {log_level}
"""
SERVE_TEMPLATES = {
    "plain.subject.j2": "Hello {{ contact.first_name }}",
    "plain.txt.j2": "Hello {{ contact.first_name }}, a message from the bench.",
    "due.subject.j2": "due {{ event.properties.tag }} {{ event.properties.seq }} {{ event.properties.due }}",
    "due.txt.j2": "Hello {{ contact.first_name }}, step {{ step }} of {{ rule }} was due at {{ event.properties.due }}",
    "burst.subject.j2": "burst {{ event.properties.seq }}",
    "burst.txt.j2": "Hello {{ contact.email }}, thanks for event {{ event.properties.seq }}.",
}


# ----------------------------------------------------------------------------------------------- helpers


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) in KiB."""
    found = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0])
    return found


def mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


def rule_spec(**fields: Any) -> RuleSpec:
    return RuleSpec.model_validate(fields)


def fresh_database(folder: Path, name: str) -> Database:
    db = Database(f"sqlite:///{folder / name}", timedelta(seconds=30))
    db.upgrade()
    return db


def birthdays_away_from(today: date, rng: random.Random) -> date:
    """A birth date whose anniversary is not within 3 days of today (nothing fires during the run)."""
    while True:
        day = date(2001, 1, 1) + timedelta(days=rng.randrange(365))  # 2001: no 29 February
        gap = abs((day - date(2001, today.month, min(today.day, 28))).days)
        if min(gap, 365 - gap) > 3:
            return day.replace(year=rng.randint(1950, 2005))


def seed_contacts(conn: sa.Connection, count: int, birthday: Callable[[int], date], now: datetime) -> None:
    consent = jsoncodec.dumps({"email": {"state": "granted", "source": "bench", "at": now.isoformat()}})
    for start in range(0, count, BATCH):
        conn.execute(
            sa.insert(CONTACTS),
            [
                {
                    "id": i + 1,
                    "email": f"contact-{i}@bench.example",
                    "first_name": f"C{i}",
                    "timezone": ZONES[i % len(ZONES)],
                    "attributes": jsoncodec.dumps({"birthday": birthday(i).isoformat(), "plan": "pro"}),
                    "consent": consent,
                    "email_status": "ok",
                    "score": 0.0,
                    "created_at": now,
                    "updated_at": now,
                }
                for i in range(start, min(count, start + BATCH))
            ],
        )


def seed_pending(conn: sa.Connection, count: int, contacts: int, now: datetime) -> None:
    """`count` journeys of rule `nurture`, each with its first step pending, due 30 to 365 days ahead.

    One INSERT ... SELECT per table (SQLite generates the rows): a million rows in seconds, not minutes.
    Times are written as SQLAlchemy writes them for SQLite: naive UTC, `YYYY-MM-DD HH:MM:SS.ffffff`.
    """
    if not count:
        return
    stamp = now.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    series = "WITH RECURSIVE n(k) AS (SELECT 1 UNION ALL SELECT k + 1 FROM n WHERE k < :count) "
    conn.execute(
        sa.text(
            series + "INSERT INTO enrolments (id, rule, contact_id, event_id, occurrence, correlation, status, "
            "created_at) SELECT k, 'nurture', k % :contacts + 1, 'seed.' || k, 'track:seed-' || k, "
            "'track:seed-' || k, 'active', :stamp FROM n"
        ),
        {"count": count, "contacts": contacts, "stamp": stamp},
    )
    due = (
        "strftime('%Y-%m-%d %H:%M:%S', :stamp, '+' || (30 + k % 335) || ' days', '+' || (k * 7 % 86400) || "
        "' seconds') || '.000000'"
    )
    conn.execute(
        sa.text(
            series + "INSERT INTO jobs (kind, enrolment_id, step, priority, first_due_at, due_at, status, attempts, "
            f"created_at, updated_at) SELECT 'step', k, 0, 0, {due}, {due}, 'pending', 0, :stamp, :stamp FROM n"
        ),
        {"count": count, "stamp": stamp},
    )


# ------------------------------------------------------------------------------------------ serve phase


@dataclass
class ServeRun:
    label: str
    pending: int
    rss: dict[str, dict[str, int]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)


def prepare_serve_db(path: Path, contacts: int, pending: int, today: date) -> float:
    started = time.perf_counter()
    db = Database(f"sqlite:///{path}", timedelta(seconds=30))
    try:
        db.upgrade()
        rng = random.Random(7)
        days = [birthdays_away_from(today, rng) for _ in range(contacts)]
        now = datetime.now(UTC)

        def work(conn: sa.Connection) -> None:
            seed_contacts(conn, contacts, days.__getitem__, now)
            seed_pending(conn, pending, contacts, now)

        db.transaction(work)
    finally:
        db.close()
    with sqlite3.connect(path) as conn:  # no ANALYZE: a deployment's database never gets one either
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return time.perf_counter() - started


def insert_due_steps(url: str, tag: str, count: int, rate: float, lead: float, contacts: int) -> float:
    """Insert `count` steps due at `rate`/s from `lead` s from now, while the server runs; return t0 (epoch).

    Each step's event carries its due time, which the template puts in the subject.
    """
    engine = make_engine(url, timedelta(seconds=30))
    try:
        with engine.begin() as conn:
            now = datetime.now(UTC)
            t0 = time.time() + lead
            base = conn.execute(sa.select(sa.func.coalesce(sa.func.max(ENROLMENTS.c.id), 0))).scalar_one() + 1
            events, enrolments, jobs = [], [], []
            for i in range(count):
                due = t0 + i / rate
                due_at = datetime.fromtimestamp(due, UTC)
                contact = i % contacts + 1
                event_id = f"due.{tag}.{i}"
                properties = {"tag": tag, "seq": i, "due": f"{due:.6f}"}
                events.append(
                    {
                        "id": event_id,
                        "source": "bench",
                        "type": "track.never_sent",
                        "occurred_at": now,
                        "contact_id": contact,
                        "correlation": "[]",
                        "properties": jsoncodec.dumps(properties),
                    }
                )
                enrolments.append(
                    {
                        "id": base + i,
                        "rule": "due-now",
                        "contact_id": contact,
                        "event_id": event_id,
                        "occurrence": f"due:{tag}:{i}",
                        "status": "active",
                        "created_at": now,
                    }
                )
                jobs.append(
                    {
                        "kind": "step",
                        "enrolment_id": base + i,
                        "step": 0,
                        "due_at": due_at,
                        "first_due_at": due_at,
                        "priority": 0,
                        "status": "pending",
                        "attempts": 0,
                        "created_at": now,
                        "updated_at": now,
                    }
                )
            conn.execute(sa.insert(EVENTS), events)
            conn.execute(sa.insert(ENROLMENTS), enrolments)
            conn.execute(sa.insert(JOBS), jobs)
    finally:
        engine.dispose()
    return t0


def reconcile_done(db_path: Path) -> bool:
    """The start-up reconcile tick ran (the daily retention tick stays pending: it is not waited for)."""
    with sqlite3.connect(db_path, timeout=30) as conn:
        query = "SELECT status, count(*) FROM jobs WHERE key = 'tick:reconcile' GROUP BY status"
        states = dict(conn.execute(query).fetchall())
    return bool(states.get("done")) and not states.get("pending") and not states.get("running")


def wait_for_mails(catcher: TimedCatcher, prefix: str, expected: int, timeout: float) -> list[tuple[float, str]]:
    deadline = time.monotonic() + timeout
    while True:
        got = [(at, subject) for at, subject in list(catcher.arrivals) if subject.startswith(prefix)]
        if len(got) >= expected or time.monotonic() > deadline:
            return got
        time.sleep(0.25)


def track_body(event: str, run: str, i: int) -> bytes:
    return json.dumps(
        {
            "type": "track",
            "event": event,
            "messageId": f"{event}-{run}-{i}",
            "userId": f"{event}-user-{run}-{i}",
            "timestamp": datetime.now(UTC).isoformat(),
            "properties": {"seq": i, "total": 42.5, "currency": "EUR"},
            "context": {"traits": {"email": f"{run}-{i}@bench.example", "firstName": "Burst"}},
        }
    ).encode()


def track_headers() -> dict[str, str]:
    auth = "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
    return {"Content-Type": "application/json", "Authorization": auth}


async def post_burst(url: str, count: int, concurrency: int, run: str) -> dict[int, int]:
    import aiohttp

    statuses: dict[int, int] = {}
    todo = iter(range(count))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def poster() -> None:
            for i in todo:
                async with session.post(url, data=track_body("Bench Burst", run, i), headers=track_headers()) as answer:
                    await answer.read()
                    statuses[answer.status] = statuses.get(answer.status, 0) + 1

        await asyncio.gather(*(poster() for _ in range(concurrency)))
    return statuses


def probe_during_reconcile(url: str, db_path: Path, proc: subprocess.Popen[Any], timeout: float = 900.0) -> str:
    """Post one webhook (no rule matches it) at a time until the start-up reconcile is done; time each ack."""
    import urllib.request

    started = time.perf_counter()
    acks: list[float] = []
    statuses: dict[int, int] = {}
    while not reconcile_done(db_path):
        if proc.poll() is not None:
            raise RuntimeError("declic serve exited during start-up")
        if time.perf_counter() - started > timeout:
            raise RuntimeError("the reconcile tick did not finish")
        request = urllib.request.Request(
            url, data=track_body("Bench Probe", "probe", len(acks)), headers=track_headers(), method="POST"
        )
        sent = time.perf_counter()
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            answer.read()
            statuses[answer.status] = statuses.get(answer.status, 0) + 1
        acks.append(time.perf_counter() - sent)
        time.sleep(0.1)
    took = time.perf_counter() - started
    if not acks:
        return f"reconcile tick done {took:.1f} s after the port opened; no webhook posted meanwhile"
    acks.sort()
    return (
        f"reconcile tick done {took:.1f} s after the port opened; {len(acks)} webhooks posted one at a time "
        f"meanwhile: ack p50 {percentile(acks, 50) * 1000:.0f} ms, max {acks[-1] * 1000:.0f} ms ({statuses})"
    )


def serve_run(args: argparse.Namespace, folder: Path, label: str, pending: int) -> ServeRun:
    result = ServeRun(label, pending)
    db_path = folder / f"{label}.db"
    took = prepare_serve_db(db_path, args.contacts, pending, datetime.now(UTC).date())
    size = db_path.stat().st_size / 2**20
    print(
        f"  [{label}] database: {args.contacts:,} contacts, {pending:,} pending steps + enrolments, "
        f"{size:.0f} MiB, prepared in {took:.1f} s",
        flush=True,
    )
    result.notes["claim"] = claim_probe(db_path)
    catcher = TimedCatcher(clock="time").start()  # arrivals against due times in epoch seconds
    port = free_port()
    sink_extra = f"    connections: {args.smtp_connections}\n" if args.smtp_connections else ""
    worker = {
        key: value
        for key, value in (
            ("batch_size", args.batch_size),
            ("concurrency", args.concurrency),
            ("poll_interval", args.poll_interval),
        )
        if value is not None
    }
    config_dir = folder / label
    (config_dir / "templates").mkdir(parents=True)
    for name, text in SERVE_TEMPLATES.items():
        (config_dir / "templates" / name).write_text(text)
    config = config_dir / "declic.yaml"
    config.write_text(
        SERVE_CONFIG.format(
            port=port,
            db=db_path,
            write_key=WRITE_KEY,
            smtp_port=catcher.port,
            sink_extra=sink_extra,
            worker=f"worker: {json.dumps(worker)}\n" if worker else "",
            log_level=args.log_level,
        )
    )
    hooks = f"http://127.0.0.1:{port}/hooks/site"
    server = None
    log_path = folder / f"{label}-declic.log"
    try:
        with open(log_path, "wb") as log:
            started = time.perf_counter()
            server = subprocess.Popen(
                [str(DECLIC), "serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(port)],
                stdout=log,
                stderr=log,
            )
            wait_for_port(port, server, timeout=300)
            listening = time.perf_counter() - started
            result.notes["start"] = f"listening after {listening:.1f} s; " + probe_during_reconcile(
                hooks, db_path, server
            )
            time.sleep(1.0)
            result.rss["started"] = proc_status(server.pid)

            cpu0, wall0 = cpu_seconds(server.pid), time.perf_counter()
            time.sleep(args.idle)
            idle_cpu = (cpu_seconds(server.pid) - cpu0) / (time.perf_counter() - wall0)
            result.notes["idle"] = f"{idle_cpu * 100:.1f} % of a core while idle (the worker polling the queue)"

            for rate in args.rates:
                tag = f"r{rate:g}"
                count = max(1, round(rate * args.window))
                insert_started = time.perf_counter()
                t0 = insert_due_steps(f"sqlite:///{db_path}", tag, count, rate, 3.0, args.contacts)
                inserted = time.perf_counter() - insert_started
                cpu0 = cpu_seconds(server.pid)
                window = count / rate
                prefix = f"due {tag} "
                while time.time() < t0 + window + args.timeout:
                    if time.time() > t0 + window and len(wait_for_mails(catcher, prefix, count, 0)) >= count:
                        break
                    time.sleep(0.5)
                mails = wait_for_mails(catcher, prefix, count, 0)
                busy_cpu = cpu_seconds(server.pid) - cpu0
                result.rss[f"after {rate:g}/s due"] = proc_status(server.pid)
                result.notes[f"due at {rate:g}/s"] = lateness_report(mails, count, t0, window, busy_cpu, inserted)

            # A burst of webhooks, each enrolling a new contact in a rule that sends at once.
            run = f"{label}-{os.getpid()}"
            burst_started = time.perf_counter()
            statuses = asyncio.run(post_burst(hooks, args.burst, args.burst_concurrency, run))
            posted = time.perf_counter() - burst_started
            burst = wait_for_mails(catcher, "burst ", args.burst, args.timeout)
            burst_done = time.perf_counter() - burst_started
            result.rss["after webhook burst"] = proc_status(server.pid)
            result.notes["burst"] = (
                f"{args.burst:,} webhooks posted in {posted:.1f} s ({args.burst / posted:.0f}/s, statuses "
                f"{statuses}); {len(burst):,} e-mails received {burst_done:.1f} s after the first post "
                f"({len(burst) / burst_done:.0f}/s)"
            )
            time.sleep(args.idle)
            result.rss["idle again"] = proc_status(server.pid)
    finally:
        stop(server)
        catcher.stop()
    problems = [
        line
        for line in log_path.read_text(errors="replace").splitlines()
        if '"level": "error"' in line or '"level": "warning"' in line or "Traceback" in line
    ]
    if problems:
        result.notes["log"] = f"{len(problems)} warnings/errors in the server log, last: {problems[-1][:300]}"
    if server is not None and server.returncode not in (0, -signal.SIGTERM):
        result.notes["exit"] = f"declic serve exited with {server.returncode}"
    return result


def lateness_report(
    mails: list[tuple[float, str]], expected: int, t0: float, window: float, cpu: float, inserted: float
) -> str:
    late = []
    seen = set()
    for arrived, subject in mails:
        _, _, seq, due = subject.split(" ")
        if seq in seen:
            continue
        seen.add(seq)
        late.append(arrived - float(due))
    late.sort()
    if not late:
        return f"no e-mail received of {expected:,}"
    last = max(at for at, _ in mails)
    early = sum(1 for x in late if x < 0)
    return (
        f"{len(seen):,}/{expected:,} received ({len(mails) - len(seen)} duplicates, {early} before due) for a "
        f"{window:.0f} s window of due steps; lateness (arrival - due) p50 {percentile(late, 50) * 1000:.0f} ms, "
        f"p90 {percentile(late, 90) * 1000:.0f} ms, p99 {percentile(late, 99) * 1000:.0f} ms, "
        f"max {late[-1] * 1000:.0f} ms; {len(seen) / max(last - t0, 1e-9):.0f} e-mails/s from the first due time "
        f"to the last arrival; server CPU {cpu:.1f} s ({cpu / len(seen) * 1000:.1f} ms per e-mail); "
        f"inserting the steps took {inserted:.2f} s"
    )


def claim_probe(db_path: Path) -> str:
    """The claim query on this table, with nothing due: its time and SQLite's plan."""
    from declic_gateway.store import jobqueue

    db = Database(f"sqlite:///{db_path}", timedelta(seconds=30))
    seen: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        if statement.lstrip().upper().startswith("UPDATE JOBS"):
            seen.append((statement, parameters))

    sa.event.listen(db.engine, "before_cursor_execute", capture)
    try:
        now = datetime.now(UTC)

        def probe(conn: sa.Connection) -> tuple[float, list[str]]:
            timings = []
            for _ in range(5):
                started = time.perf_counter()
                jobqueue.claim(conn, "probe", now, timedelta(minutes=5), 50)
                timings.append(time.perf_counter() - started)
            statement, parameters = seen[-1]
            plan = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters).all()
            return min(timings), [row[-1] for row in plan]

        best, plan = db.transaction(probe)
    finally:
        db.close()
    return f"claim() with nothing due {best * 1000:.2f} ms; plan: {' | '.join(plan)}"


def serve_phase(args: argparse.Namespace) -> None:
    rates = ", ".join(f"{round(r * args.window):,} due at {r:g}/s" for r in args.rates)
    print(
        f"\n== serve: declic serve with 0, then {args.pending:,} pending steps; {args.contacts:,} contacts with a "
        f"birthday; steps due: {rates}; {args.burst:,} webhooks; log level {args.log_level}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="declic-journeys-") as tmp:
        folder = Path(tmp)
        runs = [serve_run(args, folder, "baseline", 0)]
        if args.pending:
            runs.append(serve_run(args, folder, "pending", args.pending))
    for run in runs:
        print(f"  [{run.label}] {run.pending:,} pending steps")
        for key, note in run.notes.items():
            print(f"    {key}: {note}")
    if len(runs) == 1:
        for stage, status in runs[0].rss.items():
            print(f"    RSS {stage:<20} {mib(status['VmRSS']):>10} (peak {mib(status['VmHWM'])})")
        return
    print("  memory of the serving process (VmRSS; VmHWM = its peak so far):")
    base, big = runs
    for stage in base.rss:
        a, b = base.rss[stage], big.rss.get(stage)
        if b is None:
            continue
        print(
            f"    {stage:<20} 0 pending: {mib(a['VmRSS']):>10} (peak {mib(a['VmHWM'])})   "
            f"{args.pending:,} pending: {mib(b['VmRSS']):>10} (peak {mib(b['VmHWM'])})   "
            f"ratio {b['VmRSS'] / a['VmRSS']:.2f}"
        )


# ------------------------------------------------------------------------------------------ clock phase


async def birthday_morning(folder: Path, contacts: int) -> None:
    """`contacts` birthdays on the same day: reconcile schedules them, then all fire and send at 10:00."""
    from declic_gateway.cli.simulate import RecordingSink
    from declic_gateway.http.app import build_gateway, load
    from declic_gateway.kit.clock import FakeClock

    config_dir = folder / "morning"
    (config_dir / "templates").mkdir(parents=True)
    (config_dir / "templates" / "plain.subject.j2").write_text("Happy birthday {{ contact.first_name }}")
    (config_dir / "templates" / "plain.txt.j2").write_text("Hello {{ contact.first_name }}, happy birthday!")
    (config_dir / "declic.yaml").write_text(
        textwrap.dedent(
            f"""\
            public_url: https://hooks.example.com   # unsubscribe links; nothing is served in this phase
            timezone: UTC
            storage: {{url: 'sqlite:///{config_dir / "morning.db"}'}}
            sinks:
              email: {{plugin: smtp, host: 127.0.0.1, port: 9, tls: none, sender: bench@example.com}}
            policies: {{consent: {{email: required}}}}
            rules:
              - name: birthday
                on_date: contact.birthday
                at: "10:00"
                send: {{via: email, template: plain}}
            logging: {{level: warning}}
            """
        )
    )
    settings, pm, _ = load(str(config_dir / "declic.yaml"))
    clock = FakeClock(datetime(2026, 7, 14, 6, 0, tzinfo=UTC))
    gateway = build_gateway(settings, pm=pm, clock=clock, role="worker", wrap_sink=RecordingSink)
    try:
        gateway.db.upgrade()
        gateway.db.transaction(seed_contacts, contacts, lambda i: date(1980 + i % 25, 7, 14), clock.now())
        with gateway.db.engine.begin() as conn:  # all in UTC: every birthday at 10:00 UTC
            conn.execute(sa.update(CONTACTS).values(timezone="UTC"))
        started = time.perf_counter()
        scheduled = await gateway.db.run(gateway.router.reconcile, clock.now())
        reconciled = time.perf_counter() - started
        clock.set(datetime(2026, 7, 14, 10, 0, tzinfo=UTC))
        started = time.perf_counter()
        ran = await gateway.worker.drain()
        fired = time.perf_counter() - started
        sent = sum(len(sink.sent) for sink in gateway.sinks.values())  # type: ignore[attr-defined]
    finally:
        gateway.db.close()
    print(
        f"  birthday morning: {contacts:,} contacts born on 14 July; reconcile scheduled {scheduled:,} triggers in "
        f"{reconciled:.2f} s; at 10:00 Worker.drain() ran {ran:,} jobs (trigger + step each) and sent {sent:,} "
        f"in {fired:.1f} s -> {sent / fired:.0f} birthdays fired and sent per second (recording sink, fake clock)",
        flush=True,
    )


def clock_phase(args: argparse.Namespace) -> None:
    from declic_gateway.kit.templating import make_environment
    from declic_gateway.pipeline.router import Router

    print(f"\n== clock: Router.reconcile over {args.contacts:,} contacts with a birthday", flush=True)
    env = make_environment(None)
    today = datetime.now(UTC).date()
    rng = random.Random(11)
    days = [birthdays_away_from(today, rng) for _ in range(args.contacts)]
    per_pair = []
    with tempfile.TemporaryDirectory(prefix="declic-journeys-clock-") as tmp:
        folder = Path(tmp)
        for count in args.date_rules:
            db = fresh_database(folder, f"clock-{count}.db")
            try:
                now = datetime.now(UTC)
                db.transaction(seed_contacts, args.contacts, days.__getitem__, now)
                rules = [
                    rule_spec(
                        name=f"date-{r}",
                        on_date="contact.birthday" if r % 2 == 0 else "contact.attributes.birthday",
                        at=f"{8 + r % 10:02d}:00",
                        send={"via": "email", "template": "plain"},
                    )
                    for r in range(count)
                ]
                router = Router(rules, env, None, "UTC")
                pairs = count * args.contacts
                started = time.perf_counter()
                scheduled = db.transaction(router.reconcile, now)
                first = time.perf_counter() - started
                started = time.perf_counter()
                db.transaction(router.reconcile, now + timedelta(seconds=1))
                second = time.perf_counter() - started
                with db.engine.connect() as conn:
                    jobs = conn.execute(
                        sa.select(sa.func.count()).select_from(JOBS).where(JOBS.c.kind == "trigger")
                    ).scalar_one()
            finally:
                db.close()
            per_pair.append(first / pairs)
            print(
                f"  {count:>5} date rules x {args.contacts:,} contacts = {pairs:,} pairs: first pass {first:.2f} s "
                f"({first / pairs * 1e6:.0f} µs/pair, {scheduled:,} scheduled, {jobs:,} trigger jobs), second pass "
                f"{second:.2f} s ({second / pairs * 1e6:.0f} µs/pair)",
                flush=True,
            )
        last = per_pair[-1]
        full = 10_000 * args.contacts
        print(
            f"  extrapolated: 10,000 date rules x {args.contacts:,} contacts = {full:,} pairs -> "
            f"~{full * last / 3600:.1f} h in one transaction at {last * 1e6:.0f} µs/pair (one query or more per "
            f"pair, so linear in rules x contacts; measured up to {args.date_rules[-1]:,} rules)",
            flush=True,
        )
        if args.morning:
            asyncio.run(birthday_morning(folder, args.morning))


# ----------------------------------------------------------------------------------------- router phase


def router_rules(total: int, matching: int, date_rules: int = 0) -> list[RuleSpec]:
    step = {"wait": "1d", "send": {"via": "email", "template": "plain"}}
    rules = [
        rule_spec(name=f"hit-{i}", when="track.hit", **{"if": f"event.properties.total > {i % 10}"}, steps=[step])
        for i in range(matching)
    ]
    rules += [
        rule_spec(name=f"date-{i}", on_date="contact.birthday", send=step["send"])
        for i in range(min(date_rules, total - matching))
    ]
    rules += [
        rule_spec(
            name=f"other-{i}",
            when=f"track.other_{i}",
            **{"if": "event.properties.total > 10"},
            exit_on=["order.placed"],
            steps=[step],
        )
        for i in range(total - len(rules))
    ]
    return rules


@contextmanager
def router_db(folder: Path, name: str, contacts: int) -> Iterator[tuple[Database, list[dict[str, Any]]]]:
    from declic_gateway.pipeline import contacts as contacts_module

    db = fresh_database(folder, name)
    try:
        now = datetime.now(UTC)
        db.transaction(seed_contacts, contacts, lambda i: date(1990, 1 + i % 12, 1 + i % 28), now)
        loaded = db.transaction(lambda conn: [contacts_module.load(conn, i + 1) for i in range(contacts)])
        yield db, loaded
    finally:
        db.close()


def time_route(
    folder: Path, rules: list[RuleSpec], budget: float, most: int, event_type: str, with_timezone: bool = False
) -> tuple[float, int, int]:
    """Router.route() in transactions of 100 events, for `budget` seconds or `most` events.

    Returns the seconds per event, the events routed and the enrolments made.
    """
    from declic_gateway.kit.templating import make_environment
    from declic_gateway.pipeline.router import Router

    router = Router(rules, make_environment(None), None, "UTC")
    name = f"router-{len(os.listdir(folder))}.db"
    with router_db(folder, name, 1000) as (db, contacts):
        base = datetime.now(UTC)
        ref = ContactRef(email="x@bench.example", timezone="Europe/Paris" if with_timezone else None)

        def events(first: int, count: int) -> list[Event]:
            return [
                Event(
                    id=f"e{i}",
                    source="bench",
                    type=event_type,
                    occurred_at=base,
                    contact=ref,
                    properties={"total": 42.5, "currency": "EUR", "sku": "BOL-THE"},
                    correlation=[f"track:m{i}"],
                )
                for i in range(first, first + count)
            ]

        def route_some(conn: sa.Connection, chunk: list[Event]) -> None:
            for event in chunk:
                router.route(conn, event, contacts[int(event.id[1:]) % len(contacts)], base)

        db.transaction(route_some, events(0, 10))  # warm-up: statement caches
        took, routed = 0.0, 0
        while took < budget and routed < most:
            chunk = events(10 + routed, 100)
            started = time.perf_counter()
            db.transaction(route_some, chunk)
            took += time.perf_counter() - started
            routed += len(chunk)
        with db.engine.connect() as conn:
            made = conn.execute(sa.select(sa.func.count()).select_from(ENROLMENTS)).scalar_one()
    return took / routed, routed, made


def time_selection(rules: list[RuleSpec], event_type: str, rounds: int = 20_000) -> float:
    """Rule selection by event type and `if:` evaluation alone: what route() does before touching the database."""
    from declic_gateway.kit.templating import make_environment
    from declic_gateway.pipeline.router import Router, event_context

    router = Router(rules, make_environment(None), None, "UTC")
    event = Event(
        id="e1",
        source="bench",
        type=event_type,
        occurred_at=datetime.now(UTC),
        contact=ContactRef(email="x@bench.example"),
        properties={"total": 42.5},
    )
    index = router._by["when"]  # the router's own index (private; read only here)
    started = time.perf_counter()
    for _ in range(rounds):
        context = {"event": event_context(event), "contact": {"id": 1}}
        for rule in index.get(event.type, ()):
            rule.condition is None or rule.condition(**context)
    return (time.perf_counter() - started) / rounds


def router_phase(args: argparse.Namespace) -> None:
    total = args.router_rules
    print(
        f"\n== router: Router.route() per event, {total:,} rules in the config vs 10, M of them matching "
        f"(each with an `if:`, a first step 1 day later); SQLite file, 100 events per transaction",
        flush=True,
    )
    cases = [(10, 0), (10, 1), (10, 10), (total, 0), (total, 1), (total, 10), (total, 100)]
    results: dict[tuple[int, int], float] = {}
    with tempfile.TemporaryDirectory(prefix="declic-journeys-router-") as tmp:
        folder = Path(tmp)
        for rules_total, matching in cases:
            rules = router_rules(rules_total, matching)
            per_event, events, made = time_route(folder, rules, args.router_budget, args.router_events, "track.hit")
            select = time_selection(rules, "track.hit")
            results[(rules_total, matching)] = per_event
            print(
                f"  {rules_total:>5} rules, {matching:>3} matching: route() {per_event * 1e6:8.0f} µs/event "
                f"({events:,} events, {made:,} enrolments); selection + if: alone {select * 1e6:6.1f} µs/event",
                flush=True,
            )
        for matching in (0, 1, 10):
            ratio = results[(total, matching)] / results[(10, matching)]
            print(f"  {total:,} rules / 10 rules, {matching} matching: x{ratio:.2f}")
        base = results[(total, 1)]
        for matching in (10, 100):
            print(f"  {total:,} rules, {matching} matching / 1 matching: x{results[(total, matching)] / base:.1f}")
        # Date rules are checked on every event whose contact carries a time zone (router.reschedule_dates).
        for date_rules in (0, 10, 100):
            rules = router_rules(total, 1, date_rules)
            per_event, events, _ = time_route(
                folder, rules, args.router_budget, args.router_events, "track.hit", with_timezone=True
            )
            print(
                f"  {total:,} rules ({date_rules} of them date rules), 1 matching, the event's contact carries a "
                f"time zone: route() {per_event * 1e6:.0f} µs/event ({events:,} events)",
                flush=True,
            )


# ------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phases", default="serve,clock,router", help="comma-separated: serve, clock, router")
    parser.add_argument("--pending", type=int, default=1_000_000, help="pending steps in the queue (1,000,000)")
    parser.add_argument("--contacts", type=int, default=10_000, help="contacts with a birthday (10,000)")
    parser.add_argument("--rates", default="1000,100", help="due steps per second, one round each (1000,100)")
    parser.add_argument("--window", type=float, default=5.0, help="seconds of due steps per round (5)")
    parser.add_argument("--burst", type=int, default=1000, help="webhooks posted after the due steps (1,000)")
    parser.add_argument("--burst-concurrency", type=int, default=32, help="posts in flight (32)")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of idleness measured per stage (5)")
    parser.add_argument("--timeout", type=float, default=120.0, help="wait this long for late e-mails (120 s)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    parser.add_argument("--batch-size", type=int, default=None, help="worker.batch_size (default: Declic's)")
    parser.add_argument("--concurrency", type=int, default=None, help="worker.concurrency (default: Declic's)")
    parser.add_argument("--poll-interval", default=None, help="worker.poll_interval, e.g. 200ms (default: Declic's)")
    parser.add_argument("--smtp-connections", type=int, default=None, help="the SMTP sink's connections")
    parser.add_argument("--date-rules", default="1,3", help="date-rule counts for reconcile, comma-separated (1,3)")
    parser.add_argument(
        "--morning", type=int, default=2000, help="birthdays due at the same minute, fired and sent (2,000; 0: skip)"
    )
    parser.add_argument("--router-rules", type=int, default=1000, help="rules in the config (1,000)")
    parser.add_argument("--router-events", type=int, default=5000, help="events routed per case, at most (5,000)")
    parser.add_argument("--router-budget", type=float, default=2.0, help="seconds of routing per case, about (2)")
    args = parser.parse_args()
    args.date_rules = [int(n) for n in args.date_rules.split(",") if n]
    args.rates = [float(n) for n in args.rates.split(",") if n]
    phases = {p.strip() for p in args.phases.split(",")}
    logs.configure("warning")  # in-process parts: the router's own cost, not one log line per enrolment
    print(f"machine: {machine()}", flush=True)
    started = time.perf_counter()
    if "router" in phases:
        router_phase(args)
    if "clock" in phases:
        clock_phase(args)
    if "serve" in phases:
        serve_phase(args)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
