"""Twilio SMS sink against a local server that answers as Twilio's Messages API does.

Twilio's contract, as the tests reproduce it:
- `POST /2010-04-01/Accounts/{AccountSid}/Messages.json`, form-encoded, HTTP Basic AccountSid:AuthToken;
  201 with the Message resource (twilio-python `rest/api/v2010/account/message/__init__.py`,
  `tests/unit/base/test_version.py` mocks `Response(201, '{"sid": "MM123", ...}')` for that URL).
- Errors: `{"code", "message", "more_info", "status"}` (twilio-python `twilio/base/version.py` reads
  `message` and `code`; `twilio/base/exceptions.py` builds more_info as https://www.twilio.com/docs/errors/<code>),
  or RFC 9457 `{type, title, status, code, detail}` (`TwilioServiceException` in the same file).
- 20429 / HTTP 429: "never processed and always safe to retry" (twilio.com/docs/errors/20429);
  21211 invalid To, 21614 not a mobile number, 21610 recipient replied STOP, 20003 authentication
  (twilio.com/docs/api/errors/<code>).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest.mock import ANY
from urllib.parse import urlencode

import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestServer
from pydantic import SecretStr, ValidationError

from conftest import fixture_json
from declic_gateway import ConfigError, Message, Outcome, SendContext
from declic_gateway.config import load_config
from declic_gateway.http.app import create_app
from declic_gateway.http.running import GATEWAY_KEY
from declic_gateway.kit.net import retry_after
from declic_gateway.kit.sources import Deployment
from declic_gateway.plugins import collect, get_plugin_manager
from declic_gateway.testing import FakeClock, ScriptedPlugin, free_port, shopify_headers, write_deployment
from declic_plugins.twilio import (
    InvalidNumber,
    TwilioConfig,
    TwilioSink,
    UnknownCountry,
    region_of,
    segments,
    to_e164,
)

ACCOUNT = "AC" + "a" * 32  # the shape twilio-python's own tests use ("ACaaaa...")
TOKEN = "auth-token-for-tests"
SERVICE = "MG" + "b" * 32
SID = "SM" + "0123456789abcdef" * 2
NOW = datetime(2026, 3, 14, 8, 0, tzinfo=UTC)
PATH = f"/2010-04-01/Accounts/{ACCOUNT}/Messages.json"
CAMILLE = {"phone": "06 12 34 56 78", "attributes": {"country": "FR"}, "first_name": "Camille"}
CTX = SendContext(rule="order-sms", step=1, kind="transactional", contact=CAMILLE, event={})


def message(to: str = "+33612345678", text: str = "Votre commande est en route") -> Message:
    return Message(to=to, text=text, idempotency_key="dcl-abc123")


def created(sid: str = SID, body: str = "Votre commande est en route") -> bytes:
    """The 201 body, trimmed: the Message resource as twilio-python's MessageInstance reads it."""
    return json.dumps(
        {"sid": sid, "account_sid": ACCOUNT, "to": "+33612345678", "from": "+33700000000", "body": body,
         "status": "queued", "num_segments": "1", "direction": "outbound-api", "error_code": None,
         "error_message": None, "uri": f"/2010-04-01/Accounts/{ACCOUNT}/Messages/{sid}.json"}
    ).encode()  # fmt: skip


def error(code: int, text: str, status: int = 400) -> bytes:
    return json.dumps(
        {"code": code, "message": text, "more_info": f"https://www.twilio.com/docs/errors/{code}", "status": status}
    ).encode()


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    form: dict[str, list[str]]


