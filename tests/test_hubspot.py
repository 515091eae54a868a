"""HubSpot source: v1/v2/v3 signatures over the raw bytes, batches, CRM enrichment, rate limits, end to end."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from unittest.mock import ANY
from urllib.parse import urlsplit

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, make_mocked_request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from conftest import FIXTURES, SHARED_PAYLOADS, TEMPLATES, fixture_json
from conftest import SECRET as SHOP_SECRET
from conftest import Deployment as Running
from declic_gateway import BadRequest, Event, MalformedPayload, RawCall, SignatureError
from declic_gateway.config import load_config
from declic_gateway.errors import RetryLater
from declic_gateway.http.app import create_app, load
from declic_gateway.http.running import GATEWAY_KEY, RunningGateway
from declic_gateway.kit.clock import FakeClock
from declic_gateway.kit.sources import Deployment
from declic_gateway.plugins import collect, get_plugin_manager
from declic_gateway.testing import SmtpCatcher, write_deployment
from declic_plugins.hubspot import (
    HubSpot,
    HubSpotConfig,
    signature_v1,
    signature_v2,
    signature_v3,
)
from fake_hubspot import (
    DAILY,
    RATE_OK,
    TEN_SECONDLY,
    UNAUTHORIZED,
    FakeHubSpot,
    Reply,
    contact_record,
    ms,
    property_change,
    serving,
    stamp,
)

# Published vectors, verbatim from HubSpot's SDK test suites:
# - HubSpot/hubspot-api-python tests/spec/utils/test_signature.py (TEST_DATA and the v1/v2/v3 cases)
# - HubSpot/hubspot-api-nodejs test/unit/signature.spec.ts ("is valid v1", "is valid v2", "is valid v2 with body")
SDK_SECRET = "yyyyyyyy-yyyy-yyyy-yyyy-yyyyyyyyyyyy"
SDK_URL = "https://www.example.com/webhook_uri"
PY_BODY = b"{'example_field':'example_value'}"
NODE_BODY = b'{"example_field":"example_value"}'
NODE_V1_BODY = (
    b'[{"eventId":1,"subscriptionId":12345,"portalId":62515,"occurredAt":1564113600000,'
    b'"subscriptionType":"contact.creation","attemptNumber":0,"objectId":123,"changeSource":"CRM",'
    b'"changeFlag":"NEW","appId":54321}]'
)
PY_V3_TIMESTAMP = "15000000"  # epoch ms: 1970-01-01 04:10 UTC, so the clock is set there to check it
V1 = [
    ("python v1", PY_BODY, "69fc6631a867edd4f9e9e627fc5c1148e3fbdd8b21837b6d2b8901c1fa57f750"),
    ("node v1", NODE_V1_BODY, "232db2615f3d666fe21a8ec971ac7b5402d33b9a925784df3ca654d05f4817de"),
]
V2 = [
    ("python v2", "POST", PY_BODY, "4fe4e3a7d3cf09db53be39d0a58130e2aaba074ec123a9e355b876a689a1c383"),
    ("python v2 GET", "GET", b"", "eee2dddcc73c94d699f5e395f4b9d454a069a6855fbfa152e91e88823087200e"),
    ("node v2 with body", "POST", NODE_BODY, "9569219f8ba981ffa6f6f16aa0f48637d35d728c7e4d93d0d52efaa512af7900"),
]
V3 = ("python v3", "POST", PY_BODY, PY_V3_TIMESTAMP, "HPW73RUtKmcYoEDADG0s6MmGFWUzWJKAW07r8RDgcQw=")

SECRET = "client-s3cret"
TOKEN = "pat-eu1-0000-test"
PUBLIC = "https://hooks.example.com"
NOW = datetime(2026, 3, 14, 9, 5, tzinfo=UTC)
SHARED = SHARED_PAYLOADS / "hubspot"


def fixture(name: str) -> bytes:
    return (FIXTURES / "hubspot" / name).read_bytes()


def source(
    *,
    secret: str = SECRET,
    public_url: str | None = PUBLIC,
    clock: FakeClock | None = None,
    api_base: str = "http://127.0.0.1:1",
    token: str | None = TOKEN,
    properties: tuple[str, ...] = (),
    consent: list[dict[str, Any]] | None = None,
) -> HubSpot:
    given = {"client_secret": secret, "app_token": token, "api_base": api_base, "properties": list(properties)}
    config = HubSpotConfig.model_validate(given if consent is None else {**given, "consent": consent})
    return HubSpot("crm", config, Deployment(public_url, "UTC", clock or FakeClock(NOW)))


def request(headers: dict[str, str], path: str = "/hooks/crm", method: str = "POST") -> web.Request:
    return make_mocked_request(method, path, headers=headers)


def now_ms(clock_time: datetime = NOW) -> str:
    return str(int(clock_time.timestamp() * 1000))


def v3_headers(
    body: bytes, uri: str = PUBLIC + "/hooks/crm", stamp: str | None = None, secret: str = SECRET
) -> dict[str, str]:
    """What HubSpot sends: the v3 signature and, for compatibility, the older one."""
    stamp = stamp or now_ms()
    return {
        "Content-Type": "application/json",
        "X-HubSpot-Signature-v3": signature_v3(secret.encode(), "POST", uri, body, stamp),
        "X-HubSpot-Request-Timestamp": stamp,
        "X-HubSpot-Signature": signature_v1(secret.encode(), body),
        "X-HubSpot-Signature-Version": "v1",
    }


def v1_headers(body: bytes, secret: str = SECRET) -> dict[str, str]:
    return {"X-HubSpot-Signature": signature_v1(secret.encode(), body), "X-HubSpot-Signature-Version": "v1"}


# -- published vectors -------------------------------------------------------------------------------


@pytest.mark.parametrize(("case", "body", "expected"), V1, ids=[v[0] for v in V1])
def test_published_v1_vectors(case: str, body: bytes, expected: str) -> None:
    assert signature_v1(SDK_SECRET.encode(), body) == expected


@pytest.mark.parametrize(("case", "method", "body", "expected"), V2, ids=[v[0] for v in V2])
def test_published_v2_vectors(case: str, method: str, body: bytes, expected: str) -> None:
    assert signature_v2(SDK_SECRET.encode(), method, SDK_URL, body) == expected


def test_published_v3_vector() -> None:
    _, method, body, stamp, expected = V3
    assert signature_v3(SDK_SECRET.encode(), method, SDK_URL, body, stamp) == expected


def sdk_source(clock: FakeClock | None = None) -> HubSpot:
    return source(secret=SDK_SECRET, public_url="https://www.example.com", clock=clock)


@pytest.mark.parametrize(("case", "body", "given"), V1, ids=[v[0] for v in V1])
async def test_published_v1_vectors_verify(case: str, body: bytes, given: str) -> None:
    headers = {"X-HubSpot-Signature": given, "X-HubSpot-Signature-Version": "v1"}
    await sdk_source().verify(request(headers, "/webhook_uri"), body)


@pytest.mark.parametrize(("case", "method", "body", "given"), [v for v in V2 if v[2]], ids=["python v2", "node v2"])
async def test_published_v2_vectors_verify(case: str, method: str, body: bytes, given: str) -> None:
    headers = {"X-HubSpot-Signature": given, "X-HubSpot-Signature-Version": "v2"}
    await sdk_source().verify(request(headers, "/webhook_uri"), body)


V3_MOMENT = datetime.fromtimestamp(int(PY_V3_TIMESTAMP) / 1000, UTC)


@pytest.mark.parametrize(
    ("age", "accepted"),
    [
        (timedelta(0), True),
        (timedelta(minutes=5), True),
        (timedelta(minutes=5, milliseconds=1), False),
        (-timedelta(minutes=5, milliseconds=1), False),
    ],
)
async def test_published_v3_vector_within_five_minutes_only(age: timedelta, accepted: bool) -> None:
    _, _, body, stamp, given = V3
    headers = {"X-HubSpot-Signature-v3": given, "X-HubSpot-Request-Timestamp": stamp}
    verifying = sdk_source(FakeClock(V3_MOMENT + age)).verify(request(headers, "/webhook_uri"), body)
    if accepted:
        await verifying
    else:
        with pytest.raises(SignatureError, match="more than 5 minutes"):
            await verifying


async def test_v3_is_checked_before_the_older_signature() -> None:
    _, _, body, stamp, _ = V3
    headers = {
        "X-HubSpot-Signature-v3": "HPW73RUtKmcYoEDADG0s6MmGFWUzWJKAW07r8RDgcQw=",
        "X-HubSpot-Request-Timestamp": str(int(stamp) + 1),  # v3 broken, v1 intact: still refused
        "X-HubSpot-Signature": V1[0][2],
        "X-HubSpot-Signature-Version": "v1",
    }
    with pytest.raises(SignatureError, match="v3 does not match"):
        await sdk_source(FakeClock(V3_MOMENT)).verify(request(headers, "/webhook_uri"), body)


# -- rejections and the URI behind a proxy ------------------------------------------------------------

BODY = fixture("contact_notifications.json")


def without(headers: dict[str, str], *names: str) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k not in names}


REJECTIONS: list[tuple[str, dict[str, str], bytes, type[Exception], str]] = [
    ("no signature at all", {"Content-Type": "application/json"}, BODY, SignatureError, "missing X-HubSpot-Signature"),
    ("v3 wrong secret", v3_headers(BODY, secret="other"), BODY, SignatureError, "v3 does not match"),
    ("v3 tampered body", v3_headers(BODY), BODY.replace(b"201", b"202"), SignatureError, "v3 does not match"),
    (
        "v3 one space added",
        v3_headers(BODY),
        BODY.replace(b"[", b"[ ", 1),
        SignatureError,
        "v3 does not match",
    ),
    (
        "v3 without timestamp",
        without(v3_headers(BODY), "X-HubSpot-Request-Timestamp"),
        BODY,
        SignatureError,
        "Timestamp is missing",
    ),
    (
        "v3 timestamp in seconds",
        v3_headers(BODY, stamp=str(int(NOW.timestamp()))),
        BODY,
        SignatureError,
        "more than 5 minutes",
    ),
    (
        "v3 stale",
        v3_headers(BODY, stamp=now_ms(NOW - timedelta(minutes=6))),
        BODY,
        SignatureError,
        "more than 5 minutes",
    ),
    ("v3 not a number", {**v3_headers(BODY), "X-HubSpot-Request-Timestamp": "soon"}, BODY, SignatureError, "epoch"),
    (
        "v3 signed for the internal URL",
        v3_headers(BODY, uri="http://10.0.0.7:8080/hooks/crm"),
        BODY,
        SignatureError,
        "public_url",
    ),
    ("v1 wrong secret", v1_headers(BODY, secret="other"), BODY, SignatureError, r"\(v1\) does not match"),
    ("v1 tampered body", v1_headers(BODY), BODY + b"\n", SignatureError, r"\(v1\) does not match"),
    (
        "v2 signed without the query string",
        {
            "X-HubSpot-Signature": signature_v2(SECRET.encode(), "POST", PUBLIC + "/hooks/crm", BODY),
            "X-HubSpot-Signature-Version": "v2",
        },
        BODY,
        SignatureError,
        r"\(v2\) does not match",
    ),
    (
        "unknown version",
        {**v1_headers(BODY), "X-HubSpot-Signature-Version": "v9"},
        BODY,
        SignatureError,
        "unsupported",
    ),
    ("v1 empty body", v1_headers(b""), b"", BadRequest, "empty body"),
    ("v3 blank body", v3_headers(b"  "), b"  ", BadRequest, "empty body"),
]


@pytest.mark.parametrize(("case", "hdrs", "body", "error", "reason"), REJECTIONS, ids=[r[0] for r in REJECTIONS])
async def test_rejections(case: str, hdrs: dict[str, str], body: bytes, error: type[Exception], reason: str) -> None:
    path = "/hooks/crm?portal=1" if case.startswith("v2") else "/hooks/crm"
    with pytest.raises(error, match=reason):
        await source().verify(request(hdrs, path), body)


ACCEPTED: list[tuple[str, str, str | None, dict[str, str]]] = [
    ("v3 behind a proxy, with query", "/hooks/crm?x=1", PUBLIC, v3_headers(BODY, PUBLIC + "/hooks/crm?x=1")),
    ("public_url with a slash", "/hooks/crm?x=1", PUBLIC + "/", v3_headers(BODY, PUBLIC + "/hooks/crm?x=1")),
    (
        "v3 over the URI as sent",
        "/hooks/crm?email=a%40b.example",
        PUBLIC,
        v3_headers(BODY, PUBLIC + "/hooks/crm?email=a%40b.example"),
    ),
    (
        "v3 over the URI decoded as the HubSpot doc says",
        "/hooks/crm?email=a%40b.example",
        PUBLIC,
        v3_headers(BODY, PUBLIC + "/hooks/crm?email=a@b.example"),
    ),
    (
        "v3 with no public_url: the request's own host",
        "/hooks/crm",
        None,
        v3_headers(BODY, "http://127.0.0.1/hooks/crm"),
    ),
    (
        "v2 with query",
        "/hooks/crm?portal=1",
        PUBLIC,
        {
            "X-HubSpot-Signature": signature_v2(SECRET.encode(), "POST", PUBLIC + "/hooks/crm?portal=1", BODY),
            "X-HubSpot-Signature-Version": "v2",
        },
    ),
    ("v1 without a version header", "/hooks/crm", PUBLIC, {"X-HubSpot-Signature": signature_v1(SECRET.encode(), BODY)}),
    (
        "v1 in capitals",
        "/hooks/crm",
        PUBLIC,
        {**v1_headers(BODY), "X-HubSpot-Signature": v1_headers(BODY)["X-HubSpot-Signature"].upper()},
    ),
]


@pytest.mark.parametrize(("case", "path", "public_url", "hdrs"), ACCEPTED, ids=[a[0] for a in ACCEPTED])
async def test_accepted(case: str, path: str, public_url: str | None, hdrs: dict[str, str]) -> None:
    headers = {"Host": "127.0.0.1", **hdrs}
    await source(public_url=public_url).verify(request(headers, path), BODY)


async def test_a_plus_turned_into_a_space_by_a_proxy_still_verifies() -> None:
    bodies = (b'[{"objectId": %d}]' % n for n in range(200))
    body = next(b for b in bodies if "+" in v3_headers(b)["X-HubSpot-Signature-v3"])
    headers = v3_headers(body)
    headers["X-HubSpot-Signature-v3"] = headers["X-HubSpot-Signature-v3"].replace("+", " ")
    await source().verify(request(headers), body)


# -- dedupe ----------------------------------------------------------------------------------------


def dedupe(body: bytes) -> str:
    return source().dedupe_key(request({}), body)


def test_a_retried_batch_has_the_same_key_whatever_its_attempt_number_or_order() -> None:
    items = json.loads(BODY)
    retried = [{**item, "attemptNumber": 3} for item in reversed(items)]
    assert dedupe(json.dumps(retried).encode()) == dedupe(BODY)
    assert dedupe(BODY).startswith("notifications:")


def test_a_batch_with_one_new_notification_is_new_work() -> None:
    items = json.loads(BODY)
    items[0]["eventId"] += 1
    assert dedupe(json.dumps(items).encode()) != dedupe(BODY)


@pytest.mark.parametrize("body", [b"not json", b'[{"objectId": 1}]', b"[1]", b"[" * 100_000])
def test_bodies_without_notification_ids_dedupe_on_their_hash(body: bytes) -> None:
    assert dedupe(body).startswith("sha256:")


# -- the fake HubSpot API (tests/fake_hubspot.py) -------------------------------------------------


@pytest.fixture
async def api() -> AsyncIterator[FakeHubSpot]:
    fake = FakeHubSpot(TOKEN)
    fake.objects["contacts", "201"] = json.loads(fixture("api_contact_201.json"))
    fake.objects["deals", "301"] = json.loads(fixture("api_deal_301.json"))
    fake.objects["deals", "302"] = {"id": "302", "properties": {"dealname": "Orphan"}}
    async with serving(fake):
        yield fake


@pytest.fixture
async def crm(api: FakeHubSpot) -> AsyncIterator[HubSpot]:
    src = source(api_base=api.url, properties=("hubspotscore",))
    await src.start()
    yield src
    await src.close()


def raw(body: bytes, inbox_id: int = 7) -> RawCall:
    return RawCall(inbox_id, "crm", NOW, {"Content-Type": "application/json"}, body)


def seen(event: Any) -> dict[str, Any]:
    c = event.contact
    return {
        "type": event.type,
        "occurred_at": event.occurred_at,
        "correlation": event.correlation,
        "email": c.email,
        "phone": c.phone,
        "first_name": c.first_name,
        "locale": c.locale,
        "last_name": c.last_name,
        "external_ids": c.external_ids,
        "attributes": c.attributes,
        **{f"p.{k}": v for k, v in event.properties.items()},
    }


def at(seconds: int) -> datetime:
    return datetime(2026, 3, 14, 9, 0, tzinfo=UTC) + timedelta(seconds=seconds)


LEA = {
    "email": "lea.moreau@example.org",
    "phone": "+33612345678",
    "first_name": "Léa",
    "last_name": "Moreau",
    "locale": "fr-ca",
    "external_ids": {"hubspot": "201"},
    "attributes": {"lifecyclestage": "lead", "hubspotscore": "55"},
}
IDS_ONLY: dict[str, Any] = {"email": None, "first_name": None, "attributes": {}}

CONTACT_EVENTS: list[dict[str, Any]] = [
    {"type": "contact.created", "occurred_at": at(0), "correlation": ["hubspot-contact:201"], **LEA},
    {
        "type": "contact.property_changed",
        "occurred_at": at(10),
        "correlation": ["hubspot-contact:201:hubspotscore:55", "hubspot-contact:201"],
        "p.name": "hubspotscore",
        "p.value": "55",
        "p.number": 55,
        "p.change_source": "CALCULATED",
        **LEA,
    },
    {"type": "contact.erased", "external_ids": {"hubspot": "202"}, "correlation": ["hubspot-contact:202"], **IDS_ONLY},
    {"type": "contact.deleted", "external_ids": {"hubspot": "203"}, "correlation": ["hubspot-contact:203"], **IDS_ONLY},
    {
        "type": "contact.merged",
        "external_ids": {"hubspot": "204"},
        "correlation": ["hubspot-contact:204", "hubspot-contact:205"],
        "p.merged_ids": ["205"],
        "p.object_missing": True,  # 404 in the fake: deleted since; the event keeps the ids
        **IDS_ONLY,
    },
]


async def test_contact_notifications_become_events_in_time_order(crm: HubSpot, api: FakeHubSpot) -> None:
    events = await crm.normalize(raw(BODY))
    assert [{k: seen(e).get(k) for k in expected} for e, expected in zip(events, CONTACT_EVENTS, strict=True)] == (
        CONTACT_EVENTS
    )
    # One fetch per contact; none for the erased or deleted ones, nor for the company.
    assert api.paths == ["/crm/v3/objects/contacts/201", "/crm/v3/objects/contacts/204"]
    _, query, auth = api.seen[0]
    assert query == {
        "properties": "email,phone,firstname,lastname,hs_language,lifecyclestage,hubspotscore,hs_email_optout",
        "propertiesWithHistory": "hs_email_optout",
    }
    assert auth == f"Bearer {TOKEN}"


DEAL = {
    "p.deal_id": "301",
    "p.name": "Abonnement annuel",
    "p.amount": Decimal("1250.50"),
    "p.currency": "EUR",
    "p.pipeline": "default",
    **LEA,
}
DEAL_EVENTS: list[dict[str, Any]] = [
    {
        "type": "deal.created",
        "occurred_at": at(200),
        "correlation": ["deal:301", "hubspot-contact:201"],
        "p.stage": "appointmentscheduled",
        **DEAL,
    },
    {
        "type": "deal.stage_changed",
        "occurred_at": at(260),
        "correlation": ["deal:301:stage:contractsent", "deal:301", "hubspot-contact:201"],
        "p.stage": "contractsent",
        **DEAL,
    },
]


async def test_deal_notifications_reach_the_deals_first_contact(crm: HubSpot, api: FakeHubSpot) -> None:
    events = await crm.normalize(raw(fixture("deal_notifications.json")))
    assert [{k: seen(e).get(k) for k in expected} for e, expected in zip(events, DEAL_EVENTS, strict=True)] == (
        DEAL_EVENTS
    )
    # The amount change is ignored unfetched; 302 has no contact and 303 is gone (404): no event, no loop.
    assert api.paths == [
        "/crm/v3/objects/deals/301",
        "/crm/v3/objects/contacts/201",
        "/crm/v3/objects/deals/302",
        "/crm/v3/objects/deals/303",
    ]
    assert api.seen[0][1] == {
        "properties": "dealname,dealstage,pipeline,amount,deal_currency_code,closedate",
        "associations": "contacts",
    }


async def test_without_app_token_contacts_carry_ids_only_and_deals_are_skipped(api: FakeHubSpot) -> None:
    src = source(api_base=api.url, token=None)
    contact_events = await src.normalize(raw(BODY))
    deal_events = await src.normalize(raw(fixture("deal_notifications.json")))
    assert [e.contact.model_dump(exclude_defaults=True) for e in contact_events[:2]] == [
        {"external_ids": {"hubspot": "201"}}
    ] * 2
    assert deal_events == [] and api.seen == []


@pytest.mark.parametrize(
    ("value", "number"),
    [
        *[("55", 55), ("-3", -3), ("12.5", 12.5), (" 7 ", 7), ("1e3", 1000.0), ("1e999", None), ("nan", None)],
        *[("1_000", None), ("abc", None), ("", None), (None, None), ("9" * 50, None)],
    ],
)
async def test_property_changes_carry_a_number_when_the_value_is_one(value: str | None, number: Any) -> None:
    item = {"subscriptionType": "contact.propertyChange", "objectId": 9, "propertyName": "hubspotscore"}
    [event] = await source(token=None).normalize(raw(json.dumps([{**item, "propertyValue": value}]).encode()))
    assert event.properties["number"] == number and event.properties["value"] == value


async def test_the_docs_example_with_eventtype_keys_normalises() -> None:
    body = json.dumps(
        [
            {"objectId": 1246965, "eventType": "contact.propertyChange", "propertyName": "lifecyclestage"}
            | {"propertyValue": "subscriber", "occurredAt": 1462216307945, "portalId": 33},
            {"objectId": 1246978, "eventType": "contact.creation", "occurredAt": 1462216307000, "portalId": 33},
        ]
    ).encode()
    events = await source(token=None).normalize(raw(body))
    assert [e.type for e in events] == ["contact.created", "contact.property_changed"]


MALFORMED = [
    (b"not json", "body is not JSON"),
    (b'{"hello": "world"}', "expected a JSON array"),
    (b"[1, 2]", "expected a JSON array"),
    (b'[{"subscriptionType": "contact.creation"}]', "KeyError: 'objectId'"),
    (b'[{"subscriptionType": "contact.creation", "objectId": "../admin"}]', "not a HubSpot object id"),
    (b'[{"subscriptionType": "contact.creation", "objectId": true}]', "not a HubSpot object id"),
    (b'[{"subscriptionType": "contact.creation", "objectId": 1, "occurredAt": "today"}]', "epoch milliseconds"),
    (b'[{"subscriptionType": "contact.creation", "objectId": 1, "occurredAt": 10000000000000000000}]', "occurredAt"),
    (b'[{"subscriptionType": "contact.propertyChange", "objectId": 1}]', "KeyError: 'propertyName'"),
    (b'[{"subscriptionType": "contact.merge", "objectId": 1, "mergedObjectIds": [{}]}]', "not a HubSpot object id"),
]


@pytest.mark.parametrize(("body", "reason"), MALFORMED)
async def test_malformed_bodies_say_why(body: bytes, reason: str) -> None:
    with pytest.raises(MalformedPayload, match=reason):
        await source(token=None).normalize(raw(body))


async def test_a_single_notification_object_counts_as_a_batch_of_one() -> None:
    body = b'{"subscriptionType": "contact.deletion", "objectId": 5, "portalId": 1}'
    assert [e.type for e in await source(token=None).normalize(raw(body))] == ["contact.deleted"]


async def test_unused_subscriptions_give_no_event() -> None:
    body = b'[{"subscriptionType": "ticket.creation", "objectId": 5}, {"subscriptionType": "company.merge"}]'
    assert await source(token=None).normalize(raw(body)) == []


def test_config_refuses_property_names_that_would_break_the_query() -> None:
    with pytest.raises(ValidationError, match="internal name"):
        HubSpotConfig.model_validate({"client_secret": "s", "properties": ["score,email"]})


# -- consent: what HubSpot's properties state, dated by HubSpot -------------------------------------

CAMILLE = "camille.durand@example.org"
PORTAL = 8812345
OWN = [{"property": "newsletter_opt_in", "granted": ["true"], "withdrawn": ["false"]}]
SUBSCRIPTION = [{"property": "hs_email_optout_12345678", "withdrawn": ["true"]}]
SMS = [{"property": "sms_consent", "channel": "sms", "granted": ["yes"], "withdrawn": ["no"]}]
_event_ids = itertools.count(5000)


def record(
    object_id: str = "501", source_type: str = "EMAIL", /, **history: list[tuple[str, datetime]]
) -> dict[str, Any]:
    """Camille as HubSpot keeps her, with the properties given and their history."""
    props = {"email": CAMILLE, "firstname": "Camille", "lastname": "Durand"}
    return contact_record(object_id, props, history, at(-86400), source_type)


def undated(stored: dict[str, Any]) -> dict[str, Any]:
    """A record whose history the API did not give."""
    return {k: v for k, v in stored.items() if k != "propertiesWithHistory"}


def oldest_first(stored: dict[str, Any]) -> dict[str, Any]:
    history = {name: entries[::-1] for name, entries in stored["propertiesWithHistory"].items()}
    return {**stored, "propertiesWithHistory": history}


def change(name: str, value: str | None, moment: datetime | None, object_id: int = 501) -> dict[str, Any]:
    return property_change(object_id, name, value, moment, next(_event_ids), PORTAL)


def creation(moment: datetime, object_id: int = 501) -> dict[str, Any]:
    return {
        "eventId": next(_event_ids),
        "subscriptionId": 3201,
        "portalId": PORTAL,
        "occurredAt": ms(moment),
        "subscriptionType": "contact.creation",
        "objectId": object_id,
    }


Stated = dict[str, tuple[str, datetime | None, bool]]
CONSENT_CASES: list[tuple[str, list[dict[str, Any]] | None, dict[str, Any], dict[str, Any] | None, Stated]] = [
    (
        "an opt-out of all e-mail, notified",
        None,
        change("hs_email_optout", "true", at(0)),
        record(hs_email_optout=[("true", at(0))]),
        {"email": ("withdrawn", at(0), True)},
    ),
    (
        "an opt-out notified for a record deleted since (404)",
        None,
        change("hs_email_optout", "true", at(0)),
        None,
        {"email": ("withdrawn", at(0), True)},
    ),
    (
        "hs_email_optout false grants nothing: HubSpot records no opt-in",
        None,
        change("hs_email_optout", "false", at(0)),
        record(hs_email_optout=[("false", at(0)), ("true", at(-60))]),
        {},
    ),
    (
        "a fetched record dates the opt-out by the property's history",
        None,
        creation(at(60)),
        record(hs_email_optout=[("true", at(-3600)), ("false", at(-7200))]),
        {"email": ("withdrawn", at(-3600), True)},
    ),
    (
        "history listed oldest first",
        None,
        creation(at(60)),
        oldest_first(record(hs_email_optout=[("true", at(-3600)), ("false", at(-7200))])),
        {"email": ("withdrawn", at(-3600), True)},
    ),
    (
        "a record without history is an undated snapshot",
        None,
        creation(at(60)),
        undated(record(hs_email_optout=[("true", at(-3600))])),
        {"email": ("withdrawn", None, False)},
    ),
    (
        "an empty opt-out states nothing",
        None,
        creation(at(60)),
        record(hs_email_optout=[("", at(-3600))]),
        {},
    ),
    (
        "a change of another property carries the record's consent",
        None,
        change("lifecyclestage", "customer", at(0)),
        record(hs_email_optout=[("true", at(-3600))]),
        {"email": ("withdrawn", at(-3600), True)},
    ),
    (
        "an opt-out without occurredAt: its event dates it",
        None,
        change("hs_email_optout", "true", None),
        None,
        {"email": ("withdrawn", None, True)},
    ),
    (
        "one subscription type's opt-out",
        SUBSCRIPTION,
        change("hs_email_optout_12345678", "true", at(0)),
        None,
        {"email": ("withdrawn", at(0), True)},
    ),
    (
        "values compared ignoring case and spaces",
        SUBSCRIPTION,
        change("hs_email_optout_12345678", " TRUE ", at(0)),
        None,
        {"email": ("withdrawn", at(0), True)},
    ),
    (
        "a property of one's own grants when the config says so",
        OWN,
        change("newsletter_opt_in", "true", at(0)),
        record(newsletter_opt_in=[("true", at(0))]),
        {"email": ("granted", at(0), False)},
    ),
    (
        "... and withdraws",
        OWN,
        change("newsletter_opt_in", "false", at(0)),
        None,
        {"email": ("withdrawn", at(0), True)},
    ),
    (
        "values the config does not list state nothing",
        OWN,
        change("newsletter_opt_in", "maybe", at(0)),
        None,
        {},
    ),
    (
        "another channel",
        SMS,
        change("sms_consent", "yes", at(0)),
        None,
        {"sms": ("granted", at(0), False)},
    ),
    (
        "a late notification loses to the record's newer value",
        OWN,
        change("newsletter_opt_in", "true", at(0)),
        record(newsletter_opt_in=[("false", at(300)), ("true", at(0))]),
        {"email": ("withdrawn", at(300), True)},
    ),
    (
        "a notification beats a record not yet up to date",
        OWN,
        change("newsletter_opt_in", "false", at(0)),
        record(newsletter_opt_in=[("true", at(-3600))]),
        {"email": ("withdrawn", at(0), True)},
    ),
    (
        "two properties on one channel: the one changed last counts (an opt-out)",
        OWN,
        creation(at(60)),
        record(newsletter_opt_in=[("true", at(-7200))], hs_email_optout=[("true", at(-3600))]),
        {"email": ("withdrawn", at(-3600), True)},
    ),
    (
        "two properties on one channel: the one changed last counts (an opt-in)",
        OWN,
        creation(at(60)),
        record(newsletter_opt_in=[("true", at(-60))], hs_email_optout=[("true", at(-3600))]),
        {"email": ("granted", at(-60), False)},
    ),
    (
        "two properties changed at the same moment: the withdrawal wins",
        OWN,
        creation(at(60)),
        record(newsletter_opt_in=[("true", at(-60))], hs_email_optout=[("true", at(-60))]),
        {"email": ("withdrawn", at(-60), True)},
    ),
]


def stated(event: Event) -> Stated:
    return {channel: (s.state, s.stated_at, s.action) for channel, s in event.contact.consent.items()}


@pytest.mark.parametrize(
    ("case", "rules", "item", "stored", "expected"), CONSENT_CASES, ids=[c[0] for c in CONSENT_CASES]
)
async def test_consent_stated_by_hubspot(
    api: FakeHubSpot,
    case: str,
    rules: list[dict[str, Any]] | None,
    item: dict[str, Any],
    stored: dict[str, Any] | None,
    expected: Stated,
) -> None:
    if stored is not None:
        api.objects["contacts", "501"] = stored
    src = source(api_base=api.url, consent=rules)
    await src.start()
    try:
        [event] = await src.normalize(raw(json.dumps([item]).encode()))
    finally:
        await src.close()
    assert stated(event) == expected
    rules_read = [rule["property"] for rule in rules or []] + ["hs_email_optout"]
    assert api.seen[0][1]["propertiesWithHistory"].split(",") == rules_read  # HubSpot dates only what is asked


async def test_consent_evidence_names_the_property_its_value_the_portal_and_the_subscription(
    api: FakeHubSpot,
) -> None:
    api.objects["contacts", "501"] = record(hs_email_optout=[("true", at(-3600))])
    api.objects["contacts", "502"] = record("502", hs_email_optout_12345678=[("true", at(-60))])
    items = [change("hs_email_optout_12345678", "true", at(0), object_id=502), creation(at(60))]
    src = source(api_base=api.url, consent=SUBSCRIPTION)
    await src.start()
    try:
        notified, fetched = await src.normalize(raw(json.dumps(items).encode()))
    finally:
        await src.close()
    assert notified.contact.consent["email"].evidence == {
        "property": "hs_email_optout_12345678",
        "value": "true",
        "portal_id": PORTAL,
        "object_id": "502",
        "change_source": "EMAIL",
        "event_id": items[0]["eventId"],
        "subscription_id": "12345678",
    }
    assert fetched.contact.consent["email"].evidence == {
        "property": "hs_email_optout",
        "value": "true",
        "portal_id": PORTAL,
        "object_id": "501",
        "source_type": "EMAIL",
    }
    assert api.seen[0][1] == {
        "properties": "email,phone,firstname,lastname,hs_language,lifecyclestage,"
        "hs_email_optout_12345678,hs_email_optout",
        "propertiesWithHistory": "hs_email_optout_12345678,hs_email_optout",
    }


async def test_deals_and_merges_carry_their_contacts_consent(crm: HubSpot, api: FakeHubSpot) -> None:
    lea = api.objects["contacts", "201"]
    api.objects["contacts", "201"] = {
        **lea,
        "properties": {**lea["properties"], "hs_email_optout": "true"},
        "propertiesWithHistory": {"hs_email_optout": [{"value": "true", "timestamp": stamp(at(-60))}]},
    }
    api.objects["contacts", "204"] = record("204", hs_email_optout=[("true", at(-120))])
    deals = await crm.normalize(raw(fixture("deal_notifications.json")))
    [merge] = [e for e in await crm.normalize(raw(BODY, inbox_id=8)) if e.type == "contact.merged"]
    assert [stated(e) for e in deals] == [{"email": ("withdrawn", at(-60), True)}] * 2
    assert deals[0].contact.consent["email"].evidence["portal_id"] == PORTAL
    assert stated(merge) == {"email": ("withdrawn", at(-120), True)}


async def test_without_app_token_only_property_changes_state_consent(api: FakeHubSpot) -> None:
    items = [change("hs_email_optout", "true", at(0)), creation(at(60))]
    events = await source(api_base=api.url, token=None).normalize(raw(json.dumps(items).encode()))
    assert [stated(e) for e in events] == [{"email": ("withdrawn", at(0), True)}, {}]
    assert api.seen == []


def consent_rules(given: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    config = HubSpotConfig.model_validate({"client_secret": "s", **({} if given is None else {"consent": given})})
    return [rule.model_dump() for rule in config.consent]


OPT_OUT_RULE = {"property": "hs_email_optout", "channel": "email", "withdrawn": ["true"], "granted": []}


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (None, [OPT_OUT_RULE]),
        ([], [OPT_OUT_RULE]),
        (
            [{"property": "sms_consent", "channel": "sms", "granted": ["Yes"]}],
            [{"property": "sms_consent", "channel": "sms", "withdrawn": [], "granted": ["yes"]}, OPT_OUT_RULE],
        ),
        (
            [{"property": "hs_email_optout", "withdrawn": []}],  # the default, switched off
            [{**OPT_OUT_RULE, "withdrawn": []}],
        ),
    ],
    ids=["default", "empty list", "own rules keep the opt-out", "a rule for hs_email_optout replaces it"],
)
def test_consent_config_keeps_hubspots_opt_out_unless_told(
    given: list[dict[str, Any]] | None, expected: list[dict[str, Any]]
) -> None:
    assert consent_rules(given) == expected


@pytest.mark.parametrize(
    ("given", "reason"),
    [
        ({"property": "optout,email"}, "internal name"),
        ({"property": "newsletter", "granted": ["Yes"], "withdrawn": ["yes "]}, "cannot both grant and withdraw"),
        ({"property": "newsletter", "channel": "E-mail"}, "should match pattern"),
        ({"property": "newsletter", "granted_when": "true"}, r"consent\.0\.granted_when\s+Extra inputs"),
        ({"channel": "email"}, "property\n  Field required"),
    ],
)
def test_consent_config_refuses_what_it_cannot_read(given: dict[str, Any], reason: str) -> None:
    with pytest.raises(ValidationError, match=reason):
        consent_rules([given])


def test_consent_config_refuses_a_property_twice_on_one_channel() -> None:
    with pytest.raises(ValidationError, match="listed twice"):
        consent_rules([{"property": "newsletter", "granted": ["true"]}, {"property": "newsletter"}])


async def test_a_switched_off_opt_out_is_neither_asked_for_nor_read(api: FakeHubSpot) -> None:
    api.objects["contacts", "501"] = record(hs_email_optout=[("true", at(-3600))])
    src = source(api_base=api.url, consent=[{"property": "hs_email_optout"}])
    await src.start()
    try:
        [event] = await src.normalize(raw(json.dumps([creation(at(60))]).encode()))
    finally:
        await src.close()
    assert event.contact.consent == {}
    assert "propertiesWithHistory" not in api.seen[0][1]


# -- API failures ------------------------------------------------------------------------------------

ONE_CONTACT = b'[{"subscriptionType": "contact.creation", "objectId": 201, "occurredAt": 1773478800000}]'
API_FAILURES: list[tuple[str, Reply, type[Exception], str, float | None]] = [
    ("429 Retry-After", (429, {"Retry-After": "120"}, json.dumps(TEN_SECONDLY)), RetryLater, "TEN_SECONDLY", 120.0),
    (
        "429 rolling window headers",
        (429, {**RATE_OK, "X-HubSpot-RateLimit-Remaining": "0"}, json.dumps(TEN_SECONDLY)),
        RetryLater,
        "rate limit",
        10.0,
    ),
    (
        "429 daily limit",
        (429, {"X-HubSpot-RateLimit-Daily-Remaining": "0"}, json.dumps(DAILY)),
        RetryLater,
        "daily",
        3600.0,
    ),
    ("429 Retry-After date", (429, {"Retry-After": "Sat, 14 Mar 2026 09:07:00 GMT"}, ""), RetryLater, "429", 120.0),
    ("429 nothing said", (429, {}, ""), RetryLater, "429", None),
    ("503 Retry-After", (503, {"Retry-After": "30"}, "upstream"), RetryLater, "503: upstream", 30.0),
    ("502 html", (502, {}, "<html>Bad gateway</html>"), RetryLater, "502", None),
    ("423 locked", (423, {}, ""), RetryLater, "423", None),
    ("401", (401, {}, json.dumps(UNAUTHORIZED)), RetryLater, "app_token.*INVALID_AUTHENTICATION", None),
    ("403", (403, {}, '{"status": "error", "message": "missing scopes"}'), RetryLater, "missing scopes", None),
    ("200 not JSON", (200, {}, "<html>maintenance</html>"), RetryLater, "JSON object", None),
    ("400", (400, {}, '{"message": "bad request", "category": "VALIDATION_ERROR"}'), MalformedPayload, "400", None),
]


@pytest.mark.parametrize(("case", "reply", "error", "reason", "after"), API_FAILURES, ids=[f[0] for f in API_FAILURES])
async def test_api_failures(
    crm: HubSpot, api: FakeHubSpot, case: str, reply: Reply, error: type[Exception], reason: str, after: float | None
) -> None:
    api.replies.append(reply)
    with pytest.raises(error, match=reason) as caught:
        await crm.normalize(raw(ONE_CONTACT))
    if isinstance(caught.value, RetryLater):
        assert caught.value.after == after


async def test_an_unreachable_api_is_retried_later() -> None:
    src = source(api_base="http://127.0.0.1:1")
    await src.start()
    try:
        with pytest.raises(RetryLater, match="unreachable"):
            await src.normalize(raw(ONE_CONTACT))
    finally:
        await src.close()


async def test_a_used_up_window_pauses_and_the_retry_resumes_where_it_stopped(api: FakeHubSpot) -> None:
    clock = FakeClock(NOW)
    src = source(api_base=api.url, clock=clock)
    await src.start()
    api.objects["contacts", "206"] = {"id": "206", "properties": {"email": "noah@example.org"}}
    api.replies.append(
        (200, {**RATE_OK, "X-HubSpot-RateLimit-Remaining": "0"}, fixture("api_contact_201.json").decode())
    )
    body = json.dumps([{"subscriptionType": "contact.creation", "objectId": i} for i in (201, 206)]).encode()
    try:
        with pytest.raises(RetryLater, match="window used up") as caught:
            await src.normalize(raw(body))
        assert caught.value.after == 10.0 and api.paths == ["/crm/v3/objects/contacts/201"]
        clock.advance(timedelta(seconds=10))
        events = await src.normalize(raw(body))
    finally:
        await src.close()
    assert [e.contact.email for e in events] == ["lea.moreau@example.org", "noah@example.org"]
    assert api.paths == ["/crm/v3/objects/contacts/201", "/crm/v3/objects/contacts/206"]


# -- the shared sample payloads --------------------------------------------------------------------


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared sample payloads not present")
async def test_shared_node_sdk_batch_verifies_byte_for_byte_and_normalises() -> None:
    body = (SHARED / "contact_creation_batch.raw.json").read_bytes()
    headers = {"X-HubSpot-Signature": V1[1][2], "X-HubSpot-Signature-Version": "v1"}
    await sdk_source().verify(request(headers, "/webhook_uri"), body)
    [event] = await source(token=None).normalize(raw(body))
    assert (event.type, event.contact.external_ids, event.correlation) == (
        "contact.created",
        {"hubspot": "123"},
        ["hubspot-contact:123"],
    )
    assert event.occurred_at == datetime(2019, 7, 26, 4, 0, tzinfo=UTC)


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared sample payloads not present")
async def test_shared_docs_example_with_eventtype_keys_normalises() -> None:
    body = (SHARED / "docs_example_batch.json").read_bytes()
    events = await source(token=None).normalize(raw(body))
    assert [(e.type, e.contact.external_ids["hubspot"]) for e in events] == [
        ("contact.property_changed", "1246965"),
        ("contact.created", "1246978"),
    ]
    assert events[0].properties | {"number": None} == {
        "object_id": "1246965",
        "portal_id": 33,
        "change_source": "ACADEMY",
        "object_missing": True,
        "name": "lifecyclestage",
        "value": "subscriber",
        "number": None,
    }


# -- end to end: real HTTP, the worker, the database -------------------------------------------------


@dataclass
class Hub:
    client: TestClient
    gateway: RunningGateway
    clock: FakeClock
    api: FakeHubSpot

    async def post(self, body: bytes, headers: dict[str, str] | None = None) -> Any:
        response = await self.client.post("/hooks/crm", data=body, headers=headers or self.signed(body))
        return response.status, await response.json()

    def signed(self, body: bytes) -> dict[str, str]:
        return v3_headers(body, stamp=now_ms(self.clock.now()))

    async def advance(self, **delta: float) -> None:
        self.clock.advance(timedelta(**delta))
        await self.gateway.worker.drain()

    def rows(self, sql: str) -> list[Any]:
        with self.gateway.db.engine.connect() as conn:
            return [tuple(r) for r in conn.exec_driver_sql(sql)]


@pytest.fixture
async def hub(aiohttp_client: Any, tmp_path: Path, db_url: str, smtp: SmtpCatcher, api: FakeHubSpot) -> Hub:
    pm = get_plugin_manager()  # the hubspot plugin comes in through its entry point
    config = f"""\
