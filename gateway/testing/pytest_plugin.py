"""Declic's pytest plugin: a real gateway for a plugin's tests.

Install `declic[testing]` (pytest, pytest-aiohttp, aiosmtpd) and enable it in the plugin
project's `tests/conftest.py` (with `asyncio_mode = "auto"` in the pytest settings):

    pytest_plugins = ["declic_gateway.testing.pytest_plugin"]

Fixtures:

- `declic_smtp`: a real SMTP server on 127.0.0.1 (aiosmtpd) that keeps what it receives
  (`.messages`, `.to(address)`).
- `declic`: `await declic(config, templates=..., plugins=[module])` serves the real app over real
  HTTP on an embedded SQLite database in the test's folder, under a fake clock, and returns a
  `RunningDeclic`: `post(source, body, headers)` calls a webhook, `emit(*events)` injects
  canonical events through a test-only source, `advance(hours=1)` moves the clock and runs what
  became due, `rows(sql)` reads the database. In `config`, `{smtp_port}` stands for
  `declic_smtp`'s port. Plugins passed in `plugins` are registered whether or not they are
  installed, so a plugin's tests run from a plain checkout.

`hmac_sha256(body, secret)` signs a body the way most providers do (hex or base64).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import pytest
import sqlalchemy as sa

from ..http.app import create_app, load
from ..http.running import GATEWAY_KEY, RunningGateway
from ..plugins import get_plugin_manager
from . import FakeClock, ScriptedPlugin, SmtpCatcher, write_deployment

#: The test-only source `emit()` posts to: add it to a config with `sources: {<EMITTER>}`.
EMITTER_TOKEN = "declic-test-emitter"
#: Where the fake clock starts, unless a test says otherwise.
START = datetime(2026, 3, 14, 8, 0, tzinfo=UTC)


def hmac_sha256(body: bytes, secret: str, encoding: str = "hex") -> str:
    """HMAC-SHA256 of the raw body, as hex (default) or base64."""
    digest = hmac.new(secret.encode(), body, hashlib.sha256)
    return digest.hexdigest() if encoding == "hex" else base64.b64encode(digest.digest()).decode()


@dataclass
class RunningDeclic:
    """A running deployment under a fake clock, and the means to drive it."""

    client: Any  # aiohttp.test_utils.TestClient
    gateway: RunningGateway
    clock: FakeClock
    path: Path

    async def post(self, source: str, body: bytes, headers: dict[str, str] | None = None) -> Any:
        """POST a webhook to /hooks/{source} (add the URL token to `source` if it needs one)."""
        return await self.client.post(f"/hooks/{source}", data=body, headers=headers or {})

    async def emit(self, *events: dict[str, Any]) -> Any:
        """Inject canonical events (`Event` fields: type, contact, properties...) through the
        test-only `declic-test` source, which the config must declare (see `EMITTER`)."""
        body = json.dumps(list(events), default=str).encode()
        return await self.client.post(f"/hooks/declic-test/{EMITTER_TOKEN}", data=body)

    async def advance(self, **delta: float) -> int:
        """Move the clock by `timedelta(**delta)`, then run every job that became due; return how many ran."""
        self.clock.advance(timedelta(**delta))
        return await self.gateway.worker.drain()

    def rows(self, query: str, **params: Any) -> list[Any]:
        with self.gateway.db.engine.connect() as conn:
            return list(conn.execute(sa.text(query), params))


#: The config lines that declare the test-only source `emit()` posts to.
EMITTER = f"  declic-test:\n    plugin: scripted\n    url_token: {EMITTER_TOKEN}\n"

Start = Callable[..., Awaitable[RunningDeclic]]


@pytest.fixture
def declic_smtp() -> Iterator[SmtpCatcher]:
    catcher = SmtpCatcher().start()
    yield catcher
    catcher.stop()


@pytest.fixture
async def declic(aiohttp_client: Any, tmp_path: Path, declic_smtp: SmtpCatcher) -> AsyncIterator[Start]:
    async def start(
        config: str,
        *,
        templates: dict[str, str] | None = None,
        plugins: Iterable[object] = (),
        now: datetime = START,
        role: Literal["web", "worker", "all"] = "web",
    ) -> RunningDeclic:
        path = write_deployment(tmp_path, config.replace("{smtp_port}", str(declic_smtp.port)), templates)
        pm = get_plugin_manager(extra=[ScriptedPlugin()])
        for plugin in plugins:
            if not pm.is_registered(plugin):  # installed too: its entry point registered it already
                pm.register(plugin)
        settings, pm, _ = load(str(path), pm)
        clock = FakeClock(now)
        client = await aiohttp_client(create_app(settings, pm=pm, clock=clock, role=role))
        return RunningDeclic(client, client.app[GATEWAY_KEY], clock, path)

    yield start