@dataclass
class FakeTwilio:
    """Records each request; answers with `replies` in turn, the last one repeating."""

    server: TestServer
    replies: list[tuple[int, bytes, dict[str, str]]] = field(default_factory=lambda: [(201, created(), {})])
    requests: list[Received] = field(default_factory=list)
    hang: bool = False
    release: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def base(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    async def handle(self, request: web.Request) -> web.Response:
        form = await request.post()
        self.requests.append(
            Received(
                request.method,
                request.path,
                dict(request.headers),
                {k: [str(v) for v in form.getall(k)] for k in set(form.keys())},
            )
        )
        if self.hang:
            await asyncio.wait_for(self.release.wait(), 10)
        status, body, headers = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        kind = "application/json" if body[:1] in (b"{", b"[") else "text/html"
        return web.Response(status=status, body=body, headers=headers, content_type=kind)


@pytest.fixture
async def twilio() -> AsyncIterator[FakeTwilio]:
    app = web.Application()
    server = TestServer(app, host="127.0.0.1")
    fake = FakeTwilio(server)
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    await server.start_server()
    yield fake
    fake.release.set()
    await server.close()


Make = Callable[..., TwilioSink]


@pytest.fixture
async def make(twilio: FakeTwilio) -> AsyncIterator[Make]:
    sinks: list[TwilioSink] = []

    def build(public_url: str | None = None, **options: Any) -> TwilioSink:
        settings = {
            "account_sid": ACCOUNT,
            "auth_token": TOKEN,
            "sender": "+33700000000",
            "default_region": "FR",
            "api_base": twilio.base,
            "timeout": 2,
            **options,
        }
        sink = TwilioSink("sms", TwilioConfig.model_validate(settings), Deployment(public_url, "UTC", FakeClock(NOW)))
        sinks.append(sink)
        return sink

    yield build
    for sink in sinks:
        await sink.close()


# --- segments: pure, and checked against Twilio's own calculator ---------------------------------------------

DIGITS = "0123456789"
# (case, text, encoding, segments). The first six are the vectors of TwilioDevEd/message-segment-calculator
# tests/index.test.js and tests/segments.test.js, built here from parts (each equals the published literal).
SEGMENTS = [
    ("twilio: escape char, one segment", "{23456789" + DIGITS * 15, "GSM-7", 1),
    ("twilio: escape char, two segments", "{23456789" + DIGITS * 15 + "0", "GSM-7", 2),
    ("twilio: UCS-2, one segment", "😜23456789" + DIGITS * 6, "UCS-2", 1),
    ("twilio: UCS-2, two segments", "😜23456789" + DIGITS * 6 + "0", "UCS-2", 2),
    ("twilio: GSM-7, last part holds 1 char", "1234567890" * 30 + "1234567", "GSM-7", 3),
    ("twilio: UCS-2, last part holds 1 char", "😜23456789" + DIGITS * 12 + "01234", "UCS-2", 3),
    ("empty", "", "GSM-7", 0),
    ("160 GSM-7 is one SMS", "a" * 160, "GSM-7", 1),
    ("161 GSM-7 is two parts", "a" * 161, "GSM-7", 2),
    ("306 GSM-7 is two parts of 153", "a" * 306, "GSM-7", 2),
    ("extension chars count twice", "€" * 80, "GSM-7", 1),
    ("81 euros are 162 septets", "€" * 81, "GSM-7", 2),
    ("an escape never straddles two parts", "a" * 152 + "€" + "a" * 152, "GSM-7", 3),
    ("capital Ç is GSM-7", "Ça arrive demain à 10h", "GSM-7", 1),
    ("lower-case ç is not", "Commande reçue", "UCS-2", 1),
    ("ê is not GSM-7", "Votre commande est prête", "UCS-2", 1),
    ("70 UCS-2 units is one SMS", "ê" * 70, "UCS-2", 1),
    ("71 is two parts", "ê" * 71, "UCS-2", 2),
    ("134 is two parts of 67", "ê" * 134, "UCS-2", 2),
    ("135 is three", "ê" * 135, "UCS-2", 3),
    ("an emoji never straddles two parts", "a" * 66 + "😀" + "a" * 66, "UCS-2", 3),
    ("newlines are GSM-7", "Bonjour\r\nà demain", "GSM-7", 1),
    ("ô is not", "à bientôt", "UCS-2", 1),
]


@pytest.mark.parametrize(("case", "text", "encoding", "count"), SEGMENTS, ids=[s[0] for s in SEGMENTS])
def test_segments(case: str, text: str, encoding: str, count: int) -> None:
    assert segments(text) == (encoding, count)


# --- phone numbers --------------------------------------------------------------------------------------------

# (raw, region, E.164 or the exception)
NUMBERS: list[tuple[str, str | None, str | type[Exception]]] = [
    ("+33 6 12 34 56 78", None, "+33612345678"),
    ("06 12 34 56 78", "FR", "+33612345678"),
    ("0033612345678", "FR", "+33612345678"),
    ("+33 6 12 34 56 78", "GB", "+33612345678"),  # a +code wins over the region
    ("07400 123456", "GB", "+447400123456"),
    ("650-253-0000", "US", "+16502530000"),
    ("0612345678", None, UnknownCountry),
    ("not a number", "FR", InvalidNumber),
    ("06 12", "FR", InvalidNumber),
    ("+33 1", None, InvalidNumber),
    ("+999 123456789", None, InvalidNumber),
    ("", "FR", InvalidNumber),
]


@pytest.mark.parametrize(("raw", "region", "expected"), NUMBERS)
def test_numbers_are_normalised_to_e164(raw: str, region: str | None, expected: str | type[Exception]) -> None:
    if isinstance(expected, str):
        assert to_e164(raw, region) == expected
    else:
        with pytest.raises(expected):
            to_e164(raw, region)


@pytest.mark.parametrize(
    ("contact", "region"),
    [
        ({"attributes": {"country": "GB"}}, "GB"),
        ({"attributes": {"country": " gb "}}, "GB"),
        ({"attributes": {"country": "Narnia"}}, "FR"),
        ({"attributes": {"country": 33}}, "FR"),
        ({"attributes": {}}, "FR"),
        ({}, "FR"),
    ],
)
def test_the_contacts_country_wins_over_the_default_region(contact: dict[str, Any], region: str) -> None:
    assert region_of(contact, "FR") == region


async def test_address_is_e164_or_as_written(make: Make) -> None:
    sink = make()
    assert sink.address(CAMILLE) == "+33612345678"
    assert sink.address({"phone": "07400 123456", "attributes": {"country": "GB"}}) == "+447400123456"
    assert sink.address({"phone": " 06 12 "}) == "06 12"  # send() reports it invalid
    assert sink.address({"phone": None}) is None
    assert sink.address({"phone": "  "}) is None


# --- what Twilio answers, and what it becomes ----------------------------------------------------------------

TO = ("+33612345678",)
TRIAL = "The number is unverified. Trial accounts cannot send messages to unverified numbers"
PROBLEM = {"type": "https://www.twilio.com/docs/errors/21604", "title": "Bad request", "status": 400, "code": 21604}
PROBLEM_DETAIL = json.dumps({**PROBLEM, "detail": "A 'To' phone number is required."}).encode()
PROBLEM_NUMBER = json.dumps(
    {
        "type": "https://www.twilio.com/docs/errors/21211",
        "title": "Invalid 'To' Phone Number",
        "status": 400,
        "code": 21211,
    }
).encode()
DATE = {"Retry-After": "Sat, 14 Mar 2026 08:02:00 GMT"}  # two minutes after NOW
PERMANENT, RETRY, INVALID = Outcome.PERMANENT, Outcome.RETRY, Outcome.ADDRESS_INVALID

# fmt: off
# (case, Twilio's status, body, headers, outcome, retry_after, text in the error, invalid addresses)
REPLIES: list[tuple[str, int, bytes, dict[str, str], Outcome, float | None, str, tuple[str, ...]]] = [
    ("201 created", 201, created(), {}, Outcome.SENT, None, "", ()),
    ("21211 invalid To", 400, error(21211, "The 'To' number +33612345678 is not a valid phone number."), {},
     INVALID, None, "Twilio 21211 (HTTP 400)", TO),
    ("21614 not a mobile", 400, error(21614, "'To' number is not a valid mobile number"), {},
     INVALID, None, "Twilio 21614", TO),
    ("21610 replied STOP", 400, error(21610, "Attempt to send to unsubscribed recipient"), {},
     Outcome.OPTED_OUT, None, "opted out (replied STOP)", ()),
    ("20003 bad credentials", 401, error(20003, "Authenticate", 401), {},
     PERMANENT, None, "check account_sid and auth_token", ()),
    ("401 without a body", 401, b"", {}, PERMANENT, None, "check account_sid and auth_token", ()),
    ("21608 trial account", 400, error(21608, TRIAL), {}, PERMANENT, None, "Twilio 21608", ()),
    ("20429 with Retry-After seconds", 429, error(20429, "Too Many Requests", 429), {"Retry-After": "7"},
     RETRY, 7.0, "Twilio 20429 (HTTP 429)", ()),
    ("bare 429", 429, b"", {}, RETRY, None, "HTTP 429", ()),
    ("503 with Retry-After as a date", 503, b"<html>Service Unavailable</html>", DATE, RETRY, 120.0, "HTTP 503", ()),
    ("500 with a JSON error", 500, error(20500, "Internal Server Error", 500), {}, RETRY, None, "20500", ()),
    ("RFC 9457 problem", 400, PROBLEM_DETAIL, {},
     PERMANENT, None, "Twilio 21604 (HTTP 400): A 'To' phone number is required.", ()),
    ("RFC 9457 problem about the number", 400, PROBLEM_NUMBER, {}, INVALID, None, "Invalid 'To' Phone Number", TO),
    ("400 that is not JSON", 400, b"<html>Bad Request</html>", {}, PERMANENT, None, "no Twilio error body", ()),
    ("201 that is not JSON", 201, b"<html>ok</html>", {}, PERMANENT, None, "without a message sid", ()),
    ("201 without a sid", 201, b'{"status": "queued"}', {}, PERMANENT, None, "may have gone out", ()),
    ("201 with a JSON array", 201, b"[]", {}, PERMANENT, None, "without a message sid", ()),
    ("a redirect is not followed", 302, b"", {"Location": "/elsewhere"}, PERMANENT, None, "HTTP 302", ()),
]
# fmt: on


@pytest.mark.parametrize(
    ("case", "status", "body", "headers", "outcome", "after", "text", "invalid"), REPLIES, ids=[r[0] for r in REPLIES]
)
async def test_twilio_answers(
    twilio: FakeTwilio,
    make: Make,
    case: str,
    status: int,
    body: bytes,
    headers: dict[str, str],
    outcome: Outcome,
    after: float | None,
    text: str,
    invalid: tuple[str, ...],
) -> None:
    twilio.replies = [(status, body, headers)]
    result = await make().send(message(), CTX)
    assert result.outcome is outcome
    assert text in (result.error or "")
    assert result.retry_after == after
    assert result.invalid_addresses == invalid
    assert result.provider_id == (SID if outcome is Outcome.SENT else None)
    assert len(twilio.requests) == 1


async def test_the_request_twilio_receives(twilio: FakeTwilio, make: Make) -> None:
    text = "Merci Camille ! Votre commande est prête 🎉"
    result = await make(status_callback="https://hooks.example.com/hooks/sms-status").send(message(text=text), CTX)
    assert result.outcome is Outcome.SENT
    [request] = twilio.requests
    assert (request.method, request.path) == ("POST", PATH)
    assert request.headers["Authorization"] == "Basic " + base64.b64encode(f"{ACCOUNT}:{TOKEN}".encode()).decode()
    assert request.headers["Content-Type"].startswith("application/x-www-form-urlencoded")
    assert request.form == {
        "To": ["+33612345678"],
        "From": ["+33700000000"],
        "Body": [text],
        "StatusCallback": ["https://hooks.example.com/hooks/sms-status"],
    }
    # The Messages API has no idempotency key: nothing of ours rides along to pretend otherwise.
    assert not any("idempotency" in name.lower() for name in request.headers)


async def test_a_messaging_service_replaces_from(twilio: FakeTwilio, make: Make) -> None:
    await make(sender=None, messaging_service_sid=SERVICE).send(message(), CTX)
    [request] = twilio.requests
    assert request.form == {
        "To": ["+33612345678"],
        "MessagingServiceSid": [SERVICE],
        "Body": ["Votre commande est en route"],
    }


async def test_a_status_callback_can_name_a_source(twilio: FakeTwilio, make: Make) -> None:
    sink = make(public_url="https://hooks.example.com/", status_callback="sms-status")
    await sink.start()
    assert sink.callback_url == "https://hooks.example.com/hooks/sms-status"
    await sink.send(message(), CTX)
    assert twilio.requests[0].form["StatusCallback"] == ["https://hooks.example.com/hooks/sms-status"]


async def test_naming_a_source_without_public_url_stops_start_up(make: Make) -> None:
    with pytest.raises(ConfigError, match=r"sinks\.sms\.status_callback: naming the source 'sms-status' needs"):
        await make(status_callback="sms-status").start()


@pytest.mark.parametrize(
    ("contact", "to", "outcome", "text"),
    [
        (CAMILLE, "06 12", Outcome.ADDRESS_INVALID, "not a valid phone number"),
        (CAMILLE, "n/a", Outcome.ADDRESS_INVALID, "not a valid phone number"),
        ({"phone": "0612345678"}, "0612345678", Outcome.PERMANENT, "neither attributes.country nor default_region"),
    ],
)
async def test_a_number_that_cannot_be_read_never_reaches_twilio(
    twilio: FakeTwilio, make: Make, contact: dict[str, Any], to: str, outcome: Outcome, text: str
) -> None:
    ctx = SendContext(rule="r", step=1, kind="marketing", contact=contact, event={})
    result = await make(default_region=None).send(message(to=to), ctx)
    assert result.outcome is outcome and text in (result.error or "")
    assert result.invalid_addresses == ((to,) if outcome is Outcome.ADDRESS_INVALID else ())
    assert twilio.requests == []


async def test_an_empty_text_is_not_sent(twilio: FakeTwilio, make: Make) -> None:
    result = await make().send(message(text=" \n"), CTX)
    assert result.outcome is Outcome.PERMANENT and "empty" in (result.error or "")
    assert twilio.requests == []


async def test_twilio_not_answering_in_time_is_retried(twilio: FakeTwilio, make: Make) -> None:
    twilio.hang = True
    result = await make(timeout=0.2).send(message(), CTX)
    assert result.outcome is Outcome.RETRY and result.error == "Twilio did not answer within 0.2s"
    assert len(twilio.requests) == 1


async def test_connection_refused_is_retried(make: Make) -> None:
    result = await make(api_base=f"http://127.0.0.1:{free_port()}").send(message(), CTX)
    assert result.outcome is Outcome.RETRY and "Twilio unreachable: ClientConnectorError" in (result.error or "")


async def test_segments_and_sid_are_logged(make: Make) -> None:
    with structlog.testing.capture_logs() as logs:
        await make().send(message(text="ê" * 71), CTX)
    [entry] = [e for e in logs if e["event"] == "sms sent"]
    assert entry | {"sid": SID, "encoding": "UCS-2", "segments": 2, "sink": "sms", "rule": "order-sms"} == entry


async def test_bad_credentials_are_logged_as_an_error(twilio: FakeTwilio, make: Make) -> None:
    twilio.replies = [(401, error(20003, "Authenticate", 401), {})]
    with structlog.testing.capture_logs() as logs:
        await make().send(message(), CTX)
    [entry] = [e for e in logs if e["log_level"] == "error"]
    assert "check account_sid and auth_token" in entry["event"] and entry["code"] == 20003
    assert TOKEN not in json.dumps(logs, default=str)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("7", 7.0), ("0", 0.0), ("1.5", 1.5), ("Sat, 14 Mar 2026 08:00:30 GMT", 30.0),
     ("Sat, 14 Mar 2026 07:00:00 GMT", 0.0), (None, None), ("", None), ("soon", None), ("-3", None), ("nan", None),
     ("inf", None)],
)  # fmt: skip
def test_retry_after(value: str | None, seconds: float | None) -> None:
    assert retry_after(value, NOW) == seconds


