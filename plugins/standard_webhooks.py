"""Standard Webhooks (standardwebhooks.com): any sender that signs `{id}.{timestamp}.{body}` with HMAC-SHA256.

The sender's event types are mapped to Declic's in the config (`events`), and who the event is about
is read from the JSON payload by dotted paths (`contact`), so one plugin serves any such sender.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from aiohttp import web
from pydantic import Field, SecretStr, field_validator

from declic_gateway import (
    CANONICAL_TYPES,
    BadRequest,
    ContactRef,
    Event,
    MalformedPayload,
    PluginConfig,
    RawCall,
    SignatureError,
    Source,
    hookimpl,
)

#: Seconds a webhook-timestamp may be away from our clock, either way (the reference libraries' 5 minutes).
TOLERANCE = 300
SECRET_PREFIX = "whsec_"
#: Svix, the spec's origin, sends the same scheme under `svix-*` header names.
HEADER_FAMILIES = ("webhook", "svix")
_TRACK_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,100}")
_DOTTED = re.compile(r"[^.\s]+(\.[^.\s]+)*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def decode_secret(secret: str) -> bytes:
    """`whsec_` + base64, as senders show it; padding may be left out. Raises ValueError."""
    text = secret.strip()
    if text.startswith(("whsk_", "whpk_")):
        raise ValueError("asymmetric (v1a) keys are not supported: use the sender's whsec_ signing secret")
    text = text.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except binascii.Error:
        raise ValueError("not base64 after `whsec_`: copy the signing secret exactly as the sender shows it") from None
    if not key:
        raise ValueError("empty secret")
    return key


def _check_path(path: str) -> str:
    if not _DOTTED.fullmatch(path):
        raise ValueError(f"not a dotted path: {path!r} (e.g. data.email)")
    return path


#: One dotted path, or alternatives tried in order (event types of one sender differ in shape).
Paths = str | list[str] | None


def _check_paths(value: Paths) -> Paths:
    for path in alternatives(value):
        _check_path(path)
    return value


def alternatives(value: Paths) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


class ContactPaths(PluginConfig):
    email: Paths = Field("data.email", description="Dotted path (or list of paths) to the e-mail address.")
    phone: Paths = Field("data.phone", description="Dotted path(s) to the phone number (E.164).")
    first_name: Paths = Field("data.first_name", description="Dotted path(s) to the first name.")
    last_name: Paths = Field("data.last_name", description="Dotted path(s) to the last name.")
    external_id: Paths = Field(None, description="Dotted path(s) to the sender's id for the person.")
    locale: Paths = Field(None, description="Dotted path(s) to the locale, e.g. fr-FR.")
    timezone: Paths = Field(None, description="Dotted path(s) to an IANA time zone.")
    attributes: dict[str, str] = Field(default_factory=dict, description="Contact attribute -> dotted path.")

    @field_validator("email", "phone", "first_name", "last_name", "external_id", "locale", "timezone")
    @classmethod
    def _dotted(cls, value: Paths) -> Paths:
        return _check_paths(value)

    @field_validator("attributes")
    @classmethod
    def _dotted_values(cls, value: dict[str, str]) -> dict[str, str]:
        return {name: _check_path(path) for name, path in value.items()}


class StandardWebhooksConfig(PluginConfig):
    secret: SecretStr | list[SecretStr] = Field(
        description="Signing secret (whsec_...), or a list of them while the sender rotates it."
    )
    events: dict[str, str] = Field(
        description="Sender's event type -> Declic event type. Keys: an exact type, `prefix.*`, or `*`; "
        "`{type}` in a track.* value is the sender's type (`'*': track.{type}`). Other types make no event."
    )
    type_field: str = Field("type", description="Dotted path to the event type in the JSON body.")
    contact: ContactPaths = Field(
        default_factory=ContactPaths,
        description="Dotted paths (or lists of them) to who the event is about: email, phone, first_name, "
        "last_name (default data.email, data.phone, data.first_name, data.last_name), external_id, locale, "
        "timezone, and attributes {name: path}.",
    )
    correlation: Paths = Field(
        None,
        description="Dotted path(s) to an id that ties events together; the first one present gives the "
        "key `SOURCE:VALUE`, placed before `sw:WEBHOOK-ID`.",
    )

    @field_validator("secret")
    @classmethod
    def _decodable(cls, value: SecretStr | list[SecretStr]) -> SecretStr | list[SecretStr]:
        secrets = value if isinstance(value, list) else [value]
        if not secrets:
            raise ValueError("give at least one secret")
        for secret in secrets:
            decode_secret(secret.get_secret_value())
        return value

    @field_validator("events")
    @classmethod
    def _known_targets(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("map at least one event type, e.g. {'*': 'track.{type}'}")
        for pattern, target in value.items():
            if not pattern or ("*" in pattern and pattern != "*" and not pattern.endswith(".*")):
                raise ValueError(f"{pattern!r}: use an exact type, `prefix.*` or `*`")
            if target.startswith("track."):
                known = _TRACK_NAME.fullmatch(target.replace("{type}", "x")) and target != "track."
            else:
                known = target in CANONICAL_TYPES
            if not known:
                raise ValueError(f"{pattern!r} -> {target!r}: not a Declic event type (canonical, or track.NAME)")
        return value

    @field_validator("type_field")
    @classmethod
    def _dotted(cls, value: str) -> str:
        return _check_path(value)

    @field_validator("correlation")
    @classmethod
    def _dotted_list(cls, value: Paths) -> Paths:
        return _check_paths(value)


class StandardWebhooks(Source):
    name = "standard_webhooks"
    Config = StandardWebhooksConfig

    def __init__(self, key: str, config: StandardWebhooksConfig, deployment: Any):
        super().__init__(key, config, deployment)
        secrets = config.secret if isinstance(config.secret, list) else [config.secret]
        self._keys = [decode_secret(s.get_secret_value()) for s in secrets]

    async def verify(self, request: web.Request, body: bytes) -> None:
        family = _family(request.headers)
        msg_id, stamp, signatures = (request.headers.get(f"{family}-{n}") for n in ("id", "timestamp", "signature"))
        if not signatures:
            raise SignatureError(f"missing {family}-signature header")
        if not msg_id:
            raise BadRequest(f"missing {family}-id header")
        if not stamp:
            raise BadRequest(f"missing {family}-timestamp header")
        if len(msg_id) > 255 or not msg_id.isprintable() or " " in msg_id:
            raise BadRequest(f"{family}-id is not an id (printable, no spaces, at most 255 characters)")
        seconds = self._fresh(family, stamp)
        signed = f"{msg_id}.{seconds}.".encode("utf-8", "surrogateescape") + body
        expected = [hmac.new(key, signed, hashlib.sha256).digest() for key in self._keys]
        if not any(hmac.compare_digest(given, e) for given in v1_signatures(signatures) for e in expected):
            raise SignatureError(f"no v1 signature in {family}-signature matches (check the signing secret)")
        if not body:
            raise BadRequest("empty body")

    def _fresh(self, family: str, stamp: str) -> int:
        """The timestamp, if within TOLERANCE of our clock: an old signed call cannot be replayed."""
        if not re.fullmatch(r"[0-9]{1,15}", stamp.strip()):
            raise BadRequest(f"{family}-timestamp is not a unix time in seconds")
        seconds = int(stamp)
        drift = seconds - self.deployment.clock.now().timestamp()
        if abs(drift) > TOLERANCE:
            way = "old" if drift < 0 else "new"
            raise SignatureError(f"{family}-timestamp is too {way} ({abs(drift):.0f}s away; check the clocks)")
        return seconds

    def dedupe_key(self, request: web.Request, body: bytes) -> str:
        family = _family(request.headers)
        return request.headers.get(f"{family}-id", "")

    def normalize(self, raw: RawCall) -> list[Event]:
        payload = load_json(raw.body)
        kind = dotted(payload, self.config.type_field)
        if not isinstance(kind, str) or not kind:
            raise MalformedPayload(f"no event type (a string) at {self.config.type_field!r}")
        target = self.target(kind)
        if target is None:
            return []  # a type the config does not map: acknowledged and kept, nothing to route
        webhook_id = raw.header("webhook-id", "svix-id") or f"inbox-{raw.id}"
        data = payload.get("data")
        return [
            Event(
                type=target,
                occurred_at=_when(payload.get("timestamp"), raw),
                contact=self.contact(kind, payload),
                properties=data if isinstance(data, dict) else payload,
                correlation=[*self.correlation(payload), f"sw:{webhook_id}"],
            )
        ]

    def target(self, kind: str) -> str | None:
        """Exact type first, then the longest matching `prefix.*`, then `*`."""
        events = self.config.events
        pattern = kind if kind in events else None
        if pattern is None:
            prefixes = [p for p in events if p.endswith(".*") and kind.startswith(p[:-1])]
            pattern = max(prefixes, key=len) if prefixes else ("*" if "*" in events else None)
        if pattern is None:
            return None
        target = events[pattern]
        if "{type}" in target:
            if not _TRACK_NAME.fullmatch(kind):
                raise MalformedPayload(f"event type {kind[:100]!r} cannot name a track event (A-Z a-z 0-9 _ . : -)")
            target = target.replace("{type}", kind)
        return target

    def contact(self, kind: str, payload: dict[str, Any]) -> ContactRef:
        paths = self.config.contact

        def at(choices: Paths) -> str | None:
            return next((t for p in alternatives(choices) if (t := _text(dotted(payload, p))) is not None), None)

        external_id = at(paths.external_id)
        ref = ContactRef(
            email=at(paths.email),
            phone=at(paths.phone),
            first_name=at(paths.first_name),
            last_name=at(paths.last_name),
            locale=at(paths.locale),
            timezone=_zone(at(paths.timezone)),
            external_ids={self.key: external_id} if external_id else {},
            attributes={
                name: value for name, path in paths.attributes.items() if (value := dotted(payload, path)) is not None
            },
        )
        if not (ref.email or ref.phone or ref.external_ids):
            tried = ", ".join(p for ps in (paths.email, paths.phone, paths.external_id) for p in alternatives(ps))
            raise MalformedPayload(
                f"{kind[:100]!r}: no e-mail, phone or external id in the payload (looked at: {tried or 'none'})"
            )
        return ref

    def correlation(self, payload: dict[str, Any]) -> list[str]:
        for path in alternatives(self.config.correlation):
            if (value := _text(dotted(payload, path))) is not None:
                return [f"{self.key}:{value}"]
        return []


def _family(headers: Any) -> str:
    """`webhook-*`, unless the call only carries the `svix-*` spelling."""
    return next((f for f in HEADER_FAMILIES if f"{f}-signature" in headers or f"{f}-id" in headers), "webhook")


def v1_signatures(header: str) -> Iterator[bytes]:
    """The decoded `v1,<base64>` entries of a space-separated signature list; others are skipped."""
    for entry in header.split():
        version, _, signature = entry.partition(",")
        if version != "v1" or not signature:
            continue
        try:
            yield base64.b64decode(signature, validate=True)
        except binascii.Error:
            continue


def load_json(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body, parse_float=Decimal, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MalformedPayload(f"body is not JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(payload, dict):
        raise MalformedPayload(f"expected a JSON object, got {type(payload).__name__}")
    return payload


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def dotted(payload: Any, path: str) -> Any:
    """`data.customer.email` or `data.items.0.id`; None when any step is missing."""
    value = payload
    for part in path.split("."):
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list) and part.isascii() and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


def _text(value: Any) -> str | None:
    """A string or an integer id as text; anything else (objects, booleans) is not an identity."""
    if isinstance(value, str):  # control characters are no name or address (and PostgreSQL refuses NUL)
        return (value.strip() or None) if not _CONTROL.search(value) else None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _zone(name: str | None) -> str | None:
    """Only a real IANA zone: a bad one would break quiet hours at send time."""
    if not name:
        return None
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return None
    return name


def _when(value: Any, raw: RawCall) -> datetime:
    """The payload's `timestamp` (when the event happened), else when the call arrived."""
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            return raw.received_at
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return raw.received_at


@hookimpl
def register_sources(register: Callable[[type[Source]], None]) -> None:
    register(StandardWebhooks)