public_url: {PUBLIC}
storage: {{url: '{db_url}'}}
worker: {{retry_base: 10s, max_attempts: 3}}
sources:
  crm:
    plugin: hubspot
    client_secret: {SECRET}
    app_token: {TOKEN}
    properties: [hubspotscore]
    api_base: '{api.url}'
sinks:
  email: {{plugin: smtp, host: 127.0.0.1, port: {smtp.port}, tls: none, sender: shop@example.com}}
rules:
  - name: welcome
    when: contact.created
    kind: transactional
    send: {{via: email, template: welcome}}
  - name: hot-lead
    when: contact.property_changed
    if: "event.properties.name == 'hubspotscore' and (event.properties.number or 0) >= 50"
    kind: transactional
    send: {{via: email, template: hot}}
"""
    templates = {
        "welcome.subject.j2": "Bienvenue {{ contact.first_name }}",
        "welcome.txt.j2": "Bonjour",
        "hot.subject.j2": "Score {{ event.properties.number }}",
        "hot.txt.j2": "Hot",
    }
    settings = load_config(write_deployment(tmp_path, config, templates), collect(pm), pm)
    clock = FakeClock(NOW)
    app = create_app(settings, pm=pm, clock=clock, role="web")
    return Hub(await aiohttp_client(app), app[GATEWAY_KEY], clock, api)


async def test_webhooks_become_contacts_events_and_mail(hub: Hub, smtp: SmtpCatcher) -> None:
    assert (await hub.post(BODY))[1]["status"] == "accepted"
    retried = json.dumps([{**item, "attemptNumber": 1} for item in json.loads(BODY)]).encode()
    assert (await hub.post(retried))[1]["status"] == "duplicate"
    await hub.gateway.worker.drain()
    assert hub.rows("SELECT type FROM events ORDER BY occurred_at") == [
        ("contact.created",),
        ("contact.property_changed",),
        ("contact.erased",),
        ("contact.deleted",),
        ("contact.merged",),
    ]
    [(contact_id, first_name, attributes)] = hub.rows(
        "SELECT id, first_name, attributes FROM contacts WHERE email = 'lea.moreau@example.org'"
    )
    assert first_name == "Léa" and json.loads(attributes) == {"lifecyclestage": "lead", "hubspotscore": "55"}
    assert hub.rows(
        f"SELECT kind, value FROM identities WHERE contact_id = {contact_id} AND kind != 'declic' ORDER BY kind"
    ) == [
        ("email", "lea.moreau@example.org"),
        ("hubspot", "201"),
        ("phone", "+33612345678"),
    ]
    assert sorted(m["Subject"] for m in smtp.to("lea.moreau@example.org")) == ["Bienvenue Léa", "Score 55"]
    assert "/crm/v3/objects/contacts/202" not in hub.api.paths  # a privacy deletion is never read

    # Deals arrive v1-signed (the Webhooks API's own version) and land on the same person.
    deals = fixture("deal_notifications.json")
    assert (await hub.post(deals, v1_headers(deals)))[0] == 200
    await hub.gateway.worker.drain()
    assert hub.rows(
        "SELECT type, contact_id FROM events WHERE type IN ('deal.created', 'deal.stage_changed') ORDER BY occurred_at"
    ) == [
        ("deal.created", contact_id),
        ("deal.stage_changed", contact_id),
    ]


async def test_a_privacy_deletion_erases_the_person_and_late_news_brings_nothing_back(hub: Hub) -> None:
    def notification(kind: str, event_id: int) -> bytes:
        item = {"subscriptionType": kind, "objectId": 201, "eventId": event_id, "portalId": 8, "subscriptionId": 2}
        return json.dumps([{**item, "occurredAt": 1773478800000 + event_id}]).encode()

    await hub.post(notification("contact.creation", 1))
    await hub.gateway.worker.drain()
    del hub.api.objects["contacts", "201"]  # HubSpot has erased the record by the time it tells us
    await hub.post(notification("contact.privacyDeletion", 2))
    await hub.gateway.worker.drain()
    assert hub.rows("SELECT email, first_name, email_status FROM contacts") == [(None, None, "erased")]
    await hub.post(notification("contact.propertyChange", 3).replace(b"}]", b', "propertyName": "phone"}]'))
    await hub.gateway.worker.drain()  # delivered late, out of order: the fetch finds nothing (404)
    # The erased row is never found again; the late news starts a contact that knows only HubSpot's id.
    assert hub.rows("SELECT email, phone, first_name, email_status FROM contacts ORDER BY email_status") == [
        (None, None, None, "erased"),
        (None, None, None, "ok"),
    ]
    [(fresh,)] = hub.rows("SELECT id FROM contacts WHERE email_status = 'ok'")
    assert hub.rows("SELECT contact_id, kind, value FROM identities WHERE kind != 'declic'") == [
        (fresh, "hubspot", "201")
    ]


@pytest.mark.parametrize("status", [401, 404])
async def test_bad_signatures_store_nothing(hub: Hub, status: int) -> None:
    headers = v3_headers(BODY, secret="wrong") if status == 401 else hub.signed(BODY)
    path = "/hooks/crm" if status == 401 else "/hooks/nope"
    response = await hub.client.post(path, data=BODY, headers=headers)
    assert response.status == status
    assert hub.rows("SELECT count(*) FROM inbox") == [(0,)]


async def test_rate_limits_are_waited_out_then_the_call_is_processed(hub: Hub) -> None:
    hub.api.replies += [
        (429, {**RATE_OK, "X-HubSpot-RateLimit-Remaining": "0", "Retry-After": "120"}, json.dumps(TEN_SECONDLY)),
        (503, {}, "upstream timeout"),
    ]
    await hub.post(BODY)
    await hub.gateway.worker.drain()
    assert hub.rows("SELECT status, last_error FROM jobs WHERE kind = 'inbox'") == [
        ("pending", "HubSpot rate limit (429): TEN_SECONDLY_ROLLING: You have reached your ten_secondly_rolling limit.")
    ]
    await hub.advance(seconds=100)  # Retry-After: 120 wins over the 10 s backoff
    assert hub.rows("SELECT count(*) FROM events") == [(0,)] and len(hub.api.seen) == 1
    await hub.advance(seconds=21)
    assert hub.rows("SELECT last_error FROM jobs WHERE kind = 'inbox'") == [("HubSpot answered 503: upstream timeout",)]
    await hub.advance(seconds=60)
    assert hub.rows("SELECT status FROM inbox") == [("processed",)]
    assert hub.rows("SELECT count(*) FROM events") == [(5,)]


async def test_a_revoked_token_ends_in_the_dead_letter_with_the_call_kept(hub: Hub) -> None:
    hub.api.replies += [(401, {}, json.dumps(UNAUTHORIZED))] * 5
    await hub.post(ONE_CONTACT_SIGNED_BODY)
    for _ in range(4):
        await hub.advance(minutes=5)
    [(status, error)] = hub.rows("SELECT status, last_error FROM jobs WHERE kind = 'inbox'")
    assert status == "dead" and "refused the app_token (401)" in error
    assert hub.rows("SELECT status, body FROM inbox") == [("received", ONE_CONTACT_SIGNED_BODY)]


ONE_CONTACT_SIGNED_BODY = (
    b'[{"eventId": 9, "subscriptionId": 1, "portalId": 8, "occurredAt": 1773478800000,'
    b' "subscriptionType": "contact.creation", "objectId": 201}]'
)

# -- end to end: HubSpot's consent against Shopify's and Declic's own unsubscribe ----------------------

SHOP_AND_CRM = """\
public_url: {public}
storage: {{url: '{db_url}'}}
policies: {{consent: {{email: required}}}}
sources:
  shop: {{plugin: shopify, secret: {shop_secret}}}
  crm:
    plugin: hubspot
    client_secret: {secret}
    app_token: {token}
    api_base: '{api}'
    consent:
      - {{property: newsletter_opt_in, granted: ['true'], withdrawn: ['false']}}
