"""Standard Webhooks source: the spec's signature scheme, its published vectors, and config-driven mapping."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, make_mocked_request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from conftest import FIXTURES
from declic_gateway import BadRequest, MalformedPayload, RawCall, SignatureError
from declic_gateway.config import load_config
from declic_gateway.http.app import create_app
from declic_gateway.http.running import GATEWAY_KEY, RunningGateway
from declic_gateway.kit.clock import FakeClock
from declic_gateway.kit.sources import Deployment
from declic_gateway.plugins import collect, get_plugin_manager
from declic_gateway.testing import SmtpCatcher, write_deployment
from declic_plugins.standard_webhooks import StandardWebhooks, StandardWebhooksConfig, dotted

# Published vectors, verbatim from the reference libraries' own tests (standard-webhooks/standard-webhooks):
# libraries/python/tests/test_webhooks.py, libraries/javascript/src/webhook.test.ts, libraries/go/webhook_test.go.
VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_BODY = b'{"test": 2432232314}'
VECTOR_SECRET = "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR_TIMESTAMP = "1614265330"
VECTOR_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="  # test_sign_function / "sign function works"
INVALID_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OA="  # test_invalid_signature_raises_error
OTHER_SIGNATURE = "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc="  # the multi-signature tests' decoys
V2_SIGNATURE = "v2,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc="
JS_INVALID_SIGNATURE = "v1,dawfeoifkpqwoekfpqoekf"  # "invalid signature throws error"
VECTOR_TIME = datetime.fromtimestamp(int(VECTOR_TIMESTAMP), UTC)
TOLERANCE = timedelta(minutes=5)

OUR_SECRET = "whsec_" + base64.b64encode(b"declic-test-secret-0123456789ab").decode()
EVENTS = {"user.created": "customer.created", "invoice.paid": "order.paid", "*": "track.{type}"}


def sign(secret: str, msg_id: str, timestamp: str, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def test_our_signing_helper_reproduces_the_published_signature() -> None:
    assert sign("whsec_" + VECTOR_SECRET, VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY) == VECTOR_SIGNATURE


def source(secret: Any = VECTOR_SECRET, at: datetime = VECTOR_TIME, **options: Any) -> StandardWebhooks:
    config = StandardWebhooksConfig.model_validate({"secret": secret, "events": EVENTS, **options})
    return StandardWebhooks("app", config, Deployment("https://hooks.example.com", "UTC", FakeClock(at)))


def vector_headers(**changes: str | None) -> dict[str, str]:
    headers = {"webhook-id": VECTOR_ID, "webhook-timestamp": VECTOR_TIMESTAMP, "webhook-signature": VECTOR_SIGNATURE}
    for name, value in changes.items():
        if value is None:
            del headers[name.replace("_", "-")]
        else:
            headers[name.replace("_", "-")] = value
    return headers


def request(headers: dict[str, str]) -> web.Request:
    return make_mocked_request("POST", "/hooks/app", headers=headers)


@pytest.mark.parametrize("secret", [VECTOR_SECRET, "whsec_" + VECTOR_SECRET, " whsec_" + VECTOR_SECRET + "\n"])
async def test_published_vector_verifies_with_and_without_the_prefix(secret: str) -> None:
    await source(secret).verify(request(vector_headers()), VECTOR_BODY)


@pytest.mark.parametrize("extra", [[], [OTHER_SIGNATURE, V2_SIGNATURE], ["v1a,aGVsbG8=", "garbage", "v1,"]])
async def test_any_matching_signature_in_the_list_passes(extra: list[str]) -> None:
    # test_multi_sig_payload_is_valid: decoys, a v2 entry, the valid one, a decoy again.
    signatures = " ".join([*extra[:1], V2_SIGNATURE, VECTOR_SIGNATURE, *extra[1:], OTHER_SIGNATURE])
    await source().verify(request(vector_headers(webhook_signature=signatures)), VECTOR_BODY)


BAD_HEADERS: list[tuple[str, dict[str, str | None], type[Exception], str]] = [
    ("missing id", {"webhook_id": None}, BadRequest, "missing webhook-id"),
    ("missing timestamp", {"webhook_timestamp": None}, BadRequest, "missing webhook-timestamp"),
    ("missing signature", {"webhook_signature": None}, SignatureError, "missing webhook-signature"),
    ("invalid timestamp", {"webhook_timestamp": "hello"}, BadRequest, "not a unix time"),
    ("fractional timestamp", {"webhook_timestamp": "1614265330.5"}, BadRequest, "not a unix time"),
    ("invalid signature", {"webhook_signature": INVALID_SIGNATURE}, SignatureError, "no v1 signature"),
    ("decoy only", {"webhook_signature": OTHER_SIGNATURE}, SignatureError, "no v1 signature"),
    ("not base64", {"webhook_signature": JS_INVALID_SIGNATURE}, SignatureError, "no v1 signature"),
    ("partial signature", {"webhook_signature": VECTOR_SIGNATURE[:8]}, SignatureError, "no v1 signature"),
    ("empty v1", {"webhook_signature": "v1,"}, SignatureError, "no v1 signature"),
    ("v2 only", {"webhook_signature": "v2," + VECTOR_SIGNATURE[3:]}, SignatureError, "no v1 signature"),
    ("no version", {"webhook_signature": VECTOR_SIGNATURE[3:]}, SignatureError, "no v1 signature"),
    ("other id", {"webhook_id": "msg_other"}, SignatureError, "no v1 signature"),
    ("other timestamp", {"webhook_timestamp": "1614265331"}, SignatureError, "no v1 signature"),
    ("id too long", {"webhook_id": "m" * 256}, BadRequest, "at most 255"),
    ("id with spaces", {"webhook_id": "msg 1"}, BadRequest, "no spaces"),
]


@pytest.mark.parametrize(("case", "changes", "error", "reason"), BAD_HEADERS, ids=[r[0] for r in BAD_HEADERS])
async def test_bad_headers_are_refused(
    case: str, changes: dict[str, str | None], error: type[Exception], reason: str
) -> None:
    with pytest.raises(error, match=reason):
        await source().verify(request(vector_headers(**changes)), VECTOR_BODY)


@pytest.mark.parametrize(
    ("body", "secret"),
    [
        (b'{"test": 2432232315}', VECTOR_SECRET),  # tampered
        (b'{"test":  2432232314}', VECTOR_SECRET),  # one space more: only a check over raw bytes sees it
        (VECTOR_BODY, OUR_SECRET),  # wrong secret
    ],
    ids=["tampered body", "re-serialised body", "wrong secret"],
)
async def test_other_bodies_and_secrets_fail_the_published_signature(body: bytes, secret: str) -> None:
    with pytest.raises(SignatureError, match="check the signing secret"):
        await source(secret).verify(request(vector_headers()), body)


@pytest.mark.parametrize(
    ("offset", "accepted"),
    [
        (-TOLERANCE, True),
        (TOLERANCE, True),
        (-TOLERANCE - timedelta(seconds=1), False),  # test_old_timestamp_fails
        (TOLERANCE + timedelta(seconds=1), False),  # test_new_timestamp_fails
        (timedelta(days=-400), False),
    ],
)
async def test_timestamps_within_five_minutes_either_way_on_our_clock(offset: timedelta, accepted: bool) -> None:
    now = VECTOR_TIME - offset  # the call was signed `offset` away from our clock
    check = source(at=now).verify(request(vector_headers()), VECTOR_BODY)
    if accepted:
        await check
    else:
        with pytest.raises(SignatureError, match=r"too (old|new)"):
            await check


async def test_an_empty_but_signed_body_is_refused() -> None:
    headers = vector_headers(webhook_signature=sign(VECTOR_SECRET, VECTOR_ID, VECTOR_TIMESTAMP, b""))
    with pytest.raises(BadRequest, match="empty body"):
        await source().verify(request(headers), b"")


@pytest.mark.parametrize("signing", [OUR_SECRET, "whsec_" + VECTOR_SECRET])
async def test_every_secret_of_a_rotation_is_accepted(signing: str) -> None:
    headers = vector_headers(webhook_signature=sign(signing, VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY))
    await source([OUR_SECRET, VECTOR_SECRET]).verify(request(headers), VECTOR_BODY)


async def test_svix_header_spelling_and_any_header_case_are_accepted() -> None:
    svix = {k.replace("webhook-", "Svix-"): v for k, v in vector_headers().items()}
    src = source()
    await src.verify(request(svix), VECTOR_BODY)
    assert src.dedupe_key(request(svix), VECTOR_BODY) == VECTOR_ID
    await src.verify(request({k.upper(): v for k, v in vector_headers().items()}), VECTOR_BODY)


def test_dedupe_key_is_the_webhook_id() -> None:
    assert source().dedupe_key(request(vector_headers()), VECTOR_BODY) == VECTOR_ID


CONFIG_ERRORS: list[tuple[dict[str, Any], str]] = [
    ({"secret": "whsec_%%%"}, "not base64 after `whsec_`"),
    ({"secret": "whsec_"}, "empty secret"),
    ({"secret": "whpk_" + VECTOR_SECRET}, "asymmetric"),
    ({"secret": []}, "at least one secret"),
    ({"events": {}}, "map at least one event type"),
    ({"events": {"user.*.x": "customer.created"}}, "exact type, `prefix.\\*` or `\\*`"),
    ({"events": {"user.created": "customer.born"}}, "not a Declic event type"),
    ({"events": {"*": "customer.{type}"}}, "not a Declic event type"),
    ({"events": {"*": "track."}}, "not a Declic event type"),
    ({"events": {"*": "track.a b"}}, "not a Declic event type"),
    ({"type_field": "data..type"}, "not a dotted path"),
    ({"contact": {"email": ["data.email", "data. email"]}}, "not a dotted path"),
    ({"contact": {"mail": "data.email"}}, "Extra inputs"),
    ({"correlation": ".id"}, "not a dotted path"),
]


@pytest.mark.parametrize(("options", "reason"), CONFIG_ERRORS)
def test_config_errors(options: dict[str, Any], reason: str) -> None:
    with pytest.raises(ValidationError, match=reason):
        StandardWebhooksConfig.model_validate({"secret": VECTOR_SECRET, "events": EVENTS, **options})


# --- normalisation: the config maps types, contacts and correlation ------------------------------------

RECEIVED = datetime(2026, 5, 12, 10, 0, tzinfo=UTC)
CONTACT = {
    "email": ["data.email", "data.customer.email", "email"],
    "external_id": ["data.customer.id", "data.id"],
    "timezone": "data.timezone",
    "locale": "data.locale",
    "attributes": {"plan": "data.plan"},
}


def load(name: str) -> bytes:
    return (FIXTURES / "standard_webhooks" / name).read_bytes()


def raw(body: bytes, msg_id: str = "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W") -> RawCall:
    return RawCall(9, "app", RECEIVED, {"Webhook-Id": msg_id, "Content-Type": "application/json"}, body)


def mapped(**options: Any) -> StandardWebhooks:
    return source(contact=CONTACT, correlation=["data.subscription_id", "data.id", "id"], **options)


def test_user_created_becomes_customer_created_with_the_contact() -> None:
    [event] = mapped().normalize(raw(load("user_created.json")))
    assert event.type == "customer.created"
    assert event.occurred_at == datetime(2026, 5, 12, 9, 58, 31, 512345, tzinfo=UTC)
    assert event.contact.model_dump(exclude_defaults=True) == {
        "email": "Ines.Moreau@example.org",
        "phone": "+33611223344",
        "first_name": "Inès",
        "last_name": "Moreau",
        "locale": "fr-FR",
        "timezone": "Europe/Paris",
        "external_ids": {"app": "usr_2N8kqB4xT0"},
        "attributes": {"plan": "pro"},
    }
    assert event.properties == json.loads(load("user_created.json"))["data"]
    assert event.correlation == ["app:usr_2N8kqB4xT0", "sw:msg_2KWPBgLlAfxdpx2AI54pPJ85f4W"]


def test_invoice_paid_keeps_money_exact_and_finds_the_customer_by_an_alternative_path() -> None:
    [event] = mapped().normalize(raw(load("invoice_paid.json")))
    assert (event.type, event.contact.email, event.contact.external_ids) == (
        "order.paid",
        "ines.moreau@example.org",
        {"app": "usr_2N8kqB4xT0"},
    )
    assert event.properties["amount_paid"] == Decimal("49.90")
    assert event.correlation[0] == "app:sub_91F3"


def test_a_squashed_payload_is_its_own_properties() -> None:
    [event] = mapped().normalize(raw(load("contact_created_squashed.json")))
    assert (event.type, event.contact.email) == ("track.contact.created", "lucas.bernard@example.org")
    assert event.properties["fullName"] == "Lucas Bernard"
    assert event.occurred_at == datetime(2026, 5, 12, 7, 57, tzinfo=UTC)
    assert event.correlation == ["app:1f81eb52-5198-4599-803e-771906343485", "sw:msg_2KWPBgLlAfxdpx2AI54pPJ85f4W"]


def typed(kind: str, **data: Any) -> bytes:
    return json.dumps({"type": kind, "data": {"email": "a@example.com", **data}}).encode()


MAPPING: list[tuple[dict[str, str], str, str | None]] = [
    (EVENTS, "user.created", "customer.created"),
    (EVENTS, "subscription.renewed", "track.subscription.renewed"),
    ({"user.created": "customer.created"}, "user.deleted", None),
    ({"invoice.*": "order.paid", "*": "track.{type}"}, "invoice.paid", "order.paid"),
    ({"invoice.*": "order.paid", "invoice.voided.*": "order.cancelled"}, "invoice.voided.manual", "order.cancelled"),
    ({"invoice.*": "order.paid", "invoice.refunded": "track.refund"}, "invoice.refunded", "track.refund"),
    ({"invoice.*": "order.paid"}, "invoices.paid", None),
    ({"user.deleted": "contact.erased"}, "user.deleted", "contact.erased"),
]


@pytest.mark.parametrize(("events", "kind", "expected"), MAPPING)
def test_type_mapping_exact_then_longest_prefix_then_wildcard(
    events: dict[str, str], kind: str, expected: str | None
) -> None:
    result = source(events=events).normalize(raw(typed(kind)))
    assert [e.type for e in result] == ([expected] if expected else [])


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("data.customer.email", "ines.moreau@example.org"),
        ("data.lines.0.description", "Pro plan, monthly"),
        ("data.lines.1.description", None),
        ("data.lines.²", None),
        ("data.currency.code", None),
        ("data.missing.deeper", None),
    ],
)
def test_dotted_paths_walk_objects_and_lists(path: str, expected: str | None) -> None:
    assert dotted(json.loads(load("invoice_paid.json")), path) == expected


def test_the_type_can_live_anywhere_in_the_payload() -> None:
    body = json.dumps({"event": {"name": "user.created"}, "data": {"email": "a@example.com"}}).encode()
    [event] = source(type_field="event.name").normalize(raw(body))
    assert event.type == "customer.created"


def test_no_timestamp_means_the_time_of_arrival_and_a_bad_zone_is_dropped() -> None:
    [event] = mapped().normalize(raw(typed("user.created", timezone="Mars/Olympus_Mons")))
    assert event.occurred_at == RECEIVED
    assert event.contact.timezone is None


MALFORMED: list[tuple[bytes, str]] = [
    (b"not json", "body is not JSON"),
    (b'{"type": "user.created", "data": {"amount": NaN}}', "NaN is not JSON"),
    (b"[1, 2]", "expected a JSON object, got list"),
    (b'{"data": {}}', "no event type"),
    (b'{"type": 42}', "no event type"),
    (b'{"type": "user.created", "data": {"name": "Ada"}}', "'user.created': no e-mail, phone or external id"),
    (b'{"type": "user.created", "data": {"email": "a\\u0000@example.com"}}', "no e-mail"),
    (b'{"type": "user created!", "data": {"email": "a@example.com"}}', "cannot name a track event"),
    (b'{"type": "user.created", "data": {"email": {"address": "a@example.com"}}}', "no e-mail"),
    (b"[" * 100_000, "body is not JSON"),
]


@pytest.mark.parametrize(("body", "reason"), MALFORMED, ids=[m[1] for m in MALFORMED])
def test_malformed_bodies_say_why(body: bytes, reason: str) -> None:
    with pytest.raises(MalformedPayload, match=reason):
        mapped().normalize(raw(body))


# --- end to end: real HTTP, the worker, the database ---------------------------------------------------

NOW = datetime(2026, 5, 12, 10, 0, tzinfo=UTC)


@dataclass
class Running:
    client: TestClient
    gateway: RunningGateway

    async def post(self, body: bytes, msg_id: str, *, at: datetime = NOW, secret: str = OUR_SECRET) -> tuple[int, Any]:
        stamp = str(int(at.timestamp()))
        headers = {
            "webhook-id": msg_id,
            "webhook-timestamp": stamp,
            "webhook-signature": sign(secret, msg_id, stamp, body),
        }
        response = await self.client.post(
            "/hooks/app", data=body, headers={**headers, "Content-Type": "application/json"}
        )
        return response.status, await response.json()

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        with self.gateway.db.engine.connect() as conn:
            return [tuple(row) for row in conn.exec_driver_sql(sql)]


async def start(aiohttp_client: Any, tmp_path: Path, db_url: str, smtp_port: int = 1) -> Running:
    config = f"""\