# --- config ---------------------------------------------------------------------------------------------------

BASE = {"account_sid": ACCOUNT, "auth_token": TOKEN, "sender": "+33700000000"}
CONFIGS: list[tuple[dict[str, Any], str]] = [
    ({"sender": None}, "set exactly one of `sender` and `messaging_service_sid`"),
    ({"messaging_service_sid": SERVICE}, "set exactly one of `sender` and `messaging_service_sid`"),
    ({"account_sid": "AC123"}, "account_sid"),
    ({"messaging_service_sid": "MG1", "sender": None}, "messaging_service_sid"),
    ({"sender": "+33 7 00 00 00 00"}, "E.164 number without spaces"),
    ({"sender": "Boutique de Paris"}, "alphanumeric sender ID"),
    ({"sender": "123456789012"}, "alphanumeric sender ID"),
    ({"default_region": "France"}, "unknown country 'France'"),
    ({"status_callback": "ftp://hooks.example.com/x"}, "expected an http(s) URL"),
    ({"status_callback": "Not A Source"}, "expected an http(s) URL or the name of a source"),
    ({"api_base": "api.twilio.com"}, "expected an http(s) URL"),
    ({"from": "+33700000000"}, "Extra inputs are not permitted"),
]


@pytest.mark.parametrize(("change", "problem"), CONFIGS)
def test_config_errors(change: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        TwilioConfig.model_validate({**BASE, **change})


@pytest.mark.parametrize("sender", ["+33700000000", "36700", "Boutique", "Shop 24"])
def test_senders_twilio_accepts(sender: str) -> None:
    assert TwilioConfig.model_validate({**BASE, "sender": sender}).sender == sender


def test_config_defaults_and_normalising() -> None:
    config = TwilioConfig.model_validate({**BASE, "default_region": "fr", "api_base": "http://127.0.0.1:9/"})
    assert (config.default_region, config.api_base) == ("FR", "http://127.0.0.1:9")
    default = TwilioConfig.model_validate(BASE)
    assert (default.api_base, default.status_callback, default.default_region) == ("https://api.twilio.com", None, None)
    assert TOKEN not in repr(config) and TOKEN not in str(config.model_dump())
    assert isinstance(config.auth_token, SecretStr)


# --- end to end: a rule sends through the sink; Twilio's answers land on the delivery and the contact ---------


CONFIG = """\
public_url: https://hooks.example.com
phone_region: FR
storage: {{url: '{db_url}'}}
worker: {{retry_base: 10s}}
sources:
  in: {{plugin: scripted, url_token: tok}}
  sms-status: {{plugin: twilio_status, auth_token: {token}}}
sinks:
  sms:
    plugin: twilio
    account_sid: {account}
    auth_token: {token}
    sender: "+33700000000"
    default_region: FR
    status_callback: sms-status
    api_base: {api_base}
    timeout: 2
rules:
  - name: order-sms
    when: order.placed
    kind: transactional
    steps:
      - send: {{via: sms, template: order-sms}}
      - wait: 1d
        send: {{via: sms, template: order-sms}}
"""


@pytest.mark.parametrize(
    ("region", "problem"),
    [
        ("", "sinks.sms.default_region: numbers without +country code are stored as written (`phone_region:`) "
         "and this sink texts them as FR numbers: a STOP would not reach the contact it was sent to; set "
         "`phone_region: FR` at the top level"),
        ("phone_region: GB\n", "are stored as GB numbers (`phone_region:`) and this sink texts them as FR numbers"),
        ("phone_region: FR\n", None),
    ],
)  # fmt: skip
def test_the_sinks_region_must_be_the_deployments(tmp_path: Path, region: str, problem: str | None) -> None:
    """A number is stored as an identity read in `phone_region` and texted as read in the sink's
    `default_region`: with two countries, a STOP from +33612345678 would reach another contact than the one
    stored as "06 12 34 56 78", which would still be texted."""
    pm = get_plugin_manager(extra=[ScriptedPlugin()])
    text = region + CONFIG.replace("phone_region: FR\n", "").format(
        db_url=f"sqlite:///{tmp_path}/d.db", token=TOKEN, account=ACCOUNT, api_base="http://127.0.0.1:9"
    )
    path = write_deployment(tmp_path, text, {"order-sms.txt.j2": "x"})
    if problem is None:
        assert load_config(path, collect(pm), pm).phone_region == "FR"
        return
    with pytest.raises(ConfigError) as raised:
        load_config(path, collect(pm), pm)
    assert any(problem in line for line in raised.value.problems), raised.value.problems


class Running:
    def __init__(self, client: Any, app: Any, clock: FakeClock):
        self.client, self.gateway, self.clock = client, app[GATEWAY_KEY], clock

    async def order(self, number: str = "#1042", **contact: Any) -> None:
        event = {"type": "order.placed", "contact": {"email": "camille@example.org", **CAMILLE, **contact},
                 "properties": {"name": number}, "correlation": [f"order:{number}"]}  # fmt: skip
        response = await self.client.post("/hooks/in/tok", data=json.dumps([event]).encode())
        assert response.status == 200
        await self.gateway.worker.drain()

    async def advance(self, **delta: float) -> None:
        self.clock.advance(timedelta(**delta))
        await self.gateway.worker.drain()

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        with self.gateway.db.engine.connect() as conn:
            return [tuple(row) for row in conn.exec_driver_sql(sql)]


@pytest.fixture
async def running(aiohttp_client: Any, tmp_path: Path, db_url: str, twilio: FakeTwilio) -> Running:
    pm = get_plugin_manager(extra=[ScriptedPlugin()])
    text = CONFIG.format(db_url=db_url, token=TOKEN, account=ACCOUNT, api_base=twilio.base)
    path = write_deployment(tmp_path, text, {"order-sms.txt.j2": "Merci {{ contact.first_name }} ! "
                                             "Commande {{ event.properties.name }} reçue."})  # fmt: skip
    settings = load_config(path, collect(pm), pm)
    clock = FakeClock(NOW)
    app = create_app(settings, pm=pm, clock=clock, role="web")
    return Running(await aiohttp_client(app), app, clock)


def twilio_signature(url: str, params: dict[str, str]) -> str:
    """X-Twilio-Signature: base64 HMAC-SHA1 over the URL and the sorted name+value pairs."""
    signed = url + "".join(name + params[name] for name in sorted(params))
    return base64.b64encode(hmac.new(TOKEN.encode(), signed.encode(), hashlib.sha1).digest()).decode()


async def test_a_rule_texts_the_contact_and_twilios_status_lands_on_the_delivery(
    running: Running, twilio: FakeTwilio
) -> None:
    await running.order()
    [request] = twilio.requests
    assert request.form == {
        "To": ["+33612345678"],
        "From": ["+33700000000"],
        "Body": ["Merci Camille ! Commande #1042 reçue."],
        "StatusCallback": ["https://hooks.example.com/hooks/sms-status"],
    }
    assert running.rows("SELECT status, provider_id, attempts, sink FROM deliveries") == [("sent", SID, 1, "sms")]
    status = {"MessageSid": SID, "SmsSid": SID, "MessageStatus": "delivered", "AccountSid": ACCOUNT,
              "To": "+33612345678", "From": "+33700000000", "ApiVersion": "2010-04-01"}  # fmt: skip
    url = "https://hooks.example.com/hooks/sms-status"
    response = await running.client.post(
        "/hooks/sms-status",
        data=urlencode(status),
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "X-Twilio-Signature": twilio_signature(url, status),
        },
    )
    assert response.status == 200
    await running.gateway.worker.drain()
    assert running.rows("SELECT feedback FROM deliveries") == [("delivered",)]