sinks:
  email: {{plugin: smtp, host: 127.0.0.1, port: {smtp_port}, tls: none, sender: shop@example.com}}
rules:
  - name: abandoned-cart
    when: checkout.started
    steps:
      - wait: 1h
        send: {{via: email, template: cart-reminder}}
"""


class ConsentDeployment(Running):
    async def post_hubspot(self, *items: dict[str, Any]) -> None:
        body = json.dumps(list(items)).encode()
        headers = v3_headers(body, stamp=now_ms(self.clock.now()))
        response = await self.client.post("/hooks/crm", data=body, headers=headers)
        assert response.status == 200, await response.text()

    def email_consent(self) -> str:
        [(consent,)] = self.rows("SELECT consent FROM contacts WHERE email = :email", email=CAMILLE)
        return str(json.loads(consent)["email"]["state"])

    def ledger(self) -> list[tuple[str, str, bool]]:
        rows = self.rows("SELECT source, state, applied FROM consents WHERE channel = 'email' ORDER BY id")
        return [(r.source, r.state, bool(r.applied)) for r in rows]


@pytest.fixture
async def shop_and_crm(
    aiohttp_client: Any, tmp_path: Path, db_url: str, smtp: SmtpCatcher, api: FakeHubSpot
) -> ConsentDeployment:
    text = SHOP_AND_CRM.format(
        public=PUBLIC,
        db_url=db_url,
        shop_secret=SHOP_SECRET,
        secret=SECRET,
        token=TOKEN,
        api=api.url,
        smtp_port=smtp.port,
    )
    settings, pm, _ = load(str(write_deployment(tmp_path, text, TEMPLATES)))
    clock = FakeClock(datetime(2026, 3, 14, 8, 0, tzinfo=UTC))
    app = create_app(settings, pm=pm, clock=clock, role="web")
    return ConsentDeployment(await aiohttp_client(app), app[GATEWAY_KEY], clock, tmp_path)


def checkout(token: str, *, consent: bool = True) -> bytes:
    """Camille's checkout; her customer record says `subscribed` as of 2 January, or nothing at all."""
    body = fixture_json("shopify/checkout.json")
    body.update(token=token, id=abs(hash(token)) % 10**9)
    if not consent:
        del body["customer"]["email_marketing_consent"]
    return json.dumps(body).encode()