storage: {{url: '{db_url}'}}
sources:
  app:
    plugin: standard_webhooks
    secret: [{OUR_SECRET}, whsec_{VECTOR_SECRET}]
    events: {{user.created: customer.created, invoice.paid: order.paid, "subscription.*": "track.{{type}}"}}
    contact:
      email: [data.email, data.customer.email]
      external_id: [data.customer.id, data.id]
      attributes: {{plan: data.plan}}
    correlation: [data.subscription_id, data.id]
sinks:
  email: {{plugin: smtp, host: 127.0.0.1, port: {smtp_port}, tls: none, sender: hello@example.com}}
rules:
  - name: welcome
    when: customer.created
    kind: transactional
    send: {{via: email, template: welcome}}
"""
    pm = get_plugin_manager()  # the plugin loads through its entry point, like any installed one
    templates = {"welcome.subject.j2": "Bienvenue", "welcome.txt.j2": "Bonjour {{ contact.first_name }}"}
    settings = load_config(write_deployment(tmp_path, config, templates), collect(pm), pm)
    app = create_app(settings, pm=pm, clock=FakeClock(NOW), role="web")
    client = await aiohttp_client(app)
    return Running(client, app[GATEWAY_KEY])


async def test_end_to_end_signed_calls_become_events_and_one_contact(
    aiohttp_client: Any, tmp_path: Path, db_url: str, smtp: SmtpCatcher
) -> None:
    d = await start(aiohttp_client, tmp_path, db_url, smtp.port)
    assert (await d.post(load("user_created.json"), "msg_1"))[1]["status"] == "accepted"
    assert (await d.post(load("user_created.json"), "msg_1"))[1]["status"] == "duplicate"
    assert (await d.post(load("invoice_paid.json"), "msg_2"))[1]["status"] == "accepted"
    assert (await d.post(typed("user.deleted"), "msg_3"))[1]["status"] == "accepted"  # unmapped: kept, no event
    assert await d.post(load("invoice_paid.json"), "msg_4", at=NOW - timedelta(minutes=6)) == (
        401,
        {"error": "webhook-timestamp is too old (360s away; check the clocks)"},
    )
    assert (await d.post(load("invoice_paid.json"), "msg_5", secret="whsec_" + VECTOR_SECRET))[0] == 200
    tampered = await d.client.post(
        "/hooks/app",
        data=load("invoice_paid.json").replace(b"49.90", b"0.01"),
        headers={"webhook-id": "msg_6", "webhook-timestamp": str(int(NOW.timestamp())), "webhook-signature": "v1,AAAA"},
    )
    assert tampered.status == 401
    await d.gateway.worker.drain()
    assert d.rows("SELECT type, correlation FROM events ORDER BY id") == [
        ("customer.created", '["app:usr_2N8kqB4xT0","sw:msg_1"]'),
        ("order.paid", '["app:sub_91F3","sw:msg_2"]'),
        ("order.paid", '["app:sub_91F3","sw:msg_5"]'),
    ]
    assert d.rows("SELECT email, first_name, attributes FROM contacts") == [
        ("ines.moreau@example.org", "Inès", '{"plan":"pro"}')
    ]
    assert d.rows("SELECT kind, value FROM identities WHERE kind IN ('app', 'email', 'phone') ORDER BY kind") == [
        ("app", "usr_2N8kqB4xT0"),
        ("email", "ines.moreau@example.org"),
        ("phone", "+33611223344"),
    ]
    assert d.rows("SELECT status FROM inbox ORDER BY id") == [("processed",)] * 4
    assert [m["To"] for m in smtp.messages] == ["ines.moreau@example.org"]


# --- property: random calls never cause a 5xx; signed random bodies never crash normalisation -----------

_NAMES = st.one_of(
    st.sampled_from(["webhook-id", "webhook-timestamp", "webhook-signature", "svix-id", "svix-signature"]),
    st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,15}", fullmatch=True),
).filter(lambda n: n.lower() not in {"content-length", "transfer-encoding", "host", "connection", "expect"})
_VALUES = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60),
    st.sampled_from([VECTOR_ID, VECTOR_TIMESTAMP, str(int(NOW.timestamp())), VECTOR_SIGNATURE, OTHER_SIGNATURE]),
)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_PAYLOADS = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["user.created", "invoice.paid", "subscription.x", "a b", ""]) | _JSON,
        "timestamp": st.text(max_size=30) | _JSON,
        "data": st.fixed_dictionaries(
            {}, optional={"email": _JSON | st.emails(), "id": _JSON, "customer": _JSON, "plan": _JSON}
        )
        | _JSON,
    },
).map(lambda payload: json.dumps(payload).encode())


@pytest.fixture
async def fuzzed(aiohttp_client: Any, tmp_path: Path) -> Running:
    return await start(aiohttp_client, tmp_path, f"sqlite:///{tmp_path}/fuzz.db")


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(headers=st.dictionaries(_NAMES, _VALUES, max_size=5), body=st.binary(max_size=300) | _PAYLOADS)
async def test_random_calls_never_cause_a_server_error(fuzzed: Running, headers: dict[str, str], body: bytes) -> None:
    response = await fuzzed.client.post("/hooks/app", data=body, headers=headers)
    assert 200 <= response.status < 500


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(min_size=1, max_size=200) | _PAYLOADS)
async def test_signed_random_bodies_end_processed_or_failed_with_a_reason(fuzzed: Running, body: bytes) -> None:
    status, _ = await fuzzed.post(body, f"msg_{uuid.uuid4().hex}")
    assert status == 200
    await fuzzed.gateway.worker.drain()
    assert fuzzed.rows("SELECT count(*) FROM inbox WHERE status = 'received'") == [(0,)]
    assert fuzzed.rows("SELECT error FROM inbox WHERE error LIKE '%crashed%'") == []


def test_the_documented_config_is_valid(tmp_path: Path) -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "connect" / "standard_webhooks.md").read_text()
    [block] = re.findall(r"```yaml\n(.*?)```", doc, re.S)
    pm = get_plugin_manager()
    settings = load_config(write_deployment(tmp_path, block), collect(pm), pm, env={"APP_WEBHOOK_SECRET": OUR_SECRET})
    cls, config = settings.source_plugins["app"]
    documented = cls("app", config, Deployment(None, "UTC", FakeClock(RECEIVED)))
    [event] = documented.normalize(raw(load("invoice_paid.json")))
    assert (event.type, event.contact.external_ids, event.correlation[0]) == (
        "order.paid",
        {"app": "usr_2N8kqB4xT0"},
        "app:sub_91F3",
    )
