"""Mailchimp source: URL token, GET validation, bracketed form fields -> consent, profile and bounce events."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, make_mocked_request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import FIXTURES, SHARED_PAYLOADS
from declic_gateway import BadRequest, MalformedPayload, RawCall
from declic_gateway.config import load_config
from declic_gateway.http.app import create_app
from declic_gateway.http.running import GATEWAY_KEY, RunningGateway
from declic_gateway.kit.sources import Deployment
from declic_gateway.plugins import collect, get_plugin_manager
from declic_gateway.testing import FakeClock, write_deployment
from declic_plugins.mailchimp import Mailchimp, MailchimpConfig, nest

TOKEN = "mc-7Yq2vLw9Rk4Tz8Xp"
CLOCK = FakeClock(datetime(2026, 4, 1, tzinfo=UTC))
SHARED = SHARED_PAYLOADS / "mailchimp"


def source() -> Mailchimp:
    config = MailchimpConfig.model_validate({"url_token": TOKEN})
    return Mailchimp("mc", config, Deployment("https://hooks.example.com", "UTC", CLOCK))


def request() -> web.Request:
    return make_mocked_request("POST", f"/hooks/mc/{TOKEN}")


def raw(body: bytes) -> RawCall:
    return RawCall(5, "mc", CLOCK.now(), {}, body)


def load(name: str) -> bytes:
    return (FIXTURES / "mailchimp" / name).read_bytes()


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ([("type", "profile")], {"type": "profile"}),
        (
            [("data[merges][FNAME]", "Ada"), ("data[merges][LNAME]", "L"), ("data[email]", "a@x")],
            {"data": {"merges": {"FNAME": "Ada", "LNAME": "L"}, "email": "a@x"}},
        ),
        (
            [("data[merges][GROUPINGS][0][name]", "Goûts"), ("data[merges][GROUPINGS][1][name]", "Villes")],
            {"data": {"merges": {"GROUPINGS": {"0": {"name": "Goûts"}, "1": {"name": "Villes"}}}}},
        ),
        ([("data[reason]", "manual"), ("data[reason]", "hard")], {"data": {"reason": "hard"}}),  # last wins, as PHP
        ([("odd]name[", "v"), ("data[]", "e")], {"odd]name[": "v", "data": {"": "e"}}),
    ],
)
def test_bracketed_names_nest(fields: list[tuple[str, str]], expected: dict[str, Any]) -> None:
    assert nest(fields) == expected


@pytest.mark.parametrize(
    "fields", [[("data", "x"), ("data[email]", "a@x")], [("data[merges][A]", "1"), ("data[merges]", "2")]]
)
def test_conflicting_names_are_refused(fields: list[tuple[str, str]]) -> None:
    with pytest.raises(ValueError, match="conflicts"):
        nest(fields)


async def test_fixtures_pass_verification() -> None:
    for path in sorted((FIXTURES / "mailchimp").glob("*.form")):
        await source().verify(request(), path.read_bytes())


@pytest.mark.parametrize(
    ("case", "body", "reason"),
    [
        ("empty body", b"", "no `type` field"),
        ("no type", b"fired_at=2026-01-01+00%3A00%3A00&data%5Bemail%5D=a%40x", "no `type` field"),
        ("empty type", b"type=&data%5Bemail%5D=a%40x", "no `type` field"),
        ("JSON", b'{"type": "subscribe"}', "no `type` field"),
        ("not UTF-8", b"type=subscribe&data%5Bemail%5D=%FF", "not a form-encoded body"),
        ("raw bytes", b"type=\xff", "not a form-encoded body"),
    ],
)
async def test_rejections(case: str, body: bytes, reason: str) -> None:
    with pytest.raises(BadRequest, match=reason):
        await source().verify(request(), body)


def test_dedupe_key_is_the_body_hash() -> None:
    # Mailchimp sends no delivery id and a retry repeats the body: the default key is what fits.
    body = load("subscribe.form")
    assert source().dedupe_key(request(), body) == source().dedupe_key(request(), bytes(body))
    assert source().dedupe_key(request(), body).startswith("sha256:")
    assert source().dedupe_key(request(), body) != source().dedupe_key(request(), load("profile.form"))


async def test_ping_answers_200() -> None:
    response = await source().ping(make_mocked_request("GET", f"/hooks/mc/{TOKEN}"))
    assert response is not None and response.status == 200


CAMILLE = "camille.durand@example.org"

NORMALIZE: list[tuple[str, dict[str, Any]]] = [
    (
        "subscribe.form",
        {
            "type": "email.subscribed",
            "email": CAMILLE,
            "consent": {"email": "granted"},
            "first_name": "Camille",
            "last_name": "Durand",
            "attributes": {
                "birthday": "04/12",
                "address": {"addr1": "12 rue des Lilas", "city": "Lyon", "zip": "69003", "country": "FR"},
            },  # the blank PHONE is left out
            "occurred_at": datetime(2026, 3, 14, 9, 12, 40, tzinfo=UTC),
            "properties": {"list_id": "f1e2d3c4b5", "member_id": "3f9c1e27ab", "ip_signup": "203.0.113.7"},
        },
    ),
    (
        "unsubscribe.form",
        {
            "type": "email.unsubscribed",
            "email": CAMILLE,
            "consent": {"email": "withdrawn"},
            "properties": {"action": "unsub", "reason": "manual", "campaign_id": "7c1d2e3f4a"},
        },
    ),
    (
        "profile.form",
        {
            "type": "profile.updated",
            "email": CAMILLE,
            "consent": {},
            "last_name": "Durand-Petit",
            "attributes": {
                "birthday": "04/12",
                "groupings": {"0": {"id": "101", "name": "Centres d'intérêt", "groups": "Vins, Fromages"}},
            },
        },
    ),
    (
        "upemail.form",
        {
            "type": "profile.updated",
            "email": "camille.petit@example.org",
            "previous_email": CAMILLE,
            "properties": {"list_id": "f1e2d3c4b5", "member_id": "9e8d7c6b5a", "changed": ["email"]},
        },
    ),
    (
        "cleaned_hard.form",
        {
            "type": "email.bounced",
            "email": "noah.martin@example.org",
            "consent": {},
            "properties": {"bounce": "hard", "reason": "hard", "campaign_id": "7c1d2e3f4a"},
        },
    ),
    (
        "cleaned_abuse.form",
        {"type": "email.complained", "email": "lea.bernard@example.org", "consent": {"email": "withdrawn"}},
    ),
]


@pytest.mark.parametrize(("fixture", "expected"), NORMALIZE, ids=[n[0] for n in NORMALIZE])
def test_types_become_canonical_events(fixture: str, expected: dict[str, Any]) -> None:
    [event] = source().normalize(raw(load(fixture)))
    seen = {
        "type": event.type,
        "occurred_at": event.occurred_at,
        "email": event.contact.email,
        "previous_email": event.contact.previous_email,
        "first_name": event.contact.first_name,
        "last_name": event.contact.last_name,
        "attributes": event.contact.attributes,
        "consent": {channel: s.state for channel, s in event.contact.consent.items()},
        "properties": {k: event.properties.get(k) for k in expected.get("properties", {})},
    }
    assert {k: seen[k] for k in expected} == expected
    assert event.correlation == []  # occurrences are one per call; exits then match by contact


@pytest.mark.parametrize(
    "body",
    [
        load("campaign.form"),  # a campaign was sent: about the audience, not about one contact
        b"type=something_new&data%5Bemail%5D=a%40example.org",
        b"type%5Bx%5D=subscribe",
    ],
)
def test_campaign_and_unknown_types_are_acknowledged_without_events(body: bytes) -> None:
    assert source().normalize(raw(body)) == []


def test_a_cleaned_reason_mailchimp_may_add_is_passed_on_without_marking_a_hard_bounce() -> None:
    [event] = source().normalize(raw(b"type=cleaned&data%5Breason%5D=bounced&data%5Bemail%5D=a%40example.org"))
    assert (event.type, event.properties["bounce"]) == ("email.bounced", "bounced")


def test_missing_fired_at_falls_back_to_the_reception_time() -> None:
    [event] = source().normalize(raw(b"type=profile&data%5Bemail%5D=a%40example.org"))
    assert event.occurred_at == CLOCK.now()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"type=subscribe&fired_at=2026-03-14", "subscribe: no data"),
        (b"type=subscribe&data%5Bid%5D=1", "subscribe: KeyError: 'email'"),
        (b"type=subscribe&data%5Bemail%5D=", r"subscribe: ValueError: data\[email\] is empty"),
        (b"type=upemail&data%5Bnew_email%5D=a%40example.org", "upemail: KeyError: 'old_email'"),
        (b"type=profile&data%5Bemail%5D=a%40x&data%5Bmerges%5D=flat", "TypeError: data.merges. is not"),
        (b"type=profile&fired_at=yesterday&data%5Bemail%5D=a%40x", "profile: ValueError"),
        (b"type=profile&data=x&data%5Bemail%5D=a%40x", "body: 'data\\[email\\]' conflicts"),
        (b"type=profile&data%5Bemail%5D%5Bx%5D=a", "profile: ValueError"),
        (b"type=profile&data%5Bemail%5D=%FF", "body: "),
    ],
)
def test_malformed_bodies_say_why(body: bytes, reason: str) -> None:
    with pytest.raises(MalformedPayload, match=reason):
        source().normalize(raw(body))


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared sample payloads not present")
@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("list_webhook_subscribe.json", "email.subscribed"),
        ("list_webhook_unsubscribe.json", "email.unsubscribed"),
        ("list_webhook_profile.json", "profile.updated"),
        ("list_webhook_upemail.json", "profile.updated"),
        ("list_webhook_cleaned.json", "email.bounced"),
        ("list_webhook_campaign.json", None),
    ],
)
def test_classic_doc_samples_normalise(name: str, kind: str | None) -> None:
    fields = json.loads((SHARED / name).read_text())
    events = source().normalize(raw(urlencode(fields).encode()))
    assert [e.type for e in events] == ([kind] if kind else [])
    for event in events:
        assert event.contact.email == (fields.get("data[email]") or fields.get("data[new_email]"))
        assert event.occurred_at == datetime.fromisoformat(fields["fired_at"]).replace(tzinfo=UTC)
    if name == "list_webhook_subscribe.json":
        assert events[0].contact.first_name == "Mailchimp"
        assert events[0].contact.attributes == {"interests": "Group1,Group2"}


# End to end: real HTTP into the database, the plugin loaded through its entry point.

CONFIG = """\
storage: {{url: '{db_url}'}}
sources:
  mc: {{plugin: mailchimp, url_token: {token}}}
