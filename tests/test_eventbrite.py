"""Eventbrite source: URL token, api_url refused unless it is Eventbrite's (SSRF), objects re-read from the API."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, make_mocked_request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from conftest import FIXTURES, SHARED_PAYLOADS
from declic_gateway import BadRequest, MalformedPayload, RawCall
from declic_gateway.config import load_config
from declic_gateway.errors import RetryLater
from declic_gateway.http.app import create_app
from declic_gateway.http.running import GATEWAY_KEY, RunningGateway
from declic_gateway.kit.clock import FakeClock
from declic_gateway.kit.sources import Deployment
from declic_gateway.plugins import collect, get_plugin_manager
from declic_gateway.store.jobqueue import requeue
from declic_gateway.testing import SmtpCatcher, write_deployment
from declic_plugins.eventbrite import (
    ACTIONS,
    ORDER_EXPANSIONS,
    Eventbrite,
    EventbriteConfig,
    event_details,
    parse_api_url,
)

NOW = datetime(2026, 5, 12, 10, 0, tzinfo=UTC)
URL_TOKEN = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
API_TOKEN = "PRIVATETOKEN123"
ORDER_ID = "7712345001"
ORDER_URL = f"https://www.eventbriteapi.com/v3/orders/{ORDER_ID}/"
ATTENDEE_URL = "https://www.eventbriteapi.com/v3/events/881234567890/attendees/3141592001/"
ORDER_PATH = f"/v3/orders/{ORDER_ID}/"
ATTENDEE_PATH = "/v3/events/881234567890/attendees/3141592001/"
#: What the plugin may ever ask the API for: the rebuilt object paths, nothing else.
ALLOWED_PATH = re.compile(r"/v3/(orders/\d+/(attendees/)?|attendees/[\d-]+/|events/\d+/attendees/[\d-]+/)")


def load(name: str) -> Any:
    return json.loads((FIXTURES / "eventbrite" / name).read_bytes())


def envelope(action: str, api_url: Any = ORDER_URL) -> bytes:
    body = load("order_placed.json")
    body["config"]["action"] = action
    body["api_url"] = api_url
    return json.dumps(body).encode()


def raw(body: bytes) -> RawCall:
    return RawCall(7, "eb", NOW, {"Content-Type": "application/json"}, body)


def not_found(what: str = "order") -> dict[str, Any]:
    return {"status_code": 404, "error_description": f"The {what} you requested does not exist.", "error": "NOT_FOUND"}


@dataclass
class FakeEventbrite:
    """Answers like www.eventbriteapi.com/v3: scripted replies first, then the stored objects, else 404."""

    base: str = ""
    objects: dict[str, Any] = field(default_factory=dict)  # path -> body, or query -> body
    script: dict[str, list[tuple[int, dict[str, str], bytes]]] = field(default_factory=lambda: defaultdict(list))
    requests: list[tuple[str, dict[str, str], str | None]] = field(default_factory=list)

    def fail(self, path: str, status: int, body: Any, times: int = 1, **headers: str) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.script[path] += [(status, headers, data)] * times

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((request.path, dict(request.query), request.headers.get("Authorization")))
        if self.script[request.path]:
            status, headers, body = self.script[request.path].pop(0)
            return web.Response(status=status, body=body, headers={"Content-Type": "application/json", **headers})
        found = self.objects.get(request.path)
        if found is None:
            return web.json_response(not_found(), status=404)
        return web.json_response(found(dict(request.query)) if callable(found) else found)

    @property
    def paths(self) -> list[str]:
        return [path for path, _, _ in self.requests]


@pytest.fixture
async def api(aiohttp_server: Any) -> FakeEventbrite:
    fake = FakeEventbrite(
        objects={ORDER_PATH: load("order_expanded.json"), ATTENDEE_PATH: load("attendee_checked_in.json")}
    )
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    server = await aiohttp_server(app)
    fake.base = str(server.make_url("")).rstrip("/")
    return fake


def make_source(api_base: str, clock: FakeClock | None = None) -> Eventbrite:
    config = EventbriteConfig.model_validate({"url_token": URL_TOKEN, "token": API_TOKEN, "api_base": api_base})
    return Eventbrite("eb", config, Deployment("https://hooks.example.com", "UTC", clock or FakeClock(NOW)))


@pytest.fixture
async def eb(api: FakeEventbrite) -> AsyncIterator[Eventbrite]:
    source = make_source(api.base)
    await source.start()
    yield source
    await source.close()


# --- the api_url: Eventbrite's host and known paths only, rebuilt on api_base -------------------------

ACCEPTED = [
    (ORDER_URL, "order", ORDER_ID, ORDER_PATH),
    (f"https://www.eventbriteapi.com/v3/orders/{ORDER_ID}", "order", ORDER_ID, ORDER_PATH),
    (f"https://WWW.EventbriteAPI.com/v3/orders/{ORDER_ID}/", "order", ORDER_ID, ORDER_PATH),
    (ATTENDEE_URL, "attendee", "3141592001", ATTENDEE_PATH),
    (
        "https://www.eventbriteapi.com/v3/attendees/690507907-1/",
        "attendee",
        "690507907-1",
        "/v3/attendees/690507907-1/",
    ),
]


@pytest.mark.parametrize(("url", "kind", "object_id", "path"), ACCEPTED)
def test_api_urls_of_eventbrite_objects_are_parsed_and_rebuilt(url: str, kind: str, object_id: str, path: str) -> None:
    target = parse_api_url(url)
    assert (target.kind, target.id, target.path) == (kind, object_id, path)


REFUSED: list[tuple[str, Any, str]] = [
    ("other host", "https://evil.example.com/v3/orders/1/", "host is not www.eventbriteapi.com"),
    ("look-alike host", "https://www.eventbriteapi.com.evil.example/v3/orders/1/", "host is not"),
    ("trailing-dot host", "https://www.eventbriteapi.com./v3/orders/1/", "host is not"),
    ("sandbox host", "https://www.evbqaapi.com/v3/orders/548532261/", "host is not"),
    ("plain http", "http://www.eventbriteapi.com/v3/orders/1/", "not https"),
    ("file scheme", "file:///etc/passwd", "not https"),
    ("user info", "https://www.eventbriteapi.com@evil.example.com/v3/orders/1/", "user info"),
    ("user info to itself", "https://u:p@www.eventbriteapi.com/v3/orders/1/", "user info"),
    ("backslash trick", "https://www.eventbriteapi.com\\@evil.example.com/v3/orders/1/", "user info"),
    ("port", "https://www.eventbriteapi.com:8443/v3/orders/1/", "names a port"),
    ("default port", "https://www.eventbriteapi.com:443/v3/orders/1/", "names a port"),
    ("bad port", "https://www.eventbriteapi.com:99999/v3/orders/1/", "not a URL"),
    ("IPv4 literal", "https://169.254.169.254/v3/orders/1/", "IP address"),
    ("IPv6 literal", "https://[::1]/v3/orders/1/", "IP address"),
    ("broken IPv6", "https://[::1/v3/orders/1/", "not a URL"),
    ("users/me (the dashboard test)", "https://www.eventbriteapi.com/v3/users/me/", "path is not"),
    ("dot segments", "https://www.eventbriteapi.com/v3/orders/1/../../users/me/", "path is not"),
    ("encoded slash", "https://www.eventbriteapi.com/v3/orders/1%2F..%2Fusers/", "path is not"),
    ("non-numeric id", "https://www.eventbriteapi.com/v3/orders/abc/", "path is not"),
    ("sub-resource", "https://www.eventbriteapi.com/v3/orders/1/attendees/", "path is not"),
    ("query", "https://www.eventbriteapi.com/v3/orders/1/?token=x", "query or fragment"),
    ("empty query", "https://www.eventbriteapi.com/v3/orders/1/?", "query or fragment"),
    ("fragment", "https://www.eventbriteapi.com/v3/orders/1/#x", "query or fragment"),
    ("newline", "https://www.eventbriteapi.com/v3/orders/1\n/", "control"),
    ("space", "https://www.eventbriteapi.com/v3/orders/1 /", "spaces"),
    ("non-ASCII host", "https://www.eventbriteapı.com/v3/orders/1/", "non-ASCII"),
    ("not a string", 12345, "not a string"),
    ("missing", None, "missing"),
    ("empty", "", "missing"),
]


@pytest.mark.parametrize(("case", "url", "reason"), REFUSED, ids=[r[0] for r in REFUSED])
async def test_foreign_api_urls_are_refused_and_never_fetched(
    eb: Eventbrite, api: FakeEventbrite, case: str, url: Any, reason: str
) -> None:
    with pytest.raises(MalformedPayload, match=f"refused api_url.*{re.escape(reason)}.*it was not fetched"):
        await eb.normalize(raw(envelope("order.placed", url)))
    assert api.requests == []


async def test_an_attendee_url_for_an_order_action_is_refused(eb: Eventbrite, api: FakeEventbrite) -> None:
    with pytest.raises(MalformedPayload, match=r"order\.placed: api_url names an attendee, expected an order"):
        await eb.normalize(raw(envelope("order.placed", ATTENDEE_URL)))
    assert api.requests == []


# --- verify and dedupe ---------------------------------------------------------------------------------


def request() -> web.Request:
    return make_mocked_request("POST", f"/hooks/eb/{URL_TOKEN}", headers={"Content-Type": "application/json"})


@pytest.mark.parametrize(
    ("body", "reason"),
    [(b"", "empty body"), (b"not json", "not a JSON object"), (b"[1, 2]", "not a JSON object"), (b"NaN", "JSON")],
)
async def test_bodies_that_cannot_be_an_envelope_are_refused(body: bytes, reason: str) -> None:
    with pytest.raises(BadRequest, match=reason):
        await make_source("https://www.eventbriteapi.com").verify(request(), body)


def test_dedupe_key_is_the_api_url_and_action_eventbrite_sending_no_delivery_id() -> None:
    source = make_source("https://www.eventbriteapi.com")
    key = source.dedupe_key(request(), envelope("order.placed"))
    other_webhook = json.loads(envelope("order.placed"))
    other_webhook["config"]["webhook_id"] = "1111"
    assert source.dedupe_key(request(), json.dumps(other_webhook, indent=2).encode()) == key
    assert source.dedupe_key(request(), envelope("order.updated")) != key
    assert source.dedupe_key(request(), envelope("order.placed", ORDER_URL.replace("1/", "2/"))) != key
    assert key.startswith("eventbrite:") and len(key) < 300


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"url_token": "short"}, "at least 16 random characters"),
        ({"api_base": "ftp://example.com"}, "not an http"),
        ({"token": None}, "token"),
        ({"secret": "x"}, "Extra inputs"),
    ],
)
def test_config_errors(options: dict[str, Any], reason: str) -> None:
    good = {"url_token": URL_TOKEN, "token": API_TOKEN}
    with pytest.raises(ValidationError, match=reason):
        EventbriteConfig.model_validate({**good, **options})


# --- normalisation: the object re-read from the API ----------------------------------------------------


async def test_order_placed_becomes_one_ticket_ordered_per_attendee_with_an_email(
    eb: Eventbrite, api: FakeEventbrite
) -> None:
    events = await eb.normalize(raw(envelope("order.placed")))
    assert api.requests == [(ORDER_PATH, {"expand": ORDER_EXPANSIONS}, f"Bearer {API_TOKEN}")]
    assert [(e.type, e.contact.email, e.correlation) for e in events] == [
        (
            "ticket.ordered",
            "camille.durand@example.org",
            ["eventbrite-attendee:3141592001", f"eventbrite-order:{ORDER_ID}"],
        ),
        (
            "ticket.ordered",
            "Noah.Martin@example.org",
            ["eventbrite-attendee:3141592002", f"eventbrite-order:{ORDER_ID}"],
        ),
    ]
    camille, noah = events
    assert camille.occurred_at == datetime(2026, 5, 12, 9, 30, 2, tzinfo=UTC)
    assert (camille.contact.first_name, camille.contact.last_name, camille.contact.phone) == (
        "Camille",
        "Durand",
        "+33612345678",
    )
    assert noah.contact.phone is None  # free text, not E.164: not an identity
    assert camille.contact.external_ids == {}  # an attendee id is a ticket, not a person
    assert {
        k: camille.properties[k] for k in ("price", "currency", "order_total", "ticket_class_name", "event_id")
    } == {
        "price": Decimal("26.87"),
        "currency": "EUR",
        "order_total": Decimal("53.74"),
        "ticket_class_name": "Plein tarif",
        "event_id": "881234567890",
    }


async def test_ticket_ordered_carries_the_events_name_start_end_zone_and_venue(eb: Eventbrite) -> None:
    """What a reminder one day before the event needs, from the order's `event` expansion."""
    camille, _ = await eb.normalize(raw(envelope("order.placed")))
    assert {k: camille.properties[k] for k in ("event_name", "starts_at", "starts_local", "ends_at", "timezone")} == {
        "event_name": "Atelier céramique",
        "starts_at": "2026-06-02T17:00:00+00:00",
        "starts_local": "2026-06-02T19:00:00",
        "ends_at": "2026-06-02T20:00:00+00:00",
        "timezone": "Europe/Paris",
    }
    assert camille.properties["venue"] == {
        "name": "La Halle",
        "address": "12 rue des Arts, 69001 Lyon",
        "city": "Lyon",
        "postal_code": "69001",
        "country": "FR",
    }


