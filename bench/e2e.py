"""End-to-end benchmark: signed webhook -> rule -> e-mail received by a local SMTP server.

    .venv/bin/python bench/e2e.py [--orders 2000] [--concurrency 64] [--timeout 120] [--links N] [--track] [--cpu N]

`declic serve` (role all) runs in its own process on a fresh temporary SQLite database (or, with
`--postgres URL`, a fresh database on that PostgreSQL server, dropped afterwards), with one
Shopify source, one SMTP sink (`tls: none`) pointing at an aiosmtpd catcher in a process of its own
(bench/_catcher.py), and one rule: `when: order.placed`, `kind: transactional`, send immediately.
This process posts N orders/create webhooks (distinct order ids, names and e-mail addresses) at the
given concurrency, and timestamps each e-mail as the catcher receives it; the order name is in the
subject, so each e-mail is matched to its post. `--links N` puts N shop links in the HTML part;
`--track` turns on Declic's own open pixel and click redirects for the rule (`track:`), to
measure what tracking costs the send path; `--no-keep-rendered` keeps no copy of sent messages,
to measure what the timeline's copies cost. It prints e-mails/s from the first post to the last
e-mail received and the end-to-end latency (post start -> e-mail received), p50 and p99, and
where Declic's CPU went per e-mail: its event loop's thread, its other threads, and the database
transactions among them (as Declic counts them on /metrics), each with its share in the kernel.
`--delay MS` (with `--postgres`) puts a proxy process between Declic and the database that holds
each packet MS ms each way, as a database on another host (bench/_common.py, `delaying_proxy`).
With `--postgres`, it also prints the CPU that the database's server processes used for it: the
backends connected to the bench's database (read from pg_stat_activity before and after) and the
WAL writer, which flushes every commit.
`--against-floor` runs the floor (bench/_floor_server.py, `--floor` alone) on the same orders first, then
Declic, and prints Declic's CPU per e-mail as a multiple of the floor's measured in the same run, and with
`--callgrind` its instructions per e-mail as a multiple of the floor's: target 1 as a ratio that does not
depend on how fast the machine is that hour.
A benchmark, not a test: it reports and asserts nothing about timings.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _catcher import TimedCatcher
from _common import (
    BENCH,
    DECLIC,
    METRICS_CONFIG,
    SECRET,
    add_cpu_option,
    cpu_sample,
    cpu_seconds,
    delaying_proxy,
    free_port,
    keep_off,
    machine,
    machine_ticks,
    machine_usage,
    on_cpu,
    order_body,
    percentile,
    sign,
    stop,
    wait_for_port,
    webhook_headers,
    where_cpu_went,
    where_it_runs,
)

from declic_gateway.testing import write_deployment

CONFIG = (
    """\
public_url: http://127.0.0.1:{port}
timezone: UTC
storage:
  url: {db}
{keep_rendered}sources:
  shop:
    plugin: shopify
    secret: {secret}
sinks:
  email:
    plugin: smtp
    host: 127.0.0.1
    port: {smtp_port}
    tls: none
    sender: "Bench Boutique <bench@example.com>"
{sink_extra}rules:
  - name: order-confirmation
    when: order.placed
    kind: transactional
{track}    send: {{via: email, template: order-confirmation}}
{worker}logging:
  level: {log_level}
