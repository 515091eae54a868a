"""Segment-compatible tracking endpoint for the deployment's own site: Segment's Tracking API.

It serves the API's paths under the source (`/hooks/site/v1/batch`, `/v1/track`... as the server
libraries post them; `/t`, `/p`, `/b`... as analytics.js does) and answers as Segment does:
`{"success": true}`. Authentication is Segment's: the write key as the HTTP Basic user, or as
`writeKey` in the body. The write key is public once it is in a page, so what it signs is not trusted
to move a known contact: only the optional secret key, sent as the Basic user by the site's servers,
may change a contact's e-mail, phone, devices or consent. Segment's server libraries also copy their
key into the body, so the secret key is taken out of the body before it is stored. Like the Tracking
API, a call over the size limits or not JSON answers 400; so does a single message that cannot be an
event (no `type`, no id, no event name). In a batch such a message is skipped and logged, as Segment
drops it, and the rest is kept. Pages of the origins in `allowed_origins` get CORS answers.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from collections.abc import Callable
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import structlog
from aiohttp import web
from pydantic import Field, SecretStr, field_validator, model_validator

from declic_gateway import (
    BadRequest,
    ConsentStatement,
    ContactRef,
    Event,
    MalformedPayload,
    PluginConfig,
    PushRef,
    RawCall,
    SignatureError,
    Source,
    hookimpl,
)

log = structlog.get_logger("declic.track")

#: The Tracking API's limits: 32 KB per message, 500 KB per batch.
MAX_MESSAGE_BYTES = 32 * 1024
MAX_BATCH_BYTES = 500 * 1024
MESSAGE_TYPES = frozenset({"track", "page", "identify", "screen", "group", "alias"})
#: The path under the source -> the call's type (None: a batch). The server libraries post to
#: `<host>/v1/batch`; analytics.js posts each call to `<apiHost>/<first letter of its type>`, batches
#: to `<apiHost>/b`. The bare `/hooks/NAME` takes either, the message's `type` saying which.
PATHS: dict[str, str | None] = {
    "v1/batch": None, "b": None,
    **{f"v1/{kind}": kind for kind in MESSAGE_TYPES}, **{kind[0]: kind for kind in MESSAGE_TYPES},
}  # fmt: skip
EVENT_TYPES = frozenset({"screen.viewed", "group.joined", "contact.aliased"})
DEFAULT_PORTS = {"http": 80, "https": 443}
#: Column sizes of the contact store; a longer identifier is refused, a longer trait dropped.
MAX_ID = 320
MAX_EVENT_NAME = 90
PUSH_TRAITS = ("webpush_subscription", "webpushSubscription")
CONSENT_TRAITS = ("consent", "consent_text_version", "consent_form")
CONTACT_TRAITS = {
    "email", "phone", "firstName", "first_name", "lastName", "last_name", "birthday", "id", *PUSH_TRAITS,
    *CONSENT_TRAITS,
}  # fmt: skip
#: What `traits.consent` may state for a channel: what a person does on a form.
STATED = ("granted", "withdrawn", "pending")
CHANNEL = re.compile(r"[a-z][a-z0-9_]{0,31}")
CONSENT_KEYS = frozenset({"state", "at", "text_version", "form"})
#: Start of the dedupe key of a call signed with the secret key. The inbox keeps the key, not the
#: Authorization header, so this is how normalize() knows: no key of a write-key call starts so.
SECRET_SIGNED = "secret-key:"
_SIGNER = web.RequestKey("declic_track_signer", str)
SECRET, WRITE = "secret key", "write key"
MIN_SECRET = 16


class TrackConfig(PluginConfig):
    write_key: SecretStr = Field(
        description="The write key senders present (Basic user or `writeKey`); public once used in a browser: "
        "what it signs may add ids, events and traits, not change a known contact's e-mail, phone or consent."
    )
    secret_key: SecretStr | None = Field(
        None,
        description="Optional server-side key, 16 characters or more, sent only as the HTTP Basic user by your "
        "servers (never in a page, never as `writeKey`): what it signs may change a contact's e-mail, phone, "
        "devices and consent.",
    )

    allowed_origins: list[str] = Field(
        [],
        description="Origins of the pages that call this source from a browser (analytics.js), e.g. "
        "`https://www.example.com`: they get CORS answers, so the page reads the answer instead of "
        "taking it for a network error and sending the call again. `*` allows every origin; none by default.",
        max_length=100,
    )

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        origins = []
        for given in value:
            origin = "*" if given == "*" else _origin(given)
            if origin is None:
                raise ValueError(f"{given[:100]!r} is not an origin: a scheme and a host, e.g. https://www.example.com")
            origins.append(origin)
        return origins

    @field_validator("secret_key")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_SECRET:
            raise ValueError(f"at least {MIN_SECRET} characters: a long random string (`openssl rand -hex 24`)")
        return value

    @model_validator(mode="after")
    def _keys_differ(self) -> TrackConfig:
        if self.secret_key is not None and hmac.compare_digest(
            self.secret_key.get_secret_value().encode(), self.write_key.get_secret_value().encode()
        ):
            raise ValueError("secret_key must differ from write_key, which any page's visitor can read")
        return self


def _origin(value: str) -> str | None:
    """`https://Shop.example:443/` -> `https://shop.example`, as a browser's `Origin` header has it."""
    try:
        parts = urlsplit(value.strip().removesuffix("/"))
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname or "@" in parts.netloc:
        return None
    if parts.path or parts.query or parts.fragment:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}" + ("" if port in (None, DEFAULT_PORTS[parts.scheme]) else f":{port}")