@pytest.mark.parametrize(
    ("start", "starts_at", "timezone"),
    [
        (
            {"timezone": "America/New_York", "local": "2026-11-01T01:30:00", "utc": "2026-11-01T05:30:00Z"},
            "2026-11-01T05:30:00+00:00",
            "America/New_York",
        ),
        # no `utc`: the local time in the event's zone (here after the clocks went back: EST, UTC-5)
        (
            {"timezone": "America/New_York", "local": "2026-11-02T09:00:00"},
            "2026-11-02T14:00:00+00:00",
            "America/New_York",
        ),
        ({"timezone": "Europe/Paris", "local": "2026-03-29T10:00:00"}, "2026-03-29T08:00:00+00:00", "Europe/Paris"),
        ({"timezone": "Mars/Olympus", "utc": "2026-06-02T17:00:00Z"}, "2026-06-02T17:00:00+00:00", None),
        ({"timezone": "Mars/Olympus", "local": "2026-06-02T19:00:00"}, None, None),  # no zone: no moment
        ({"local": "not a date", "utc": 17}, None, None),
        (None, None, None),
        ("2026-06-02", None, None),
    ],
)
def test_event_start_is_read_with_its_time_zone(start: Any, starts_at: str | None, timezone: str | None) -> None:
    details = event_details({"name": {"text": "x"}, "start": start})
    assert (details["starts_at"], details["timezone"]) == (starts_at, timezone)
    assert details["venue"] is None  # an online event, or no venue expansion


