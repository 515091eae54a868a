"""The running deployment that build_gateway() assembles, and the key handlers find it under."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Literal

import jinja2
import pluggy
from aiohttp import web

from ..config import Settings
from ..insight.metrics import Metrics
from ..jobs.worker import Worker
from ..kit.clock import Clock
from ..kit.sinks import Sink
from ..kit.sources import Source
from ..pipeline.router import Router
from ..send import links
from ..store import Database
from ..store.inbox import GroupCommitter

Role = Literal["web", "worker", "all"]
#: What a 503 asks the caller to wait, in seconds, when storage is unavailable.
RETRY_AFTER_SECONDS = "5"


@dataclass
class RunningGateway:
    """One running deployment, as build_gateway() made it; plugins see it through `declic_gateway.Gateway`."""

    settings: Settings
    pm: pluggy.PluginManager
    clock: Clock
    db: Database
    sources: dict[str, Source]
    sinks: dict[str, Sink]
    env: jinja2.Environment
    router: Router
    committer: GroupCommitter
    worker: Worker
    metrics: Metrics
    role: Role = "all"
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    #: Why the worker is down (it died and waits to be restarted); None while it runs.
    worker_down: str | None = None
    _link_secret: bytes | None = None

    async def link_secret(self) -> bytes:
        """The key of the links in messages, read once: it never changes. Raises StorageUnavailable."""
        if self._link_secret is None:
            self._link_secret = await self.db.run(links.link_secret)
        return self._link_secret

    def plugins(self) -> list[Source | Sink]:
        """The configured source and sink instances."""
        return [*self.sources.values(), *self.sinks.values()]


GATEWAY_KEY: web.AppKey[RunningGateway] = web.AppKey("gateway")
