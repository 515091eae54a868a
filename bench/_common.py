"""Shared pieces of the benchmarks: payloads, child processes, percentiles.

Not a test module: nothing here asserts on timings.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import hashlib
import hmac
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
ORDER_FIXTURE = ROOT / "tests" / "fixtures" / "shopify" / "order.json"
SECRET = "bench-shopify-secret"
SHOP = "bench.myshopify.com"
DECLIC = Path(sys.executable).with_name("declic")

_ADDRESS = {
    "first_name": "Camille",
    "last_name": "Durand",
    "company": None,
    "address1": "12 rue des Tanneurs",
    "address2": "Bâtiment B, 3e étage",
    "city": "Lyon",
    "province": None,
    "country": "France",
    "zip": "69001",
    "phone": "+33612345678",
    "country_code": "FR",
    "province_code": None,
    "latitude": 45.7676,
    "longitude": 4.8344,
}


def order_body(i: int, email: str | None = None, name: str | None = None) -> bytes:
    """A realistic orders/create body of about 3 KB: the test fixture plus the usual Shopify fields."""
    order: dict[str, Any] = json.loads(ORDER_FIXTURE.read_bytes())
    order["id"] = 7_000_000_000 + i
    order["order_number"] = 100_000 + i
    order["name"] = name or f"#{100_000 + i}"
    order["checkout_token"] = hashlib.md5(f"checkout-{i}".encode()).hexdigest()
    # One customer per `i`: the fixture's e-mail and phone on every body would fold every order into one
    # contact holding thousands of Shopify ids.
    email = email or f"customer{i}@example.org"
    order["email"] = email
    order["customer"]["email"] = email
    order["customer"]["phone"] = f"+336{10_000_000 + i:08d}"
    order["customer"]["id"] = 5_000_000 + i
    order["order_status_url"] = f"https://boutique.example/orders/{order['id']}/authenticate?key=k{i}"
    extra_items = [
        {
            "title": "Bol à thé",
            "quantity": 4,
            "price": "9.50",
            "sku": "BOL-THE",
            "product_id": 333,
            "variant_id": 3333,
            "vendor": "Atelier Terre",
            "requires_shipping": True,
            "taxable": True,
            "grams": 350,
            "fulfillment_service": "manual",
            "properties": [],
            "tax_lines": [{"title": "TVA", "price": "7.60", "rate": 0.2}],
        },
        {
            "title": "Plateau en chêne",
            "quantity": 1,
            "price": "32.00",
            "sku": "PLATEAU-CHENE",
            "product_id": 444,
            "variant_id": 4444,
            "vendor": "Atelier Bois",
            "requires_shipping": True,
            "taxable": True,
            "grams": 900,
            "fulfillment_service": "manual",
            "properties": [],
            "tax_lines": [{"title": "TVA", "price": "6.40", "rate": 0.2}],
        },
    ]
    order["line_items"] = order["line_items"] + extra_items
    order.update(
        {
            "admin_graphql_api_id": f"gid://shopify/Order/{order['id']}",
            "browser_ip": "203.0.113.17",
            "buyer_accepts_marketing": True,
            "confirmed": True,
            "source_name": "web",
            "tags": "bench, repeat-customer",
            "taxes_included": True,
            "test": False,
            "total_discounts": "0.00",
            "total_tax": "9.98",
            "total_weight": 2850,
            "landing_site": "/collections/ceramique?utm_source=newsletter&utm_medium=email",
            "referring_site": "https://www.example.net/",
            "billing_address": copy.deepcopy(_ADDRESS),
            "shipping_address": copy.deepcopy(_ADDRESS),
            "shipping_lines": [{"title": "Colissimo", "price": "5.90", "code": "colissimo", "source": "shopify"}],
            "payment_gateway_names": ["shopify_payments"],
            "note_attributes": [{"name": "gift", "value": "no"}],
            "client_details": {
                "accept_language": "fr-FR,fr;q=0.9",
                "browser_height": 900,
                "browser_width": 1440,
                "user_agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like "
                "Gecko) Chrome/126.0 Safari/537.36",
            },
        }
    )
    return json.dumps(order, ensure_ascii=False, indent=1).encode()


def sign(body: bytes, secret: str = SECRET) -> str:
    return base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()


def webhook_headers(digest: str, webhook_id: str, topic: str = "orders/create") -> dict[str, str]:
    """The same headers as declic_gateway.testing.shopify_headers, with the HMAC computed once per body."""
    return {
        "Content-Type": "application/json",
        "X-Shopify-Topic": topic,
        "X-Shopify-Hmac-Sha256": digest,
        "X-Shopify-Shop-Domain": SHOP,
        "X-Shopify-API-Version": "2026-07",
        "X-Shopify-Webhook-Id": webhook_id,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[Any], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def stop(proc: subprocess.Popen[Any] | None, timeout: float = 15.0) -> None:
    """Stop one child we started, by its PID: SIGTERM (graceful exit for aiohttp.web.run_app), then SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def add_cpu_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cpu",
        type=int,
        metavar="N",
        help="run the server alone on CPU N, and this process and the SMTP catcher on the others, as issue 15's "
        "harness ran each system under test on one core (Linux; default: nothing pinned). Declic runs Python on "
        "one core at a time anyway (the GIL); kept on one, its threads hand the GIL to each other without waking "
        "another core (docs/performance.md, session 18)",
    )