@pytest.mark.parametrize("told_by", ["a property change", "the record fetched for another change"])
async def test_a_hubspot_opt_out_after_a_shopify_opt_in_blocks_marketing(
    shop_and_crm: ConsentDeployment, api: FakeHubSpot, smtp: SmtpCatcher, told_by: str
) -> None:
    d = shop_and_crm
    await d.post_shopify("checkouts/create", checkout("first"))
    await d.advance(seconds=1)
    assert d.email_consent() == "granted"
    opted_out = d.clock.now()
    api.objects["contacts", "501"] = record(hs_email_optout=[("true", opted_out), ("false", at(-86400 * 30))])
    if told_by == "a property change":
        await d.post_hubspot(change("hs_email_optout", "true", opted_out))
    else:
        await d.post_hubspot(change("lifecyclestage", "customer", opted_out + timedelta(minutes=5)))
    await d.advance(hours=1, seconds=1)
    assert smtp.messages == [], "the cart reminder went to a contact who opted out in HubSpot"
    assert d.email_consent() == "withdrawn"
    assert d.rows("SELECT count(*) FROM contacts")[0][0] == 1
    assert d.ledger() == [("shop", "granted", True), ("crm", "withdrawn", True)]
    [(evidence, stated_at, action)] = d.rows("SELECT evidence, stated_at, action FROM consents WHERE source = 'crm'")
    shown = {"property": "hs_email_optout", "value": "true", "portal_id": PORTAL, "object_id": "501"}
    shown["event"] = "contact.property_changed"  # the ledger's own, like `ledger_own` below
    if told_by == "a property change":
        shown |= {"change_source": "EMAIL", "event_id": ANY}
    else:
        shown |= {"source_type": "EMAIL"}  # the property history's sourceType
    ledger_own = ("occurred_at", "inbox_id", "webhook_id")
    assert {key: value for key, value in json.loads(evidence).items() if key not in ledger_own} == shown
    assert bool(action) and _utc(stated_at) == opted_out
    assert d.rows("SELECT reason FROM decisions WHERE action = 'suppressed'") == [
        ("no email consent (state: withdrawn)",)
    ]


