"""Mail keeps flowing through bad calls: a call that can never be processed fails at once and
holds nobody back; a call whose provider keeps failing holds steps back for `ordering_timeout`
at most, and the steps that go ahead say so in the journal.

Real HTTP into the real app, a real SMTP server, SQLite and PostgreSQL.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web

from conftest import SECRET, TEMPLATES, Deployment, Factory, fixture_json, until
from declic_gateway.http.app import create_app, load
from declic_gateway.http.running import GATEWAY_KEY
from declic_gateway.testing import FakeClock, SmtpCatcher, write_deployment
from declic_plugins.hubspot import signature_v1

WRITE_KEY = "site-write-key"
ADMIN_TOKEN = "admin-token-0123456789"
EB_TOKEN = "eventbrite-url-token-0123"
HS_SECRET = "hubspot-client-secret"
CONFIG = """\
public_url: https://hooks.example.com
storage: {{url: '{db_url}'}}
sources:
  shop: {{plugin: shopify, secret: {secret}}}
  site: {{plugin: track, write_key: {write_key}}}
  tickets: {{plugin: eventbrite, url_token: {eb_token}, token: eb-api-token, api_base: '{api_base}'}}
  crm: {{plugin: hubspot, client_secret: {hs_secret}, app_token: hs-token, api_base: '{hubspot_base}'}}
sinks:
  email: {{plugin: smtp, host: 127.0.0.1, port: {smtp_port}, tls: none, sender: shop@example.com}}
worker:
  retry_base: 10s
  ordering_timeout: 5m
rules:
  - name: order-confirmation
    when: order.placed
    kind: transactional
    send: {{via: email, template: order-confirmation}}
"""


@pytest.fixture
async def eventbrite_down(aiohttp_server: Any) -> Any:
    """Eventbrite's API answering 503 to everything, as during an outage."""

    async def down(_request: web.Request) -> web.Response:
        return web.json_response({"error": "down"}, status=503)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", down)
    return await aiohttp_server(app)


@dataclass
class HubSpotCrm:
    """HubSpot's CRM v3 read of one contact, as documented; `down` makes it answer 503, as in an outage."""

    contacts: dict[str, dict[str, Any]]
    down: bool = False
    url: str = ""

    async def contact(self, request: web.Request) -> web.Response:
        if self.down:
            return web.json_response({"status": "error", "message": "Service Unavailable"}, status=503)
        found = self.contacts.get(request.match_info["id"])
        if found is None:
            return web.json_response({"status": "error", "category": "OBJECT_NOT_FOUND"}, status=404)
        return web.json_response({"id": request.match_info["id"], "properties": found, "archived": False})


@pytest.fixture
async def hubspot(aiohttp_server: Any) -> HubSpotCrm:
    crm = HubSpotCrm({"501": {"email": "lead@example.org", "firstname": "Lea", "hs_object_id": "501"}})
    app = web.Application()
    app.router.add_get("/crm/v3/objects/contacts/{id}", crm.contact)
    crm.url = str((await aiohttp_server(app)).make_url("")).rstrip("/")
    return crm


@pytest.fixture
async def fault_deploy(
    aiohttp_client: Any, tmp_path: Path, db_url: str, smtp: SmtpCatcher, eventbrite_down: Any, hubspot: HubSpotCrm
) -> AsyncIterator[Factory]:
    async def start() -> Deployment:
        text = CONFIG.format(
            db_url=db_url,
            secret=SECRET,
            write_key=WRITE_KEY,
            api_base=str(eventbrite_down.make_url("")).rstrip("/"),
            eb_token=EB_TOKEN,
            hs_secret=HS_SECRET,
            hubspot_base=hubspot.url,
            smtp_port=smtp.port,
        )
        settings, pm, _ = load(str(write_deployment(tmp_path, text, TEMPLATES)))
        clock = FakeClock(datetime(2026, 3, 14, 8, 0, tzinfo=UTC))
        app = create_app(settings, pm=pm, clock=clock, role="web")
        client = await aiohttp_client(app)
        return Deployment(client, app[GATEWAY_KEY], clock, tmp_path)

    yield start


def order(number: int, email: str | None = None) -> bytes:
    email = email or f"buyer{number}@example.org"
    body = fixture_json("shopify/order.json")
    body.update(id=1000 + number, name=f"#{1000 + number}", email=email)
    body["customer"] = {**body["customer"], "id": 7000 + number, "email": email, "phone": None}  # one person each
    return json.dumps(body).encode()


async def post_hubspot(d: Deployment, kind: str, event_id: int, **fields: Any) -> None:
    """A notification about HubSpot contact 501, signed as HubSpot signs it (v1: SHA-256 of secret + body)."""
    stamp = int(d.clock.now().timestamp() * 1000)
    item = {"eventId": event_id, "subscriptionId": 1, "portalId": 62515, "occurredAt": stamp}
    body = json.dumps([{**item, "subscriptionType": kind, "objectId": 501, **fields}]).encode()
    headers = {"X-HubSpot-Signature": signature_v1(HS_SECRET.encode(), body), "X-HubSpot-Signature-Version": "v1"}
    response = await d.client.post("/hooks/crm", data=body, headers={**headers, "Content-Type": "application/json"})
    assert response.status == 200


async def post_orders(d: Deployment, count: int) -> None:
    for number in range(count):
        response = await d.post_shopify("orders/create", order(number))
        assert response.status == 200


