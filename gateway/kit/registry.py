"""Which plugin provides each source and sink name: what `collect()` finds and the config resolves against."""

from __future__ import annotations

from dataclasses import dataclass, field

from .sinks import Sink
from .sources import Source


@dataclass
class Registry:
    """Which plugin provides each source and sink name."""

    sources: dict[str, type[Source]] = field(default_factory=dict)
    sinks: dict[str, type[Sink]] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)
