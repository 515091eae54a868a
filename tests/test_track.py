"""The site's Segment-compatible endpoint: write keys, Tracking API limits, messages -> events, contacts."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import hypothesis
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, make_mocked_request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from conftest import FIXTURES, SHARED_PAYLOADS
from declic_gateway import BadRequest, MalformedPayload, RawCall, SignatureError
from declic_gateway.config import load_config
from declic_gateway.http.app import create_app
from declic_gateway.http.running import GATEWAY_KEY
from declic_gateway.kit.sources import Deployment
from declic_gateway.plugins import collect, get_plugin_manager
from declic_gateway.testing import FakeClock, write_deployment
from declic_plugins.track import SECRET, SECRET_SIGNED, WRITE, Track, TrackConfig, event_slug, push_subscription

KEY = "site-write-key"
SECRET_KEY = "site-secret-key-for-servers"
RECEIVED = datetime(2026, 5, 4, 9, 32, tzinfo=UTC)


def source() -> Track:
    config = TrackConfig.model_validate({"write_key": KEY, "secret_key": SECRET_KEY})
    return Track("site", config, Deployment(None, "UTC", FakeClock(RECEIVED)))


def basic(user: str, password: str = "") -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def request(authorization: str | None = None) -> web.Request:
    headers = {"Authorization": authorization} if authorization else {}
    return make_mocked_request("POST", "/hooks/site", headers=headers)


def load(name: str) -> bytes:
    return (FIXTURES / "segment" / name).read_bytes()


def body(**message: Any) -> bytes:
    return json.dumps({"type": "track", "event": "Signed Up", "anonymousId": "a-1", **message}).encode()


# --- Who may call: Segment's write key, as the Basic user or as `writeKey` in the body; the secret key, --
# --- only as the Basic user (a body is stored, and may come from a page) ------------------------------

AUTH: list[tuple[str, str | None, bytes, str | type[Exception]]] = [
    ("basic user, empty password", basic(KEY), body(), WRITE),
    ("basic user, no colon (legacy)", "Basic " + base64.b64encode(KEY.encode()).decode(), body(), WRITE),
    ("writeKey in the body (analytics.js)", None, body(writeKey=KEY), WRITE),
    ("bearer token (Segment OAuth) and writeKey in the body", "Bearer abc", body(writeKey=KEY), WRITE),
    ("basic wins over the body", basic(KEY), body(writeKey="other"), WRITE),
    ("secret key as the basic user", basic(SECRET_KEY), body(), SECRET),
    ("secret key as the basic user, write key in the body", basic(SECRET_KEY), body(writeKey=KEY), SECRET),
    ("write key as the basic user, secret key in the body", basic(KEY), body(writeKey=SECRET_KEY), WRITE),
    ("secret key in the body", None, body(writeKey=SECRET_KEY), SignatureError),
    ("secret key in the body, with a bearer token", "Bearer x", body(writeKey=SECRET_KEY), SignatureError),
    ("secret key but one letter", basic(SECRET_KEY[:-1] + "S"), body(), SignatureError),
    ("secret key as the basic password", basic("", SECRET_KEY), body(), SignatureError),
    ("wrong basic user", basic("other"), body(writeKey=KEY), SignatureError),
    ("wrong writeKey", None, body(writeKey="site-write-keY"), SignatureError),
    ("no key at all", None, body(), SignatureError),
    ("writeKey not a string", None, body(writeKey=["site-write-key"]), SignatureError),
    ("basic not base64", "Basic %%%", body(), SignatureError),
    ("basic not utf-8", "Basic " + base64.b64encode(b"\xff\xfe:").decode(), body(), SignatureError),
]  # fmt: skip


@pytest.mark.parametrize(("case", "authorization", "data", "expected"), AUTH, ids=[a[0] for a in AUTH])
async def test_keys(case: str, authorization: str | None, data: bytes, expected: str | type[Exception]) -> None:
    call = request(authorization)
    if isinstance(expected, str):
        await source().verify(call, data)
        marked = source().dedupe_key(call, data).startswith(SECRET_SIGNED)
        assert marked is (expected == SECRET)
    else:
        with pytest.raises(expected):
            await source().verify(call, data)


async def test_a_write_key_call_is_never_marked_as_the_secret_keys_whatever_it_sends() -> None:
    forged = body(writeKey=KEY, messageId=SECRET_SIGNED + "message:1", dedupe_key=SECRET_SIGNED)
    call = request(None)
    await source().verify(call, forged)
    key = source().dedupe_key(call, forged)
    assert key == "message:secret-key:message:1"
    [event] = source().normalize(RawCall(5, "site", RECEIVED, {"X-Declic-Key": SECRET}, forged, key))
    assert event.contact.trusted is False
    assert source().dedupe_key(request(basic(SECRET_KEY)), body()).startswith("message:")  # never verified


async def test_the_secret_key_has_its_own_dedupe_keys_and_its_calls_are_trusted() -> None:
    data = body(type="identify", messageId="m-1", traits={"email": "ada@example.org"})
    by_page, by_server = request(None), request(basic(SECRET_KEY))
    await source().verify(by_page, body(type="identify", messageId="m-1", writeKey=KEY))
    await source().verify(by_server, data)
    assert source().dedupe_key(by_page, data) == "message:m-1"
    assert source().dedupe_key(by_server, data) == "secret-key:message:m-1"  # not a duplicate of the page's
    [event] = source().normalize(RawCall(5, "site", RECEIVED, {}, data, "secret-key:message:m-1"))
    assert event.contact.trusted is True and event.contact.email == "ada@example.org"
    [event] = source().normalize(RawCall(6, "site", RECEIVED, {}, data, "message:m-1"))
    assert event.contact.trusted is False


@pytest.mark.parametrize(
    ("options", "problem"),
    [({"write_key": SECRET_KEY, "secret_key": SECRET_KEY}, "secret_key must differ from write_key"),
     ({"write_key": KEY, "secret_key": "short"}, "at least 16 characters")],
)  # fmt: skip
def test_secret_key_problems_are_reported_at_load(options: dict[str, str], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem) as raised:
        TrackConfig.model_validate(options)
    assert all(problem in error["msg"] for error in raised.value.errors())


def test_the_secret_key_never_shows() -> None:
    config = TrackConfig.model_validate({"write_key": KEY, "secret_key": SECRET_KEY})
    assert SECRET_KEY not in repr(config) and SECRET_KEY not in str(config.model_dump())


# --- What the Tracking API refuses with 400, refused here before anything is stored ----------

SUBSCRIPTION = json.loads(load("identify.json"))["traits"]["webpush_subscription"]
BIG = "x" * (32 * 1024)


def batch(*items: dict[str, Any]) -> bytes:
    return json.dumps({"batch": list(items)}).encode()


def push(subscription: dict[str, Any], trait: str = "webpush_subscription") -> bytes:
    return body(type="identify", traits={trait: subscription})


def consent(value: Any) -> bytes:
    return body(type="identify", traits={"email": "ada@example.org", "consent": value})


TRACK = json.loads(body())
REJECTIONS: list[tuple[str, bytes, str]] = [
    ("not json", b"<html>", "not JSON"),
    ("not an object", b'["track"]', "expected a JSON object"),
    ("no type", json.dumps({"anonymousId": "a", "event": "E"}).encode(), "type: expected one of"),
    ("unknown type", body(type="trak"), "type: expected one of"),
    ("no user or anonymous id", body(anonymousId=None), "userId/anonymousId"),
    ("id too long", body(anonymousId="a" * 321), "userId/anonymousId"),
    ("track without event", body(event=None), "needs an event name"),
    ("event name of punctuation only", body(event="!!!"), "needs an event name"),
    ("event name too long", body(event="e" * 91), "needs an event name"),
    ("properties not an object", body(properties=[1]), "properties: expected an object"),
    ("bad timestamp", body(timestamp="yesterday"), "timestamp: not an ISO 8601"),
    ("message over 32 KB", body(properties={"x": BIG}), "the limit is 32768"),
    ("batch not a list", json.dumps({"batch": {"type": "track"}}).encode(), "`batch` must be a list"),
    ("batch item not an object", json.dumps({"batch": [1]}).encode(), r"batch\[0\] is not an object"),
    ("batch sentAt", json.dumps({"batch": [TRACK], "sentAt": "now"}).encode(), "sentAt: not an ISO 8601"),
    ("batch item over 32 KB", batch({**TRACK, "properties": {"x": BIG}}), "32768"),
    ("batch over 500 KB", batch(*[{**TRACK, "properties": {"x": "y" * 30000}}] * 18), "512000"),
    ("push over http", push({**SUBSCRIPTION, "endpoint": "http://push.example/x"}), "endpoint must be an https URL"),
    ("push to another port", push({**SUBSCRIPTION, "endpoint": "https://push.example:6379/x"}), "on the default port"),
    ("push, short auth key", push({**SUBSCRIPTION, "keys": {**SUBSCRIPTION["keys"], "auth": "AAAA"}}), "expected 16"),
    ("push without keys", push({"endpoint": "https://p.example/1"}, "webpushSubscription"), "expected {endpoint"),
    ("consent not an object", consent("granted"), "traits.consent: expected an object"),
    ("consent channel", consent({"E-mail": "granted"}), "traits.consent: 'E-mail' is not a channel name"),
    ("consent state", consent({"email": "subscribed"}), "traits.consent: email: expected granted, withdrawn"),
    ("consent as a boolean", consent({"email": True}), "traits.consent: email: expected granted"),
    ("consent object without state", consent({"sms": {"at": "2026-05-04T09:00:00Z"}}), "sms: expected granted"),
    ("consent unknown key", consent({"push": {"state": "granted", "ip": "1.2.3.4"}}), "push: unknown keys ip"),
    ("consent time", consent({"email": {"state": "granted", "at": "hier"}}), "email.at: not an ISO 8601"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "data", "reason"), REJECTIONS, ids=[r[0] for r in REJECTIONS])
async def test_rejections(case: str, data: bytes, reason: str) -> None:
    with pytest.raises(BadRequest, match=reason):
        await source().verify(request(basic(KEY)), data)


@pytest.mark.parametrize("name", ["page.json", "identify.json", "track_signed_up.json", "analytics_js_batch.json"])
async def test_analytics_js_bodies_verify_with_their_write_key(name: str) -> None:
    await source().verify(request(), load(name))


async def test_server_library_batch_verifies_with_basic_auth() -> None:
    await source().verify(request(basic(KEY)), load("server_batch.json"))


@pytest.mark.parametrize(("token", "served"), [(None, True), ("t", True), ("p", True), ("b", True), ("x", False)])
def test_analytics_js_paths_are_served(token: str | None, served: bool) -> None:
    assert source().url_token_matches(token) is served


# --- Dedupe: Segment's messageId; for a batch, a hash of its messageIds --------------------------


def test_dedupe_key_is_the_message_id() -> None:
    assert source().dedupe_key(request(), load("page.json")) == (
        "message:ajs-next-1777886998512-4f1c8d2e-7a3b-4c5d-9e6f-0a1b2c3d4e5f"
    )


def test_a_retried_batch_has_the_same_key_whatever_its_order_or_metadata() -> None:
    data = json.loads(load("analytics_js_batch.json"))
    retried = {**data, "sentAt": "2026-05-04T09:35:00.000Z", "batch": list(reversed(data["batch"]))}
    retried["batch"][0]["_metadata"] = {"retryCount": 2}
    first = source().dedupe_key(request(), json.dumps(data).encode())
    assert first.startswith("batch:")
    assert source().dedupe_key(request(), json.dumps(retried).encode()) == first
    assert source().dedupe_key(request(), json.dumps({**data, "batch": data["batch"][:1]}).encode()) != first


def test_a_message_without_id_is_keyed_by_its_content_and_odd_ids_are_hashed() -> None:
    assert source().dedupe_key(request(), body()) == source().dedupe_key(request(), body())
    assert source().dedupe_key(request(), body(messageId="a\x00b")).startswith("message-sha256:")


# --- Messages -> events ---------------------------------------------------------------------------


def raw(data: bytes) -> RawCall:
    return RawCall(5, "site", RECEIVED, {}, data)


def test_page_becomes_page_viewed_with_the_page_fields() -> None:
    [event] = source().normalize(raw(load("page.json")))
    assert event.type == "page.viewed"
    assert {k: event.properties[k] for k in ("path", "title", "name", "referrer")} == {
        "path": "/collections/robes",
        "title": "Robes – Boutique Camille",
        "name": "Collection",
        "referrer": "https://www.google.com/",
    }
    assert event.properties["url"].startswith("https://boutique.example.com/collections/robes?")
    assert event.contact.external_ids == {"site_anonymous": "5b7c3e1a-9d2f-4e6a-8c0b-1d3f5e7a9c2b"}
    assert (event.contact.locale, event.contact.timezone) == ("fr-FR", "Europe/Paris")
    assert event.correlation == ["track:ajs-next-1777886998512-4f1c8d2e-7a3b-4c5d-9e6f-0a1b2c3d4e5f"]
    assert event.occurred_at == datetime(2026, 5, 4, 9, 29, 58, 512000, tzinfo=UTC)


def test_identify_updates_the_contact_and_carries_the_push_subscription() -> None:
    [event] = source().normalize(raw(load("identify.json")))
    contact = event.contact
    assert event.type == "profile.updated"
    assert (contact.email, contact.first_name, contact.last_name, contact.phone) == (
        "Camille.Durand@example.org",
        "Camille",
        "Durand",
        "+33612345678",
    )
    assert contact.external_ids == {"site": "cus_1042", "site_anonymous": "5b7c3e1a-9d2f-4e6a-8c0b-1d3f5e7a9c2b"}
    assert contact.attributes == {
        "birthday": "1991-04-23",
        "plan": "fidélité",
        "address": {"city": "Lyon", "country": "FR"},
    }
    [device] = contact.push_subscriptions  # the webpush sink reaches the contact through it
    assert device.kind == "webpush" and device.address.startswith("https://fcm.googleapis.com/")
    assert set(device.keys) == {"p256dh", "auth"}


@pytest.mark.parametrize(
    ("name", "slug"),
    [("Signed Up", "signed_up"), ("Order Completed", "order_completed"), ("page-scroll 50%", "page_scroll_50"),
     ("  Inscrit à la newsletter ", "inscrit_à_la_newsletter"), ("checkout.started", "checkout_started")],
)  # fmt: skip
def test_event_names_become_track_types(name: str, slug: str) -> None:
    assert event_slug(name) == slug
    [event] = source().normalize(raw(body(event=name)))
    assert event.type == f"track.{slug}" and event.properties["event"] == name


def test_analytics_js_batch_keeps_each_message_its_own_id() -> None:
    events = source().normalize(raw(load("analytics_js_batch.json")))
    assert [e.type for e in events] == ["track.product_added", "page.viewed"]
    assert [e.correlation[0] for e in events] == [
        "track:ajs-next-1777887100001-aa11bb22-cc33-4d44-8e55-ff6677889900",
        "track:ajs-next-1777887101002-0099aabb-ccdd-4eef-8011-223344556677",
    ]
    assert events[0].properties["price"] == Decimal("18.0")


def test_server_batch_with_e_commerce_names_stays_track_and_group_is_the_groups() -> None:
    order, identify, group = source().normalize(raw(load("server_batch.json")))
    assert (order.type, identify.type, group.type) == ("track.order_completed", "profile.updated", "group.joined")
    assert group.properties["group_id"] == "b2b-77" and group.properties["traits"] == {"name": "Atelier Lumière"}
    assert group.contact.attributes == {} and group.contact.first_name is None  # the company's traits, not hers
    assert order.properties["total"] == Decimal("59.9") and order.properties["currency"] == "EUR"
    assert order.contact.external_ids == {"site": "cus_1042"}
    assert identify.contact.first_name == "Camille" and identify.contact.attributes == {"loyalty_points": 120}


def test_a_batch_keeps_its_good_messages_and_skips_the_others_as_segment_does() -> None:
    bad_push = {**TRACK, "type": "identify", "traits": {"webpush_subscription": {"endpoint": "x"}}}
    data = batch({"type": "page"}, TRACK, {**TRACK, "event": "!!"}, {**TRACK, "timestamp": "x"}, bad_push)
    assert [e.type for e in source().normalize(raw(data))] == ["track.signed_up"]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"timestamp": "2026-05-04T09:00:00Z"}, datetime(2026, 5, 4, 9, tzinfo=UTC)),
        ({"originalTimestamp": "2026-05-04T10:00:00+02:00"}, datetime(2026, 5, 4, 8, tzinfo=UTC)),
        ({"sentAt": "2026-05-04T09:10:00"}, datetime(2026, 5, 4, 9, 10, tzinfo=UTC)),
        ({"timestamp": "2026-05-04T11:00:00Z"}, RECEIVED),  # a browser clock ahead of ours
        ({}, RECEIVED),
    ],
)
def test_when_it_happened(fields: dict[str, str], expected: datetime) -> None:
    [event] = source().normalize(raw(body(**fields)))
    assert event.occurred_at == expected


def test_traits_that_do_not_fit_the_contact_are_left_out() -> None:
    traits = {"email": "a" * 310 + "@example.org", "phone": 33612345678, "first_name": "Ada\x00", "birthday": "?"}
    [event] = source().normalize(raw(body(type="identify", traits=traits, context={"timezone": "Mars/Olympus"})))
    contact = event.contact
    assert (contact.email, contact.phone, contact.first_name, contact.timezone) == (None, "33612345678", None, None)
    assert "birthday" not in contact.attributes


@pytest.mark.parametrize(
    ("traits", "email", "phone"),
    [({"email": "not an address", "phone": "call me"}, None, None),
     ({"email": " ada@example.org ", "phone": "+33 6 12 34 56 78"}, "ada@example.org", "+33 6 12 34 56 78")],
)  # fmt: skip
def test_email_and_phone_must_look_like_one(traits: dict[str, str], email: str | None, phone: str | None) -> None:
    [event] = source().normalize(raw(body(type="identify", traits=traits)))
    assert (event.contact.email, event.contact.phone) == (email, phone)


# --- identify's consent traits: what the person did on the site, dated, with what shows it --------------

CONSENT_TRAITS = {
    "consent": {
        "email": {"state": "granted", "at": "2026-05-03T12:00:00+02:00", "text_version": "newsletter-v4"},
        "sms": "withdrawn",
        "push": {"state": "granted", "at": "2027-01-01T00:00:00Z"},  # a clock ahead of ours
    },
    "consent_text_version": "v3",
    "consent_form": "footer-signup",
}
SIGNUP_PAGE = {"ip": "203.0.113.9", "userAgent": "Mozilla/5.0 (X11)", "page": {"url": "https://shop.example/signup"}}


def identify_call(key: str, context: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> RawCall:
    data = body(type="identify", userId="cus_1042", traits=CONSENT_TRAITS, context=context or SIGNUP_PAGE,
                timestamp="2026-05-04T09:00:00Z")  # fmt: skip
    peer = {"X-Declic-Peer-Address": "198.51.100.4"}
    return RawCall(5, "site", RECEIVED, peer if headers is None else headers, data, key)


def test_consent_traits_signed_with_the_secret_key_are_dated_by_the_server() -> None:
    [event] = source().normalize(identify_call("secret-key:message:1"))
    consent = event.contact.consent
    assert {channel: (s.state, s.stated_at, s.action) for channel, s in consent.items()} == {
        "email": ("granted", datetime(2026, 5, 3, 10, tzinfo=UTC), True),
        "sms": ("withdrawn", datetime(2026, 5, 4, 9, tzinfo=UTC), True),  # the message's timestamp
        "push": ("granted", RECEIVED, True),  # never after its arrival: it would outrank every later one
    }
    shown = {
        "ip": "198.51.100.4",
        "visitor_ip": "203.0.113.9",
        "user_agent": "Mozilla/5.0 (X11)",
        "page_url": "https://shop.example/signup",
        "form": "footer-signup",
        "signed_with": "secret key",
    }
    assert consent["email"].evidence == {**shown, "text_version": "newsletter-v4"}
    assert consent["sms"].evidence == consent["push"].evidence == {**shown, "text_version": "v3"}
    assert not set(event.contact.attributes) & {"consent", "consent_text_version", "consent_form"}


def test_consent_traits_signed_with_the_write_key_are_dated_by_their_arrival() -> None:
    [event] = source().normalize(identify_call("message:1"))
    consent = event.contact.consent
    assert {channel: s.stated_at for channel, s in consent.items()} == dict.fromkeys(("email", "sms", "push"), RECEIVED)
    assert consent["sms"].evidence == {  # the browser's claim to an IP is no evidence; the connection's is
        "ip": "198.51.100.4",
        "user_agent": "Mozilla/5.0 (X11)",
        "page_url": "https://shop.example/signup",
        "text_version": "v3",
        "form": "footer-signup",
        "signed_with": "write key",
    }
    assert event.contact.trusted is False


@pytest.mark.parametrize(
    ("key", "headers", "evidence"),
    [("message:1", {"User-Agent": "Mozilla/5.0 (beacon)"}, {"user_agent": "Mozilla/5.0 (beacon)"}),
     ("secret-key:message:1", {"User-Agent": "analytics-python/2.3.3"}, {}),  # the server's, not the visitor's
     ("message:1", {}, {})],
)  # fmt: skip
def test_without_context_the_evidence_is_what_the_call_shows(
    key: str, headers: dict[str, str], evidence: dict[str, str]
) -> None:
    traits = {"consent": {"email": "granted"}}
    data = body(type="identify", userId="cus_1042", traits=traits, context={"library": {"name": "x"}})
    [event] = source().normalize(RawCall(5, "site", RECEIVED, headers, data, key))
    signed = "secret key" if key.startswith(SECRET_SIGNED) else "write key"
    # no evidence stays none, so that the core refuses a public key's grant that shows nothing
    assert event.contact.consent["email"].evidence == ({**evidence, "signed_with": signed} if evidence else {})


def test_consent_is_read_from_identify_only() -> None:
    data = body(context={"traits": {"consent": {"email": "granted"}}})
    [event] = source().normalize(raw(data))
    assert event.contact.consent == {} and "consent" not in event.contact.attributes


def test_push_subscription_may_arrive_as_a_json_string() -> None:
    assert push_subscription(json.dumps(SUBSCRIPTION))["keys"] == SUBSCRIPTION["keys"]


@pytest.mark.parametrize(
    ("data", "reason"),
    [(b"nope", "not JSON"), (b"[]", "expected a JSON object"), (b'{"batch": 3}', "`batch` is not a list")],
)  # fmt: skip
def test_malformed_stored_calls_say_why(data: bytes, reason: str) -> None:
    with pytest.raises(MalformedPayload, match=reason):
        source().normalize(raw(data))


DOCS = Path(__file__).parents[1] / "docs" / "connect" / "track.md"
BROWSER = """
globalThis.localStorage = {}; const sent = [];
globalThis.navigator = {language: "fr-FR", sendBeacon: (url, body) => sent.push([url, body])};
globalThis.location = {href: "https://shop.example/robes", pathname: "/robes"};
globalThis.document = {title: "Robes", referrer: ""};
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
async def test_the_documented_browser_snippet_sends_calls_this_source_accepts(tmp_path: Path) -> None:
    snippet = re.search(r"<script>\n(.*?)</script>", DOCS.read_text(), re.S)
    assert snippet is not None
    script = BROWSER + snippet.group(1).replace("// declic(", "declic(") + "console.log(JSON.stringify(sent));"
    (tmp_path / "page.js").write_text(script)
    output = subprocess.run(["node", str(tmp_path / "page.js")], capture_output=True, text=True, timeout=20, check=True)
    calls = json.loads(output.stdout)
    doc_source = Track("site", TrackConfig.model_validate({"write_key": "your-write-key"}), source().deployment)
    for url, data in calls:
        assert url == "https://hooks.example.com/hooks/site"
        await doc_source.verify(request(), data.encode())
    types = [doc_source.normalize(raw(data.encode()))[0].type for _, data in calls]
    assert types == ["page.viewed", "track.signed_up", "profile.updated"]


