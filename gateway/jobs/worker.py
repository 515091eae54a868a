"""The worker: claims due jobs and runs them, a bounded number at a time."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import math
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime, timedelta
from typing import Any, TypeVar

import structlog
from sqlalchemy.engine import Connection

from ..config import WorkerSpec
from ..errors import MalformedPayload, RetryLater, StorageUnavailable
from ..insight import journal
from ..insight.metrics import Metrics
from ..kit.events import Event
from ..kit.sinks import DeliveryResult, Message, Outcome
from ..kit.sources import RawCall, Source
from ..pipeline import inbound
from ..pipeline.router import Router
from ..send.delivery import Send, StepRunner, call_sink
from ..store import Database, jobqueue, sql
from ..store.db import Failed, Grouped, together_or_alone
from ..store.inbox import NewCall, Taking
from ..store.jobqueue import ClaimedJob
from . import polls, retention
from .backlog import Backlogs

log = structlog.get_logger("declic.worker")
T = TypeVar("T")
#: Calls applied per transaction. SQLite: its one writer (acknowledgements included) waits for at most this many.
#: PostgreSQL: acknowledgements have a database thread of their own, and calls are applied one transaction at a
#: time across the deployment (jobqueue.CALLS_LOCK), so what each transaction costs whatever its size (its BEGIN,
#: the contact lookup, the claim made along, the COMMIT) is on the path of every call: 30 at a time mailed 12 %
#: more than 10, for 18 % less of the database's CPU per e-mail (docs/performance.md, session 15).
CALLS_PER_TRANSACTION = {"sqlite": 10, "postgresql": 30}
#: Share of a core above which the process counts as short of CPU (waits on the disk keep it under 1).
SATURATED = 0.8
#: Webhooks waiting for their acknowledgement that make a flood, to which processing gives way. A steady stream at
#: the edge of what one process mails keeps fewer waiting (about the arrival rate times an acknowledgement's
#: latency, which a faster or slower machine scales both ways): at most 15 at 450/s here (bench/latency.py), where
#: a closed loop of 64 senders keeps 60 and more (bench/ingest.py). Pausing for a stream only delays e-mails the
#: process would keep up with (docs/performance.md, session 17).
ACKS_FLOOD = 16
#: Seconds before what the database did not take (a send's record, a run of calls) is tried again, then doubling.
FIRST_PAUSE = 0.25


class Waiting:
    """The pauses before trying again what the database did not take: FIRST_PAUSE, doubling up to `longest`, for
    `limit` seconds after the first failure (then None: give up), on the monotonic clock: leases run out in real
    time."""

    def __init__(self, longest: float, limit: float = math.inf) -> None:
        self.longest, self.limit = longest, limit
        self.since: float | None = None
        self.next = FIRST_PAUSE

    def pause(self) -> float | None:
        now = time.monotonic()
        self.since = now if self.since is None else self.since
        if now - self.since >= self.limit:
            self.reset()
            return None
        pause, self.next = self.next, min(2 * self.next, self.longest)
        return pause

    def reset(self) -> None:
        self.since, self.next = None, FIRST_PAUSE


def _reason(error: BaseException) -> str:
    """An error as text the database can hold: no NUL or lone surrogate, not too long."""
    return sql.storable(f"{type(error).__name__}: {error}", 2000)


def make_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclasses.dataclass(frozen=True)
class _Call:
    """A claimed call, normalised: its events, or why it cannot be processed."""

    job: ClaimedJob
    raw: RawCall | None
    events: list[Event] = dataclasses.field(default_factory=list)
    failure: str | None = None

    def applies(self) -> RawCall | None:
        """The call to apply; None when it was processed already or cannot be."""
        return self.raw if self.failure is None else None


@dataclasses.dataclass(frozen=True)
class _Sent:
    """A sink's answer to a step, to record."""

    send: Send
    result: DeliveryResult
    message: Message | None
    again: bool = False  # tried again after the database failed to answer


@dataclasses.dataclass(frozen=True)
class _Recheck:
    """A prepared step that waited for its sink: does the decision to send it still hold?"""

    send: Send


@dataclasses.dataclass(frozen=True)
class _TakenBack:
    """A prepared step that left its sink's line: back to the queue until `until`, to be prepared again then."""

    send: Send
    until: datetime
    reason: str


@dataclasses.dataclass(frozen=True)
class _Later:
    """A claimed step whose sinks would not take it soon: back to the queue until `until`, unprepared."""

    job: ClaimedJob
    until: datetime
    reason: str


def _bare(result: DeliveryResult) -> DeliveryResult:
    """The outcome alone, for a record refused with what the provider said (its id, its error, the addresses)."""
    error = None if result.error is None else f"{result.outcome.value} (the provider's answer could not be stored)"
    return DeliveryResult(result.outcome, retry_after=result.retry_after, error=error)


#: What a claim returns: the jobs, when the next pending one is due (when it took fewer than asked), the calls.
_Claim = tuple[list[ClaimedJob], datetime | None, dict[int, RawCall]]


