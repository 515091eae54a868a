"""Eventbrite webhooks (URL token): each call names an order or attendee, re-read from the Eventbrite API.

Eventbrite signs nothing and sends only `{"api_url": ..., "config": {"action": ...}}`. The secret in the
webhook URL authenticates the call; the api_url is never fetched as given (that would let anyone who
learns the URL make Declic call any host with the Eventbrite token): its host must be Eventbrite's API,
the object is parsed from its path, and the URL is rebuilt on the configured `api_base`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import aiohttp
from aiohttp import web
from pydantic import Field, SecretStr, field_validator

from declic_gateway import (
    BadRequest,
    ContactRef,
    Event,
    MalformedPayload,
    PluginConfig,
    RawCall,
    RetryLater,
    Source,
    api_client,
    hookimpl,
)

API_HOST = "www.eventbriteapi.com"
TIMEOUT = 20.0  # seconds, the whole request
#: An order with more attendee pages than this is refused rather than silently truncated.
MAX_PAGES = 40
#: A Retry-After beyond this is treated as this: the core's own backoff caps retries anyway.
MAX_RETRY_AFTER = 86400.0

#: action -> (object the api_url must name, Declic event type). Other actions ("test", event.*,
#: venue.*, attendee.checked_out...) are acknowledged and kept, with no API call and no event.
ACTIONS = {
    "order.placed": ("order", "ticket.ordered"),
    "order.updated": ("order", "attendee.updated"),
    "order.refunded": ("order", "ticket.refunded"),
    "attendee.updated": ("attendee", "attendee.updated"),
    "attendee.checked_in": ("attendee", "attendee.checked_in"),
}

#: The order's attendees and its event with the venue, in the one call (Eventbrite's "expansions").
ORDER_EXPANSIONS = "attendees,event,event.venue"

_ID = r"[0-9]{1,30}"
_ATTENDEE_ID = r"[0-9]{1,30}(?:-[0-9]{1,10})?"  # e.g. "690507907-1" in Eventbrite's own SDK fixtures
#: The api_url paths we fetch: (pattern, object, rebuilt path).
PATHS = [
    (re.compile(rf"/v3/orders/(?P<id>{_ID})/?"), "order", "/v3/orders/{id}/"),
    (
        re.compile(rf"/v3/events/(?P<event>{_ID})/attendees/(?P<id>{_ATTENDEE_ID})/?"),
        "attendee",
        "/v3/events/{event}/attendees/{id}/",
    ),
    (re.compile(rf"/v3/attendees/(?P<id>{_ATTENDEE_ID})/?"), "attendee", "/v3/attendees/{id}/"),
]
#: Eventbrite answers 400 (not 401) for a token it does not accept.
AUTH_ERRORS = {"INVALID_AUTH", "INVALID_AUTH_HEADER", "NO_AUTH", "NOT_AUTHORIZED"}


class EventbriteConfig(PluginConfig):
    url_token: SecretStr = Field(
        description="Secret last segment of the webhook URL (/hooks/NAME/URL_TOKEN): Eventbrite signs nothing, "
        "so this URL is what authenticates its calls. At least 16 random characters."
    )
    token: SecretStr = Field(
        description="Eventbrite private token (or OAuth token) of a user who can read the orders; sent as Bearer."
    )
    api_base: str = Field(
        "https://www.eventbriteapi.com",
        description="Eventbrite API base URL. The webhook's api_url must be on www.eventbriteapi.com; "
        "its object is fetched from this base, never from the URL as given.",
    )

    @field_validator("url_token")
    @classmethod
    def _long_enough(cls, value: SecretStr) -> SecretStr:
        if len(value.get_secret_value()) < 16:
            raise ValueError("use at least 16 random characters (e.g. `openssl rand -hex 16`)")
        return value

    @field_validator("api_base")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if urlsplit(value).scheme not in ("http", "https") or not urlsplit(value).hostname:
            raise ValueError(f"not an http(s) URL: {value!r}")
        return value.rstrip("/")


@dataclass(frozen=True)
class ApiObject:
    kind: str  # "order" or "attendee"
    id: str
    path: str  # rebuilt, relative to api_base


@dataclass(frozen=True)
class Envelope:
    action: str
    api_url: Any


class Eventbrite(Source):
    name = "eventbrite"
    Config = EventbriteConfig
    needs_url_token = True
    event_types = frozenset({"ticket.refunded"})

    def __init__(self, key: str, config: EventbriteConfig, deployment: Any):
        super().__init__(key, config, deployment)
        self._client = api_client(config.api_base, TIMEOUT, headers={"Accept": "application/json"})

    async def close(self) -> None:
        await self._client.close()

    async def verify(self, request: web.Request, body: bytes) -> None:
        if not body:
            raise BadRequest("empty body")
        if not isinstance(_json(body), dict):
            raise BadRequest("body is not a JSON object (Eventbrite sends {api_url, config})")

    def dedupe_key(self, request: web.Request, body: bytes) -> str:
        """Eventbrite sends no delivery id: a redelivery is the same (api_url, action) pair."""
        data = _json(body)
        config = data.get("config") if isinstance(data, dict) else None
        action = config.get("action") if isinstance(config, dict) else None
        pair = json.dumps([data.get("api_url") if isinstance(data, dict) else None, action])
        return "eventbrite:" + hashlib.sha256(pair.encode()).hexdigest()

    async def normalize(self, raw: RawCall) -> list[Event]:
        envelope = parse_envelope(raw.body)
        if envelope.action not in ACTIONS:
            return []  # "test" and actions no rule uses: acknowledged and kept, nothing fetched
        kind, event_type = ACTIONS[envelope.action]
        target = parse_api_url(envelope.api_url)
        if target.kind != kind:
            raise MalformedPayload(f"{envelope.action}: api_url names an {target.kind}, expected an {kind}")
        if kind == "order":
            order, attendees = await self._order(target)
        else:
            order, attendees = {}, [await self._get(target.path)]
        try:
            return order_events(event_type, envelope.action, order, attendees, raw)
        except (KeyError, TypeError, ValueError, InvalidOperation) as exc:
            raise MalformedPayload(f"{envelope.action}: {kind} {target.id}: {type(exc).__name__}: {exc}") from None

    async def _order(self, target: ApiObject) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        order = await self._get(target.path, {"expand": ORDER_EXPANSIONS})
        attendees = order.get("attendees")
        if isinstance(attendees, list):
            return order, [a for a in attendees if isinstance(a, dict)]
        return order, await self._attendee_pages(target.path + "attendees/")

    async def _attendee_pages(self, path: str) -> list[dict[str, Any]]:
        """GET /v3/orders/ID/attendees/, following `continuation` or `page` until the last page."""
        found: list[dict[str, Any]] = []
        params: dict[str, str] = {}
        for _ in range(MAX_PAGES):
            page = await self._get(path, params)
            found += [a for a in page.get("attendees") or [] if isinstance(a, dict)]
            following = next_page(page.get("pagination"))
            if following is None:
                return found
            params = following
        raise MalformedPayload(f"{path}: more than {MAX_PAGES} pages of attendees")

    async def _get(self, path: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        url = self.config.api_base + path
        headers = {"Authorization": f"Bearer {self.config.token.get_secret_value()}"}
        try:
            async with self._client.request("GET", url, params=params, headers=headers) as response:
                status, body = response.status, await response.read()
                retry_after = response.headers.get("Retry-After")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RetryLater(f"Eventbrite API unreachable ({path}): {type(exc).__name__}: {exc}") from None
        if status == 200:
            data = _json(body)
            if not isinstance(data, dict):
                raise RetryLater(f"Eventbrite answered 200 without a JSON object for {path}")
            return data
        raise self._failure(path, status, body, retry_after)

    def _failure(self, path: str, status: int, body: bytes, retry_after: str | None) -> Exception:
        """Map an Eventbrite error ({status_code, error, error_description}) to retry or fail."""
        code, detail = error_of(body)
        said = f"Eventbrite answered {status} {code}: {detail} ({path})"
        if status in (401, 403) or code in AUTH_ERRORS:
            # A configuration error, not a bad call: keep retrying, then dead-letter; replay after fixing it.
            return RetryLater(f"{said}; check sources.{self.key}.token, then `declic replay` the dead letter")
        if status in (404, 410):
            return MalformedPayload(f"{said}: the object is gone")
        if status == 429 or status >= 500:
            return RetryLater(said, after=self._seconds(retry_after))
        return MalformedPayload(said)

    def _seconds(self, retry_after: str | None) -> float | None:
        """Retry-After in seconds, or as an HTTP date measured on the deployment's clock; at most a day."""
        if not retry_after:
            return None
        try:
            seconds = float(retry_after)
        except ValueError:
            try:
                moment = parsedate_to_datetime(retry_after)
            except (TypeError, ValueError):
                return None
            moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
            seconds = (moment - self.deployment.clock.now()).total_seconds()
        return min(max(seconds, 0.0), MAX_RETRY_AFTER) if math.isfinite(seconds) else None


