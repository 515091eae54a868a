"""`declic serve` as operators run it: a real process, its log stream, and a port already taken."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import SECRET
from declic_gateway.cli.listen import bind
from declic_gateway.testing import SmtpCatcher, write_deployment
from processes import Servers, Store, declic_command, post_order, request, wait_until

TEMPLATES = {"followup.subject.j2": "Order {{ event.properties.name }}", "followup.txt.j2": "Thanks"}
CONFIG = """\
public_url: https://hooks.example.com
storage:
  url: {db_url}
sources:
  shop:
    plugin: shopify
    secret: {secret}
sinks:
  email:
    plugin: smtp
    host: 127.0.0.1
    port: {smtp_port}
    tls: none
    sender: "Boutique <shop@example.com>"
worker:
  poll_interval: 200ms
rules:
  - name: order-followup
    when: order.placed
    kind: transactional
    send: {{via: email, template: followup}}
"""


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    with Servers.running(tmp_path) as pool:
        yield pool


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line the process wrote, each of which must be one JSON object (the harness's own
    `----- start` markers aside)."""
    return [json.loads(line) for line in text.splitlines() if not line.startswith("----- ")]


@pytest.mark.timeout(60)
def test_the_log_is_json_lines_from_start_to_stop_with_one_access_line_per_request(
    tmp_path: Path, smtp: SmtpCatcher, servers: Servers
) -> None:
    config = write_deployment(
        tmp_path, CONFIG.format(db_url="sqlite:///declic.db", secret=SECRET, smtp_port=smtp.port), TEMPLATES
    )
    with servers.logs_on_failure():
        server = servers.start(config)
        assert post_order(server.url, 7).status == 200
        wait_until(lambda: len(smtp.messages) == 1, 20, "the follow-up")
        assert request(f"{server.url}/hooks/shop", b"{}", {"X-Shopify-Hmac-Sha256": "forged"}).status == 401
        token = "MjI.c2lnbmF0dXJl"
        assert request(f"{server.url}/u/{token}?email=ada@example.com").status == 404
        assert request(f"{server.url}/no/such/page").status == 404
        assert server.stop() == 0
        lines = json_lines(server.log_text())

    events = [line["event"] for line in lines]
    assert events[:2] == ["listening", "gateway started"] and events[-2:] == ["gateway stopping", "gateway stopped"]
    assert lines[0]["port"] == server.port
    assert lines[0]["event_loop"] == ("asyncio" if sys.platform == "win32" else "uvloop")  # a dependency elsewhere
    access = [line for line in lines if line["event"] == "request"]
    assert [(a["method"], a["path"], a["status"]) for a in access] == [
        ("POST", "/hooks/shop", 401),  # refused; the accepted order before it is at debug level, like probes
        ("GET", "/u/***", 404),  # the token is a credential; the query string is never logged
        ("GET", "/no/***", 404),  # a path no route matches: its first segment only
    ]  # the harness's /readyz probes are at debug level
    assert all(isinstance(a["ms"], float) and a["ms"] >= 0 for a in access)
    text = server.log_text()
    assert token not in text and "example.com?" not in text and "ada@" not in text
    assert "buyer0007" not in text  # the order's address, from the webhook to the sent mail
    assert "Running on" not in text and "CTRL+C" not in text  # aiohttp's banner


@pytest.mark.timeout(60)
def test_a_port_in_use_stops_serve_with_one_line_before_any_job_is_claimed(
    tmp_path: Path, smtp: SmtpCatcher, servers: Servers, db_url: str
) -> None:
    config = write_deployment(tmp_path, CONFIG.format(db_url=db_url, secret=SECRET, smtp_port=smtp.port), TEMPLATES)
    store = Store(db_url)
    try:
        with servers.logs_on_failure():
            web = servers.start(config, name="web", role="web")  # acknowledges, runs no job
            assert post_order(web.url, 1).status == 200
            assert web.stop() == 0
        jobs = "SELECT kind, status, attempts, locked_by FROM jobs WHERE kind = 'inbox'"
        assert store.rows(jobs) == [("inbox", "pending", 0, None)]

        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            done = subprocess.run(
                [*declic_command(), "serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(port)],
                capture_output=True,
                text=True,
                timeout=30,
                cwd=tmp_path,
                stdin=subprocess.DEVNULL,
            )
        assert done.returncode == 1, done
        assert done.stdout == ""
        [line] = json_lines(done.stderr)
        assert line["level"] == "error"
        assert line["event"] == f"cannot listen on 127.0.0.1:{port}: Address already in use"
        assert store.rows(jobs) == [("inbox", "pending", 0, None)]  # nobody claimed it
        assert smtp.messages == []

        with servers.logs_on_failure():
            again = servers.start(config, name="again")
            wait_until(lambda: len(smtp.messages) == 1, 20, "the follow-up")
            assert "left running" not in again.log_text()
    finally:
        store.close()


def test_port_0_listens_on_one_free_port_for_every_address_the_host_resolves_to() -> None:
    """`--port 0` (the harness above starts every server so): one port, said by the `listening` line, whether the
    host is one address or all of IPv4 and IPv6, so that one URL reaches the gateway."""
    sockets = bind("", 0)
    try:
        ports = {sock.getsockname()[1] for sock in sockets}
        assert len(ports) == 1 and 0 not in ports, [sock.getsockname() for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