def with_attendees(change: Callable[[dict[str, Any]], None], status: str = "placed") -> dict[str, Any]:
    order = load("order_expanded.json")
    order["status"] = status
    change(order)
    return order


def refund_first(order: dict[str, Any]) -> None:
    order["attendees"][0]["refunded"] = True


NORMALIZE: list[tuple[str, str, str, dict[str, Any] | None, list[tuple[str, str]]]] = [
    (
        "order updated: every attendee re-read",
        "order.updated",
        ORDER_URL,
        None,
        [("attendee.updated", "camille.durand@example.org"), ("attendee.updated", "Noah.Martin@example.org")],
    ),
    (
        "partial refund: the refunded attendee only",
        "order.refunded",
        ORDER_URL,
        with_attendees(refund_first),
        [("ticket.refunded", "camille.durand@example.org")],
    ),
    (
        "full refund: every attendee",
        "order.refunded",
        ORDER_URL,
        with_attendees(lambda o: None, status="refunded"),
        [("ticket.refunded", "camille.durand@example.org"), ("ticket.refunded", "Noah.Martin@example.org")],
    ),
    (
        "refund Eventbrite has not marked yet: every attendee",
        "order.refunded",
        ORDER_URL,
        None,
        [("ticket.refunded", "camille.durand@example.org"), ("ticket.refunded", "Noah.Martin@example.org")],
    ),
    ("check-in", "attendee.checked_in", ATTENDEE_URL, None, [("attendee.checked_in", "camille.durand@example.org")]),
    ("attendee updated", "attendee.updated", ATTENDEE_URL, None, [("attendee.updated", "camille.durand@example.org")]),
]


