"""Twilio status callbacks and replies: X-Twilio-Signature (form and JSON), STOP/START, delivery feedback."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qsl, urlencode

import hypothesis
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, make_mocked_request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import FIXTURES, SHARED_PAYLOADS
from declic_gateway import (
    BadRequest,
    ConfigError,
    DeliveryResult,
    MalformedPayload,
    Message,
    PluginConfig,
    RawCall,
    SendContext,
    SignatureError,
    Sink,
    hookimpl,
)
from declic_gateway.config import load_config
from declic_gateway.http.app import create_app
from declic_gateway.http.running import GATEWAY_KEY
from declic_gateway.kit.sources import Deployment
from declic_gateway.plugins import collect, get_plugin_manager
from declic_gateway.testing import FakeClock, write_deployment
from declic_plugins.twilio_status import TwilioStatus, TwilioStatusConfig, signatures, url_variants

# Published vectors, copied verbatim from Twilio's SDK test suites:
# twilio/twilio-python tests/unit/test_request_validator.py and twilio/twilio-node spec/validation.spec.js.
TOKEN = "12345"
PARAMS = {
    "CallSid": "CA1234567890ABCDE",
    "Digits": "1234",
    "From": "+14158675309",
    "To": "+18005551212",
    "Caller": "+14158675309",
}
FORM = urlencode(PARAMS).encode()
JSON_BODY = b'{"property": "value", "boolean": true}'
BODY_HASH = "0a1ff7634d9ab3b95db5c9a2dfe9416e41502b283a80c7cf19632632f96e6620"
EMPTY_HASH = "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
PATH = "/myapp.php?foo=1&bar=2"
SIG = "RSOYDt4T1cUTdK1PDd93/VVr8B8="  # the form vector's signature

# (case, public_url, request path, raw body, X-Twilio-Signature)
PUBLISHED: list[tuple[str, str, str, bytes, str]] = [
    ("form", "https://mycompany.com", PATH, FORM, SIG),
    ("https port is removed", "https://mycompany.com:1234", PATH, FORM, SIG),
    ("http port is kept", "http://mycompany.com:1234", PATH, FORM, "Zmvh+3yNM1Phv2jhDCwEM3q5ebU="),
    ("https :443 is added", "https://mycompany.com", PATH, FORM, "kvajT1Ptam85bY51eRf/AJRuM3w="),
    ("http :80 is added", "http://mycompany.com", PATH, FORM, "0ZXoZLH/DfblKGATFgpif+LLRf4="),
    ("credentials", "https://user:pass@mycompany.com", PATH, FORM, "CukzLTc1tT5dXEDIHm/tKBanW10="),
    ("username only", "https://user@mycompany.com", PATH, FORM, "2YRLlVAflCqxaNicjMpJcSTgzSs="),
    ("credentials, :443 added", "https://user:pass@mycompany.com", PATH, FORM, "ZQFR1PTIZXF2MXB8ZnKCvnnA+rI="),
    ("special characters", "https://mycompany.com", PATH + "&Body=It's+amazing", FORM, "dsq4Ehbj6cs+KdTkpF5sSSplOWw="),
    (
        "repeated name",
        "https://mycompany.com",
        PATH,
        b"MessagingBinding.Address=%2B1325xxxxxxx&MessagingBinding.Address=%2B1415xxxxxxx",
        "83O6e2vORAoJHUNzJjDWN1jz+BA=",
    ),
    (
        "repeated name, values in another order",
        "https://mycompany.com",
        PATH,
        b"MessagingBinding.Address=%2B1415xxxxxxx&MessagingBinding.Address=%2B1325xxxxxxx",
        "83O6e2vORAoJHUNzJjDWN1jz+BA=",
    ),
    (
        "duplicate values count once",
        "https://mycompany.com",
        PATH,
        b"Sid=CA123&SidAccount=AC123&Digits=5678&Digits=1234&Digits=1234",
        "IK+Dwps556ElfBT0I3Rgjkr1wJU=",
    ),
    ("json body", "https://mycompany.com", f"{PATH}&bodySHA256={BODY_HASH}", JSON_BODY, "a9nBmqA0ju/hNViExpshrM61xv4="),
    (
        "json empty object",
        "https://mycompany.com",
        f"{PATH}&bodySHA256={EMPTY_HASH}",
        b"{}",
        "Ldidvp12m26NI7eqEvxnEpkd9Hc=",
    ),
    (
        "json, hash the only query parameter",
        "https://mycompany.com",
        f"/myapp.php?bodySHA256={BODY_HASH}",
        JSON_BODY,
        "y77kIzt2vzLz71DgmJGsen2scGs=",
    ),
]


def source(token: str = TOKEN, public_url: str | None = "https://mycompany.com", previous: str | None = None) -> Any:
    config = TwilioStatusConfig.model_validate({"auth_token": token, "previous_auth_token": previous})
    return TwilioStatus("sms", config, Deployment(public_url, "UTC", FakeClock()))


def request(path: str = PATH, signature: str | None = None) -> web.Request:
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if signature is not None:
        headers["X-Twilio-Signature"] = signature
    return make_mocked_request("POST", path, headers=headers)


@pytest.mark.parametrize(("case", "public_url", "path", "body", "signature"), PUBLISHED, ids=[p[0] for p in PUBLISHED])
async def test_published_vectors_verify(case: str, public_url: str, path: str, body: bytes, signature: str) -> None:
    await source(public_url=public_url).verify(request(path, signature), body)


def test_url_variants_follow_the_sdks() -> None:
    assert url_variants("https://a.example/p?q=1") == ["https://a.example/p?q=1", "https://a.example:443/p?q=1"]
    assert url_variants("http://u:p@a.example:8080/p") == ["http://u:p@a.example/p", "http://u:p@a.example:8080/p"]
    assert url_variants("https://[::1]/p") == ["https://[::1]/p", "https://[::1]:443/p"]


def test_signature_is_base64_hmac_sha1() -> None:
    expected = base64.b64encode(hmac.new(b"k", b"https://x/yA1", hashlib.sha1).digest())
    assert signatures("k", "https://x/y", [("A", "1")])[0] == expected


# Published negative cases (same files), then our own.
WRONG_HASH = f"{PATH}&bodySHA256={BODY_HASH[:-1]}"
REJECTIONS: list[tuple[str, str, bytes, str | None, type[Exception], str]] = [
    ("wrong signature", PATH, FORM, "WRONG_SIGNATURE", SignatureError, "does not match"),
    ("signature undefined", PATH, FORM, None, SignatureError, "missing X-Twilio-Signature"),
    ("json body, no bodySHA256 param", PATH, JSON_BODY, SIG, SignatureError, "not match"),
    ("json body, wrong hash", WRONG_HASH, JSON_BODY, "a9nBmqA0ju/hNViExpshrM61xv4=", SignatureError, "bodySHA256"),
    ("unexpected query param", PATH + "&somethingUnexpected=true", FORM, SIG, SignatureError, "not match"),
    ("tampered body", PATH, FORM.replace(b"1234", b"9999"), SIG, SignatureError, "not match"),
    ("empty signature", PATH, FORM, "", SignatureError, "missing X-Twilio-Signature"),
    ("not utf-8", PATH, b"Body=%FF%FE", SIG, BadRequest, "not UTF-8"),
    ("non-ascii signature", PATH, FORM, "RSOYDt4T1cUTdK1PDd93/VVr8B8é", SignatureError, "does not match"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "path", "body", "signature", "error", "reason"), REJECTIONS, ids=[r[0] for r in REJECTIONS]
)
async def test_rejections(
    case: str, path: str, body: bytes, signature: str | None, error: type[Exception], reason: str
) -> None:
    with pytest.raises(error, match=reason):
        await source().verify(request(path, signature), body)


async def test_wrong_token_is_refused() -> None:
    with pytest.raises(SignatureError):
        await source("54321").verify(request(PATH, SIG), FORM)


@pytest.mark.parametrize("public_url", ["https://mycompany.com/", "https://mycompany.com:443"])
async def test_public_url_spelling_does_not_matter(public_url: str) -> None:
    await source(public_url=public_url).verify(request(PATH, SIG), FORM)


async def test_previous_token_accepted_during_rotation() -> None:
    await source("new-token", previous=TOKEN).verify(request(PATH, SIG), FORM)


async def test_without_public_url_nothing_verifies_and_start_names_the_fix() -> None:
    with pytest.raises(SignatureError, match="public_url"):
        await source(public_url=None).verify(request(PATH, SIG), FORM)
    with pytest.raises(ConfigError, match="needs `public_url`"):
        await source(public_url=None).start()


def load(name: str) -> bytes:
    return (FIXTURES / "twilio" / name).read_bytes()


SID = "SM5c1a7e0b9d2f4e6a8c0b1d3f5e7a9c2b"


@pytest.mark.parametrize(
    ("fixture", "key"),
    [
        ("status_delivered.form", f"{SID}:delivered:{SID}"),
        ("status_undelivered.form", f"{SID}:undelivered:{SID}"),
        ("inbound_stop.form", "SM8e2b4d6f0a1c3e5b7d9f1a3c5e7b9d0f:received:SM8e2b4d6f0a1c3e5b7d9f1a3c5e7b9d0f"),
    ],
)
def test_dedupe_key_is_the_message_and_the_state_it_reports(fixture: str, key: str) -> None:
    assert source().dedupe_key(request(), load(fixture)) == key


def test_dedupe_key_without_a_message_sid_is_the_body_hash() -> None:
    assert source().dedupe_key(request(), FORM) == "sha256:" + hashlib.sha256(FORM).hexdigest()
    long_sid = b"MessageSid=" + b"S" * 400
    assert source().dedupe_key(request(), long_sid).startswith("sha256:")


def raw(body: bytes) -> RawCall:
    return RawCall(3, "sms", datetime(2026, 5, 4, 9, 30, tzinfo=UTC), {}, body)


NORMALIZE: list[tuple[str, dict[str, Any]]] = [
    (
        "status_delivered.form",
        {"type": "sms.delivered", "phone": "+33612345678", "consent": {}, "provider_message_id": SID},
    ),
    (
        "status_undelivered.form",
        {"type": "sms.failed", "error_code": "30003", "consent": {}, "provider_message_id": SID},
    ),
    (
        "status_failed_unsubscribed.form",
        {"type": "sms.failed", "error_code": "21610", "consent": {"sms": "withdrawn"}, "phone": "+33612345678"},
    ),
    ("inbound_stop.form", {"type": "sms.opted_out", "keyword": "STOP", "consent": {"sms": "withdrawn"}}),
    ("inbound_stop_no_advanced_opt_out.form", {"type": "sms.opted_out", "keyword": "UNSUBSCRIBE"}),
    ("inbound_start.form", {"type": "sms.opted_in", "keyword": "START", "consent": {"sms": "granted"}}),
    ("inbound_help.form", {"type": "sms.received", "keyword": "HELP", "consent": {}}),
    (
        "inbound_reply.form",
        {"type": "sms.received", "keyword": None, "consent": {}, "body": "Stop sending me the promo, but"},
    ),
    (
        "inbound_whatsapp_stop.form",
        {"type": "sms.opted_out", "phone": "+33612345678", "channel": "whatsapp", "consent": {"whatsapp": "withdrawn"}},
    ),
]


@pytest.mark.parametrize(("fixture", "expected"), NORMALIZE, ids=[n[0] for n in NORMALIZE])
def test_callbacks_and_replies_become_events(fixture: str, expected: dict[str, Any]) -> None:
    [event] = source().normalize(raw(load(fixture)))
    seen = {
        "type": event.type,
        "phone": event.contact.phone,
        "consent": {channel: s.state for channel, s in event.contact.consent.items()},
        "provider_message_id": event.properties.get("provider_message_id"),
        "error_code": event.properties.get("error_code"),
        "keyword": event.properties.get("keyword"),
        "channel": event.properties.get("channel"),
        "body": (event.properties.get("body") or "")[:30],
    }
    assert {k: seen[k] for k in expected} == expected
    assert event.correlation[0].startswith("sms:SM") and event.occurred_at == raw(b"").received_at


def test_intermediate_states_and_voice_callbacks_give_no_event() -> None:
    assert source().normalize(raw(load("status_sent.form"))) == []
    assert source().normalize(raw(FORM)) == []


def test_json_variant_is_read_like_a_form() -> None:
    body = json.dumps({"MessageSid": SID, "MessageStatus": "delivered", "To": "+33612345678"}).encode()
    [event] = source().normalize(raw(body))
    assert (event.type, event.properties["provider_message_id"]) == ("sms.delivered", SID)


def test_an_address_that_is_not_a_phone_number_is_twilio_s_own_id() -> None:
    body = urlencode({"MessageSid": "SM1", "Body": "hi", "From": "messenger:123456"}).encode()
    [event] = source().normalize(raw(body))
    assert (event.contact.phone, event.contact.external_ids) == (None, {"twilio": "messenger:123456"})


@pytest.mark.parametrize(
    ("body", "reason"), [(b"[1, 2]", "expected a JSON object"), (b"{not json", "not JSON"), (b"Body=%FF", "UTF-8")]
)
def test_malformed_bodies_say_why(body: bytes, reason: str) -> None:
    with pytest.raises(MalformedPayload, match=reason):
        source().normalize(raw(body))


SHARED = SHARED_PAYLOADS / "twilio"


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared sample payloads for Twilio not present")
def test_shared_samples_normalise_without_error() -> None:
    for path in sorted(SHARED.iterdir()):
        source().normalize(raw(path.read_bytes()))


# --- End to end: real HTTP, the real worker, the database (SQLite and PostgreSQL) -------------

PUBLIC_URL = "https://hooks.example.com"
AUTH_TOKEN = "twilio-auth-token"


class FakeSmsConfig(PluginConfig):
    pass


class FakeSms(Sink):
    """Test-only SMS sink: 'sends' and answers with a Twilio-like message SID."""

    name = "fake_sms"
    channel = "sms"
    Config = FakeSmsConfig
    sent: ClassVar[list[str]] = []

    def address(self, contact: dict[str, Any]) -> str | None:
        return contact.get("phone")

    async def send(self, message: Message, ctx: SendContext) -> DeliveryResult:
        self.sent.append(message.to)
        return DeliveryResult.sent(SID)


class Plugin:
    @hookimpl
    def register_sinks(self, register: Callable[[type[Sink]], None]) -> None:
        register(FakeSms)


def twilio_post(client: TestClient, body: bytes, token: str = AUTH_TOKEN) -> Any:
    path = "/hooks/sms"
    [signature, _] = signatures(token, PUBLIC_URL + path, parse_qsl(body.decode(), keep_blank_values=True))
    headers = {"X-Twilio-Signature": signature.decode(), "Content-Type": "application/x-www-form-urlencoded"}
    return client.post(path, data=body, headers=headers)


async def start(aiohttp_client: Any, tmp_path: Path, db_url: str) -> tuple[TestClient, Any]:
    pm = get_plugin_manager(extra=[Plugin()])
    config = f"""\
