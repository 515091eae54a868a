"""GET /metrics over real HTTP: what webhooks, sends and the queue did, read back with Prometheus' own parser."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from conftest import SECRET, Deployment, Factory, fixture_bytes, locked_inbox
from declic_gateway.config import load_config
from declic_gateway.errors import ConfigError
from declic_gateway.http.app import create_app, load
from declic_gateway.plugins import collect, get_plugin_manager
from declic_gateway.testing import SmtpCatcher, shopify_headers, write_deployment

METRICS_TOKEN = "scrape-token-0123456789"
ADMIN_TOKEN = "admin-token-0123456789abc"
TOKENS = f"metrics: {{token: {METRICS_TOKEN}}}\nadmin: {{token: {ADMIN_TOKEN}}}\n"
ORDER = json.loads(fixture_bytes("shopify/order.json"))


def order(i: int, email: str) -> bytes:
    """The fixture order with its own id, name and buyer: one e-mail each."""
    body = dict(ORDER, id=9_000_000 + i, name=f"#M{i}", email=email)
    body["customer"] = dict(ORDER["customer"], id=8_000_000 + i, email=email, phone=None)
    return json.dumps(body).encode()


class Scrape:
    """One scrape, parsed by prometheus_client's parser: sample values by name and labels."""

    def __init__(self, text: str, openmetrics: bool = False):
        families = (parse_openmetrics if openmetrics else text_string_to_metric_families)(text)
        self.samples = {(s.name, frozenset(s.labels.items())): s.value for f in families for s in f.samples}

    def __call__(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())))

    def series(self, name: str) -> list[dict[str, str]]:
        return [dict(labels) for sample, labels in self.samples if sample == name]


async def scrape(client: TestClient, token: str = METRICS_TOKEN) -> Scrape:
    response = await client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return Scrape(await response.text())


async def post(d: Deployment, body: bytes, webhook_id: str | None = None) -> int:
    response = await d.post_shopify("orders/create", body, webhook_id or uuid.uuid4().hex)
    return response.status


async def test_webhooks_sends_and_the_queue_are_counted(deploy: Factory, smtp: SmtpCatcher) -> None:
    d = await deploy(extra=TOKENS + "limits: {max_body_bytes: 4096}\n")
    before = await scrape(d.client)
    assert before("declic_webhooks_total", source="shop", status="accepted", code="200") == 0
    assert before("declic_sends_total", sink="email", outcome="sent") == 0
    assert before("declic_inbox_backlog_calls") == 0 and before("declic_queue_read_ok") == 1

    # Five accepted calls, one of them sent twice, one whose body is not an order; three refused.
    smtp.refuse["gone@example.org"] = "550 5.1.1 no such user"
    smtp.replies = ["451 4.3.0 try again later", "554 5.7.1 message refused"]
    for i, email in enumerate(["a@example.org", "b@example.org", "c@example.org", "gone@example.org"]):
        assert await post(d, order(i, email), webhook_id=f"hook-{i}") == 200
    assert await post(d, order(0, "a@example.org"), webhook_id="hook-0") == 200  # the provider sends it again
    assert await post(d, b'{"this": "is not an order"}') == 200
    bad = await d.client.post("/hooks/shop", data=order(9, "x@example.org"), headers={"X-Shopify-Hmac-Sha256": "no"})
    assert bad.status == 401
    assert await post(d, b"{" + b" " * 5000 + b"}") == 413
    for name in ("nope", "wp-login.php", "a" * 200):  # names a caller chooses never become labels
        assert (await d.client.post(f"/hooks/{name}", data=b"{}")).status == 404

    d.clock.advance(timedelta(seconds=30))  # nobody processes the calls yet: they age, the due jobs are late
    waiting = await scrape(d.client)
    assert waiting("declic_webhooks_total", source="shop", status="accepted", code="200") == 5
    assert waiting("declic_webhooks_total", source="shop", status="duplicate", code="200") == 1
    assert waiting("declic_webhooks_total", source="shop", status="rejected", code="401") == 1
    assert waiting("declic_webhooks_total", source="shop", status="too_large", code="413") == 1
    assert waiting("declic_webhooks_total", source="_unknown", status="unknown_source", code="404") == 3
    assert {labels["source"] for labels in waiting.series("declic_webhooks_total")} == {"shop", "_unknown"}
    assert waiting("declic_webhook_ack_duration_seconds_count", source="shop") == 6  # acknowledged: 5 + 1
    assert waiting("declic_webhook_ack_duration_seconds_bucket", source="shop", le="+Inf") == 6
    assert waiting("declic_inbox_backlog_calls") == 5
    assert waiting("declic_due_jobs") == 6  # the calls, and the start-up tick that reconciles triggers
    assert waiting("declic_inbox_backlog_oldest_seconds") == 30
    assert waiting("declic_due_jobs_lateness_seconds") == 30

    await d.advance(seconds=5)  # the worker processes the calls and sends: one of each outcome
    sent = await scrape(d.client)
    assert sent("declic_sends_total", sink="email", outcome="sent") == 1
    assert sent("declic_sends_total", sink="email", outcome="retry") == 1
    assert sent("declic_sends_total", sink="email", outcome="permanent") == 1
    assert sent("declic_sends_total", sink="email", outcome="address_invalid") == 1
    assert sent("declic_sends_total", sink="email", outcome="opted_out") == 0
    assert sent("declic_inbox_backlog_calls") == 0 and sent("declic_inbox_backlog_oldest_seconds") == 0
    assert sent("declic_inbox_failed_calls") == 1
    assert sent("declic_dead_letter_jobs", kind="step") == 1  # the 554: no retry
    assert sent("declic_dead_letter_jobs", kind="inbox") == 0
    assert sent("declic_due_jobs") == 0 and sent("declic_due_jobs_lateness_seconds") == 0

    await d.advance(hours=1)  # the 451 is retried and goes through
    assert (await scrape(d.client))("declic_sends_total", sink="email", outcome="sent") == 2
    assert len(smtp.messages) == 2


