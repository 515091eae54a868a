"""Declic: what a plugin author imports."""

from __future__ import annotations

import pluggy

from .errors import BadRequest, ConfigError, DeclicError, MalformedPayload, RetryLater, SignatureError
from .events import ContactRef, Event, PushRef
from .polling import Fetched, PollingSource
from .sinks import DeliveryResult, Message, Outcome, SendContext, Sink, SinkConfig
from .sources import ConfigPath, Deployment, PluginConfig, RawCall, Source

hookimpl = pluggy.HookimplMarker("declic")

__all__ = [
    "BadRequest",
    "ConfigError",
    "ConfigPath",
    "ContactRef",
    "DeclicError",
    "DeliveryResult",
    "Deployment",
    "Event",
    "Fetched",
    "MalformedPayload",
    "Message",
    "Outcome",
    "PluginConfig",
    "PollingSource",
    "PushRef",
    "RawCall",
    "RetryLater",
    "SendContext",
    "SignatureError",
    "Sink",
    "SinkConfig",
    "Source",
    "hookimpl",
]
