"""Mandrill source: X-Mandrill-Signature over URL + sorted form fields, batches -> feedback events."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, make_mocked_request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import FIXTURES, SHARED_PAYLOADS
from declic_gateway import BadRequest, MalformedPayload, RawCall, SignatureError
from declic_gateway.config import load_config
from declic_gateway.http.app import create_app
from declic_gateway.http.running import GATEWAY_KEY, RunningGateway
from declic_gateway.kit.sources import Deployment
from declic_gateway.plugins import collect, get_plugin_manager
from declic_gateway.testing import FakeClock, SmtpCatcher, write_deployment
from declic_plugins.mandrill import Mandrill, MandrillConfig

PUBLIC_URL = "https://hooks.example.com"
KEY = "mandrill-webhook-key-0123456789"
URL = PUBLIC_URL + "/hooks/mail"
CLOCK = FakeClock(datetime(2026, 3, 14, 12, 0, tzinfo=UTC))
SHARED = SHARED_PAYLOADS / "mandrill"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="shared sample payloads not present")


def source(key: str = KEY, public_url: str | None = PUBLIC_URL) -> Mandrill:
    return Mandrill("mail", MandrillConfig.model_validate({"webhook_key": key}), Deployment(public_url, "UTC", CLOCK))


def signature(key: str, url: str, fields: dict[str, str]) -> str:
    """Mandrill's algorithm, written out again: HMAC-SHA1 over the URL then each sorted name + value."""
    text = url + "".join(f"{name}{fields[name]}" for name in sorted(fields))
    return base64.b64encode(hmac.new(key.encode(), text.encode("utf-8"), hashlib.sha1).digest()).decode()


def form(events: str, **more: str) -> tuple[bytes, dict[str, str]]:
    fields = {"mandrill_events": events, **more}
    return urlencode(fields).encode(), fields


def request(path: str = "/hooks/mail", sig: str | None = None) -> web.Request:
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if sig is not None:
        headers["X-Mandrill-Signature"] = sig
    return make_mocked_request("POST", path, headers=headers)


def raw(body: bytes) -> RawCall:
    return RawCall(3, "mail", CLOCK.now(), {}, body)


BATCH = (FIXTURES / "mandrill" / "batch.json").read_text()
ITEMS: list[dict[str, Any]] = json.loads(BATCH)
BODY, FIELDS = form(BATCH)
GOOD = signature(KEY, URL, FIELDS)


# Published vectors: (where, shared sample file, webhook key, path under http://requestb.in, X-Mandrill-Signature).
# feinoujc/Mandrill.net tests/SerializationTests.cs `Can_verify_webhook_signature` (URL http://requestb.in/wvhpa9wv,
# body = tests/TestData.cs `sample_webhook`); evendis/mandrill-rails spec/mandrill/web_hook/processor_spec.rb with
# spec/fixtures/webhook_examples/click_with_signature.json (URL http://requestb.in/q9a918q9). Mandrill's own test
# button signed both. The bodies are read from the shared samples, never copied here.
PUBLISHED = [
    ("Mandrill.net", "mandrill_events_send_bounce_open.raw.json", "f7YEknp5hLvZVw6BNSaM6g", "/wvhpa9wv",
     "NnvRYvKo0gA99/YGgRSb2JS4c/Y="),
    ("mandrill-rails", "mandrill_events_click_x2.raw.json", "ntynTMaFpM_octE5R1DKAw", "/q9a918q9",
     "7rUa4lNJitlb178MgGOcHO6T4Bg="),
]  # fmt: skip


def published(name: str) -> bytes:
    return form((SHARED / name).read_text(encoding="utf-8"))[0]


@needs_shared
@pytest.mark.parametrize(("where", "name", "key", "path", "sig"), PUBLISHED, ids=[p[0] for p in PUBLISHED])
async def test_published_vectors_verify_years_later(where: str, name: str, key: str, path: str, sig: str) -> None:
    body = published(name)
    # Signed in 2013-2015 and checked under a 2026 clock: Mandrill signs no timestamp, so there is no window.
    await source(key, "http://requestb.in").verify(request(path, sig), body)


