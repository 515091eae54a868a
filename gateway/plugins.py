"""Plugin loading: blocked list -> `declic` entry points -> checks -> registries."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pluggy
import structlog

from . import hookspecs
from .kit.events import Event
from .kit.registry import Registry
from .kit.sinks import Sink
from .kit.sources import Source

ENTRY_POINT_GROUP = "declic"
#: Declic's own distribution: what `pip install` names, and what plugins depend on.
DISTRIBUTION = "declic-gateway"
#: Comma-separated plugin names not to load, e.g. to rule out a broken community plugin.
BLOCK_ENV = "DECLIC_BLOCK_PLUGINS"


def get_plugin_manager(
    *, load_entry_points: bool = True, extra: Iterable[object] = (), builtin_only: bool = False
) -> pluggy.PluginManager:
    """Blocked names first, then installed plugins (`builtin_only`: Declic's own), then `extra`
    (tests, embedding), then checks."""
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    for name in filter(None, (n.strip() for n in os.environ.get(BLOCK_ENV, "").split(","))):
        pm.set_blocked(name)
    if load_entry_points and builtin_only:
        _load_builtin(pm)
    elif load_entry_points:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    for plugin in extra:
        pm.register(plugin)
    pm.check_pending()  # a misspelt hook implementation fails here, not silently later
    return pm


def _load_builtin(pm: pluggy.PluginManager) -> None:
    """The plugins Declic's own distribution declares, whatever else is installed beside it
    (the config reference and schema in docs/ describe Declic, not one machine's plugins)."""
    own = metadata.distribution(DISTRIBUTION)
    for entry in own.entry_points.select(group=ENTRY_POINT_GROUP):
        if not pm.is_blocked(entry.name):
            pm.register(entry.load(), name=entry.name)


def collect(pm: pluggy.PluginManager) -> Registry:
    """Call each plugin's register_* hook with a callback that records who registered what."""
    registry = Registry()

    def registrar(plugin_name: str, kind: str, base: type, table: dict[str, Any]) -> Callable[[Any], None]:
        def register(cls: Any) -> None:
            if not (isinstance(cls, type) and issubclass(cls, base)):
                raise TypeError(f"plugin {plugin_name} registered {cls!r}, not a {base.__name__}")
            name: str = getattr(cls, "name", "")
            if name in table:
                raise ValueError(
                    f"{kind} {name!r} registered by {plugin_name} and by {registry.origin[f'{kind}:{name}']}"
                )
            table[name] = cls
            registry.origin[f"{kind}:{name}"] = plugin_name

        return register

    for impl in pm.hook.register_sources.get_hookimpls():
        impl.function(register=registrar(impl.plugin_name, "source", Source, registry.sources))
    for impl in pm.hook.register_sinks.get_hookimpls():
        impl.function(register=registrar(impl.plugin_name, "sink", Sink, registry.sinks))
    return registry


def notify_event_received(pm: pluggy.PluginManager, event: Event) -> None:
    """Tell observers about an event; an observer that fails never stops the flow."""
    try:
        pm.hook.event_received(event=event)
    except Exception:
        structlog.get_logger("declic.plugins").exception("event_received hook failed", event_id=event.id)


@dataclass(frozen=True)
class PluginInfo:
    name: str
    version: str | None
    distribution: str | None
    hooks: list[str]


def describe(pm: pluggy.PluginManager) -> list[PluginInfo]:
    """Every loaded plugin with its distribution, version and implemented hooks."""
    dists = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    infos = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        dist: Any = dists.get(id(plugin))
        hooks = sorted(c.name for c in pm.get_hookcallers(plugin) or [])
        infos.append(
            PluginInfo(
                name=name,
                version=dist.version if dist else None,
                distribution=dist.metadata["Name"] if dist else None,
                hooks=hooks,
            )
        )
    return sorted(infos, key=lambda info: info.name)


def plugin_set(pm: pluggy.PluginManager) -> dict[str, str]:
    """The plugins loaded from `declic` entry points: name -> "distribution version" (replicas compare these)."""
    return {
        pm.get_name(plugin) or "?": f"{dist.metadata['Name']} {dist.version}"
        for plugin, dist in pm.list_plugin_distinfo()
    }
