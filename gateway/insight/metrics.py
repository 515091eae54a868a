"""What Declic did, for Prometheus: counters kept in-process on the hot paths, queue gauges read from the database.

Each running gateway has its own registry, so several in one process (tests, `declic simulate`) never share
or collide. Label values come from the config (source and sink names) or from fixed sets (statuses,
outcomes, job kinds), never from what a caller sends: the number of series stays bounded.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.exposition import choose_encoder

from ..kit.sinks import Outcome
from ..plugins import DISTRIBUTION
from ..store import Database
from .queue_gauges import QueueGauges

# A `_created` series per counter doubles the series and says nothing a scrape needs.
disable_created_metrics()

#: An acknowledgement waits for a group commit: about a millisecond when idle, tens under a burst,
#: seconds when the database is locked (storage.busy_timeout).
ACK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: The `source` of calls to a name that is not in the config: a config name cannot start with `_`.
UNKNOWN_SOURCE = "_unknown"
#: Webhook statuses: what became of a call.
ACKNOWLEDGED = ("accepted", "duplicate")


def _version() -> str:
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


class Metrics:
    """The deployment's metrics: record with the methods below, serve with `exposition()`."""

    def __init__(self, sources: Iterable[str] = (), sinks: Iterable[str] = ()):
        sources, sinks = tuple(sources), tuple(sinks)
        registry = self.registry = CollectorRegistry()
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=registry)
        Gauge("declic_build_info", "Declic's version; always 1.", ["version"], registry=registry).labels(
            _version()
        ).set(1)
        self._webhooks = Counter(
            "declic_webhooks",
            "Webhook calls answered, by source, status (accepted, duplicate, rejected, too_large, unavailable, "
            "unknown_source) and HTTP code.",
            ["source", "status", "code"],
            registry=registry,
        )
        self._ack_seconds = Histogram(
            "declic_webhook_ack_duration_seconds",
            "Time from a webhook's arrival to its acknowledgement (accepted or duplicate), once durable.",
            ["source"],
            buckets=ACK_BUCKETS,
            registry=registry,
        )
        self._sends = Counter(
            "declic_sends",
            "Messages handed to a sink, by sink and the sink's answer (sent, retry, permanent, address_invalid, "
            "opted_out).",
            ["sink", "outcome"],
            registry=registry,
        )
        self._storage_errors = Counter(
            "declic_storage_errors",
            "Database transactions that failed for want of storage (locked, unreachable): each one is a 503 "
            "to webhooks, a claim not made or a write retried later.",
            registry=registry,
        )
        self._storage_errors.inc(0)
        self._database_busy = Counter(
            "declic_database_busy_seconds",
            "Wall time the database threads spent running transactions, waits for the disk and the GIL included: "
            "its rate near the number of threads (1 on SQLite, 2 on PostgreSQL) means work queues for them.",
            registry=registry,
        )
        self._database_cpu = Counter(
            "declic_database_cpu_seconds",
            "CPU time the database threads spent running transactions.",
            registry=registry,
        )
        self._retained = Counter(
            "declic_retention_removed",
            "Rows the retention job removed, by part: inbox_bodies (blanked), inbox_keys, events, decisions, "
            "deliveries.",
            ["table"],
            registry=registry,
        )
        self.queue = QueueGauges()
        registry.register(self.queue)
        # Bound once, so the hot paths pay a dict look-up, and so every series shows from the first scrape.
        self._webhook_series = {
            (source, status, "200"): self._webhooks.labels(source, status, "200")
            for source in sources
            for status in ACKNOWLEDGED
        }
        self._ack_series = {source: self._ack_seconds.labels(source) for source in sources}
        self._send_series = {
            (sink, outcome): self._sends.labels(sink, outcome.value) for sink in sinks for outcome in Outcome
        }

    def webhook(self, source: str, status: str, code: int, seconds: float) -> None:
        """A webhook call was answered `code` after `seconds`."""
        key = (source, status, str(code))
        series = self._webhook_series.get(key)
        if series is None:  # a rarer status: bound on first use (sources and statuses are few)
            series = self._webhook_series[key] = self._webhooks.labels(*key)
        series.inc()
        if status in ACKNOWLEDGED:
            ack = self._ack_series.get(source)
            if ack is None:
                ack = self._ack_series[source] = self._ack_seconds.labels(source)
            ack.observe(seconds)

    def sent(self, sink: str, outcome: Outcome) -> None:
        """A sink answered a message with `outcome`."""
        series = self._send_series.get((sink, outcome))
        if series is None:
            series = self._send_series[(sink, outcome)] = self._sends.labels(sink, outcome.value)
        series.inc()

    def retained(self, part: str, count: int) -> None:
        """The retention job removed `count` rows of `part` (one of retention.PARTS)."""
        self._retained.labels(part).inc(count)

    def storage_unavailable(self) -> None:
        """A transaction failed for want of storage; may be called from any thread."""
        self._storage_errors.inc()

    def database_work(self, busy: float, cpu: float) -> None:
        """A database thread ran a transaction for `busy` seconds of wall time, `cpu` of its CPU; any thread."""
        self._database_busy.inc(busy)
        self._database_cpu.inc(cpu)

    async def refresh(self, db: Database, now: datetime) -> None:
        """Read the queue gauges from the database, unless a recent read is still fresh."""
        await self.queue.refresh(db, now)

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The body and content type of a scrape, in the format the `Accept` header asks for."""
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type
