"""The worker's inbox path: calls received together are applied together, in arrival order."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.app import create_app
from gateway.config import load_config
from gateway.ingest import GATEWAY_KEY
from gateway.plugins import collect, get_plugin_manager
from gateway.testing import FakeClock, ScriptedPlugin, write_deployment


@pytest.fixture
async def deployment(aiohttp_client: Any, tmp_path: Path, db_url: str) -> Any:
    pm = get_plugin_manager(extra=[ScriptedPlugin()])
    config = f"storage: {{url: '{db_url}'}}\nsources:\n  in: {{plugin: scripted, url_token: tok}}\n"
    settings = load_config(write_deployment(tmp_path, config, {}), collect(pm), pm)
    app = create_app(settings, pm=pm, clock=FakeClock(datetime(2026, 6, 1, tzinfo=UTC)), role="web")
    return await aiohttp_client(app), app[GATEWAY_KEY]


def rows(gateway: Any, sql: str) -> list[tuple[Any, ...]]:
    with gateway.db.engine.connect() as conn:
        return [tuple(row) for row in conn.exec_driver_sql(sql)]


async def test_calls_applied_together_keep_their_order_and_a_bad_one_fails_alone(deployment: Any) -> None:
    client, gateway = deployment
    updates = [
        [{"type": "profile.updated", "contact": {"email": "ada@example.com", "first_name": "First"}}],
        [{"type": "x" * 101, "contact": {"email": "ada@example.com", "first_name": "Bad"}}],
        [{"type": "profile.updated", "contact": {"email": "ada@example.com", "first_name": "Third"}}],
    ]
    for events in updates:  # all stored before the worker runs: one batch
        assert (await client.post("/hooks/in/tok", data=json.dumps(events).encode())).status == 200

    await gateway.worker.drain()

    assert rows(gateway, "SELECT first_name FROM contacts") == [("Third",)]
    statuses = rows(gateway, "SELECT id, status, error FROM inbox ORDER BY id")
    assert [(i, status) for i, status, _ in statuses] == [(1, "processed"), (2, "failed"), (3, "processed")]
    assert "longer than 100 characters" in statuses[1][2]
    assert rows(gateway, "SELECT inbox_id, type FROM events ORDER BY id") == [
        (1, "profile.updated"),
        (3, "profile.updated"),
    ]
    # Every job is closed: nothing is retried, nothing is left running.
    assert rows(gateway, "SELECT status, COUNT(*) FROM jobs WHERE kind = 'inbox' GROUP BY status") == [("done", 3)]
