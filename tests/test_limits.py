"""Per-sink limits: sends in flight and sends per period, as every sink's config sets them; one sink at its limits
holds back no other sink's steps."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from conftest import BASE_CONFIG, SECRET, TEMPLATES, Deployment, fixture_bytes, until
from declic_gateway.http.app import create_app, load
from declic_gateway.http.running import GATEWAY_KEY
from declic_gateway.kit.limits import SendLimiter, parse_rate
from declic_gateway.testing import FakeClock, SmtpCatcher, write_deployment


async def test_concurrency_caps_sends_in_flight() -> None:
    limiter = SendLimiter(concurrency=3)
    in_flight, peak = 0, 0

    async def send() -> None:
        nonlocal in_flight, peak
        async with limiter:
            in_flight += 1
            peak = max(peak, in_flight)
            await asyncio.sleep(0.01)
            in_flight -= 1

    await asyncio.gather(*(send() for _ in range(20)))
    assert peak == 3


async def test_rate_spaces_sends_after_the_burst() -> None:
    limiter = SendLimiter(concurrency=100, rate="5/250ms")  # a burst of 5, then one every 50 ms
    stamps = []

    async def send() -> None:
        async with limiter:
            stamps.append(time.monotonic())

    await asyncio.gather(*(send() for _ in range(10)))
    span = stamps[-1] - stamps[0]
    assert 0.2 <= span < 1.0  # 5 more tokens at 20/s take 250 ms; none may come early


@pytest.mark.parametrize(
    ("text", "expected"), [("100/10s", (100, 10.0)), ("5/1s", (5, 1.0)), ("1000/1h", (1000, 3600.0))]
)
def test_rates_as_users_write_them(text: str, expected: tuple[int, float]) -> None:
    count, period = parse_rate(text)
    assert (count, period.total_seconds()) == expected


@pytest.mark.parametrize("text", ["100", "0/1s", "ten/1s", "5/soon"])
def test_bad_rates_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="rate"):
        parse_rate(text)


SLOW_CRM = """\
  - name: crm-sync
    when: customer.created
    kind: transactional
    send: {via: crm, template: welcome}
  - name: order-confirmation
    when: order.placed
    kind: transactional
    send: {via: email, template: order-confirmation}
"""
CRM_SINK = """\
  crm:
    plugin: webhook
    url: http://127.0.0.1:{port}/hook
    secret: whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw
    allow: [127.0.0.1/32]
    concurrency: 2
"""


class HungCrm:
    """A webhook receiver that answers 200 only once the test opens it: a CRM hung until then."""

    def __init__(self) -> None:
        self.open, self.received, self.answered = asyncio.Event(), Counter[str](), 0

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.received[request.headers["webhook-id"]] += 1
        await self.open.wait()
        self.answered += 1
        return web.Response(text="{}")


async def test_a_hung_sink_s_backlog_holds_back_no_mail_for_another_sink(
    aiohttp_client: Any, tmp_path: Path, db_url: str, smtp: SmtpCatcher
) -> None:
    """30 sign-ups for a CRM that hangs, 2 at a time, then an order, confirmed by SMTP. The steps waiting for the
    CRM held every worker slot: the confirmation waited for the CRM (with a CRM answering in 0.5 s, 5 s late; hung,
    until its timeout). Steps far back in a sink's line leave it, and steps for a sink that would not take them
    soon are not prepared: they go back to the queue until their turn. The confirmation goes out while the CRM
    still hangs, and once it answers, each sign-up reaches it once."""
    crm = HungCrm()
    app = web.Application()
    app.router.add_post("/hook", crm.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        text = BASE_CONFIG.format(
            db_url=db_url,
            secret=SECRET,
            smtp_port=smtp.port,
            rules=SLOW_CRM,
            max_attempts=5,
            worker="  concurrency: 10\n  batch_size: 10\n  sink_wait: 1s\n",
        ).replace("sinks:\n", "sinks:\n" + CRM_SINK.format(port=server.port))
        path = write_deployment(tmp_path, text, TEMPLATES)
        settings, pm, _ = load(str(path))
        clock = FakeClock(datetime(2026, 3, 14, 8, 0, tzinfo=UTC))
        gateway = create_app(settings, pm=pm, clock=clock, role="all")  # the worker runs on its own
        d = Deployment(await aiohttp_client(gateway), gateway[GATEWAY_KEY], clock, path)
        customer = fixture_bytes("shopify/customer.json")
        for n in range(30):
            body = customer.replace(b"5550002", b"%d" % (7000000 + n)).replace(b"noah.martin", b"c%d" % n)
            assert (await d.post_shopify("customers/create", body)).status == 200
        await until(lambda: len(crm.received) == 2)  # the CRM holds two; the worker's other slots wait for it
        assert (await d.post_shopify("orders/create", fixture_bytes("shopify/order.json"))).status == 200
        await until(lambda: len(smtp.messages) == 1, seconds=20)
        assert crm.answered == 0, "the confirmation went out only once the CRM answered"
        crm.open.set()
        for _ in range(200):  # the steps sent back come due, in fake time
            if crm.answered >= 30:
                break
            clock.advance(timedelta(seconds=2))
            d.gateway.worker.wake()
            await asyncio.sleep(0.1)
        await until(lambda: d.scalar("SELECT count(*) FROM deliveries WHERE status = 'sent'") == 31)
        assert len(crm.received) == 30 and set(crm.received.values()) == {1}
    finally:
        await server.close()