SHARED = SHARED_PAYLOADS / "segment"


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared sample payloads for Segment not present")
def test_shared_samples_normalise_without_error() -> None:
    for path in sorted(SHARED.glob("*.json")):
        source().normalize(raw(path.read_bytes()))


# --- End to end: analytics.js and a server library, through real HTTP into the database ----------


async def start(aiohttp_client: Any, tmp_path: Path, db_url: str) -> tuple[TestClient, Any]:
    pm = get_plugin_manager()
    config = f"""\
storage: {{url: '{db_url}'}}
sources:
  site: {{plugin: track, write_key: {KEY}, secret_key: {SECRET_KEY}}}
"""
    settings = load_config(write_deployment(tmp_path, config), collect(pm), pm)
    app = create_app(settings, pm=pm, clock=FakeClock(RECEIVED), role="web")
    return await aiohttp_client(app), app[GATEWAY_KEY]


async def test_site_visitor_becomes_a_known_contact_end_to_end(
    aiohttp_client: Any, tmp_path: Path, db_url: str
) -> None:
    client, gateway = await start(aiohttp_client, tmp_path, db_url)

    def rows(sql: str) -> list[Any]:
        with gateway.db.engine.connect() as conn:
            return [tuple(r) for r in conn.exec_driver_sql(sql)]

    text_plain = {"Content-Type": "text/plain"}  # what analytics.js sends, to stay a CORS "simple" request
    for path, name in (("p", "page.json"), ("t", "track_signed_up.json"), ("i", "identify.json")):
        response = await client.post(f"/hooks/site/{path}", data=load(name), headers=text_plain)
        assert response.status == 200, await response.text()
        # One call at a time, as a visitor's clicks arrive: calls processed concurrently (PostgreSQL
        # workers) can each create a contact for the same new anonymous id, and the core merges no one.
        await gateway.worker.drain()
    again = await client.post("/hooks/site/p", data=load("page.json"), headers=text_plain)
    assert (await again.json())["status"] == "duplicate"
    assert (await client.post("/hooks/site/x", data=load("page.json"))).status == 404
    # The page's identify, signed with the public write key, links the visitor to cus_1042, names them
    # and gives the addresses the page views' contact did not have yet (as creating it would have), but
    # no device: the server does that.
    assert rows("SELECT email, phone, first_name FROM contacts") == [
        ("camille.durand@example.org", "+33612345678", "Camille")
    ]
    assert rows("SELECT count(*) FROM push_subscriptions") == [(0,)]
    relayed = {**{k: v for k, v in json.loads(load("identify.json")).items() if k != "writeKey"}, "messageId": "s-1"}
    server_key = {"Authorization": basic(SECRET_KEY)}
    for data in (json.dumps(relayed).encode(), load("server_batch.json")):
        assert (await client.post("/hooks/site", data=data, headers=server_key)).status == 200
    assert (await client.post("/hooks/site", data=load("server_batch.json"))).status == 401
    await gateway.worker.drain()

    assert rows("SELECT type FROM events ORDER BY inbox_id, id") == [
        ("page.viewed",),
        ("track.signed_up",),
        ("profile.updated",),
        ("profile.updated",),
        ("track.order_completed",),
        ("profile.updated",),
        ("group.joined",),
    ]
    [(email, first_name, phone, timezone, attributes)] = rows(
        "SELECT email, first_name, phone, timezone, attributes FROM contacts"
    )
    assert (email, first_name, phone, timezone) == (
        "camille.durand@example.org",
        "Camille",
        "+33612345678",
        "Europe/Paris",
    )
    assert json.loads(attributes)["birthday"] == "1991-04-23" and json.loads(attributes)["loyalty_points"] == 120
    kinds = "('site', 'site_anonymous', 'email', 'phone')"
    assert sorted(rows(f"SELECT kind, value FROM identities WHERE kind IN {kinds}")) == [
        ("email", "camille.durand@example.org"),
        ("phone", "+33612345678"),
        ("site", "cus_1042"),
        ("site_anonymous", "5b7c3e1a-9d2f-4e6a-8c0b-1d3f5e7a9c2b"),
    ]
    assert all("authorization" not in h.lower() for (h,) in rows("SELECT headers FROM inbox"))
    [(kind, endpoint)] = rows("SELECT kind, address FROM push_subscriptions")
    assert kind == "webpush" and endpoint == SUBSCRIPTION["endpoint"]  # the webpush sink can now reach them


