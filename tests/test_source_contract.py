"""What the core offers every source: URL tokens, validation pings, async enrichment with retries."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pydantic import SecretStr

from declic_gateway import ContactRef, Event, PluginConfig, RawCall, Source, hookimpl
from declic_gateway.config import load_config
from declic_gateway.errors import RetryLater
from declic_gateway.http.app import create_app
from declic_gateway.http.running import GATEWAY_KEY, RunningGateway
from declic_gateway.plugins import collect, get_plugin_manager
from declic_gateway.testing import FakeClock, write_deployment


class TokenConfig(PluginConfig):
    url_token: SecretStr
    api_base: str = "http://127.0.0.1:1"


class Unsigned(Source):
    """Like Mailchimp: signs nothing, validates the URL with a GET, then POSTs JSON."""

    name = "unsigned"
    Config = TokenConfig
    needs_url_token = True

    async def ping(self, request: web.Request) -> web.StreamResponse | None:
        return web.Response(text="ok")

    def normalize(self, raw: RawCall) -> list[Event]:
        data = json.loads(raw.body)
        return [Event(type="track.ping", occurred_at=raw.received_at, contact=ContactRef(email=data["email"]))]


class Enriching(Unsigned):
    """Like HubSpot or Eventbrite: the call carries an id; the details come from the provider's API."""

    name = "enriching"

    async def start(self) -> None:
        self.session = aiohttp.ClientSession()

    async def close(self) -> None:
        await self.session.close()

    async def normalize(self, raw: RawCall) -> list[Event]:  # type: ignore[override]
        object_id = json.loads(raw.body)["id"]
        async with self.session.get(f"{self.config.api_base}/objects/{object_id}") as response:
            if response.status == 429 or response.status >= 500:
                retry_after = response.headers.get("Retry-After")
                raise RetryLater(
                    f"provider answered {response.status}: {await response.text()}",
                    float(retry_after) if retry_after else None,
                )
            data = await response.json()
        return [Event(type="track.enriched", occurred_at=raw.received_at, contact=ContactRef(email=data["email"]))]


class Plugin:
    @hookimpl
    def register_sources(self, register: Callable[[type[Source]], None]) -> None:
        register(Unsigned)
        register(Enriching)


async def provider(replies: list[tuple[int, dict[str, str], str]]) -> TestServer:
    """A provider API that answers from a script, then with the object."""

    async def get_object(request: web.Request) -> web.Response:
        if replies:
            status, headers, text = replies.pop(0)
            return web.Response(status=status, headers=headers, text=text)
        return web.json_response({"id": request.match_info["id"], "email": "ada@example.com"})

    app = web.Application()
    app.router.add_get("/objects/{id}", get_object)
    server = TestServer(app)
    await server.start_server()
    return server


async def start(
    aiohttp_client: Any, tmp_path: Path, api_base: str = "http://127.0.0.1:1", max_attempts: int = 5
) -> tuple[TestClient, RunningGateway, FakeClock]:
    pm = get_plugin_manager(extra=[Plugin()])
    config = f"""\
storage: {{url: 'sqlite:///{tmp_path}/d.db'}}
worker: {{retry_base: 10s, max_attempts: {max_attempts}}}
sources:
  mc: {{plugin: unsigned, url_token: s3cret-token}}
  crm: {{plugin: enriching, url_token: t0k, api_base: '{api_base}'}}
"""
    settings = load_config(write_deployment(tmp_path, config), collect(pm), pm)
    clock = FakeClock(datetime(2026, 5, 1, tzinfo=UTC))
    app = create_app(settings, pm=pm, clock=clock, role="web")
    return await aiohttp_client(app), app[GATEWAY_KEY], clock


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("POST", "/hooks/mc/s3cret-token", 200),
        ("POST", "/hooks/mc/wrong-token", 404),
        ("POST", "/hooks/mc", 404),
        ("POST", "/hooks/mc/s3cret-token-and-more", 404),
        ("GET", "/hooks/mc/s3cret-token", 200),
        ("HEAD", "/hooks/mc/s3cret-token", 200),
        ("GET", "/hooks/mc/wrong-token", 404),
    ],
)
async def test_url_token_guards_unsigned_sources(
    aiohttp_client: Any, tmp_path: Path, method: str, path: str, status: int
) -> None:
    client, _, _ = await start(aiohttp_client, tmp_path)
    response = await client.request(method, path, data=b'{"email": "a@example.com"}')
    assert response.status == status
    if status == 404 and method != "HEAD":
        assert (await response.json()) == {"error": "no source named 'mc' in this deployment"}