@pytest.mark.parametrize(("case", "action", "url", "order", "expected"), NORMALIZE, ids=[n[0] for n in NORMALIZE])
async def test_actions_become_canonical_events(
    eb: Eventbrite,
    api: FakeEventbrite,
    case: str,
    action: str,
    url: str,
    order: dict[str, Any] | None,
    expected: list[tuple[str, str]],
) -> None:
    if order is not None:
        api.objects[ORDER_PATH] = order
    events = await eb.normalize(raw(envelope(action, url)))
    assert [(e.type, e.contact.email) for e in events] == expected
    assert all(e.properties["action"] == action for e in events)
    assert all(e.correlation[0] == f"eventbrite-attendee:{e.properties['attendee_id']}" for e in events)


async def test_check_in_carries_the_attendee_state(eb: Eventbrite) -> None:
    [event] = await eb.normalize(raw(envelope("attendee.checked_in", ATTENDEE_URL)))
    assert event.occurred_at == datetime(2026, 6, 20, 18, 5, 41, tzinfo=UTC)
    assert (event.properties["checked_in"], event.properties["status"]) == (True, "Checked In")
    assert event.correlation == ["eventbrite-attendee:3141592001", "eventbrite-order:7712345001"]


async def test_an_attendee_without_an_email_makes_no_event(eb: Eventbrite, api: FakeEventbrite) -> None:
    attendee = load("attendee_checked_in.json")
    del attendee["profile"]["email"]
    api.objects[ATTENDEE_PATH] = attendee
    assert await eb.normalize(raw(envelope("attendee.updated", ATTENDEE_URL))) == []


@pytest.mark.parametrize(
    ("action", "url"),
    [
        ("test", "https://www.eventbriteapi.com/v3/users/me/"),
        ("event.published", "https://www.eventbriteapi.com/v3/events/881234567890/"),
        ("attendee.checked_out", ATTENDEE_URL),
        ("venue.updated", "https://evil.example.com/v3/venues/1/"),
    ],
)
async def test_test_pings_and_unused_actions_are_acknowledged_without_an_api_call(
    eb: Eventbrite, api: FakeEventbrite, action: str, url: str
) -> None:
    assert await eb.normalize(raw(envelope(action, url))) == []
    assert api.requests == []


def unexpanded_order() -> dict[str, Any]:
    order = load("order_expanded.json")
    del order["attendees"]
    return order


def attendee_pages(pagination: list[dict[str, Any]]) -> Callable[[dict[str, str]], dict[str, Any]]:
    """Two pages, one attendee each, selected by the query the plugin sends."""
    people = load("order_expanded.json")["attendees"]

    def page(query: dict[str, str]) -> dict[str, Any]:
        second = query.get("continuation") == "dGhpcyBpcyBwYWdlIDI" or query.get("page") == "2"
        return {"pagination": pagination[second], "attendees": [people[second]]}

    return page


