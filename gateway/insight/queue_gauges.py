"""The queue as gauges, read from the database when scraped: backlog, due jobs and lateness, dead letter.

Every query walks an index and counts at most COUNT_LIMIT rows, and one read serves every scrape for
MAX_AGE: however large the tables and however many scrapers, scraping costs the database a few index
look-ups every few seconds. The figures are the database's, the same from every replica that shares it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
import structlog
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.engine import Connection

from ..errors import StorageUnavailable
from ..store import INBOX, JOBS, Database, jobqueue

log = structlog.get_logger("declic.metrics")
J = JOBS.c
#: Counts stop here: past it the exact number no longer matters, and counting it would load the database.
COUNT_LIMIT = 10_000
#: How long one read of the database serves scrapes.
MAX_AGE = timedelta(seconds=5)


@dataclass(frozen=True)
class QueueState:
    backlog: int
    backlog_oldest_seconds: float
    failed_calls: int
    due: int
    lateness_seconds: float
    dead: dict[str, int]


def _count(conn: Connection, table: sa.Table, *where: sa.ColumnElement[bool]) -> int:
    """How many rows match, up to COUNT_LIMIT."""
    rows = sa.select(sa.literal(1)).select_from(table).where(*where).limit(COUNT_LIMIT).subquery()
    return int(conn.execute(sa.select(sa.func.count()).select_from(rows)).scalar_one())


def _age(conn: Connection, column: sa.Column[datetime], now: datetime, *where: sa.ColumnElement[bool]) -> float:
    """Seconds since the earliest `column` among the rows that match; 0 when none does or it is in the future."""
    earliest: datetime | None = conn.execute(sa.select(sa.func.min(column)).where(*where)).scalar()
    return max((now - earliest).total_seconds(), 0.0) if earliest is not None else 0.0


def read_queue_state(conn: Connection, now: datetime) -> QueueState:
    """The queue as it stands; each query is served by one index (see store/tables.py)."""
    unprocessed = (J.kind == "inbox", J.status.in_(("pending", "running")))  # ix_jobs_backlog
    return QueueState(
        backlog=_count(conn, JOBS, *unprocessed),
        backlog_oldest_seconds=max(
            _age(conn, J.created_at, now, J.kind == "inbox", J.status == status) for status in ("pending", "running")
        ),
        failed_calls=_count(conn, INBOX, INBOX.c.status == "failed"),  # ix_inbox_status
        due=_count(conn, JOBS, J.status == "pending", J.due_at <= now),  # ix_jobs_claim
        lateness_seconds=_age(conn, J.due_at, now, J.status == "pending"),
        dead={kind: _count(conn, JOBS, J.kind == kind, J.status == "dead") for kind in jobqueue.KINDS},
    )


class QueueGauges(Collector):
    """A prometheus_client collector that serves the last read: refresh() it before each scrape."""

    def __init__(self) -> None:
        self._state: QueueState | None = None
        self._read_at: datetime | None = None
        self._reading = asyncio.Lock()

    async def refresh(self, db: Database, now: datetime) -> None:
        """Read again if the last read is older than MAX_AGE; concurrent scrapes share one read.

        When the database does not answer, the queue gauges are left out (figures from before the failure
        would mislead) and `declic_queue_read_ok` says 0; the failure too serves for MAX_AGE.
        """
        async with self._reading:
            if self._read_at is not None and timedelta(0) <= now - self._read_at < MAX_AGE:
                return  # a clock set back reads again rather than serving stale figures for hours
            try:
                self._state = await db.run(read_queue_state, now)
            except Exception as exc:  # the counters are still worth serving: never a 500 for want of gauges
                if not isinstance(exc, StorageUnavailable):  # that one is counted in declic_storage_errors_total
                    log.warning("queue gauges not read", error=f"{type(exc).__name__}: {exc}")
                self._state = None
            self._read_at = now

    def describe(self) -> Iterator[Metric]:
        return self._families(None)

    def collect(self) -> Iterator[Metric]:
        return self._families(self._state)

    def _families(self, state: QueueState | None) -> Iterator[Metric]:
        ok = GaugeMetricFamily(
            "declic_queue_read_ok", "1 when the last read of the queue gauges from the database succeeded, else 0."
        )
        if self._read_at is not None:
            ok.add_metric([], 1 if state is not None else 0)
        yield ok
        for name, help_text, value in _GAUGES:
            family = GaugeMetricFamily(name, help_text)
            if state is not None:
                family.add_metric([], value(state))
            yield family
        dead = GaugeMetricFamily("declic_dead_letter_jobs", _DEAD_HELP, labels=["kind"])
        for kind, count in (state.dead if state else {}).items():
            dead.add_metric([kind], count)
        yield dead


_UP_TO = f" (counted up to {COUNT_LIMIT})"
_GAUGES: tuple[tuple[str, str, Callable[[QueueState], float]], ...] = (
    (
        "declic_inbox_backlog_calls",
        f"Webhook calls stored and not yet processed{_UP_TO}.",
        lambda state: state.backlog,
    ),
    (
        "declic_inbox_backlog_oldest_seconds",
        "Age of the oldest call stored and not yet processed; 0 if none.",
        lambda state: state.backlog_oldest_seconds,
    ),
    (
        "declic_inbox_failed_calls",
        f"Calls that failed to normalise, kept for `declic replay --failed`{_UP_TO}.",
        lambda state: state.failed_calls,
    ),
    (
        "declic_due_jobs",
        f"Jobs due now and not yet claimed by a worker{_UP_TO}.",
        lambda state: state.due,
    ),
    (
        "declic_due_jobs_lateness_seconds",
        "How long the most overdue unclaimed job has been due; 0 if none.",
        lambda state: state.lateness_seconds,
    ),
)
_DEAD_HELP = f"Jobs that ran out of attempts, by kind, kept for `declic replay`{_UP_TO}."
