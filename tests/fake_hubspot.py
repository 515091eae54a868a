"""HubSpot for tests: its CRM v3 API as a real aiohttp server on 127.0.0.1, and its records and notifications.

The server follows HubSpot's read contract (developers.hubspot.com, CRM objects API v3):
`GET /crm/v3/objects/{contacts|deals}/{id}` with the private app's bearer token answers the
properties named in `properties` (null when unset, plus the few it always returns) and, for those
named in `propertiesWithHistory`, every value the property had with its timestamp; failures carry
HubSpot's documented error bodies, and every answer its rate-limit headers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

RATE_OK = {
    "X-HubSpot-RateLimit-Interval-Milliseconds": "10000",
    "X-HubSpot-RateLimit-Max": "100",
    "X-HubSpot-RateLimit-Remaining": "99",
}
# HubSpot's documented error bodies (developers.hubspot.com, API usage guidelines and error handling).
TEN_SECONDLY = {
    "status": "error",
    "message": "You have reached your ten_secondly_rolling limit.",
    "errorType": "RATE_LIMIT",
    "correlationId": "c033cdaa-2c40-4a64-ae48-b4cec88dad24",
    "policyName": "TEN_SECONDLY_ROLLING",
    "requestId": "3d3e35b7-0dae-4b9f-a6e3-9c230cbcf8dd",
}
DAILY = {**TEN_SECONDLY, "message": "You have reached your daily limit.", "policyName": "DAILY"}
UNAUTHORIZED = {
    "status": "error",
    "message": "Authentication credentials not found.",
    "correlationId": "8f1a7e2c-0000-4000-8000-000000000001",
    "category": "INVALID_AUTHENTICATION",
}
NOT_FOUND = {
    "status": "error",
    "message": "resource not found",
    "correlationId": "8f1a7e2c-0000-4000-8000-000000000002",
    "category": "OBJECT_NOT_FOUND",
}
#: What the CRM v3 API returns whatever `properties` asks for.
ALWAYS_RETURNED = {"hs_object_id", "createdate", "lastmodifieddate"}
Reply = tuple[int, dict[str, str], str]


@dataclass
class FakeHubSpot:
    """GET /crm/v3/objects/{contacts|deals}/{id} as HubSpot answers it; `replies` are served first."""

    token: str
    objects: dict[tuple[str, str], Any] = field(default_factory=dict)
    replies: list[Reply] = field(default_factory=list)
    seen: list[tuple[str, dict[str, str], str | None]] = field(default_factory=list)
    url: str = ""

    @property
    def paths(self) -> list[str]:
        return [path for path, _, _ in self.seen]

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append((request.path, dict(request.query), request.headers.get("Authorization")))
        if self.replies:
            status, headers, text = self.replies.pop(0)
            return web.Response(status=status, headers=headers, text=text)
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response(UNAUTHORIZED, status=401)
        found = self.objects.get((request.match_info["kind"], request.match_info["id"]))
        if found is None:
            return web.json_response(NOT_FOUND, status=404, headers=RATE_OK)
        return web.json_response(answer(found, request.query), headers=RATE_OK)


def answer(stored: dict[str, Any], query: Any) -> dict[str, Any]:
    """HubSpot's read contract: the properties asked for (null when unset), and `propertiesWithHistory` only for
    the properties named in that parameter."""
    names = [n for n in query.get("properties", "").split(",") if n]
    wanted_history = [n for n in query.get("propertiesWithHistory", "").split(",") if n]
    reply = {k: v for k, v in stored.items() if k != "propertiesWithHistory"}
    if names and "properties" in stored:
        props = stored["properties"]
        reply["properties"] = {n: props.get(n) for n in names} | {n: props[n] for n in ALWAYS_RETURNED if n in props}
    if wanted_history:
        history = stored.get("propertiesWithHistory") or {}
        reply["propertiesWithHistory"] = {n: history[n] for n in wanted_history if n in history}
    return reply


@asynccontextmanager
async def serving(fake: FakeHubSpot) -> AsyncIterator[FakeHubSpot]:
    """The fake on a free port of 127.0.0.1, its base URL in `fake.url`, for as long as the block runs."""
    app = web.Application()
    app.router.add_get("/crm/v3/objects/{kind}/{id}", fake.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    fake.url = str(server.make_url("")).rstrip("/")
    try:
        yield fake
    finally:
        await server.close()


def ms(moment: datetime) -> int:
    """Epoch milliseconds, as notifications give `occurredAt`."""
    return int(moment.timestamp() * 1000)


def stamp(moment: datetime) -> str:
    """A history timestamp as the CRM v3 API writes it."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def contact_record(
    object_id: str,
    properties: Mapping[str, str],
    history: Mapping[str, list[tuple[str, datetime]]],
    created: datetime,
    source_type: str = "EMAIL",
) -> dict[str, Any]:
    """A contact as HubSpot keeps it: each property in `history` has its values newest first, and the newest
    is the property's value."""
    props = {**properties, "hs_object_id": object_id}
    with_history: dict[str, list[dict[str, Any]]] = {}
    for name, entries in history.items():
        ordered = sorted(entries, key=lambda entry: entry[1], reverse=True)
        props[name] = ordered[0][0]
        with_history[name] = [{"value": v, "timestamp": stamp(t), "sourceType": source_type} for v, t in ordered]
    return {
        "id": object_id,
        "properties": props,
        "propertiesWithHistory": with_history,
        "createdAt": stamp(created),
        "updatedAt": stamp(created),
        "archived": False,
    }


def property_change(
    object_id: int, name: str, value: str | None, moment: datetime | None, event_id: int, portal_id: int
) -> dict[str, Any]:
    """One `contact.propertyChange` notification as the Webhooks API delivers it (without occurredAt when
    `moment` is None)."""
    item = {
        "eventId": event_id,
        "subscriptionId": 3200,
        "portalId": portal_id,
        "subscriptionType": "contact.propertyChange",
        "attemptNumber": 0,
        "objectId": object_id,
        "propertyName": name,
        "propertyValue": value,
        "changeSource": "EMAIL",
    }
    return item if moment is None else {**item, "occurredAt": ms(moment)}