@pytest.mark.parametrize(
    ("pagination", "second_query"),
    [
        (
            [
                {"page_number": 1, "page_size": 1, "continuation": "dGhpcyBpcyBwYWdlIDI", "has_more_items": True},
                {"page_number": 2, "page_size": 1, "has_more_items": False},
            ],
            {"continuation": "dGhpcyBpcyBwYWdlIDI"},
        ),
        (
            [
                {"object_count": 2, "page_number": 1, "page_size": 1, "page_count": 2},
                {"object_count": 2, "page_number": 2, "page_size": 1, "page_count": 2},
            ],
            {"page": "2"},
        ),
    ],
    ids=["continuation", "page numbers"],
)
async def test_attendees_not_expanded_are_paged_through(
    eb: Eventbrite, api: FakeEventbrite, pagination: list[dict[str, Any]], second_query: dict[str, str]
) -> None:
    api.objects[ORDER_PATH] = unexpanded_order()
    api.objects[ORDER_PATH + "attendees/"] = attendee_pages(pagination)
    events = await eb.normalize(raw(envelope("order.placed")))
    assert [e.contact.email for e in events] == ["camille.durand@example.org", "Noah.Martin@example.org"]
    assert [(path, query) for path, query, _ in api.requests] == [
        (ORDER_PATH, {"expand": ORDER_EXPANSIONS}),
        (ORDER_PATH + "attendees/", {}),
        (ORDER_PATH + "attendees/", second_query),
    ]


async def test_endless_pagination_is_refused(eb: Eventbrite, api: FakeEventbrite) -> None:
    api.objects[ORDER_PATH] = unexpanded_order()
    api.objects[ORDER_PATH + "attendees/"] = {
        "pagination": {"continuation": "again", "has_more_items": True},
        "attendees": [],
    }
    with pytest.raises(MalformedPayload, match="more than 40 pages"):
        await eb.normalize(raw(envelope("order.placed")))


# --- API errors: retry, or fail with Eventbrite's reason ----------------------------------------------

NO_AUTH = {"status_code": 401, "error_description": "An OAuth token is required for all requests", "error": "NO_AUTH"}
INVALID_AUTH = {
    "status_code": 400,
    "error_description": "The OAuth token you provided was invalid.",
    "error": "INVALID_AUTH",
}
NOT_AUTHORIZED = {
    "status_code": 403,
    "error_description": "You do not have permission to access the resource you requested.",
    "error": "NOT_AUTHORIZED",
}
RATE_LIMIT = {"status_code": 429, "error_description": "Hourly rate limit has been reached.", "error": "HIT_RATE_LIMIT"}
ARGUMENTS = {
    "status_code": 400,
    "error_description": "There are errors with your arguments",
    "error": "ARGUMENTS_ERROR",
}
IN_FIVE_MINUTES = {"Retry-After": "Tue, 12 May 2026 10:05:00 GMT"}  # an HTTP date, 300 s after NOW
ERRORS: list[tuple[str, int, Any, dict[str, str], type[Exception], str, float | None]] = [
    ("gone", 404, not_found(), {}, MalformedPayload, "404 NOT_FOUND: The order you requested does not exist.", None),
    ("unsubscribed object", 410, {"error": "GONE"}, {}, MalformedPayload, "410 GONE", None),
    ("no token", 401, NO_AUTH, {}, RetryLater, "401 NO_AUTH.*check sources.eb.token", None),
    ("bad token (a 400)", 400, INVALID_AUTH, {}, RetryLater, "400 INVALID_AUTH.*check sources.eb.token", None),
    ("not allowed", 403, NOT_AUTHORIZED, {}, RetryLater, "403 NOT_AUTHORIZED", None),
    ("other 400", 400, ARGUMENTS, {}, MalformedPayload, "400 ARGUMENTS_ERROR: There are errors", None),
    ("rate limited", 429, RATE_LIMIT, {"Retry-After": "120"}, RetryLater, "429 HIT_RATE_LIMIT", 120.0),
    ("rate limited until a date", 429, RATE_LIMIT, IN_FIVE_MINUTES, RetryLater, "429 HIT_RATE_LIMIT", 300.0),
    ("down", 503, b"<html>Service Unavailable</html>", {}, RetryLater, "503 \\?: <html>Service Unavailable", None),
    ("unparsable Retry-After", 500, b"", {"Retry-After": "soon"}, RetryLater, "500", None),
    ("Retry-After not finite", 503, b"", {"Retry-After": "nan"}, RetryLater, "503", None),
    ("Retry-After of a year", 429, RATE_LIMIT, {"Retry-After": "31536000"}, RetryLater, "429", 86400.0),
    ("redirect", 302, b"", {"Location": "http://169.254.169.254/"}, MalformedPayload, "302", None),
    ("200 but not JSON", 200, b"<html>maintenance</html>", {}, RetryLater, "without a JSON object", None),
]


