"""Steps for a sink that will not take them soon go back to the queue unprepared.

A step waiting for its sink (kit/limits.py) holds a worker slot. Without this, a slow sink's backlog took every
slot, and the other sinks' mail waited behind it: an order confirmation by SMTP was mailed 10 s late behind a CRM
webhook answering in 1 s. A claimed step whose sinks all have as many steps waiting as they take at once, the first
for longer than `worker.sink_wait`, goes back to the queue for about when its turn would come, its
attempt not spent; the claim, in due order, takes other work first. Those still waiting keep the sink busy. A step
already waiting, still behind the first `concurrency` in line after that wait (the slots all taken before the
line showed, a sink hung until its timeout), leaves the line the same way (send/delivery.py, `call_sink`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from ..kit.limits import SendLimiter
from ..kit.sinks import Sink


class Backlogs:
    """The sinks' lines in this process, as their limiters see them."""

    def __init__(self, sinks: Mapping[str, Sink], longest: float) -> None:
        self._sinks, self._longest = sinks, longest
        #: By sink: when the last step sent back gets its turn (time.monotonic()), so that those sent back one
        #: after the other come back one after the other, not all at once to be sent back again.
        self._line: dict[str, float] = {}

    def turn(self, vias: Sequence[str]) -> tuple[str, float] | None:
        """The sink a step for `vias` (its `send.via`) waits for and the seconds before its turn there; None when
        one of them would take it soon (or none is known)."""
        now = time.monotonic()
        limiters = [(via, self._sinks[via].limiter) for via in vias if via in self._sinks]
        if not limiters or not all(limiter.backed_up(now, self._longest) for _, limiter in limiters):
            return None
        turns = {via: self._turn(via, limiter, now) for via, limiter in limiters}
        via = min(turns, key=turns.__getitem__)
        return via, self.take_turn(via, now)

    def take_turn(self, via: str, now: float | None = None) -> float:
        """Seconds before a step sent back for sink `via` gets its turn there, that turn taken: the next one sent
        back comes after it."""
        now = time.monotonic() if now is None else now
        limiter = self._sinks[via].limiter
        turn = self._turn(via, limiter, now)
        self._line[via] = turn + (limiter.pace or self._longest)
        return turn - now

    def _turn(self, via: str, limiter: SendLimiter, now: float) -> float:
        return max(self._line.get(via, now), now + limiter.clears_in(self._longest))