public_url: {PUBLIC_URL}
storage: {{url: '{db_url}'}}
sources:
  sms: {{plugin: twilio_status, auth_token: {AUTH_TOKEN}}}
sinks:
  text: {{plugin: fake_sms}}
policies:
  consent: {{sms: required}}
rules:
  - name: welcome-back
    when: sms.opted_in
    send: {{via: text, template: welcome}}
"""
    path = write_deployment(tmp_path, config, {"welcome.txt.j2": "Welcome back"})
    settings = load_config(path, collect(pm), pm)
    app = create_app(settings, pm=pm, clock=FakeClock(datetime(2026, 5, 4, 9, tzinfo=UTC)), role="web")
    return await aiohttp_client(app), app[GATEWAY_KEY]


async def test_replies_and_callbacks_end_to_end(aiohttp_client: Any, tmp_path: Path, db_url: str) -> None:
    client, gateway = await start(aiohttp_client, tmp_path, db_url)
    FakeSms.sent.clear()

    def rows(sql: str) -> list[Any]:
        with gateway.db.engine.connect() as conn:
            return [tuple(r) for r in conn.exec_driver_sql(sql)]

    response = await twilio_post(client, load("inbound_start.form"))
    assert (response.status, response.content_type) == (200, "text/xml")  # TwiML: no reply, no warning
    assert (await response.text()).endswith("<Response/>")
    await gateway.worker.drain()
    assert FakeSms.sent == ["+33612345678"]
    assert rows("SELECT provider_id FROM deliveries") == [(SID,)]

    delivered = load("status_delivered.form")
    assert (await twilio_post(client, delivered)).status == 200
    again = await twilio_post(client, delivered)
    assert again.status == 200  # a redelivery: acknowledged, and (below) stored once
    await gateway.worker.drain()
    assert rows("SELECT feedback FROM deliveries") == [("delivered",)]

    forged = await twilio_post(client, load("inbound_stop.form"), token="not-the-token")
    assert forged.status == 401
    assert (await twilio_post(client, load("inbound_stop.form"))).status == 200
    await gateway.worker.drain()

    assert rows("SELECT type FROM events ORDER BY id") == [("sms.opted_in",), ("sms.delivered",), ("sms.opted_out",)]
    [(phone, consent)] = rows("SELECT phone, consent FROM contacts")
    assert phone == "+33612345678" and json.loads(consent)["sms"]["state"] == "withdrawn"
    assert rows("SELECT count(*) FROM inbox") == [(3,)]
    assert rows("SELECT channel, state, source FROM consents ORDER BY id") == [
        ("sms", "granted", "sms"),
        ("sms", "withdrawn", "sms"),
    ]


# --- Property: whatever arrives, the answer is 2xx or 4xx ---------------------------------------


@pytest.fixture
async def http(aiohttp_client: Any, tmp_path: Path) -> TestClient:
    client, _ = await start(aiohttp_client, tmp_path, f"sqlite:///{tmp_path}/h.db")
    return client


header_text = st.text(st.characters(min_codepoint=32, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=60)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.one_of(
        st.binary(max_size=300),
        st.dictionaries(st.sampled_from(["MessageSid", "MessageStatus", "Body", "From", "To", "OptOutType"]),
                        st.text(max_size=40)).map(lambda d: urlencode(d).encode()),
    ),
    signature=header_text,
    sign_it=st.booleans(),
    query=st.sampled_from(["", "", "", "?bodySHA256=00", "?a=%FF", "?bodySHA256="]),
)  # fmt: skip
async def test_any_request_gets_2xx_or_4xx(
    http: TestClient, body: bytes, signature: str, sign_it: bool, query: str
) -> None:
    if sign_it:
        try:
            params = parse_qsl(body.decode(), keep_blank_values=True)
        except UnicodeDecodeError:
            params = []
        signature = signatures(AUTH_TOKEN, f"{PUBLIC_URL}/hooks/sms{query}", params)[0].decode()
    response = await http.post(f"/hooks/sms{query}", data=body, headers={"X-Twilio-Signature": signature})
    hypothesis.event(f"status {response.status}")  # see --hypothesis-show-statistics
    assert 200 <= response.status < 500, await response.text()


@settings(max_examples=200, deadline=None)
@given(
    fields=st.dictionaries(
        st.sampled_from(
            ["MessageSid", "SmsSid", "MessageStatus", "Body", "From", "To", "OptOutType", "ErrorCode", "NumMedia"]
        ),
        st.text(max_size=30) | st.sampled_from(["delivered", "failed", "STOP", "START", "21610", "whatsapp:+3361"]),
    )
)
def test_any_form_normalises_to_known_events(fields: dict[str, str]) -> None:
    for event in source().normalize(raw(urlencode(fields).encode())):
        assert event.type in {"sms.delivered", "sms.failed", "sms.opted_out", "sms.opted_in", "sms.received"}
        assert {s.state for s in event.contact.consent.values()} <= {"granted", "withdrawn"}