async def test_an_invalid_number_marks_the_phone_and_later_sms_are_suppressed(
    running: Running, twilio: FakeTwilio
) -> None:
    twilio.replies = [(400, error(21211, "The 'To' number +33612345678 is not a valid phone number."), {})]
    await running.order()
    [(status, reason, attempts)] = running.rows("SELECT status, reason, attempts FROM deliveries")
    assert (status, attempts) == ("address_invalid", 1) and "Twilio 21211" in reason
    assert running.rows("SELECT phone_status FROM contacts") == [("invalid",)]
    await running.advance(days=1)
    assert running.rows("SELECT step, status, reason FROM deliveries ORDER BY step")[1] == (
        2,
        "suppressed",
        "phone number is invalid",
    )
    assert len(twilio.requests) == 1


async def test_a_number_we_cannot_read_is_marked_without_calling_twilio(running: Running, twilio: FakeTwilio) -> None:
    await running.order(phone="06 12")
    assert running.rows("SELECT status, attempts FROM deliveries") == [("address_invalid", 1)]
    assert running.rows("SELECT phone_status FROM contacts") == [("invalid",)]
    assert twilio.requests == []


async def test_429_waits_for_retry_after_then_sends(running: Running, twilio: FakeTwilio) -> None:
    twilio.replies = [(429, error(20429, "Too Many Requests", 429), {"Retry-After": "120"}), (201, created(), {})]
    await running.order()
    assert running.rows("SELECT status, attempts FROM deliveries") == [("retrying", 1)]
    await running.advance(seconds=100)  # the backoff alone (5-10 s) would have retried by now
    assert len(twilio.requests) == 1
    await running.advance(seconds=30)
    assert len(twilio.requests) == 2
    assert running.rows("SELECT status, provider_id, attempts FROM deliveries") == [("sent", SID, 2)]


