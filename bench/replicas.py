"""Replicas benchmark: N `declic serve` processes on one PostgreSQL database, webhook to e-mail.

    .venv/bin/python bench/replicas.py [--replicas 1,2,4] [--orders 2000] [--concurrency 64]
        [--roles all|split] [--postgres postgresql://postgres@127.0.0.1:5432/test]

For each N, a fresh database is created on the PostgreSQL server (and dropped afterwards), N
replicas start on it with the bench/e2e.py deployment (one Shopify source, one SMTP sink to an
aiosmtpd catcher in a process of its own (bench/_catcher.py), one transactional rule sending at once), and
the orders are posted round robin over the replicas that serve HTTP (`--roles all`: every replica does all;
`split`: half web, half worker, one `all` when N is 1). It prints e-mails/s from the first post
to the last e-mail, the CPU each replica used per e-mail, the database server's share, and checks
that nothing was lost or doubled, counting e-mails at the SMTP catcher by Message-ID and order.
A benchmark, not a test: it reports, and exits non-zero only when e-mails are lost or doubled.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _catcher import TimedCatcher
from _common import (
    DECLIC,
    SECRET,
    cpu_seconds,
    free_port,
    machine,
    machine_ticks,
    machine_usage,
    order_body,
    sign,
    stop,
    wait_for_port,
    webhook_headers,
)

from declic_gateway.testing import write_deployment

CONFIG = """\
public_url: http://127.0.0.1:8000
timezone: UTC
storage:
  url: {url}
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
    sender: "Bench Boutique <bench@example.com>"
rules:
  - name: order-confirmation
    when: order.placed
    kind: transactional
    send: {{via: email, template: order-confirmation}}
logging:
  level: warning
