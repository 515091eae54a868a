"""Hook specifications: the only contract between Declic and its plugins."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import pluggy

if TYPE_CHECKING:
    import click
    import jinja2

    from .config import Settings
    from .kit.clock import Clock
    from .kit.events import Event
    from .kit.sinks import Sink
    from .kit.sources import Source
    from .store import Database

hookspec = pluggy.HookspecMarker("declic")


class Gateway(Protocol):
    """The running deployment as `startup` and `register_routes` see it."""

    settings: Settings
    pm: pluggy.PluginManager
    clock: Clock
    db: Database
    sources: dict[str, Source]
    sinks: dict[str, Sink]
    env: jinja2.Environment


@hookspec
def register_sources(register: Callable[[type[Source]], None]) -> None:
    """Register Source classes by calling register(cls) for each."""


@hookspec
def register_sinks(register: Callable[[type[Sink]], None]) -> None:
    """Register Sink classes by calling register(cls) for each."""


@hookspec
def startup(gateway: Gateway) -> Awaitable[None] | None:
    """Run once when the gateway has started; may return an awaitable."""


@hookspec
def register_routes(gateway: Gateway) -> list[tuple[str, str, Callable[..., Any]]] | None:
    """Return (method, path, handler) tuples to add to the HTTP app."""


@hookspec
def prepare_jinja2_environment(env: jinja2.Environment) -> None:
    """Add filters, tests or globals to the sandboxed template environment."""


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add sub-commands to the `declic` command line."""


@hookspec
def event_received(event: Event) -> None:
    """Observe each canonical event after it is stored; must not change it."""
