"""POST /hooks: every status code of the HTTP contract, and nothing stored when refused."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from aiohttp import web
from structlog.testing import capture_logs

from conftest import BASE_CONFIG, DEFAULT_RULES, SECRET, TEMPLATES, Deployment, Factory, fixture_bytes, locked_inbox
from declic_gateway import hookimpl
from declic_gateway.errors import StorageUnavailable
from declic_gateway.http.app import create_app, load
from declic_gateway.store import Database
from declic_gateway.store.inbox import (
    SQLITE_LINGER,
    Accepted,
    GroupCommitter,
    NewCall,
    Taking,
    commit_and_take,
    commit_calls,
)
from declic_gateway.testing import shopify_headers, write_deployment

ORDER = fixture_bytes("shopify/order.json")


def signed(body: bytes = ORDER, secret: str = SECRET, topic: str = "orders/create") -> dict[str, str]:
    return shopify_headers(body, secret, topic, "wh-42")


CASES = [
    # (case, path, headers, body, status, error substring)
    ("accepted", "/hooks/shop", signed(), ORDER, 200, None),
    ("unknown source", "/hooks/nope", signed(), ORDER, 404, "no source named 'nope'"),
    ("bad signature", "/hooks/shop", signed(secret="wrong"), ORDER, 401, "does not match the body"),
    ("no signature", "/hooks/shop", {"X-Shopify-Topic": "orders/create"}, ORDER, 401, "missing X-Shopify-Hmac"),
    ("tampered", "/hooks/shop", signed(), ORDER.replace(b"59.90", b"0.01"), 401, "does not match"),
    (
        "no topic",
        "/hooks/shop",
        {k: v for k, v in signed().items() if k != "X-Shopify-Topic"},
        ORDER,
        400,
        "missing X-Shopify-Topic",
    ),
    ("too large", "/hooks/shop", signed(b"x" * (1024 * 1024 + 1)), b"x" * (1024 * 1024 + 1), 413, None),
]


@pytest.mark.parametrize(("case", "path", "headers", "body", "status", "error"), CASES, ids=[c[0] for c in CASES])
async def test_status_codes(
    deploy: Factory, case: str, path: str, headers: dict[str, str], body: bytes, status: int, error: str | None
) -> None:
    d = await deploy()
    response = await d.client.post(path, data=io.BytesIO(body), headers=headers)
    assert response.status == status
    payload = await response.json()
    if error:
        assert error in payload["error"]
    assert d.scalar("SELECT count(*) FROM inbox") == (1 if status == 200 else 0)


async def raw(d: Deployment, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """A request written byte by byte, for what aiohttp's client will not send (a header byte that is not
    UTF-8); the answer's status and body."""
    reader, writer = await asyncio.open_connection(d.client.server.host, d.client.server.port)
    try:
        writer.write(head + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    status, _, rest = answer.partition(b"\r\n")
    return int(status.split()[1]), rest.partition(b"\r\n\r\n")[2]


@pytest.mark.parametrize("webhook_id", [b"abc\xff", b"\xff" * 400, b"abc\tdef"], ids=["latin-1", "long", "tab"])
async def test_a_delivery_id_that_is_not_text_is_a_400_and_nothing_is_stored(
    deploy: Factory, webhook_id: bytes
) -> None:
    """Shopify does not sign X-Shopify-Webhook-Id, yet it is the call's dedupe key: a byte that is not UTF-8 (kept
    by aiohttp as a lone surrogate, which no database stores) or a control character is refused, for every source."""
    d = await deploy()
    head = "POST /hooks/shop HTTP/1.1\r\nHost: x\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in signed().items() if k != "X-Shopify-Webhook-Id")
    status, body = await raw(d, head.encode() + b"X-Shopify-Webhook-Id: " + webhook_id + b"\r\n", ORDER)
    assert status == 400 and "not UTF-8" in json.loads(body)["error"]
    assert d.scalar("SELECT count(*) FROM inbox") == 0


async def test_a_call_the_database_cannot_store_fails_alone_not_with_its_batch(deploy: Factory) -> None:
    """A call whose own data cannot be stored fails the batch's transaction; that is not the database failing:
    the batch's calls are committed one by one, and only that call is refused."""
    d = await deploy()
    now = d.clock.now()
    hostile = NewCall("shop", "demo.myshopify.com:abc\udcff", now, {}, b"{}")  # a lone surrogate: no driver encodes it
    honest = NewCall("shop", "demo.myshopify.com:honest", now, {}, b"{}")
    with capture_logs() as logged:
        refused, accepted = await asyncio.gather(
            d.gateway.committer.submit(hostile), d.gateway.committer.submit(honest), return_exceptions=True
        )
    assert {"event": "inbox commit failed: one call at a time", "calls": 2}.items() <= logged[0].items()
    assert isinstance(refused, StorageUnavailable) and "UnicodeEncodeError" in str(refused)
    assert isinstance(accepted, Accepted) and not accepted.duplicate
    assert [row.dedupe_key for row in d.rows("SELECT dedupe_key FROM inbox")] == ["demo.myshopify.com:honest"]


async def test_get_on_a_hook_is_405_with_json(deploy: Factory) -> None:
    d = await deploy()
    response = await d.client.get("/hooks/shop")
    assert response.status == 405
    assert "error" in await response.json()


async def test_body_that_is_not_what_the_topic_promises_is_stored_failed_and_replayable(deploy: Factory) -> None:
    d = await deploy()
    body = b'{"this": "is not an order"}'
    response = await d.client.post("/hooks/shop", data=body, headers=signed(body))
    assert response.status == 200
    await d.advance(seconds=1)
    [(status, error)] = d.rows("SELECT status, error FROM inbox")
    assert status == "failed" and "KeyError" in error and "'id'" in error


async def test_database_locked_past_the_timeout_answers_503_with_retry_after(deploy: Factory, db_url: str) -> None:
    d = await deploy()
    with locked_inbox(db_url):
        response = await d.client.post("/hooks/shop", data=ORDER, headers=signed())
        assert response.status == 503
        assert response.headers["Retry-After"] == "5"
        assert "storage unavailable" in (await response.json())["error"]
    again = await d.client.post("/hooks/shop", data=ORDER, headers=signed())
    assert again.status == 200 and (await again.json())["status"] == "accepted"


class SignupForm:
    """A community plugin's route that stores what a form posts, as the inbox stores webhooks."""

    @hookimpl
    def register_routes(self, gateway: Any) -> list[tuple[str, str, Any]]:
        async def signup(request: web.Request) -> web.Response:
            call = NewCall("~form", uuid.uuid4().hex, gateway.clock.now(), {}, await request.read())
            [accepted] = await gateway.db.run(commit_calls, [call])
            return web.json_response({"id": accepted.inbox_id})

        return [("POST", "/signup", signup)]


async def test_a_plugin_route_answers_503_with_retry_after_while_storage_is_unavailable(
    db_url: str, aiohttp_client: Any, tmp_path: Path
) -> None:
    text = BASE_CONFIG.format(db_url=db_url, secret=SECRET, smtp_port=9, rules=DEFAULT_RULES, max_attempts=5, worker="")
    settings, pm, _ = load(str(write_deployment(tmp_path, text, TEMPLATES)))
    pm.register(SignupForm())
    client = await aiohttp_client(create_app(settings, pm=pm, role="web"))
    with locked_inbox(db_url):
        response = await client.post("/signup", data=b"email=a@example.org")
        assert (response.status, response.headers.get("Retry-After")) == (503, "5")
        assert "storage unavailable" in (await response.json())["error"]
    assert (await client.post("/signup", data=b"email=a@example.org")).status == 200


async def test_concurrent_posts_are_all_durable(deploy: Factory) -> None:
    import asyncio
    import json

    d: Deployment = await deploy()
    bodies = [json.dumps({"id": i, "email": f"c{i}@example.com"}).encode() for i in range(50)]
    responses = await asyncio.gather(
        *(
            d.client.post("/hooks/shop", data=b, headers=shopify_headers(b, SECRET, "customers/update", f"w{i}"))
            for i, b in enumerate(bodies)
        )
    )
    assert [r.status for r in responses] == [200] * 50
    assert d.scalar("SELECT count(*) FROM inbox") == 50
    assert d.scalar("SELECT count(*) FROM jobs WHERE kind = 'inbox'") == 50


ADMIN_TOKEN = "adm1n-" + "k3y" * 8
READ_TOKEN = "r3ad-" + "only" * 6
ADMIN = f"admin:\n  token: {ADMIN_TOKEN}\n  tokens: [{{token: {READ_TOKEN}, scope: read, name: grafana}}]\n"
DETAILS = {"status": "ok", "database": "ok", "migrations": "current"}


@pytest.mark.parametrize(
    ("authorization", "body"),
    [
        (None, {"status": "ok"}),
        ("Bearer not-the-admin-token-at-all", {"status": "ok"}),
        (f"Bearer {ADMIN_TOKEN[:-1]}", {"status": "ok"}),
        (f"Basic {ADMIN_TOKEN}", {"status": "ok"}),
        (ADMIN_TOKEN, {"status": "ok"}),
        (f"Bearer {ADMIN_TOKEN}", DETAILS),
        (f"bearer  {ADMIN_TOKEN} ", DETAILS),
        (f"Bearer {READ_TOKEN}", DETAILS),  # details are for looking: a read-only token sees them
        (f"Bearer {READ_TOKEN[:-1]}", {"status": "ok"}),
    ],
)
async def test_readyz_says_ready_to_anyone_and_why_only_to_the_admin(
    deploy: Factory, authorization: str | None, body: dict[str, str]
) -> None:
    d = await deploy(extra=ADMIN)
    assert (await d.client.get("/healthz")).status == 200
    ready = await d.client.get("/readyz", headers={"Authorization": authorization} if authorization else {})
    assert (ready.status, await ready.json()) == (200, body)


async def test_a_token_with_a_byte_that_is_not_utf8_is_no_token(deploy: Factory) -> None:
    """aiohttp keeps the byte as a lone surrogate, which no configured token holds: the answer to no token."""
    d = await deploy(extra=ADMIN)
    answers = {}
    for path in ("/readyz", "/metrics", "/api/v1/rules"):
        head = f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_TOKEN}\xe9\r\n"
        answers[path] = await raw(d, head.encode("latin-1"))
    assert (answers["/readyz"][0], json.loads(answers["/readyz"][1])) == (200, {"status": "ok"})
    assert answers["/metrics"][0] == answers["/api/v1/rules"][0] == 401


