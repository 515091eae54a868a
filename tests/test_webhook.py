"""Outbound webhook sink against a real local receiver that verifies Standard Webhooks signatures itself."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pydantic import SecretStr, ValidationError

from declic_gateway import Message, Outcome, SendContext
from declic_gateway.config import load_config
from declic_gateway.http.app import create_app
from declic_gateway.http.running import GATEWAY_KEY
from declic_gateway.kit.sources import Deployment
from declic_gateway.plugins import collect, get_plugin_manager
from declic_gateway.testing import FakeClock, ScriptedPlugin, free_port, write_deployment
from declic_plugins.webhook import BODY_CAP, Webhook, WebhookConfig, sign

# The secret and vector of the reference library's own tests:
# standard-webhooks libraries/python/tests/test_webhooks.py (test_sign_function).
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
NOW = datetime(2026, 3, 14, 8, 0, tzinfo=UTC)
CONTACT = {
    "id": 7,
    "email": "ada@example.org",
    "phone": "+33612345678",
    "first_name": "Ada",
    "last_name": "Lovelace",
    "attributes": {"plan": "pro"},
    "consent": {"email": "granted"},
}
EVENT = {
    "id": "ev-1",
    "source": "shop",
    "type": "order.placed",
    "occurred_at": datetime(2026, 3, 14, 7, 59, tzinfo=UTC),
    "correlation": ["order:1042"],
    "properties": {"total_price": Decimal("59.90"), "currency": "EUR"},
}
CTX = SendContext(rule="order-hook", step=1, kind="transactional", contact=CONTACT, event=EVENT)
MESSAGE = Message(to="", text="Thanks Ada", subject="Order #1042", html="<p>Thanks</p>", idempotency_key="dcl-abc123")


def verify(secret: str, headers: Any, body: bytes, now: datetime) -> bool:
    """A receiver's check, written from the Standard Webhooks spec without the sink's code."""
    key = base64.b64decode(secret[len("whsec_") :] if secret.startswith("whsec_") else secret)
    stamp = headers["webhook-timestamp"]
    if abs(int(stamp) - now.timestamp()) > 300:
        return False
    signed = headers["webhook-id"].encode() + b"." + stamp.encode() + b"." + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest())
    offered = [s.split(",", 1) for s in headers["webhook-signature"].split(" ")]
    return any(v == "v1" and hmac.compare_digest(expected, sig.encode()) for v, sig in offered)


@dataclass
class Receiver:
    """Scripted answers (status, headers, body) in order; then 204. Keeps every request it got."""

    replies: list[tuple[int, dict[str, str], str]] = field(default_factory=list)
    received: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    hang: bool = False
    release: asyncio.Event = field(default_factory=asyncio.Event)
    server: TestServer | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.received.append((request.path, dict(request.headers), await request.read()))
        if self.hang:
            await self.release.wait()
        if request.path == "/redirect":
            raise web.HTTPFound("http://169.254.169.254/latest/meta-data/")
        if self.replies:
            status, headers, body = self.replies.pop(0)
            return web.Response(status=status, headers=headers, text=body)
        return web.Response(status=204)

    @property
    def port(self) -> int:
        assert self.server is not None and self.server.port is not None
        return self.server.port

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", rec.handle)
    rec.server = TestServer(app, host="127.0.0.1")
    await rec.server.start_server()
    yield rec
    rec.release.set()
    await rec.server.close()


@pytest.fixture
async def make_sink() -> AsyncIterator[Callable[..., Webhook]]:
    made: list[Webhook] = []

    def make(url: str, **options: Any) -> Webhook:
        settings = {"url": url, "secret": SECRET, "allow": ["127.0.0.1/32"], "timeout": 2, **options}
        sink = Webhook("hook", WebhookConfig.model_validate(settings), Deployment(None, "UTC", FakeClock(NOW)))
        made.append(sink)
        return sink

    yield make
    for sink in made:
        await sink.close()


def test_signature_matches_the_reference_vector() -> None:
    key = base64.b64decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    signature = sign(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}')
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


@pytest.mark.parametrize("secret", [SECRET, SECRET.removeprefix("whsec_"), "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw=="])
async def test_the_receiver_verifies_what_it_gets(
    receiver: Receiver, make_sink: Callable[..., Webhook], secret: str
) -> None:
    result = await make_sink(receiver.url(), secret=secret).send(MESSAGE, CTX)
    assert result.outcome is Outcome.SENT and result.provider_id == "dcl-abc123"
    [(path, headers, body)] = receiver.received
    assert path == "/hook" and headers["Content-Type"] == "application/json"
    assert headers["webhook-id"] == "dcl-abc123" and headers["webhook-timestamp"] == str(int(NOW.timestamp()))
    assert verify(SECRET, headers, body, NOW)
    assert not verify("whsec_" + base64.b64encode(b"another secret").decode(), headers, body, NOW)
    assert not verify(SECRET, headers, body.replace(b"Ada", b"Eve"), NOW)


async def test_the_document_names_rule_contact_event_and_message(
    receiver: Receiver, make_sink: Callable[..., Webhook]
) -> None:
    await make_sink(receiver.url()).send(MESSAGE, CTX)
    document = json.loads(receiver.received[0][2])
    assert document == {
        "type": "declic.message",
        "rule": "order-hook",
        "step": 1,
        "kind": "transactional",
        "contact": {
            "id": 7,
            "email": "ada@example.org",
            "phone": "+33612345678",
            "first_name": "Ada",
            "last_name": "Lovelace",
        },
        "event": {
            "id": "ev-1",
            "source": "shop",
            "type": "order.placed",
            "occurred_at": "2026-03-14T07:59:00+00:00",
            "correlation": ["order:1042"],
            "properties": {"total_price": "59.90", "currency": "EUR"},
        },
        "message": {"subject": "Order #1042", "text": "Thanks Ada", "html": "<p>Thanks</p>"},
    }


async def test_a_retry_keeps_the_webhook_id_so_receivers_can_dedupe(
    receiver: Receiver, make_sink: Callable[..., Webhook]
) -> None:
    receiver.replies = [(503, {}, "busy")]
    sink = make_sink(receiver.url())
    first = await sink.send(MESSAGE, CTX)
    second = await sink.send(MESSAGE, CTX)
    assert (first.outcome, second.outcome) == (Outcome.RETRY, Outcome.SENT)
    assert [h["webhook-id"] for _, h, _ in receiver.received] == ["dcl-abc123", "dcl-abc123"]


LONG = "x" * 5000
# (case, receiver's answer, outcome, retry_after, text in the error or the provider id)
ANSWERS = [
    ("200 with a JSON id", (200, {}, '{"id": "evt_42", "ok": true}'), Outcome.SENT, None, "evt_42"),
    ("201 with a numeric JSON id", (201, {}, '{"id": 42}'), Outcome.SENT, None, "42"),
    ("202 with an id header", (202, {"X-Message-Id": "m-9"}, "queued"), Outcome.SENT, None, "m-9"),
    ("204 empty", (204, {}, ""), Outcome.SENT, None, "dcl-abc123"),
    ("200 with an HTML page", (200, {}, "<html>ok</html>"), Outcome.SENT, None, "dcl-abc123"),
    ("301", (301, {"Location": "https://elsewhere.example/"}, ""), Outcome.PERMANENT, None, "redirects are not"),
    ("307", (307, {"Location": "/other"}, ""), Outcome.PERMANENT, None, "redirects are not followed (307"),
    ("400", (400, {}, '{"error": "bad payload"}'), Outcome.PERMANENT, None, 'answered 400: {"error": "bad payload"}'),
    ("401", (401, {}, "bad signature"), Outcome.PERMANENT, None, "answered 401: bad signature"),
    ("404", (404, {}, ""), Outcome.PERMANENT, None, "answered 404: (empty body)"),
    ("410", (410, {}, "gone"), Outcome.PERMANENT, None, "410 Gone"),
    ("408", (408, {}, "slow"), Outcome.RETRY, None, "answered 408"),
    ("429 with Retry-After", (429, {"Retry-After": "120"}, "slow down"), Outcome.RETRY, 120.0, "answered 429"),
    (
        "503 with an HTTP-date Retry-After",
        (503, {"Retry-After": "Sat, 14 Mar 2026 08:05:00 GMT"}, "maintenance"),
        Outcome.RETRY,
        300.0,
        "answered 503: maintenance",
    ),
    ("500 with a long page", (500, {}, LONG), Outcome.RETRY, None, "x" * BODY_CAP + "…"),
]


@pytest.mark.parametrize(("case", "answer", "outcome", "after", "text"), ANSWERS, ids=[a[0] for a in ANSWERS])
async def test_answer_classes(
    receiver: Receiver,
    make_sink: Callable[..., Webhook],
    case: str,
    answer: tuple[int, dict[str, str], str],
    outcome: Outcome,
    after: float | None,
    text: str,
) -> None:
    receiver.replies = [answer]
    result = await make_sink(receiver.url()).send(MESSAGE, CTX)
    assert result.outcome is outcome and result.retry_after == after
    assert text in (result.provider_id if outcome is Outcome.SENT else result.error or "")
    assert len(result.error or "") < BODY_CAP + 100
    assert len(receiver.received) == 1


async def test_a_receiver_that_never_answers_is_a_timeout_to_retry(
    receiver: Receiver, make_sink: Callable[..., Webhook]
) -> None:
    receiver.hang = True
    result = await make_sink(receiver.url(), timeout=0.3).send(MESSAGE, CTX)
    assert result.outcome is Outcome.RETRY and "Timeout" in (result.error or "")


async def test_connection_refused_is_retried(make_sink: Callable[..., Webhook]) -> None:
    result = await make_sink(f"http://127.0.0.1:{free_port()}/hook").send(MESSAGE, CTX)
    assert result.outcome is Outcome.RETRY and "unreachable" in (result.error or "")


# Every one of these is refused before a connection is opened: no traffic leaves for internal ranges.
REFUSED = [
    "http://127.0.0.1:{port}/hook",
    "http://localhost:{port}/hook",  # a name that resolves to loopback
    "http://[::1]:{port}/hook",
    "http://[::ffff:127.0.0.1]:{port}/hook",  # IPv4-mapped IPv6
    "http://2130706433:{port}/hook",  # 127.0.0.1 as one decimal number
    "http://0x7f000001:{port}/hook",  # ... as one hexadecimal number
    "http://10.0.0.5/hook",
    "http://172.16.0.1/hook",
    "http://172.31.255.254/hook",
    "http://192.168.1.1/hook",
    "http://169.254.169.254/latest/meta-data/",  # cloud metadata
    "http://[fd00::1]/hook",
]


@pytest.mark.parametrize("url", REFUSED)
async def test_internal_addresses_are_refused_unless_allowed(
    receiver: Receiver, make_sink: Callable[..., Webhook], url: str
) -> None:
    result = await make_sink(url.format(port=receiver.port), allow=[]).send(MESSAGE, CTX)
    assert result.outcome is Outcome.PERMANENT
    assert (result.error or "").startswith("not called: ") and "allow" in (result.error or "")
    assert receiver.received == []


async def test_allowing_another_network_does_not_open_loopback(
    receiver: Receiver, make_sink: Callable[..., Webhook]
) -> None:
    result = await make_sink(receiver.url(), allow=["10.0.0.0/8", "hooks.internal"]).send(MESSAGE, CTX)
    assert result.outcome is Outcome.PERMANENT and receiver.received == []


@pytest.mark.parametrize(
    ("allow", "url"),
    [
        (["127.0.0.1/32"], "http://127.0.0.1:{port}/hook"),
        (["localhost"], "http://localhost:{port}/hook"),
        (["127.0.0.0/8"], "http://2130706433:{port}/hook"),
        (["127.0.0.1/32"], "http://[::ffff:127.0.0.1]:{port}/hook"),  # a mapped address is its IPv4 form
    ],
)
async def test_allow_listed_receivers_are_reached(
    receiver: Receiver, make_sink: Callable[..., Webhook], allow: list[str], url: str
) -> None:
    result = await make_sink(url.format(port=receiver.port), allow=allow).send(MESSAGE, CTX)
    assert result.outcome is Outcome.SENT and len(receiver.received) == 1


async def test_a_redirect_to_an_internal_address_is_not_followed(
    receiver: Receiver, make_sink: Callable[..., Webhook]
) -> None:
    result = await make_sink(receiver.url("/redirect")).send(MESSAGE, CTX)
    assert result.outcome is Outcome.PERMANENT
    assert "redirects are not followed (302 to http://169.254.169.254/" in (result.error or "")
    assert len(receiver.received) == 1


def test_address_is_the_url_for_any_contact() -> None:
    config = WebhookConfig.model_validate({"url": "https://hooks.example.com/in", "secret": SECRET})
    sink = Webhook("hook", config, Deployment(None, "UTC", FakeClock(NOW)))
    assert sink.address({}) == sink.address(CONTACT) == "https://hooks.example.com/in"


@pytest.mark.parametrize(
    ("settings", "complaint"),
    [
        ({"url": "ftp://example.com/", "secret": SECRET}, "is not an http.s. URL"),
        ({"url": "https:///path", "secret": SECRET}, "is not an http.s. URL"),
        ({"url": "https://user:pw@example.com/", "secret": SECRET}, "credentials"),
        ({"url": "https://example.com/", "secret": "whsec_not base64!"}, "must be base64"),
        ({"url": "https://example.com/", "secret": "whsec_"}, "empty"),
        ({"url": "https://example.com/", "secret": SECRET, "signing": "v2"}, "Extra inputs"),
    ],
)
def test_config_errors_name_the_fix(settings: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ValidationError, match=complaint):
        WebhookConfig.model_validate(settings)


def test_the_secret_stays_secret() -> None:
    config = WebhookConfig.model_validate({"url": "https://example.com/", "secret": SECRET})
    assert isinstance(config.secret, SecretStr)
    assert "MfKQ9r8" not in repr(config) and "MfKQ9r8" not in str(config.model_dump())


# -- through the real app ----------------------------------------------------------------------------


async def test_a_rule_posts_through_the_app_and_records_the_delivery(
    aiohttp_client: Any, tmp_path: Path, db_url: str, receiver: Receiver
) -> None:
    receiver.replies = [(502, {"Retry-After": "60"}, "upstream down"), (200, {}, '{"id": "rcv-1"}')]
    config = f"""\
