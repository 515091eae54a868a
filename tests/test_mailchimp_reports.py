"""Mailchimp campaign reports: polling email-activity from a local Mailchimp, then each activity into an event.

Declic calls Mailchimp here, not the reverse: there is no signature and so no published vector
to check. The source takes no webhook at all, and every call to its hook path answers 404.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from conftest import FIXTURES, SHARED_PAYLOADS
from declic_gateway import Event, Fetched, MalformedPayload, RawCall, RetryLater
from declic_gateway.config import load_config
from declic_gateway.http.app import create_app
from declic_gateway.http.running import GATEWAY_KEY, RunningGateway
from declic_gateway.kit.sources import Deployment
from declic_gateway.plugins import collect, get_plugin_manager
from declic_gateway.testing import FakeClock, SmtpCatcher, write_deployment
from declic_plugins.mailchimp_reports import (
    ACTIVITY_FIELDS,
    SENT_TO_FIELDS,
    MailchimpReports,
    MailchimpReportsConfig,
    member_items,
    sent_items,
)

KEY = "0123456789abcdef0123456789abcdef-us6"
NOW = datetime(2026, 7, 1, 10, 0, tzinfo=UTC)
HERE = FIXTURES / "mailchimp_reports"
ACTIVITY = json.loads((HERE / "email_activity.json").read_text())
CAMPAIGNS = json.loads((HERE / "campaigns.json").read_text())["campaigns"]
SALE, NEWS, OLD = "b03bfc2ea5", "e5a2c1f8d0", "9c1d3e7b42"  # sent 28 June, 30 June, 2 May
ADA, BRUNO, CHLOE = "ada.lovelace@example.org", "bruno.marchand@example.org", "chloe.dupont@example.org"
SOLDES, NOUVEAUTES = "https://shop.example.org/soldes?utm_source=mailchimp", "https://shop.example.org/nouveautes"
SHARED = SHARED_PAYLOADS / "mailchimp"


def md5(email: str) -> str:
    return hashlib.md5(email.lower().encode()).hexdigest()


def key(campaign: str, email: str, action: str, at: str, url: str = "") -> str:
    return f"{campaign}:{md5(email)}:{action}:{at}" + (f":{url}" if url else "")


#: The activity of email_activity.json from 09:00 on: what a first poll at 10:00 stores, oldest first.
FIRST_POLL = [
    key(SALE, BRUNO, "bounce", "2026-07-01T09:00:07+00:00"),
    key(SALE, ADA, "open", "2026-07-01T09:12:03+00:00"),
    key(SALE, ADA, "click", "2026-07-01T09:12:41+00:00", NOUVEAUTES),
    key(SALE, ADA, "click", "2026-07-01T09:12:41+00:00", SOLDES),
    key(SALE, CHLOE, "open", "2026-07-01T09:41:19+00:00"),
]


# A local Mailchimp Marketing API ------------------------------------------------------------------------------------


def problem_body(status: int, title: str, detail: str) -> bytes:
    """Mailchimp's error body: RFC 7807 problem JSON (mailchimp.com/developer/marketing/docs/errors)."""
    return json.dumps(
        {
            "type": "https://mailchimp.com/developer/marketing/docs/errors/",
            "title": title,
            "status": status,
            "detail": detail,
            "instance": "995c5cb0-3280-4a6e-808b-3b096d0bb219",
        }
    ).encode()


