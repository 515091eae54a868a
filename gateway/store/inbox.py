"""The inbox: calls written durably, many requests to one transaction, before anyone is answered."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection

from ..errors import StorageUnavailable
from . import INBOX, Database, jobqueue, sql
from .db import Failed, one_by_one
from .jobqueue import ClaimedJob

log = structlog.get_logger("declic.ingest")


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


@dataclass(frozen=True)
class Taking:
    """A worker's offer to take up to `room` of the calls a transaction stores, claimed by it until `until`."""

    worker: str
    until: datetime
    room: int


class Taker(Protocol):
    """The process's worker, when it can take calls as they are stored (SQLite: see `commit_and_take`)."""

    def offer(self, calls: int) -> Taking | None: ...

    def taken(self, taking: Taking, calls: list[tuple[ClaimedJob, NewCall]]) -> None:
        """What the offer took once committed (none when the transaction failed): start them."""


#: How long SQLite's acknowledgements linger while calls keep queuing (GroupCommitter): measured at 500 webhooks/s.
SQLITE_LINGER = 0.015


class GroupCommitter:
    """Many requests, one transaction: a 2xx always means durable, without one fsync per call.

    `linger`: while calls keep queuing behind each commit, the next one waits until `linger` seconds after the last
    one started, or until `enough` calls wait, so that more calls share it. A call that finds nothing ahead of it
    is committed at once. On SQLite, where an acknowledgement goes before any other work of the one database
    thread, commits of three calls every few milliseconds at 500 webhooks/s took a third of that thread's time
    and kept the calls stored from being applied; 15 ms apart, they share seven or eight and e-mails come several times
    sooner (docs/performance.md, session 19).
    """

    def __init__(
        self,
        db: Database,
        on_commit: Callable[[], None],
        max_batch: int = 512,
        taker: Taker | None = None,
        linger: float = 0.0,
        enough: int = 16,
    ) -> None:
        self._db = db
        self._on_commit = on_commit
        self._max_batch = max_batch
        self._taker = taker
        self.linger, self._enough = linger, enough
        self._queue: asyncio.Queue[tuple[NewCall, asyncio.Future[Accepted]]] = asyncio.Queue()
        self._filled = asyncio.Event()
        #: Calls submitted and not yet answered: requests waiting for their acknowledgement.
        self.waiting = 0

    async def submit(self, call: NewCall) -> Accepted:
        """The call once durable (or a duplicate); StorageUnavailable when it is not stored."""
        future: asyncio.Future[Accepted] = asyncio.get_running_loop().create_future()
        self.waiting += 1
        try:
            await self._queue.put((call, future))
            if self._queue.qsize() >= self._enough:
                self._filled.set()  # ends a linger: enough calls to share a commit
            return await future
        finally:
            self.waiting -= 1

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        started = 0.0
        while True:
            crowded = not self._queue.empty()  # calls queued behind the last commit
            batch = [await self._queue.get()]
            if crowded:
                await self._gather(started + self.linger - loop.time())
            started = loop.time()
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            calls = [call for call, _ in batch]
            outcomes, taken = await self._commit(calls)
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if future.done():  # its caller was cancelled
                    continue
                if isinstance(outcome, Failed):  # every waiter must hear back, whatever went wrong
                    future.set_exception(outcome.error)
                else:
                    future.set_result(outcome)
            if sum(isinstance(o, Accepted) and not o.duplicate for o in outcomes) > taken:  # calls left for its claim
                self._on_commit()

    async def _commit(self, calls: list[NewCall]) -> tuple[list[Accepted | Failed], int]:
        """The calls' outcomes, and how many of them the worker took. One transaction for all; when it fails for
        another reason than the database (a key a call cannot store), one each, so that only that call fails."""
        taking = self._offer(len(calls))
        taken: list[tuple[ClaimedJob, NewCall]] = []
        try:
            results, taken = await self._db.run(commit_and_take, calls, taking, urgent=True)
            return list(results), len(taken)
        except StorageUnavailable as exc:
            log.error("inbox commit failed", error=str(exc), calls=len(calls))
            return [Failed(exc)] * len(calls), 0
        except Exception as exc:
            failed = exc
        finally:  # the offer's slots come back, with what it took when committed
            if self._taker and taking:
                try:
                    self._taker.taken(taking, taken)
                except Exception:  # the calls are stored: their lease gives them back to the queue
                    log.exception("the worker could not start the calls it took", calls=len(taken))
        if len(calls) == 1:
            return [_unstored(calls[0], Failed(failed))], 0
        log.warning("inbox commit failed: one call at a time", error=type(failed).__name__, calls=len(calls))
        outcomes = await one_by_one(self._db, commit_calls, calls, conflicts_alone=False, urgent=True)
        return [_unstored(call, outcome) for call, outcome in zip(calls, outcomes, strict=True)], 0

    def _offer(self, calls: int) -> Taking | None:
        """The worker's offer to take the calls; none when it cannot say. Every webhook's answer goes through this
        loop: nothing the worker does may stop it."""
        try:
            return self._taker.offer(calls) if self._taker else None
        except Exception:
            log.exception("the worker could not offer to take calls", calls=calls)
            return None

    async def _gather(self, seconds: float) -> None:
        """Wait `seconds` at most, less once `enough` calls wait."""
        self._filled.clear()
        if seconds <= 0 or self._queue.qsize() >= self._enough:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._filled.wait(), seconds)


