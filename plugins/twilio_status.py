"""Twilio message status callbacks and inbound replies: X-Twilio-Signature, delivery feedback, STOP/START."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections.abc import Callable, Iterable
from datetime import datetime
from urllib.parse import parse_qs, parse_qsl, urlsplit

from aiohttp import web
from pydantic import Field, SecretStr

from declic_gateway import (
    BadRequest,
    ConfigError,
    ConsentState,
    ConsentStatement,
    ContactRef,
    Event,
    MalformedPayload,
    PluginConfig,
    RawCall,
    SignatureError,
    Source,
    hookimpl,
)

#: Twilio's default opt-out keywords, plus OPTOUT and REVOKE: on a plain refusal, withdrawing is the safe
#: side. A reply is a keyword only when it is the whole body, in any case, as Twilio matches them.
OPT_OUT = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "OPTOUT", "REVOKE"})
OPT_IN = frozenset({"START", "UNSTOP", "YES"})
#: "Attempt to send to unsubscribed recipient": the person replied STOP before, perhaps to another webhook.
UNSUBSCRIBED = "21610"
STATUS_TYPES = {"delivered": "sms.delivered", "failed": "sms.failed", "undelivered": "sms.failed"}
DEFAULT_PORTS = {"https": "443", "http": "80"}
#: Longest dedupe key the inbox keeps (its column holds 300).
_MAX_KEY = 200


EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response/>'


class TwilioStatusConfig(PluginConfig):
    auth_token: SecretStr = Field(
        description="The account's Auth Token (Console > Account info); Twilio signs every webhook with it."
    )
    previous_auth_token: SecretStr | None = Field(
        None, description="The token being replaced, accepted too while you promote the secondary token."
    )


class TwilioStatus(Source):
    name = "twilio_status"
    Config = TwilioStatusConfig
    event_types = frozenset({"sms.received", "sms.opted_in"})

    async def start(self) -> None:
        if not self.deployment.public_url:
            raise ConfigError(
                [f"sources.{self.key}: twilio_status needs `public_url` (the https://host Twilio calls): "
                 "X-Twilio-Signature signs the full URL"]
            )  # fmt: skip

    async def verify(self, request: web.Request, body: bytes) -> None:
        given = request.headers.get("X-Twilio-Signature", "").strip()
        if not given:
            raise SignatureError("missing X-Twilio-Signature header")
        if not self.deployment.public_url:
            raise SignatureError("public_url is not set, so the signed URL is unknown")
        url = self.deployment.public_url.rstrip("/") + request.raw_path
        body_hash = parse_qs(urlsplit(url).query).get("bodySHA256")
        if body_hash:  # a JSON body: the URL carries its hash and the signature covers the URL alone
            if not hmac.compare_digest(hashlib.sha256(body).hexdigest().encode(), _utf8(body_hash[0])):
                raise SignatureError("the body does not match the bodySHA256 query parameter")
            params: list[tuple[str, str]] = []
        else:
            params = form_params(body)
        tokens = [t.get_secret_value() for t in (self.config.auth_token, self.config.previous_auth_token) if t]
        expected = [sig for token in tokens for sig in signatures(token, url, params)]
        if not any([hmac.compare_digest(_utf8(given), sig) for sig in expected]):
            raise SignatureError(
                "X-Twilio-Signature does not match (check auth_token, and that public_url + this path "
                "is exactly the URL set in Twilio)"
            )

    def acknowledge(self, status: str, inbox_id: int | None) -> web.StreamResponse | None:
        """Empty TwiML: no reply to the texter, and no warning 12300 ("Invalid Content-Type") at Twilio."""
        return web.Response(text=EMPTY_TWIML, content_type="text/xml")

    def dedupe_key(self, request: web.Request, body: bytes) -> str:
        """Twilio sends no delivery id: a message's SID and the state it reports identify a callback."""
        fields = _fields_or_empty(body)
        sid = fields.get("MessageSid") or fields.get("SmsSid")
        if not sid:
            return super().dedupe_key(request, body)
        status = fields.get("MessageStatus") or fields.get("SmsStatus") or ""
        key = f"{sid}:{status}:{fields.get('SmsSid', '')}"
        if len(key) > _MAX_KEY or not key.isprintable():
            return "sha256:" + hashlib.sha256(key.encode("utf-8", "replace")).hexdigest()
        return key

    def normalize(self, raw: RawCall) -> list[Event]:
        fields = parse_fields(raw.body)
        sid = fields.get("MessageSid") or fields.get("SmsSid")
        if not sid:
            return []  # a voice or other callback pointed here: kept, nothing to route
        status = fields.get("MessageStatus", "")
        if status in STATUS_TYPES:
            return [status_event(sid, status, fields, raw)]
        if "Body" in fields and "From" in fields:
            return [inbound_event(sid, fields, raw)]
        return []  # queued, sent, read...: no canonical event; delivered/failed are the outcomes


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "replace")