def when(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


class Mailchimp:
    """GET /3.0/campaigns and /3.0/reports/{id}/email-activity as documented: Basic auth with the key as
    password, `count` (default 10, at most 1000), `offset` and `total_items`, `since` keeping the members
    with activity after that time, problem JSON errors. Scripted replies answer first, once each."""

    def __init__(self) -> None:
        self.key = KEY
        self.campaigns = copy.deepcopy(CAMPAIGNS)
        self.members: dict[str, list[dict[str, Any]]] = {SALE: copy.deepcopy(ACTIVITY["emails"]), NEWS: [], OLD: []}
        #: (path prefix, offset or None, status, headers, body)
        self.script: list[tuple[str, str | None, int, dict[str, str], bytes]] = []
        self.asked: list[tuple[str, dict[str, str]]] = []
        #: Campaign -> who it was sent to, for /sent-to.
        self.recipients: dict[str, list[dict[str, Any]]] = {SALE: [], NEWS: [], OLD: []}
        #: Answer a member's every activity, not only what happened after `since`.
        self.whole_history = False

    def add(self, campaign: str, email: str, action: str, at: str, **extra: str) -> None:
        members = self.members[campaign]
        member = next((m for m in members if m["email_address"] == email), None)
        if member is None:
            member = {"campaign_id": campaign, "list_id": "57afe96172", "email_id": md5(email), "email_address": email}
            members.append(member | {"activity": []})
            member = members[-1]
        member["activity"].append({"action": action, "timestamp": at, **extra})

    def since_asked(self, campaign: str) -> list[str]:
        path = f"/3.0/reports/{campaign}/email-activity"
        return [query["since"] for asked, query in self.asked if asked == path and query.get("offset") == "0"]

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/3.0/campaigns", self.list_campaigns)
        app.router.add_get("/3.0/campaigns/{campaign_id}", self.campaign)
        app.router.add_get("/3.0/reports/{campaign_id}/email-activity", self.email_activity)
        app.router.add_get("/3.0/reports/{campaign_id}/sent-to", self.sent_to)
        return app

    def _missing(self) -> web.Response:
        detail = "The requested resource could not be found."
        return web.Response(status=404, body=problem_body(404, "Resource Not Found", detail))

    async def campaign(self, request: web.Request) -> web.Response:
        if (early := self._first(request)) is not None:
            return early
        found = next((c for c in self.campaigns if c["id"] == request.match_info["campaign_id"]), None)
        return web.json_response(found) if found else self._missing()

    async def sent_to(self, request: web.Request) -> web.Response:
        if (early := self._first(request)) is not None:
            return early
        campaign = request.match_info["campaign_id"]
        if campaign not in self.recipients:
            return self._missing()
        return self._page(request, "sent_to", self.recipients[campaign], campaign_id=campaign)

    def _first(self, request: web.Request) -> web.Response | None:
        self.asked.append((request.path, dict(request.query)))
        for index, (prefix, offset, status, headers, body) in enumerate(self.script):
            if request.path.startswith(prefix) and offset in (None, request.query.get("offset")):
                del self.script[index]
                kind = "application/problem+json" if body.startswith(b'{"type"') else "application/json"
                return web.Response(status=status, headers=headers, body=body, content_type=kind)
        scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
        password = base64.b64decode(encoded).decode().partition(":")[2] if scheme == "Basic" else ""
        if password != self.key:
            detail = "Your API key may be invalid, or you've attempted to access the wrong datacenter."
            return web.Response(
                status=401, body=problem_body(401, "API Key Invalid", detail), content_type="application/problem+json"
            )
        return None

    def _page(self, request: web.Request, name: str, records: list[dict[str, Any]], **extra: str) -> web.Response:
        count, offset = int(request.query.get("count", "10")), int(request.query.get("offset", "0"))
        if not 1 <= count <= 1000:
            return web.Response(status=400, body=problem_body(400, "Invalid Resource", "count: 1 to 1000"))
        return web.json_response({name: records[offset : offset + count], **extra, "total_items": len(records)})

    async def list_campaigns(self, request: web.Request) -> web.Response:
        if (early := self._first(request)) is not None:
            return early
        since = when(request.query.get("since_send_time"))
        found = [c for c in self.campaigns if since is None or datetime.fromisoformat(c["send_time"]) >= since]
        return self._page(request, "campaigns", sorted(found, key=lambda c: c["send_time"], reverse=True))

    @staticmethod
    def _after(activity: Any, since: datetime) -> bool:
        """Activity the test made unreadable on purpose is sent, as if Mailchimp sent it."""
        try:
            return datetime.fromisoformat(activity["timestamp"]) > since
        except (TypeError, KeyError, ValueError):
            return True

    async def email_activity(self, request: web.Request) -> web.Response:
        if (early := self._first(request)) is not None:
            return early
        campaign = request.match_info["campaign_id"]
        if campaign not in self.members:
            detail = "The requested resource could not be found."
            return web.Response(status=404, body=problem_body(404, "Resource Not Found", detail))
        since = when(request.query.get("since"))
        found = []
        for member in self.members[campaign]:
            recent = [a for a in member["activity"] if since is None or self._after(a, since)]
            if recent:
                found.append(member | {"activity": member["activity"] if self.whole_history else recent})
        return self._page(request, "emails", found, campaign_id=campaign)


@pytest.fixture
async def mailchimp() -> AsyncIterator[tuple[Mailchimp, str]]:
    state = Mailchimp()
    server = TestServer(state.app())
    await server.start_server()
    yield state, str(server.make_url("")).rstrip("/")
    await server.close()


def source(base: str, **config: Any) -> MailchimpReports:
    settings_ = MailchimpReportsConfig.model_validate({"api_key": KEY, "api_base": base, **config})
    return MailchimpReports("reports", settings_, Deployment(None, "UTC", FakeClock(NOW)))


async def poll(base: str, cursor: str | None = None, now: datetime = NOW, **config: Any) -> Fetched:
    reports = source(base, **config)
    await reports.start()
    try:
        return await reports.poll(cursor, now)
    finally:
        await reports.close()


def keys(fetched: Fetched) -> list[str]:
    return [k for k, _ in fetched.items]


# Config --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "api_base"),
    [
        ({"api_key": KEY}, "https://us6.api.mailchimp.com"),
        ({"api_key": "abc-us21"}, "https://us21.api.mailchimp.com"),
        ({"api_key": "no-data-center", "api_base": "http://127.0.0.1:8080/"}, "http://127.0.0.1:8080"),
    ],
)
def test_the_api_host_comes_from_the_key(given: dict[str, Any], api_base: str) -> None:
    assert MailchimpReportsConfig.model_validate(given).api_base == api_base