storage: {{url: '{db_url}'}}
sources:
  in: {{plugin: scripted, url_token: tok}}
sinks:
  hook: {{plugin: webhook, url: '{receiver.url()}', secret: '{SECRET}', allow: [127.0.0.1/32], timeout: 2}}
worker: {{retry_base: 10s}}
rules:
  - name: signed-up
    when: track.signed_up
    kind: transactional
    send: {{via: hook, template: hello}}
"""
    path = write_deployment(
        tmp_path, config, {"hello.subject.j2": "Hi", "hello.txt.j2": "Hello {{ contact.first_name }}"}
    )
    pm = get_plugin_manager(extra=[ScriptedPlugin()])
    clock = FakeClock(NOW)
    app = create_app(load_config(path, collect(pm), pm), pm=pm, clock=clock, role="web")
    client = await aiohttp_client(app)
    gateway = app[GATEWAY_KEY]

    def delivery() -> tuple[Any, ...]:
        with gateway.db.engine.connect() as conn:
            return tuple(conn.exec_driver_sql("SELECT status, provider_id, attempts, reason FROM deliveries").one())

    event = {"type": "track.signed_up", "contact": {"email": "ada@example.org", "first_name": "Ada"}}
    assert (await client.post("/hooks/in/tok", data=json.dumps([event]).encode())).status == 200
    await gateway.worker.drain()
    assert delivery() == ("retrying", None, 1, "receiver answered 502: upstream down")
    clock.advance(timedelta(seconds=59))
    await gateway.worker.drain()
    assert len(receiver.received) == 1  # Retry-After: 60 is honoured
    clock.advance(timedelta(seconds=2))
    await gateway.worker.drain()
    assert delivery() == ("sent", "rcv-1", 2, None)
    first, second = receiver.received
    assert first[1]["webhook-id"] == second[1]["webhook-id"]
    assert verify(SECRET, second[1], second[2], clock.now())
    document = json.loads(second[2])
    assert document["rule"] == "signed-up" and document["contact"]["email"] == "ada@example.org"
    assert document["message"] == {"subject": "Hi", "text": "Hello Ada", "html": None}
    assert document["event"]["type"] == "track.signed_up"
