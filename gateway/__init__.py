"""Declic: what a plugin author imports."""

from __future__ import annotations

import pluggy

from .errors import BadRequest, ConfigError, DeclicError, MalformedPayload, SignatureError
from .events import ContactRef, Event
from .sinks import DeliveryResult, Message, Outcome, SendContext, Sink
from .sources import Deployment, PluginConfig, RawCall, Source

hookimpl = pluggy.HookimplMarker("declic")

__all__ = [
    "BadRequest",
    "ConfigError",
    "ContactRef",
    "DeclicError",
    "DeliveryResult",
    "Deployment",
    "Event",
    "MalformedPayload",
    "Message",
    "Outcome",
    "PluginConfig",
    "RawCall",
    "SendContext",
    "SignatureError",
    "Sink",
    "Source",
    "hookimpl",
]