# --- Property: whatever arrives, the answer is 2xx or 4xx -----------------------------------------


@pytest.fixture
async def http(aiohttp_client: Any, tmp_path: Path) -> TestClient:
    client, _ = await start(aiohttp_client, tmp_path, f"sqlite:///{tmp_path}/h.db")
    return client


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
message_keys = st.sampled_from(
    ["type", "event", "userId", "anonymousId", "messageId", "traits", "properties", "context", "timestamp", "batch"]
)
messages = st.dictionaries(message_keys, json_values | st.sampled_from(["track", "page", "identify", "Signed Up"]))
# Real messages with a key or two replaced, so that many calls get past the checks into the inbox.
BASES = [json.loads(load(name)) for name in ("page.json", "identify.json", "track_signed_up.json")]
mutated = st.tuples(st.sampled_from(BASES), st.dictionaries(message_keys, json_values, max_size=2)).map(
    lambda pair: {**pair[0], **pair[1]}
)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.one_of(
        st.binary(max_size=200),
        messages.map(lambda m: json.dumps({**m, "writeKey": KEY}).encode()),
        mutated.map(lambda m: json.dumps({**m, "writeKey": KEY}).encode()),
        st.lists(mutated, max_size=3).map(lambda items: json.dumps({"batch": items, "writeKey": KEY}).encode()),
    ),
    authorization=st.sampled_from(["", basic(KEY), basic("nope"), "Basic ???", "Bearer x"]),
    path=st.sampled_from(["", "", "/t", "/b", "/zz"]),
)
async def test_any_request_gets_2xx_or_4xx(http: TestClient, data: bytes, authorization: str, path: str) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    response = await http.post(f"/hooks/site{path}", data=data, headers=headers)
    hypothesis.event(f"status {response.status}")  # see --hypothesis-show-statistics
    assert 200 <= response.status < 500, await response.text()


@settings(max_examples=200, deadline=None)
@given(data=st.one_of(mutated, st.lists(mutated, max_size=3).map(lambda items: {"batch": items})))
async def test_whatever_verify_accepts_normalises_without_crashing(data: dict[str, Any]) -> None:
    payload = json.dumps(data).encode()
    try:
        await source().verify(request(basic(KEY)), payload)
    except BadRequest:
        return
    for event in source().normalize(raw(payload)):
        assert event.type == "page.viewed" or event.type.startswith(("track.", "profile."))