"""
TEMPLATES = {
    "order-confirmation.subject.j2": "Order {{ event.properties.name }}",
    "order-confirmation.txt.j2": "Hello {{ contact.first_name }}, thanks for order {{ event.properties.name }}.",
}


def roles(n: int, how: str) -> list[str]:
    if how == "all" or n == 1:
        return ["all"] * n
    return ["web"] * (n // 2) + ["worker"] * (n - n // 2)


def postgres_pids(admin: sa.Engine, database: str) -> list[int]:
    """The server processes serving this database (one per connection), for their CPU."""
    with admin.connect() as conn:
        query = sa.text("SELECT pid FROM pg_stat_activity WHERE datname = :db")
        return list(conn.execute(query, {"db": database}).scalars())


async def post_all(urls: list[str], orders: list[tuple[str, bytes, str]], concurrency: int) -> dict[str, Any]:
    """Post every order, sender k to replica k mod len(urls), as a load balancer spreading connections."""
    statuses: Counter[int | str] = Counter()
    queue = iter(orders)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=60)
    ) as session:

        async def sender(url: str) -> None:
            for name, body, digest in queue:
                try:
                    async with session.post(url, data=body, headers=webhook_headers(digest, f"r-{name}")) as reply:
                        await reply.read()
                        statuses[reply.status] += 1
                except (TimeoutError, aiohttp.ClientError) as exc:
                    statuses[type(exc).__name__] += 1

        await asyncio.gather(*(sender(urls[k % len(urls)]) for k in range(concurrency)))
    return {"statuses": dict(statuses)}


def run(n: int, args: argparse.Namespace, admin: sa.Engine) -> bool:
    name = f"declic_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.make_url(args.postgres).set(database=name).render_as_string(hide_password=False)
    run_id = uuid.uuid4().hex[:6]
    orders = []
    for i in range(args.orders):
        order = f"R-{run_id}-{i:06d}"
        body = order_body(i, email=f"bench+{run_id}-{i}@example.com", name=order)
        orders.append((order, body, sign(body)))
    catcher = TimedCatcher()
    catcher.expected = args.orders
    servers: list[tuple[str, subprocess.Popen[bytes], int]] = []
    try:
        catcher.start()
        with tempfile.TemporaryDirectory(prefix="declic-replicas-") as tmp:
            folder = Path(tmp)
            text = CONFIG.format(url=url, secret=SECRET, smtp_port=catcher.port)
            config = write_deployment(folder, text, TEMPLATES)
            # Migrated by the Declic that runs (`--declic`: another checkout's, with its own migrations).
            subprocess.run(
                [str(args.declic), "db", "upgrade", "--config", str(config)], check=True, capture_output=True
            )
            for k, role in enumerate(roles(n, args.roles)):
                port = free_port()
                log = open(folder / f"replica{k}.log", "wb")  # noqa: SIM115 (closed with the process)
                command = [
                    str(args.declic),
                    "serve",
                    "--config",
                    str(config),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                ]
                proc = subprocess.Popen([*command, "--role", role], stdout=log, stderr=log)
                log.close()
                servers.append((role, proc, port))
            for _, proc, port in servers:
                wait_for_port(port, proc)
            time.sleep(1)  # start-up jobs (reconcile) out of the way
            urls = [f"http://127.0.0.1:{port}/hooks/shop" for role, _, port in servers if role != "worker"]
            pg = postgres_pids(admin, name)
            pids = [proc.pid for _, proc, _ in servers]
            cpu_before = [cpu_seconds(pid) for pid in pids]
            pg_before = sum(_cpu(pid) for pid in pg)
            ticks = machine_ticks()
            started = time.perf_counter()
            result = asyncio.run(post_all(urls, orders, args.concurrency))
            catcher.everything.wait(timeout=args.timeout)
            time.sleep(1)  # a duplicate would arrive by now
            last = max((at for at, _ in catcher.arrivals), default=time.perf_counter())
            cpu = [cpu_seconds(pid) - before for pid, before in zip(pids, cpu_before, strict=True)]
            pg_cpu = sum(_cpu(pid) for pid in postgres_pids(admin, name)) - pg_before
            usage = machine_usage(ticks, machine_ticks())
    finally:
        for _, proc, _ in servers:
            stop(proc)
        catcher.stop()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    ids = Counter(catcher.message_ids)
    subjects = Counter(subject for _, subject in catcher.arrivals)
    mails = len(ids)
    lost = args.orders - len({s for s in subjects if s.removeprefix("Order ") in {o for o, _, _ in orders}})
    doubled = sum(count - 1 for count in ids.values()) + sum(count - 1 for count in subjects.values())
    seconds = last - started
    per_replica = ", ".join(
        f"{role} {spent / max(1, mails) * 1000:.1f}" for (role, _, _), spent in zip(servers, cpu, strict=True)
    )
    print(
        f"N={n} ({'/'.join(role for role, _, _ in servers)}): {mails}/{args.orders} e-mails in {seconds:.2f} s -> "
        f"{mails / seconds:.0f} e-mails/s; CPU ms per e-mail by replica: {per_replica} "
        f"(sum {sum(cpu) / max(1, mails) * 1000:.1f}); PostgreSQL {pg_cpu / max(1, mails) * 1000:.1f} ms per e-mail "
        f"(server processes of this database, those alive at the end); lost {lost}, doubled {doubled}; "
        f"posts {result['statuses']}",
        flush=True,
    )
    print(f"      {usage}", flush=True)
    return lost == 0 and doubled == 0


def _cpu(pid: int) -> float:
    try:
        return cpu_seconds(pid)
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", default="1,2,4", help="the Ns to run, comma-separated (default 1,2,4)")
    parser.add_argument("--orders", type=int, default=2000, help="webhooks per run, one e-mail each (default 2000)")
    parser.add_argument("--concurrency", type=int, default=64, help="posts in flight (default 64)")
    parser.add_argument("--roles", choices=["all", "split"], default="all", help="replica roles (default all)")
    parser.add_argument("--timeout", type=float, default=180.0, help="give up waiting for e-mails after (s)")
    parser.add_argument("--declic", type=Path, default=DECLIC, help="the declic command to run (another checkout's)")
    parser.add_argument(
        "--postgres",
        default=os.environ.get("DECLIC_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"),
        help="a PostgreSQL server where this may create and drop databases",
    )
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(f"running: {args.declic}")
    print(
        f"load: {args.orders} orders/create webhooks at concurrency {args.concurrency}, spread over the replicas "
        f"serving HTTP; rule order.placed -> transactional e-mail via SMTP to a catcher in its own process",
        flush=True,
    )
    admin = sa.create_engine(
        sa.make_url(args.postgres).set(drivername="postgresql+psycopg"), isolation_level="AUTOCOMMIT"
    )
    try:
        ok = all([run(int(n), args, admin) for n in args.replicas.split(",")])
    finally:
        admin.dispose()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
