"""Shopify source: signatures over the raw bytes, header spellings, rotation, topics -> events."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import FIXTURES, SHARED_PAYLOADS
from declic_gateway import BadRequest, MalformedPayload, RawCall, SignatureError
from declic_gateway.kit.clock import FakeClock
from declic_gateway.kit.sources import Deployment
from declic_plugins.shopify import Shopify, ShopifyConfig

DEPLOYMENT = Deployment("https://hooks.example.com", "UTC", FakeClock())

# Published vectors from Shopify's own SDK test suites (secret, raw body, header):
# shopify-app-js lib/webhooks/__tests__/validate.test.ts and shopify-api-php tests/Webhooks/RegistryTest.php.
# The two bodies differ by one space: only a check over the raw bytes accepts both.
PUBLISHED = [
    ("test_secret_key", b'{"foo": "bar"}', "B23tXN681gZ0qIWNRrgtzBE9XSDo5yaUu6wfmhu3a7g="),
    ("steffi", b'{"foo":"bar"}', "/Redz4YXHLnSmmSN8grr5/Jl/Ua3d7yX3iWbjb8R8wo="),
]


def source(secret: str = "s3cret", previous: str | None = None) -> Shopify:
    config = ShopifyConfig.model_validate({"secret": secret, "previous_secret": previous})
    return Shopify("shop", config, DEPLOYMENT)


def request(headers: dict[str, str]) -> web.Request:
    return make_mocked_request("POST", "/hooks/shop", headers=headers)


def sign(secret: str, body: bytes) -> str:
    return base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()


def headers(hmac_value: str, prefix: str = "X-Shopify-", **drop: bool) -> dict[str, str]:
    values = {
        "Hmac-Sha256": hmac_value,
        "Topic": "orders/create",
        "Shop-Domain": "s.myshopify.com",
        "Webhook-Id": "wh-1",
        "API-Version": "2026-07",
    }
    return {prefix + k: v for k, v in values.items() if not drop.get(k.replace("-", "_").lower())}


@pytest.mark.parametrize(("secret", "body", "given"), PUBLISHED)
async def test_published_vectors_verify(secret: str, body: bytes, given: str) -> None:
    await source(secret).verify(request(headers(given)), body)


@pytest.mark.parametrize(("secret", "body", "given"), PUBLISHED)
async def test_published_vector_fails_with_the_other_body(secret: str, body: bytes, given: str) -> None:
    other = PUBLISHED[1][1] if body == PUBLISHED[0][1] else PUBLISHED[0][1]
    with pytest.raises(SignatureError):
        await source(secret).verify(request(headers(given)), other)


BODY = b'{"id": 1, "email": "a@example.com"}'
GOOD = sign("s3cret", BODY)

REJECTIONS: list[tuple[str, dict[str, str], bytes, type[Exception], str]] = [
    ("missing signature", headers(GOOD, hmac_sha256=True), BODY, SignatureError, "missing X-Shopify-Hmac-Sha256"),
    ("wrong secret", headers(sign("other", BODY)), BODY, SignatureError, "does not match"),
    ("tampered body", headers(GOOD), BODY.replace(b"1", b"2"), SignatureError, "does not match"),
    ("not base64", headers("%%%not-base64%%%"), BODY, SignatureError, "not base64"),
    (
        "hex instead of base64",
        headers(hmac.new(b"s3cret", BODY, hashlib.sha256).hexdigest()),
        BODY,
        SignatureError,
        "does not match",
    ),
    ("missing topic", headers(GOOD, topic=True), BODY, BadRequest, "missing X-Shopify-Topic"),
    ("missing webhook id", headers(GOOD, webhook_id=True), BODY, BadRequest, "missing X-Shopify-Webhook-Id"),
    ("missing shop", headers(GOOD, shop_domain=True), BODY, BadRequest, "missing X-Shopify-Shop-Domain"),
    ("empty body", headers(sign("s3cret", b"")), b"", BadRequest, "empty body"),
]


@pytest.mark.parametrize(("case", "hdrs", "body", "error", "reason"), REJECTIONS, ids=[r[0] for r in REJECTIONS])
async def test_rejections(case: str, hdrs: dict[str, str], body: bytes, error: type[Exception], reason: str) -> None:
    with pytest.raises(error, match=reason):
        await source().verify(request(hdrs), body)


async def test_events_preview_header_spelling_is_accepted() -> None:
    src = source()
    req = request(headers(GOOD, prefix="shopify-"))
    await src.verify(req, BODY)
    assert src.dedupe_key(req, BODY) == "s.myshopify.com:wh-1"


async def test_trailing_newline_in_header_is_tolerated() -> None:
    await source().verify(request(headers(GOOD + "\n")), BODY)


@pytest.mark.parametrize("secret", ["new-secret", "old-secret"])
async def test_both_secrets_accepted_during_rotation(secret: str) -> None:
    await source("new-secret", previous="old-secret").verify(request(headers(sign(secret, BODY))), BODY)


async def test_old_secret_refused_once_rotation_is_over() -> None:
    with pytest.raises(SignatureError):
        await source("new-secret").verify(request(headers(sign("old-secret", BODY))), BODY)


def raw(topic: str, body: bytes) -> RawCall:
    return RawCall(7, "shop", datetime(2026, 3, 14, tzinfo=UTC), {"X-Shopify-Topic": topic}, body)


def load(name: str) -> bytes:
    return (FIXTURES / "shopify" / name).read_bytes()


NORMALIZE: list[tuple[str, str, dict[str, Any]]] = [
    (
        "checkouts/create",
        "checkout.json",
        {
            "type": "checkout.started",
            "correlation": ["checkout:c0ffee5ca7e1d2b3a4f5e6d7c8b9a0f1"],
            "total_price": Decimal("59.90"),
            "currency": "EUR",
            "email": "camille.durand@example.org",
            "consent": {"email": "granted", "sms": "none"},
            "external_ids": {"shopify": "5550001"},
        },
    ),
    ("checkouts/update", "checkout.json", {"type": "checkout.updated"}),
    (
        "orders/create",
        "order.json",
        {
            "type": "order.placed",
            "total_price": Decimal("59.90"),
            "correlation": ["order:7001002003", "checkout:c0ffee5ca7e1d2b3a4f5e6d7c8b9a0f1"],
            "occurred_at": datetime.fromisoformat("2026-03-14T09:40:02+01:00"),
        },
    ),
    ("orders/paid", "order.json", {"type": "order.paid"}),
    ("orders/fulfilled", "order.json", {"type": "order.fulfilled"}),
    ("orders/cancelled", "order.json", {"type": "order.cancelled"}),
    (
        "customers/create",
        "customer.json",
        {
            "type": "customer.created",
            "correlation": ["customer:5550002"],
            "first_name": "Noah",
            "consent": {"email": "granted", "sms": "none"},
            "phone": "+33698765432",
        },
    ),
    ("customers/update", "customer.json", {"type": "customer.updated"}),
    (
        "customers_email_marketing_consent/update",
        "email_consent_update.json",
        {
            "type": "email.unsubscribed",
            "consent": {"email": "withdrawn"},
            "email": "noah.martin@example.org",
            "external_ids": {"shopify": "5550002"},
        },
    ),
    (
        "customers/marketing_consent/update",
        "sms_consent_update.json",
        {
            "type": "profile.updated",
            "consent": {"sms": "granted"},
            "phone": "+33698765432",
        },
    ),
]


@pytest.mark.parametrize(("topic", "fixture", "expected"), NORMALIZE, ids=[n[0] for n in NORMALIZE])
def test_topics_become_canonical_events(topic: str, fixture: str, expected: dict[str, Any]) -> None:
    [event] = source().normalize(raw(topic, load(fixture)))
    seen = {
        "type": event.type,
        "correlation": event.correlation,
        "occurred_at": event.occurred_at,
        "total_price": event.properties.get("total_price"),
        "currency": event.properties.get("currency"),
        "email": event.contact.email,
        "phone": event.contact.phone,
        "first_name": event.contact.first_name,
        "consent": {channel: s.state for channel, s in event.contact.consent.items()},
        "external_ids": event.contact.external_ids,
    }
    assert {k: seen[k] for k in expected} == expected


def test_checkout_carries_recovery_url_and_decimal_line_prices() -> None:
    [event] = source().normalize(raw("checkouts/create", load("checkout.json")))
    assert event.properties["recovery_url"].endswith("/recover?key=k1")
    assert [item["price"] for item in event.properties["line_items"]] == [Decimal("18.00"), Decimal("18.00")]


def test_unused_topic_is_acknowledged_without_events() -> None:
    assert source().normalize(raw("products/update", b'{"id": 1}')) == []


@pytest.mark.parametrize(
    ("topic", "body", "reason"),
    [
        ("orders/create", b"not json", "body is not JSON"),
        ("orders/create", b"[1, 2]", "expected a JSON object"),
        ("orders/create", b'{"email": "a@b.c"}', "KeyError"),
        ("checkouts/create", b'{"token": "t", "total_price": "12,50"}', "InvalidOperation"),
        ("customers_email_marketing_consent/update", b'{"customer_id": 1}', "no email_marketing_consent.state"),
    ],
)
def test_malformed_bodies_say_why(topic: str, body: bytes, reason: str) -> None:
    with pytest.raises(MalformedPayload, match=reason):
        source().normalize(raw(topic, body))


SHARED = SHARED_PAYLOADS / "shopify"


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared sample payloads not present")
@pytest.mark.parametrize(
    ("topic", "name", "kind"),
    [
        ("orders/create", "order.json", "order.placed"),
        ("checkouts/create", "abandoned_checkout.json", "checkout.started"),
        ("customers/create", "customer.json", "customer.created"),
    ],
)
def test_official_sdk_fixtures_normalise(topic: str, name: str, kind: str) -> None:
    body = (SHARED / name).read_bytes()
    [event] = source().normalize(raw(topic, body))
    data = json.loads(body)
    assert event.type == kind
    assert event.contact.email == (data.get("email") or data["customer"]["email"])
    if "total_price" in data:
        assert event.properties["total_price"] == Decimal(data["total_price"])
        assert event.properties["currency"] == data["currency"]


# --- Property: whatever arrives, the answer is 2xx or 4xx, and a signed body never crashes normalisation ----

HEADER_TEXT = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
TOPICS = (
    st.sampled_from(
        [
            "orders/create",
            "checkouts/create",
            "customers/create",
            "customers_email_marketing_consent/update",
            "customers/marketing_consent/update",
            "products/update",
        ]
    )
    | HEADER_TEXT
)


@pytest.fixture
async def client(aiohttp_client: Any, tmp_path: Path) -> Any:
    """One app for every example (fixtures run per test, not per example)."""
    from declic_gateway.http.app import create_app, load
    from declic_gateway.testing import write_deployment

    path = write_deployment(
        tmp_path,
        f"storage: {{url: 'sqlite:///{tmp_path}/p.db'}}\nsources:\n  shop: {{plugin: shopify, secret: s3cret}}\n",
    )
    settings, pm, _ = load(str(path))
    return await aiohttp_client(create_app(settings, pm=pm, role="web"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.binary(max_size=200) | JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    topic=TOPICS,
    signed=st.booleans(),
    hmac_header=st.none() | HEADER_TEXT,
    webhook_id=st.none() | HEADER_TEXT,
)
async def test_any_request_gets_2xx_or_4xx(
    client: Any, body: bytes, topic: str, signed: bool, hmac_header: str | None, webhook_id: str | None
) -> None:
    headers = {"X-Shopify-Topic": topic, "X-Shopify-Shop-Domain": "s.myshopify.com"}
    if webhook_id:
        headers["X-Shopify-Webhook-Id"] = webhook_id
    value = sign("s3cret", body) if signed else hmac_header
    if value is not None:
        headers["X-Shopify-Hmac-Sha256"] = value
    response = await client.post("/hooks/shop", data=body, headers=headers)
    assert 200 <= response.status < 500, await response.text()


@settings(max_examples=200, deadline=None)
@given(body=JSON_VALUES.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=100), topic=TOPICS)
def test_normalise_only_ever_raises_malformed_payload(body: bytes, topic: str) -> None:
    with contextlib.suppress(MalformedPayload):  # anything else (KeyError, TypeError...) fails the test
        source().normalize(raw(topic, body))