async def test_a_recipient_who_replied_stop_loses_sms_consent_not_their_number(
    running: Running, twilio: FakeTwilio
) -> None:
    twilio.replies = [(400, error(21610, "Attempt to send to unsubscribed recipient"), {})]
    await running.order()
    [(status, reason)] = running.rows("SELECT status, reason FROM deliveries")
    assert status == "opted_out" and "opted out (replied STOP)" in reason
    assert running.rows("SELECT phone_status FROM contacts") == [("ok",)]
    assert running.rows("SELECT channel, state FROM consents ORDER BY id")[-1] == ("sms", "withdrawn")
    assert running.rows("SELECT status FROM jobs WHERE kind = 'step' AND step = 0") == [("done",)]  # not dead


# --- a number that replied STOP is not texted through another contact that names it -------------------------

SHOP_SECRET = "shop-secret-for-tests"
CONSENT_CONFIG = """\
public_url: https://hooks.example.com
storage: {{url: '{db_url}'}}
sources:
  shop: {{plugin: shopify, secret: {shop_secret}}}
  sms-status: {{plugin: twilio_status, auth_token: {token}}}
sinks:
  sms: {{plugin: twilio, account_sid: {account}, auth_token: {token}, sender: "+33700000000", api_base: {api_base}}}
policies:
  consent: {{sms: required}}
rules:
  - name: cart-sms
    when: checkout.started
    steps:
      - wait: 1h
        send: {{via: sms, template: cart-sms}}
"""


