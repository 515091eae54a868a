"""The running deployment that build_gateway() assembles, and the key handlers find it under."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Literal

import jinja2
import pluggy
from aiohttp import web

from .clock import Clock
from .config import Settings
from .inbox import GroupCommitter
from .router import Router
from .sinks import Sink
from .sources import Source
from .store import Database
from .worker import Worker

Role = Literal["web", "worker", "all"]
#: What a 503 asks the caller to wait, in seconds, when storage is unavailable.
RETRY_AFTER_SECONDS = "5"


@dataclass
class RunningGateway:
    """One running deployment, as build_gateway() made it; plugins see it through `gateway.Gateway`."""

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
    role: Role = "all"
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def plugins(self) -> list[Source | Sink]:
        """The configured source and sink instances."""
        return [*self.sources.values(), *self.sinks.values()]


GATEWAY_KEY: web.AppKey[RunningGateway] = web.AppKey("gateway")