class Track(Source):
    name = "track"
    Config = TrackConfig
    event_types = EVENT_TYPES

    def url_token_matches(self, token: str | None) -> bool:
        """`/hooks/NAME` for any sender, `/hooks/NAME/v1/batch`, `/v1/track`... for Segment's server
        libraries, and `/hooks/NAME/t`, `/p`, `/i`, `/b`... for analytics.js."""
        return token is None or token in PATHS

    def cors_origin(self, origin: str) -> str | None:
        allowed = self.config.allowed_origins
        if "*" in allowed:
            return "*"
        return origin if origin in allowed else None

    async def verify(self, request: web.Request, body: bytes) -> None:
        basic_user = _basic_user(request.headers.get("Authorization", ""))
        signer = None if basic_user is None else self._signer(basic_user, in_body=False)
        data = _load(body, BadRequest)
        if signer is None:
            signer = self._signer(data.get("writeKey"), in_body=True)
        path = request.match_info.get("token")
        kind = check_path(data, path)
        check_call({"type": kind, **data} if kind else data, len(body))
        request[_SIGNER] = signer  # dedupe_key() marks the call with it: the header is not stored

    def stored_body(self, request: web.Request, body: bytes) -> bytes:
        """The body without the secret key (Segment's server libraries copy their key into it), and with
        the `type` that `/v1/track`... imply: the stored call is then a whole message on its own."""
        secret = self.config.secret_key
        if secret is not None:
            body = _without_secret(body, secret.get_secret_value())
        kind = PATHS.get(request.match_info.get("token") or "")
        if kind is not None and "type" not in _load(body, BadRequest):
            opening, _, rest = body.lstrip().partition(b"{")
            if opening:  # only a byte order mark can stand there
                raise BadRequest("send the body as UTF-8 JSON without a byte order mark")
            members = b"" if rest.lstrip().startswith(b"}") else b","
            body = b'{"type":' + json.dumps(kind).encode() + members + rest
        return body

    def acknowledge(self, status: str, inbox_id: int | None) -> web.StreamResponse:
        """Segment's own answer, which its libraries expect, saying whether the call was a redelivery."""
        return web.json_response({"success": True, "status": status})

    def _signer(self, given: object, in_body: bool) -> str:
        """Which key the caller presented: SECRET or WRITE; SignatureError for anything else."""
        if not isinstance(given, str) or not given:
            raise SignatureError("missing write key: send it as the HTTP Basic user or as `writeKey` in the body")
        presented = given.encode("utf-8", "replace")
        secret = self.config.secret_key
        if secret is not None and hmac.compare_digest(presented, secret.get_secret_value().encode()):
            if in_body:  # bodies are stored, and a body may come from a page: it must not carry the secret
                raise SignatureError("the secret key goes only in the Authorization header (HTTP Basic user)")
            return SECRET
        if not hmac.compare_digest(presented, self.config.write_key.get_secret_value().encode()):
            raise SignatureError("wrong write key")
        return WRITE

    def dedupe_key(self, request: web.Request, body: bytes) -> str:
        """The message's `messageId`; for a batch, a hash of its messageIds (events stay idempotent by id).

        A call verified with the secret key gets its key under SECRET_SIGNED: the mark normalize()
        reads back, and a namespace of its own, so that a browser sending a server's messageId first
        cannot make the server's call a duplicate.
        """
        key = self._message_key(request, body)
        return SECRET_SIGNED + key if request.get(_SIGNER) == SECRET else key

    def _message_key(self, request: web.Request, body: bytes) -> str:
        try:
            data = _load(body, ValueError)
            batch = data.get("batch")
            ids = sorted(message_id(item) for item in batch) if isinstance(batch, list) else [message_id(data)]
        except (ValueError, RecursionError):
            return super().dedupe_key(request, body)
        if isinstance(batch, list):
            return "batch:" + hashlib.sha256("\n".join(ids).encode("utf-8", "replace")).hexdigest()
        key = "message:" + ids[0]
        if len(key) > 200 or not key.isprintable():
            return "message-sha256:" + hashlib.sha256(key.encode("utf-8", "replace")).hexdigest()
        return key

    def normalize(self, raw: RawCall) -> list[Event]:
        """Events of the stored call; their contacts are trusted only when the secret key signed it."""
        data = _load(raw.body, MalformedPayload)
        events = []
        for index, message in enumerate(messages(data)):
            try:
                check_message(message, f"batch[{index}]." if "batch" in data else "")
            except BadRequest as exc:
                log.warning("message skipped", source=raw.source, inbox_id=raw.id, reason=exc.reason)
                continue
            handler = HANDLERS[message["type"]]
            try:
                events.append(handler(message, raw))
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise MalformedPayload(f"{message.get('type')}: {type(exc).__name__}: {exc}") from None
        return events


