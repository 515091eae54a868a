"""HubSpot CRM-note sink against a local stand-in for HubSpot's CRM v3 API.

The stand-in follows HubSpot's documented contract: notes guide (POST /crm/v3/objects/notes,
hs_timestamp required, association type 202 note -> contact, 201 with the object), the search
endpoints (`filterGroups`, `results`, `total`), the error body
`{"status": "error", "message", "correlationId", "category"}` and the 429 body and
X-HubSpot-RateLimit-* headers of the usage guidelines (shared/docs/providers.md, section 7).
Paths and the `idProperty` read come from hubspot-api-python `crm/objects/notes/api/`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pydantic import SecretStr, ValidationError

from declic_gateway import Message, Outcome, SendContext
from declic_gateway.config import load_config
from declic_gateway.http.app import create_app
from declic_gateway.http.running import GATEWAY_KEY
from declic_gateway.kit.sources import Deployment
from declic_gateway.plugins import collect, get_plugin_manager
from declic_gateway.testing import FakeClock, ScriptedPlugin, free_port, write_deployment
from declic_plugins.hubspot_note import SETTLE_SECONDS, HubSpotNote, HubSpotNoteConfig, note_body

TOKEN = "pat-eu1-test-token"
KEY_PROP = "declic_idempotency_key"
NOW = datetime(2026, 3, 14, 8, 0, tzinfo=UTC)
ADA = "ada@example.org"
CTX = SendContext(rule="hot-lead", step=1, kind="transactional", contact={"email": ADA}, event={})
MESSAGE = Message(to=ADA, text="Score 50 reached\nCall her", subject="Hot lead", idempotency_key="dcl-abc123")

Reply = tuple[int, dict[str, str], str]


def error(category: str, message: str) -> str:
    return json.dumps({"status": "error", "message": message, "correlationId": "c0ffee", "category": category})


RATE_LIMITED = json.dumps(
    {
        "status": "error",
        "message": "You have reached your ten_secondly_rolling limit.",
        "errorType": "RATE_LIMIT",
        "correlationId": "c0ffee",
        "policyName": "TEN_SECONDLY_ROLLING",
    }
)


@dataclass
class FakeHubSpot:
    """Contacts and notes of one portal. `replies[route]` queues answers given instead of the normal ones."""

    contacts: dict[str, str] = field(default_factory=lambda: {"501": ADA})
    notes: dict[str, dict[str, Any]] = field(default_factory=dict)
    note_properties: set[str] = field(default_factory=lambda: {"hs_timestamp", "hs_note_body", KEY_PROP})
    unique_key: bool = False
    conflict_status: int = 400
    #: Notes the search index does not show yet (HubSpot's search is eventually consistent).
    unindexed: set[str] = field(default_factory=set)
    replies: dict[str, list[Reply]] = field(default_factory=dict)
    extra_headers: dict[str, str] = field(default_factory=dict)
    #: Creates that store the note, then never answer (the client times out).
    hang_creates: int = 0
    hang_searches: bool = False
    requests: list[dict[str, Any]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    server: TestServer | None = None

    def routes(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/crm/v3/objects/contacts/search", self._wrap("contacts.search", self.search_contacts))
        app.router.add_post("/crm/v3/objects/notes/search", self._wrap("notes.search", self.search_notes))
        app.router.add_post("/crm/v3/objects/notes", self._wrap("notes.create", self.create_note))
        app.router.add_get("/crm/v3/objects/notes/{id}", self._wrap("notes.get", self.get_note))
        return app

    def _wrap(self, route: str, handler: Callable[[web.Request, Any], Any]) -> Any:
        async def handle(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            data = json.loads(body) if body else None
            self.requests.append(
                {"route": route, "method": request.method, "path": request.path, "query": dict(request.query)}
                | {"auth": request.headers.get("Authorization"), "json": data}
            )
            if request.headers.get("Authorization") != f"Bearer {TOKEN}":
                message = "Authentication credentials not found."
                return web.Response(status=401, text=error("INVALID_AUTHENTICATION", message))
            if self.replies.get(route):
                status, headers, text = self.replies[route].pop(0)
                return web.Response(status=status, headers=headers, text=text, content_type="application/json")
            if route.endswith("search") and self.hang_searches:
                await self.release.wait()
            status, answer = await handler(request, data)
            return web.json_response(answer, status=status, headers=self.extra_headers)

        return handle

    def route(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["route"] == name]

    async def search_contacts(self, request: web.Request, data: Any) -> tuple[int, Any]:
        [wanted] = data["filterGroups"][0]["filters"]
        assert (wanted["propertyName"], wanted["operator"]) == ("email", "EQ")
        found = [{"id": i, "properties": {"email": e}} for i, e in self.contacts.items() if e == wanted["value"]]
        return 200, {"total": len(found), "results": found[: data.get("limit", 10)]}

    async def search_notes(self, request: web.Request, data: Any) -> tuple[int, Any]:
        [wanted] = data["filterGroups"][0]["filters"]
        name, value = wanted["propertyName"], wanted["value"]
        found = [
            {"id": i, "properties": {name: n["properties"].get(name)}}
            for i, n in self.notes.items()
            if n["properties"].get(name) == value and i not in self.unindexed
        ]
        return 200, {"total": len(found), "results": found}

    async def create_note(self, request: web.Request, data: Any) -> tuple[int, Any]:
        properties = data.get("properties", {})
        unknown = sorted(set(properties) - self.note_properties)
        if unknown:
            problems = [
                {"isValid": False, "message": f'Property "{n}" does not exist', "error": "PROPERTY_DOESNT_EXIST"}
                for n in unknown
            ]
            return 400, json.loads(error("VALIDATION_ERROR", f"Property values were not valid: {json.dumps(problems)}"))
        if "hs_timestamp" not in properties:
            return 400, json.loads(error("VALIDATION_ERROR", "hs_timestamp is required"))
        for association in data.get("associations", []):
            if association["to"]["id"] not in self.contacts:
                return 400, json.loads(error("VALIDATION_ERROR", "One or more associations are invalid"))
        key = properties.get(KEY_PROP)
        if self.unique_key and key and any(n["properties"].get(KEY_PROP) == key for n in self.notes.values()):
            text = f"{key} already has that value on another object"
            category = "CONFLICT" if self.conflict_status == 409 else "VALIDATION_ERROR"
            return self.conflict_status, json.loads(error(category, text))
        note_id = str(9001 + len(self.notes))
        self.notes[note_id] = {"properties": properties, "associations": data.get("associations", [])}
        if self.hang_creates:
            self.hang_creates -= 1
            await self.release.wait()
        stamp = "2026-03-14T08:00:00.000Z"
        return 201, {"id": note_id, "properties": properties, "createdAt": stamp, "updatedAt": stamp, "archived": False}

    async def get_note(self, request: web.Request, data: Any) -> tuple[int, Any]:
        wanted, by = request.match_info["id"], request.query.get("idProperty")
        if by is not None and not self.unique_key:
            return 400, json.loads(error("VALIDATION_ERROR", f"{by} is not a unique property"))
        for note_id, note in self.notes.items():
            if (note["properties"].get(by) if by else note_id) == wanted:
                return 200, {"id": note_id, "properties": note["properties"]}
        return 404, json.loads(error("OBJECT_NOT_FOUND", "Object not found."))


@pytest.fixture
async def hubspot() -> AsyncIterator[FakeHubSpot]:
    fake = FakeHubSpot()
    fake.server = TestServer(fake.routes(), host="127.0.0.1")
    await fake.server.start_server()
    yield fake
    fake.release.set()
    await fake.server.close()


@pytest.fixture
async def make_sink(hubspot: FakeHubSpot) -> AsyncIterator[Callable[..., HubSpotNote]]:
    made: list[HubSpotNote] = []

    def make(**options: Any) -> HubSpotNote:
        assert hubspot.server is not None
        settings = {"app_token": TOKEN, "api_base": str(hubspot.server.make_url("")), "timeout": 2, **options}
        sink = HubSpotNote("crm", HubSpotNoteConfig.model_validate(settings), Deployment(None, "UTC", FakeClock(NOW)))
        made.append(sink)
        return sink

    yield make
    for sink in made:
        await sink.close()


async def test_a_note_is_searched_for_then_created_on_the_contact(
    hubspot: FakeHubSpot, make_sink: Callable[..., HubSpotNote]
) -> None:
    result = await make_sink().send(MESSAGE, CTX)
    assert result.outcome is Outcome.SENT and result.provider_id == "9001"
    assert [r["route"] for r in hubspot.requests] == ["notes.search", "contacts.search", "notes.create"]
    assert {r["method"] for r in hubspot.requests} == {"POST"}
    assert {r["auth"] for r in hubspot.requests} == {f"Bearer {TOKEN}"}
    [search] = hubspot.route("notes.search")
    assert search["json"]["filterGroups"] == [
        {"filters": [{"propertyName": KEY_PROP, "operator": "EQ", "value": "dcl-abc123"}]}
    ]
    [lookup] = hubspot.route("contacts.search")
    assert lookup["json"]["filterGroups"][0]["filters"] == [{"propertyName": "email", "operator": "EQ", "value": ADA}]
    [create] = hubspot.route("notes.create")
    assert create["json"] == {
        "properties": {
            "hs_timestamp": "2026-03-14T08:00:00.000Z",
            "hs_note_body": "<p><strong>Hot lead</strong></p>Score 50 reached<br>Call her",
            KEY_PROP: "dcl-abc123",
        },
        "associations": [
            {"to": {"id": "501"}, "types": [{"associationCategory": "HUBSPOT_DEFINED", "associationTypeId": 202}]}
        ],
    }


async def test_a_known_hubspot_id_skips_the_contact_search(
    hubspot: FakeHubSpot, make_sink: Callable[..., HubSpotNote]
) -> None:
    sink = make_sink()
    contact = {"email": ADA, "external_ids": {"hubspot": "501"}}
    message = Message(to=sink.address(contact) or "", text="hi", idempotency_key="dcl-k")
    result = await sink.send(message, CTX)
    assert result.outcome is Outcome.SENT and message.to == "501"
    assert [r["route"] for r in hubspot.requests] == ["notes.search", "notes.create"]


@pytest.mark.parametrize(
    ("contact", "address"),
    [
        ({"email": ADA, "external_ids": {"hubspot": "501"}}, "501"),
        ({"email": ADA, "attributes": {"hubspot_id": 501}}, "501"),
        ({"email": ADA, "attributes": {"hubspot_id": "not-an-id"}}, ADA),
        ({"email": ADA, "attributes": {}}, ADA),
        ({"email": None, "phone": "+33612345678", "attributes": {}}, None),
    ],
)
def test_address_is_the_hubspot_id_else_the_email(contact: dict[str, Any], address: str | None) -> None:
    config = HubSpotNoteConfig.model_validate({"app_token": TOKEN})
    assert HubSpotNote("crm", config, Deployment(None, "UTC", FakeClock(NOW))).address(contact) == address


@pytest.mark.parametrize(
    ("message", "body"),
    [
        (Message(to=ADA, text="a < b\nsecond"), "a &lt; b<br>second"),
        (Message(to=ADA, text="plain", html="<p>rich</p>"), "<p>rich</p>"),
        (Message(to=ADA, text="t", subject="R&D", html="<p>x</p>"), "<p><strong>R&amp;D</strong></p><p>x</p>"),
    ],
)
def test_the_note_body_is_html(message: Message, body: str) -> None:
    assert note_body(message) == body


async def test_a_body_over_hubspots_limit_is_refused_before_any_call(
    hubspot: FakeHubSpot, make_sink: Callable[..., HubSpotNote]
) -> None:
    result = await make_sink().send(Message(to=ADA, text="x" * 70_000, idempotency_key="k"), CTX)
    assert result.outcome is Outcome.PERMANENT and "65536" in (result.error or "")
    assert hubspot.requests == []


async def test_a_retried_step_after_a_lost_answer_creates_exactly_one_note(
    hubspot: FakeHubSpot, make_sink: Callable[..., HubSpotNote]
) -> None:
    hubspot.hang_creates = 1  # HubSpot stores the note, the answer never arrives
    sink = make_sink(timeout=0.3)
    first = await sink.send(MESSAGE, CTX)
    assert first.outcome is Outcome.RETRY and "TimeoutError" in (first.error or "")
    assert first.retry_after == SETTLE_SECONDS  # time for the search index to show the note
    second = await sink.send(MESSAGE, CTX)
    assert second.outcome is Outcome.SENT and second.provider_id == "9001"
    assert list(hubspot.notes) == ["9001"] and len(hubspot.route("notes.create")) == 1


@pytest.mark.parametrize("conflict_status", [400, 409])
async def test_a_unique_key_property_catches_what_the_lagging_index_misses(
    hubspot: FakeHubSpot, make_sink: Callable[..., HubSpotNote], conflict_status: int
) -> None:
    hubspot.unique_key, hubspot.conflict_status = True, conflict_status
    hubspot.hang_creates = 1
    sink = make_sink(timeout=0.3)
    assert (await sink.send(MESSAGE, CTX)).outcome is Outcome.RETRY
    hubspot.unindexed = {"9001"}  # the search does not show it yet
    result = await sink.send(MESSAGE, CTX)
    assert result.outcome is Outcome.SENT and result.provider_id == "9001"
    [read] = hubspot.route("notes.get")
    assert read["path"] == "/crm/v3/objects/notes/dcl-abc123" and read["query"] == {"idProperty": KEY_PROP}
    assert list(hubspot.notes) == ["9001"]


async def test_without_a_unique_property_a_lagging_index_means_waiting_not_a_duplicate(
    hubspot: FakeHubSpot, make_sink: Callable[..., HubSpotNote]
) -> None:
    hubspot.notes["9001"] = {"properties": {KEY_PROP: "dcl-abc123"}, "associations": []}
    hubspot.unindexed = {"9001"}
    hubspot.unique_key = True  # HubSpot refuses the second note ...
    hubspot.replies["notes.get"] = [(404, {}, error("OBJECT_NOT_FOUND", "Object not found."))]  # ... not yet readable
    result = await make_sink().send(MESSAGE, CTX)
    assert result.outcome is Outcome.RETRY and result.retry_after == SETTLE_SECONDS
    assert list(hubspot.notes) == ["9001"]


async def test_a_missing_contact_is_a_permanent_failure_to_replay_later(
    hubspot: FakeHubSpot, make_sink: Callable[..., HubSpotNote]
) -> None:
    hubspot.contacts = {}
    result = await make_sink().send(MESSAGE, CTX)
    assert result.outcome is Outcome.PERMANENT
    assert result.error == f"no HubSpot contact has the e-mail {ADA}: create it, then replay the step"
    assert hubspot.notes == {}


async def test_a_portal_without_the_key_property_is_told_how_to_fix_it(
    hubspot: FakeHubSpot, make_sink: Callable[..., HubSpotNote]
) -> None:
    hubspot.note_properties.discard(KEY_PROP)
    result = await make_sink().send(MESSAGE, CTX)
    assert result.outcome is Outcome.PERMANENT
    assert "PROPERTY_DOESNT_EXIST" in (result.error or "") and "create the note property" in (result.error or "")


async def test_key_property_null_skips_the_search(hubspot: FakeHubSpot, make_sink: Callable[..., HubSpotNote]) -> None:
    hubspot.note_properties.discard(KEY_PROP)
    result = await make_sink(key_property=None).send(MESSAGE, CTX)
    assert result.outcome is Outcome.SENT
    assert [r["route"] for r in hubspot.requests] == ["contacts.search", "notes.create"]
    assert KEY_PROP not in hubspot.notes["9001"]["properties"]


# (case, route, HubSpot's answer, outcome, retry_after, text in the error)
ANSWERS = [
    ("429 with Retry-After", "notes.create", (429, {"Retry-After": "7"}, RATE_LIMITED), Outcome.RETRY, 7.0, "(429)"),
    (
        "429 without Retry-After: the window's length",
        "notes.search",
        (429, {"X-HubSpot-RateLimit-Interval-Milliseconds": "10000"}, RATE_LIMITED),
        Outcome.RETRY,
        10.0,
        "TEN_SECONDLY_ROLLING: You have reached",
    ),
    (
        "429 daily limit",
        "contacts.search",
        (429, {}, RATE_LIMITED.replace("TEN_SECONDLY_ROLLING", "DAILY")),
        Outcome.RETRY,
        3600.0,
        "DAILY",
    ),
    (
        "500 on create: wait for the index",
        "notes.create",
        (500, {}, error("INTERNAL", "oops")),
        Outcome.RETRY,
        60.0,
        "",
    ),
    ("503 on create with Retry-After", "notes.create", (503, {"Retry-After": "120"}, ""), Outcome.RETRY, 120.0, "503"),
    ("502 on a search", "notes.search", (502, {}, "<html>Bad gateway</html>"), Outcome.RETRY, None, "Bad gateway"),
    ("423 locked", "contacts.search", (423, {}, error("LOCKED", "locked")), Outcome.RETRY, None, "423"),
    (
        "401",
        "notes.create",
        (401, {}, error("INVALID_AUTHENTICATION", "expired")),
        Outcome.PERMANENT,
        None,
        "app_token",
    ),
    (
        "403 missing scopes",
        "contacts.search",
        (403, {}, error("MISSING_SCOPES", "This app hasn't been granted all required scopes")),
        Outcome.PERMANENT,
        None,
        "crm.objects.contacts.write",
    ),
    (
        "400 validation",
        "notes.create",
        (400, {}, error("VALIDATION_ERROR", "hs_timestamp is invalid")),
        Outcome.PERMANENT,
        None,
        "answered 400 to POST /crm/v3/objects/notes: VALIDATION_ERROR: hs_timestamp is invalid",
    ),
    ("404", "notes.create", (404, {}, ""), Outcome.PERMANENT, None, "answered 404 to POST /crm/v3/objects/notes"),
    ("201 not JSON", "notes.create", (201, {}, "created!"), Outcome.RETRY, 60.0, "something other than a JSON"),
    ("201 without an id", "notes.create", (201, {}, '{"properties": {}}'), Outcome.RETRY, 60.0, "sent no id"),
    ("200 search not JSON", "notes.search", (200, {}, "<html>"), Outcome.RETRY, None, "something other than a JSON"),
    ("200 search without results", "contacts.search", (200, {}, '{"total": 1}'), Outcome.RETRY, None, "results list"),
]


@pytest.mark.parametrize(("case", "route", "answer", "outcome", "after", "text"), ANSWERS, ids=[a[0] for a in ANSWERS])
async def test_answer_classes(
    hubspot: FakeHubSpot,
    make_sink: Callable[..., HubSpotNote],
    case: str,
    route: str,
    answer: Reply,
    outcome: Outcome,
    after: float | None,
    text: str,
) -> None:
    hubspot.replies[route] = [answer]
    result = await make_sink().send(MESSAGE, CTX)
    assert (result.outcome, result.retry_after) == (outcome, after)
    assert text in (result.error or "")
    if route != "notes.create":
        assert hubspot.route("notes.create") == []


async def test_a_search_that_never_answers_is_a_timeout_to_retry(
    hubspot: FakeHubSpot, make_sink: Callable[..., HubSpotNote]
) -> None:
    hubspot.hang_searches = True
    result = await make_sink(timeout=0.3).send(MESSAGE, CTX)
    assert result.outcome is Outcome.RETRY and result.retry_after is None and "TimeoutError" in (result.error or "")


async def test_connection_refused_is_retried(make_sink: Callable[..., HubSpotNote]) -> None:
    result = await make_sink(api_base=f"http://127.0.0.1:{free_port()}").send(MESSAGE, CTX)
    assert result.outcome is Outcome.RETRY and "unreachable" in (result.error or "")


async def test_an_exhausted_window_waits_without_calling(
    hubspot: FakeHubSpot, make_sink: Callable[..., HubSpotNote]
) -> None:
    hubspot.extra_headers = {"X-HubSpot-RateLimit-Remaining": "0", "X-HubSpot-RateLimit-Interval-Milliseconds": "10000"}
    sink = make_sink()
    first = await sink.send(MESSAGE, CTX)
    assert first.outcome is Outcome.RETRY and first.retry_after == 10.0 and "Remaining: 0" in (first.error or "")
    assert [r["route"] for r in hubspot.requests] == ["notes.search"]  # the contact search waits for the window
    assert (await sink.send(MESSAGE, CTX)).outcome is Outcome.RETRY and len(hubspot.requests) == 1
    hubspot.extra_headers = {}
    sink.deployment.clock.advance(timedelta(seconds=10))  # type: ignore[attr-defined]
    assert (await sink.send(MESSAGE, CTX)).outcome is Outcome.SENT


async def test_calls_are_paced_by_rate(hubspot: FakeHubSpot, make_sink: Callable[..., HubSpotNote]) -> None:
    assert HubSpotNoteConfig.model_validate({"app_token": TOKEN}).rate == "90/10s"
    sink = make_sink(rate="4/1s")
    started = time.monotonic()
    # Three notes by contact id, two calls each: four calls at once, then one per 0.25 s.
    results = [await sink.send(Message(to="501", text="hi", idempotency_key=f"k{i}"), CTX) for i in range(3)]
    assert {r.outcome for r in results} == {Outcome.SENT}
    assert time.monotonic() - started >= 0.45


def test_config_validates_and_hides_the_token() -> None:
    config = HubSpotNoteConfig.model_validate({"app_token": TOKEN})
    assert isinstance(config.app_token, SecretStr) and TOKEN not in repr(config)
    assert config.api_base == "https://api.hubapi.com" and config.key_property == KEY_PROP
    with pytest.raises(ValidationError, match="internal name"):
        HubSpotNoteConfig.model_validate({"app_token": TOKEN, "key_property": "Declic Key"})
    with pytest.raises(ValidationError, match="invalid rate"):
        HubSpotNoteConfig.model_validate({"app_token": TOKEN, "rate": "fast"})


# -- through the real app ----------------------------------------------------------------------------


async def test_a_rule_logs_one_note_through_the_app_despite_a_lost_answer(
    aiohttp_client: Any, tmp_path: Path, db_url: str, hubspot: FakeHubSpot
) -> None:
    assert hubspot.server is not None
    hubspot.hang_creates = 1
    config = f"""\