@needs_shared
@pytest.mark.parametrize(
    ("case", "key", "path", "public_url"),
    [
        ("a query string added (Mandrill.net's own negative case)", "f7YEknp5hLvZVw6BNSaM6g", "/wvhpa9wv?oof=1",
         "http://requestb.in"),
        ("another key", "ntynTMaFpM_octE5R1DKAw", "/wvhpa9wv", "http://requestb.in"),
        ("https instead of http", "f7YEknp5hLvZVw6BNSaM6g", "/wvhpa9wv", "https://requestb.in"),
    ],
)  # fmt: skip
async def test_published_vector_fails_when_anything_differs(case: str, key: str, path: str, public_url: str) -> None:
    body = published(PUBLISHED[0][1])
    with pytest.raises(SignatureError, match="does not match"):
        await source(key, public_url).verify(request(path, PUBLISHED[0][4]), body)


@needs_shared
def test_published_batches_normalise() -> None:
    body = published("mandrill_events_send_bounce_open.raw.json")
    events = source().normalize(raw(body))
    assert [(e.type, e.properties.get("bounce")) for e in events] == [("email.bounced", "hard"), ("email.opened", None)]
    assert events[0].properties["provider_message_id"] == "exampleaaaaaaaaaaaaaaaaaaaaaaaaa1"
    assert events[0].properties["description"] == "bad_mailbox"
    body = published("mandrill_events_click_x2.raw.json")
    [click] = source().normalize(raw(body))  # the test button sends one click twice: one event
    assert click.properties["url"] == "http://mandrill.com"
    assert click.correlation == ["mandrill:exampleaaaaaaaaaaaaaaaaaaaaaaaaa:click:1379233940:http://mandrill.com"]


@needs_shared
@pytest.mark.parametrize(
    ("name", "kind", "message_id"),
    [
        ("mandrill_rails_open.json", "email.opened", "12847763.9a32184309ad4d5e9bfd20368d9d7981"),
        ("mandrill_rails_click.json", "email.clicked", "8606637.6692f6cac28e45a9b371e182d5ca0a35"),
    ],
)
def test_older_payloads_without_a_top_level_id_use_msg_id(name: str, kind: str, message_id: str) -> None:
    [event] = source().normalize(raw(form((SHARED / name).read_text())[0]))
    assert (event.type, event.properties["provider_message_id"], event.contact.email) == (
        kind,
        message_id,
        "to@example.com",
    )


@needs_shared
def test_a_send_alone_produces_nothing() -> None:
    assert source().normalize(raw(form((SHARED / "mandrill_rails_send.json").read_text())[0])) == []


def test_signing_is_over_the_decoded_value_with_its_escapes() -> None:
    body, fields = form('[{"url":"http:\\/\\/x.example\\/\\u00e9 a+b"}]', other="é")
    assert b"%5C%2F" in body  # the JSON's \/ travel percent-encoded; the signature covers them decoded
    text = URL + "mandrill_events" + fields["mandrill_events"] + "otheré"
    expected = base64.b64encode(hmac.new(KEY.encode(), text.encode(), hashlib.sha1).digest()).decode()
    assert expected == signature(KEY, URL, fields)


async def test_own_batch_verifies() -> None:
    await source().verify(request(sig=GOOD), BODY)


async def test_trailing_slash_in_public_url_and_whitespace_in_header_are_tolerated() -> None:
    await source(public_url=PUBLIC_URL + "/").verify(request(sig=GOOD + "\n"), BODY)


