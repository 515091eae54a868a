"""Real `declic serve` processes for tests: start one, wait until it is ready, SIGKILL or stop it by
its pid; signed webhooks over real HTTP; waiting for what a process does on its own.

Shared by the tests that need separate processes (tests/test_processes.py, tests/test_fault_suite.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import SECRET
from gateway.testing import SmtpCatcher, free_port, shopify_headers


def declic_command() -> list[str]:
    script = Path(sys.executable).parent / "declic"
    if script.exists():
        return [str(script)]
    found = shutil.which("declic")
    if found:
        return [found]
    return [sys.executable, "-c", "from gateway.cli import main; main()"]


# --- processes ---------------------------------------------------------------------------------


@dataclass
class Server:
    """One `declic serve` subprocess; stderr and stdout go to a file in tmp_path."""

    name: str
    config: Path
    port: int
    role: str
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Server:
        env = dict(os.environ)
        env.pop("DECLIC_DATABASE_URL", None)  # the config's storage.url is the one under test
        env.pop("DECLIC_CONFIG", None)
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.log_path, "ab") as log:
            log.write(f"----- start {self.name} on port {self.port} -----\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [
                    *declic_command(),
                    "serve",
                    "--config",
                    str(self.config),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--role",
                    self.role,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.config.parent,
            )
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode} before it was ready")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        raise AssertionError(f"{self.name} not ready on port {self.port} after {timeout}s")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def sigkill(self) -> None:
        """SIGKILL the process we started (by its pid), and reap it."""
        assert self.proc is not None and self.proc.poll() is None, f"{self.name} is not running"
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (aiohttp shuts down gracefully), then SIGKILL if it hangs; return the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
            raise AssertionError(f"{self.name} did not stop within {timeout}s of SIGTERM") from None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""


@dataclass
class Servers:
    tmp_path: Path
    all: list[Server] = field(default_factory=list)

    def start(self, config: Path, *, name: str = "declic", port: int | None = None, role: str = "all") -> Server:
        server = Server(name, config, port or free_port(), role, self.tmp_path / f"{name}.log")
        self.all.append(server)
        server.start().wait_ready()
        return server

    def dump(self) -> None:
        for server in self.all:
            code = None if server.proc is None else server.proc.poll()
            print(
                f"===== {server.name} (port {server.port}, pid {server.proc and server.proc.pid}, "
                f"exit {code}) log: {server.log_path} ====="
            )
            print(server.log_text()[-20000:])

    @contextmanager
    def logs_on_failure(self) -> Iterator[None]:
        """Print every process's log when the test body fails (pytest shows it with the failure)."""
        try:
            yield
        except BaseException:
            self.dump()
            raise

    def stop_all(self) -> None:
        for server in self.all:
            if server.proc is None or server.proc.poll() is not None:
                continue
            with contextlib.suppress(AssertionError):  # killed by pid in stop(); teardown must go on
                server.stop()

    @classmethod
    @contextmanager
    def running(cls, tmp_path: Path) -> Iterator[Servers]:
        """The servers a test starts, each stopped (by its pid) when the test ends, whatever happened."""
        pool = cls(tmp_path)
        try:
            yield pool
        finally:
            pool.stop_all()


# --- webhooks, waiting, the database ---------------------------------------------------------------


def buyer(i: int) -> str:
    return f"buyer{i:04d}@example.org"


def order_body(i: int) -> bytes:
    return json.dumps(
        {
            "id": 8_100_000 + i,
            "name": f"#{5000 + i}",
            "order_number": 5000 + i,
            "email": buyer(i),
            "currency": "EUR",
            "total_price": "42.00",
            "subtotal_price": "40.00",
            "financial_status": "paid",
            "line_items": [
                {"title": "Tasse", "quantity": 1, "price": "40.00", "sku": "T", "product_id": 1, "variant_id": 1}
            ],
            "customer": {
                "id": 6_100_000 + i,
                "email": buyer(i),
                "first_name": f"Buyer{i}",
                "email_marketing_consent": {"state": "subscribed"},
            },
        }
    ).encode()


def post_order(base_url: str, i: int) -> tuple[int, dict[str, Any]]:
    body = order_body(i)
    headers = shopify_headers(body, SECRET, "orders/create", f"wh-{i}-{uuid.uuid4().hex}")
    request = urllib.request.Request(base_url + "/hooks/shop", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, {"error": exc.read().decode(errors="replace")}


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll until predicate() holds; return the seconds it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - start


def sqlite_rows(path: Path, query: str) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(path, timeout=5)) as conn:
        return conn.execute(query).fetchall()


def recipients(smtp: SmtpCatcher) -> Counter[str]:
    return Counter(str(m["To"]) for m in list(smtp.messages))