def keep_off(cpu: int | None) -> str:
    """Move this process, and the children it starts from now on, off `cpu`, which the server gets to itself
    (`on_cpu`); what the run's header says of it."""
    if cpu is None:
        return "nothing pinned"
    cpus = os.sched_getaffinity(0)
    if cpu not in cpus or len(cpus) < 2:
        raise SystemExit(f"--cpu {cpu}: this process may run on CPUs {sorted(cpus)}; N must be one of two or more")
    os.sched_setaffinity(0, cpus - {cpu})
    return f"the server alone on CPU {cpu}, the load and the catcher on CPUs {sorted(cpus - {cpu})}"


def on_cpu(cpu: int | None) -> Any:
    """`preexec_fn` that pins a child (the server) to `cpu`; None when nothing is pinned."""
    return None if cpu is None else lambda: os.sched_setaffinity(0, {cpu})


def where_it_runs(pid: int) -> str:
    """The CPUs a started server may run on, read back from the kernel: what `--cpu` did."""
    return f"the server (pid {pid}) may run on CPUs {sorted(os.sched_getaffinity(pid))}"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    return sum(_user_and_kernel(Path(f"/proc/{pid}/stat")))


def _user_and_kernel(stat: Path) -> tuple[float, float]:
    """User and kernel CPU seconds from a process's or thread's /proc `stat` file."""
    fields = stat.read_text().rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


#: Opens the bench server's /metrics (the config's `metrics.token`), where it counts its database threads' time.
METRICS_TOKEN = "bench-metrics-token-0123456789"
METRICS_CONFIG = f"metrics:\n  token: {METRICS_TOKEN}\n"


@dataclass(frozen=True)
class CpuSample:
    """A server's CPU so far: (user, kernel) seconds by thread id from /proc, and the (CPU, busy) seconds of its
    database transactions from its own /metrics (`declic_database_*_seconds_total`; None where there is none)."""

    threads: dict[int, tuple[float, float]]
    database: tuple[float, float] | None


def cpu_sample(pid: int, port: int | None = None) -> CpuSample:
    threads = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            threads[int(task.name)] = _user_and_kernel(task / "stat")
        except OSError:  # the thread ended while it was read
            continue
    return CpuSample(threads, database_seconds(port) if port else None)


