"""Mailchimp Transactional (Mandrill) message events, signed with X-Mandrill-Signature.

Mandrill POSTs a form with one field, `mandrill_events`: a JSON array of up to 1,000 events,
batched about once a minute. The signature covers the URL Mandrill calls, so the deployment's
`public_url` must be set. Opens, clicks, bounces, spam complaints and unsubscribes become
feedback events; the message id goes to `properties.provider_message_id`, and the Declic
delivery that the SMTP sink named in X-MC-Metadata (`mandrill: true`) to `properties.delivery`.
Opens and clicks that look like a machine's (Apple Mail Privacy Protection, link scanners) are
flagged `machine`, with the reasons.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web
from pydantic import Field, SecretStr

from declic_gateway import (
    DELIVERY_METADATA,
    BadRequest,
    ContactRef,
    Event,
    MalformedPayload,
    PluginConfig,
    RawCall,
    SignatureError,
    Source,
    hookimpl,
    machine_reasons,
)

#: Mandrill signs the POST it falls back to, when the HEAD check fails, with this public key;
#: such a call carries an empty batch (mandrill.zendesk.com "Introduction to Webhooks").
TEST_KEY = "test-webhook"
#: Correlation keys end up in VARCHAR(300) columns (enrolments); click URLs can be longer.
MAX_ITEM_KEY = 250

#: Mandrill message event -> (canonical type, extra properties).
#: Not mapped, acknowledged and kept: `send`, `deferral`, `delivered` (Declic records its own
#: sends), `reject` (Mandrill refused to send because of its deny list: the bounce, complaint or
#: unsubscribe that put the address there came as its own event), sync and inbound events.
KINDS: dict[str, tuple[str, dict[str, str]]] = {
    "open": ("email.opened", {}),
    "click": ("email.clicked", {}),
    "hard_bounce": ("email.bounced", {"bounce": "hard"}),
    "soft_bounce": ("email.bounced", {"bounce": "soft"}),
    "spam": ("email.complained", {}),
    "unsub": ("email.unsubscribed", {}),
}
#: A complaint ends marketing consent as surely as an unsubscribe (Mandrill deny-lists both).
WITHDRAWS = frozenset({"spam", "unsub"})


class MandrillConfig(PluginConfig):
    webhook_key: SecretStr = Field(
        description="The webhook's key, shown in Mandrill under Settings > Webhooks (one webhook per source)."
    )


class Mandrill(Source):
    name = "mandrill"
    Config = MandrillConfig

    async def ping(self, request: web.Request) -> web.StreamResponse | None:
        return web.Response(text="ok")  # Mandrill sends a HEAD and wants a 200 before it saves the webhook

    async def verify(self, request: web.Request, body: bytes) -> None:
        given = request.headers.get("X-Mandrill-Signature", "").strip()
        if not given:
            raise SignatureError("missing X-Mandrill-Signature header")
        url = self.signed_url(request)
        try:
            fields = form_fields(body)
        except ValueError as exc:
            raise BadRequest(f"not a form-encoded body: {exc}") from None
        if not self.authentic(given, url, fields):
            raise SignatureError(
                f"X-Mandrill-Signature does not match (check webhook_key, and that Mandrill calls {url})"
            )
        if "mandrill_events" not in fields:
            raise BadRequest("no mandrill_events field")

    def authentic(self, given: str, url: str, fields: dict[str, str]) -> bool:
        if _matches(given, sign(self.config.webhook_key.get_secret_value(), url, fields)):
            return True
        # Mandrill's fallback check when our HEAD answer did not reach it: harmless, it carries nothing.
        return _matches(given, sign(TEST_KEY, url, fields)) and _is_empty_batch(fields)

    def signed_url(self, request: web.Request) -> str:
        """The URL Mandrill calls, as it signs it: public_url, then the path and query we received."""
        if not self.deployment.public_url:
            raise SignatureError(
                "public_url is not set in the deployment config: Mandrill signs the URL it calls, "
                "so its signature cannot be checked without it"
            )
        return self.deployment.public_url.rstrip("/") + request.raw_path

    def dedupe_key(self, request: web.Request, body: bytes) -> str:
        """A hash of the batch's item keys: a redelivered batch is a duplicate whatever its order."""
        try:
            items = batch(body)
        except ValueError:
            return super().dedupe_key(request, body)  # normalize marks it failed, with the reason
        keys = sorted({item_key(item) for item in items})
        return "mandrill:" + hashlib.sha256("\n".join(keys).encode()).hexdigest()

    def normalize(self, raw: RawCall) -> list[Event]:
        try:
            items = batch(raw.body)
        except ValueError as exc:
            raise MalformedPayload(str(exc)) from None
        events: list[Event] = []
        seen: set[str] = set()
        for index, item in enumerate(items):
            kind = item.get("event")
            key = item_key(item)
            # One event per item, even when a batch repeats one (Mandrill's test button does).
            if not isinstance(kind, str) or kind not in KINDS or key in seen:
                continue
            seen.add(key)
            try:
                events.append(message_event(item, key))
            except (KeyError, TypeError, ValueError, OverflowError, OSError) as exc:
                raise MalformedPayload(f"mandrill_events[{index}] ({kind}): {type(exc).__name__}: {exc}") from None
        return events