@pytest.mark.parametrize(
    ("given", "error"),
    [
        ({"api_key": "0123456789abcdef"}, "a Mailchimp key ends in -<data center>, e.g. -us6"),
        ({"api_key": "abc-evil.example.com/x"}, "a Mailchimp key ends in -<data center>"),
        ({"api_key": KEY, "campaigns": ["../lists"]}, "String should match pattern"),
        ({"api_key": KEY, "interval": "30s"}, "poll at most once a minute"),
        ({"api_key": KEY, "interval": "soon"}, "invalid duration"),
        ({"api_key": KEY, "page_size": 0}, "greater than or equal to 1"),
        ({"api_key": KEY, "page_size": 5000}, "less than or equal to 1000"),
        ({"api_key": KEY, "api_base": "ftp://example.org"}, "not an http(s) URL"),
        ({"api_key": KEY, "list_id": "57afe96172"}, "Extra inputs are not permitted"),
    ],
)
def test_config_mistakes_are_refused(given: dict[str, Any], error: str) -> None:
    with pytest.raises(ValidationError, match=error.replace("(", r"\(").replace(")", r"\)")):
        MailchimpReportsConfig.model_validate(given)


@pytest.mark.parametrize(("interval", "expected"), [(None, timedelta(minutes=15)), ("5m", timedelta(minutes=5))])
def test_the_interval_comes_from_the_config(interval: str | None, expected: timedelta) -> None:
    assert source("http://127.0.0.1:1", **({"interval": interval} if interval else {})).interval == expected


# Polling -------------------------------------------------------------------------------------------------------------


async def test_the_first_poll_reads_the_backfill_of_recently_sent_campaigns(mailchimp: tuple[Mailchimp, str]) -> None:
    state, base = mailchimp
    fetched = await poll(base)
    assert keys(fetched) == FIRST_POLL
    assert fetched.cursor == "2026-07-01T09:00:00+00:00"  # Chloé's open at 09:41:19 less an hour, but never back
    assert state.asked[0] == (
        "/3.0/campaigns",
        {
            "status": "sent",
            "since_send_time": "2026-06-01T10:00:00+00:00",
            "fields": "campaigns.id,total_items",
            "sort_field": "send_time",
            "sort_dir": "DESC",
            "count": "1000",
            "offset": "0",
        },
    )
    assert [path for path, _ in state.asked[1:]] == [
        f"/3.0/reports/{NEWS}/email-activity",
        f"/3.0/reports/{SALE}/email-activity",
    ]  # not the campaign sent in May
    assert state.asked[2][1] == {
        "since": "2026-07-01T09:00:00+00:00",
        "fields": ACTIVITY_FIELDS,
        "count": "1000",
        "offset": "0",
    }


async def test_a_poll_reads_from_the_cursor_and_gives_the_same_ids_again(mailchimp: tuple[Mailchimp, str]) -> None:
    state, base = mailchimp
    fetched = await poll(base, cursor="2026-07-01T08:41:19+00:00", now=NOW + timedelta(minutes=15))
    assert state.since_asked(SALE) == ["2026-07-01T08:41:19+00:00"]
    assert keys(fetched) == FIRST_POLL  # read again: the same keys make them duplicates
    assert fetched.cursor == "2026-07-01T08:41:19+00:00"  # the latest is 09:41:19, less the overlap


async def test_pages_follow_offset_until_total_items(mailchimp: tuple[Mailchimp, str]) -> None:
    state, base = mailchimp
    fetched = await poll(base, page_size=1)
    assert keys(fetched) == FIRST_POLL

    def offsets(path: str) -> list[str]:
        return [query["offset"] for asked, query in state.asked if asked == path and query["count"] == "1"]

    assert offsets("/3.0/campaigns") == ["0", "1"]
    assert offsets(f"/3.0/reports/{NEWS}/email-activity") == ["0"]  # total_items 0
    assert offsets(f"/3.0/reports/{SALE}/email-activity") == ["0", "1", "2"]


async def test_listed_campaigns_are_polled_without_listing_and_a_missing_one_is_skipped(
    mailchimp: tuple[Mailchimp, str],
) -> None:
    state, base = mailchimp
    fetched = await poll(base, campaigns=["0000000000", SALE, SALE])
    assert keys(fetched) == FIRST_POLL
    assert [path for path, _ in state.asked] == [
        "/3.0/reports/0000000000/email-activity",
        f"/3.0/reports/{SALE}/email-activity",
    ]


async def test_activity_older_than_the_window_is_left_out_even_when_sent(mailchimp: tuple[Mailchimp, str]) -> None:
    state, base = mailchimp
    state.whole_history = True  # Chloé's open of 30 June comes with her open of today
    assert keys(await poll(base, campaigns=[SALE])) == FIRST_POLL


async def test_unknown_and_unreadable_activity_is_left_out(mailchimp: tuple[Mailchimp, str]) -> None:
    state, base = mailchimp
    state.members[SALE] = [
        {"email_address": "dora@example.org", "activity": [{"action": "open", "timestamp": "2026-07-01T09:30:00Z"}]},
        {"email_address": "eve@example.org", "activity": [{"action": "forward", "timestamp": "2026-07-01T09:31:00Z"}]},
        {"email_address": "fay@example.org", "activity": [{"action": "open", "timestamp": "today"}]},
        {"email_address": "gus@example.org", "activity": [{"action": ["open"], "timestamp": "2026-07-01T09:32:00Z"}]},
        {"email_address": "", "activity": [{"action": "open", "timestamp": "2026-07-01T09:33:00Z"}]},
        {"email_address": "hal@example.org", "activity": "open"},
        {"email_address": "ivy@example.org", "activity": ["open", {"action": "click"}]},
    ]
    fetched = await poll(base, campaigns=[SALE])
    assert keys(fetched) == [key(SALE, "dora@example.org", "open", "2026-07-01T09:30:00+00:00")]  # email_id: md5


