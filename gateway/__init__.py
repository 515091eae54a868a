"""Declic: what a plugin author imports."""

from __future__ import annotations

import pluggy

from .errors import (
    BadRequest,
    ConfigError,
    DeclicError,
    InvalidAddress,
    MalformedPayload,
    RetryLater,
    SignatureError,
)
from .hookspecs import Gateway
from .kit.addresses import EmailAddress, parse_email
from .kit.clock import Clock
from .kit.durations import Duration
from .kit.events import CANONICAL_TYPES, ConsentState, ConsentStatement, ContactRef, Event, PushRef
from .kit.limits import SendLimiter
from .kit.machines import machine_reasons
from .kit.net import ForbiddenAddress, GuardedClient, api_client, retry_after
from .kit.polling import Fetched, PollingSource
from .kit.sinks import (
    DELIVERY_METADATA,
    DeliveryResult,
    EmailSinkConfig,
    Message,
    Outcome,
    SendContext,
    Sink,
    SinkConfig,
    TrackSpec,
)
from .kit.sources import ConfigPath, Deployment, PluginConfig, RawCall, Source
from .kit.templating import make_environment

hookimpl = pluggy.HookimplMarker("declic")

__all__ = [
    "CANONICAL_TYPES",
    "DELIVERY_METADATA",
    "BadRequest",
    "Clock",
    "ConfigError",
    "ConfigPath",
    "ConsentState",
    "ConsentStatement",
    "ContactRef",
    "DeclicError",
    "DeliveryResult",
    "Deployment",
    "Duration",
    "EmailAddress",
    "EmailSinkConfig",
    "Event",
    "Fetched",
    "ForbiddenAddress",
    "Gateway",
    "GuardedClient",
    "InvalidAddress",
    "MalformedPayload",
    "Message",
    "Outcome",
    "PluginConfig",
    "PollingSource",
    "PushRef",
    "RawCall",
    "RetryLater",
    "SendContext",
    "SendLimiter",
    "SignatureError",
    "Sink",
    "SinkConfig",
    "Source",
    "TrackSpec",
    "api_client",
    "hookimpl",
    "machine_reasons",
    "make_environment",
    "parse_email",
    "retry_after",
]