@pytest.mark.parametrize(
    ("case", "status", "body", "headers", "error", "reason", "after"), ERRORS, ids=[e[0] for e in ERRORS]
)
async def test_api_errors_retry_or_fail_with_eventbrites_reason(
    eb: Eventbrite,
    api: FakeEventbrite,
    case: str,
    status: int,
    body: Any,
    headers: dict[str, str],
    error: type[Exception],
    reason: str,
    after: float | None,
) -> None:
    api.fail(ORDER_PATH, status, body, **headers)
    with pytest.raises(error, match=reason) as caught:
        await eb.normalize(raw(envelope("order.placed")))
    if isinstance(caught.value, RetryLater):
        assert caught.value.after == after
    assert api.paths == [ORDER_PATH]  # a redirect is never followed


async def test_an_unreachable_api_is_retried() -> None:
    source = make_source("http://127.0.0.1:9")
    try:
        with pytest.raises(RetryLater, match="Eventbrite API unreachable"):
            await source.normalize(raw(envelope("order.placed")))
    finally:
        await source.close()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"[]", "not a JSON object"),
        (b'{"api_url": "x"}', "no config.action"),
        (b'{"api_url": "x", "config": {"action": 3}}', "no config.action"),
        (b'{"config": {"action": "order.placed"}}', "refused api_url: missing; it was not fetched"),
    ],
)
async def test_malformed_envelopes_say_why(eb: Eventbrite, body: bytes, reason: str) -> None:
    with pytest.raises(MalformedPayload, match=re.escape(reason)):
        await eb.normalize(raw(body))


# --- samples from Eventbrite's own SDKs (read in place, never copied) ---------------------------------

SHARED = SHARED_PAYLOADS / "eventbrite"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="shared sample payloads not present")


def shared(name: str) -> Any:
    return json.loads((SHARED / name).read_bytes())


@needs_shared
async def test_sdk_order_and_attendee_page_normalise(eb: Eventbrite, api: FakeEventbrite) -> None:
    order, page = shared("order.json"), shared("order_attendees_page.json")
    api.objects = {f"/v3/orders/{order['id']}/": order, f"/v3/orders/{order['id']}/attendees/": page}
    [event] = await eb.normalize(raw(envelope("order.placed", order["resource_uri"])))
    attendee = page["attendees"][0]
    assert (event.type, event.contact.email, event.contact.first_name) == (
        "ticket.ordered",
        attendee["profile"]["email"],
        attendee["profile"]["first_name"],
    )
    assert (event.properties["price"], event.properties["currency"]) == (Decimal("108.46"), "ARS")
    assert event.properties["order_total"] == Decimal(order["costs"]["gross"]["major_value"])


@needs_shared
@pytest.mark.parametrize(
    ("name", "error", "reason"),
    [
        ("error_not_found.json", MalformedPayload, "The order you requested does not exist"),
        ("error_no_auth.json", RetryLater, "401 NO_AUTH: An OAuth token is required"),
    ],
)
async def test_sdk_error_envelopes(
    eb: Eventbrite, api: FakeEventbrite, name: str, error: type[Exception], reason: str
) -> None:
    body = shared(name)
    api.fail(ORDER_PATH, body["status_code"], body)
    with pytest.raises(error, match=reason):
        await eb.normalize(raw(envelope("order.placed")))


@needs_shared
async def test_sdk_delivery_without_an_action_is_malformed(eb: Eventbrite, api: FakeEventbrite) -> None:
    body = (SHARED / "webhook_delivery_partial_from_sdk_test.json").read_bytes()
    with pytest.raises(MalformedPayload, match=r"no config\.action"):
        await eb.normalize(raw(body))
    as_test = json.loads(body)
    as_test["config"]["action"] = "test"
    assert await eb.normalize(raw(json.dumps(as_test).encode())) == []
    assert api.requests == []


# --- end to end: real HTTP, the worker, the database ---------------------------------------------------

RULES = """\
rules:
  - name: see-you-soon
    when: ticket.ordered
    kind: transactional
    exit_on: [ticket.refunded]
    steps:
      - wait: 1d
        send: {via: email, template: see-you}
"""


@dataclass
class Running:
    client: TestClient
    gateway: RunningGateway
    clock: FakeClock

    async def post(self, body: bytes, token: str = URL_TOKEN) -> tuple[int, Any]:
        response = await self.client.post(f"/hooks/eb/{token}", data=body)
        return response.status, await response.json()

    async def advance(self, **delta: float) -> None:
        self.clock.advance(timedelta(**delta))
        await self.gateway.worker.drain()

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        with self.gateway.db.engine.connect() as conn:
            return [tuple(row) for row in conn.exec_driver_sql(sql)]