async def test_the_cursor_never_runs_ahead_of_the_clock(mailchimp: tuple[Mailchimp, str]) -> None:
    state, base = mailchimp
    state.add(SALE, ADA, "open", "2026-07-01T12:00:00+00:00")  # Mailchimp's clock two hours ahead of ours
    fetched = await poll(base, campaigns=[SALE], overlap="10m")
    assert fetched.cursor == "2026-07-01T09:50:00+00:00"


@pytest.mark.parametrize(
    ("cursor", "since"), [("garbage", "2026-07-01T09:00:00+00:00"), (None, "2026-07-01T09:00:00+00:00")]
)
async def test_without_a_readable_cursor_the_poll_reads_the_backfill(
    mailchimp: tuple[Mailchimp, str], cursor: str | None, since: str
) -> None:
    state, base = mailchimp
    await poll(base, cursor=cursor, campaigns=[SALE])
    assert state.since_asked(SALE) == [since]


@pytest.mark.parametrize(
    ("cursor", "expected"), [(None, "2026-07-01T09:00:00+00:00"), ("2026-06-30T12:00:00Z", "2026-06-30T12:00:00+00:00")]
)
async def test_a_poll_that_finds_nothing_keeps_its_window(
    mailchimp: tuple[Mailchimp, str], cursor: str | None, expected: str
) -> None:
    _, base = mailchimp
    assert await poll(base, cursor=cursor, campaigns=[NEWS]) == Fetched([], cursor=expected)


async def test_bots_can_be_filtered_out(mailchimp: tuple[Mailchimp, str]) -> None:
    state, base = mailchimp
    await poll(base, campaigns=[SALE], filter_bots=True)
    assert state.asked[0][1]["filter_bots"] == "true"


async def test_the_key_is_the_basic_auth_password(mailchimp: tuple[Mailchimp, str]) -> None:
    state, base = mailchimp
    state.key = "another-key-us6"
    with pytest.raises(RetryLater) as refused:
        await poll(base, campaigns=[SALE])
    assert refused.value.reason == (
        f"Mailchimp answered 401 API Key Invalid: Your API key may be invalid, or you've attempted to access "
        f"the wrong datacenter. (/3.0/reports/{SALE}/email-activity): check api_key"
    )
    assert refused.value.after == 900.0  # asks again each interval, until the key is fixed


TOO_MANY = problem_body(429, "Too Many Requests", "You have exceeded the limit of 10 simultaneous connections.")
FAILURES: list[tuple[str, int, dict[str, str], bytes, str, float]] = [
    ("429 with Retry-After", 429, {"Retry-After": "120"}, TOO_MANY, "429 Too Many Requests: You have exceeded", 120.0),
    (
        "429 with an HTTP-date",
        429,
        {"Retry-After": format_datetime(NOW + timedelta(seconds=90), usegmt=True)},
        TOO_MANY,
        "429 Too Many Requests",
        90.0,
    ),
    ("429 without Retry-After", 429, {}, TOO_MANY, "429 Too Many Requests", 60.0),
    ("429 with a bad Retry-After", 429, {"Retry-After": "-5"}, TOO_MANY, "429 Too Many Requests", 60.0),
    ("500", 500, {}, problem_body(500, "Internal Server Error", "An unexpected error."), "500 Internal Server", 60.0),
    (
        "503 from a proxy",
        503,
        {"Retry-After": "30"},
        b"<html>Service\n Unavailable</html>",
        "503 <html>Service U",
        30.0,
    ),
    ("401", 401, {}, problem_body(401, "API Key Invalid", "Invalid key."), "Invalid key. (/3.0/", 900.0),
    ("401 is loud", 401, {}, problem_body(401, "API Key Invalid", "Invalid key."), "check api_key", 900.0),
    ("401 with Retry-After", 401, {"Retry-After": "7200"}, b"", "): check api_key", 7200.0),
    ("403", 403, {}, problem_body(403, "Forbidden", "Not allowed."), "): check api_key", 900.0),
    ("400", 400, {}, problem_body(400, "Invalid Resource", "Bad since."), "400 Invalid Resource: Bad since.", 60.0),
    ("200 not JSON", 200, {}, b'{"emails": [', "answered 200 for /3.0/", 60.0),
    ("200 not an object", 200, {}, b"[]", "with a body that is not a JSON object", 60.0),
    ("200 without the list", 200, {}, b'{"emails": {}, "total_items": 1}', "list or no `total_items`", 60.0),
    ("200 without total_items", 200, {}, b'{"campaigns": [], "emails": []}', "list or no `total_items`", 60.0),
]