@pytest.mark.parametrize("withdrawn_by", ["the one-click unsubscribe", "HubSpot's opt-out"])
async def test_an_older_hubspot_state_arriving_late_does_not_undo_a_newer_withdrawal(
    shop_and_crm: ConsentDeployment, api: FakeHubSpot, smtp: SmtpCatcher, withdrawn_by: str
) -> None:
    d = shop_and_crm
    signed_up = d.clock.now() - timedelta(minutes=10)
    api.objects["contacts", "501"] = record(newsletter_opt_in=[("true", signed_up)])
    await d.post_hubspot(change("newsletter_opt_in", "true", signed_up))
    await d.post_shopify("checkouts/create", checkout("first", consent=False))
    await d.advance(hours=1, seconds=1)
    assert len(smtp.messages) == 1, "HubSpot's opt-in should have allowed the cart reminder"

    history: dict[str, list[tuple[str, datetime]]] = {}
    if withdrawn_by == "the one-click unsubscribe":
        link = str(smtp.messages[-1]["List-Unsubscribe"]).strip()[1:-1]
        response = await d.client.post(urlsplit(link).path, data={"List-Unsubscribe": "One-Click"})
        assert response.status == 200
    else:
        history["hs_email_optout"] = [("true", d.clock.now())]
        api.objects["contacts", "501"] = record(newsletter_opt_in=[("true", signed_up)], **history)
        await d.post_hubspot(change("hs_email_optout", "true", d.clock.now()))
    await d.advance(seconds=1)
    assert d.email_consent() == "withdrawn"

    # A form filled in before the withdrawal, which HubSpot delivers only now (it does not keep order).
    resubmitted = signed_up + timedelta(minutes=30)
    api.objects["contacts", "501"] = record(newsletter_opt_in=[("true", resubmitted), ("true", signed_up)], **history)
    await d.post_hubspot(change("newsletter_opt_in", "true", resubmitted))
    await d.post_shopify("checkouts/create", checkout("second", consent=False))
    await d.advance(hours=2)
    assert d.email_consent() == "withdrawn"
    assert len(smtp.messages) == 1, "the late HubSpot state brought marketing back after a withdrawal"
    source, state, applied = d.ledger()[-1]
    assert (source, applied) == ("crm", False)
    assert state == ("granted" if withdrawn_by == "the one-click unsubscribe" else "withdrawn")