async def test_the_test_key_is_accepted_for_an_empty_batch_only() -> None:
    # When the HEAD check fails Mandrill POSTs `[]` signed with the public key "test-webhook".
    empty, fields = form("[]")
    await source().verify(request(sig=signature("test-webhook", URL, fields)), empty)
    with pytest.raises(SignatureError, match="does not match"):
        await source().verify(request(sig=signature("test-webhook", URL, FIELDS)), BODY)


TAMPERED = BODY.replace(b"hard_bounce", b"soft_bounce")
NOT_UTF8 = b"mandrill_events=%FF%FE"
TWICE = BODY + b"&mandrill_events=%5B%5D"
OTHER_FIELD = urlencode({"events": "[]"}).encode()

REJECTIONS: list[tuple[str, web.Request, bytes, str | None, type[Exception], str]] = [
    ("missing signature", request(), BODY, PUBLIC_URL, SignatureError, "missing X-Mandrill-Signature"),
    ("empty signature", request(sig=" "), BODY, PUBLIC_URL, SignatureError, "missing X-Mandrill-Signature"),
    ("wrong key", request(sig=signature("other", URL, FIELDS)), BODY, PUBLIC_URL, SignatureError, "does not match"),
    ("tampered body", request(sig=GOOD), TAMPERED, PUBLIC_URL, SignatureError, "does not match"),
    ("another path", request("/hooks/other", GOOD), BODY, PUBLIC_URL, SignatureError, "hooks.example.com/hooks/other"),
    ("public_url unset", request(sig=GOOD), BODY, None, SignatureError, "public_url is not set"),
    (
        "hex instead of base64",
        request(sig=hmac.new(KEY.encode(), (URL + "mandrill_events" + BATCH).encode(), hashlib.sha1).hexdigest()),
        BODY,
        PUBLIC_URL,
        SignatureError,
        "does not match",
    ),
    ("not UTF-8", request(sig=GOOD), NOT_UTF8, PUBLIC_URL, BadRequest, "not a form-encoded body"),
    ("a field twice", request(sig=GOOD), TWICE, PUBLIC_URL, BadRequest, "appears twice"),
    (
        "no mandrill_events",
        request(sig=signature(KEY, URL, {"events": "[]"})),
        OTHER_FIELD,
        PUBLIC_URL,
        BadRequest,
        "no mandrill_events field",
    ),
]


@pytest.mark.parametrize(
    ("case", "req", "body", "public_url", "error", "reason"), REJECTIONS, ids=[r[0] for r in REJECTIONS]
)
async def test_rejections(
    case: str, req: web.Request, body: bytes, public_url: str | None, error: type[Exception], reason: str
) -> None:
    with pytest.raises(error, match=reason):
        await source(public_url=public_url).verify(req, body)


def test_dedupe_key_ignores_batch_order_and_sees_new_items() -> None:
    src, req = source(), request()
    key = src.dedupe_key(req, BODY)
    assert key.startswith("mandrill:")
    assert src.dedupe_key(req, form(json.dumps(ITEMS[::-1]))[0]) == key
    assert src.dedupe_key(req, form(json.dumps(ITEMS[:-1]))[0]) != key


def test_a_batch_that_is_not_json_is_kept_under_its_body_hash_then_fails() -> None:
    body = form("[not json")[0]
    assert source().dedupe_key(request(), body) == "sha256:" + hashlib.sha256(body).hexdigest()
    with pytest.raises(MalformedPayload, match="mandrill_events is not JSON"):
        source().normalize(raw(body))


EXPECTED = [
    ("email.opened", "camille.durand@example.org", {}, {"mobile": True, "country": "FR", "ip": "203.0.113.7"}),
    (
        "email.clicked",
        "camille.durand@example.org",
        {},
        {"url": "https://boutique.example.com/collections/printemps?utm_source=mandrill&utm_medium=email"},
    ),
    ("email.bounced", "noah.martin@example.org", {}, {"bounce": "hard", "description": "bad_mailbox"}),
    ("email.bounced", "lea.bernard@example.org", {}, {"bounce": "soft", "bgtools_code": 22}),
    ("email.complained", "jules.roux@example.org", {"email": "withdrawn"}, {}),
    ("email.unsubscribed", "ines.moreau@example.org", {"email": "withdrawn"}, {"subaccount": "boutique-fr"}),
]