def form_fields(body: bytes) -> dict[str, str]:
    """The POST fields, URL-decoded as Mandrill signs them; a field given twice is refused."""
    pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, errors="strict")
    fields = dict(pairs)
    if len(fields) != len(pairs):
        raise ValueError("a field appears twice")
    return fields


def sign(key: str, url: str, fields: dict[str, str]) -> str:
    """base64(HMAC-SHA1(key, url + each field's name and value, sorted by name))."""
    signed = url + "".join(name + value for name, value in sorted(fields.items()))
    return base64.b64encode(hmac.new(key.encode(), signed.encode(), hashlib.sha1).digest()).decode()


def _matches(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def _is_empty_batch(fields: dict[str, str]) -> bool:
    try:
        return bool(json.loads(fields.get("mandrill_events", "")) == [])
    except ValueError:
        return False


def batch(body: bytes) -> list[dict[str, Any]]:
    """The `mandrill_events` array; ValueError says why when the body is not one."""
    field = form_fields(body).get("mandrill_events")
    if field is None:
        raise ValueError("no mandrill_events field")
    try:
        events = json.loads(field)
    except json.JSONDecodeError as exc:
        raise ValueError(f"mandrill_events is not JSON ({exc})") from None
    if not isinstance(events, list) or not all(isinstance(item, dict) for item in events):
        raise ValueError("mandrill_events is not a JSON array of objects")
    return events


def message_id(item: dict[str, Any]) -> str | None:
    """The message's id: top-level `_id`, or `msg._id` in older payloads that lack it."""
    msg = item.get("msg")
    value = item.get("_id") or (msg.get("_id") if isinstance(msg, dict) else None)
    return str(value) if value else None


def item_key(item: dict[str, Any]) -> str:
    """(message id, event, ts, url): what makes an item unique across batches."""
    mid = message_id(item)
    if mid is None:  # sync and inbound events: no message, the item itself is the key
        return "sha256:" + hashlib.sha256(json.dumps(item, sort_keys=True).encode()).hexdigest()
    key = f"{mid}:{item.get('event')}:{item.get('ts')}" + (f":{item['url']}" if item.get("url") else "")
    return key if len(key) <= MAX_ITEM_KEY else "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def message_event(item: dict[str, Any], key: str) -> Event:
    msg = item["msg"]
    if not isinstance(msg, dict):
        raise TypeError("msg is not an object")
    event = item["event"]
    kind, extra = KINDS[event]
    mid = message_id(item)
    if mid is None:
        raise KeyError("_id")
    if not isinstance(msg["email"], str) or not msg["email"]:
        raise ValueError("msg.email is empty")
    metadata = msg.get("metadata") if isinstance(msg.get("metadata"), dict) else {}
    properties = {
        "provider_message_id": mid,
        "delivery": metadata.get(DELIVERY_METADATA) if isinstance(metadata.get(DELIVERY_METADATA), str) else None,
        "mandrill_event": event,
        "subject": msg.get("subject"),
        "sender": msg.get("sender"),
        "tags": msg.get("tags") or [],
        "metadata": metadata,
        "subaccount": msg.get("subaccount"),
        **extra,
        **DETAILS.get(event, _no_details)(item, msg),
    }
    return Event(
        type=kind,
        occurred_at=datetime.fromtimestamp(float(item["ts"]), UTC),
        contact=ContactRef(email=msg["email"], consent={"email": "withdrawn"} if event in WITHDRAWS else {}),
        properties=properties,
        correlation=[f"mandrill:{key}"],
    )


def _no_details(item: dict[str, Any], msg: dict[str, Any]) -> dict[str, Any]:
    return {}


def _engagement(item: dict[str, Any], msg: dict[str, Any]) -> dict[str, Any]:
    agent = item.get("user_agent_parsed") or {}
    location = item.get("location") or {}
    ip, user_agent = _text(item.get("ip")), _text(item.get("user_agent"))
    sent = msg.get("ts")
    after = timedelta(seconds=float(item["ts"]) - float(sent)) if isinstance(sent, int | float) else None
    kind = "click" if item["event"] == "click" else "open"
    reasons = machine_reasons(kind, user_agent=user_agent, ip=ip, after=after)
    if isinstance(agent, dict) and agent.get("type") == "robot":  # Mandrill's own user agent parser says so
        reasons.append("robot-agent")
    return {
        "ip": ip,
        "user_agent": user_agent,
        "mobile": agent.get("mobile") if isinstance(agent, dict) else None,
        "country": location.get("country_short") if isinstance(location, dict) else None,
        "machine": bool(reasons),
        "machine_reasons": sorted(set(reasons)),
    }


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _click(item: dict[str, Any], msg: dict[str, Any]) -> dict[str, Any]:
    return {"url": item["url"], **_engagement(item, msg)}


def _bounce(item: dict[str, Any], msg: dict[str, Any]) -> dict[str, Any]:
    return {
        "description": msg.get("bounce_description"),
        "diag": msg.get("diag"),
        "bgtools_code": msg.get("bgtools_code"),
    }


DETAILS: dict[str, Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]] = {
    "open": _engagement,
    "click": _click,
    "hard_bounce": _bounce,
    "soft_bounce": _bounce,
}


@hookimpl
def register_sources(register: Callable[[type[Source]], None]) -> None:
    register(Mandrill)