@pytest.mark.parametrize("where", ["/3.0/campaigns", "/3.0/reports/"])
@pytest.mark.parametrize(
    ("status", "headers", "body", "reason", "after"), [f[1:] for f in FAILURES], ids=[f[0] for f in FAILURES]
)
async def test_provider_failures_retry_later(
    mailchimp: tuple[Mailchimp, str],
    where: str,
    status: int,
    headers: dict[str, str],
    body: bytes,
    reason: str,
    after: float,
) -> None:
    state, base = mailchimp
    state.script.append((where, None, status, headers, body))
    with pytest.raises(RetryLater) as failed:
        await poll(base)
    assert reason in failed.value.reason
    assert failed.value.after == after


async def test_a_failure_on_a_later_page_fails_the_poll_and_the_next_one_reads_everything(
    mailchimp: tuple[Mailchimp, str],
) -> None:
    state, base = mailchimp
    state.script.append(("/3.0/reports/", "2", 502, {}, b"Bad RunningGateway"))
    with pytest.raises(RetryLater, match="Mailchimp answered 502 Bad RunningGateway"):
        await poll(base, page_size=1, campaigns=[SALE])
    assert keys(await poll(base, page_size=1, campaigns=[SALE])) == FIRST_POLL


async def test_an_unreachable_api_retries_later() -> None:
    with pytest.raises(RetryLater, match=r"Mailchimp API unreachable \(/3.0/campaigns\): ClientConnectorError"):
        await poll("http://127.0.0.1:1")


# Normalisation -------------------------------------------------------------------------------------------------------

SOURCE = source("http://127.0.0.1:1")
STORED = {
    k: body
    for member in ACTIVITY["emails"]
    for k, (_, body) in member_items(SALE, member, datetime(2026, 6, 1, tzinfo=UTC)).items()
}


def raw(body: bytes) -> RawCall:
    return RawCall(1, "reports", NOW + timedelta(minutes=1), {}, body)


NORMALISED = [
    (
        key(SALE, ADA, "open", "2026-07-01T09:12:03+00:00"),
        "email.opened",
        ADA,
        datetime(2026, 7, 1, 9, 12, 3, tzinfo=UTC),
        {"campaign_id": SALE, "list_id": "57afe96172", "ip": "198.51.100.7"},
    ),
    (
        key(SALE, ADA, "click", "2026-07-01T09:12:41+00:00", SOLDES),
        "email.clicked",
        ADA,
        datetime(2026, 7, 1, 9, 12, 41, tzinfo=UTC),
        {"campaign_id": SALE, "list_id": "57afe96172", "url": SOLDES, "ip": "198.51.100.7"},
    ),
    (
        key(SALE, BRUNO, "bounce", "2026-07-01T09:00:07+00:00"),
        "email.bounced",
        BRUNO,
        datetime(2026, 7, 1, 9, 0, 7, tzinfo=UTC),
        {"campaign_id": SALE, "list_id": "57afe96172", "bounce": "hard"},
    ),
    (
        key(SALE, CHLOE, "open", "2026-06-30T18:02:00+00:00"),
        "email.opened",
        CHLOE,
        datetime(2026, 6, 30, 18, 2, tzinfo=UTC),
        {"campaign_id": SALE, "list_id": "57afe96172", "ip": "203.0.113.40"},
    ),
]


@pytest.mark.parametrize(("item", "kind", "email", "at", "properties"), NORMALISED)
def test_each_activity_becomes_one_event(
    item: str, kind: str, email: str, at: datetime, properties: dict[str, Any]
) -> None:
    [event] = SOURCE.normalize(raw(STORED[item]))
    assert (event.type, event.contact.email, event.occurred_at, event.properties) == (kind, email, at, properties)
    campaign, email_id = item.split(":")[:2]
    assert event.correlation == [f"mailchimp-campaign:{campaign}:{email_id}", f"mailchimp-activity:{item}"]
    assert event.dedupe_key == item


def test_a_soft_bounce_says_so() -> None:
    body = json.loads(STORED[key(SALE, BRUNO, "bounce", "2026-07-01T09:00:07+00:00")])
    body["activity"]["type"] = "soft"
    [event] = SOURCE.normalize(raw(json.dumps(body).encode()))
    assert event.properties["bounce"] == "soft"


def item(**changes: Any) -> bytes:
    body = json.loads(STORED[key(SALE, ADA, "open", "2026-07-01T09:12:03+00:00")])
    for name, value in changes.items():
        where = body["activity"] if name in ("action", "timestamp") else body
        where.pop(name) if value is ... else where.__setitem__(name, value)
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "not a JSON object"),
        (b"\xff\xfe", "not a JSON object"),
        (b'["open"]', "not a JSON object"),
        (item(activity=...), "KeyError: 'activity'"),
        (item(activity="open"), "TypeError"),
        (item(action=...), "KeyError: 'action'"),
        (item(action=["open"]), "TypeError"),
        (item(timestamp="soon"), "unreadable activity timestamp 'soon'"),
        (item(timestamp=...), "unreadable activity timestamp None"),
        (item(email_address=None), "must be non-empty strings"),
        (item(email_address=""), "must be non-empty strings"),
        (item(id=7), "must be non-empty strings"),
        (item(campaign_id=...), "KeyError: 'campaign_id'"),
    ],
)
def test_malformed_items_are_refused(body: bytes, reason: str) -> None:
    with pytest.raises(MalformedPayload) as refused:
        SOURCE.normalize(raw(body))
    assert reason in str(refused.value)


