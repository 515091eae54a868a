"""The Source contract: verify a webhook call, then turn its stored bytes into Events."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationInfo

from .clock import Clock
from .events import ContactRef, Event

if TYPE_CHECKING:
    from aiohttp import web


class PluginConfig(BaseModel):
    """Base for every plugin's `Config`: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


def _from_config_folder(value: Any, info: ValidationInfo) -> Any:
    if not isinstance(value, str) or not value:
        return value  # the field's own type check answers
    path = Path(value).expanduser()
    folder = (info.context or {}).get("config_dir")
    return str(path if path.is_absolute() or folder is None else Path(folder) / path)


#: A file named in the config: a relative path is read from the config file's folder, not the working
#: directory, so `declic serve --config /etc/declic/declic.yaml` finds it wherever it is started.
ConfigPath = Annotated[str, BeforeValidator(_from_config_folder)]


@dataclass(frozen=True)
class Deployment:
    """What a plugin may know about the deployment it runs in."""

    public_url: str | None
    timezone: str
    clock: Clock


#: The caller's address as the connection showed it, stored among the call's headers; a caller
#: cannot set it (a request header of that name is replaced).
PEER_HEADER = "X-Declic-Peer-Address"


@dataclass(frozen=True)
class RawCall:
    """A stored webhook call, as the inbox keeps it."""

    id: int
    source: str
    received_at: datetime
    headers: dict[str, str]
    body: bytes
    #: The provider's id for this call (its delivery id, or a digest of the body): evidence for an auditor.
    dedupe_key: str = ""
    #: Lower-cased header names, so lookups need not care about HTTP/2 spelling.
    lower_headers: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "lower_headers", {k.lower(): v for k, v in self.headers.items()})

    @property
    def peer_address(self) -> str | None:
        """The IP address the call came from (before any proxy's X-Forwarded-For)."""
        return self.header(PEER_HEADER)

    def header(self, *names: str) -> str | None:
        for name in names:
            if (value := self.lower_headers.get(name.lower())) is not None:
                return value
        return None


class Source:
    """A provider that calls Declic's webhooks. Subclass, set `name` and `Config`, register."""

    name: ClassVar[str]
    Config: ClassVar[type[PluginConfig]] = PluginConfig
    #: Event types this source emits beyond the canonical ones.
    event_types: ClassVar[frozenset[str]] = frozenset()
    #: A provider that signs nothing is served at /hooks/NAME/TOKEN instead, its Config
    #: having a `url_token` secret; a wrong or missing token answers 404, like an unknown source.
    needs_url_token: ClassVar[bool] = False
    #: A provider whose batches are larger than `limits.max_body_bytes` (Mandrill) raises the limit for itself.
    max_body_bytes: ClassVar[int | None] = None

    def __init__(self, key: str, config: Any, deployment: Deployment):
        self.key = key  # the name under `sources:`, which is also the URL path segment
        self.config = config
        self.deployment = deployment

    def url_token_matches(self, token: str | None) -> bool:
        if not self.needs_url_token:
            return token is None
        expected = self.config.url_token.get_secret_value()
        return token is not None and hmac.compare_digest(token.encode(), expected.encode())

    async def ping(self, request: web.Request) -> web.StreamResponse | None:
        """Answer a provider's GET or HEAD validation request; None means 405."""
        return None

    def cors_origin(self, origin: str) -> str | None:
        """The `Access-Control-Allow-Origin` a page at `origin` gets (itself, or `*`); None: no CORS.

        Browsers send a source's calls from the deployment's own pages (analytics.js); the answer
        only tells the page whether its call was taken, the source's own verify() still decides that.
        """
        return None

    def stored_body(self, request: web.Request, body: bytes) -> bytes:
        """What the inbox keeps of a verified call: its body, unless the source must leave a secret out."""
        return body

    def acknowledge(self, status: str, inbox_id: int | None) -> web.StreamResponse | None:
        """The 200 the provider gets once the call is stored ("accepted" or "duplicate"); None: Declic's JSON."""
        return None

    async def start(self) -> None:
        """Open what the source needs (an HTTP session for enrichment calls)."""

    async def close(self) -> None:
        """Release what start() opened."""

    async def verify(self, request: web.Request, body: bytes) -> None:
        """Raise SignatureError (401) or BadRequest (400); return to accept the call."""

    def dedupe_key(self, request: web.Request, body: bytes) -> str:
        """The provider's own id for this delivery; redeliveries must give the same key."""
        return "sha256:" + hashlib.sha256(body).hexdigest()

    def about(self, raw: RawCall) -> list[ContactRef] | None:
        """Who a stored call is about, read from its bytes alone (no provider call); None: cannot tell.

        Asked when normalize raised RetryLater: while the call waits for its retry, only these
        contacts' messages wait for it, not everyone's (up to `worker.ordering_timeout`).
        A source whose normalize never fetches anything need not say.
        """
        return None

    def normalize(self, raw: RawCall) -> list[Event] | Awaitable[list[Event]]:
        """Turn a stored call into events, after the acknowledgement; may be `async def`.

        Raise MalformedPayload when the body is wrong (the call is marked failed, replayable),
        RetryLater when a provider call it needs fails for now (retried with backoff, then
        dead-lettered with the provider's error).
        """
        raise NotImplementedError
