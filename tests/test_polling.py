"""Polling sources: a durable poll job per source, a persisted cursor, overlapping windows deduped."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from declic_gateway import (
    ContactRef,
    Event,
    Fetched,
    PluginConfig,
    PollingSource,
    RawCall,
    RetryLater,
    Source,
    hookimpl,
)
from declic_gateway.config import load_config
from declic_gateway.http.app import create_app
from declic_gateway.http.running import GATEWAY_KEY, RunningGateway
from declic_gateway.plugins import collect, get_plugin_manager
from declic_gateway.testing import FakeClock, write_deployment


class FeedConfig(PluginConfig):
    api_base: str


class Feed(PollingSource):
    """Test-only: GET /activity?since=CURSOR answers opens with ids; the window overlaps by one item."""

    name = "feed"
    Config = FeedConfig
    interval = timedelta(minutes=5)

    async def poll(self, cursor: str | None, now: datetime) -> Fetched:
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"{self.config.api_base}/activity", params={"since": cursor or "0"}) as response,
            ):
                if response.status == 429:
                    raise RetryLater("429 from the feed", after=float(response.headers["Retry-After"]))
                data = await response.json()
        except aiohttp.ClientConnectionError as exc:
            raise RetryLater(f"feed unreachable: {exc}") from None
        items = [(item["id"], json.dumps(item).encode()) for item in data["items"]]
        return Fetched(items, cursor=str(data["last"]))

    def normalize(self, raw: RawCall) -> list[Event]:
        item = json.loads(raw.body)
        return [Event(type="email.opened", occurred_at=raw.received_at, contact=ContactRef(email=item["email"]))]


class Plugin:
    @hookimpl
    def register_sources(self, register: Callable[[type[Source]], None]) -> None:
        register(Feed)


class Provider:
    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.throttle = False
        self.asked: list[str] = []

    async def activity(self, request: web.Request) -> web.Response:
        self.asked.append(request.query["since"])
        if self.throttle:
            return web.Response(status=429, headers={"Retry-After": "600"})
        since = int(request.query["since"])
        window = [i for i in self.items if i["n"] >= since - 1]  # overlaps by one item on purpose
        return web.json_response({"items": window, "last": max([since, *(i["n"] for i in window)])})


@pytest.fixture
async def provider() -> AsyncIterator[tuple[Provider, TestServer]]:
    state = Provider()
    app = web.Application()
    app.router.add_get("/activity", state.activity)
    server = TestServer(app)
    await server.start_server()
    yield state, server
    await server.close()


async def deployment(aiohttp_client: Any, tmp_path: Path, db_url: str, base: str) -> tuple[RunningGateway, FakeClock]:
    pm = get_plugin_manager(extra=[Plugin()])
    path = write_deployment(
        tmp_path, f"storage: {{url: '{db_url}'}}\nsources:\n  reports: {{plugin: feed, api_base: '{base}'}}\n"
    )
    settings = load_config(path, collect(pm), pm)
    clock = FakeClock(datetime(2026, 7, 1, tzinfo=UTC))
    app = create_app(settings, pm=pm, clock=clock, role="web")
    await aiohttp_client(app)
    return app[GATEWAY_KEY], clock


def rows(gateway: RunningGateway, sql: str) -> list[Any]:
    with gateway.db.engine.connect() as conn:
        return list(conn.exec_driver_sql(sql))


async def test_polls_store_each_item_once_and_resume_from_the_cursor(
    provider: tuple[Provider, TestServer], aiohttp_client: Any, tmp_path: Path, db_url: str
) -> None:
    state, server = provider
    gateway, clock = await deployment(aiohttp_client, tmp_path, db_url, str(server.make_url("")).rstrip("/"))
    state.items = [{"id": f"o{n}", "n": n, "email": f"r{n}@example.com"} for n in (1, 2)]
    await gateway.worker.drain()
    state.items.append({"id": "o3", "n": 3, "email": "r3@example.com"})
    clock.advance(timedelta(minutes=5))
    await gateway.worker.drain()
    assert state.asked == ["0", "2"]
    assert rows(gateway, "SELECT count(*), count(DISTINCT dedupe_key) FROM inbox") == [(3, 3)]
    assert rows(gateway, "SELECT count(*) FROM events WHERE type = 'email.opened'") == [(3,)]
    assert rows(gateway, "SELECT value FROM meta WHERE key = 'cursor:reports'") == [("3",)]
    assert rows(gateway, "SELECT count(*) FROM jobs WHERE kind = 'poll' AND status = 'pending'") == [(1,)]


async def test_a_throttled_poll_waits_and_never_dies(
    provider: tuple[Provider, TestServer], aiohttp_client: Any, tmp_path: Path, db_url: str
) -> None:
    state, server = provider
    gateway, clock = await deployment(aiohttp_client, tmp_path, db_url, str(server.make_url("")).rstrip("/"))
    state.throttle = True
    for _ in range(20):  # far more than max_attempts
        await gateway.worker.drain()
        clock.advance(timedelta(minutes=11))
    assert rows(gateway, "SELECT status, last_error FROM jobs WHERE kind = 'poll'") == [
        ("pending", "429 from the feed")
    ]
    state.throttle = False
    state.items = [{"id": "o1", "n": 1, "email": "r1@example.com"}]
    await gateway.worker.drain()
    assert rows(gateway, "SELECT count(*) FROM inbox") == [(1,)]


async def test_a_polling_source_takes_no_webhooks(
    provider: tuple[Provider, TestServer], aiohttp_client: Any, tmp_path: Path
) -> None:
    _, server = provider
    pm = get_plugin_manager(extra=[Plugin()])
    base = str(server.make_url("")).rstrip("/")
    path = write_deployment(
        tmp_path,
        f"storage: {{url: 'sqlite:///{tmp_path}/p.db'}}\nsources:\n  reports: {{plugin: feed, api_base: '{base}'}}\n",
    )
    settings = load_config(path, collect(pm), pm)
    client = await aiohttp_client(create_app(settings, pm=pm, role="web"))
    forged = json.dumps({"id": "x", "n": 1, "email": "victim@example.com"}).encode()
    for url in ("/hooks/reports", "/hooks/reports/anything"):
        assert (await client.post(url, data=forged)).status == 404


async def test_a_failing_poll_backs_off_up_to_the_interval(aiohttp_client: Any, tmp_path: Path, db_url: str) -> None:
    gateway, clock = await deployment(aiohttp_client, tmp_path, db_url, "http://127.0.0.1:1")  # refused
    gaps = []
    for _ in range(6):
        await gateway.worker.drain()
        [(due,)] = rows(gateway, "SELECT due_at FROM jobs WHERE kind = 'poll' AND status = 'pending'")
        due = due if isinstance(due, datetime) else datetime.fromisoformat(str(due))
        gaps.append((due.replace(tzinfo=UTC) - clock.now()).total_seconds())
        clock.set(due.replace(tzinfo=UTC))
    assert gaps[0] < gaps[2] < gaps[4] and max(gaps) <= Feed.interval.total_seconds()
