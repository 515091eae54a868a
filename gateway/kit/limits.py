"""Per-sink limits: how many sends at once, and how many per period (a token bucket)."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from types import TracebackType

from .durations import parse_duration

_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\S+)\s*$")
#: A rate's bounds: COUNT from 1 to MAX_RATE_COUNT, per 1ms to 7d (a weekly provider quota).
MAX_RATE_COUNT = 1_000_000
MIN_RATE_PERIOD = timedelta(milliseconds=1)
MAX_RATE_PERIOD = timedelta(days=7)
RATE_BOUNDS = f"COUNT from 1 to {MAX_RATE_COUNT}, DURATION from 1ms to 7d"


def parse_rate(value: str) -> tuple[int, timedelta]:
    """`100/10s` -> (100, 10 s); `5/1s`; `1000/1h`."""
    match = _RATE.match(value)
    try:
        if not match:
            raise ValueError
        period = parse_duration(match.group(2))
    except ValueError:
        raise ValueError(f"invalid rate {_short(value)}: write COUNT/DURATION, as 100/10s") from None
    digits = match.group(1)
    if len(digits.lstrip("0")) > 7 or not 1 <= int(digits) <= MAX_RATE_COUNT:
        raise ValueError(f"invalid rate {_short(value)}: {RATE_BOUNDS}")
    if not MIN_RATE_PERIOD <= period <= MAX_RATE_PERIOD:
        raise ValueError(f"invalid rate {_short(value)}: {RATE_BOUNDS}")
    return int(digits), period


def _short(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:40] + "...")


class SendLimiter:
    """`async with limiter:` waits for a free slot and, when a rate is set, for a token."""

    def __init__(self, concurrency: int, rate: str | None = None):
        self._slots = asyncio.Semaphore(concurrency)
        self._capacity, self._period = parse_rate(rate) if rate else (0, timedelta(seconds=1))
        self._refill = self._capacity / self._period.total_seconds() if self._capacity else 0.0
        self._tokens = float(self._capacity)
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()
        self._shared: Callable[[int, timedelta], Awaitable[float]] | None = None

    def share(self, reserve: Callable[[int, timedelta], Awaitable[float]]) -> None:
        """Keep the rate together with other processes: `reserve(count, period)` takes a slot in a
        schedule they share and answers the seconds to wait for it (replicas: store/sinkrates.py)."""
        self._shared = reserve

    async def __aenter__(self) -> None:
        await self._slots.acquire()
        try:
            if self._capacity and self._shared is not None:
                wait = await self._shared(self._capacity, self._period)
                if wait > 0:
                    await asyncio.sleep(wait)
            elif self._capacity:
                await self._take_token()
        except BaseException:  # cancelled, or the shared schedule unreachable: the slot is free again
            self._slots.release()
            raise

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._slots.release()

    async def _take_token(self) -> None:
        async with self._lock:  # one waiter at a time keeps the order fair
            while True:
                now = time.monotonic()
                self._tokens = min(self._capacity, self._tokens + (now - self._stamp) * self._refill)
                self._stamp = now
                if self._tokens >= 1:
                    self._tokens -= 1
                    return
                await asyncio.sleep((1 - self._tokens) / self._refill)
