"""POST /hooks/{source}: verify, dedupe, group-commit, and only then acknowledge."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web
from sqlalchemy.engine import Connection

from . import scheduler
from .errors import RejectedRequest, StorageUnavailable
from .sources import Source
from .store import INBOX, Database, sql

if TYPE_CHECKING:
    from .app import Gateway

log = structlog.get_logger("declic.ingest")

#: Headers that authenticate the caller: never stored with the call.
_UNSTORED_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})
RETRY_AFTER_SECONDS = "5"
GATEWAY_KEY: web.AppKey[Gateway] = web.AppKey("gateway")


@dataclass(frozen=True)
class NewCall:
    source: str
    dedupe_key: str
    received_at: datetime
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class Accepted:
    inbox_id: int | None
    duplicate: bool


class GroupCommitter:
    """Many requests, one transaction: a 2xx always means durable, without one fsync per call."""

    def __init__(self, db: Database, on_commit: Callable[[], None], max_batch: int = 512):
        self._db = db
        self._on_commit = on_commit
        self._max_batch = max_batch
        self._queue: asyncio.Queue[tuple[NewCall, asyncio.Future[Accepted]]] = asyncio.Queue()
        #: Calls submitted and not yet answered: requests waiting for their acknowledgement.
        self.waiting = 0

    async def submit(self, call: NewCall) -> Accepted:
        future: asyncio.Future[Accepted] = asyncio.get_running_loop().create_future()
        self.waiting += 1
        try:
            await self._queue.put((call, future))
            return await future
        finally:
            self.waiting -= 1

    async def run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                results = await self._db.run(commit_calls, [call for call, _ in batch], urgent=True)
            except Exception as exc:  # every waiter must hear back, whatever went wrong
                error = exc if isinstance(exc, StorageUnavailable) else StorageUnavailable(repr(exc))
                log.error("inbox commit failed", error=str(error), calls=len(batch))
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
            if any(not r.duplicate for r in results):
                self._on_commit()


def commit_calls(conn: Connection, calls: list[NewCall]) -> list[Accepted]:
    """Insert new calls and their processing jobs; report duplicates without failing."""
    first: dict[tuple[str, str], int] = {}
    for i, call in enumerate(calls):
        first.setdefault((call.source, call.dedupe_key), i)
    fresh = [calls[i] for i in sorted(first.values())]
    insert = sql.insert(conn.dialect.name, INBOX)
    rows = [
        {
            "source": c.source,
            "dedupe_key": c.dedupe_key,
            "received_at": c.received_at,
            "headers": json.dumps(c.headers),
            "body": c.body,
            "status": "received",
        }
        for c in fresh
    ]
    statement = insert.on_conflict_do_nothing(index_elements=["source", "dedupe_key"]).returning(
        INBOX.c.id, INBOX.c.source, INBOX.c.dedupe_key
    )
    inserted = {(r.source, r.dedupe_key): r.id for r in conn.execute(statement, rows)} if rows else {}
    if inserted:
        scheduler.add_inbox_jobs(conn, list(inserted.values()), max(c.received_at for c in fresh))
    results = []
    for i, call in enumerate(calls):
        key = (call.source, call.dedupe_key)
        is_first = first[key] == i
        results.append(Accepted(inserted.get(key) if is_first else None, not (is_first and key in inserted)))
    return results


def _source(request: web.Request) -> Source | web.Response:
    """The source the path names, or a 404 that does not tell a wrong token from a wrong name."""
    name = request.match_info["source"]
    source = request.app[GATEWAY_KEY].sources.get(name)
    if source is None or not source.url_token_matches(request.match_info.get("token")):
        return _problem(404, f"no source named {name!r} in this deployment")
    return source


async def handle_ping(request: web.Request) -> web.StreamResponse:
    """GET/HEAD on a hook: the validation request some providers send before the first call."""
    source = _source(request)
    if isinstance(source, web.Response):
        return source
    answer = await source.ping(request)
    return answer if answer is not None else _problem(405, "this source only takes POST", {"Allow": "POST"})


async def handle_hook(request: web.Request) -> web.StreamResponse:
    gateway: Gateway = request.app[GATEWAY_KEY]
    source = _source(request)
    if isinstance(source, web.Response):
        return source
    name = source.key
    limit = source.max_body_bytes or gateway.settings.limits.max_body_bytes
    if (request.content_length or 0) > limit:
        return _problem(413, f"body over {limit} bytes")
    body = await request.read()  # aiohttp stops at the app's client_max_size (the largest limit) with 413
    if len(body) > limit:
        return _problem(413, f"body over {limit} bytes")
    try:
        await source.verify(request, body)
        key = source.dedupe_key(request, body)
    except RejectedRequest as exc:
        log.info("webhook rejected", source=name, status=exc.status, reason=exc.reason)
        return _problem(exc.status, exc.reason)
    except Exception:  # a plugin bug on odd input is still odd input: 400, and a traceback for the maintainer
        log.exception("verify crashed", source=name)
        return _problem(400, "this call could not be read")
    headers = dict(request.headers)
    if any(name in request.headers for name in _UNSTORED_HEADERS):  # case-insensitive; rare, so checked first
        headers = {k: v for k, v in headers.items() if k.lower() not in _UNSTORED_HEADERS}
    call = NewCall(name, fit_key(key), gateway.clock.now(), headers, body)
    try:
        accepted = await gateway.committer.submit(call)
    except StorageUnavailable as exc:
        log.error("webhook not stored", source=name, error=str(exc))
        return _problem(503, "storage unavailable, retry later", {"Retry-After": RETRY_AFTER_SECONDS})
    status = "duplicate" if accepted.duplicate else "accepted"
    # Debug: one line per webhook costs ~8% of the ack path; rejections and failures stay at info.
    log.debug("webhook " + status, source=name, inbox_id=accepted.inbox_id)
    return source.acknowledge(status, accepted.inbox_id) or web.json_response(
        {"status": status, "id": accepted.inbox_id}
    )


def fit_key(key: str, limit: int = 300) -> str:
    """Provider ids go into an indexed column: a longer key is replaced by its digest."""
    return key if len(key) <= limit else "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def _problem(status: int, reason: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": reason}, status=status, headers=headers)


def json_error_middleware_factory() -> Any:
    """Answer aiohttp's own errors (413, 405...) with the same JSON shape as ours."""

    @web.middleware
    async def middleware(request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return _problem(exc.status, exc.reason, {k: v for k, v in exc.headers.items() if k == "Allow"})

    return middleware