async def test_a_stop_binds_the_number_whichever_contact_later_names_it(
    aiohttp_client: Any, tmp_path: Path, db_url: str, twilio: FakeTwilio
) -> None:
    """Camille is known by her e-mail, then her number replies STOP before Declic knows it is hers: the STOP
    makes a contact of the number alone. Shopify's later customer update names both, with an SMS opt-in
    from a week before: the number stays with the contact that holds it, and so does the opt-in, ruled on
    against the STOP. Her checkout texts nobody."""
    text = CONSENT_CONFIG.format(
        db_url=db_url, shop_secret=SHOP_SECRET, token=TOKEN, account=ACCOUNT, api_base=twilio.base
    )
    pm = get_plugin_manager()
    settings = load_config(write_deployment(tmp_path, text, {"cart-sms.txt.j2": "Still there?"}), collect(pm), pm)
    clock = FakeClock(NOW)
    app = create_app(settings, pm=pm, clock=clock, role="web")
    client, gateway = await aiohttp_client(app), app[GATEWAY_KEY]

    async def shopify(topic: str, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        headers = shopify_headers(data, SHOP_SECRET, topic, uuid.uuid4().hex)
        assert (await client.post("/hooks/shop", data=data, headers=headers)).status == 200
        await gateway.worker.drain()

    def rows(sql: str) -> list[tuple[Any, ...]]:
        with gateway.db.engine.connect() as conn:
            return [tuple(row) for row in conn.exec_driver_sql(sql)]

    customer = fixture_json("shopify/checkout.json")["customer"]  # Camille, id 5550001, +33612345678
    email_consent = {
        "state": "subscribed",
        "opt_in_level": "single_opt_in",
        "consent_updated_at": "2026-03-01T10:00:00Z",
    }
    await shopify(
        "customers_email_marketing_consent/update",
        {"customer_id": customer["id"], "email_address": customer["email"], "email_marketing_consent": email_consent},
    )
    stop = {"MessageSid": "SM" + "5" * 32, "From": customer["phone"], "To": "+33700000000", "Body": "STOP"}
    url = "https://hooks.example.com/hooks/sms-status"
    headers = {"Content-Type": "application/x-www-form-urlencoded", "X-Twilio-Signature": twilio_signature(url, stop)}
    assert (await client.post("/hooks/sms-status", data=urlencode(stop), headers=headers)).status == 200
    await gateway.worker.drain()
    sms_opt_in = {"state": "subscribed", "opt_in_level": "single_opt_in", "consent_updated_at": "2026-03-07T10:00:00Z"}
    await shopify("customers/update", {**customer, "sms_marketing_consent": sms_opt_in})
    await shopify("checkouts/create", fixture_json("shopify/checkout.json"))
    clock.advance(timedelta(hours=1, seconds=1))
    await gateway.worker.drain()

    assert twilio.requests == [], "a marketing SMS went to a number that replied STOP"
    assert rows("SELECT email, phone, consent FROM contacts ORDER BY id") == [
        ("camille.durand@example.org", None, ANY),
        (None, "+33612345678", ANY),
    ]
    assert rows("SELECT contact_id, source, state, applied FROM consents WHERE channel = 'sms' ORDER BY id") == [
        (2, "sms-status", "withdrawn", True),
        (2, "shop", "granted", False),  # the opt-in of 7 March, older than the STOP
        (2, "shop", "none", False),  # the checkout's snapshot: not_subscribed, undated
    ]