async def test_a_source_without_a_ping_answers_405(deploy: Any) -> None:
    d = await deploy()
    response = await d.client.get("/hooks/shop")
    assert response.status == 405 and response.headers["Allow"] == "POST"


async def test_enrichment_retries_on_provider_errors_then_succeeds(aiohttp_client: Any, tmp_path: Path) -> None:
    server = await provider([(503, {}, "down"), (429, {"Retry-After": "120"}, "slow down")])
    try:
        client, gateway, clock = await start(aiohttp_client, tmp_path, str(server.make_url("")).rstrip("/"))
        assert (await client.post("/hooks/crm/t0k", data=b'{"id": 7}')).status == 200
        await gateway.worker.drain()
        with gateway.db.engine.connect() as conn:
            [(status, error)] = conn.exec_driver_sql("SELECT status, last_error FROM jobs WHERE kind = 'inbox'").all()
        assert status == "pending" and error == "provider answered 503: down"
        clock.advance(timedelta(seconds=11))
        await gateway.worker.drain()
        clock.advance(timedelta(seconds=100))  # Retry-After: 120 wins over the shorter backoff
        await gateway.worker.drain()
        with gateway.db.engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM events").scalar() == 0
        clock.advance(timedelta(seconds=21))
        await gateway.worker.drain()
        with gateway.db.engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT type FROM events").scalars().all() == ["track.enriched"]
            assert conn.exec_driver_sql("SELECT status FROM inbox").scalar() == "processed"
    finally:
        await server.close()


async def test_enrichment_that_keeps_failing_ends_in_the_dead_letter_with_the_call_kept(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    server = await provider([(500, {}, "internal error")] * 10)
    try:
        client, gateway, clock = await start(
            aiohttp_client, tmp_path, str(server.make_url("")).rstrip("/"), max_attempts=3
        )
        await client.post("/hooks/crm/t0k", data=b'{"id": 7}')
        for _ in range(4):
            await gateway.worker.drain()
            clock.advance(timedelta(minutes=5))
        with gateway.db.engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT status, last_error FROM jobs WHERE kind = 'inbox'").one() == (
                "dead",
                "provider answered 500: internal error",
            )
            assert conn.exec_driver_sql("SELECT status, body FROM inbox").one() == ("received", b'{"id": 7}')
    finally:
        await server.close()


class Quirky(Source):
    """Test-only: a large-batch provider with its own ack, a crashing verify, odd events, a slow normalize."""

    name = "quirky"
    Config = TokenConfig
    needs_url_token = True
    max_body_bytes = 4 * 1024 * 1024

    async def verify(self, request: web.Request, body: bytes) -> None:
        if body.startswith(b"crash"):
            raise KeyError("plugin bug")

    def acknowledge(self, status: str, inbox_id: int | None) -> web.StreamResponse | None:
        return web.Response(text="<Response/>", content_type="text/xml")

    async def normalize(self, raw: RawCall) -> list[Event]:  # type: ignore[override]
        data = json.loads(raw.body)
        await asyncio.sleep(data.get("sleep", 0))
        return [Event(occurred_at=raw.received_at, **item) for item in data["events"]]


class QuirkyPlugin:
    @hookimpl
    def register_sources(self, register: Callable[[type[Source]], None]) -> None:
        register(Quirky)