def test_an_action_this_version_does_not_know_gives_no_event() -> None:
    assert SOURCE.normalize(raw(item(action="forward"))) == []


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
field_names = st.sampled_from(["id", "campaign_id", "list_id", "email_id", "email_address", "activity"])
activity_names = st.sampled_from(["action", "timestamp", "url", "type", "ip"])


@st.composite
def mutated_items(draw: st.DrawFn) -> bytes:
    body = json.loads(draw(st.sampled_from(sorted(STORED.values()))))
    for _ in range(draw(st.integers(1, 3))):
        inner = draw(st.booleans()) and isinstance(body.get("activity"), dict)
        where, name = (body["activity"], draw(activity_names)) if inner else (body, draw(field_names))
        if draw(st.booleans()):
            where.pop(name, None)
        else:
            where[name] = draw(json_values | st.sampled_from(["open", "click", "bounce", "2026-07-01T09:00:00Z"]))
    return json.dumps(body).encode()


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()) | mutated_items())
def test_normalize_raises_nothing_but_malformed_payload(body: bytes) -> None:
    try:
        events = SOURCE.normalize(raw(body))
    except MalformedPayload:
        return
    assert all(isinstance(e, Event) for e in events) and len(events) <= 1


# End to end: the real app, the worker, the database -----------------------------------------------------------------


async def start(
    aiohttp_client: Any, tmp_path: Path, db_url: str, base: str, extra: str = ""
) -> tuple[TestClient, RunningGateway, FakeClock]:
    pm = get_plugin_manager()  # the plugin loads through its entry point
    config = f"""\
storage: {{url: '{db_url}'}}
worker: {{retry_base: 10s}}
sources:
  reports:
    plugin: mailchimp_reports
    api_key: {KEY}
    api_base: '{base}'
    page_size: 2
{extra}"""
    settings_ = load_config(write_deployment(tmp_path, config), collect(pm), pm)
    clock = FakeClock(NOW)
    app = create_app(settings_, pm=pm, clock=clock, role="web")
    return await aiohttp_client(app), app[GATEWAY_KEY], clock


def rows(gateway: RunningGateway, sql: str) -> list[Any]:
    with gateway.db.engine.connect() as conn:
        return [tuple(row) for row in conn.exec_driver_sql(sql)]


async def test_polls_over_several_intervals_store_each_activity_once(
    mailchimp: tuple[Mailchimp, str], aiohttp_client: Any, tmp_path: Path, db_url: str
) -> None:
    state, base = mailchimp
    _, gateway, clock = await start(aiohttp_client, tmp_path, db_url, base)
    await gateway.worker.drain()
    assert rows(gateway, "SELECT count(*) FROM inbox") == [(5,)]

    state.add(SALE, CHLOE, "click", "2026-07-01T09:30:00+00:00", url=SOLDES)  # reported late, within the overlap
    state.add(SALE, ADA, "open", "2026-07-01T10:05:00+00:00")
    clock.advance(timedelta(minutes=15))
    await gateway.worker.drain()

    state.add(NEWS, BRUNO, "open", "2026-07-01T10:20:00+00:00")
    clock.advance(timedelta(minutes=15))
    await gateway.worker.drain()
    for _ in range(2):  # nothing new
        clock.advance(timedelta(minutes=15))
        await gateway.worker.drain()

    assert state.since_asked(SALE) == [
        "2026-07-01T09:00:00+00:00",  # the backfill
        "2026-07-01T09:00:00+00:00",  # Chloé's open at 09:41:19 less the overlap, but never back
        "2026-07-01T09:05:00+00:00",  # Ada's open at 10:05 less the overlap
        "2026-07-01T09:20:00+00:00",
        "2026-07-01T09:20:00+00:00",
    ]
    assert rows(gateway, "SELECT count(*), count(DISTINCT dedupe_key) FROM inbox") == [(8, 8)]
    assert rows(gateway, "SELECT DISTINCT status FROM inbox") == [("processed",)]
    assert rows(gateway, "SELECT type, count(*) FROM events GROUP BY type ORDER BY type") == [
        ("email.bounced", 1),
        ("email.clicked", 3),
        ("email.opened", 4),
    ]
    assert rows(gateway, "SELECT count(DISTINCT dedupe_key) FROM events") == [(8,)]
    assert rows(gateway, "SELECT email, email_status FROM contacts ORDER BY email") == [
        (ADA, "ok"),
        (BRUNO, "bouncing"),  # a hard bounce marks the address, even if he opens another campaign later
        (CHLOE, "ok"),
    ]
    [(correlation,)] = rows(gateway, "SELECT correlation FROM events WHERE type = 'email.bounced'")
    assert json.loads(correlation)[1] == f"mailchimp-activity:{FIRST_POLL[0]}"
    assert rows(gateway, "SELECT value FROM meta WHERE key = 'cursor:reports'") == [("2026-07-01T09:20:00+00:00",)]
    assert rows(gateway, "SELECT count(*) FROM jobs WHERE kind = 'poll' AND status = 'pending'") == [(1,)]