def _utc(value: Any) -> datetime:
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


# -- property: whatever arrives, the answer is 2xx or 4xx ------------------------------------------

HEADER_NAMES = [
    "X-HubSpot-Signature",
    "X-HubSpot-Signature-Version",
    "X-HubSpot-Signature-v3",
    "X-HubSpot-Request-Timestamp",
    "Content-Type",
]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)
NOTIFICATION_KEYS = ["subscriptionType", "eventType", "objectId", "occurredAt", "eventId", "portalId"]
NOTIFICATIONS = st.lists(
    st.dictionaries(
        st.sampled_from([*NOTIFICATION_KEYS, "propertyName", "propertyValue", "mergedObjectIds"]),
        JSON_VALUES | st.sampled_from(["contact.creation", "deal.creation", "contact.merge"]),
    ),
    max_size=4,
).map(lambda items: json.dumps(items).encode())


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    headers=st.dictionaries(
        st.sampled_from(HEADER_NAMES), st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)
    ),
    body=st.binary(max_size=200) | NOTIFICATIONS,
    signing=st.sampled_from(["none", "v1", "v2", "v3"]),
)
async def test_any_call_gets_a_2xx_or_4xx(hub: Hub, headers: dict[str, str], body: bytes, signing: str) -> None:
    if signing == "v1":
        headers = {**headers, **v1_headers(body)}
    elif signing == "v2":
        given = signature_v2(SECRET.encode(), "POST", PUBLIC + "/hooks/crm", body)
        headers = {**headers, "X-HubSpot-Signature": given, "X-HubSpot-Signature-Version": "v2"}
    elif signing == "v3":
        headers = {**headers, **hub.signed(body)}
    response = await hub.client.post("/hooks/crm", data=body, headers=headers)
    assert 200 <= response.status < 500, await response.text()


def test_a_call_says_which_contacts_it_is_about_without_asking_hubspot() -> None:
    """While a call waits for HubSpot, only these contacts' messages wait for it (worker.ordering_timeout)."""
    crm = source()  # api_base on a closed port: anything fetched would fail
    base = {"portalId": 62515, "subscriptionId": 1, "occurredAt": 1}
    contacts = [
        {**base, "eventId": 1, "subscriptionType": "contact.propertyChange", "objectId": 501},
        {
            **base,
            "eventId": 2,
            "subscriptionType": "contact.merge",
            "objectId": 502,
            "primaryObjectId": 502,
            "mergedObjectIds": [503],
            "newObjectId": 504,
        },
        {**base, "eventId": 3, "subscriptionType": "company.creation", "objectId": 9},
    ]
    named = crm.about(raw(json.dumps(contacts).encode()))
    assert named is not None
    assert [ref.external_ids["hubspot"] for ref in named] == ["501", "502", "504", "503"]
    # A deal's contact is known only once the deal is fetched: the call may be about anyone.
    deal = {**base, "eventId": 4, "subscriptionType": "deal.creation", "objectId": 301}
    assert crm.about(raw(json.dumps([*contacts, deal]).encode())) is None
    assert crm.about(raw(b"not json")) is None