async def test_the_database_threads_time_is_counted(deploy: Factory, smtp: SmtpCatcher) -> None:
    """Near capacity calls queue for the database thread: its busy seconds (waits included) and its CPU show it."""
    d = await deploy(extra=TOKENS)
    before = await scrape(d.client)
    for i in range(3):
        assert await post(d, order(i, f"n{i}@example.org"), webhook_id=f"hook-{i}") == 200
    await d.advance(seconds=5)
    after = await scrape(d.client)
    assert len(smtp.messages) == 3
    busy = after("declic_database_busy_seconds_total") - before("declic_database_busy_seconds_total")
    cpu = after("declic_database_cpu_seconds_total") - before("declic_database_cpu_seconds_total")
    assert 0 < cpu <= busy  # one thread's CPU never exceeds its wall time


async def test_queue_gauges_are_read_once_per_five_seconds(deploy: Factory) -> None:
    d = await deploy(extra=TOKENS)
    assert (await scrape(d.client))("declic_inbox_backlog_calls") == 0
    assert await post(d, order(1, "a@example.org")) == 200
    cached = await scrape(d.client)
    assert cached("declic_webhooks_total", source="shop", status="accepted", code="200") == 1  # counters: live
    assert cached("declic_inbox_backlog_calls") == 0  # the database was not asked again
    d.clock.advance(timedelta(seconds=5))
    assert (await scrape(d.client))("declic_inbox_backlog_calls") == 1


async def test_storage_errors_are_counted_and_metrics_still_answer(deploy: Factory, db_url: str) -> None:
    d = await deploy(extra=TOKENS)
    assert (await scrape(d.client))("declic_storage_errors_total") == 0
    with locked_inbox(db_url):
        assert await post(d, order(1, "a@example.org")) == 503
        d.clock.advance(timedelta(seconds=5))
        during = await scrape(d.client)  # the queue cannot be read either: left out, not stale
    assert during("declic_webhooks_total", source="shop", status="unavailable", code="503") == 1
    assert during("declic_storage_errors_total") == 2  # the commit, then the queue read
    assert during("declic_queue_read_ok") == 0
    assert during("declic_inbox_backlog_calls") is None and during.series("declic_dead_letter_jobs") == []
    d.clock.advance(timedelta(seconds=5))
    after = await scrape(d.client)
    assert after("declic_queue_read_ok") == 1 and after("declic_inbox_backlog_calls") == 0