"""
    + METRICS_CONFIG
)

TEMPLATES = {
    "order-confirmation.subject.j2": "Order {{ event.properties.name }}",
    "order-confirmation.txt.j2": "Hello {{ contact.first_name }}, thanks for order {{ event.properties.name }} "
    "({{ event.properties.total_price }} {{ event.properties.currency }}).",
    "order-confirmation.html.j2": "<p>Hello {{ contact.first_name }}, thanks for order "
    "<b>{{ event.properties.name }}</b>.</p>",
}


def templates(links: int) -> dict[str, str]:
    """The templates, with `links` shop links added to the HTML part."""
    shop = "".join(
        f'<p><a href="https://shop.example.com/products/{i}?utm_source=declic&amp;utm_medium=email">Product {i}</a></p>'
        for i in range(links)
    )
    return {**TEMPLATES, "order-confirmation.html.j2": TEMPLATES["order-confirmation.html.j2"] + shop}


CALLGRIND = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--trace-children=no"]


def callgrind_control(pid: int, *options: str) -> None:
    subprocess.run(["callgrind_control", *options, str(pid)], check=True, capture_output=True, timeout=120)


def callgrind_total(pid: int, counts: Path) -> int:
    """Stop counting, have callgrind write what it counted, and return the instructions (its `totals:`)."""
    callgrind_control(pid, "--instr=off")
    callgrind_control(pid, "--dump")
    total = 0
    for dump in counts.parent.glob(counts.name + ".*"):
        for line in dump.read_text(errors="replace").splitlines():
            if line.startswith(("totals:", "summary:")):
                total = max(total, int(line.split()[1]))
    return total


async def post_all(url: str, orders: list[tuple[str, bytes, str]], concurrency: int) -> dict[str, Any]:
    posted: dict[str, float] = {}
    acked: dict[str, float] = {}
    statuses: dict[int, int] = {}
    errors: dict[str, int] = {}
    queue = iter(orders)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def sender() -> None:
            for name, body, digest in queue:
                headers = webhook_headers(digest, f"e2e-{name}")
                posted[name] = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=headers) as response:
                        await response.read()
                        statuses[response.status] = statuses.get(response.status, 0) + 1
                except (TimeoutError, aiohttp.ClientError) as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    continue
                acked[name] = time.perf_counter()

        await asyncio.gather(*(sender() for _ in range(concurrency)))
    return {"posted": posted, "acked": acked, "statuses": statuses, "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orders", type=int, default=2000, help="webhooks to post, one e-mail each (default 2000)")
    parser.add_argument("--concurrency", type=int, default=64, help="posts in flight (default 64)")
    parser.add_argument("--timeout", type=float, default=120.0, help="give up waiting for e-mails after (s)")
    parser.add_argument(
        "--smtp-connections", type=int, default=None, help="the SMTP sink's `connections` (default: Declic's default)"
    )
    parser.add_argument(
        "--worker-concurrency", type=int, default=None, help="worker.concurrency (default: Declic's default)"
    )
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    parser.add_argument("--links", type=int, default=0, help="shop links in the HTML part (default 0)")
    parser.add_argument("--track", action="store_true", help="track opens and clicks (pixel, link redirects)")
    parser.add_argument(
        "--no-keep-rendered", action="store_true", help="keep no copy of sent messages (storage.keep_rendered: false)"
    )
    parser.add_argument("--callgrind-keep", type=Path, help="with --callgrind: copy callgrind's file here")
    parser.add_argument("--declic", type=Path, default=DECLIC, help="the declic command to run (another checkout's)")
    parser.add_argument(
        "--postgres", metavar="URL", help="run on a fresh database of this PostgreSQL server instead of SQLite"
    )
    parser.add_argument(
        "--delay",
        type=float,
        default=0.0,
        metavar="MS",
        help="with --postgres: reach the database through a proxy that holds each packet MS ms each way, as a "
        "database on another host",
    )
    parser.add_argument(
        "--callgrind",
        action="store_true",
        help="run Declic under callgrind and count its instructions from the first post to the last e-mail: "
        "a cost per e-mail that other load on the machine does not change (slow: ~50x)",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="run bench/_floor_server.py instead of Declic, on SQLite: the least a durable gateway on Declic's "
        "stack does per e-mail (checked HMAC, the call committed before the 200, rendered templates, the send "
        "recorded), to compare Declic's cost per e-mail with",
    )
    parser.add_argument(
        "--against-floor",
        action="store_true",
        help="run the floor, then Declic, on the same orders, and print Declic's CPU per e-mail (and with "
        "--callgrind its instructions) as a multiple of the floor's measured in the same run: target 1 as a ratio "
        "that does not depend on the machine's speed",
    )
    parser.add_argument(
        "--statements",
        action="store_true",
        help="count the SQL statements and transactions Declic runs from the first post to the last e-mail, "
        "by statement (bench/_statements/sitecustomize.py); on SQLite, run them again on the bare sqlite3 cursor "
        "and print their CPU per e-mail: what the rows cost without the Python around them",
    )
    add_cpu_option(parser)
    args = parser.parse_args()
    if (args.floor or args.against_floor) and (args.postgres or args.statements):
        parser.error("the floor runs on SQLite and counts no statements")
    if args.floor and args.against_floor:
        parser.error("--against-floor runs the floor itself")

    run = uuid.uuid4().hex[:6]
    orders = []
    for i in range(args.orders):
        name = f"E2E-{run}-{i:06d}"
        body = order_body(i, email=f"bench+{run}-{i}@example.com", name=name)
        orders.append((name, body, sign(body)))
    print(f"machine: {machine(args.declic)}")
    print(f"cpus: {keep_off(args.cpu)}")
    if args.floor:
        print("server: the floor (bench/_floor_server.py), not Declic")
    elif args.against_floor:
        print("server: the floor (bench/_floor_server.py), then Declic, on the same orders")
    print(
        f"load: {args.orders} orders/create webhooks of ~{len(orders[0][1]) / 1024:.1f} KB at concurrency "
        f"{args.concurrency}; rule order.placed -> transactional e-mail via SMTP (tls none) to an aiosmtpd "
        f"catcher in its own process; log level {args.log_level}; {args.links} links in the HTML part, "
        f"tracking {'on' if args.track else 'off'}, "
        f"copies of sent messages {'not ' if args.no_keep_rendered else ''}kept"
        + (f"; PostgreSQL through a proxy holding each packet {args.delay} ms each way" if args.delay else ""),
        flush=True,
    )

    if not args.against_floor:
        measure(args, orders, args.floor)
        return
    print("--- the floor")
    floor = measure(args, orders, floor=True)
    print("--- Declic")
    declic = measure(args, orders, floor=False)
    print(
        f"against the floor, same run: Declic's CPU per e-mail {declic.cpu * 1000:.2f} ms = "
        f"{declic.cpu / floor.cpu:.2f} x the floor's {floor.cpu * 1000:.2f} ms; {declic.rate:.0f} e-mails/s = "
        f"{declic.rate / floor.rate:.0%} of the floor's {floor.rate:.0f}"
        + (
            f"; {declic.instructions / floor.instructions:.2f} x its instructions per e-mail"
            if declic.instructions and floor.instructions
            else ""
        )
    )


class Measured(NamedTuple):
    rate: float  # e-mails/s, from the first post to the last e-mail
    cpu: float  # the server's CPU seconds per e-mail
    instructions: float | None  # per e-mail, with --callgrind


def measure(args: argparse.Namespace, orders: list[tuple[str, bytes, str]], floor: bool) -> Measured:
    """One server (Declic, or the floor), the orders posted, its e-mails awaited; prints what it measured."""
    catcher = TimedCatcher()
    catcher.expected = args.orders
    server = None
    with tempfile.TemporaryDirectory(prefix="declic-e2e-") as tmp:
        folder = Path(tmp)
        port = free_port()
        db = Postgres(args.postgres, uuid.uuid4().hex[:6], args.delay) if args.postgres else None
        url = db.url if db else f"sqlite:///{folder / 'declic.db'}"
        sink_extra = f"    connections: {args.smtp_connections}\n" if args.smtp_connections else ""
        worker = f"worker:\n  concurrency: {args.worker_concurrency}\n" if args.worker_concurrency else ""
        try:
            catcher.start()
            config = write_deployment(
                folder,
                CONFIG.format(
                    port=port,
                    db=url,
                    secret=SECRET,
                    smtp_port=catcher.port,
                    sink_extra=sink_extra,
                    worker=worker,
                    log_level=args.log_level,
                    track="    track: {opens: true, clicks: true}\n" if args.track else "",
                    keep_rendered="  keep_rendered: false\n" if args.no_keep_rendered else "",
                ),
                templates(args.links),
            )
            if db:
                subprocess.run([str(args.declic), "db", "upgrade", "--config", str(config)], check=True)
            with open(folder / "declic.log", "wb") as log:
                command = [str(args.declic), "serve", "--config", str(config), "--host", "127.0.0.1"]
                if floor:
                    command = [sys.executable, str(BENCH / "_floor_server.py"), "--db", str(folder / "floor.db")]
                    command += ["--smtp-port", str(catcher.port), "--secret", SECRET]
                counts = folder / "callgrind.out"
                if args.callgrind:  # counting starts with the load, not at start-up
                    command = [*CALLGRIND, f"--callgrind-out-file={counts}", *command]
                environment = dict(os.environ)
                if args.statements:
                    environment["PYTHONPATH"] = str(BENCH / "_statements")
                    environment["DECLIC_STATEMENTS_OUT"] = str(folder / "statements.json")
                    if not db:  # kept to be replayed on the bare sqlite3 cursor
                        environment["DECLIC_STATEMENTS_LOG"] = str(folder / "statements.pickle")
                server = subprocess.Popen(
                    [*command, "--port", str(port)],
                    stdout=log,
                    stderr=log,
                    env=environment,
                    preexec_fn=on_cpu(args.cpu),
                )
                wait_for_port(port, server, timeout=600 if args.callgrind else 30)
                if args.cpu is not None:
                    print(f"cpus: {where_it_runs(server.pid)}", flush=True)
                if args.callgrind:
                    callgrind_control(server.pid, "--instr=on")
                if args.statements:
                    if not db:  # the database as the log starts, for the replay
                        copy_database(folder / "declic.db", folder / "replay.db")
                    os.kill(server.pid, signal.SIGUSR1)
                metrics_port = None if floor else port
                cpu_before, ticks_before = cpu_seconds(server.pid), machine_ticks()
                threads_before = cpu_sample(server.pid, metrics_port)
                db_before = db.cpu() if db else {}
                result = asyncio.run(post_all(f"http://127.0.0.1:{port}/hooks/shop", orders, args.concurrency))
                posts_done = time.perf_counter()
                catcher.everything.wait(timeout=max(0.0, args.timeout - (posts_done - min(result["posted"].values()))))
                waited = time.perf_counter()
                server_cpu = cpu_seconds(server.pid) - cpu_before
                threads_after = cpu_sample(server.pid, metrics_port)
                db_cpu = {pid: cpu - db_before.get(pid, 0.0) for pid, cpu in db.cpu().items()} if db else {}
                usage = machine_usage(ticks_before, machine_ticks())
                instructions = callgrind_total(server.pid, counts) if args.callgrind else None
                if args.statements and not db:  # an e-mail arrives before its send is recorded: the log has both
                    wait_recorded(url, len(catcher.arrivals))
                statements = read_statements(server.pid, folder / "statements.json") if args.statements else None
                if statements is not None and not db:
                    statements["replay"] = replay(folder / "replay.db", folder / "statements.pickle", args.cpu)
                if args.callgrind and args.callgrind_keep:
                    shutil.copy(next(counts.parent.glob(counts.name + ".*")), args.callgrind_keep)
        finally:
            stop(server)
            catcher.stop()
            try:
                sent = count_sent(f"sqlite:///{folder / 'floor.db'}", "inbox") if floor else count_sent(url)
            finally:
                if db:
                    db.drop()
        if len(catcher.arrivals) < args.orders:  # say why, before the temporary folder goes
            problems = [
                line
                for line in (folder / "declic.log").read_text(errors="replace").splitlines()
                if '"error"' in line or "Traceback" in line or "warning" in line
            ]
            print("declic log, last problems:", *problems[-10:], sep="\n  ")

    posted, acked = result["posted"], result["acked"]
    first_post = min(posted.values())
    arrivals = {}
    duplicates = 0
    for arrived, subject in catcher.arrivals:
        name = subject.removeprefix("Order ")
        if name in arrivals:
            duplicates += 1
        else:
            arrivals[name] = arrived
    matched = [arrivals[n] - posted[n] for n in arrivals if n in posted]
    e2e = sorted(matched)
    acks = sorted(acked[n] - posted[n] for n in acked)
    last_mail = max(arrivals.values()) if arrivals else waited
    post_seconds = posts_done - first_post
    print(
        f"  posts: {len(acked)} acked in {post_seconds:.2f} s -> {len(acked) / post_seconds:.0f} "
        f"req/s; ack latency p50 {percentile(acks, 50) * 1000:.1f} ms, p99 {percentile(acks, 99) * 1000:.1f} ms; "
        f"statuses {result['statuses']}{', client errors ' + str(result['errors']) if result['errors'] else ''}"
    )
    print(
        f" e-mail: {len(arrivals)}/{args.orders} received ({duplicates} duplicates) in {last_mail - first_post:.2f} s "
        f"from the first post -> {len(arrivals) / (last_mail - first_post):.0f} e-mails/s"
    )
    print(
        f"    e2e: post start -> e-mail received: p50 {percentile(e2e, 50) * 1000:.0f} ms, "
        f"p99 {percentile(e2e, 99) * 1000:.0f} ms, max {e2e[-1] * 1000 if e2e else float('nan'):.0f} ms"
    )
    cpu_per_email = server_cpu / max(1, len(arrivals))
    print(
        f" ledger: {sent} deliveries recorded as sent; {'the floor' if floor else 'Declic'} used "
        f"{server_cpu:.1f} s of CPU from the first post "
        f"to the last e-mail, {cpu_per_email * 1000:.1f} ms per e-mail "
        f"({server_cpu / (waited - first_post):.0%} of a core)"
    )
    print(f"        {where_cpu_went(server.pid, threads_before, threads_after, len(arrivals))}")
    if db:
        used = sum(db_cpu.values())
        print(
            f"     db: PostgreSQL's processes for it used {used:.1f} s of CPU, "
            f"{used / max(1, len(arrivals)) * 1000:.1f} ms per e-mail ({len(db_cpu) - 1} backends and the WAL "
            f"writer); Declic and the database together {(server_cpu + used) / max(1, len(arrivals)) * 1000:.1f} "
            "ms per e-mail"
        )
    print(f"        {usage}")
    if instructions is not None:
        print(
            f" counted: {instructions / 1e9:.2f} G instructions from the first post to the last e-mail, "
            f"{instructions / max(1, len(arrivals)) / 1e6:.2f} M per e-mail (callgrind)"
        )
    if statements is not None:
        print_statements(statements, len(arrivals))
    if len(arrivals) < args.orders:
        print(f"   NOTE: {args.orders - len(arrivals)} e-mails had not arrived after the {args.timeout:g} s timeout")
    per_email = None if instructions is None else instructions / max(1, len(arrivals))
    return Measured(len(arrivals) / (last_mail - first_post), cpu_per_email, per_email)


def wait_recorded(url: str, sends: int, timeout: float = 30.0) -> None:
    """Until the server has recorded `sends` deliveries as sent (or `timeout` passed)."""
    deadline = time.monotonic() + timeout
    while count_sent(url) < sends and time.monotonic() < deadline:
        time.sleep(0.05)


def read_statements(pid: int, path: Path) -> dict[str, Any]:
    """Have the server write its statement counts (SIGUSR2) and read them."""
    os.kill(pid, signal.SIGUSR2)
    for _ in range(100):
        if path.exists() and path.stat().st_size:
            time.sleep(0.1)  # written in one go, but give the writer time to close the file
            return dict(json.loads(path.read_text()))
        time.sleep(0.1)
    raise RuntimeError("the server did not write its statement counts")


def copy_database(source: Path, target: Path) -> None:
    """A consistent copy of a SQLite database another process has open (SQLite's online backup)."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(source)) as live, contextlib.closing(sqlite3.connect(target)) as copy:
        live.backup(copy)


def replay(database: Path, log: Path, cpu: int | None) -> dict[str, Any]:
    """The server's statements run again on the bare sqlite3 cursor (bench/_statements/replay.py), in a process
    of their own on the server's CPU: what they cost SQLite and the disk with no Python around them."""
    command = [sys.executable, str(BENCH / "_statements" / "replay.py"), str(database), str(log)]
    done = subprocess.run(command, capture_output=True, text=True, check=True, preexec_fn=on_cpu(cpu))
    return dict(json.loads(done.stdout))


def print_statements(counts: dict[str, Any], emails: int) -> None:
    """Statements per e-mail, the most frequent first, and transactions per e-mail; on SQLite, what they cost
    replayed on the bare cursor."""
    statements: dict[str, int] = counts["statements"]
    total = sum(statements.values())
    per = max(1, emails)
    print(
        f" statements: {total} SQL statements in {counts['transactions']} transactions, {total / per:.2f} statements "
        f"and {counts['transactions'] / per:.2f} transactions per e-mail; by statement, per e-mail:"
    )
    for text, count in sorted(statements.items(), key=lambda item: -item[1]):
        print(f"   {count / per:6.2f}  {text[:150]}")
    if "replay" in counts:
        again = counts["replay"]
        print(
            f"    replayed on the bare sqlite3 cursor (same statements, values and transactions, a copy of the "
            f"database as they began; bench/_statements/replay.py): {again['cpu'] / per * 1000:.3f} ms of CPU and "
            f"{again['wall'] / per * 1000:.3f} ms of wall time per e-mail; {again['sent']} deliveries recorded as "
            "sent in the copy"
            + (f"; NOTE: {again['failed']} statements failed in the replay" if again["failed"] else "")
        )


def count_sent(url: str, table: str = "deliveries") -> int:
    import sqlalchemy as sa

    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.connect() as conn:
        sent = conn.execute(sa.text(f"SELECT count(*) FROM {table} WHERE status = 'sent'")).scalar_one()
    engine.dispose()
    return int(sent)


class Postgres:
    """A fresh database on the given server for one run, and the CPU its server processes use."""

    def __init__(self, server: str, run: str, delay_ms: float = 0.0):
        import sqlalchemy as sa

        self.name = f"declic_bench_{run}"
        base = sa.make_url(server).set(drivername="postgresql+psycopg")
        self.admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
        with self.admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{self.name}"'))
        url = sa.make_url(server).set(database=self.name)
        self.proxy = None
        if delay_ms:  # Declic reaches the database through it; this process's own queries do not
            self.proxy, port = delaying_proxy(url.host or "127.0.0.1", url.port or 5432, delay_ms)
            url = url.set(host="127.0.0.1", port=port)
        self.url = url.render_as_string(hide_password=False)

    def cpu(self) -> dict[int, float]:
        """CPU seconds so far of each backend connected to the database, and of the WAL writer (Linux /proc:
        the server must run on this machine)."""
        import sqlalchemy as sa

        query = "SELECT pid FROM pg_stat_activity WHERE datname = :name OR backend_type = 'walwriter'"
        with self.admin.connect() as conn:
            pids = conn.execute(sa.text(query), {"name": self.name}).scalars().all()
        return {pid: cpu_seconds(pid) for pid in pids if Path(f"/proc/{pid}").exists()}

    def drop(self) -> None:
        import sqlalchemy as sa

        if self.proxy is not None:
            self.proxy.terminate()
        with self.admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
        self.admin.dispose()


if __name__ == "__main__":
    main()
