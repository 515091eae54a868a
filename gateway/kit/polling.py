"""The contract of sources Declic asks on a timer, for providers that never call (Mailchimp campaign reports)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from .sources import Source


@dataclass(frozen=True)
class Fetched:
    """What one poll brought: items as (provider id, JSON body), and where the next poll resumes."""

    items: list[tuple[str, bytes]] = field(default_factory=list)
    cursor: str | None = None


class PollingSource(Source):
    """Subclass, implement `poll`, and `normalize` each stored item like a webhook body.

    `poll` raises `RetryLater` on 429 and 5xx: the poll is tried again after the delay,
    and never stops for good.
    """

    #: How often to poll; plugins usually read it from their config.
    interval: timedelta = timedelta(minutes=5)

    def url_token_matches(self, token: str | None) -> bool:
        """Polled, never called: a POST to its hook answers 404, so nobody can inject forged activity."""
        return False

    async def poll(self, cursor: str | None, now: datetime) -> Fetched:
        raise NotImplementedError
