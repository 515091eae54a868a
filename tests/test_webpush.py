"""Web Push sink against a local push service that checks VAPID and decrypts what it receives.

Contracts followed by the fake push service, with their sources:
- RFC 8030 §5 (201 Created + Location for an accepted message), §5.2 (TTL required: 400 without),
  §7.2 (413 only above 4096 bytes), §8.1 (429 Too Many Requests), 404/410 for a subscription that
  has expired or was unsubscribed (also web-push-libs/pywebpush README: "404 or 410 ... delete it").
- RFC 8291 Appendix A: the encryption test vector; §4: 3993 octets of plaintext at most.
- RFC 8292 §2 and §4: ES256 JWT with `aud` = the push service origin, `exp` <= 24 h, `sub` mailto:/https:;
  `Authorization: vapid t=..., k=...`; 401 for a bad token, 403 for a key the subscription was not made with.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import structlog
from aiohttp import web
from aiohttp.test_utils import TestServer
from click import Group
from click.testing import CliRunner
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import SecretStr, ValidationError

import declic_plugins.webpush as webpush
from declic_gateway import Message, Outcome, SendContext
from declic_gateway.config import load_config
from declic_gateway.http.app import create_app
from declic_gateway.http.running import GATEWAY_KEY
from declic_gateway.kit.sources import Deployment
from declic_gateway.plugins import collect, get_plugin_manager
from declic_gateway.testing import FakeClock, ScriptedPlugin, free_port, write_deployment
from declic_plugins.webpush import (
    MAX_PLAINTEXT,
    WebPushConfig,
    WebPushSink,
    b64url,
    b64url_decode,
    encrypt,
    generate_vapid_keys,
    load_private_key,
)

VAPID_PRIVATE, VAPID_PUBLIC = generate_vapid_keys()
SUBJECT = "mailto:push@example.com"
MESSAGE = Message(to="", text="2 items are waiting", subject="Your cart, Ada", idempotency_key="dcl-abc")


# --- the browser side: a subscription and the decryption a user agent does (RFC 8291 §3) ---------------------


@dataclass
class Browser:
    endpoint: str
    private: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    auth: bytes = field(default_factory=lambda: bytes(range(16)))

    @property
    def p256dh(self) -> bytes:
        return point(self.private.public_key())

    def subscription(self) -> dict[str, Any]:
        """As PushSubscription.toJSON() gives it, in the contact's push_subscriptions."""
        return {
            "kind": "webpush",
            "address": self.endpoint,
            "keys": {"p256dh": b64url(self.p256dh), "auth": b64url(self.auth)},
        }

    def decrypt(self, body: bytes) -> bytes:
        salt, record_size, id_length = body[:16], int.from_bytes(body[16:20], "big"), body[20]
        sender, record = body[21 : 21 + id_length], body[21 + id_length :]
        assert record_size == 4096 and len(record) <= record_size
        shared = self.private.exchange(ec.ECDH(), ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), sender))
        ikm = hkdf(self.auth, shared, b"WebPush: info\0" + self.p256dh + sender, 32)
        key = hkdf(salt, ikm, b"Content-Encoding: aes128gcm\0", 16)
        nonce = hkdf(salt, ikm, b"Content-Encoding: nonce\0", 12)
        padded = AESGCM(key).decrypt(nonce, record, None).rstrip(b"\0")
        assert padded.endswith(b"\x02"), "the last record ends with the 0x02 delimiter"
        return padded[:-1]


def point(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def hkdf(salt: bytes, ikm: bytes, info: bytes, length: int) -> bytes:
    return HKDF(hashes.SHA256(), length, salt=salt, info=info).derive(ikm)


def verify_vapid(header: str, origin: str) -> dict[str, Any]:
    """RFC 8292 as a push service checks it; raises on any fault."""
    scheme, _, params = header.partition(" ")
    assert scheme == "vapid"
    values = dict(part.strip().split("=", 1) for part in params.split(","))
    token, key = values["t"], values["k"]
    head, claims, signature = token.split(".")
    raw = b64url_decode(signature)
    public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b64url_decode(key))
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    public.verify(der, f"{head}.{claims}".encode(), ec.ECDSA(hashes.SHA256()))
    assert json.loads(b64url_decode(head)) == {"typ": "JWT", "alg": "ES256"}
    payload: dict[str, Any] = json.loads(b64url_decode(claims))
    assert payload["aud"] == origin
    assert time.time() < payload["exp"] <= time.time() + 24 * 3600
    assert payload["sub"].startswith(("mailto:", "https:"))
    return {**payload, "k": key, "t": token}


