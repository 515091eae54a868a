"""The worker's inbox path: calls received together are applied together, in arrival order."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest
import sqlalchemy as sa

from declic_gateway import hookimpl
from declic_gateway.config import load_config
from declic_gateway.errors import RetryLater, StorageUnavailable
from declic_gateway.http.app import build_gateway, create_app
from declic_gateway.http.running import GATEWAY_KEY
from declic_gateway.jobs.worker import Worker
from declic_gateway.kit.events import Event
from declic_gateway.kit.sources import RawCall, Source
from declic_gateway.plugins import collect, get_plugin_manager
from declic_gateway.testing import FakeClock, ScriptedPlugin, ScriptedSource, write_deployment
from tests.conftest import locked, locked_inbox, until


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


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no text for this one")


class OddValuesSource(ScriptedSource):
    """`scripted`, where an event whose first name is "Odd" carries an external id that cannot be written as text,
    as a plugin building its events without validating them could."""

    name = "odd-values"

    def normalize(self, raw: RawCall) -> list[Event]:
        events = super().normalize(raw)
        return [
            event.model_copy(
                update={
                    "contact": event.contact.model_construct(
                        **{**dict(event.contact), "external_ids": {"k": Unprintable()}}
                    )
                }
            )
            if event.contact.first_name == "Odd"
            else event
            for event in events
        ]


class OddValuesPlugin:
    @hookimpl
    def register_sources(self, register: Callable[[type[Source]], None]) -> None:
        register(OddValuesSource)


async def test_a_call_whose_events_cannot_be_fitted_fails_alone_and_is_not_retried(
    aiohttp_client: Any, tmp_path: Path, db_url: str
) -> None:
    """Fitting (addresses, E.164, keys cut to the columns) runs when a call is normalised: a crash there fails
    that call, visibly and replayable, and neither holds back nor delays the calls claimed with it."""
    pm = get_plugin_manager(extra=[OddValuesPlugin()])
    config = f"storage: {{url: '{db_url}'}}\nsources:\n  in: {{plugin: odd-values, url_token: tok}}\n"
    settings = load_config(write_deployment(tmp_path, config, {}), collect(pm), pm)
    app = create_app(settings, pm=pm, clock=FakeClock(datetime(2026, 6, 1, tzinfo=UTC)), role="web")
    client, gateway = await aiohttp_client(app), app[GATEWAY_KEY]
    for first_name in ("Ada", "Odd", "Bea"):
        events = [
            {"type": "profile.updated", "contact": {"email": f"{first_name}@example.com", "first_name": first_name}}
        ]
        assert (await client.post("/hooks/in/tok", data=json.dumps(events).encode())).status == 200

    await gateway.worker.drain()

    assert rows(gateway, "SELECT first_name FROM contacts ORDER BY id") == [("Ada",), ("Bea",)]
    statuses = rows(gateway, "SELECT status, error FROM inbox ORDER BY id")
    assert [status for status, _ in statuses] == ["processed", "failed", "processed"]
    assert "could not be stored" in statuses[1][1] and "no text for this one" in statuses[1][1]
    # Each call's job ran once and is closed: the failing one is not tried again, nor are its neighbours.
    assert rows(gateway, "SELECT status, attempts FROM jobs WHERE kind = 'inbox' ORDER BY id") == [("done", 1)] * 3


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


class SlowProviderSource(ScriptedSource):
    """`scripted`, where a provider is asked about some calls: `order.placed` waits for its answer (`answer`);
    `checkout.started` is told to retry later the first time."""

    name = "slow-provider"
    asked = asyncio.Event()
    answer = asyncio.Event()
    retried: ClassVar[set[int]] = set()

    async def normalize(self, raw: RawCall) -> list[Event]:
        events = super().normalize(raw)
        if events and events[0].type == "order.placed":
            SlowProviderSource.asked.set()
            await SlowProviderSource.answer.wait()
        if events and events[0].type == "checkout.started" and raw.id not in SlowProviderSource.retried:
            SlowProviderSource.retried.add(raw.id)
            raise RetryLater("the provider is busy")
        return events


class SlowProviderPlugin:
    @hookimpl
    def register_sources(self, register: Callable[[type[Source]], None]) -> None:
        register(SlowProviderSource)


@pytest.fixture
async def slow_provider(aiohttp_client: Any, tmp_path: Path, db_url: str) -> Any:
    """Start a deployment whose source asks a slow provider (role `web`, or `all` for a running worker)."""
    SlowProviderSource.asked, SlowProviderSource.answer = asyncio.Event(), asyncio.Event()
    SlowProviderSource.retried = set()

    async def start(role: str, extra: str = "") -> Any:
        pm = get_plugin_manager(extra=[SlowProviderPlugin()])
        config = (
            f"storage: {{url: '{db_url}', busy_timeout: 1s}}\n"
            "sources:\n  in: {plugin: slow-provider, url_token: tok}\n" + extra
        )
        settings = load_config(write_deployment(tmp_path, config, {}), collect(pm), pm)
        app = create_app(settings, pm=pm, clock=FakeClock(datetime(2026, 6, 1, tzinfo=UTC)), role=role)
        return await aiohttp_client(app), app[GATEWAY_KEY]

    return start


def post(client: Any, kind: str, first_name: str) -> Any:
    events = [{"type": kind, "contact": {"email": "ada@example.com", "first_name": first_name}}]
    return client.post("/hooks/in/tok", data=json.dumps(events).encode())


def count_applying(gateway: Any) -> list[int]:
    """The calls each transaction applying calls marks processed, as they run."""
    marked: list[int] = []

    def count(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, many: bool) -> None:
        if statement.startswith("UPDATE inbox SET status"):  # once per transaction applying calls
            marked.append(len(parameters) if many else 1)

    sa.event.listen(gateway.db.engine, "before_cursor_execute", count)
    return marked


async def test_calls_claimed_one_by_one_wait_behind_a_slow_one_and_go_through_in_one_transaction(
    slow_provider: Any,
) -> None:
    """At light load each call is claimed alone (on SQLite, taken as it is stored). Calls that wait for their turn
    go through together once it comes, in arrival order: applied one transaction each, in turn, they queued up
    behind one another (docs/performance.md, session 17)."""
    client, gateway = await slow_provider("all")
    marked = count_applying(gateway)
    assert (await post(client, "order.placed", "Ordered")).status == 200
    await asyncio.wait_for(SlowProviderSource.asked.wait(), 10)
    for n in range(1, 6):  # each claimed as it comes: the worker is idle but for the slow call
        assert (await post(client, "profile.updated", f"v{n}")).status == 200
        claimed = f"SELECT count(*) FROM jobs WHERE kind = 'inbox' AND status = 'running' AND inbox_id = {n + 1}"
        await until(lambda query=claimed: rows(gateway, query) == [(1,)])  # type: ignore[misc]
    assert marked == []  # nothing goes ahead of the slow call

    SlowProviderSource.answer.set()
    await until(lambda: rows(gateway, "SELECT count(*) FROM inbox WHERE status = 'processed'") == [(6,)])

    assert marked == [6]
    assert rows(gateway, "SELECT first_name FROM contacts") == [("v5",)]  # applied in arrival order
    assert rows(gateway, "SELECT inbox_id FROM events ORDER BY id") == [(n,) for n in range(1, 7)]


async def test_a_call_told_to_retry_later_holds_back_no_call_behind_it(slow_provider: Any) -> None:
    client, gateway = await slow_provider("web")
    for kind, name in [("checkout.started", "Cart"), ("profile.updated", "v1"), ("profile.updated", "v2")]:
        assert (await post(client, kind, name)).status == 200

    await asyncio.wait_for(gateway.worker.drain(), 10)

    assert rows(gateway, "SELECT id, status FROM inbox ORDER BY id") == [
        (1, "received"),
        (2, "processed"),
        (3, "processed"),
    ]
    [(status, attempts, error)] = rows(gateway, "SELECT status, attempts, last_error FROM jobs WHERE inbox_id = 1")
    assert (status, attempts, error) == ("pending", 1, "the provider is busy")
    assert rows(gateway, "SELECT inbox_id FROM events ORDER BY inbox_id") == [(2,), (3,)]
    gateway.clock.advance(timedelta(hours=1))
    await asyncio.wait_for(gateway.worker.drain(), 10)
    assert rows(gateway, "SELECT status FROM inbox WHERE id = 1") == [("processed",)]
    assert rows(gateway, "SELECT inbox_id FROM events ORDER BY inbox_id") == [(1,), (2,), (3,)]


async def test_calls_the_database_could_not_apply_are_applied_once_when_it_is_back(
    slow_provider: Any, db_url: str
) -> None:
    """A run of calls the database keeps refusing (locked past its timeout again and again) is tried again in
    place for half a lease, while its lease surely holds; then it goes back to the queue, every call of it, and
    is applied once when the database is back."""
    client, gateway = await slow_provider("web", "worker: {lease: 10s}\n")
    for kind, name in [("order.placed", "Ordered"), ("profile.updated", "v1"), ("profile.updated", "v2")]:
        assert (await post(client, kind, name)).status == 200
    draining = asyncio.ensure_future(gateway.worker.drain())
    await asyncio.wait_for(SlowProviderSource.asked.wait(), 10)
    with locked_inbox(db_url), contextlib.suppress(StorageUnavailable):  # SQLite: drain's next claim fails too
        SlowProviderSource.answer.set()
        await asyncio.wait_for(draining, 30)
    assert rows(gateway, "SELECT count(*) FROM inbox WHERE status = 'processed'") == [(0,)]

    gateway.clock.advance(timedelta(hours=1))  # past the retry, or the lease of a job that could not be rescheduled
    await asyncio.wait_for(gateway.worker.drain(), 10)

    assert rows(gateway, "SELECT id, status FROM inbox ORDER BY id") == [
        (1, "processed"),
        (2, "processed"),
        (3, "processed"),
    ]
    assert rows(gateway, "SELECT inbox_id FROM events ORDER BY inbox_id") == [(1,), (2,), (3,)]
    assert rows(gateway, "SELECT first_name FROM contacts") == [("v2",)]


@pytest.mark.parametrize(
    ("share", "acks_waiting", "busy", "pause"),
    [
        (0.25, 64, 1.0, 0.3),  # processing took 0.1 s of CPU: acknowledgements get the next 0.3 s
        (0.5, 16, 0.9, 0.1),
        (0.25, 0, 1.0, 0.0),  # nobody waits for an acknowledgement: no reason to pause
        (0.25, 15, 1.0, 0.0),  # a stream, not a flood: pausing would only delay e-mails
        (0.25, 64, 0.5, 0.0),  # half a core is idle: acknowledgements do not need processing to step aside
        (1.0, 64, 1.0, 0.0),  # no limit
    ],
)
def test_processing_makes_way_for_a_flood_of_waiting_acknowledgements(
    tmp_path: Path, share: float, acks_waiting: int, busy: float, pause: float
) -> None:
    pm = get_plugin_manager()
    path = write_deployment(tmp_path, f"worker: {{processing_share: {share}}}\n", {})
    gateway = build_gateway(load_config(path, collect(pm), pm), pm=pm)
    gateway.committer.waiting = acks_waiting  # webhooks in the group commit's queue
    readings = iter([(0.0, 0.0), (0.0, 0.0), (0.6, 0.6 * busy)])  # (wall, process CPU) seconds
    worker = Worker(
        gateway.db,
        gateway.settings.worker,
        gateway.sources,
        gateway.router,
        gateway.worker.steps,
        lambda event: None,
        acks_waiting=lambda: gateway.committer.waiting,
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


async def test_a_run_of_calls_the_database_refused_for_a_moment_goes_first_when_it_answers(
    slow_provider: Any, db_url: str
) -> None:
    """A lock held elsewhere past busy_timeout (or the database away for a moment) refuses the first run of
    calls: that run is tried again before the runs behind it, so one contact's updates are applied in the order
    they came, and none is failed for a lock of the moment."""
    client, gateway = await slow_provider("web")
    assert (await post(client, "profile.updated", "Ada")).status == 200
    SlowProviderSource.answer.set()
    await gateway.worker.drain()  # Ada exists, to be locked
    SlowProviderSource.answer.clear()
    assert (await post(client, "order.placed", "Ordered")).status == 200  # its provider answers when told
    for n in range(35):  # several runs behind it (10 calls per transaction on SQLite, 30 on PostgreSQL)
        assert (await post(client, "profile.updated", f"v{n}")).status == 200
    failures: list[int] = []
    counted = gateway.db.on_unavailable
    gateway.db.on_unavailable = lambda: (failures.append(1), counted())
    try:
        draining = asyncio.ensure_future(gateway.worker.drain())
        await asyncio.wait_for(SlowProviderSource.asked.wait(), 10)  # claimed: the calls wait for the first
        with locked(db_url, "SELECT id FROM contacts FOR UPDATE"):  # an API write, another replica's step...
            SlowProviderSource.answer.set()
            await until(lambda: len(failures) >= 1)  # the first run refused
        await asyncio.wait_for(draining, 30)
    finally:
        gateway.db.on_unavailable = counted
    assert rows(gateway, "SELECT status, count(*) FROM inbox GROUP BY status") == [("processed", 37)]
    assert rows(gateway, "SELECT first_name FROM contacts") == [("v34",)]


async def three_calls_held(slow_provider: Any) -> Any:
    """A running worker holding three calls of Ada's: v1 and v2 wait behind an order whose provider is slow."""
    client, gateway = await slow_provider("all")
    assert (await post(client, "order.placed", "Ordered")).status == 200
    await asyncio.wait_for(SlowProviderSource.asked.wait(), 10)
    for name in ("v1", "v2"):
        assert (await post(client, "profile.updated", name)).status == 200
    await until(
        lambda: rows(gateway, "SELECT count(*) FROM jobs WHERE kind = 'inbox' AND status = 'running'") == [(3,)]
    )
    return client, gateway