"""


async def start(aiohttp_client: Any, tmp_path: Path, db_url: str) -> tuple[TestClient, RunningGateway]:
    pm = get_plugin_manager()
    config = load_config(write_deployment(tmp_path, CONFIG.format(db_url=db_url, token=TOKEN)), collect(pm), pm)
    app = create_app(config, pm=pm, clock=FakeClock(datetime(2026, 4, 15, tzinfo=UTC)), role="web")
    return await aiohttp_client(app), app[GATEWAY_KEY]


def rows(gateway: RunningGateway, sql: str) -> list[tuple[Any, ...]]:
    with gateway.db.engine.connect() as conn:
        return [tuple(r) for r in conn.exec_driver_sql(sql)]


async def post(client: TestClient, name: str) -> str:
    headers = {"Content-Type": "application/x-www-form-urlencoded", "User-Agent": "MailChimp"}
    response = await client.post(f"/hooks/mc/{TOKEN}", data=load(name), headers=headers)
    assert response.status == 200
    return str((await response.json())["status"])


async def test_end_to_end_a_member_story_into_the_database(aiohttp_client: Any, tmp_path: Path, db_url: str) -> None:
    client, gateway = await start(aiohttp_client, tmp_path, db_url)
    assert (await client.get(f"/hooks/mc/{TOKEN}")).status == 200  # Mailchimp's validation request
    assert (await client.get("/hooks/mc/not-the-token")).status == 404
    assert (await client.post("/hooks/mc", data=load("subscribe.form"))).status == 404
    for name in ("subscribe.form", "profile.form", "upemail.form", "cleaned_hard.form", "campaign.form"):
        assert await post(client, name) == "accepted"
        # One at a time, as Mailchimp sends them: the core may normalise calls of one batch concurrently.
        await gateway.worker.drain()
    assert await post(client, "subscribe.form") == "duplicate"  # Mailchimp's retry of the same call
    assert await gateway.worker.drain() == 0

    assert rows(gateway, "SELECT type FROM events ORDER BY id") == [
        ("email.subscribed",),
        ("profile.updated",),
        ("profile.updated",),
        ("email.bounced",),
    ]
    contacts = rows(gateway, "SELECT email, first_name, last_name, attributes, consent, email_status FROM contacts")
    by_email = {c[0]: c[1:] for c in contacts}
    first, last, attributes, consent, status = by_email["camille.petit@example.org"]  # moved, not duplicated
    assert (first, last, status) == ("Camille", "Durand-Petit", "ok")
    assert json.loads(attributes)["address"]["city"] == "Lyon"
    assert json.loads(consent)["email"]["state"] == "granted"
    assert by_email["noah.martin@example.org"][-1] == "bouncing"
    assert len(contacts) == 2
    assert rows(gateway, "SELECT DISTINCT status FROM inbox") == [("processed",)]


async def test_end_to_end_an_unsubscribe_withdraws_consent(aiohttp_client: Any, tmp_path: Path, db_url: str) -> None:
    client, gateway = await start(aiohttp_client, tmp_path, db_url)
    for name in ("subscribe.form", "unsubscribe.form"):
        await post(client, name)
        await gateway.worker.drain()
    [(consent,)] = rows(gateway, "SELECT consent FROM contacts")
    assert json.loads(consent)["email"]["state"] == "withdrawn"


async def test_end_to_end_a_malformed_call_is_kept_and_marked_failed(
    aiohttp_client: Any, tmp_path: Path, db_url: str
) -> None:
    client, gateway = await start(aiohttp_client, tmp_path, db_url)
    response = await client.post(f"/hooks/mc/{TOKEN}", data=b"type=subscribe&data%5Bid%5D=1")
    assert response.status == 200
    refused = await client.post(f"/hooks/mc/{TOKEN}", data=b"hello")
    assert (refused.status, (await refused.json())["error"]) == (
        400,
        "no `type` field: not a Mailchimp audience webhook",
    )
    await gateway.worker.drain()
    assert rows(gateway, "SELECT status, error FROM inbox") == [("failed", "subscribe: KeyError: 'email'")]


# Property: whatever arrives, the answer is 2xx or 4xx, never 5xx.

header_text = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40)
form_bodies = st.lists(st.tuples(st.text(max_size=12), st.text(max_size=12)), max_size=6).map(
    lambda pairs: urlencode([("type", "subscribe"), *pairs]).encode()
)


@pytest.fixture
async def app_client(aiohttp_client: Any, tmp_path: Path) -> TestClient:
    """One app for every example of the property test (fixtures run per test, not per example)."""
    return (await start(aiohttp_client, tmp_path, f"sqlite:///{tmp_path}/d.db"))[0]


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.binary(max_size=300) | form_bodies,
    headers=st.dictionaries(st.sampled_from(["Content-Type", "X-Whatever", "User-Agent"]), header_text),
    method=st.sampled_from(["POST", "GET", "HEAD", "PUT"]),
    token=st.sampled_from([TOKEN, "", "wrong"]),
)
async def test_any_request_gets_2xx_or_4xx(
    app_client: TestClient, body: bytes, headers: dict[str, str], method: str, token: str
) -> None:
    response = await app_client.request(method, f"/hooks/mc/{token}".rstrip("/"), data=body, headers=headers)
    assert 200 <= response.status < 500, await response.text()
