"""The floor: the least a durable webhook -> e-mail gateway on Declic's stack does per e-mail.

Run by `bench/e2e.py --floor` in place of `declic serve`: `python bench/_floor_server.py --port P --db F
--smtp-port S`. It does what issue 15's target 1 asks of every e-mail and nothing more, with the libraries Declic
uses (aiohttp on uvloop, sqlite3 with the same pragmas, Jinja2's sandbox, aiosmtplib):

- the webhook: read the body, check Shopify's HMAC over the raw bytes (constant time), parse the JSON, store
  the call (a row with a unique key, so a retried webhook is not stored twice) and answer 200 only once it is
  committed; commits are grouped, as Declic groups them (one writer thread, the calls that arrive while a
  commit runs share the next);
- the e-mail: render the subject, text and HTML templates, write a multipart/alternative message (quoted-
  printable parts), send it over one of four pooled SMTP connections (Declic's default), then record it as
  sent in a grouped commit.

What it leaves out is what Declic does beyond that: contacts and their identities, consent, the rule, the
journal, the events table, the delivery's idempotency key, the job queue (the call goes from the request to
the sender in memory, so a crash between the commit and the send loses that e-mail: the floor is not durable
past the acknowledgement), logs, metrics. What it spends per e-mail is what no such gateway written in
Python with these libraries can spend less than.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import quopri
import secrets
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import aiosmtplib
from aiohttp import web
from jinja2.sandbox import SandboxedEnvironment

from declic_gateway.cli.listen import event_loop

SUBJECT = "Order {{ order.name }}"
TEXT = (
    "Hello {{ order.customer.first_name }}, thanks for order {{ order.name }} "
    "({{ order.total_price }} {{ order.currency }})."
)
HTML = "<p>Hello {{ order.customer.first_name }}, thanks for order <b>{{ order.name }}</b>.</p>"
SENDER = "bench@example.com"
CONNECTIONS = 4  # the SMTP sink's default `connections`
SENDERS = 100  # worker.concurrency's default: e-mails in flight


class GroupedWriter:
    """One thread writes; the writes that arrive while a commit runs share the next transaction."""

    def __init__(self, path: str) -> None:
        self._thread = ThreadPoolExecutor(1)
        self._conn = self._thread.submit(self._open, path).result()
        self._pending: list[tuple[str, tuple[Any, ...], asyncio.Future[None]]] = []
        self._flushing = False

    @staticmethod
    def _open(path: str) -> sqlite3.Connection:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # as Declic: a 2xx survives a power cut
        conn.execute(
            "CREATE TABLE IF NOT EXISTS inbox (id INTEGER PRIMARY KEY, webhook_id TEXT NOT NULL UNIQUE, "
            "received_at TEXT NOT NULL, body BLOB NOT NULL, status TEXT NOT NULL)"
        )
        return conn

    def _commit(self, batch: list[tuple[str, tuple[Any, ...], asyncio.Future[None]]]) -> None:
        self._conn.execute("BEGIN IMMEDIATE")
        for statement, params, _ in batch:
            self._conn.execute(statement, params)
        self._conn.execute("COMMIT")

    async def write(self, statement: str, params: tuple[Any, ...]) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._pending.append((statement, params, done))
        if not self._flushing:
            self._flushing = True
            try:
                while self._pending:
                    batch, self._pending = self._pending, []
                    await loop.run_in_executor(self._thread, self._commit, batch)
                    for *_, future in batch:
                        future.set_result(None)
            finally:
                self._flushing = False
        await done


def _part(subtype: str, text: str) -> bytes:
    body = quopri.encodestring(text.encode()).replace(b"\n", b"\r\n")
    return (
        f"Content-Type: text/{subtype}; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n".encode()
        + body
    )


def message(subject: str, text: str, html: str, to: str) -> bytes:
    boundary = f"=_{secrets.token_hex(16)}"
    head = (
        f"From: Bench Boutique <{SENDER}>\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Date: {format_datetime(datetime.now(UTC))}\r\nMessage-ID: <{secrets.token_hex(16)}@example.com>\r\n"
        f'MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary="{boundary}"\r\n\r\n'
    )
    return (
        head.encode()
        + f"--{boundary}\r\n".encode()
        + _part("plain", text)
        + f"\r\n--{boundary}\r\n".encode()
        + _part("html", html)
        + f"\r\n--{boundary}--\r\n".encode()
    )


class Floor:
    def __init__(self, db: str, secret: str, smtp_port: int) -> None:
        self.writer = GroupedWriter(db)
        self.secret = secret.encode()
        self.smtp_port = smtp_port
        self.queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        self.sending = 0  # taken from the queue, the send not yet recorded
        self.connections: asyncio.Queue[aiosmtplib.SMTP] = asyncio.Queue()
        env = SandboxedEnvironment(autoescape=False)
        html_env = SandboxedEnvironment(autoescape=True)
        self.render: list[Callable[..., str]] = [
            env.from_string(SUBJECT).render,
            env.from_string(TEXT).render,
            html_env.from_string(HTML).render,
        ]

    async def hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        expected = base64.b64encode(hmac.new(self.secret, body, hashlib.sha256).digest())
        if not hmac.compare_digest(expected, request.headers.get("X-Shopify-Hmac-Sha256", "").encode()):
            raise web.HTTPUnauthorized()
        order = json.loads(body)
        webhook_id = request.headers["X-Shopify-Webhook-Id"]
        await self.writer.write(
            "INSERT INTO inbox (webhook_id, received_at, body, status) VALUES (?, ?, ?, 'received') "
            "ON CONFLICT DO NOTHING",
            (webhook_id, datetime.now(UTC).isoformat(), body),
        )
        self.queue.put_nowait((webhook_id, order))
        return web.json_response({"status": "accepted"})

    async def send(self) -> None:
        while True:
            webhook_id, order = await self.queue.get()
            self.sending += 1
            try:
                subject, text, html = (render(order=order) for render in self.render)
                to = order["email"]
                data = message(subject, text, html, to)
                smtp = await self.connections.get()
                try:
                    await smtp.sendmail(SENDER, [to], data)
                finally:
                    self.connections.put_nowait(smtp)
                await self.writer.write("UPDATE inbox SET status = 'sent' WHERE webhook_id = ?", (webhook_id,))
            finally:
                self.sending -= 1

    async def start(self, app: web.Application) -> None:
        for _ in range(CONNECTIONS):
            smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=self.smtp_port, use_tls=False, start_tls=False)
            await smtp.connect()
            self.connections.put_nowait(smtp)
        app["senders"] = [asyncio.create_task(self.send()) for _ in range(SENDERS)]

    async def finish(self, app: web.Application) -> None:
        """On SIGTERM, the sends under way are recorded before the process ends (as Declic's stop does)."""
        for _ in range(1000):
            if not self.sending and self.queue.empty():
                return
            await asyncio.sleep(0.01)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--db", required=True, help="the SQLite file")
    parser.add_argument("--smtp-port", type=int, required=True)
    parser.add_argument("--secret", required=True)
    args = parser.parse_args()
    floor = Floor(args.db, args.secret, args.smtp_port)
    app = web.Application(client_max_size=1024 * 1024)
    app.router.add_post("/hooks/{source}", floor.hook)
    app.on_startup.append(floor.start)
    app.on_shutdown.append(floor.finish)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None, loop=event_loop())


if __name__ == "__main__":
    main()