def test_batch_becomes_feedback_events_and_skips_send_deferral_reject_and_sync() -> None:
    events = source().normalize(raw(BODY))
    seen = [
        (
            e.type,
            e.contact.email,
            {c: s.state for c, s in e.contact.consent.items()},
            {k: e.properties[k] for k in props},
        )
        for e, (_, _, _, props) in zip(events, EXPECTED, strict=True)
    ]
    assert seen == EXPECTED
    for event in events:
        item = next(i for i in ITEMS if "_id" in i and f"{i['_id']}:{i['event']}:{i['ts']}" in event.correlation[0])
        assert event.properties["provider_message_id"] == item["_id"]
        assert event.occurred_at == datetime.fromtimestamp(item["ts"], UTC)
        assert event.properties["subject"] == "Les nouveautés du printemps"
        assert event.correlation == [f"mandrill:{item['_id']}:{item['event']}:{item['ts']}" + (
            f":{item['url']}" if "url" in item else ""
        )]  # fmt: skip


def test_events_name_declics_delivery_from_the_metadata_and_flag_machines() -> None:
    opened, clicked = source().normalize(raw(form(json.dumps(ITEMS[1:3]))[0]))
    assert opened.properties["delivery"] == clicked.properties["delivery"] == "42"  # msg.metadata.declic_delivery
    assert (opened.properties["machine"], clicked.properties["machine"]) == (False, False)  # a person, on an iPhone
    proxy = {**ITEMS[1], "user_agent": "Mozilla/5.0", "user_agent_parsed": None, "ts": ITEMS[1]["ts"] + 1}
    scanner = {**ITEMS[2], "ts": ITEMS[2]["msg"]["ts"] + 2}  # a click 2 s after Mandrill sent the message
    robot = {**ITEMS[2], "ts": ITEMS[2]["ts"] + 5, "user_agent_parsed": {"type": "robot", "mobile": False}}
    events = source().normalize(raw(form(json.dumps([proxy, scanner, robot]))[0]))
    assert [e.properties["machine_reasons"] for e in events] == [["apple-mpp"], ["too-soon"], ["robot-agent"]]
    no_metadata = {**ITEMS[1], "msg": {k: v for k, v in ITEMS[1]["msg"].items() if k != "metadata"}}
    assert source().normalize(raw(form(json.dumps([no_metadata]))[0]))[0].properties["delivery"] is None


def test_an_item_repeated_in_one_batch_gives_one_event() -> None:
    assert len(source().normalize(raw(form(json.dumps([ITEMS[1], ITEMS[1], ITEMS[2]]))[0]))) == 2


def test_a_long_click_url_keeps_the_correlation_key_short_and_stable() -> None:
    click = dict(ITEMS[2], url="https://boutique.example.com/?" + "x" * 400)
    body = form(json.dumps([click]))[0]
    [first], [again] = source().normalize(raw(body)), source().normalize(raw(body))
    assert first.correlation == again.correlation
    assert len(first.correlation[0]) <= 300 and first.correlation[0].startswith("mandrill:sha256:")
    assert first.properties["url"] == click["url"]


def broken(**changes: Any) -> bytes:
    item = {**ITEMS[1], **changes}
    return form(json.dumps([{k: v for k, v in item.items() if v is not None}]))[0]