async def test_readyz_gives_no_details_when_no_admin_token_is_set(deploy: Factory) -> None:
    d = await deploy(extra="admin: {token: '${DECLIC_TEST_UNSET_ADMIN_TOKEN:-}'}\n")
    for authorization in ("Bearer ", "Bearer", "Bearer x"):
        ready = await d.client.get("/readyz", headers={"Authorization": authorization})
        assert (ready.status, await ready.json()) == (200, {"status": "ok"})


async def test_readyz_with_migrations_pending_is_503_and_says_why_to_the_admin(deploy: Factory) -> None:
    d = await deploy(extra=ADMIN)
    with d.gateway.db.engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '0000_older'"))
    public = await d.client.get("/readyz")
    assert (public.status, await public.json()) == (503, {"status": "unavailable"})
    admin = await d.client.get("/readyz", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert (admin.status, await admin.json()) == (
        503,
        {"status": "unavailable", "database": "ok", "migrations": "pending"},
    )


@pytest.mark.parametrize("db_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True)
async def test_readyz_keeps_the_database_host_and_port_for_the_admin(deploy: Factory, db_url: str) -> None:
    d = await deploy(extra=ADMIN)
    url = sa.make_url(db_url)
    server = sa.create_engine(
        url.set(drivername="postgresql+psycopg", database="postgres"), isolation_level="AUTOCOMMIT"
    )
    try:
        with server.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE "{url.database}" WITH (FORCE)'))
    finally:
        server.dispose()
    public = await d.client.get("/readyz")
    text = await public.text()
    assert (public.status, await public.json()) == (503, {"status": "unavailable"})
    assert public.headers["Retry-After"] == "5"
    assert str(url.host) not in text and str(url.port or 5432) not in text and str(url.database) not in text
    admin = await d.client.get("/readyz", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    details = await admin.json()
    assert admin.status == 503 and details["migrations"] == "unknown"
    assert str(url.database) in details["database"]


async def test_calls_are_taken_as_they_are_stored_only_while_no_call_stored_before_waits(db: Any) -> None:
    """The worker may take calls in the transaction that stores them (SQLite, at light load), as its claim would:
    running under its lease, a first attempt. Never ahead of a call still waiting to be claimed: the calls it has
    no room for wait, and so does every call stored after them, until the worker's claim takes them in order."""
    now = datetime.now(UTC)
    taking = Taking("worker-1", now + timedelta(minutes=1), room=2)

    def calls(*keys: str) -> list[NewCall]:
        return [NewCall("shop", key, now, {"X-Shopify-Topic": "orders/create"}, ORDER) for key in keys]

    def jobs() -> list[tuple[Any, ...]]:
        with db.engine.connect() as conn:
            query = "SELECT inbox_id, status, locked_by, attempts FROM jobs WHERE kind = 'inbox' ORDER BY inbox_id"
            return [tuple(row) for row in conn.exec_driver_sql(query)]

    accepted, taken = await db.run(commit_and_take, calls("a", "b", "c", "a"), taking)
    assert [a.duplicate for a in accepted] == [False, False, False, True]
    first, second, third = (a.inbox_id for a in accepted[:3])
    assert [(job.inbox_id, job.attempts, call.dedupe_key) for job, call in taken] == [(first, 1, "a"), (second, 1, "b")]
    assert jobs() == [
        (first, "running", "worker-1", 1),
        (second, "running", "worker-1", 1),
        (third, "pending", None, 0),
    ]

    accepted, taken = await db.run(commit_and_take, calls("d"), taking)  # "c" still waits: "d" waits behind it
    assert taken == [] and jobs()[-1] == (accepted[0].inbox_id, "pending", None, 0)


@pytest.mark.parametrize(("linger", "transactions"), [(0.0, 4), (1.0, 3)])
async def test_while_calls_queue_behind_a_commit_the_next_one_lingers_for_more(
    tmp_path: Path, linger: float, transactions: int
) -> None:
    """SQLite's acknowledgements go before any other work of its one database thread: small commits in a row
    kept the calls they stored from being applied. While calls queue behind a commit, the next waits up to
    `linger` after it for more to share it (without, the call that comes meanwhile takes a commit of its own)."""
    async with _committing(tmp_path, linger=linger) as (committer, db, ran):
        release = await _hold(db)  # the database thread is busy: "a" waits for it
        first = asyncio.create_task(committer.submit(_call("a")))
        await _turns()  # the committer took "a" alone
        queued = [asyncio.create_task(committer.submit(_call(key))) for key in ("b", "c")]
        await _turns()
        await release()
        await first  # committed: "b" and "c" waited behind it
        late = asyncio.create_task(committer.submit(_call("d")))
        answers = await asyncio.wait_for(asyncio.gather(*queued, late), 30)
    assert [a.duplicate for a in answers] == [False, False, False]
    assert len(ran) == transactions  # the hold, "a", then "b" "c" "d" together (or "b" "c", then "d")


async def test_a_call_with_nothing_ahead_of_it_is_committed_at_once_however_long_the_linger(tmp_path: Path) -> None:
    """Lingering is for calls that queue: one that finds the queue empty is not kept waiting (an hour here), nor
    is a batch once `enough` calls wait."""
    async with _committing(tmp_path, linger=3600, enough=2) as (committer, db, _):
        for key in ("a", "b"):  # one after the other: each alone
            assert not (await asyncio.wait_for(committer.submit(_call(key)), 30)).duplicate
        release = await _hold(db)
        first = asyncio.create_task(committer.submit(_call("c")))
        await _turns()
        queued = [asyncio.create_task(committer.submit(_call(key))) for key in ("d", "e", "f")]
        await _turns()
        await release()
        await first
        # "d" in hand, "e" and "f" waiting: enough (2) to go without lingering
        answers = await asyncio.wait_for(asyncio.gather(*queued), 30)
    assert [a.duplicate for a in answers] == [False, False, False]


async def test_only_sqlite_acknowledgements_linger(deploy: Factory, db_url: str) -> None:
    """PostgreSQL's acknowledgements have database threads of their own: they keep no other work waiting."""
    d = await deploy()
    assert d.gateway.committer.linger == (SQLITE_LINGER if db_url.startswith("sqlite") else 0.0)


@contextlib.asynccontextmanager
async def _committing(tmp_path: Path, **options: Any) -> AsyncIterator[tuple[GroupCommitter, Database, list[float]]]:
    """A running GroupCommitter on a fresh SQLite database, and the database transactions run so far."""
    db = Database(f"sqlite:///{tmp_path}/declic.db")
    db.upgrade()
    ran: list[float] = []
    db.on_work = lambda busy, cpu: ran.append(busy)
    committer = GroupCommitter(db, on_commit=lambda: None, **options)
    running = asyncio.create_task(committer.run())
    try:
        yield committer, db, ran
    finally:
        running.cancel()
        db.close()


def _call(key: str) -> NewCall:
    return NewCall("shop", key, datetime.now(UTC), {"X-Shopify-Topic": "orders/create"}, ORDER)


async def _hold(db: Database) -> Callable[[], Awaitable[None]]:
    """Keep the database thread busy until the returned function is awaited."""
    started, release = threading.Event(), threading.Event()
    holding = asyncio.create_task(db.run(lambda conn: (started.set(), release.wait(30))))
    await asyncio.to_thread(started.wait, 30)

    async def done() -> None:
        release.set()
        await holding

    return done


async def _turns(count: int = 100) -> None:
    """Let the event loop run other tasks' next steps (no time passes on purpose)."""
    for _ in range(count):
        await asyncio.sleep(0)


class FailingTaker:
    """A worker whose offer, or start of what it took, fails (a bug of its own): webhooks must still be answered."""

    def __init__(self, fails_in: str) -> None:
        self.fails_in = fails_in

    def offer(self, calls: int) -> Taking | None:
        if self.fails_in == "offer":
            raise RuntimeError("a bug in offer")
        return Taking("worker-1", datetime.now(UTC) + timedelta(minutes=1), room=calls)

    def taken(self, taking: Taking, calls: list[Any]) -> None:
        raise RuntimeError("a bug in taken")


@pytest.mark.parametrize("fails_in", ["offer", "taken"])
async def test_a_worker_failing_to_take_calls_never_stops_the_webhooks_answers(tmp_path: Path, fails_in: str) -> None:
    """Every acknowledgement goes through the committer's one loop: a failure in the worker's side of it (its offer
    to take the calls, or starting the calls it took) is logged, and this webhook and every later one answered."""
    async with _committing(tmp_path, taker=FailingTaker(fails_in)) as (committer, db, _):
        for key in ("a", "b"):
            assert not (await asyncio.wait_for(committer.submit(_call(key)), 10)).duplicate
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM inbox").scalar() == 2
        assert conn.exec_driver_sql("SELECT count(*) FROM jobs WHERE kind = 'inbox'").scalar() == 2
