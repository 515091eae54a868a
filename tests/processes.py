"""Real processes for tests: `declic serve` started, waited for, SIGKILLed or stopped by its pid;
signed webhooks over real HTTP; the database read from outside; a PostgreSQL server of the test's
own that it may stop and start.

Shared by the tests that need separate processes (tests/test_processes.py, tests/test_fault_suite.py).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import pwd
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
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

import pytest
import sqlalchemy as sa

from conftest import SECRET
from declic_gateway.store.db import normalize_url
from declic_gateway.testing import SmtpCatcher, free_port, shopify_headers


def declic_command() -> list[str]:
    script = Path(sys.executable).parent / "declic"
    if script.exists():
        return [str(script)]
    found = shutil.which("declic")
    if found:
        return [found]
    return [sys.executable, "-c", "from declic_gateway.cli import main; main()"]


# --- processes ---------------------------------------------------------------------------------


@dataclass
class Server:
    """One `declic serve` subprocess; stderr and stdout go to a file in tmp_path. Port 0 until the process has
    bound one: the port is read from its own `listening` line, so no other test's server can answer for it (a
    port chosen here and passed on could be handed to a second test before the first process binds it)."""

    name: str
    config: Path
    port: int
    role: str
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    #: Extra environment for this process only (e.g. PYTHONPATH to a plugin only it has).
    env: dict[str, str] = field(default_factory=dict)
    #: Where this start's lines begin in the log (a restart appends to it).
    log_from: int = 0

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
        env.update(self.env)
        with open(self.log_path, "ab") as log:
            self.log_from = log.tell()
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
            if not self.port and not self._bound_port():
                time.sleep(0.05)
                continue
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        raise AssertionError(f"{self.name} not ready on port {self.port} after {timeout}s")

    def _bound_port(self) -> int:
        """The port from this start's `listening` line, once it is written (0 before)."""
        with open(self.log_path, "rb") as log:
            log.seek(self.log_from)
            for line in log.read().splitlines():
                if line.startswith(b"{") and b'"listening"' in line:
                    self.port = int(json.loads(line)["port"])
        return self.port

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

    def start(
        self,
        config: Path,
        *,
        name: str = "declic",
        port: int | None = None,
        role: str = "all",
        env: dict[str, str] | None = None,
        ready: bool = True,
    ) -> Server:
        """Start a process and wait until it is ready (or, with ready=False, only start it)."""
        server = Server(name, config, port or 0, role, self.tmp_path / f"{name}.log", env=env or {})
        self.all.append(server)
        server.start()
        if ready:
            server.wait_ready()
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


@dataclass(frozen=True)
class Answer:
    """What an HTTP client got: status 0 when nothing answered (connection refused or cut)."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str]
    seconds: float
    #: time.monotonic() when the answer was read
    at: float

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


def request(url: str, data: bytes | None = None, headers: dict[str, str] | None = None, timeout: float = 15) -> Answer:
    """POST `data` (GET without it); never raises for an HTTP error or a dead server."""
    started = time.monotonic()
    call = urllib.request.Request(url, data=data, headers=headers or {}, method="GET" if data is None else "POST")

    def answer(status: int, text: bytes, headers: Any) -> Answer:
        try:
            body = json.loads(text) if text.startswith(b"{") else {"text": text.decode(errors="replace")}
        except ValueError:
            body = {"text": text.decode(errors="replace")}
        now = time.monotonic()
        return Answer(status, body, dict(headers or {}), now - started, now)

    try:
        with urllib.request.urlopen(call, timeout=timeout) as response:
            return answer(response.status, response.read(), response.headers)
    except urllib.error.HTTPError as exc:
        with exc:
            return answer(exc.code, exc.read(), exc.headers)
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        return answer(0, str(exc).encode(), None)


def post_order(base_url: str, i: int, webhook_id: str | None = None) -> Answer:
    """Shopify's `orders/create` for order i, signed; the same webhook id again is Shopify's redelivery."""
    body = order_body(i)
    headers = shopify_headers(body, SECRET, "orders/create", webhook_id or f"wh-{i}-{uuid.uuid4().hex}")
    return request(base_url + "/hooks/shop", body, headers)


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


class Store:
    """The deployment's database as the test reads it, SQLite or PostgreSQL, one connection per query."""

    def __init__(self, url: str):
        self.engine = sa.create_engine(normalize_url(url), poolclass=sa.pool.NullPool)

    def rows(self, query: str, **params: Any) -> list[tuple[Any, ...]]:
        with self.engine.connect() as conn:
            return [tuple(row) for row in conn.execute(sa.text(query), params)]

    def scalar(self, query: str, **params: Any) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(sa.text(query), params).scalar()

    def close(self) -> None:
        self.engine.dispose()


# --- a PostgreSQL server of the test's own -----------------------------------------------------------


def postgres_program(name: str) -> str | None:
    """initdb, pg_ctl...: on the PATH, else in Debian's /usr/lib/postgresql/VERSION/bin (newest first)."""
    found = shutil.which(name)
    if found:
        return found
    folders = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name), reverse=True)
    return next((str(folder / name) for folder in folders if (folder / name).exists()), None)


@dataclass
class OwnPostgres:
    """A PostgreSQL server started with initdb and pg_ctl in its own folder and on its own port, trust auth:
    a test may stop and start it at will. Never the shared server."""

    folder: Path
    port: int
    os_user: str | None  # initdb and postgres refuse to run as root: as root, they run as this user

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def log(self) -> Path:
        return self.folder / "postgres.log"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, program: str, *args: str, timeout: float = 60) -> None:
        command = [postgres_program(program) or program, *args]
        done = subprocess.run(
            command, user=self.os_user, cwd=self.folder, capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            raise AssertionError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr or done.stdout}")

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-locale")

    def start(self) -> None:
        options = f"-c port={self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.folder}"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "30", "start")

    def stop(self, mode: str = "fast") -> None:
        """`fast`: clients are disconnected and the server shuts down cleanly, as for a restart or a failover."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def create_database(self, name: str) -> str:
        admin = sa.create_engine(normalize_url(self.url()), isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        return self.url(name)


@contextmanager
def own_postgres(tmp_path: Path) -> Iterator[OwnPostgres]:
    """A fresh, started OwnPostgres, stopped (and its folder removed) at the end whatever happened.

    Without initdb the test skips, naming what to install; under CI=true it fails instead.
    """
    if postgres_program("initdb") is None or postgres_program("pg_ctl") is None:
        reason = "initdb/pg_ctl not found on the PATH or in /usr/lib/postgresql/*/bin: install the PostgreSQL server"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run this test: {reason}")
        pytest.skip(reason)
    os_user, folder = None, tmp_path / "postgres"
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail("running as root, and there is no `postgres` user to run initdb as (it refuses root)")
        # pytest's tmp_path is private to root: the server gets a folder of its own that its user can enter.
        os_user, folder = owner.pw_name, Path(tempfile.mkdtemp(prefix="declic-test-pg-"))
        os.chown(folder, owner.pw_uid, owner.pw_gid)
    else:
        folder.mkdir()
    server = OwnPostgres(folder, free_port(), os_user)
    try:
        server.init()
        server.start()
        yield server
    finally:
        if server.running():
            with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                server.stop("immediate")
        if os_user is not None:
            shutil.rmtree(folder, ignore_errors=True)