async def start(
    aiohttp_client: Any,
    tmp_path: Path,
    db_url: str,
    api_base: str,
    smtp_port: int = 1,
    max_attempts: int = 3,
    rules: str = RULES,
) -> Running:
    config = f"""\
timezone: Europe/Paris
storage: {{url: '{db_url}'}}
worker: {{retry_base: 10s, max_attempts: {max_attempts}}}
sources:
  eb: {{plugin: eventbrite, url_token: {URL_TOKEN}, token: {API_TOKEN}, api_base: '{api_base}'}}
sinks:
  email: {{plugin: smtp, host: 127.0.0.1, port: {smtp_port}, tls: none, sender: tickets@example.com}}
{rules}"""
    pm = get_plugin_manager()  # the plugin loads through its entry point, like any installed one
    templates = {
        "see-you.subject.j2": "See you soon",
        "see-you.txt.j2": "Hello {{ contact.first_name }}",
        "reminder.subject.j2": "Tomorrow: {{ event.properties.event_name }}",
        "reminder.txt.j2": "{{ event.properties.venue.name }}, {{ event.properties.starts_local[11:16] }}",
    }
    settings = load_config(write_deployment(tmp_path, config, templates), collect(pm), pm)
    clock = FakeClock(NOW)
    app = create_app(settings, pm=pm, clock=clock, role="web")
    client = await aiohttp_client(app)
    return Running(client, app[GATEWAY_KEY], clock)


async def test_end_to_end_orders_and_refunds_through_the_database(
    aiohttp_client: Any, tmp_path: Path, db_url: str, smtp: SmtpCatcher, api: FakeEventbrite
) -> None:
    d = await start(aiohttp_client, tmp_path, db_url, api.base, smtp.port)
    assert await d.post(envelope("order.placed"), token="wrong-token-wrong-token") == (
        404,
        {"error": "no source named 'eb' in this deployment"},
    )
    assert (await d.post(envelope("order.placed")))[1]["status"] == "accepted"
    assert (await d.post(envelope("order.placed")))[1]["status"] == "duplicate"
    await d.advance(seconds=0)
    assert d.rows("SELECT type, correlation FROM events ORDER BY id") == [
        ("ticket.ordered", '["eventbrite-attendee:3141592001","eventbrite-order:7712345001"]'),
        ("ticket.ordered", '["eventbrite-attendee:3141592002","eventbrite-order:7712345001"]'),
    ]
    assert d.rows("SELECT email, first_name, phone FROM contacts ORDER BY id") == [
        ("camille.durand@example.org", "Camille", "+33612345678"),
        ("noah.martin@example.org", "Noah", None),
    ]
    api.objects[ORDER_PATH] = with_attendees(refund_first)
    assert (await d.post(envelope("order.refunded")))[1]["status"] == "accepted"
    await d.advance(hours=1)
    assert d.rows("SELECT status FROM enrolments ORDER BY id") == [("exited",), ("active",)]
    await d.advance(days=1)
    assert [m["To"] for m in smtp.messages] == ["noah.martin@example.org"]
    assert d.rows("SELECT status FROM inbox ORDER BY id") == [("processed",), ("processed",)]


REMINDER = """\
rules:
  - name: event-reminder
    when: ticket.ordered
    kind: transactional
    exit_on: [ticket.refunded]
    steps:
      - at: "{{ event.properties.starts_at }}"
        offset: -1d
        time: "10:00"
        send: {via: email, template: reminder}
"""


async def test_end_to_end_a_reminder_the_day_before_the_event_at_10_local(
    aiohttp_client: Any, tmp_path: Path, db_url: str, smtp: SmtpCatcher, api: FakeEventbrite
) -> None:
    """The event starts on 2 June at 19:00 in Paris: the reminder goes on 1 June at 10:00 Paris time, a due
    time stored in the jobs table the moment the ticket is bought; a refunded attendee gets none."""
    d = await start(aiohttp_client, tmp_path, db_url, api.base, smtp.port, rules=REMINDER)
    await d.post(envelope("order.placed"))
    await d.advance(seconds=0)
    due = sorted(_utc(due) for (due,) in d.rows("SELECT due_at FROM jobs WHERE kind = 'step'"))
    assert due == [datetime(2026, 6, 1, 8, 0, tzinfo=UTC)] * 2
    api.objects[ORDER_PATH] = with_attendees(refund_first)
    await d.post(envelope("order.refunded"))
    await d.advance(days=19, hours=21, minutes=59)  # 1 June, 07:59 UTC
    assert smtp.messages == []
    await d.advance(minutes=1)
    [message] = smtp.messages
    assert (message["To"], message["Subject"]) == ("noah.martin@example.org", "Tomorrow: Atelier céramique")
    assert message.get_content().strip() == "La Halle, 19:00"