async def quirky(aiohttp_client: Any, tmp_path: Path) -> tuple[TestClient, RunningGateway]:
    pm = get_plugin_manager(extra=[QuirkyPlugin()])
    path = write_deployment(
        tmp_path, f"storage: {{url: 'sqlite:///{tmp_path}/q.db'}}\nsources:\n  q: {{plugin: quirky, url_token: tok}}\n"
    )
    settings = load_config(path, collect(pm), pm)
    app = create_app(settings, pm=pm, clock=FakeClock(datetime(2026, 5, 1, tzinfo=UTC)), role="web")
    return await aiohttp_client(app), app[GATEWAY_KEY]


def body(*events: dict[str, Any], sleep: float = 0) -> bytes:
    return json.dumps({"events": list(events), "sleep": sleep}).encode()


async def test_a_source_sets_its_own_body_limit_and_acknowledgement(aiohttp_client: Any, tmp_path: Path) -> None:
    client, _ = await quirky(aiohttp_client, tmp_path)
    big = body({"type": "track.big", "contact": {"email": "a@example.com"}, "properties": {"x": "y" * 2_000_000}})
    response = await client.post("/hooks/q/tok", data=io.BytesIO(big))
    assert (response.status, response.content_type, await response.text()) == (200, "text/xml", "<Response/>")
    too_big = await client.post("/hooks/q/tok", data=io.BytesIO(b"x" * (4 * 1024 * 1024 + 1)))
    assert too_big.status == 413


async def test_a_crash_in_verify_is_a_400_not_a_500(aiohttp_client: Any, tmp_path: Path) -> None:
    client, _ = await quirky(aiohttp_client, tmp_path)
    response = await client.post("/hooks/q/tok", data=b"crash please")
    assert (response.status, await response.json()) == (400, {"error": "this call could not be read"})


async def test_events_are_fitted_to_the_columns(aiohttp_client: Any, tmp_path: Path) -> None:
    client, gateway = await quirky(aiohttp_client, tmp_path)
    event = {
        "type": "track.odd",
        "correlation": ["k:" + "x" * 500],
        "contact": {
            "email": "e" * 330 + "@example.com",
            "phone": "+3361234\x005678",
            "first_name": "N" * 300,
            "external_ids": {"crm": "9" * 400},
        },
    }
    await client.post("/hooks/q/tok", data=body(event))
    await gateway.worker.drain()
    with gateway.db.engine.connect() as conn:
        email, phone, first = conn.exec_driver_sql("SELECT email, phone, first_name FROM contacts").one()
        correlation = conn.exec_driver_sql("SELECT correlation FROM events").scalar()
        crm = conn.exec_driver_sql("SELECT value FROM identities WHERE kind = 'crm'").scalar()
    assert (email, phone, len(first)) == (None, "+33612345678", 200)
    assert json.loads(correlation)[0].startswith("sha256:") and crm.startswith("sha256:")


async def test_an_event_repeated_in_a_later_batch_is_stored_once(aiohttp_client: Any, tmp_path: Path) -> None:
    client, gateway = await quirky(aiohttp_client, tmp_path)
    click = {"type": "email.clicked", "dedupe_key": "msg-1:click", "contact": {"email": "a@example.com"}}
    other = {"type": "email.clicked", "dedupe_key": "msg-2:click", "contact": {"email": "a@example.com"}}
    await client.post("/hooks/q/tok", data=body(click))
    await client.post("/hooks/q/tok", data=body(click, other))
    await gateway.worker.drain()
    with gateway.db.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT dedupe_key FROM events ORDER BY dedupe_key").scalars().all() == [
            "msg-1:click",
            "msg-2:click",
        ]


async def test_calls_are_applied_in_the_order_they_arrived(aiohttp_client: Any, tmp_path: Path) -> None:
    """The first call is slow to normalise (a provider fetch); the second must still land after it."""
    client, gateway = await quirky(aiohttp_client, tmp_path)
    await client.post(
        "/hooks/q/tok",
        data=body({"type": "profile.updated", "contact": {"email": "a@example.com", "first_name": "Old"}}, sleep=0.3),
    )
    await client.post(
        "/hooks/q/tok",
        data=body({"type": "profile.updated", "contact": {"email": "a@example.com", "first_name": "New"}}),
    )
    await gateway.worker.drain()
    with gateway.db.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT first_name FROM contacts").scalar() == "New"