#: `"writeKey": "..."` as JSON writes it; its value is read back with json.loads, escapes and all.
_WRITE_KEY_MEMBER = re.compile(rb'"writeKey"\s*:\s*("(?:[^"\\]|\\.)*")')
REDACTED = b'"[secret key removed]"'


def _without_secret(body: bytes, secret: str) -> bytes:
    """Each `"writeKey": SECRET` becomes a placeholder; BadRequest if the secret is still there."""

    def blank(match: re.Match[bytes]) -> bytes:
        try:
            value = json.loads(match.group(1))
        except ValueError:
            return match.group(0)
        if value != secret:
            return match.group(0)
        return match.group(0)[: match.start(1) - match.start(0)] + REDACTED

    cleaned = _WRITE_KEY_MEMBER.sub(blank, body)
    if _load(cleaned, BadRequest).get("writeKey") == secret:  # a key spelt with escapes: not worth a parser
        raise BadRequest("the body carries the secret key in a form Declic cannot remove: send it as Basic user only")
    return cleaned


def _basic_user(header: str) -> str | None:
    """The Basic user (Segment leaves the password empty), or None when the call uses no Basic auth."""
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise SignatureError("the Authorization header is not Basic base64") from None
    return decoded.partition(":")[0]


def _load(body: bytes, error: type[Exception]) -> dict[str, Any]:
    try:
        data = json.loads(body, parse_float=Decimal)  # money stays exact
    except (ValueError, RecursionError) as exc:
        raise error(f"body is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise error(f"expected a JSON object, got {type(data).__name__}")
    return data


def messages(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The call's messages; a batch's own `context` and `sentAt` apply to each of its items."""
    if "batch" not in data:
        return [data]
    if not isinstance(data["batch"], list):
        raise MalformedPayload("`batch` is not a list")
    shared = _object(data.get("context"))
    return [
        {"sentAt": data.get("sentAt"), **item, "context": {**shared, **_object(item.get("context"))}}
        for item in data["batch"]
        if isinstance(item, dict)
    ]


def message_id(message: Any) -> str:
    """Segment's `messageId`, or a hash of the message when a sender left it out."""
    if isinstance(message, dict) and isinstance(message.get("messageId"), str | int) and message["messageId"] != "":
        return str(message["messageId"])
    return "sha256:" + hashlib.sha256(json.dumps(message, sort_keys=True, default=str).encode()).hexdigest()


# --- Checks made before anything is stored -------------------------------------------------


def check_path(data: dict[str, Any], path: str | None) -> str | None:
    """`/v1/batch` and `/b` take a batch, `/v1/track`, `/t`... one message of that type: its type."""
    if path is None:
        return None
    kind = PATHS[path]
    if kind is None and not isinstance(data.get("batch"), list):
        raise BadRequest(f'/{path} takes a batch: {{"batch": [messages]}}')
    if kind is not None and "batch" in data:
        raise BadRequest(f"/{path} takes one {kind} call; post batches to /v1/batch")
    if kind is not None and data.get("type", kind) != kind:
        raise BadRequest(f"/{path} takes {kind} calls, this one says type {data['type']!r}")
    return kind


def check_call(data: dict[str, Any], size: int) -> None:
    if "batch" not in data:
        if size > MAX_MESSAGE_BYTES:
            raise BadRequest(f"message is {size} bytes; the limit is {MAX_MESSAGE_BYTES} (32 KB)")
        check_message(data, "")
        return
    if size > MAX_BATCH_BYTES:
        raise BadRequest(f"batch is {size} bytes; the limit is {MAX_BATCH_BYTES} (500 KB)")
    if not isinstance(data["batch"], list):
        raise BadRequest("`batch` must be a list of messages")
    if data.get("sentAt") is not None and _instant(data["sentAt"]) is None:
        raise BadRequest("sentAt: not an ISO 8601 date-time")
    for index, item in enumerate(data["batch"]):
        if not isinstance(item, dict):
            raise BadRequest(f"batch[{index}] is not an object")
        if (item_size := _size(item)) > MAX_MESSAGE_BYTES:
            raise BadRequest(f"batch[{index}] is {item_size} bytes; the limit is {MAX_MESSAGE_BYTES} (32 KB)")


def _size(item: dict[str, Any]) -> int:
    try:
        return len(json.dumps(item, separators=(",", ":"), ensure_ascii=False, default=str).encode())
    except RecursionError:
        raise BadRequest("a message is nested too deeply") from None


def check_message(message: dict[str, Any], where: str) -> None:
    kind = message.get("type")
    if not isinstance(kind, str) or kind not in MESSAGE_TYPES:
        raise BadRequest(f"{where}type: expected one of {', '.join(sorted(MESSAGE_TYPES))}, got {kind!r}")
    ids = [_ident(message.get(key)) for key in ("userId", "anonymousId")]
    if not any(ids):
        raise BadRequest(f"{where}userId/anonymousId: a message needs one (a string of at most {MAX_ID} characters)")
    for key in ("properties", "traits", "context"):
        if message.get(key) is not None and not isinstance(message[key], dict):
            raise BadRequest(f"{where}{key}: expected an object")
    for key in ("timestamp", "originalTimestamp", "sentAt"):
        if message.get(key) is not None and _instant(message[key]) is None:
            raise BadRequest(f"{where}{key}: not an ISO 8601 date-time")
    if kind == "track" and not event_slug(message.get("event")):
        raise BadRequest(f"{where}event: a track call needs an event name (at most {MAX_EVENT_NAME} characters)")
    if kind == "group" and not _ident(message.get("groupId")):
        raise BadRequest(f"{where}groupId: a group call needs one (a string of at most {MAX_ID} characters)")
    if kind == "alias" and not (_ident(message.get("previousId")) and _ident(message.get("userId"))):
        raise BadRequest(f"{where}previousId/userId: an alias call needs both (strings of at most {MAX_ID} characters)")
    push = next((message["traits"][k] for k in PUSH_TRAITS if k in (message.get("traits") or {})), None)
    if push is not None:
        try:
            push_subscription(push)
        except ValueError as exc:
            raise BadRequest(f"{where}traits.webpush_subscription: {exc}") from None
    if kind == "identify" and (message.get("traits") or {}).get("consent") is not None:
        try:
            consent_traits(message["traits"]["consent"])
        except ValueError as exc:
            raise BadRequest(f"{where}traits.consent: {exc}") from None


def _ident(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    text = str(value)
    return text if 0 < len(text) <= MAX_ID and "\x00" not in text else None


def event_slug(name: Any) -> str | None:
    """Lower case, with anything but letters and digits as `_`: `Order Completed` -> `order_completed`."""
    if not isinstance(name, str):
        return None
    slug = re.sub(r"\W+", "_", name.strip().lower()).strip("_")
    return slug if 0 < len(slug) <= MAX_EVENT_NAME else None


def _instant(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _b64url(value: Any, size: int) -> bytes:
    if not isinstance(value, str):
        raise ValueError("keys.p256dh and keys.auth must be base64url strings")
    try:
        raw = base64.b64decode(value + "=" * (-len(value) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("keys.p256dh and keys.auth must be base64url strings") from None
    if len(raw) != size:
        raise ValueError(f"a key decodes to {len(raw)} bytes, expected {size}")
    return raw


def push_subscription(value: Any) -> dict[str, Any]:
    """A browser PushSubscription (`subscription.toJSON()`, or that JSON as a string), checked."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError("not a PushSubscription object") from None
    if not isinstance(value, dict) or not isinstance(value.get("keys"), dict):
        raise ValueError("expected {endpoint, keys: {p256dh, auth}}")
    endpoint = value.get("endpoint")
    try:
        parts = urlsplit(endpoint) if isinstance(endpoint, str) else None
        valid = parts is not None and parts.scheme == "https" and bool(parts.hostname)
        # Push services listen on 443. A page's visitor chooses this URL, and the webpush sink POSTs to it: another
        # port would let them aim Declic at whatever listens there on a public host (SMTP, Redis...).
        valid = valid and parts is not None and parts.port in (None, 443)
    except ValueError:
        valid = False
    if not valid:
        raise ValueError("endpoint must be an https URL on the default port")
    if _b64url(value["keys"].get("p256dh"), 65)[0] != 4:
        raise ValueError("keys.p256dh is not an uncompressed P-256 public key")
    _b64url(value["keys"].get("auth"), 16)
    keys = {"p256dh": value["keys"]["p256dh"], "auth": value["keys"]["auth"]}
    return {"endpoint": endpoint, "keys": keys, "expirationTime": value.get("expirationTime")}


def consent_traits(value: Any) -> dict[str, dict[str, Any]]:
    """identify's `traits.consent`, checked: channel -> `granted` or `{state, at, text_version, form}`."""
    if not isinstance(value, dict):
        raise ValueError("expected an object such as {email: granted, push: {state: granted, at: ...}}")
    statements = {}
    for channel, given in value.items():
        if not CHANNEL.fullmatch(channel):
            raise ValueError(f"{channel!r} is not a channel name (email, sms, push...)")
        spec = {"state": given} if isinstance(given, str) else given
        if not isinstance(spec, dict) or spec.get("state") not in STATED:
            raise ValueError(f"{channel}: expected {', '.join(STATED)}, or an object with `state`")
        if unknown := sorted(set(spec) - CONSENT_KEYS):
            raise ValueError(f"{channel}: unknown keys {', '.join(unknown)} (known: {', '.join(sorted(CONSENT_KEYS))})")
        if spec.get("at") is not None and _instant(spec["at"]) is None:
            raise ValueError(f"{channel}.at: not an ISO 8601 date-time")
        statements[channel] = spec
    return statements


# --- Messages -> events ---------------------------------------------------------------------


def _when(message: dict[str, Any], raw: RawCall) -> datetime:
    """When it happened by the sender's clock, never later than its arrival (browser clocks drift)."""
    for key in ("timestamp", "originalTimestamp", "sentAt"):
        if (moment := _instant(message.get(key))) is not None:
            return min(moment, raw.received_at)
    return raw.received_at


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: Any, limit: int) -> str | None:
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    text = str(value).strip()
    return text if 0 < len(text) <= limit and "\x00" not in text else None


def _matching(text: str | None, pattern: str) -> str | None:
    return text if text is not None and re.fullmatch(pattern, text) else None


def _birthday(value: Any) -> str | None:
    instant = _instant(value)
    if instant is not None:
        return instant.date().isoformat()
    try:
        return date.fromisoformat(str(value)[:10]).isoformat()
    except ValueError:
        return None


def _timezone(value: Any) -> str | None:
    if not isinstance(value, str) or not 0 < len(value) <= 64:
        return None
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        return None
    return value


def signed_with_secret(raw: RawCall) -> bool:
    """Whether the secret key signed the stored call, as its dedupe key says (see Track.dedupe_key)."""
    return raw.dedupe_key.startswith(SECRET_SIGNED)


def _contact(message: dict[str, Any], trusted: bool) -> ContactRef:
    """Who: the site's user id and the browser's anonymous id; what: identify's traits, or context.traits.

    Untrusted (write key): the core lets it name a contact and add ids and traits, not move a known one.
    """
    context = _object(message.get("context"))
    own = message.get("traits") if message.get("type") != "group" else None  # a group's traits are the group's
    traits = {**_object(context.get("traits")), **_object(own)}
    ids = {}
    if user_id := _ident(message.get("userId")):
        ids["site"] = user_id
    if anonymous_id := _ident(message.get("anonymousId")):
        ids["site_anonymous"] = anonymous_id  # sorts after "site": a known user wins over a shared browser
    attributes = {k: v for k, v in traits.items() if k not in CONTACT_TRAITS}
    if (birthday := _birthday(traits.get("birthday"))) is not None:
        attributes["birthday"] = birthday
    return ContactRef(
        email=_matching(_text(traits.get("email"), 320), r"[^@\s]+@[^@\s]+"),
        phone=_matching(_text(traits.get("phone"), 40), r"\+?[0-9][0-9 ().-]{5,}"),
        first_name=_text(traits.get("firstName", traits.get("first_name")), 200),
        last_name=_text(traits.get("lastName", traits.get("last_name")), 200),
        locale=_text(context.get("locale"), 35),
        timezone=_timezone(context.get("timezone")),
        external_ids=ids,
        attributes=attributes,
        trusted=trusted,
    )


def _event(kind: str, message: dict[str, Any], raw: RawCall, properties: dict[str, Any]) -> Event:
    mid = message_id(message)
    return Event(
        type=kind,
        occurred_at=_when(message, raw),
        contact=_contact(message, signed_with_secret(raw)),
        correlation=[f"track:{mid}"],
        properties={**properties, "message_id": mid, "user_id": _ident(message.get("userId"))},
    )


def track_event(message: dict[str, Any], raw: RawCall) -> Event:
    """Every named event is `track.<name>`, e-commerce names included: the shop's own webhooks, which
    a browser cannot forge, stay the only source of order.* and checkout.* events."""
    slug = event_slug(message.get("event"))
    if slug is None:
        raise ValueError("a track call needs an event name")
    return _event(f"track.{slug}", message, raw, {"event": message["event"], **_object(message.get("properties"))})


def page_event(message: dict[str, Any], raw: RawCall) -> Event:
    properties = dict(_object(message.get("properties")))
    page = _object(_object(message.get("context")).get("page"))
    for key in ("url", "path", "title", "referrer", "search"):
        properties[key] = properties.get(key, page.get(key))
    properties["name"] = message.get("name", properties.get("name"))
    properties["category"] = message.get("category", properties.get("category"))
    return _event("page.viewed", message, raw, properties)


def identify_event(message: dict[str, Any], raw: RawCall) -> Event:
    """Traits update the contact; a browser's push subscription is added to the contact's devices, and
    `traits.consent` states the person's consent per channel, with what shows it."""
    traits = _object(message.get("traits"))
    event = _event("profile.updated", message, raw, {})
    update: dict[str, Any] = {"consent": consent_statements(message, raw)}
    push = next((traits[k] for k in PUSH_TRAITS if k in traits), None)
    if push is not None:
        device = push_subscription(push)
        update["push_subscriptions"] = [PushRef(kind="webpush", address=device["endpoint"], keys=device["keys"])]
    return event.model_copy(update={"contact": event.contact.model_copy(update=update)})


def consent_statements(message: dict[str, Any], raw: RawCall) -> dict[str, ConsentStatement]:
    """What the person did on the site's form: an action per channel, dated, with its evidence."""
    traits = _object(message.get("traits"))
    if traits.get("consent") is None:
        return {}
    trusted = signed_with_secret(raw)
    seen = _evidence(message, raw, trusted)
    statements = {}
    for channel, spec in consent_traits(traits["consent"]).items():
        evidence = dict(seen)
        for key in ("text_version", "form"):
            if (value := _text(spec.get(key, traits.get(f"consent_{key}")), 200)) is not None:
                evidence[key] = value
        if evidence:  # nothing shown stays nothing: the core refuses a public key's grant without evidence
            evidence["signed_with"] = SECRET if trusted else WRITE
        stated_at = _stated_at(message, spec, raw) if trusted else raw.received_at
        statements[channel] = ConsentStatement(state=spec["state"], stated_at=stated_at, action=True, evidence=evidence)
    return statements


def _stated_at(message: dict[str, Any], spec: dict[str, Any], raw: RawCall) -> datetime | None:
    """The server's time for the statement, never after its arrival: a statement dated in the future
    would outrank every later one, the unsubscribe link's included. A browser's clock is not asked."""
    for value in (spec.get("at"), message.get("timestamp"), message.get("originalTimestamp")):
        if (moment := _instant(value)) is not None:
            return min(moment, raw.received_at)
    return None


def _evidence(message: dict[str, Any], raw: RawCall, trusted: bool) -> dict[str, Any]:
    """Who stated it: the caller's IP, and for a server library the visitor's IP it reports; the
    browser's user agent (a server library's own is no evidence); the page of the form."""
    context = _object(message.get("context"))
    user_agent = _text(context.get("userAgent"), 512)
    found = {
        "ip": raw.peer_address,
        "visitor_ip": _text(context.get("ip"), 64) if trusted else None,  # a browser's own claim adds nothing
        "user_agent": user_agent if trusted else user_agent or _text(raw.header("User-Agent"), 512),
        "page_url": _text(_object(context.get("page")).get("url"), 2048),
    }
    return {key: value for key, value in found.items() if value is not None}


def screen_event(message: dict[str, Any], raw: RawCall) -> Event:
    """A mobile app's page view: the screen's `name` and `category`, and its properties."""
    properties = dict(_object(message.get("properties")))
    properties["name"] = message.get("name", properties.get("name"))
    properties["category"] = message.get("category", properties.get("category"))
    return _event("screen.viewed", message, raw, properties)


def group_event(message: dict[str, Any], raw: RawCall) -> Event:
    """The person belongs to a group (a company, an account): the group's traits stay on the event."""
    properties = {"group_id": str(message["groupId"]), "traits": _object(message.get("traits"))}
    return _event("group.joined", message, raw, properties)


def alias_event(message: dict[str, Any], raw: RawCall) -> Event:
    """`previousId` (the visitor's anonymous id before sign-up) becomes one of the user's ids: the core
    folds the anonymous record that holds it into the user's contact, never a record that shows a person."""
    previous = str(message["previousId"])
    event = _event("contact.aliased", message, raw, {"previous_id": previous})
    contact = event.contact.model_copy(update={"previous_ids": {"site_anonymous": previous}})
    return event.model_copy(update={"contact": contact})


HANDLERS: dict[str, Callable[[dict[str, Any], RawCall], Event]] = {
    "track": track_event,
    "page": page_event,
    "identify": identify_event,
    "screen": screen_event,
    "group": group_event,
    "alias": alias_event,
}


@hookimpl
def register_sources(register: Callable[[type[Source]], None]) -> None:
    register(Track)