async def test_a_poisoned_call_fails_at_once_and_holds_back_no_order_confirmation(
    fault_deploy: Factory, smtp: SmtpCatcher
) -> None:
    d = await fault_deploy()
    # A lone surrogate in a trait, sent with the public write key: valid JSON, but no database stores it.
    poison = b'{"type": "identify", "userId": "u1", "traits": {"email": "p@example.org", "name": "\\ud800"}}'
    headers = {"Authorization": "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()}
    response = await d.client.post("/hooks/site", data=poison, headers=headers)
    assert response.status == 200
    await post_orders(d, 20)
    await d.advance(seconds=1)
    assert len(smtp.messages) == 20
    [(status, error)] = d.rows("SELECT status, error FROM inbox WHERE source = 'site'")
    assert status == "failed" and "surrogate" in error  # visible, and replayable with `declic replay --failed`
    assert d.scalar("SELECT count(*) FROM jobs WHERE kind = 'inbox' AND status = 'pending'") == 0  # no retries


async def test_a_call_whose_provider_keeps_failing_holds_steps_back_for_ordering_timeout_at_most(
    fault_deploy: Factory, smtp: SmtpCatcher
) -> None:
    d = await fault_deploy()
    webhook = {"config": {"action": "order.placed"}, "api_url": "https://www.eventbriteapi.com/v3/orders/1/"}
    response = await d.client.post(f"/hooks/tickets/{EB_TOKEN}", json=webhook)
    assert response.status == 200
    await d.advance(seconds=1)  # tried once: Eventbrite answers 503, the call waits for a retry
    assert d.scalar("SELECT status FROM inbox WHERE source = 'tickets'") == "received"
    await post_orders(d, 3)
    await d.advance(seconds=30)
    assert smtp.messages == []  # the confirmations wait: the call might have been about them
    await d.advance(minutes=5)
    assert len(smtp.messages) == 3  # ordering_timeout passed: they go ahead...
    notes = d.rows("SELECT rule, action, reason FROM decisions WHERE action = 'overtook'")
    assert len(notes) == 3 and "still unprocessed after ordering_timeout" in notes[0].reason  # ...and say so
    assert d.scalar("SELECT status FROM inbox WHERE source = 'tickets'") == "received"  # never dropped


async def test_a_call_about_one_contact_waiting_for_its_provider_holds_back_only_that_contact(
    fault_deploy: Factory, smtp: SmtpCatcher, hubspot: HubSpotCrm
) -> None:
    d = await fault_deploy()
    await post_hubspot(d, "contact.creation", 1)
    await d.advance(seconds=1)  # HubSpot contact 501 is Lea, lead@example.org
    hubspot.down = True
    await post_hubspot(d, "contact.propertyChange", 2, propertyName="lifecyclestage", propertyValue="customer")
    await d.advance(seconds=1)  # tried once: HubSpot answers 503, the call about Lea waits for a retry
    assert d.scalar("SELECT count(*) FROM inbox WHERE source = 'crm' AND status = 'received'") == 1

    assert (await d.post_shopify("orders/create", order(9, email="lead@example.org"))).status == 200
    await post_orders(d, 3)
    await d.advance(seconds=1)
    # Everyone else's confirmation goes at once; Lea's waits: the call might change what she gets.
    assert sorted(str(m["To"]) for m in smtp.messages) == [f"buyer{n}@example.org" for n in range(3)]
    await d.advance(minutes=5)
    assert [str(m["To"]) for m in smtp.messages][3:] == ["lead@example.org"]  # ordering_timeout passed
    [(who, reason)] = d.rows(
        "SELECT c.email, d.reason FROM decisions d JOIN contacts c ON c.id = d.contact_id WHERE d.action = 'overtook'"
    )
    assert who == "lead@example.org" and "still unprocessed after ordering_timeout" in reason
    hubspot.down = False
    await d.advance(hours=1)  # HubSpot is back: the call is processed, late but never dropped
    assert d.scalar("SELECT status FROM inbox WHERE source = 'crm' ORDER BY id DESC LIMIT 1") == "processed"


async def test_a_worker_that_dies_is_logged_turns_readyz_not_ready_and_is_restarted(
    deploy: Factory, smtp: SmtpCatcher
) -> None:
    """At the end of time every claim overflows (`now + lease`): the worker dies, as a huge duration made it."""
    d = await deploy(role="all", extra=f"admin: {{token: {ADMIN_TOKEN}}}\n")
    with structlog.testing.capture_logs() as logs:
        d.clock.set(datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC))
        await until(lambda: d.gateway.worker_down is not None)
        public = await d.client.get("/readyz")
        assert (public.status, await public.json()) == (503, {"status": "unavailable"})
        admin = await (await d.client.get("/readyz", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})).json()
        assert admin["worker"].startswith("OverflowError")
        d.clock.set(datetime(2026, 3, 14, 9, 0, tzinfo=UTC))
        await until(lambda: d.gateway.worker_down is None)  # restarted after its backoff
    died = [entry for entry in logs if entry["event"] == "worker died; restarting"]
    assert died and died[0]["log_level"] == "error" and "OverflowError" in died[0]["error"]
    await d.post_shopify("orders/create", order(1))  # the restarted worker processes what comes
    await until(lambda: len(smtp.messages) == 1)
    assert (await d.client.get("/readyz")).status == 200
