"""Declic: what a plugin author imports."""

from __future__ import annotations

import pluggy

from .errors import BadRequest, ConfigError, DeclicError, MalformedPayload, RetryLater, SignatureError
from .kit.events import ContactRef, Event, PushRef
from .kit.polling import Fetched, PollingSource
from .kit.sinks import DeliveryResult, Message, Outcome, SendContext, Sink, SinkConfig
from .kit.sources import ConfigPath, Deployment, PluginConfig, RawCall, Source

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