async def test_a_throttled_or_refused_poll_waits_and_never_dies(
    mailchimp: tuple[Mailchimp, str], aiohttp_client: Any, tmp_path: Path, db_url: str
) -> None:
    state, base = mailchimp
    _, gateway, clock = await start(aiohttp_client, tmp_path, db_url, base, "    campaigns: [b03bfc2ea5]\n")
    state.script.append(("/3.0/reports/", None, 429, {"Retry-After": "1800"}, TOO_MANY))
    await gateway.worker.drain()
    [(status, error)] = rows(gateway, "SELECT status, last_error FROM jobs WHERE kind = 'poll'")
    assert status == "pending" and error.startswith("Mailchimp answered 429 Too Many Requests")
    clock.advance(timedelta(minutes=15))  # the interval has passed, but Mailchimp asked for 30 minutes
    await gateway.worker.drain()
    assert len(state.asked) == 1
    clock.advance(timedelta(minutes=16))
    await gateway.worker.drain()
    assert rows(gateway, "SELECT count(*) FROM inbox") == [(1,)]  # the backfill, from 09:31: Chloé's open

    state.key = "rotated-key-us6"  # the key was revoked in Mailchimp
    state.add(SALE, ADA, "open", "2026-07-01T10:40:00+00:00")
    for _ in range(20):  # far more than max_attempts
        clock.advance(timedelta(minutes=16))
        await gateway.worker.drain()
    [(error,)] = rows(gateway, "SELECT last_error FROM jobs WHERE kind = 'poll' AND status = 'pending'")
    assert error.endswith("check api_key")
    assert rows(gateway, "SELECT DISTINCT status FROM jobs WHERE kind = 'poll'") == [("done",), ("pending",)]
    state.key = KEY
    clock.advance(timedelta(minutes=16))
    await gateway.worker.drain()
    assert rows(gateway, "SELECT count(*) FROM inbox") == [(2,)]  # from the cursor, 09:31: Ada's open of 10:40


@pytest.fixture
async def app_client(aiohttp_client: Any, tmp_path: Path) -> TestClient:
    """One app for every example of the property test (fixtures run per test, not per example)."""
    return (await start(aiohttp_client, tmp_path, f"sqlite:///{tmp_path}/d.db", "http://127.0.0.1:1"))[0]


header_text = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()),
    headers=st.dictionaries(st.sampled_from(["Content-Type", "Authorization", "User-Agent"]), header_text),
    method=st.sampled_from(["POST", "GET", "HEAD", "PUT"]),
    path=st.sampled_from(["/hooks/reports", "/hooks/reports/x", f"/hooks/reports/{KEY}"]),
)
async def test_the_hook_path_answers_4xx_to_anything(
    app_client: TestClient, body: bytes, headers: dict[str, str], method: str, path: str
) -> None:
    response = await app_client.request(method, path, data=body, headers=headers)
    assert 400 <= response.status < 500, await response.text()


async def test_nothing_posted_to_the_hook_path_is_stored(aiohttp_client: Any, tmp_path: Path) -> None:
    """A forged open or click must not get in: the activity comes from Mailchimp's API only."""
    client, gateway, _ = await start(aiohttp_client, tmp_path, f"sqlite:///{tmp_path}/d.db", "http://127.0.0.1:1")
    for path in ("/hooks/reports", f"/hooks/reports/{KEY}"):
        response = await client.post(path, data=STORED[FIRST_POLL[1]])
        assert (response.status, await response.json()) == (
            404,
            {"error": "no source named 'reports' in this deployment"},
        )
    assert (await client.get("/hooks/reports")).status == 404
    assert rows(gateway, "SELECT count(*) FROM inbox") == [(0,)]


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared sample payloads not present")
async def test_audience_webhooks_sent_here_by_mistake_are_refused(aiohttp_client: Any, tmp_path: Path) -> None:
    """The audience webhook samples belong to `plugin: mailchimp`; this source refuses them and stores nothing."""
    client, gateway, _ = await start(aiohttp_client, tmp_path, f"sqlite:///{tmp_path}/d.db", "http://127.0.0.1:1")
    samples = sorted(SHARED.glob("list_webhook_*.json"))
    assert samples
    for sample in samples:
        body = urlencode(json.loads(sample.read_text())).encode()
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        assert (await client.post("/hooks/reports", data=body, headers=headers)).status == 404
    assert rows(gateway, "SELECT count(*) FROM inbox") == [(0,)]


# Who a campaign was sent to (`sent_to: true`) -------------------------------------------------------------------------

FRESH = "f00dfeed01"  # sent today at 09:30: inside the first poll's window


def fresh_campaign(state: Mailchimp, status: str = "sent") -> None:
    sent = status == "sent"
    state.campaigns.append(
        {"id": FRESH, "type": "regular", "status": status, "send_time": "2026-07-01T09:30:00+00:00" if sent else ""}
    )
    state.members[FRESH] = []
    state.recipients[FRESH] = [
        {"email_id": md5(ADA), "email_address": ADA, "status": "sent", "list_id": "57afe96172"},
        {"email_id": md5(BRUNO), "email_address": BRUNO, "status": "hard", "list_id": "57afe96172"},
        {"email_id": md5(CHLOE), "email_address": CHLOE, "status": "sent", "list_id": "57afe96172"},
    ]