@pytest.mark.parametrize(
    ("case", "body", "reason"),
    [
        ("not JSON", form("{oops")[0], "mandrill_events is not JSON"),
        ("an object, not an array", form('{"event": "open"}')[0], "not a JSON array"),
        ("an item that is not an object", form('["open"]')[0], "not a JSON array"),
        ("no msg", broken(msg=None), r"mandrill_events\[0\] \(open\): KeyError"),
        ("msg not an object", broken(msg="x"), "TypeError"),
        ("no address", broken(msg={"_id": "m1"}), "KeyError: 'email'"),
        ("empty address", broken(msg={"_id": "m1", "email": ""}), "msg.email is empty"),
        ("no id at all", broken(_id=None, msg={"email": "a@example.org"}), "KeyError: '_id'"),
        ("ts not a number", broken(ts="soon"), "ValueError"),
        ("click without url", form(json.dumps([{k: v for k, v in ITEMS[2].items() if k != "url"}]))[0], "'url'"),
    ],
)
def test_malformed_batches_say_why(case: str, body: bytes, reason: str) -> None:
    with pytest.raises(MalformedPayload, match=reason):
        source().normalize(raw(body))


# End to end: real HTTP into the database, the plugin loaded through its entry point.

CONFIG = """\
public_url: {public_url}
storage: {{url: '{db_url}'}}
sources:
  mail: {{plugin: mandrill, webhook_key: {key}}}
sinks:
  email: {{plugin: smtp, host: 127.0.0.1, port: {smtp_port}, tls: none, sender: shop@example.com, mandrill: true}}
rules:
  - name: clicked
    when: email.clicked
    kind: transactional
    send: {{via: email, template: hello}}
"""


async def start(aiohttp_client: Any, tmp_path: Path, db_url: str, smtp_port: int) -> tuple[TestClient, RunningGateway]:
    pm = get_plugin_manager()
    text = CONFIG.format(public_url=PUBLIC_URL, db_url=db_url, key=KEY, smtp_port=smtp_port)
    settings_ = load_config(
        write_deployment(tmp_path, text, {"hello.txt.j2": "Hi", "hello.subject.j2": "Hi"}), collect(pm), pm
    )
    app = create_app(settings_, pm=pm, clock=FakeClock(datetime(2026, 3, 14, 12, 0, tzinfo=UTC)), role="web")
    return await aiohttp_client(app), app[GATEWAY_KEY]


def rows(gateway: RunningGateway, sql: str) -> list[tuple[Any, ...]]:
    with gateway.db.engine.connect() as conn:
        return [tuple(r) for r in conn.exec_driver_sql(sql)]


async def post(client: TestClient, items: list[dict[str, Any]] | str) -> Any:
    body, fields = form(items if isinstance(items, str) else json.dumps(items))
    headers = {"X-Mandrill-Signature": signature(KEY, URL, fields), "Content-Type": "application/x-www-form-urlencoded"}
    response = await client.post("/hooks/mail", data=body, headers=headers)
    return response.status, await response.json()