def url_variants(url: str) -> list[str]:
    """The URL without its port and with it (the scheme's default when none), as Twilio's SDKs try both."""
    scheme, sep, rest = url.partition("://")
    end = next((i for i, char in enumerate(rest) if char in "/?#"), len(rest))
    userinfo, at, hostport = rest[:end].rpartition("@")
    match = re.fullmatch(r"(.*?)(?::(\d+))?", hostport)
    host, port = (match.group(1), match.group(2)) if match else (hostport, None)
    port = port or DEFAULT_PORTS.get(scheme.lower())
    hosts = [host, f"{host}:{port}"] if port else [host]
    return [f"{scheme}{sep}{userinfo}{at}{h}{rest[end:]}" for h in hosts]


def signatures(token: str, url: str, params: Iterable[tuple[str, str]]) -> list[bytes]:
    """base64(HMAC-SHA1(token, url + name + value...)), names sorted, each distinct value sorted."""
    values: dict[str, set[str]] = {}
    for name, value in params:
        values.setdefault(name, set()).add(value)
    signed = "".join(name + value for name in sorted(values) for value in sorted(values[name]))
    return [
        base64.b64encode(hmac.new(token.encode(), (variant + signed).encode(), hashlib.sha1).digest())
        for variant in url_variants(url)
    ]


def form_params(body: bytes) -> list[tuple[str, str]]:
    try:
        return parse_qsl(body.decode("utf-8"), keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("the body is not UTF-8 form data") from None


def parse_fields(body: bytes) -> dict[str, str]:
    """A form post (status callbacks, inbound messages) or the JSON variant, as name -> text."""
    if body.lstrip()[:1] in (b"{", b"["):
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise MalformedPayload(f"body is not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise MalformedPayload("expected a JSON object (Event Streams batches are not read here)")
        return {str(k): str(v) for k, v in data.items() if isinstance(v, str | int | float)}
    try:
        return dict(form_params(body))
    except BadRequest as exc:
        raise MalformedPayload(exc.reason) from None


def _fields_or_empty(body: bytes) -> dict[str, str]:
    try:
        return parse_fields(body)
    except MalformedPayload:
        return {}


def _channel(address: str | None) -> str:
    """`+336…` is SMS; `whatsapp:+336…`, `rcs:…` name their channel (consent is kept per channel)."""
    return (address or "").rpartition(":")[0].lower()[:20] or "sms"


def _contact(address: str | None, consent: ConsentState | None = None, when: datetime | None = None) -> ContactRef:
    """The phone number identifies the person; any other address (Messenger...) is Twilio's own id.

    A consent here is always something the person did (a STOP or START reply, or Twilio's 21610
    saying they replied STOP before), dated when Twilio told us: it sends no time of its own.
    """
    number = (address or "").rpartition(":")[2]
    states = {_channel(address): ConsentStatement(state=consent, stated_at=when, action=True)} if consent else {}
    if re.fullmatch(r"\+[0-9]{6,15}", number):
        return ContactRef(phone=number, consent=states)
    return ContactRef(external_ids={"twilio": address[:320]} if address else {}, consent=states)


def status_event(sid: str, status: str, fields: dict[str, str], raw: RawCall) -> Event:
    error = fields.get("ErrorCode") or None
    return Event(
        type=STATUS_TYPES[status],
        occurred_at=raw.received_at,
        contact=_contact(fields.get("To"), "withdrawn" if error == UNSUBSCRIBED else None, raw.received_at),
        correlation=[f"sms:{sid}"],
        properties={
            "provider_message_id": sid,
            "status": status,
            "error_code": error,
            "error_message": fields.get("ErrorMessage"),
            "channel": _channel(fields.get("To")),
            "from": fields.get("From"),
            "messaging_service_sid": fields.get("MessagingServiceSid"),
        },
    )


def _keyword(fields: dict[str, str]) -> tuple[str, str | None]:
    """(event type, keyword): Twilio's own OptOutType when Advanced Opt-Out is on, else the body itself."""
    opt_out_type = fields.get("OptOutType", "").upper()
    word = fields.get("Body", "").strip().upper()
    if opt_out_type == "STOP" or word in OPT_OUT:
        return "sms.opted_out", word if word in OPT_OUT else opt_out_type
    if opt_out_type == "START" or word in OPT_IN:
        return "sms.opted_in", word if word in OPT_IN else opt_out_type
    return "sms.received", opt_out_type or None  # HELP, or a plain reply


CONSENT: dict[str, ConsentState] = {"sms.opted_out": "withdrawn", "sms.opted_in": "granted"}


def inbound_event(sid: str, fields: dict[str, str], raw: RawCall) -> Event:
    kind, keyword = _keyword(fields)
    return Event(
        type=kind,
        occurred_at=raw.received_at,
        contact=_contact(fields.get("From"), CONSENT.get(kind), raw.received_at),
        correlation=[f"sms:{sid}"],
        properties={
            "message_sid": sid,
            "body": fields.get("Body", ""),
            "keyword": keyword,
            "channel": _channel(fields.get("From")),
            "to": fields.get("To"),
            "num_media": int(media) if re.fullmatch(r"[0-9]{1,3}", media := fields.get("NumMedia", "")) else 0,
            "messaging_service_sid": fields.get("MessagingServiceSid"),
        },
    )


@hookimpl
def register_sources(register: Callable[[type[Source]], None]) -> None:
    register(TwilioStatus)