def _unstored(call: NewCall, outcome: Accepted | Failed) -> Accepted | Failed:
    """A call's own failure as what `submit` raises for any call not stored: StorageUnavailable, named by its
    type alone (the message may quote the call: its key, its body)."""
    if not isinstance(outcome, Failed) or isinstance(outcome.error, StorageUnavailable):
        return outcome
    error = type(outcome.error).__name__
    log.error("inbox call not stored", source=call.source, error=error)
    return Failed(StorageUnavailable(f"this call could not be stored ({error})"))


def commit_calls(conn: Connection, calls: list[NewCall]) -> list[Accepted]:
    """Insert new calls and their processing jobs; report duplicates without failing."""
    return commit_and_take(conn, calls, None)[0]


def commit_and_take(
    conn: Connection, calls: list[NewCall], taking: Taking | None
) -> tuple[list[Accepted], list[tuple[ClaimedJob, NewCall]]]:
    """`commit_calls`, and with `taking` (SQLite, whose one writer makes this exact), the worker takes the first
    calls at once when no call stored before waits to be claimed: at light load its claim was a transaction of
    its own per webhook, with five statements and a disk flush (docs/performance.md, session 16). Calls it does
    not take are left for its claim, in order: once one waits, the calls after it wait behind it."""
    first: dict[tuple[str, str], int] = {}
    for i, call in enumerate(calls):
        first.setdefault((call.source, call.dedupe_key), i)
    fresh = [calls[i] for i in sorted(first.values())]
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
    statement = _insert_calls(conn.dialect.name)
    inserted = {(r.source, r.dedupe_key): r.id for r in conn.execute(statement, rows)} if rows else {}
    taken: list[ClaimedJob] = []
    if inserted:
        ids, now = sorted(inserted.values()), max(c.received_at for c in fresh)
        if taking and not jobqueue.call_waiting(conn, now):
            taken = jobqueue.add_taken_inbox_jobs(conn, ids[: taking.room], taking.worker, taking.until, now)
            ids = ids[taking.room :]
        if ids:
            jobqueue.add_inbox_jobs(conn, ids, now)
    results = []
    for i, call in enumerate(calls):
        key = (call.source, call.dedupe_key)
        is_first = first[key] == i
        results.append(Accepted(inserted.get(key) if is_first else None, not (is_first and key in inserted)))
    by_id = {inserted[(c.source, c.dedupe_key)]: c for c in fresh if (c.source, c.dedupe_key) in inserted}
    return results, [(job, by_id[job.inbox_id or 0]) for job in taken]


@functools.cache
def _insert_calls(dialect: str) -> sa.Insert:
    """Built once, as SQLAlchemy's compiled cache wants: one insert per group commit, many rows."""
    insert = sql.insert(dialect, INBOX)
    return insert.on_conflict_do_nothing(index_elements=["source", "dedupe_key"]).returning(
        INBOX.c.id, INBOX.c.source, INBOX.c.dedupe_key
    )


def fit_key(key: str, limit: int = 300) -> str:
    """Provider ids go into an indexed column: a longer key is replaced by its digest."""
    return key if len(key) <= limit else "sha256:" + hashlib.sha256(key.encode()).hexdigest()