storage: {{url: '{db_url}'}}
sources:
  in: {{plugin: scripted, url_token: tok}}
sinks:
  crm: {{plugin: hubspot_note, app_token: {TOKEN}, api_base: '{hubspot.server.make_url("")}', timeout: 0.3}}
worker: {{retry_base: 10s}}
rules:
  - name: hot-lead
    when: track.signed_up
    kind: transactional
    send: {{via: crm, template: hot-lead}}
"""
    templates = {"hot-lead.subject.j2": "Hot lead", "hot-lead.txt.j2": "{{ contact.first_name }} signed up"}
    path = write_deployment(tmp_path, config, templates)
    pm = get_plugin_manager(extra=[ScriptedPlugin()])
    clock = FakeClock(NOW)
    app = create_app(load_config(path, collect(pm), pm), pm=pm, clock=clock, role="web")
    client = await aiohttp_client(app)
    gateway = app[GATEWAY_KEY]

    def delivery() -> tuple[Any, ...]:
        with gateway.db.engine.connect() as conn:
            return tuple(conn.exec_driver_sql("SELECT status, provider_id, attempts FROM deliveries").one())

    event = {"type": "track.signed_up", "contact": {"email": ADA, "first_name": "Ada"}}
    assert (await client.post("/hooks/in/tok", data=json.dumps([event]).encode())).status == 200
    await gateway.worker.drain()
    assert delivery() == ("retrying", None, 1)
    clock.advance(timedelta(seconds=SETTLE_SECONDS + 1))
    await gateway.worker.drain()
    assert delivery() == ("sent", "9001", 2)
    assert list(hubspot.notes) == ["9001"] and len(hubspot.route("notes.create")) == 1
    note = hubspot.notes["9001"]
    assert note["properties"]["hs_note_body"] == "<p><strong>Hot lead</strong></p>Ada signed up"
    assert note["associations"][0]["to"] == {"id": "501"}
    assert note["properties"][KEY_PROP].startswith("dcl-")
