"""The worker's inbox path: calls received together are applied together, in arrival order."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from declic_gateway.config import load_config
from declic_gateway.http.app import build_gateway, create_app
from declic_gateway.http.running import GATEWAY_KEY
from declic_gateway.jobs.worker import Worker
from declic_gateway.plugins import collect, get_plugin_manager
from declic_gateway.testing import FakeClock, ScriptedPlugin, write_deployment


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


async def test_a_large_batch_is_applied_in_arrival_order_across_its_transactions(deployment: Any) -> None:
    client, gateway = deployment
    for n in range(1, 46):  # more calls than one claim takes, and several transactions per claim
        events = [{"type": "profile.updated", "contact": {"email": "ada@example.com", "first_name": f"v{n}"}}]
        assert (await client.post("/hooks/in/tok", data=json.dumps(events).encode())).status == 200

    await gateway.worker.drain()

    assert rows(gateway, "SELECT first_name FROM contacts") == [("v45",)]
    assert rows(gateway, "SELECT status, COUNT(*) FROM inbox GROUP BY status") == [("processed", 45)]


async def test_sqlite_applies_ten_calls_per_transaction_postgresql_thirty(deployment: Any) -> None:
    """SQLite's one writer keeps acknowledgements waiting behind at most ten calls; PostgreSQL acknowledges on
    another database thread and applies calls one transaction at a time across replicas, so it takes more."""
    client, gateway = deployment
    for n in range(45):
        events = [{"type": "profile.updated", "contact": {"email": f"c{n}@example.com"}}]
        assert (await client.post("/hooks/in/tok", data=json.dumps(events).encode())).status == 200
    marked: list[int] = []

    def count(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, many: bool) -> None:
        if statement.startswith("UPDATE inbox SET status"):  # each transaction marks its calls processed at once
            marked.append(len(parameters) if many else 1)

    sa.event.listen(gateway.db.engine, "before_cursor_execute", count)
    await gateway.worker.drain()

    assert rows(gateway, "SELECT status, COUNT(*) FROM inbox GROUP BY status") == [("processed", 45)]
    assert marked == ([10, 10, 10, 10, 5] if gateway.db.is_sqlite else [30, 15])


@pytest.mark.parametrize(
    ("share", "acks_waiting", "busy", "pause"),
    [
        (0.25, True, 1.0, 0.3),  # processing took 0.1 s of CPU: acknowledgements get the next 0.3 s
        (0.5, True, 0.9, 0.1),
        (0.25, False, 1.0, 0.0),  # nobody waits for an acknowledgement: no reason to pause
        (0.25, True, 0.5, 0.0),  # half a core is idle: acknowledgements do not need processing to step aside
        (1.0, True, 1.0, 0.0),  # no limit
    ],
)
def test_processing_makes_way_for_waiting_acknowledgements(
    tmp_path: Path, share: float, acks_waiting: bool, busy: float, pause: float
) -> None:
    pm = get_plugin_manager()
    path = write_deployment(tmp_path, f"worker: {{processing_share: {share}}}\n", {})
    gateway = build_gateway(load_config(path, collect(pm), pm), pm=pm)
    gateway.committer.waiting = 1 if acks_waiting else 0  # webhooks in the group commit's queue
    readings = iter([(0.0, 0.0), (0.0, 0.0), (0.6, 0.6 * busy)])  # (wall, process CPU) seconds
    worker = Worker(
        gateway.db,
        gateway.settings.worker,
        gateway.sources,
        gateway.router,
        gateway.worker.steps,
        lambda event: None,
        acks_waiting=lambda: gateway.committer.waiting > 0,
        cpu_clock=lambda: next(readings),
    )
    assert worker.pause_after(0.1) == pytest.approx(pause)


async def test_credentials_sent_with_a_webhook_are_not_stored(deployment: Any) -> None:
    client, gateway = deployment
    headers = {"Authorization": "Basic c2VjcmV0", "cookie": "session=abc", "X-Request-Id": "r-1"}
    response = await client.post("/hooks/in/tok", data=b"[]", headers=headers)
    assert response.status == 200

    (stored,) = rows(gateway, "SELECT headers FROM inbox")
    kept = {name.lower(): value for name, value in json.loads(stored[0]).items()}
    assert "authorization" not in kept and "cookie" not in kept
    assert kept["x-request-id"] == "r-1"
