"""Per-sink limits: how many sends at once, and how many per period (a token bucket)."""

from __future__ import annotations

import asyncio
import re
import time
from collections import deque
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
    """`async with limiter:` waits for a free slot and, when a rate is set, for a token. It keeps how many wait, since
    when, and the sink's pace, for the worker to see when steps for it would wait long (jobs/backlog.py)."""

    def __init__(self, concurrency: int, rate: str | None = None):
        self.concurrency = concurrency
        self._slots = asyncio.Semaphore(concurrency)
        self._capacity, self._period = parse_rate(rate) if rate else (0, timedelta(seconds=1))
        self._refill = self._capacity / self._period.total_seconds() if self._capacity else 0.0
        self._tokens = float(self._capacity)
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()
        self._shared: Callable[[int, timedelta], Awaitable[float]] | None = None
        self._waiting: deque[float] = deque()  # when each caller still waiting came, oldest first
        self._granted = 0.0  # when the last caller got through
        #: Seconds between callers getting through while others wait (an average): how fast the sink takes what
        #: waits for it, whatever holds it (its concurrency, its rate, the provider's speed). None until seen.
        self.pace: float | None = None

    def backed_up(self, now: float, longer_than: float) -> bool:
        """Whether as many callers wait as the sink takes at once, the first for longer than `longer_than`."""
        return len(self._waiting) >= self.concurrency and now - self._waiting[0] > longer_than

    def clears_in(self, guess: float) -> float:
        """Seconds before the callers waiting now are through, at the sink's pace (`guess` until it is known)."""
        return len(self._waiting) * (self.pace or guess)

    def share(self, reserve: Callable[[int, timedelta], Awaitable[float]]) -> None:
        """Keep the rate together with other processes: `reserve(count, period)` takes a slot in a
        schedule they share and answers the seconds to wait for it (replicas: store/sinkrates.py)."""
        self._shared = reserve

    async def __aenter__(self) -> None:
        await self.enter()

    async def enter(self, leave_after: float | None = None) -> bool:
        """Wait for a slot and, with a rate, a token, as `async with` does; `leave()` gives the slot back. With
        `leave_after`, False instead (no slot held) when after that many seconds the caller is still not among the
        first `concurrency` in line: the sink, slow or hung until its timeout, would not take it soon, and the
        caller holds something other sinks' mail needs (a worker slot)."""
        came = time.monotonic()
        self._waiting.append(came)
        try:
            if leave_after is None or not self._slots.locked():
                await self._through()
            elif not await self._through_unless_behind(came, leave_after):
                return False
        finally:
            self._waiting.remove(came)
        now = time.monotonic()
        if came < self._granted:  # it waited behind the one before: the gap is the sink's pace
            gap = now - self._granted
            self.pace = gap if self.pace is None else 0.8 * self.pace + 0.2 * gap
        self._granted = now
        return True

    def leave(self) -> None:
        """Give back the slot `enter` took."""
        self._slots.release()

    async def _through_unless_behind(self, came: float, seconds: float) -> bool:
        """`_through()`, checking every `seconds` where the caller stands in line: the wait goes on (in its place:
        a task, not cancelled and started again at the back) while it is among the first `concurrency`."""
        through = asyncio.ensure_future(self._through())
        try:
            while not (await asyncio.wait({through}, timeout=seconds))[0]:
                if self._waiting.index(came) >= self.concurrency:
                    await _abandon(through, self._slots)
                    return False
            through.result()
            return True
        except BaseException:
            await _abandon(through, self._slots)
            raise

    async def _through(self) -> None:
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
        self.leave()

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


async def _abandon(through: asyncio.Future[None], slots: asyncio.Semaphore) -> None:
    """Stop waiting for a slot; one taken meanwhile is given back (a wait that failed gave its own back)."""
    through.cancel()  # nothing, when it is done
    try:
        await through
    except BaseException:  # cancelled, or failed on its own
        return
    slots.release()  # it got through as it was given up