@pytest.mark.parametrize(
    ("authorization", "status"),
    [
        (None, 401),
        ("Bearer wrong-token-0123456789", 401),
        (f"Basic {METRICS_TOKEN}", 401),
        (f"Bearer {METRICS_TOKEN}x", 401),
        (f"Bearer {METRICS_TOKEN}", 200),
        (f"bearer  {METRICS_TOKEN} ", 200),
        (f"Bearer {ADMIN_TOKEN}", 200),
    ],
)
async def test_metrics_need_the_metrics_or_the_admin_token(
    deploy: Factory, authorization: str | None, status: int
) -> None:
    d = await deploy(extra=TOKENS)
    headers = {"Authorization": authorization} if authorization else {}
    response = await d.client.get("/metrics", headers=headers)
    assert response.status == status
    text = await response.text()
    if status == 401:
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="declic"'
        assert "declic_" not in text and METRICS_TOKEN not in text


async def test_without_tokens_metrics_are_closed_to_everyone(deploy: Factory) -> None:
    d = await deploy()
    for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": f"Bearer {METRICS_TOKEN}"}):
        response = await d.client.get("/metrics", headers=headers)
        assert response.status == 401
        assert "declic_" not in await response.text()


async def test_the_metrics_token_opens_nothing_else(deploy: Factory) -> None:
    d = await deploy(extra=TOKENS)
    ready = await d.client.get("/readyz", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert await ready.json() == {"status": "ok"}  # no details: those are the admin's


async def test_openmetrics_is_served_to_who_asks_for_it(deploy: Factory) -> None:
    d = await deploy(extra=TOKENS)
    assert await post(d, order(1, "a@example.org")) == 200
    response = await d.client.get(
        "/metrics",
        headers={"Authorization": f"Bearer {METRICS_TOKEN}", "Accept": "application/openmetrics-text; version=1.0.0"},
    )
    assert response.headers["Content-Type"].startswith("application/openmetrics-text")
    scraped = Scrape(await response.text(), openmetrics=True)
    assert scraped("declic_webhooks_total", source="shop", status="accepted", code="200") == 1
    assert not [name for name, _ in scraped.samples if name.endswith("_created")]


async def _start(aiohttp_client: Any, folder: Path, smtp: SmtpCatcher) -> TestClient:
    config = f"""\
storage: {{url: "sqlite:///{folder}/declic.db"}}
sources: {{shop: {{plugin: shopify, secret: {SECRET}}}}}
sinks: {{email: {{plugin: smtp, host: 127.0.0.1, port: {smtp.port}, tls: none, sender: "Shop <s@example.com>"}}}}
rules: [{{name: confirm, when: order.placed, kind: transactional, send: {{via: email, template: confirm}}}}]
{TOKENS}"""
    path = write_deployment(folder, config, {"confirm.subject.j2": "Order", "confirm.txt.j2": "Thanks"})
    settings, pm, _ = load(str(path))
    return await aiohttp_client(create_app(settings, pm=pm, role="web"))


async def test_two_gateways_in_one_process_count_apart(aiohttp_client: Any, tmp_path: Path, smtp: SmtpCatcher) -> None:
    first = await _start(aiohttp_client, tmp_path / "one", smtp)
    second = await _start(aiohttp_client, tmp_path / "two", smtp)
    body = order(1, "a@example.org")
    for _ in range(3):
        headers = shopify_headers(body, SECRET, "orders/create", uuid.uuid4().hex)
        assert (await first.post("/hooks/shop", data=body, headers=headers)).status == 200
    assert (await scrape(first))("declic_webhooks_total", source="shop", status="accepted", code="200") == 3
    assert (await scrape(second))("declic_webhooks_total", source="shop", status="accepted", code="200") == 0


def test_a_short_metrics_token_is_a_config_error(tmp_path: Path) -> None:
    path = write_deployment(tmp_path, "timezone: UTC\nmetrics:\n  token: short\n", {})
    pm = get_plugin_manager()
    with pytest.raises(ConfigError) as caught:
        load_config(path, collect(pm), pm)
    [problem] = caught.value.problems
    assert problem.endswith(
        ":3:10: metrics.token: the token is shorter than 16 characters: make one with "
        "`python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`"
    )


def test_an_empty_metrics_token_leaves_metrics_closed(tmp_path: Path) -> None:
    path = write_deployment(tmp_path, "metrics:\n  token: ${DECLIC_TEST_UNSET_TOKEN:-}\n", {})
    pm = get_plugin_manager()
    assert load_config(path, collect(pm), pm, env={}).metrics.token is None