def database_seconds(port: int) -> tuple[float, float] | None:
    """(CPU, busy) seconds the server's database transactions took so far, read from its /metrics."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            text = answer.read().decode()
    except OSError:  # the floor serves no metrics
        return None
    values = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name in ("declic_database_cpu_seconds_total", "declic_database_busy_seconds_total")
    }
    if len(values) < 2:
        return None
    return values["declic_database_cpu_seconds_total"], values["declic_database_busy_seconds_total"]


def where_cpu_went(pid: int, before: CpuSample, after: CpuSample, emails: int) -> str:
    """Per e-mail, between two samples: the event loop's thread (the main one), the other threads, and the database
    transactions among them. Which thread spends the CPU says which stage is the bottleneck: the database thread
    runs every transaction, one at a time on SQLite (docs/performance.md, session 19)."""
    per = 1000 / max(1, emails)

    def spent(tids: set[int]) -> tuple[float, float]:
        user = sum(after.threads[t][0] - before.threads.get(t, (0.0, 0.0))[0] for t in tids)
        kernel = sum(after.threads[t][1] - before.threads.get(t, (0.0, 0.0))[1] for t in tids)
        return user + kernel, kernel

    loop, loop_kernel = spent({pid} & after.threads.keys())
    others, others_kernel = spent(after.threads.keys() - {pid})
    said = (
        f"where: per e-mail, the event loop's thread {loop * per:.2f} ms of CPU ({loop_kernel * per:.2f} in the "
        f"kernel), the other threads {others * per:.2f} ms ({others_kernel * per:.2f} in the kernel)"
    )
    if before.database and after.database:
        cpu, busy = (a - b for a, b in zip(after.database, before.database, strict=True))
        said += f", of which database transactions {cpu * per:.2f} ms of CPU over {busy * per:.2f} ms busy"
    return said


def machine_ticks() -> tuple[int, int, int]:
    """(all, idle, steal) CPU ticks of the whole machine so far (Linux /proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(values[:8]), values[3] + values[4], values[7]


def machine_usage(before: tuple[int, int, int], after: tuple[int, int, int]) -> str:
    """How busy the machine was between two machine_ticks(), and how much the hypervisor took (steal)."""
    total = max(1, after[0] - before[0])
    idle, steal = after[1] - before[1], after[2] - before[2]
    warning = "  <- the hypervisor took CPU: figures are low and noisy" if steal / total > 0.05 else ""
    return f"machine CPU over the window: {1 - idle / total:.0%} busy, of which steal {steal / total:.0%}{warning}"


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def revision(inside: Path = ROOT) -> str:
    """The Declic commit measured (of the checkout that holds `inside`), and whether its work tree differs."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(inside), *args], capture_output=True, text=True, check=True).stdout

    try:
        top = git("rev-parse", "--show-toplevel").strip()
        head = git("rev-parse", "--short", "HEAD").strip()
        dirty = git("status", "--porcelain", "--", f"{top}/gateway", f"{top}/plugins").strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown revision"
    return f"commit {head}" + (" with uncommitted changes under gateway/ or plugins/" if dirty else "")


def machine(declic: Path = DECLIC) -> str:
    """The machine, its load, and the commit of the checkout whose `declic` command is measured."""
    load1, load5, _ = os.getloadavg()
    busy = "  <- other processes are busy: expect lower, noisier figures" if load1 > 0.5 else ""
    return (
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, {os.uname().sysname} {os.uname().release}; "
        f"load average before the run {load1:.2f} (1 min), {load5:.2f} (5 min){busy}\n"
        f"declic: {revision(declic.resolve().parent)}"
    )


async def _forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy one direction, each chunk `delay` seconds after it came, in order."""
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def send() -> None:
        while True:
            due, data = await chunks.get()
            await asyncio.sleep(max(0.0, due - loop.time()))
            if not data:
                writer.close()
                return
            writer.write(data)

    sender = asyncio.create_task(send())
    while data := await reader.read(65536):
        chunks.put_nowait((loop.time() + delay, data))
    chunks.put_nowait((loop.time() + delay, b""))
    await sender


def proxy(listen: socket.socket, host: str, port: int, delay: float) -> None:
    """Serve on `listen`: each connection goes on to host:port, delayed `delay` seconds each way."""

    async def serve() -> None:
        async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            upstream_reader, upstream_writer = await asyncio.open_connection(host, port)
            for sock in (writer.get_extra_info("socket"), upstream_writer.get_extra_info("socket")):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await asyncio.gather(_forward(reader, upstream_writer, delay), _forward(upstream_reader, writer, delay))

        server = await asyncio.start_server(connection, sock=listen)
        await server.serve_forever()

    asyncio.run(serve())


def delaying_proxy(host: str, port: int, delay_ms: float) -> tuple[multiprocessing.Process, int]:
    """A proxy to host:port in a process of its own (terminate it when done), and the port it listens on:
    each packet is held `delay_ms` each way, as on a network between Declic and its database."""
    listen = socket.create_server(("127.0.0.1", 0))
    process = multiprocessing.Process(target=proxy, args=(listen, host, port, delay_ms / 1000), daemon=True)
    process.start()
    return process, listen.getsockname()[1]
