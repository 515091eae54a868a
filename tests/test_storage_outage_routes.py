"""Every HTTP route, called while the database refuses connections, answers 503 with Retry-After
(or, for the few that need no storage, what it answers anyway): never a 500.

The outage is real: the test's own PostgreSQL database stops accepting connections and the
app's open ones are terminated, as in a failover; the app is never told.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from conftest import POSTGRES_ENV, Factory, postgres_database

ADMIN_TOKEN = "adm1n-" + "k3y" * 8
ADMIN = f"admin:\n  token: {ADMIN_TOKEN}\n"
TRACK = """\
  site:
    plugin: track
    write_key: wk_public_0123456789
"""
#: Routes that answer without storage, and what they answer then.
NO_STORAGE = {"GET /healthz": 200, "GET /t/o/{token}": 200}  # the open pixel is served, the open lost

pytestmark = pytest.mark.postgres


@pytest.fixture
def db_url() -> Iterator[str]:
    """PostgreSQL only: its connections can be refused without stopping the server."""
    yield from postgres_database()


def refuse_connections(url: str, admin_url: str) -> None:
    name = sa.make_url(url).database
    admin = sa.create_engine(sa.make_url(admin_url).set(drivername="postgresql+psycopg"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
        conn.execute(
            sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name"), {"name": name}
        )
    admin.dispose()


def concrete(path: str) -> str:
    """A route's path with each {placeholder} filled with something of the right shape."""
    return re.sub(r"\{[^}]+\}", "1", path)


async def test_every_route_answers_503_with_retry_after_while_the_database_is_gone(
    deploy: Factory, db_url: str
) -> None:
    import os

    d = await deploy(extra=ADMIN)
    app = d.client.app
    assert app is not None
    calls = sorted(
        {
            (route.method, route.resource.canonical)
            for route in app.router.routes()
            if route.method in ("GET", "POST", "PUT", "PATCH", "DELETE") and route.resource is not None
        }
    )
    assert len(calls) > 20, calls  # the whole surface: hooks, links, API, dashboard, metrics, health
    refuse_connections(db_url, os.environ[POSTGRES_ENV])
    answers: dict[str, tuple[int, str | None]] = {}
    for method, path in calls:
        response = await d.client.request(
            method,
            concrete(path),
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"},
            data=b"{}" if method != "GET" else None,
        )
        answers[f"{method} {path}"] = (response.status, response.headers.get("Retry-After"))
    server_errors = {call: answer for call, answer in answers.items() if answer[0] >= 500 and answer != (503, "5")}
    assert server_errors == {}
    for call, status in NO_STORAGE.items():
        assert answers[call][0] == status
    unavailable = [call for call, answer in answers.items() if answer == (503, "5")]
    # Everything that reads or writes what Declic stores says so: the API, the dashboard, readiness.
    for expected in ("GET /readyz", "GET /api/v1/contacts", "GET /admin/"):
        assert any(call.startswith(expected) for call in unavailable), (expected, answers)