async def test_end_to_end_a_forged_api_url_is_stored_failed_and_never_fetched(
    aiohttp_client: Any, tmp_path: Path, db_url: str, api: FakeEventbrite
) -> None:
    d = await start(aiohttp_client, tmp_path, db_url, api.base)
    forged = envelope("order.placed", f"https://www.eventbriteapi.com@{api.base.removeprefix('http://')}/v3/orders/1/")
    assert (await d.post(forged))[0] == 200
    await d.advance(seconds=0)
    [(status, error)] = d.rows("SELECT status, error FROM inbox")
    assert status == "failed" and "user info; it was not fetched" in error
    assert api.requests == [] and d.rows("SELECT count(*) FROM events") == [(0,)]


async def test_end_to_end_a_bad_token_is_retried_dead_lettered_then_replayed(
    aiohttp_client: Any, tmp_path: Path, db_url: str, api: FakeEventbrite
) -> None:
    d = await start(aiohttp_client, tmp_path, db_url, api.base)
    api.fail(ORDER_PATH, 429, RATE_LIMIT, times=1, **{"Retry-After": "120"})
    api.fail(ORDER_PATH, 401, NO_AUTH, times=2)
    await d.post(envelope("order.placed"))
    await d.advance(seconds=0)
    [(status, error, due_at)] = d.rows("SELECT status, last_error, due_at FROM jobs WHERE kind = 'inbox'")
    assert status == "pending" and "429 HIT_RATE_LIMIT" in error
    assert _utc(due_at) >= NOW + timedelta(seconds=120)  # Retry-After wins over the 10 s backoff
    await d.advance(seconds=121)
    await d.advance(minutes=5)
    [(status, error)] = d.rows("SELECT status, last_error FROM jobs WHERE kind = 'inbox'")
    assert status == "dead" and "401 NO_AUTH: An OAuth token is required" in error and "sources.eb.token" in error
    assert d.rows("SELECT status FROM inbox") == [("received",)]  # the call is kept
    with d.gateway.db.engine.begin() as conn:  # the token fixed, `declic replay` requeues the dead letter
        assert len(requeue(conn, None, d.clock.now())) == 1
    await d.advance(seconds=0)
    assert d.rows("SELECT type FROM events") == [("ticket.ordered",), ("ticket.ordered",)]
    assert len(api.requests) == 4


def _utc(value: Any) -> datetime:
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


# --- property: random calls never cause a 5xx; random envelopes never reach another host ---------------

_NAMES = st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,15}", fullmatch=True).filter(
    lambda n: n.lower() not in {"content-length", "transfer-encoding", "host", "connection", "expect"}
)
_VALUES = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)
_URLS = st.one_of(
    st.sampled_from([ORDER_URL, ATTENDEE_URL, *[r[1] for r in REFUSED]]),
    st.text(max_size=80),
    st.builds(lambda path: "https://www.eventbriteapi.com/" + path, st.text(max_size=40)),
)
_ENVELOPES = st.builds(
    lambda url, action: json.dumps({"api_url": url, "config": {"action": action}}).encode(),
    _URLS,
    st.sampled_from([*ACTIONS, "test", "event.updated", ""]),
)


@pytest.fixture
async def fuzzed(aiohttp_client: Any, tmp_path: Path, api: FakeEventbrite) -> tuple[Running, FakeEventbrite]:
    return await start(aiohttp_client, tmp_path, f"sqlite:///{tmp_path}/fuzz.db", api.base), api


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    token=st.sampled_from([URL_TOKEN, "nope", URL_TOKEN + "x"]),
    headers=st.dictionaries(_NAMES, _VALUES, max_size=5),
    body=st.one_of(st.binary(max_size=300), _ENVELOPES),
)
async def test_random_calls_never_cause_a_server_error(
    fuzzed: tuple[Running, FakeEventbrite], token: str, headers: dict[str, str], body: bytes
) -> None:
    d, api = fuzzed
    response = await d.client.post(f"/hooks/eb/{token}", data=body, headers=headers)
    assert 200 <= response.status < 500
    await d.gateway.worker.drain()
    assert all(ALLOWED_PATH.fullmatch(path) for path in api.paths)
    crashed = d.rows("SELECT error FROM inbox WHERE error LIKE '%crashed%'")
    assert crashed == []


def test_the_documented_config_is_valid(tmp_path: Path) -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "connect" / "eventbrite.md").read_text()
    [block] = re.findall(r"```yaml\n(.*?)```", doc, re.S)
    pm = get_plugin_manager()
    env = {"EVENTBRITE_URL_TOKEN": URL_TOKEN, "EVENTBRITE_TOKEN": API_TOKEN}
    settings = load_config(write_deployment(tmp_path, block), collect(pm), pm, env=env)
    cls, config = settings.source_plugins["tickets"]
    assert cls is Eventbrite and config.api_base == "https://www.eventbriteapi.com"