def sent_keys(fetched: Fetched) -> list[str]:
    return sorted(k for k in keys(fetched) if k.endswith(":sent"))


def asked(state: Mailchimp, path: str) -> int:
    return sum(1 for where, query in state.asked if where == path and query.get("offset", "0") == "0")


async def test_recipients_are_read_once_per_campaign_sent_within_the_window(mailchimp: tuple[Mailchimp, str]) -> None:
    state, base = mailchimp
    fresh_campaign(state)
    first = await poll(base, sent_to=True, campaigns=[SALE, FRESH], page_size=2)
    assert sent_keys(first) == sorted([f"{FRESH}:{md5(ADA)}:sent", f"{FRESH}:{md5(CHLOE)}:sent"])  # not the bounce
    assert [k for k in keys(first) if not k.endswith(":sent")] == FIRST_POLL  # the activity, as without sent_to
    cursor = json.loads(first.cursor or "")
    # SALE went out on 28 June, before the window: settled without reading who got it.
    assert cursor == {"since": "2026-07-01T09:00:00+00:00", "settled": [SALE, FRESH]}
    assert asked(state, f"/3.0/reports/{SALE}/sent-to") == 0
    pages = [query for where, query in state.asked if where == f"/3.0/reports/{FRESH}/sent-to"]
    assert pages == [{"fields": SENT_TO_FIELDS, "count": "2", "offset": offset} for offset in ("0", "2")]

    again = await poll(
        base, cursor=first.cursor, now=NOW + timedelta(minutes=15), sent_to=True, campaigns=[SALE, FRESH]
    )
    assert sent_keys(again) == [] and asked(state, f"/3.0/reports/{FRESH}/sent-to") == 1
    assert state.since_asked(SALE)[-1] == "2026-07-01T09:00:00+00:00"  # the activity cursor inside the JSON


async def test_a_campaign_not_sent_yet_is_asked_about_again(mailchimp: tuple[Mailchimp, str]) -> None:
    state, base = mailchimp
    fresh_campaign(state, status="schedule")
    first = await poll(base, sent_to=True, campaigns=[FRESH, "0000000000"])
    assert sent_keys(first) == []
    assert json.loads(first.cursor or "")["settled"] == ["0000000000"]  # a missing campaign is not waited for
    state.campaigns[-1].update(status="sent", send_time="2026-07-01T10:05:00+00:00")
    later = await poll(base, cursor=first.cursor, now=NOW + timedelta(minutes=15), sent_to=True, campaigns=[FRESH])
    assert len(sent_keys(later)) == 2


def test_a_recipient_becomes_an_email_sent_event_keyed_like_the_campaigns_activity() -> None:
    items = sent_items(FRESH, NOW, [{"email_id": md5(ADA), "email_address": ADA, "status": "sent", "list_id": "l1"}])
    [(item_key, (_, body))] = items.items()
    [event] = SOURCE.normalize(raw(body))
    assert (event.type, event.contact.email, event.occurred_at) == ("email.sent", ADA, NOW)
    assert event.properties == {"campaign_id": FRESH, "list_id": "l1"}
    assert event.correlation[0] == f"mailchimp-campaign:{FRESH}:{md5(ADA)}"  # what its opens and clicks carry
    assert event.dedupe_key == item_key == f"{FRESH}:{md5(ADA)}:sent"


async def test_a_did_not_open_follow_up_goes_only_to_those_who_did_not_open(
    mailchimp: tuple[Mailchimp, str], aiohttp_client: Any, tmp_path: Path, db_url: str, smtp: SmtpCatcher
) -> None:
    state, base = mailchimp
    fresh_campaign(state)
    state.add(FRESH, ADA, "open", "2026-07-01T09:45:00+00:00")
    pm = get_plugin_manager()
    config = f"""\
storage: {{url: '{db_url}'}}
sources:
  reports: {{plugin: mailchimp_reports, api_key: {KEY}, api_base: '{base}', campaigns: [{FRESH}], sent_to: true}}
sinks:
  email: {{plugin: smtp, host: 127.0.0.1, port: {smtp.port}, tls: none, sender: shop@example.com}}
rules:
  - name: did-not-open
    when: email.sent
    kind: transactional
    exit_on: [email.opened, email.clicked]
    steps:
      - wait: 2d
        send: {{via: email, template: reminder}}
"""
    templates = {"reminder.subject.j2": "Did you see our news?", "reminder.txt.j2": "It is still on."}
    settings_ = load_config(write_deployment(tmp_path, config, templates), collect(pm), pm)
    clock = FakeClock(NOW)
    app = create_app(settings_, pm=pm, clock=clock, role="web")
    await aiohttp_client(app)
    gateway = app[GATEWAY_KEY]
    await gateway.worker.drain()
    clock.advance(timedelta(days=2, minutes=1))
    await gateway.worker.drain()
    assert [m["To"] for m in smtp.messages] == [CHLOE]
    assert rows(gateway, "SELECT status FROM enrolments ORDER BY id") == [("exited",), ("completed",)]
