"""Replicas on one PostgreSQL run the same plugins: a `declic serve` whose plugin set (entry-point
names, distributions and versions) differs from a live replica's refuses to start, and says how.

The differing plugin is a tiny distribution built by the test in a temporary directory and put on
PYTHONPATH for one process only: nothing is installed, and the suite does not depend on what
plugins the machine has. (On SQLite one process holds the file: there is nothing to compare.)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from conftest import SECRET, postgres_database
from declic_gateway.plugins import DISTRIBUTION
from declic_gateway.testing import SmtpCatcher, write_deployment
from processes import Server, Servers

CONFIG = """\
public_url: https://hooks.example.com
storage:
  url: {db_url}
sources:
  shop: {{plugin: shopify, secret: {secret}}}
sinks:
  email: {{plugin: smtp, host: 127.0.0.1, port: {smtp_port}, tls: none, sender: shop@example.com}}
rules:
  - name: thanks
    when: order.placed
    kind: transactional
    send: {{via: email, template: thanks}}
"""
TEMPLATES = {"thanks.subject.j2": "Thanks", "thanks.txt.j2": "Thanks {{ contact.first_name }}"}


def plugin_dist(root: Path, version: str) -> dict[str, str]:
    """A distribution `declic-extra-test` at `version`, declaring a `declic` entry point; the env to see it."""
    folder = root / f"extra-{version}"
    (folder / "declic_extra_test").mkdir(parents=True)
    (folder / "declic_extra_test" / "__init__.py").write_text('"""A plugin that implements no hook."""\n')
    info = folder / f"declic_extra_test-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: declic-extra-test\nVersion: {version}\n")
    (info / "entry_points.txt").write_text("[declic]\nextra-test = declic_extra_test\n")
    return {"PYTHONPATH": str(folder)}


@pytest.fixture
def pg_url() -> Iterator[str]:
    yield from postgres_database()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    with Servers.running(tmp_path) as pool:
        yield pool


def refused(server: Server) -> str:
    """The one line a refused process printed; it must have exited with status 2."""
    assert server.proc is not None
    assert server.proc.wait(timeout=30) == 2, server.log_text()[-3000:]
    [line] = [line for line in server.log_text().splitlines() if "plugin set differs" in line]
    return line


@pytest.mark.postgres
@pytest.mark.timeout(180)  # four process start-ups: about 20 s, 85 s on a loaded 2-core machine
def test_a_replica_with_another_plugin_set_refuses_to_start_and_names_the_difference(
    tmp_path: Path, smtp: SmtpCatcher, pg_url: str, servers: Servers
) -> None:
    config = write_deployment(tmp_path, CONFIG.format(db_url=pg_url, secret=SECRET, smtp_port=smtp.port), TEMPLATES)
    old, new = plugin_dist(tmp_path, "1.2"), plugin_dist(tmp_path, "1.3")
    engine = sa.create_engine(sa.make_url(pg_url).set(drivername="postgresql+psycopg"))
    try:
        with servers.logs_on_failure():
            a = servers.start(config, name="a", env=old)
            [(a_id, a_plugins)] = rows(engine, "SELECT id, plugins FROM replicas")
            assert f":{a.pid}:" in a_id
            assert json.loads(a_plugins)["extra-test"] == "declic-extra-test 1.2"
            assert json.loads(a_plugins)["shopify"].startswith(f"{DISTRIBUTION} ")  # built-ins load the same way

            b = servers.start(config, name="b", env=old)  # the same set: it joins
            [b_id] = [row[0] for row in rows(engine, "SELECT id FROM replicas") if row[0] != a_id]

            newer = servers.start(config, name="newer", env=new, ready=False)
            line = refused(newer)
            assert line.startswith("plugin set differs from running replica ")
            assert line.endswith(": extra-test: 1.3 here, 1.2 there")
            assert line.removeprefix("plugin set differs from running replica ").split(": ")[0] in {a_id, b_id}
            assert a.alive() and b.alive()  # a refused replica changes nothing for the running ones
            assert len(rows(engine, "SELECT id FROM replicas")) == 2
            # One retention run pending, whatever the number of replicas that scheduled it.
            assert rows(engine, "SELECT status FROM jobs WHERE key = 'tick:retention'") == [("pending",)]

            # Once the old replicas have stopped (and said so), the new set may start.
            assert a.stop() == 0 and b.stop() == 0
            assert rows(engine, "SELECT id FROM replicas") == []
            upgraded = servers.start(config, name="upgraded", env=new)
            assert upgraded.alive()
    finally:
        engine.dispose()


def rows(engine: sa.Engine, query: str) -> list[tuple[object, ...]]:
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(sa.text(query))]


def test_the_difference_names_each_plugin_that_differs_and_how() -> None:
    from declic_gateway.store.replicas import difference

    here = {"shopify": "declic 0.1", "extra": "declic-extra 1.3", "mine": "declic-mine 2.0"}
    there = {"shopify": "declic 0.1", "extra": "declic-extra 1.2", "theirs": "declic-theirs 0.5"}
    assert difference(here, there) == (
        "extra: 1.3 here, 1.2 there; mine: declic-mine 2.0 here, absent there; "
        "theirs: absent here, declic-theirs 0.5 there"
    )