async def test_calls_of_ours_claimed_again_after_their_lease_ran_out_are_applied_once(slow_provider: Any) -> None:
    """Calls waiting in memory (behind one whose provider is slow) while the database was out of reach for a
    lease, so their lease was not renewed: the worker's next claim takes them again. Their first run keeps them:
    each is applied once, and processed, not failed by a second run."""
    client, gateway = await three_calls_held(slow_provider)
    gateway.clock.advance(timedelta(minutes=1))  # past the lease, never renewed
    gateway.worker.wake()
    await until(lambda: rows(gateway, "SELECT min(attempts) FROM jobs WHERE kind = 'inbox'") == [(2,)])
    SlowProviderSource.answer.set()
    await until(lambda: rows(gateway, "SELECT count(*) FROM jobs WHERE kind = 'inbox' AND status = 'done'") == [(3,)])
    assert (await post(client, "profile.updated", "v3")).status == 200
    await until(lambda: rows(gateway, "SELECT count(*) FROM inbox WHERE status = 'processed'") == [(4,)])
    assert rows(gateway, "SELECT status FROM inbox ORDER BY id") == [("processed",)] * 4
    assert rows(gateway, "SELECT inbox_id, count(*) FROM events GROUP BY inbox_id ORDER BY inbox_id") == [
        (1, 1),
        (2, 1),
        (3, 1),
        (4, 1),
    ]
    assert rows(gateway, "SELECT first_name FROM contacts WHERE email = 'ada@example.com'") == [("v3",)]


async def test_a_stopping_worker_gives_back_at_once_the_calls_it_did_not_apply(slow_provider: Any) -> None:
    """Calls claimed and waiting (behind one whose provider is slow) when the process stops go back to the queue
    at once, not when their lease ends: the next process or another replica takes them first, and a call stored
    meanwhile waits behind them instead of being taken, and applied, ahead of them."""
    _, gateway = await three_calls_held(slow_provider)
    await gateway.worker.stop(grace=0)  # the app stopping, with no grace: the worker is cancelled at once
    await asyncio.sleep(0.1)  # once it has heard of the stop: a cancel racing with its wake-up may be lost
    for task in gateway.tasks:
        task.cancel()
    await asyncio.wait_for(asyncio.gather(*gateway.tasks, return_exceptions=True), 10)
    assert (
        rows(gateway, "SELECT status, locked_by, attempts FROM jobs WHERE kind = 'inbox' ORDER BY id")
        == [("pending", None, 0)] * 3
    )