# --- the push service ----------------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int = 201
    headers: dict[str, str] = field(default_factory=dict)
    body: str = ""
    hang: bool = False


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    vapid: dict[str, Any]
    plaintext: bytes | None


class PushService:
    """Answers as scripted per subscription id; by default 201 with a Location, like real push services."""

    def __init__(self) -> None:
        self.replies: dict[str, list[Reply]] = {}
        self.received: list[Received] = []
        self.browsers: dict[str, Browser] = {}
        self.release = asyncio.Event()
        self.server: TestServer | None = None

    @property
    def origin(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    def browser(self, name: str, *replies: Reply) -> Browser:
        self.browsers[name] = Browser(f"{self.origin}/push/{name}")
        self.replies[name] = list(replies)
        return self.browsers[name]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        body = await request.read()
        if "TTL" not in request.headers:
            return web.Response(status=400, text="TTL header required")
        try:
            vapid = verify_vapid(request.headers.get("Authorization", ""), self.origin)
        except (AssertionError, KeyError, ValueError, InvalidSignature) as exc:
            return web.Response(status=401, text=f"bad VAPID: {exc!r}")
        browser = self.browsers.get(name)
        plaintext = browser.decrypt(body) if browser else None
        self.received.append(Received(request.path, dict(request.headers), vapid, plaintext))
        reply = self.replies[name].pop(0) if self.replies.get(name) else Reply(headers={"Location": f"/m/{name}"})
        if reply.hang:
            await asyncio.wait_for(self.release.wait(), 10)
        return web.Response(status=reply.status, headers=reply.headers, text=reply.body)

    async def elsewhere(self, request: web.Request) -> web.Response:
        self.received.append(Received(request.path, dict(request.headers), {}, None))
        return web.Response(status=201)


@pytest.fixture
async def service() -> AsyncIterator[PushService]:
    push = PushService()
    app = web.Application()
    app.router.add_post("/push/{name}", push.handle)
    app.router.add_post("/elsewhere", push.elsewhere)
    push.server = TestServer(app, host="127.0.0.1")
    await push.server.start_server()
    yield push
    push.release.set()
    await push.server.close()


@pytest.fixture
async def make_sink() -> AsyncIterator[Callable[..., WebPushSink]]:
    made: list[WebPushSink] = []

    def make(**options: Any) -> WebPushSink:
        config = WebPushConfig.model_validate(
            {
                "vapid_private_key": VAPID_PRIVATE,
                "vapid_subject": SUBJECT,
                "allow": ["127.0.0.1/32"],
                "timeout": 2,
                **options,
            }
        )
        made.append(WebPushSink("push", config, Deployment(None, "UTC", FakeClock())))
        return made[-1]

    yield make
    for sink in made:
        await sink.close()


def context(*subscriptions: dict[str, Any], **event: Any) -> SendContext:
    contact = {"first_name": "Ada", "push_subscriptions": list(subscriptions)}
    return SendContext(rule="cart", step=1, kind="marketing", contact=contact, event={"properties": event})


# --- encryption ------------------------------------------------------------------------------------------------

# RFC 8291 Appendix A (the same values are in Mozilla's dom/push test_crypto.js "Example from
# draft-ietf-webpush-encryption-latest").
RFC8291 = {
    "plaintext": "V2hlbiBJIGdyb3cgdXAsIEkgd2FudCB0byBiZSBhIHdhdGVybWVsb24",
    "as_private": "yfWPiYE-n46HLnH0KqZOF1fJJU3MYrct3AELtAQ-oRw",
    "as_public": "BP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A8",
    "ua_private": "q1dXpw3UpT5VOmu_cf_v6ih07Aems3njxI-JWgLcM94",
    "ua_public": "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4",
    "salt": "DGv6ra1nlYgDCS1FRnbzlw",
    "auth": "BTBZMqHH6r4Tts7J_aSIgg",
    "body": "DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEq"
    "KK6PBru3jl7A_yl95bQpu6cVPTpK4Mqgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLVWGNWQexSgSxsj_Qulcy4a-fN",
}


def test_encryption_reproduces_rfc8291_appendix_a() -> None:
    sender = load_private_key(RFC8291["as_private"])
    assert b64url(point(sender.public_key())) == RFC8291["as_public"]
    body = encrypt(
        b64url_decode(RFC8291["plaintext"]),
        b64url_decode(RFC8291["ua_public"]),
        b64url_decode(RFC8291["auth"]),
        sender=sender,
        salt=b64url_decode(RFC8291["salt"]),
    )
    assert b64url(body) == RFC8291["body"]
    ua = Browser("", load_private_key(RFC8291["ua_private"]), b64url_decode(RFC8291["auth"]))
    assert ua.decrypt(body) == b"When I grow up, I want to be a watermelon"


def test_the_largest_payload_fills_exactly_4096_bytes() -> None:
    browser = Browser("")
    assert MAX_PLAINTEXT == 3993
    assert len(encrypt(b"x" * MAX_PLAINTEXT, browser.p256dh, browser.auth)) == 4096


async def test_a_payload_over_3993_bytes_is_refused_before_sending(
    service: PushService, make_sink: Callable[..., WebPushSink]
) -> None:
    browser = service.browser("a")
    sink = make_sink()
    room = MAX_PLAINTEXT - len('{"title":"","body":""}')
    fits = await sink.send(Message(to="", text="x" * room), context(browser.subscription()))
    # Bytes count, not characters: é is two bytes in UTF-8.
    too_big = await sink.send(Message(to="", text="é" * (room // 2 + 1)), context(browser.subscription()))
    assert fits.outcome is Outcome.SENT
    assert too_big.outcome is Outcome.PERMANENT and "3994 bytes" in (too_big.error or "")
    assert len(service.received) == 1


# --- what the push service receives ----------------------------------------------------------------------------


async def test_the_push_service_gets_an_encrypted_vapid_signed_message(
    service: PushService, make_sink: Callable[..., WebPushSink]
) -> None:
    browser = service.browser("a")
    sink = make_sink(
        ttl=3600, urgency="high", topic="cart-{{ event.properties.cart }}", url="{{ event.properties.url }}"
    )
    result = await sink.send(MESSAGE, context(browser.subscription(), cart="k1", url="https://shop.example.com/c/k1"))
    assert result.outcome is Outcome.SENT and result.provider_id == "/m/a"
    [got] = service.received
    assert got.path == "/push/a"
    assert got.headers["TTL"] == "3600" and got.headers["Urgency"] == "high" and got.headers["Topic"] == "cart-k1"
    assert got.headers["Content-Encoding"] == "aes128gcm"
    assert got.headers["Content-Type"] == "application/octet-stream"
    assert got.vapid["aud"] == service.origin and got.vapid["sub"] == SUBJECT and got.vapid["k"] == VAPID_PUBLIC
    assert json.loads(got.plaintext or b"") == {
        "title": "Your cart, Ada",
        "body": "2 items are waiting",
        "url": "https://shop.example.com/c/k1",
    }


async def test_defaults_send_a_day_of_ttl_and_no_urgency_topic_or_url(
    service: PushService, make_sink: Callable[..., WebPushSink]
) -> None:
    browser = service.browser("a")
    await make_sink().send(Message(to="", text="hi"), context(browser.subscription()))
    [got] = service.received
    assert got.headers["TTL"] == "86400" and "Urgency" not in got.headers and "Topic" not in got.headers
    assert json.loads(got.plaintext or b"") == {"title": "", "body": "hi"}


async def test_the_vapid_token_is_reused_for_the_same_push_service(
    service: PushService, make_sink: Callable[..., WebPushSink]
) -> None:
    sink = make_sink()
    browsers = [service.browser("a"), service.browser("b")]
    for browser in browsers:
        await sink.send(MESSAGE, context(browser.subscription()))
    first, second = service.received
    assert first.vapid["t"] == second.vapid["t"]
    assert first.vapid["exp"] - time.time() > 11 * 3600


async def test_a_bad_topic_from_the_template_is_a_permanent_failure(
    service: PushService, make_sink: Callable[..., WebPushSink]
) -> None:
    browser = service.browser("a")
    result = await make_sink(topic="{{ event.properties.cart }}").send(
        MESSAGE, context(browser.subscription(), cart="a b")
    )
    assert result.outcome is Outcome.PERMANENT and "topic 'a b'" in (result.error or "")
    assert service.received == []


# --- what each answer means ------------------------------------------------------------------------------------

# (case, the push service's reply, outcome, retry_after, text in the error)
REPLIES = [
    ("201 Created", Reply(201, {"Location": "https://push.example/m/1"}), Outcome.SENT, None, None),
    ("202 without Location", Reply(202), Outcome.SENT, None, None),
    ("404 expired", Reply(404, body="NotFound"), Outcome.ADDRESS_INVALID, None, "404: NotFound"),
    (
        "410 unsubscribed",
        Reply(410, body="push subscription has unsubscribed or expired."),
        Outcome.ADDRESS_INVALID,
        None,
        "410",
    ),
    ("413 too large", Reply(413), Outcome.PERMANENT, None, "413"),
    ("429 Retry-After seconds", Reply(429, {"Retry-After": "120"}), Outcome.RETRY, 120.0, "429"),
    ("429 unreadable Retry-After", Reply(429, {"Retry-After": "soon"}), Outcome.RETRY, None, "429"),
    ("429 without Retry-After", Reply(429), Outcome.RETRY, None, "429"),
    ("400 bad request", Reply(400, body="bad encoding"), Outcome.PERMANENT, None, "400: bad encoding"),
    ("401 bad VAPID", Reply(401), Outcome.PERMANENT, None, "401"),
    ("403 other key", Reply(403, body="key mismatch"), Outcome.PERMANENT, None, "403"),
    ("500", Reply(500), Outcome.RETRY, None, "500"),
    ("503 Retry-After", Reply(503, {"Retry-After": "30"}), Outcome.RETRY, 30.0, "503"),
    ("302 not followed", Reply(302, {"Location": "/elsewhere"}), Outcome.PERMANENT, None, "302"),
    ("418 unexpected", Reply(418, body="<html>teapot</html>"), Outcome.PERMANENT, None, "418"),
]


@pytest.mark.parametrize(("case", "reply", "outcome", "after", "error"), REPLIES, ids=[r[0] for r in REPLIES])
async def test_push_service_answers(
    service: PushService,
    make_sink: Callable[..., WebPushSink],
    case: str,
    reply: Reply,
    outcome: Outcome,
    after: float | None,
    error: str | None,
) -> None:
    browser = service.browser("a", reply)
    with structlog.testing.capture_logs() as logs:
        result = await make_sink().send(MESSAGE, context(browser.subscription()))
    assert result.outcome is outcome
    assert result.retry_after == after
    assert (error or "") in (result.error or "")
    assert result.invalid_addresses == ((browser.endpoint,) if outcome is Outcome.ADDRESS_INVALID else ())
    assert [r.path for r in service.received] == ["/push/a"]  # one call, redirects never followed
    loud = [entry for entry in logs if entry["log_level"] == "error"]
    assert bool(loud) == (reply.status in (400, 401, 403))
    if outcome is Outcome.SENT:
        assert result.provider_id == reply.headers.get("Location")


async def test_retry_after_as_an_http_date(service: PushService, make_sink: Callable[..., WebPushSink]) -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=90), usegmt=True)
    browser = service.browser("a", Reply(429, {"Retry-After": when}))
    result = await make_sink().send(MESSAGE, context(browser.subscription()))
    assert result.outcome is Outcome.RETRY and 80 < (result.retry_after or 0) <= 90


async def test_a_push_service_that_does_not_answer_in_time_is_retried(
    service: PushService, make_sink: Callable[..., WebPushSink]
) -> None:
    browser = service.browser("a", Reply(hang=True))
    started = time.monotonic()
    result = await make_sink(timeout=0.3).send(MESSAGE, context(browser.subscription()))
    assert result.outcome is Outcome.RETRY and "TimeoutError" in (result.error or "")
    assert time.monotonic() - started < 2


async def test_connection_refused_is_retried(make_sink: Callable[..., WebPushSink]) -> None:
    browser = Browser(f"http://127.0.0.1:{free_port()}/push/a")
    result = await make_sink().send(MESSAGE, context(browser.subscription()))
    assert result.outcome is Outcome.RETRY and "ClientConnectorError" in (result.error or "")


async def test_private_addresses_are_refused_unless_allowed(make_sink: Callable[..., WebPushSink]) -> None:
    browser = Browser("https://127.0.0.1/push/a")
    result = await make_sink(allow=[]).send(MESSAGE, context(browser.subscription()))
    assert result.outcome is Outcome.PERMANENT and "not a public address" in (result.error or "")
    assert result.invalid_addresses == ()


async def test_an_endpoint_on_another_port_is_dropped_without_a_call(
    service: PushService, make_sink: Callable[..., WebPushSink]
) -> None:
    """track.py takes only https endpoints on port 443; one stored before it checked is never called, even where
    something listens: a name that `allow` does not list itself (here, one resolving to an allowed address)."""
    assert service.server is not None
    browser = Browser(f"http://localhost:{service.server.port}/elsewhere")
    sink = make_sink(allow=["127.0.0.1/32", "::1/128"])
    result = await sink.send(MESSAGE, context(browser.subscription()))
    assert result.outcome is Outcome.ADDRESS_INVALID and "not https on port 443" in (result.error or "")
    assert result.invalid_addresses == (browser.endpoint,) and service.received == []


UNUSABLE = [
    ("no keys", {"kind": "webpush", "address": "https://push.example/x"}),
    ("short auth", {"kind": "webpush", "address": "https://push.example/x", "keys": {"p256dh": "AAAA", "auth": "AA"}}),
    ("not a URL", {"kind": "webpush", "address": "mailto:someone@example.com", "keys": {}}),
    ("another port", Browser("https://push.example:6379/x").subscription()),
    ("http", Browser("http://push.example/x").subscription()),
]


@pytest.mark.parametrize(("case", "subscription"), UNUSABLE, ids=[u[0] for u in UNUSABLE])
async def test_an_unusable_subscription_is_dropped_without_a_call(
    make_sink: Callable[..., WebPushSink], case: str, subscription: dict[str, Any]
) -> None:
    result = await make_sink().send(MESSAGE, context(subscription))
    assert result.outcome is Outcome.ADDRESS_INVALID and result.invalid_addresses == (subscription["address"],)


# --- a contact with several browsers ---------------------------------------------------------------------------

# (case, one reply per browser, outcome, the browsers dropped, retry_after)
SEVERAL = [
    ("all take it", [Reply(201, {"Location": "L1"}), Reply(201, {"Location": "L2"})], Outcome.SENT, [], None),
    ("one gone, one takes it", [Reply(410), Reply(201, {"Location": "L2"})], Outcome.SENT, [0], None),
    ("all gone", [Reply(404), Reply(410)], Outcome.ADDRESS_INVALID, [0, 1], None),
    ("all busy", [Reply(503, {"Retry-After": "10"}), Reply(429, {"Retry-After": "60"})], Outcome.RETRY, [], 60.0),
    ("one gone, one busy", [Reply(410), Reply(503)], Outcome.RETRY, [0], None),
    ("one refused, one busy", [Reply(413), Reply(503)], Outcome.RETRY, [], None),
    ("one refused, one gone", [Reply(413), Reply(404)], Outcome.PERMANENT, [1], None),
]


@pytest.mark.parametrize(("case", "replies", "outcome", "dropped", "after"), SEVERAL, ids=[s[0] for s in SEVERAL])
async def test_every_browser_gets_its_copy(
    service: PushService,
    make_sink: Callable[..., WebPushSink],
    case: str,
    replies: list[Reply],
    outcome: Outcome,
    dropped: list[int],
    after: float | None,
) -> None:
    browsers = [service.browser(f"b{i}", reply) for i, reply in enumerate(replies)]
    fcm = {"kind": "fcm", "address": "fcm-token", "keys": {}}
    result = await make_sink().send(MESSAGE, context(fcm, *(b.subscription() for b in browsers)))
    assert result.outcome is outcome
    assert result.invalid_addresses == tuple(browsers[i].endpoint for i in dropped)
    assert result.retry_after == after
    assert sorted(r.path for r in service.received) == [f"/push/b{i}" for i in range(len(replies))]
    assert {r.plaintext for r in service.received} == {b'{"title":"Your cart, Ada","body":"2 items are waiting"}'}
    if case == "all take it":
        assert set((result.provider_id or "").split(",")) == {"L1", "L2"}


def test_address_is_the_first_webpush_subscription() -> None:
    config = WebPushConfig(vapid_private_key=SecretStr(VAPID_PRIVATE), vapid_subject=SUBJECT)
    sink = WebPushSink("push", config, Deployment(None, "UTC", FakeClock()))
    devices = [
        {"kind": "fcm", "address": "t"},
        Browser("https://a/1").subscription(),
        Browser("https://a/2").subscription(),
    ]
    assert sink.address({"push_subscriptions": devices}) == "https://a/1"
    assert sink.address({"push_subscriptions": devices[:1]}) is None
    assert sink.public_key == VAPID_PUBLIC


# --- keys and config -------------------------------------------------------------------------------------------


def _other_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _pem(private: str, fmt: serialization.PrivateFormat) -> str:
    pem: bytes = load_private_key(private).private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    return pem.decode()


KEYS = [
    ("base64url raw", VAPID_PRIVATE),
    ("PEM PKCS#8", _pem(VAPID_PRIVATE, serialization.PrivateFormat.PKCS8)),
    ("PEM SEC1", _pem(VAPID_PRIVATE, serialization.PrivateFormat.TraditionalOpenSSL)),
]


@pytest.mark.parametrize(("case", "text"), KEYS, ids=[k[0] for k in KEYS])
def test_private_key_forms_give_the_same_key(case: str, text: str) -> None:
    sink = WebPushSink(
        "push", WebPushConfig.model_validate({"vapid_private_key": text, "vapid_subject": SUBJECT}), None
    )
    assert sink.public_key == VAPID_PUBLIC


BAD_CONFIG = [
    ("short key", {"vapid_private_key": "AAAA"}, "make a key pair with `declic webpush-keys`"),
    (
        "broken PEM",
        {"vapid_private_key": "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----"},
        "not a P-256",
    ),
    ("RSA key", {"vapid_private_key": _other_pem(rsa.generate_private_key(65537, 2048))}, "not a P-256"),
    ("P-384 key", {"vapid_private_key": _other_pem(ec.generate_private_key(ec.SECP384R1()))}, "not a P-256"),
    ("zero key", {"vapid_private_key": b64url(bytes(32))}, "not a P-256"),
    ("subject", {"vapid_subject": "push@example.com"}, "mailto: or https:"),
    ("localhost subject", {"vapid_subject": "mailto:me@localhost"}, "refuses a localhost subject"),
    ("topic", {"topic": "no spaces allowed"}, "at most 32 characters"),
    ("url template", {"url": "{{ event.properties.url "}, "invalid template"),
    ("urgency", {"urgency": "urgent"}, "urgency"),
    ("typo", {"tll": 60}, "tll"),
]


@pytest.mark.parametrize(("case", "options", "message"), BAD_CONFIG, ids=[b[0] for b in BAD_CONFIG])
def test_config_problems_are_reported_at_load(case: str, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        WebPushConfig.model_validate({"vapid_private_key": VAPID_PRIVATE, "vapid_subject": SUBJECT, **options})


def test_the_private_key_never_shows() -> None:
    config = WebPushConfig.model_validate({"vapid_private_key": VAPID_PRIVATE, "vapid_subject": SUBJECT})
    assert VAPID_PRIVATE not in repr(config) and VAPID_PRIVATE not in str(config.model_dump())


def test_webpush_keys_command_prints_a_working_pair() -> None:
    cli = Group()
    get_plugin_manager(load_entry_points=False, extra=[webpush]).hook.register_commands(cli=cli)
    result = CliRunner().invoke(cli, ["webpush-keys"])
    assert result.exit_code == 0, result.output
    lines = dict(line.split("=", 1) for line in result.output.splitlines())
    private = load_private_key(lines["VAPID_PRIVATE_KEY"])
    assert b64url(point(private.public_key())) == lines["VAPID_PUBLIC_KEY"]
    assert len(b64url_decode(lines["VAPID_PUBLIC_KEY"])) == 65
    assert generate_vapid_keys() != generate_vapid_keys()


# --- end to end: a rule sends through the real app -------------------------------------------------------------


CONFIG = """\
storage: {{url: '{db_url}'}}
sources:
  in: {{plugin: scripted, url_token: tok}}
sinks:
  push:
    plugin: webpush
    vapid_private_key: {key}
    vapid_subject: {subject}
    url: "{{{{ event.properties.url }}}}"
    allow: [127.0.0.1/32]
    timeout: 5
policies:
  consent: {{push: required}}
rules:
  - name: cart
    when: track.cart_left
    send: {{via: push, template: cart}}
"""
TEMPLATES = {
    "cart.subject.j2": "Your cart, {{ contact.first_name }}",
    "cart.txt.j2": "{{ event.properties.count }} items",
}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(datetime(2026, 6, 1, 12, tzinfo=UTC))


def cart_left(devices: list[dict[str, Any]]) -> dict[str, Any]:
    """Ada left her cart; she takes push on these devices."""
    contact = {"email": "ada@example.com", "first_name": "Ada", "consent": {"push": "granted"}}
    return {
        "type": "track.cart_left",
        "contact": contact | {"push_subscriptions": devices},
        "properties": {"count": 2, "url": "https://shop.example.com/cart"},
        "correlation": ["cart:1"],
    }


async def test_a_rule_pushes_to_every_browser_and_forgets_the_gone_one(
    aiohttp_client: Any, tmp_path: Path, db_url: str, service: PushService, clock: FakeClock
) -> None:
    pm = get_plugin_manager(load_entry_points=False, extra=[ScriptedPlugin(), webpush])
    text = CONFIG.format(db_url=db_url, key=VAPID_PRIVATE, subject=SUBJECT)
    settings = load_config(write_deployment(tmp_path, text, TEMPLATES), collect(pm), pm)
    app = create_app(settings, pm=pm, clock=clock, role="web")
    client = await aiohttp_client(app)
    live, gone = service.browser("live"), service.browser("gone", Reply(410))
    devices = [live.subscription(), gone.subscription(), {"kind": "fcm", "address": "fcm-1", "keys": {}}]
    response = await client.post("/hooks/in/tok", data=json.dumps([cart_left(devices)]).encode())
    assert response.status == 200
    await app[GATEWAY_KEY].worker.drain()

    with app[GATEWAY_KEY].db.engine.connect() as conn:
        delivery = conn.execute(sa.text("SELECT status, provider_id, attempts, sink FROM deliveries")).one()
        left = conn.execute(sa.text("SELECT kind, address FROM push_subscriptions ORDER BY kind")).all()
    assert tuple(delivery) == ("sent", "/m/live", 1, "push")
    assert [tuple(row) for row in left] == [("fcm", "fcm-1"), ("webpush", live.endpoint)]
    plaintexts = {r.path: json.loads(r.plaintext or b"") for r in service.received}
    assert plaintexts["/push/live"] == {
        "title": "Your cart, Ada",
        "body": "2 items",
        "url": "https://shop.example.com/cart",
    }
    assert set(plaintexts) == {"/push/live", "/push/gone"}


async def test_a_push_to_three_browsers_is_recorded_and_made_once_whatever_the_length_of_their_ids(
    aiohttp_client: Any, tmp_path: Path, db_url: str, service: PushService, clock: FakeClock
) -> None:
    """Each push service names the message it took in its Location (RFC 8030 5), 100-odd characters at Mozilla's
    autopush; the sink joins them, one per browser: longer than deliveries.provider_id for three browsers. The id is
    cut to fit: PostgreSQL refused the record, and the job, back in the queue, pushed again at every retry."""
    pm = get_plugin_manager(load_entry_points=False, extra=[ScriptedPlugin(), webpush])
    text = CONFIG.format(db_url=db_url, key=VAPID_PRIVATE, subject=SUBJECT)
    settings = load_config(write_deployment(tmp_path, text, TEMPLATES), collect(pm), pm)
    app = create_app(settings, pm=pm, clock=clock, role="web")
    client = await aiohttp_client(app)
    names = ("laptop", "phone", "tablet")
    browsers = [
        service.browser(name, Reply(headers={"Location": f"https://updates.push.services.mozilla.com/m/{name:x<150}"}))
        for name in names
    ]
    event = cart_left([browser.subscription() for browser in browsers])
    assert (await client.post("/hooks/in/tok", data=json.dumps([event]).encode())).status == 200
    gateway = app[GATEWAY_KEY]
    await gateway.worker.drain()
    for _ in range(3):  # past any retry
        clock.advance(timedelta(hours=1))
        await gateway.worker.drain()
    assert sorted(r.path for r in service.received) == [f"/push/{name}" for name in names]
    with gateway.db.engine.connect() as conn:
        status, provider_id = conn.execute(sa.text("SELECT status, provider_id FROM deliveries")).one()
        job = conn.execute(sa.text("SELECT status FROM jobs WHERE kind = 'step'")).scalar()
    assert (status, job, len(provider_id)) == ("sent", "done", 300)
    assert provider_id.startswith("https://updates.push.services.mozilla.com/m/laptop") and provider_id[-1] == "…"
