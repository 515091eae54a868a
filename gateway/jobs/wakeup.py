"""On PostgreSQL, a worker hears at once that any replica queued work (LISTEN/NOTIFY).

Each process holds one connection of its own that listens on `jobqueue.CHANNEL`; the transactions that
queue calls and steps notify it (`jobqueue.notify`), and every notification wakes the worker, which then
claims. Polling (`worker.poll_interval`) stays the fallback: a lost connection (a restart, a failover)
costs latency, never work, and the listener reconnects with backoff.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import sqlalchemy as sa
import structlog

from ..store import jobqueue

log = structlog.get_logger("declic.wakeup")
#: Reconnection waits double from the first to the last.
FIRST_DELAY, MAX_DELAY = 0.5, 30.0
#: Under load, notifications from the other replicas (a group commit each, every few milliseconds)
#: wake the worker at most this often: each wake costs a claim. A lone notification wakes at once.
MIN_GAP = 0.05


class Coalesced:
    """`wake` at once, unless it ran less than `gap` seconds ago: then once, when the gap is over."""

    def __init__(self, wake: Callable[[], None], gap: float = MIN_GAP):
        self._wake, self._gap = wake, gap
        self._last = -gap
        self._later: asyncio.TimerHandle | None = None

    def __call__(self) -> None:
        loop = asyncio.get_running_loop()
        early = self._last + self._gap - loop.time()
        if early <= 0:
            self._fire()
        elif self._later is None:
            self._later = loop.call_later(early, self._fire)

    def _fire(self) -> None:
        self._later = None
        self._last = asyncio.get_running_loop().time()
        self._wake()


async def listen(url: str, wake: Callable[[], None]) -> None:
    """Wake the worker on notifications, for ever; `url` is a libpq URL (postgresql://...)."""
    import psycopg  # PostgreSQL deployments only (the `postgres` extra)

    delay = FIRST_DELAY
    wake_soon = Coalesced(wake)
    while True:
        try:
            # Keepalives: a listener on a dead TCP connection would otherwise wait for ever, silently.
            async with await psycopg.AsyncConnection.connect(
                url, autocommit=True, connect_timeout=5, keepalives=1, keepalives_idle=30, keepalives_interval=10
            ) as conn:
                await conn.execute(f"LISTEN {jobqueue.CHANNEL}")
                log.debug("listening for queued jobs", channel=jobqueue.CHANNEL)
                delay = FIRST_DELAY
                wake()  # whatever was queued while nobody listened
                async for notification in conn.notifies():
                    if notification.payload != jobqueue.ORIGIN:  # this process woke its worker itself
                        wake_soon()
        except (psycopg.Error, OSError) as exc:
            log.warning("job notifications lost; polling until reconnected", error=str(exc), seconds=delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, MAX_DELAY)


def libpq_url(url: sa.URL) -> str:
    """The engine's URL as psycopg wants it (no `+psycopg` driver name), password included."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)