class Worker:
    def __init__(
        self,
        db: Database,
        spec: WorkerSpec,
        sources: dict[str, Source],
        router: Router,
        steps: StepRunner,
        on_event: Callable[[Event], None],
        phone_region: str | None = None,
        acks_waiting: Callable[[], int] = lambda: 0,
        cpu_clock: Callable[[], tuple[float, float]] = lambda: (time.monotonic(), time.process_time()),
        metrics: Metrics | None = None,
        retention_periods: retention.Periods | None = None,
    ):
        self.db, self.spec, self.sources, self.router, self.steps = db, spec, sources, router, steps
        self.retention_periods = retention_periods
        self.retention_batch = retention.BATCH
        self.phone_region = phone_region
        self.clock = steps.clock
        self.id = steps.worker_id
        self._on_event = on_event
        self.metrics = metrics or Metrics(sinks=steps.sinks)
        self._acks_waiting = acks_waiting
        self._cpu_applying = 0.0  # CPU seconds spent applying calls, for pause_after
        self._cpu_clock = cpu_clock  # (wall, process CPU) seconds
        self._cpu_marks = (cpu_clock(), cpu_clock())
        # Steps run side by side: preparing them and recording what their sinks answered share transactions
        # when they coincide. Two kinds of transactions, one for each, took 0.37 transactions per e-mail on
        # PostgreSQL where one kind takes 0.32, and mailed 4 % less (docs/performance.md, session 20).
        self._steps: Grouped[ClaimedJob | _Sent | _Recheck | _TakenBack | _Later, Send | bool | None] = Grouped(
            db, self._step_work, ahead=self._reading_ahead
        )
        self._backlogs = Backlogs(steps.sinks, spec.sink_wait.total_seconds())
        self._wake = asyncio.Event()
        self._starved = False  # the loop waits for free slots, not for work
        #: When the sleeping loop claims next by itself (None while it is not sleeping); and whether it runs
        #: at all (drain() runs what it claims itself). See _claimed_along.
        self._wake_at: datetime | None = None
        self._looping = False
        #: Slots promised to claims made in a transaction applying calls, not yet started.
        self._reserved = 0
        self._running: dict[int, asyncio.Task[None]] = {}
        self._stopping = False
        #: Claimed calls not yet applied, as (inbox id, job id): applied lowest first; those normalised wait in
        #: `_ready` with what their claim awaits, and go through in runs from the lowest (`_apply_ready`, run by
        #: `_applier` while it has work).
        self._calls_in_order: list[tuple[int, int]] = []
        self._ready: dict[int, tuple[_Call, asyncio.Future[None]]] = {}
        self._applier: asyncio.Task[None] | None = None

    def wake(self) -> None:
        self._wake.set()

    def offer(self, calls: int) -> Taking | None:
        """Take calls in the transaction that stores them (store/inbox.py: `commit_and_take`), on SQLite, while
        the loop runs and has room: their slots are reserved until `taken`."""
        room = min(calls, self._room()) if self.db.is_sqlite and self._looping and not self._stopping else 0
        if room <= 0:
            return None
        self._reserved += room
        return Taking(self.id, self.clock.now() + self.spec.lease, room)

    def taken(self, taking: Taking, calls: list[tuple[ClaimedJob, NewCall]]) -> None:
        self._reserved -= taking.room
        raws = [
            RawCall(job.inbox_id or 0, c.source, c.received_at, c.headers, c.body, c.dedupe_key) for job, c in calls
        ]
        self._start([job for job, _ in calls], {raw.id: raw for raw in raws})

    def pause_after(self, spent: float) -> float:
        """Seconds to pause after processing calls took `spent` seconds of CPU.

        When the process is short of CPU and a flood of webhooks waits for its acknowledgement (ACKS_FLOOD), those
        go first: stored calls are durable and can wait, the provider cannot. Processing keeps `processing_share`
        of the CPU, so it never stops; with CPU to spare, or webhooks coming as a stream, it never pauses.
        """
        share = self.spec.processing_share
        if share >= 1 or self._acks_waiting() < ACKS_FLOOD or not self._saturated():
            return 0.0
        return spent * (1 - share) / share

    def _saturated(self) -> bool:
        """Whether the process used most of a core over the last 0.5-1 s."""
        now = self._cpu_clock()
        if now[0] - self._cpu_marks[1][0] >= 0.5:
            self._cpu_marks = (self._cpu_marks[1], now)
        (wall, cpu) = self._cpu_marks[0]
        return now[0] > wall and (now[1] - cpu) / (now[0] - wall) >= SATURATED

    async def run(self) -> None:
        heartbeat = asyncio.create_task(self._renew_leases())
        sweeper = asyncio.create_task(self._sweep_claim_index())
        self._looping = True
        try:
            while not self._stopping:
                room = self._room()
                claimed, due = await self._claim_some(room)
                if claimed == room > 0:
                    continue  # a full batch: more may be due right now
                # Less than asked for: nothing else is due, and a job made due now wakes us. With no room
                # for more jobs, only a finishing job (or stopping) matters.
                self._starved = not room
                timeout = self._until(due) if room else self.spec.poll_interval.total_seconds()
                self._wake_at = self.clock.now() + timedelta(seconds=timeout)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
                self._wake_at = None
                self._wake.clear()
                self._starved = False
            # Stopping: jobs in flight finish (stop() bounds the wait by cancelling this task; `wait`, as
            # `gather` would cancel them with it, and the calls they hold must be known below).
            if self._running:
                await asyncio.wait(list(self._running.values()))
        finally:
            self._looping = False
            held = [job_id for _, job_id in self._calls_in_order]  # claimed calls, maybe not applied
            heartbeat.cancel()
            sweeper.cancel()
            tasks = [*self._running.values(), *([self._applier] if self._applier else [])]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, heartbeat, sweeper, return_exceptions=True)
            # None of the calls of cancelled claims may hold the queue's head when this worker is started again
            # (app._supervise restarts a worker that died).
            self._forget([call.job for call, _ in self._ready.values()])
            self._calls_in_order.clear()
            # What cancelled jobs handed over still commits: a send made is recorded, not sent again.
            await self._steps.finish()
            # The calls not applied go back to the queue now, not when their lease ends: calls stored meanwhile
            # wait behind them instead of being taken at once (applied first), and another replica may take them.
            if held:
                with contextlib.suppress(StorageUnavailable):  # then their lease ends as before
                    await self.db.run(jobqueue.release, held, self.id, self.clock.now())

    async def stop(self, grace: float) -> None:
        """Claim nothing more and let jobs in flight finish, for up to `grace` seconds."""
        self._stopping = True
        self._wake.set()
        if self._running:
            await asyncio.wait(list(self._running.values()), timeout=grace)

    async def drain(self) -> int:
        """Run every job due now, and those they make due now, then return how many ran."""
        ran = 0
        while True:
            jobs, raws = await self.db.run(self._claim, self.spec.batch_size)
            if not jobs:
                return ran
            self._queue_calls(jobs)
            await asyncio.gather(*(work for _, work in self._units(jobs, raws)))
            ran += len(jobs)

    def _until(self, due: datetime | None) -> float:
        """Seconds to sleep until the next job is due, `poll_interval` at most (other replicas add jobs too)."""
        ceiling = self.spec.poll_interval.total_seconds()
        if due is None:
            return ceiling
        return min(ceiling, max((due - self.clock.now()).total_seconds(), 0.005))

    def _room(self) -> int:
        """How many jobs to claim now. With work in flight, wait for a batch's worth of free slots:
        one claim per finished job would cost a transaction per send."""
        free = self.spec.concurrency - len(self._running) - self._reserved
        if free <= 0 or (self._running and free < min(self.spec.batch_size, self.spec.concurrency) // 2):
            return 0
        return min(free, self.spec.batch_size)

    async def _claim_some(self, room: int) -> tuple[int, datetime | None]:
        """Claim up to `room` jobs and start them; how many, and when the next pending job is due."""
        if not room:
            return 0, None
        try:
            jobs, due, raws = await self.db.run(self._claim_and_look, room)
        except StorageUnavailable as exc:
            log.warning("cannot claim jobs", error=str(exc))
            return 0, None
        self._start(jobs, raws)
        return len(jobs), due

    def _start(self, jobs: list[ClaimedJob], raws: dict[int, RawCall]) -> None:
        # A job of ours whose lease ran out unrenewed (the database out of reach for a lease) comes back in our own
        # claim while its first run goes on: that run keeps it, under the new lease. Run twice, a call applied by
        # the first would be failed by the second, and the order of the calls held would hold it twice.
        jobs = [job for job in jobs if job.id not in self._running]
        self._queue_calls(jobs)
        for unit, work in self._units(jobs, raws):
            task = asyncio.create_task(work)
            for job in unit:
                self._running[job.id] = task
            task.add_done_callback(self._done)

    def _claim_and_look(
        self, conn: Connection, limit: int
    ) -> tuple[list[ClaimedJob], datetime | None, dict[int, RawCall]]:
        """The claim, and when it took fewer than `limit`, when the next job is due: one transaction for both."""
        now = self.clock.now()
        jobs, raws = self._claim(conn, limit, now)
        return jobs, (jobqueue.next_due(conn, now) if len(jobs) < limit else None), raws

    def _claim(
        self, conn: Connection, limit: int, now: datetime | None = None
    ) -> tuple[list[ClaimedJob], dict[int, RawCall]]:
        """Up to `limit` due jobs, and the calls among them as stored, read in the claim's transaction (in one of
        their own they cost a transaction per webhook at light load, docs/performance.md)."""
        now = now or self.clock.now()
        overdue = jobqueue.overdue_calls(conn, now - self.spec.ordering_timeout)  # before the claim may take one
        jobs = jobqueue.claim(conn, self.id, now, self.spec.lease, limit, self.spec.ordering_timeout)
        if overdue and any(job.kind == "step" for job in jobs):
            self._note_overtaken(conn, jobs, overdue, now)
        calls = sorted(job.inbox_id for job in jobs if job.inbox_id is not None)
        return jobs, (inbound.load_calls(conn, calls) if calls else {})

    def _note_overtaken(
        self, conn: Connection, jobs: list[ClaimedJob], overdue: list[jobqueue.WaitingCall], now: datetime
    ) -> None:
        """Steps going ahead of a call about their contact, still unprocessed after ordering_timeout, say so."""
        steps = [job for job in jobs if job.kind == "step" and job.enrolment_id is not None]
        owners = journal.enrolments(conn, [job.enrolment_id for job in steps if job.enrolment_id is not None])
        noted = 0
        for job in steps:
            if job.enrolment_id not in owners:
                continue
            rule, contact_id = owners[job.enrolment_id]
            call = next((call for call in overdue if call.holds(job.due_at, contact_id)), None)
            if call is None:
                continue
            reason = (
                f"went ahead of call {call.inbox_id} (received {call.arrived:%Y-%m-%d %H:%M:%S} UTC), "
                f"still unprocessed after ordering_timeout ({self.spec.ordering_timeout})"
            )
            journal.record(conn, now, rule, contact_id, "overtook", step=job.step + 1, reason=reason)
            noted += 1
        if noted:
            log.warning("steps went ahead of an unprocessed call", steps=noted)

    def _units(
        self, jobs: list[ClaimedJob], raws: dict[int, RawCall]
    ) -> list[tuple[list[ClaimedJob], Coroutine[Any, Any, None]]]:
        """The claimed calls (`raws`: as stored) go through together, in one transaction; every other job runs
        alone."""
        calls = [job for job in jobs if job.kind == "inbox"]
        units = [(calls, self._process_calls(calls, raws))] if calls else []
        return units + [([job], self.run_job(job)) for job in jobs if job.kind != "inbox"]

    def _done(self, task: asyncio.Task[None]) -> None:
        for job_id, running in list(self._running.items()):
            if running is task:
                del self._running[job_id]
        # A free slot matters only to a loop waiting for room: otherwise waking it costs a claim for nothing
        # (a job that makes work due now wakes the loop itself).
        if self._starved and self._room():
            self._wake.set()

    async def run_job(self, job: ClaimedJob) -> None:
        try:
            if job.kind == "step":
                await self._run_step(job)
            elif job.kind == "poll":
                await self._poll(job)
            elif job.kind == "tick" and job.occurrence == retention.NAME:
                await self._retain(job)
            elif job.kind == "tick":
                await self._reconcile(job)
            else:
                await self.db.run(self._close_call, job, self._trigger_work(job))
                self.wake()
        except Exception as exc:  # keep the job, try again later; never lose it
            log.exception("job failed", job_id=job.id, kind=job.kind)
            await self._retry_later(job, f"{type(exc).__name__}: {exc}")

    async def _poll(self, job: ClaimedJob) -> None:
        """Ask the provider, store what it says, and schedule the next poll; a failing provider only delays it."""
        source = polls.pollers(self.sources).get(job.occurrence or "")
        if source is None:  # the source left the config: the chain of polls ends here
            await self.db.run(jobqueue.finish, job, self.id, self.clock.now(), "cancelled")
            return
        cursor = await self.db.run(polls.load_cursor, source.key)
        now = self.clock.now()
        try:
            fetched = await source.poll(cursor, now)
        except RetryLater as exc:
            # Attempts count on (backing off up to the interval) and never run out: a poll chain never dies.
            delay = jobqueue.retry_delay(job.attempts, self.spec.retry_base, source.interval, exc.after)
            await self.db.run(jobqueue.reschedule, job, self.id, now + delay, now, exc.reason)
            log.warning("poll failed, retrying", source=source.key, error=exc.reason, seconds=delay.total_seconds())
            return

        def store(conn: Connection, now: datetime) -> int:
            stored = polls.store(conn, source.key, fetched, now)
            polls.schedule(conn, source.key, now + source.interval, now)
            return stored

        stored = await self.db.run(self._close_call, job, store)
        log.info("polled", source=source.key, items=len(fetched.items), new=stored)
        self.wake()

    def _queue_calls(self, jobs: list[ClaimedJob]) -> None:
        for job in jobs:
            if job.kind == "inbox":
                bisect.insort(self._calls_in_order, (job.inbox_id or 0, job.id))

    async def _process_calls(self, jobs: list[ClaimedJob], raws: dict[int, RawCall]) -> None:
        """Normalise the calls side by side (maybe slowly, fetching from the provider), then have them applied in
        the order they arrived, with those of other claims (`_apply_ready`)."""
        waiting: list[tuple[ClaimedJob, asyncio.Future[None]]] = []
        try:
            calls = await asyncio.gather(*(self._normalize(job, raws.get(job.inbox_id or 0)) for job in jobs))
            waiting = [(call.job, self._make_ready(call)) for call in calls if call is not None]
        except Exception as exc:  # a bug normalising: every call is tried again later
            log.warning("calls not processed, retrying", calls=len(jobs), error=str(exc))
            for job in jobs:
                await self._retry_later(job, f"{type(exc).__name__}: {exc}")
        finally:
            # Calls that wait for a later claim (the provider said retry later) hold back no call behind them.
            self._forget([job for job in jobs if job.id not in self._ready])
        if self._applier is None:
            self._applier = asyncio.create_task(self._apply_ready())
        for job, applied in waiting:
            try:
                await applied
            except Exception as exc:
                log.warning("call not processed, retrying", job_id=job.id, error=str(exc))
                await self._retry_later(job, f"{type(exc).__name__}: {exc}")

    def _make_ready(self, call: _Call) -> asyncio.Future[None]:
        applied: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._ready[call.job.id] = (call, applied)
        return applied

    def _forget(self, jobs: list[ClaimedJob]) -> None:
        """Out of the queue; a claim still waiting for one of them is cancelled (nobody may wait forever)."""
        for job in jobs:
            _, applied = self._ready.pop(job.id, (None, None))
            if applied is not None and not applied.done():
                applied.cancel()
            with contextlib.suppress(ValueError):
                self._calls_in_order.remove((job.inbox_id or 0, job.id))

    def _next_run(self) -> list[_Call]:
        """The normalised calls first in arrival order, CALLS_PER_TRANSACTION at most; none while the first claimed
        is still being normalised: an unsubscribe received after a profile update is applied after it."""
        at_once = CALLS_PER_TRANSACTION["sqlite" if self.db.is_sqlite else "postgresql"]
        run: list[_Call] = []
        for _, job_id in self._calls_in_order[:at_once]:
            if job_id not in self._ready:
                break
            run.append(self._ready[job_id][0])
        return run

    async def _apply_ready(self) -> None:
        """Apply the normalised calls in arrival order, one transaction per run of them, whichever claim they came
        with, until no run is ready: taken one by one as they are stored (light load), calls cost a transaction
        each, in turn, while those behind them waited (docs/performance.md, session 17). It runs as a task of its
        own, as Grouped's transactions do: the claims only wait for their calls."""
        run: list[_Call] = []
        lease = self.spec.lease.total_seconds()
        waiting = Waiting(longest=lease / 4, limit=lease / 2)
        try:
            while run := self._next_run():
                cpu = self._cpu_applying
                try:
                    stored, left, error = await self._apply(run)
                except StorageUnavailable as exc:  # nothing of the run written
                    stored, left, error = [], len(run), exc
                except Exception as exc:  # a bug: its calls are tried again later
                    self._settle(run, exc)
                    continue
                self._settle(run[: len(run) - left])
                for event in stored:
                    self._on_event(event)
                if error is not None:
                    # The database did not take the last `left` calls: they go again, before the calls behind
                    # them, while their lease surely holds (half of it); after that, back to the queue.
                    pause = waiting.pause()
                    if pause is None:
                        self._settle(run[len(run) - left :], error)
                        continue
                    log.warning("cannot apply calls yet, trying again", calls=left, error=str(error), seconds=pause)
                    await asyncio.sleep(pause)
                    continue
                waiting.reset()
                await asyncio.sleep(self.pause_after(self._cpu_applying - cpu))
        finally:
            self._applier = None
            self._forget([call.job for call in run])  # cancelled mid-run (stopping): see run()

    def _settle(self, run: list[_Call], error: Exception | None = None) -> None:
        for call in run:
            applied = self._ready[call.job.id][1]
            if applied.done():
                continue
            if error is None:
                applied.set_result(None)
            else:
                applied.set_exception(error)
        self._forget([call.job for call in run])

    async def _apply(self, calls: list[_Call]) -> tuple[list[Event], int, StorageUnavailable | None]:
        """Apply the calls; the transaction that applies the last one also claims what is due now, the steps
        the calls just made due among it: at light load a claim of its own cost a transaction per webhook.
        Returns the events stored, and how many of the last calls the database did not take, and why (the
        others are applied or failed for good). StorageUnavailable: nothing was written."""
        room = self._room() if self._looping and not self._stopping else 0
        last = calls[-1]

        def apply_then_claim(conn: Connection, batch: list[_Call]) -> list[tuple[list[Event], _Claim | None]]:
            applied: list[tuple[list[Event], _Claim | None]] = [
                (events, None) for events in self._close_calls(conn, batch)
            ]
            # One claim per _apply, carried by the last call's outcome: in the shared transaction, or in the last
            # call's own (together_or_alone); a transaction that fails takes its claim with it.
            if room and batch[-1] is last:
                applied[-1] = (applied[-1][0], self._claim_and_look(conn, room))
            return applied

        self._reserved += room
        try:
            # A conflict (a contact locked elsewhere) fails the run, tried again later: failed alone, the call
            # would be failed for good, and applied alone, the calls behind it would overtake it.
            outcomes = await together_or_alone(self.db, apply_then_claim, calls, conflicts_alone=False)
        finally:
            self._reserved -= room
        # Started first: jobs claimed and left unstarted would wait for their lease to run out.
        self._claimed_along(None if isinstance(outcomes[-1], Failed) else outcomes[-1][1], room)
        stored: list[Event] = []
        for n, (call, outcome) in enumerate(zip(calls, outcomes, strict=True)):
            if not isinstance(outcome, Failed):
                stored += outcome[0]
                continue
            if isinstance(outcome.error, StorageUnavailable):  # the database's, and so for every call after it
                return stored, len(calls) - n, outcome.error
            # This call's own data cannot be stored (a lone surrogate, a value too long) or hit a bug. Retrying
            # cannot help and would hold back the steps behind it: failed now, visible, replayable after a fix.
            if not isinstance(outcome.error, MalformedPayload):
                log.error("call failed", job_id=call.job.id, inbox_id=call.job.inbox_id, exc_info=outcome.error)
            failure = _reason(outcome.error)
            try:
                await self.db.run(self._close_calls, [dataclasses.replace(call, failure=failure)])
            except StorageUnavailable as exc:
                return stored, len(calls) - n, exc
        return stored, 0, None

    def _claimed_along(self, claimed: _Claim | None, room: int) -> None:
        """Start what the calls' transaction claimed, and wake the loop only if it must claim sooner than it
        would by itself: a full batch (more may be due), or a job due before its timer."""
        if claimed is None:
            self.wake()  # steps due now may have been created: the loop claims them
            return
        jobs, due, raws = claimed
        self._start(jobs, raws)
        if len(jobs) == room or self._wake_at is None or (due is not None and due < self._wake_at):
            self.wake()

    async def _normalize(self, job: ClaimedJob, raw: RawCall | None) -> _Call | None:
        """What to do with one call; None when it must wait (the provider said retry later)."""
        if raw is None:  # processed already: only the job is left to close
            return _Call(job, None)
        source = self.sources.get(raw.source)
        try:
            return _Call(job, raw, await inbound.normalize(source, raw, self.phone_region))
        except RetryLater as exc:  # the provider will answer later: back off, never drop the call
            await self._retry_later(job, exc.reason, exc.after, inbound.about(source, raw))
            return None
        except MalformedPayload as exc:
            return _Call(job, raw, failure=str(exc))

    def _close_calls(self, conn: Connection, calls: list[_Call]) -> list[list[Event]]:
        """Apply the calls and close their jobs; the events stored, call by call."""
        began = time.thread_time()  # CPU, not wall time: waiting for the GIL or the disk is not processing
        try:
            return self._apply_in(conn, calls)
        finally:
            self._cpu_applying += time.thread_time() - began

    def _apply_in(self, conn: Connection, calls: list[_Call]) -> list[list[Event]]:
        now = self.clock.now()
        for call in calls:
            if call.raw is not None and call.failure is not None:
                inbound.fail_call(conn, call.raw.id, now, call.failure)
        applying = [(raw, call.events) for call in calls if (raw := call.applies())]
        applied = iter(inbound.apply_calls(conn, applying, self.router, now))
        if applying:
            inbound.mark_processed(conn, [raw.id for raw, _ in applying], now)
        for call in calls:
            jobqueue.finish_queued(conn, call.job, self.id, now)
        return [next(applied) if call.applies() else [] for call in calls]

    async def _reconcile(self, job: ClaimedJob) -> None:
        """Schedule the triggers a config change added, a chunk per transaction so webhooks keep flowing."""
        if await self.db.run(self.router.reconcile_needed):
            units = await self.db.run(self.router.reconcile_units)
            for start in range(0, len(units), self.router.RECONCILE_CHUNK):
                chunk = units[start : start + self.router.RECONCILE_CHUNK]
                await self.db.run(self.router.reconcile_chunk, chunk, self.clock.now())
            log.info("triggers reconciled", units=len(units))
        await self.db.run(self._close_call, job, lambda conn, now: self.router.reconcile_done(conn))

    async def _retain(self, job: ClaimedJob) -> None:
        """Remove what aged out, a batch per transaction, then schedule the next run."""
        removed = dict.fromkeys(retention.PARTS, 0)
        if self.retention_periods is not None:
            for part, cutoff in retention.cutoffs(self.retention_periods, self.clock.now()).items():
                batch = retention.BATCHES[part]
                while True:
                    count = await self.db.run(batch, cutoff, self.retention_batch)
                    removed[part] += count
                    if count < self.retention_batch:
                        break
        for part, count in removed.items():
            self.metrics.retained(part, count)
        log.info("retention run", **removed)
        await self.db.run(self._close_call, job, lambda conn, now: retention.schedule(conn, now + retention.EVERY, now))

    def _trigger_work(self, job: ClaimedJob) -> Callable[[Connection, datetime], object]:
        """A due date or inactivity trigger fires."""
        rule, contact_id, occurrence = job.rule, job.contact_id, job.occurrence
        assert rule is not None and contact_id is not None and occurrence is not None
        return lambda conn, now: self.router.fire(conn, rule, contact_id, occurrence, job.due_at, now, job.id)

    def _close_call(self, conn: Connection, job: ClaimedJob, work: Callable[[Connection, datetime], T]) -> T:
        now = self.clock.now()
        # Finished first, in the same transaction: a poll or tick that queues its next run must not be
        # running any more, or the one-live-clock-job index would refuse the next (`add_unique`).
        jobqueue.finish(conn, job, self.id, now)
        return work(conn, now)

    async def prepare_step(self, job: ClaimedJob) -> Send | None:
        """What the claimed step sends now, or None when its job was closed or deferred instead."""
        send = await self._steps(job)
        assert not isinstance(send, bool)
        return send

    async def record_send(self, send: Send, result: DeliveryResult, message: Message | None) -> bool:
        """Record the sink's answer and move the journey on; True when that made a job pending.

        The sink has answered: the step is never sent again for want of its record. While the database is
        unavailable the record is tried again (the job sent back to the queue would send it again). The job stays
        claimed meanwhile, its lease renewed once the database answers; only stopping ends the wait, and then the
        job runs again, as one in flight at a kill. A record the database refuses for a reason of its own (a value
        it cannot hold, a bug) is made again with the outcome alone (`_bare`, no copy kept); if that is refused
        too, the job goes to the dead letter saying what went out (a step whose sink said retry is tried again).
        """
        try:
            return await self._recorded(send, lambda again: self._steps(_Sent(send, result, message, again))) is True
        except Exception as exc:  # StorageUnavailable is waited out
            log.error("a send's record was refused, recording its outcome alone", job_id=send.job.id, exc_info=exc)
        bare = _bare(result)
        try:
            return await self._recorded(send, lambda again: self._steps(_Sent(send, bare, None, again))) is True
        except Exception as exc:
            if result.outcome is Outcome.RETRY:
                raise  # nothing went out: the step is tried again later, as any job that failed
            await self._dead_unrecorded(send, result, exc)
            return False

    async def _recorded(self, send: Send, write: Callable[[bool], Awaitable[T]]) -> T:
        """write(again) until the database is there to take it: `again` once it was not, without limit."""
        waiting, again = Waiting(longest=self.spec.lease.total_seconds() / 4), False
        while True:
            try:
                return await write(again)
            except StorageUnavailable as exc:
                pause, again = waiting.pause() or FIRST_PAUSE, True  # no limit: never None
                log.warning("cannot record a send yet, trying again", job_id=send.job.id, error=str(exc), seconds=pause)
                await asyncio.sleep(pause)

    async def _dead_unrecorded(self, send: Send, result: DeliveryResult, error: Exception) -> None:
        """Close the job of a step whose sink answered but whose record no database would take: in the dead letter,
        visible, its reason saying what went out. Nothing else knows it did: a replay leaves it unless told to resend
        (`jobqueue.requeue`)."""
        went = jobqueue.WENT_OUT if result.outcome is Outcome.SENT else "(nothing went out)"
        reason = sql.storable(
            f"{send.sink.key} answered {result.outcome.value} {went} but the database refused its record, "
            f"so only a replay told to resend sends it again: {type(error).__name__}: {error}",
            2000,
        )
        log.error("a send's record was refused, its job goes to the dead letter", job_id=send.job.id, reason=reason)
        now = self.clock.now()
        await self._recorded(send, lambda again: self.db.run(jobqueue.finish, send.job, self.id, now, "dead", reason))

    async def _still_holds(self, send: Send) -> bool:
        """StepRunner.still_holds for a step that waited for its sink. Unable to tell, it is not sent: its job stays
        claimed until its lease runs out, then it is prepared again."""
        try:
            return await self._steps(_Recheck(send)) is True
        except Exception as exc:
            log.warning("cannot check a step again before its send", job_id=send.job.id, error=str(exc))
            return False

    async def _leave_line(self, send: Send) -> None:
        """A step far back in a slow or hung sink's line goes back to the queue for about its turn (jobs/backlog.py).
        Unable to, it stays claimed until its lease runs out, then it is prepared again."""
        until, reason = self._turn_at(send.sink.key, self._backlogs.take_turn(send.sink.key))
        try:
            await self._steps(_TakenBack(send, until, reason))
        except Exception as exc:
            log.warning("cannot send a step back to the queue", job_id=send.job.id, error=str(exc))

    def _step_work(
        self, conn: Connection, item: ClaimedJob | _Sent | _Recheck | _TakenBack | _Later
    ) -> Send | bool | None:
        if isinstance(item, _Sent):
            return self.steps.record(conn, item.send, item.result, item.message, item.again)
        if isinstance(item, _Recheck):
            return self.steps.still_holds(conn, item.send)
        if isinstance(item, _TakenBack):
            self.steps.take_back(conn, item.send, item.until, item.reason)
            return None
        if isinstance(item, _Later):
            return jobqueue.defer(conn, item.job, self.id, item.until, self.clock.now(), item.reason)
        return self.steps.prepare(conn, item)

    def _reading_ahead(
        self, conn: Connection, items: list[ClaimedJob | _Sent | _Recheck | _TakenBack | _Later]
    ) -> contextlib.AbstractContextManager[None]:
        """The steps to prepare read what they need in one statement (recording a send reads nothing ahead), unless
        a send recorded with them changes its contact: then each reads its own when it comes."""
        if any(isinstance(item, _Sent) and self.steps.changes_contact(item.result) for item in items):
            return contextlib.nullcontext()
        return self.steps.reading_ahead(conn, [item for item in items if isinstance(item, ClaimedJob)])

    async def _run_step(self, job: ClaimedJob) -> None:
        if await self._sent_back(job):
            return
        send = await self.prepare_step(job)
        if send is None:
            self.wake()
            return
        with structlog.contextvars.bound_contextvars(
            event_id=send.context.event["id"], rule=send.rule.name, sink=send.sink.key, step=job.step + 1
        ):
            # With one sink there is no other mail to make room for: a step waits in its line as long as it takes.
            leave = self._leave_line if len(self.steps.sinks) > 1 else None
            sent = await call_sink(send, self._still_holds, leave, self.spec.sink_wait.total_seconds())
            if sent is None:  # taken back after waiting for its sink: prepared again at once
                self.wake()
                return
            result, message = sent
            self.metrics.sent(send.sink.key, result.outcome)
            # A send that went through is at debug, as its enrolment (pipeline/router.py): the journal, the
            # deliveries table and /metrics keep each one, and these two info lines were 4 % of the CPU an
            # e-mail costs (docs/performance.md, session 20). Any other outcome is news for the operator.
            (log.debug if result.outcome is Outcome.SENT else log.info)(
                "step " + result.outcome.value, provider_id=result.provider_id, error=result.error
            )
            queued = await self.record_send(send, result, message)
        if queued:  # the journey's last step (most transactional mail) queues nothing: no claim for it
            self.wake()

    async def _sent_back(self, job: ClaimedJob) -> bool:
        """Send a claimed step back to the queue, unprepared and its attempt not spent, when none of its sinks
        would take it soon (jobs/backlog.py); steps queued before their jobs named their rule are never."""
        rule = self.router.rules.get(job.rule) if job.rule is not None else None
        if rule is None or job.step >= len(rule.spec.steps):
            return False
        turn = self._backlogs.turn(rule.spec.steps[job.step].send.vias)
        if turn is None:
            return False
        await self._steps(_Later(job, *self._turn_at(*turn)))
        return True

    def _turn_at(self, via: str, seconds: float) -> tuple[datetime, str]:
        """When a step sent back for a busy sink is due again, and what its job says meanwhile."""
        return self.clock.now() + timedelta(seconds=seconds), f"sink {via} busy: its turn in about {seconds:.1f} s"

    async def _retry_later(
        self, job: ClaimedJob, error: str, after: float | None = None, about: list[tuple[str, str]] | None = None
    ) -> None:
        now = self.clock.now()
        due = now + jobqueue.retry_delay(job.attempts, self.spec.retry_base, self.spec.retry_max, after)

        def work(conn: Connection) -> bool:
            if job.retried_too_long(now, self.spec.retry_for, self.spec.max_attempts):
                return jobqueue.finish(conn, job, self.id, now, "dead", error)
            return jobqueue.reschedule(conn, job, self.id, due, now, error, about)

        try:
            await self.db.run(work)
        except StorageUnavailable:
            log.warning("could not reschedule; the lease will expire and the job run again", job_id=job.id)

    async def _sweep_claim_index(self) -> None:
        """On PostgreSQL, keep the claim fast between VACUUMs (jobqueue.sweep_claim_index)."""
        if self.db.is_sqlite:  # SQLite removes an index entry with its row version
            return
        while True:
            await asyncio.sleep(jobqueue.SWEEP_EVERY)
            try:
                await self.db.run(jobqueue.sweep_claim_index, self.clock.now())
            except StorageUnavailable as exc:
                log.warning("cannot sweep the claim's index", error=str(exc))

    async def _renew_leases(self) -> None:
        # Four heartbeats per lease: a live worker keeps its jobs through a few missed beats, a
        # dead one's jobs are free a lease after its last beat.
        interval = self.spec.lease.total_seconds() / 4
        while True:
            await asyncio.sleep(interval)
            if self._running:
                until = self.clock.now() + self.spec.lease
                try:
                    await self.db.run(jobqueue.renew, list(self._running), self.id, until)
                except StorageUnavailable as exc:
                    log.warning("cannot renew leases", error=str(exc))