def _json(body: bytes) -> Any:
    try:
        return json.loads(body, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_envelope(body: bytes) -> Envelope:
    data = _json(body)
    if not isinstance(data, dict):
        raise MalformedPayload("body is not a JSON object")
    config = data.get("config")
    action = config.get("action") if isinstance(config, dict) else None
    if not isinstance(action, str) or not action:
        raise MalformedPayload("no config.action in the envelope")
    return Envelope(action, data.get("api_url"))


def parse_api_url(api_url: Any) -> ApiObject:
    """Only Eventbrite's API host and the paths we know; anything else is refused, never fetched (SSRF)."""

    def refuse(why: str) -> MalformedPayload:
        shown = f" {api_url[:200]!r}" if isinstance(api_url, str) else ""
        return MalformedPayload(f"refused api_url{shown}: {why}; it was not fetched")

    if not api_url:
        raise refuse("missing")
    if not isinstance(api_url, str):
        raise refuse(f"not a string but {type(api_url).__name__}")
    if not api_url.isascii() or not api_url.isprintable() or " " in api_url:
        raise refuse("it contains spaces, control or non-ASCII characters")
    try:
        parts = urlsplit(api_url)
        port = parts.port
    except ValueError as exc:
        raise refuse(f"not a URL ({exc})") from None
    host = parts.hostname or ""
    if parts.scheme != "https":
        raise refuse("not https")
    if "@" in parts.netloc:
        raise refuse("it carries user info")
    if port is not None or parts.netloc.endswith(":"):
        raise refuse("it names a port")
    if _is_ip(host):
        raise refuse("its host is an IP address")
    if parts.netloc.lower() != API_HOST:
        raise refuse(f"its host is not {API_HOST}")
    if parts.query or parts.fragment or "?" in api_url or "#" in api_url:
        raise refuse("it has a query or fragment")
    for pattern, kind, template in PATHS:
        if match := pattern.fullmatch(parts.path):
            return ApiObject(kind, match["id"], template.format(**match.groupdict()))
    raise refuse("its path is not /v3/orders/ID/, /v3/attendees/ID/ or /v3/events/ID/attendees/ID/")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def next_page(pagination: Any) -> dict[str, str] | None:
    """The query for the next page: a continuation token when given, else the next page number."""
    if not isinstance(pagination, dict):
        return None
    if pagination.get("has_more_items") and isinstance(pagination.get("continuation"), str):
        return {"continuation": pagination["continuation"]}
    number, count = pagination.get("page_number"), pagination.get("page_count")
    if isinstance(number, int) and isinstance(count, int) and number < count:
        return {"page": str(number + 1)}
    return None


def error_of(body: bytes) -> tuple[str, str]:
    data = _json(body)
    if isinstance(data, dict) and ("error" in data or "error_description" in data):
        return str(data.get("error") or "?"), str(data.get("error_description") or "")[:300]
    return "?", body[:200].decode("utf-8", "replace")


def _text(value: Any) -> str | None:
    """A non-empty string without control characters (PostgreSQL text refuses NUL)."""
    return (value.strip() or None) if isinstance(value, str) and not re.search(r"[\x00-\x1f\x7f]", value) else None


def _when(raw: RawCall, *values: Any) -> datetime:
    for value in values:
        if isinstance(value, str) and value:
            try:
                moment = datetime.fromisoformat(value)
            except ValueError:
                continue
            return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return raw.received_at


def _gross(thing: dict[str, Any]) -> tuple[Decimal | None, str | None]:
    """Eventbrite money: minor units in `value`, the decimal string in `major_value`."""
    gross = (thing.get("costs") or {}).get("gross") or {}
    major = gross.get("major_value")
    return (Decimal(str(major)) if major not in (None, "") else None), gross.get("currency")


def _phone(value: Any) -> str | None:
    """Eventbrite's cell_phone is free text: only an E.164 number can identify a contact."""
    text = _text(value)
    return text if text and re.fullmatch(r"\+[1-9][0-9]{6,14}", text) else None


def attendee_event(
    event_type: str, action: str, attendee: dict[str, Any], order: dict[str, Any], raw: RawCall
) -> Event | None:
    """One ticket holder; None when the attendee has no e-mail (nobody to reach)."""
    profile = attendee.get("profile") or {}
    email = _text(profile.get("email"))
    if email is None:
        return None
    attendee_id = str(attendee["id"])
    order_id = attendee.get("order_id") or order.get("id")
    price, currency = _gross(attendee)
    order_total, order_currency = _gross(order)
    when = {
        "ticket.ordered": (order.get("created"), attendee.get("created")),
        "ticket.refunded": (order.get("changed"), attendee.get("changed")),
    }.get(event_type, (attendee.get("changed"), attendee.get("created")))
    properties = {
        "action": action,
        "attendee_id": attendee_id,
        "order_id": str(order_id) if order_id else None,
        "event_id": attendee.get("event_id") or order.get("event_id"),
        "ticket_class_id": attendee.get("ticket_class_id"),
        "ticket_class_name": attendee.get("ticket_class_name"),
        "status": attendee.get("status"),
        "checked_in": attendee.get("checked_in"),
        "cancelled": attendee.get("cancelled"),
        "refunded": attendee.get("refunded"),
        "quantity": attendee.get("quantity"),
        "price": price,
        "currency": currency or order_currency,
    }
    if order:
        properties |= {"order_status": order.get("status"), "order_total": order_total}
    if isinstance(order.get("event"), dict):
        properties |= event_details(order["event"])
    correlation = [f"eventbrite-attendee:{attendee_id}"]
    if order_id:
        correlation.append(f"eventbrite-order:{order_id}")
    contact = ContactRef(
        email=email,
        phone=_phone(profile.get("cell_phone")),
        first_name=_text(profile.get("first_name")),
        last_name=_text(profile.get("last_name")),
    )
    return Event(
        type=event_type,
        occurred_at=_when(raw, *when),
        contact=contact,
        properties=properties,
        correlation=correlation,
    )


def event_details(event: dict[str, Any]) -> dict[str, Any]:
    """The event's name, start and end (`starts_at`: ISO 8601 in UTC, for a step's `at:`; `starts_local`
    as the organiser wrote it), its time zone and venue."""
    name = event.get("name")
    start, start_zone = _moment(event.get("start"))
    end, _ = _moment(event.get("end"))
    return {
        "event_name": _text(name.get("text")) if isinstance(name, dict) else _text(name),
        "starts_at": start.isoformat() if start else None,
        "starts_local": start.astimezone(start_zone).replace(tzinfo=None).isoformat() if start and start_zone else None,
        "ends_at": end.isoformat() if end else None,
        "timezone": start_zone.key if start_zone else None,
        "online_event": event.get("online_event") if isinstance(event.get("online_event"), bool) else None,
        "venue": _venue(event.get("venue")),
    }


def _moment(value: Any) -> tuple[datetime | None, ZoneInfo | None]:
    """Eventbrite's `{timezone, local, utc}`: the UTC moment (from `utc`, else `local` in `timezone`) and the zone."""
    if not isinstance(value, dict):
        return None, None
    zone = _zone(value.get("timezone"))
    for text, default in ((value.get("utc"), ZoneInfo("UTC")), (value.get("local"), zone)):
        if not isinstance(text, str) or default is None:
            continue
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            continue
        return (moment if moment.tzinfo else moment.replace(tzinfo=default)).astimezone(UTC), zone
    return None, zone


def _zone(value: Any) -> ZoneInfo | None:
    try:
        return ZoneInfo(value) if isinstance(value, str) and value else None
    except (ZoneInfoNotFoundError, ValueError):
        return None


def _venue(value: Any) -> dict[str, Any] | None:
    if not isinstance(value, dict):
        return None
    address = value.get("address") if isinstance(value.get("address"), dict) else {}
    return {
        "name": _text(value.get("name")),
        "address": _text(address.get("localized_address_display")) or _text(address.get("address_1")),
        "city": _text(address.get("city")),
        "postal_code": _text(address.get("postal_code")),
        "country": _text(address.get("country")),
    }


def refunded(order: dict[str, Any], attendees: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A partial refund marks some attendees; a full one (or one Eventbrite has not marked yet) is all."""
    marked = [a for a in attendees if a.get("refunded") or a.get("cancelled")]
    return attendees if order.get("status") == "refunded" or not marked else marked


def order_events(
    event_type: str, action: str, order: dict[str, Any], attendees: list[dict[str, Any]], raw: RawCall
) -> list[Event]:
    chosen = refunded(order, attendees) if event_type == "ticket.refunded" else attendees
    events = [attendee_event(event_type, action, attendee, order, raw) for attendee in chosen]
    return [event for event in events if event is not None]


@hookimpl
def register_sources(register: Callable[[type[Source]], None]) -> None:
    register(Eventbrite)
