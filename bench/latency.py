"""Latency under light load: an open loop of signed webhooks -> rule -> e-mail received by SMTP.

    .venv/bin/python bench/latency.py [--rates 50,150,300,500] [--seconds 10] [--warmup 1] [--statements] [--cpu N]

`declic serve` (role all) on a fresh SQLite file (or, with `--postgres URL`, a fresh database on that
PostgreSQL server, dropped afterwards, as bench/e2e.py does), a Shopify source, an SMTP sink (`tls: none`) to an
aiosmtpd catcher in a process of its own (bench/_catcher.py), and one rule: `when: order.placed`,
`if: total_price > 20`, transactional, send immediately (the pieces of bench/e2e.py). For each rate, this process posts
orders/create webhooks on a fixed schedule, one every 1/rate s, whether or not the earlier ones were
answered (an open loop: a slow answer does not slow the arrivals, as with a real shop), for
`--warmup` + `--seconds` seconds, and then waits for every e-mail of the phase.

Latencies are measured from each request's scheduled time (so a late sender counts against the
figure, not in its favour): to its acknowledgement, and to its e-mail's arrival at the SMTP server
(matched by the order name in the subject). Requests of the warm-up are sent but not counted. It
prints p50 / p99 / max of each, against issue 15's targets, and Declic's CPU time per e-mail in
the phase. Issue 15 sets targets at 50 and 500/s; the phases at 150 and 300/s have none and are there because
e-mails were once half a second late at those rates while both ends looked fine (docs/performance.md, session
17). `--statements` also counts the SQL statements and transactions per e-mail of each phase, by
statement: what a webhook costs the database when it comes alone. A benchmark, not a test: it reports and
asserts nothing about timings.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _catcher import TimedCatcher
from _common import (
    BENCH,
    DECLIC,
    SECRET,
    add_cpu_option,
    cpu_sample,
    cpu_seconds,
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
from e2e import CONFIG, TEMPLATES, Postgres, print_statements, read_statements

from declic_gateway.testing import write_deployment

#: Issue 15, target 2: (rate, p50 bound, p99 bound) of webhook -> e-mail received, in seconds.
TARGETS = {50: (0.020, 0.100), 500: (None, 0.250)}
CONDITION = '    if: "event.properties.total_price > 20"\n'


async def open_loop(url: str, orders: list[tuple[str, bytes, str]], rate: float) -> dict[str, Any]:
    """Post each order at its scheduled time, without waiting for earlier answers."""
    scheduled: dict[str, float] = {}
    acked: dict[str, float] = {}
    statuses: dict[int, int] = {}
    errors: dict[str, int] = {}
    late: list[float] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def post(name: str, body: bytes, digest: str) -> None:
            try:
                async with session.post(url, data=body, headers=webhook_headers(digest, f"lat-{name}")) as response:
                    await response.read()
                    statuses[response.status] = statuses.get(response.status, 0) + 1
            except (TimeoutError, aiohttp.ClientError) as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                return
            acked[name] = time.perf_counter()

        tasks = []
        start = time.perf_counter() + 0.05
        for i, (name, body, digest) in enumerate(orders):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            scheduled[name] = due
            late.append(time.perf_counter() - due)
            tasks.append(asyncio.create_task(post(name, body, digest)))
        await asyncio.gather(*tasks)
    return {"scheduled": scheduled, "acked": acked, "statuses": statuses, "errors": errors, "late": sorted(late)}


def ms(values: list[float], q: float) -> str:
    return f"{percentile(values, q) * 1000:.1f}"


def verdict(value: float, bound: float | None) -> str:
    if bound is None:
        return ""
    return f" (target <= {bound * 1000:.0f} ms: {'met' if value <= bound else 'NOT met'})"


def phase(
    url: str,
    catcher: TimedCatcher,
    pid: int,
    run: str,
    rate: int,
    seconds: float,
    warmup: float,
    timeout: float,
    server: str = "Declic",
    statements: Path | None = None,
    metrics_port: int | None = None,
) -> None:
    count = round(rate * (warmup + seconds))
    skip = round(rate * warmup)
    orders = []
    for i in range(count):
        name = f"LAT-{run}-{rate}-{i:06d}"
        body = order_body(rate * 100_000 + i, email=f"lat+{run}-{rate}-{i}@example.com", name=name)
        orders.append((name, body, sign(body)))
    catcher.arrivals.clear()
    catcher.everything.clear()
    catcher.expected = count
    if statements:
        statements.unlink(missing_ok=True)
        os.kill(pid, signal.SIGUSR1)
    cpu_before, ticks_before = cpu_seconds(pid), machine_ticks()
    threads_before = cpu_sample(pid, metrics_port)
    result = asyncio.run(open_loop(url, orders, rate))
    catcher.everything.wait(timeout=timeout)
    server_cpu = cpu_seconds(pid) - cpu_before
    threads_after = cpu_sample(pid, metrics_port)
    usage = machine_usage(ticks_before, machine_ticks())
    counts = read_statements(pid, statements) if statements else None

    measured = {name for name, _, _ in orders[skip:]}
    scheduled, acked = result["scheduled"], result["acked"]
    arrivals: dict[str, float] = {}
    duplicates = 0
    for arrived, subject in list(catcher.arrivals):
        name = subject.removeprefix("Order ")
        if name in arrivals:
            duplicates += 1
        arrivals.setdefault(name, arrived)
    e2e = sorted(arrivals[n] - scheduled[n] for n in measured if n in arrivals)
    acks = sorted(acked[n] - scheduled[n] for n in measured if n in acked)
    target_p50, target_p99 = TARGETS.get(rate, (None, None))
    print(
        f"\n{rate} webhooks/s: {count} posted over {count / rate:.1f} s, the first {skip} ({warmup:g} s) as warm-up; "
        f"statuses {result['statuses']}{', client errors ' + str(result['errors']) if result['errors'] else ''}; "
        f"sender lateness p99 {ms(result['late'], 99)} ms"
    )
    print(f"    ack: scheduled -> answer read: p50 {ms(acks, 50)} ms, p99 {ms(acks, 99)} ms, max {ms(acks, 100)} ms")
    if e2e:
        print(
            f"    e2e: scheduled -> e-mail received: p50 {ms(e2e, 50)} ms{verdict(percentile(e2e, 50), target_p50)}, "
            f"p99 {ms(e2e, 99)} ms{verdict(percentile(e2e, 99), target_p99)}, max {ms(e2e, 100)} ms"
        )
    print(
        f"   mail: {len(arrivals)}/{count} received, {duplicates} duplicates; {server} used {server_cpu:.2f} s of CPU, "
        f"{server_cpu / max(1, len(arrivals)) * 1000:.2f} ms per e-mail"
    )
    print(f"         {where_cpu_went(pid, threads_before, threads_after, len(arrivals))}")
    print(f"         {usage}")
    if counts is not None:  # the warm-up's too: per e-mail of the whole phase
        print_statements(counts, len(arrivals))
    if len(arrivals) < count:
        print(f"   NOTE: {count - len(arrivals)} e-mails had not arrived after the {timeout:g} s timeout")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--rates", default="50,150,300,500", help="webhooks per second, one phase each (default 50,150,300,500)"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per phase (default 10)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds sent first and not counted (default 1)")
    parser.add_argument("--timeout", type=float, default=60.0, help="wait this long for a phase's last e-mails")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    parser.add_argument(
        "--floor",
        action="store_true",
        help="run bench/_floor_server.py instead of Declic: what the least a durable gateway on Declic's stack "
        "does per e-mail leaves of these latencies on this machine (see bench/e2e.py --floor)",
    )
    parser.add_argument(
        "--statements",
        action="store_true",
        help="count the SQL statements and transactions Declic runs in each phase, by statement "
        "(bench/_statements/sitecustomize.py)",
    )
    parser.add_argument(
        "--postgres", metavar="URL", help="run on a fresh database of this PostgreSQL server instead of SQLite"
    )
    add_cpu_option(parser)
    args = parser.parse_args()
    if args.floor and (args.statements or args.postgres):
        parser.error("--floor runs on SQLite and counts no statements")
    rates = [int(rate) for rate in args.rates.split(",")]

    print(f"machine: {machine()}")
    print(f"cpus: {keep_off(args.cpu)}")
    if args.floor:
        print("server: the floor (bench/_floor_server.py), not Declic")
    print(
        f"load: open loop at {', '.join(map(str, rates))} orders/create webhooks/s, {args.warmup:g} s warm-up + "
        f"{args.seconds:g} s each; rule order.placed if total_price > 20 -> transactional e-mail via SMTP "
        f"(tls none) to an aiosmtpd catcher in its own process; log level {args.log_level}",
        flush=True,
    )
    catcher = TimedCatcher()
    server = None
    run = uuid.uuid4().hex[:6]
    with tempfile.TemporaryDirectory(prefix="declic-latency-") as tmp:
        folder = Path(tmp)
        port = free_port()
        db = Postgres(args.postgres, run) if args.postgres else None
        try:
            catcher.start()
            config = write_deployment(
                folder,
                CONFIG.format(
                    port=port,
                    db=db.url if db else f"sqlite:///{folder / 'declic.db'}",
                    secret=SECRET,
                    smtp_port=catcher.port,
                    sink_extra="",
                    worker="",
                    log_level=args.log_level,
                    track=CONDITION,  # e2e.CONFIG's slot for the rule's lines before `send:`
                    keep_rendered="",  # copies of sent messages kept, as shipped
                ),
                TEMPLATES,
            )
            if db:
                subprocess.run([str(DECLIC), "db", "upgrade", "--config", str(config)], check=True)
            with open(folder / "declic.log", "wb") as log:
                command = [str(DECLIC), "serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
                if args.floor:
                    command = [sys.executable, str(BENCH / "_floor_server.py"), "--db", str(folder / "floor.db")]
                    command += ["--smtp-port", str(catcher.port), "--secret", SECRET, "--port", str(port)]
                environment = dict(os.environ)
                if args.statements:
                    environment["PYTHONPATH"] = str(BENCH / "_statements")
                    environment["DECLIC_STATEMENTS_OUT"] = str(folder / "statements.json")
                server = subprocess.Popen(command, stdout=log, stderr=log, env=environment, preexec_fn=on_cpu(args.cpu))
                wait_for_port(port, server)
                if args.cpu is not None:
                    print(f"cpus: {where_it_runs(server.pid)}", flush=True)
                time.sleep(1.0)  # start-up work (migrations, the first clock jobs) is not the idle cost
                idle_before = cpu_seconds(server.pid)
                time.sleep(2.0)
                who = "the floor" if args.floor else "Declic"
                print(f"idle: {who} used {(cpu_seconds(server.pid) - idle_before) / 2 * 1000:.0f} ms of CPU per s")
                for rate in rates:
                    phase(
                        f"http://127.0.0.1:{port}/hooks/shop",
                        catcher,
                        server.pid,
                        run,
                        rate,
                        args.seconds,
                        args.warmup,
                        args.timeout,
                        who,
                        folder / "statements.json" if args.statements else None,
                        None if args.floor else port,
                    )
                    time.sleep(1.0)  # let the worker go idle between phases
        finally:
            stop(server)
            catcher.stop()
            if db:
                db.drop()


if __name__ == "__main__":
    main()