async def test_end_to_end_batches_update_contacts_and_enrol_once(
    aiohttp_client: Any, tmp_path: Path, db_url: str, smtp: SmtpCatcher
) -> None:
    client, gateway = await start(aiohttp_client, tmp_path, db_url, smtp.port)
    assert (await client.head("/hooks/mail")).status == 200
    assert (await post(client, BATCH))[1]["status"] == "accepted"
    assert (await post(client, json.dumps(ITEMS[::-1])))[1]["status"] == "duplicate"
    await gateway.worker.drain()
    assert rows(gateway, "SELECT type FROM events ORDER BY id") == [(e[0],) for e in EXPECTED]
    contacts = rows(gateway, "SELECT email, email_status, consent FROM contacts ORDER BY email")
    state = {email: (status, json.loads(consent).get("email", {}).get("state")) for email, status, consent in contacts}
    assert state == {
        "camille.durand@example.org": ("ok", None),
        "ines.moreau@example.org": ("ok", "withdrawn"),
        "jules.roux@example.org": ("ok", "withdrawn"),
        "lea.bernard@example.org": ("ok", None),
        "noah.martin@example.org": ("bouncing", None),
    }
    assert [m["To"] for m in smtp.messages] == ["camille.durand@example.org"]

    # The same click again in a later batch, next to new items: stored, but nobody is enrolled twice for it.
    new_open = {**ITEMS[1], "ts": ITEMS[1]["ts"] + 600}
    long_click = {**ITEMS[2], "ts": ITEMS[2]["ts"] + 60, "url": "https://boutique.example.com/?" + "x" * 400}
    assert (await post(client, [ITEMS[2], new_open, long_click]))[1]["status"] == "accepted"
    await gateway.worker.drain()
    occurrences = [o for (o,) in rows(gateway, "SELECT occurrence FROM enrolments ORDER BY id")]
    assert occurrences[0].endswith(":click:1773480090:" + ITEMS[2]["url"]) and len(occurrences) == 2
    assert occurrences[1].startswith("mandrill:sha256:")  # a long URL still fits the column
    assert len(smtp.messages) == 2

    # Feedback finds Declic's delivery through the metadata the SMTP sink gave Mandrill (X-MC-Metadata),
    # not through Mandrill's own message id, which Declic never saw.
    metadata = json.loads(smtp.messages[0]["X-MC-Metadata"])
    key = rows(gateway, "SELECT idempotency_key FROM deliveries ORDER BY id")[0][0]
    assert metadata == {"declic_delivery": key}
    msg = {**ITEMS[1]["msg"], "_id": "3f2b5cd0a9e84c41b1e2a7d6c5b4a392", "metadata": metadata}
    opened = {**ITEMS[1], "_id": msg["_id"], "msg": msg, "ts": ITEMS[1]["ts"] + 3600}
    await post(client, [opened])
    await gateway.worker.drain()
    assert rows(gateway, "SELECT feedback FROM deliveries ORDER BY id") == [("opened",), (None,)]
    assert rows(gateway, "SELECT DISTINCT status FROM inbox") == [("processed",)]


async def test_end_to_end_forgeries_are_refused_and_a_signed_bad_batch_is_kept(
    aiohttp_client: Any, tmp_path: Path, db_url: str, smtp: SmtpCatcher
) -> None:
    client, gateway = await start(aiohttp_client, tmp_path, db_url, smtp.port)
    unsigned = await client.post("/hooks/mail", data=BODY)
    forged = await client.post("/hooks/mail", data=TAMPERED, headers={"X-Mandrill-Signature": GOOD})
    assert (unsigned.status, forged.status) == (401, 401)
    assert "does not match" in (await forged.json())["error"]
    assert (await post(client, "[broken"))[0] == 200  # signed: kept, then marked failed with the reason
    await gateway.worker.drain()
    [(status, error)] = rows(gateway, "SELECT status, error FROM inbox")
    assert (status, error.startswith("mandrill_events is not JSON")) == ("failed", True)


# Property: whatever arrives, the answer is 2xx or 4xx, never 5xx.

header_text = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)


@pytest.fixture
async def app_client(aiohttp_client: Any, tmp_path: Path, smtp: SmtpCatcher) -> TestClient:
    """One app for every example of the property test (fixtures run per test, not per example)."""
    return (await start(aiohttp_client, tmp_path, f"sqlite:///{tmp_path}/d.db", smtp.port))[0]


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.binary(max_size=300) | json_values.map(lambda v: form(json.dumps(v))[0]),
    signature_header=st.none() | header_text,
    sign_it=st.booleans(),
    content_type=header_text,
)
async def test_any_request_gets_2xx_or_4xx(
    app_client: TestClient, body: bytes, signature_header: str | None, sign_it: bool, content_type: str
) -> None:
    headers = {"Content-Type": content_type}
    if sign_it:
        fields = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        signature_header = signature(KEY, URL, fields)
    if signature_header is not None:
        headers["X-Mandrill-Signature"] = signature_header
    response = await app_client.post("/hooks/mail", data=body, headers=headers)
    assert 200 <= response.status < 500, await response.text()
