"""FCM HTTP v1 sink against a local Google: an OAuth2 token endpoint that checks the signed grant, and the API.

Contracts followed by the fake, with their sources:
- Token endpoint: RFC 7523 JWT bearer grant, form `grant_type` + `assertion` (google-auth-library-python
  google/oauth2/_client.py `jwt_grant`); claims iss/scope/aud/iat/exp as google-auth's service_account
  builds them; answer {access_token, expires_in, token_type}; errors as RFC 6749 §5.2 {error, error_description}.
- API: POST /v1/projects/{project}/messages:send (firebase-admin-python messaging.py FCM_URL), answer
  {"name": "projects/.../messages/..."}; errors in the google.rpc.Status envelope with
  details[{"@type": ".../google.firebase.fcm.v1.FcmError", "errorCode"}] (firebase-admin-python
  tests/test_messaging.py test_send_fcm_error_code, and shared/fixtures/payloads/fcm/); 401 UNAUTHENTICATED
  for a bad access token (Google API error model).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import structlog
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from pydantic import ValidationError

import declic_plugins.fcm as fcm
from conftest import SHARED_PAYLOADS
from declic_gateway import Message, Outcome, SendContext
from declic_gateway.config import load_config
from declic_gateway.http.app import create_app
from declic_gateway.http.running import GATEWAY_KEY
from declic_gateway.kit.sources import Deployment
from declic_gateway.plugins import collect, get_plugin_manager
from declic_gateway.testing import FakeClock, ScriptedPlugin, free_port, write_deployment
from declic_plugins.fcm import JWT_BEARER, REFRESH_MARGIN, SCOPE, FcmConfig, FcmSink

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PROJECT = "demo-shop-1234"
CLIENT_EMAIL = f"declic@{PROJECT}.iam.gserviceaccount.com"
MESSAGE = Message(to="", text="2 items are waiting", subject="Your cart, Ada", idempotency_key="dcl-abc")
UNAUTHENTICATED = {
    "error": {
        "code": 401,
        "message": "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie "
        "or other valid authentication credential.",
        "status": "UNAUTHENTICATED",
    }
}


def b64url_decode(text: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def fcm_error(status: str, message: str, code: str | None = None, http: int = 400) -> dict[str, Any]:
    error: dict[str, Any] = {"code": http, "message": message, "status": status}
    if code:
        error["details"] = [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code}]
    return {"error": error}


@dataclass
class Reply:
    status: int = 200
    body: Any = None  # JSON, or bytes as they are
    headers: dict[str, str] = field(default_factory=dict)
    hang: bool = False

    def response(self) -> web.Response:
        raw = self.body if isinstance(self.body, bytes) else json.dumps(self.body).encode()
        kind = "text/html" if isinstance(self.body, bytes) else "application/json"
        return web.Response(status=self.status, body=raw, headers=self.headers, content_type=kind)


class Google:
    """The token endpoint and the FCM API, answering as scripted and checking what they get."""

    def __init__(self) -> None:
        self.server: TestServer | None = None
        self.expires_in = 3599
        self.token_replies: list[Reply] = []
        self.grants: list[dict[str, Any]] = []
        self.valid: set[str] = set()
        self.replies: dict[str, list[Reply]] = {}
        self.received: list[dict[str, Any]] = []
        self.release = asyncio.Event()

    @property
    def base(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        try:
            header, claims = self.verify(str(form.get("assertion", "")), f"{self.base}/token")
            assert form.get("grant_type") == JWT_BEARER
        except (AssertionError, ValueError, KeyError, InvalidSignature):
            return web.json_response(
                {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}, status=400
            )
        self.grants.append({"header": header, "claims": claims, "content_type": request.content_type})
        if self.token_replies:
            reply = self.token_replies.pop(0)
            if reply.hang:
                await asyncio.wait_for(self.release.wait(), 10)
            return reply.response()
        token = f"ya29.test-{len(self.grants)}"
        self.valid.add(token)
        return web.json_response({"access_token": token, "expires_in": self.expires_in, "token_type": "Bearer"})

    @staticmethod
    def verify(assertion: str, audience: str) -> tuple[dict[str, Any], dict[str, Any]]:
        head, body, signature = assertion.split(".")
        KEY.public_key().verify(
            b64url_decode(signature), f"{head}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256()
        )
        header, claims = json.loads(b64url_decode(head)), json.loads(b64url_decode(body))
        assert header["alg"] == "RS256"
        assert claims["iss"] == CLIENT_EMAIL and claims["scope"] == SCOPE and claims["aud"] == audience
        assert abs(claims["iat"] - time.time()) < 60 and claims["exp"] - claims["iat"] <= 3600
        return header, claims

    async def send(self, request: web.Request) -> web.Response:
        bearer = request.headers.get("Authorization", "")
        if not bearer.startswith("Bearer ") or bearer[7:] not in self.valid:
            return web.json_response(UNAUTHENTICATED, status=401)
        body = await request.json()
        self.received.append({"path": request.path, "auth": bearer, "type": request.content_type, "body": body})
        device = body["message"]["token"]
        if self.replies.get(device):
            reply = self.replies[device].pop(0)
            if reply.hang:
                await asyncio.wait_for(self.release.wait(), 10)
            return reply.response()
        return web.json_response({"name": f"projects/{request.match_info['project']}/messages/0:{len(self.received)}"})


@pytest.fixture
async def google() -> AsyncIterator[Google]:
    fake = Google()
    app = web.Application()
    app.router.add_post("/token", fake.token)
    app.router.add_post("/v1/projects/{project}/messages:send", fake.send)
    fake.server = TestServer(app, host="127.0.0.1")
    await fake.server.start_server()
    yield fake
    fake.release.set()
    await fake.server.close()


def key_file(folder: Path, token_uri: str, **changes: Any) -> str:
    """A service account key file as the Firebase console downloads it."""
    pem = KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    data = {
        "type": "service_account",
        "project_id": PROJECT,
        "private_key_id": "0123456789abcdef",
        "private_key": pem.decode(),
        "client_email": CLIENT_EMAIL,
        "client_id": "1234567890",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
        **changes,
    }
    path = folder / "service-account.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return str(path)


@pytest.fixture
async def make_sink(google: Google, tmp_path: Path) -> AsyncIterator[Callable[..., FcmSink]]:
    made: list[FcmSink] = []

    def make(**options: Any) -> FcmSink:
        config = FcmConfig.model_validate(
            {
                "service_account_file": key_file(tmp_path, f"{google.base}/token"),
                "api_base": google.base,
                "timeout": 2,
                **options,
            }
        )
        made.append(FcmSink("push", config, Deployment(None, "UTC", FakeClock())))
        return made[-1]

    yield make
    for sink in made:
        await sink.close()


def context(*tokens: str, **event: Any) -> SendContext:
    devices = [{"kind": "fcm", "address": token, "keys": {}} for token in tokens]
    return SendContext(
        "cart", 1, "marketing", {"first_name": "Ada", "push_subscriptions": devices}, {"properties": event}
    )


# --- what Google receives --------------------------------------------------------------------------------------


async def test_a_signed_grant_then_the_message(google: Google, make_sink: Callable[..., FcmSink]) -> None:
    sink = make_sink(
        data={"url": "{{ event.properties.url }}", "cart": "{{ event.properties.cart }}", "none": "{{ x }}"}
    )
    result = await sink.send(MESSAGE, context("device-1", url="https://shop.example.com/c/k1", cart="k1"))
    assert result.outcome is Outcome.SENT and result.provider_id == f"projects/{PROJECT}/messages/0:1"
    [grant] = google.grants
    assert grant["content_type"] == "application/x-www-form-urlencoded"
    assert grant["header"] == {"alg": "RS256", "typ": "JWT", "kid": "0123456789abcdef"}
    [call] = google.received
    assert call["path"] == f"/v1/projects/{PROJECT}/messages:send"
    assert call["auth"] == "Bearer ya29.test-1" and call["type"] == "application/json"
    assert call["body"] == {
        "message": {
            "token": "device-1",
            "notification": {"title": "Your cart, Ada", "body": "2 items are waiting"},
            "data": {"url": "https://shop.example.com/c/k1", "cart": "k1"},
        }
    }


async def test_no_subject_no_title_and_no_data(google: Google, make_sink: Callable[..., FcmSink]) -> None:
    await make_sink(project_id="other-project").send(Message(to="", text="hi"), context("device-1"))
    [call] = google.received
    assert call["path"] == "/v1/projects/other-project/messages:send"
    assert call["body"] == {"message": {"token": "device-1", "notification": {"body": "hi"}}}


# --- what each answer means ------------------------------------------------------------------------------------

SDK_SAMPLE = SHARED_PAYLOADS / "fcm" / "error_unregistered_from_sdk_test.json"
# The firebase-admin-python sample is read where the shared samples exist (CI); an equivalent envelope elsewhere.
SDK_UNREGISTERED = (
    json.loads(SDK_SAMPLE.read_text())
    if SDK_SAMPLE.is_file()
    else {
        "error": {
            "code": 400,
            "message": "test error",
            "status": "INVALID_ARGUMENT",
            "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "UNREGISTERED"}],
        }
    }
)

# (case, FCM's reply, outcome, retry_after, text in the error, logged as an error)
ANSWERS = [
    ("200 named", Reply(200, {"name": f"projects/{PROJECT}/messages/0:9"}), Outcome.SENT, None, None, False),
    ("200 malformed", Reply(200, b"<html>ok</html>"), Outcome.SENT, None, None, False),
    (
        "404 UNREGISTERED",
        Reply(404, fcm_error("NOT_FOUND", "Requested entity was not found.", "UNREGISTERED", 404)),
        Outcome.ADDRESS_INVALID,
        None,
        "FCM 404 UNREGISTERED: Requested entity was not found.",
        False,
    ),
    ("SDK fixture: errorCode wins", Reply(400, SDK_UNREGISTERED), Outcome.ADDRESS_INVALID, None, "UNREGISTERED", False),
    (
        "403 SENDER_ID_MISMATCH",
        Reply(403, fcm_error("PERMISSION_DENIED", "SenderId mismatch", "SENDER_ID_MISMATCH", 403)),
        Outcome.ADDRESS_INVALID,
        None,
        "SENDER_ID_MISMATCH",
        False,
    ),
    (
        "429 QUOTA_EXCEEDED",
        Reply(429, fcm_error("RESOURCE_EXHAUSTED", "Quota exceeded.", "QUOTA_EXCEEDED", 429), {"Retry-After": "30"}),
        Outcome.RETRY,
        30.0,
        "QUOTA_EXCEEDED",
        False,
    ),
    (
        "503 UNAVAILABLE",
        Reply(503, fcm_error("UNAVAILABLE", "The service is currently unavailable.", "UNAVAILABLE", 503)),
        Outcome.RETRY,
        None,
        "UNAVAILABLE",
        False,
    ),
    (
        "500 INTERNAL",
        Reply(500, fcm_error("INTERNAL", "Internal error encountered.", "INTERNAL", 500), {"Retry-After": "5"}),
        Outcome.RETRY,
        5.0,
        "INTERNAL",
        False,
    ),
    (
        "401 THIRD_PARTY_AUTH_ERROR",
        Reply(
            401, fcm_error("UNAUTHENTICATED", "Auth error from APNS or Web Push Service", "THIRD_PARTY_AUTH_ERROR", 401)
        ),
        Outcome.PERMANENT,
        None,
        "THIRD_PARTY_AUTH_ERROR",
        True,
    ),
    (
        "400 INVALID_ARGUMENT",
        Reply(
            400,
            fcm_error(
                "INVALID_ARGUMENT", "The registration token is not a valid FCM registration token", "INVALID_ARGUMENT"
            ),
        ),
        Outcome.PERMANENT,
        None,
        "INVALID_ARGUMENT",
        False,
    ),
    (
        "403 PERMISSION_DENIED",
        Reply(403, fcm_error("PERMISSION_DENIED", "Permission 'cloudmessaging.messages.create' denied", http=403)),
        Outcome.PERMANENT,
        None,
        "PERMISSION_DENIED",
        True,
    ),
    (
        "404 NOT_FOUND without errorCode",
        Reply(404, fcm_error("NOT_FOUND", "Requested entity was not found.", http=404)),
        Outcome.PERMANENT,
        None,
        "NOT_FOUND",
        False,
    ),
    (
        "502 from a proxy",
        Reply(502, b"<html>Bad Gateway</html>"),
        Outcome.RETRY,
        None,
        "HTTP 502: <html>Bad Gateway",
        False,
    ),
    ("400 not JSON", Reply(400, b"oops"), Outcome.PERMANENT, None, "HTTP 400: oops", False),
    ("429 unreadable Retry-After", Reply(429, b"", {"Retry-After": "later"}), Outcome.RETRY, None, "HTTP 429", False),
]


@pytest.mark.parametrize(("case", "reply", "outcome", "after", "error", "loud"), ANSWERS, ids=[a[0] for a in ANSWERS])
async def test_fcm_answers(
    google: Google,
    make_sink: Callable[..., FcmSink],
    case: str,
    reply: Reply,
    outcome: Outcome,
    after: float | None,
    error: str | None,
    loud: bool,
) -> None:
    google.replies["device-1"] = [reply]
    with structlog.testing.capture_logs() as logs:
        result = await make_sink().send(MESSAGE, context("device-1"))
    assert result.outcome is outcome
    assert result.retry_after == after
    assert (error or "") in (result.error or "")
    assert result.invalid_addresses == (("device-1",) if outcome is Outcome.ADDRESS_INVALID else ())
    assert len(google.received) == 1 and len(google.grants) == 1  # no hidden retries, no second token
    assert any(entry["log_level"] == "error" for entry in logs) == loud
    if outcome is Outcome.SENT:
        assert result.provider_id == (reply.body.get("name") if isinstance(reply.body, dict) else None)


async def test_retry_after_as_an_http_date(google: Google, make_sink: Callable[..., FcmSink]) -> None:
    from email.utils import format_datetime

    when = format_datetime(datetime.now(UTC) + timedelta(seconds=90), usegmt=True)
    google.replies["device-1"] = [
        Reply(503, fcm_error("UNAVAILABLE", "later", "UNAVAILABLE", 503), {"Retry-After": when})
    ]
    result = await make_sink().send(MESSAGE, context("device-1"))
    assert result.outcome is Outcome.RETRY and 80 < (result.retry_after or 0) <= 90


async def test_fcm_that_does_not_answer_in_time_is_retried(google: Google, make_sink: Callable[..., FcmSink]) -> None:
    google.replies["device-1"] = [Reply(hang=True)]
    started = time.monotonic()
    result = await make_sink(timeout=0.3).send(MESSAGE, context("device-1"))
    assert result.outcome is Outcome.RETRY and "TimeoutError" in (result.error or "")
    assert time.monotonic() - started < 2


async def test_connection_refused_is_retried(make_sink: Callable[..., FcmSink]) -> None:
    result = await make_sink(api_base=f"http://127.0.0.1:{free_port()}").send(MESSAGE, context("device-1"))
    assert result.outcome is Outcome.RETRY and "ClientConnectorError" in (result.error or "")


# --- the access token ------------------------------------------------------------------------------------------


async def test_a_refused_access_token_is_replaced_once(google: Google, make_sink: Callable[..., FcmSink]) -> None:
    sink = make_sink()
    await sink.send(MESSAGE, context("device-1"))
    google.valid.clear()  # revoked
    result = await sink.send(MESSAGE, context("device-1"))
    assert result.outcome is Outcome.SENT
    assert len(google.grants) == 2 and google.received[-1]["auth"] == "Bearer ya29.test-2"


async def test_a_refused_token_that_cannot_be_replaced_now_is_retried(
    google: Google, make_sink: Callable[..., FcmSink]
) -> None:
    sink = make_sink()
    await sink.send(MESSAGE, context("device-1"))
    google.valid.clear()
    google.token_replies = [Reply(503, b"unavailable")]
    result = await sink.send(MESSAGE, context("device-1"))
    assert result.outcome is Outcome.RETRY and "token endpoint answered 503" in (result.error or "")


async def test_a_token_refused_twice_is_a_permanent_failure_logged_loudly(
    google: Google, make_sink: Callable[..., FcmSink]
) -> None:
    sink = make_sink()
    google.replies["device-1"] = [Reply(401, UNAUTHENTICATED), Reply(401, UNAUTHENTICATED)]
    with structlog.testing.capture_logs() as logs:
        result = await sink.send(MESSAGE, context("device-1"))
    assert result.outcome is Outcome.PERMANENT and "401 UNAUTHENTICATED" in (result.error or "")
    assert len(google.grants) == 2 and len(google.received) == 2
    assert [e["event"] for e in logs if e["log_level"] == "error"] == [
        "FCM refused the service account: check its project, its roles, and that the Firebase Cloud Messaging API "
        "is enabled"
    ]


async def test_the_token_is_cached_and_shared_by_concurrent_sends(
    google: Google, make_sink: Callable[..., FcmSink]
) -> None:
    sink = make_sink()
    results = await asyncio.gather(*(sink.send(MESSAGE, context(f"device-{i}")) for i in range(5)))
    await sink.send(MESSAGE, context("device-9"))
    assert {r.outcome for r in results} == {Outcome.SENT}
    assert len(google.grants) == 1 and len(google.received) == 6


async def test_the_token_is_replaced_shortly_before_it_expires(
    google: Google, make_sink: Callable[..., FcmSink]
) -> None:
    sink = make_sink()
    now = [1000.0]
    sink.tokens.clock = lambda: now[0]
    await sink.send(MESSAGE, context("device-1"))
    now[0] += 3599 - REFRESH_MARGIN - 1
    await sink.send(MESSAGE, context("device-1"))
    assert len(google.grants) == 1
    now[0] += 1
    await sink.send(MESSAGE, context("device-1"))
    assert len(google.grants) == 2
    assert [c["auth"] for c in google.received] == ["Bearer ya29.test-1"] * 2 + ["Bearer ya29.test-2"]


async def test_a_token_shorter_lived_than_the_margin_is_fetched_each_time(
    google: Google, make_sink: Callable[..., FcmSink]
) -> None:
    google.expires_in = 200
    sink = make_sink()
    for _ in range(2):
        assert (await sink.send(MESSAGE, context("device-1"))).outcome is Outcome.SENT
    assert len(google.grants) == 2


# (case, token endpoint's reply, outcome, retry_after, text in the error, logged as an error)
TOKEN_ANSWERS = [
    (
        "400 invalid_grant",
        Reply(400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}),
        Outcome.PERMANENT,
        None,
        "invalid_grant Invalid JWT Signature.",
        True,
    ),
    (
        "401 invalid_client",
        Reply(401, {"error": "invalid_client", "error_description": "The OAuth client was not found."}),
        Outcome.PERMANENT,
        None,
        "invalid_client",
        True,
    ),
    (
        "503",
        Reply(503, b"unavailable", {"Retry-After": "20"}),
        Outcome.RETRY,
        20.0,
        "token endpoint answered 503",
        False,
    ),
    ("internal_failure", Reply(400, {"error": "internal_failure"}), Outcome.RETRY, None, "internal_failure", False),
    ("200 without a token", Reply(200, {"token_type": "Bearer"}), Outcome.RETRY, None, "malformed answer", False),
    ("200 not JSON", Reply(200, b"<html>"), Outcome.RETRY, None, "malformed answer", False),
    ("no answer in time", Reply(hang=True), Outcome.RETRY, None, "TimeoutError", False),
]


@pytest.mark.parametrize(
    ("case", "reply", "outcome", "after", "error", "loud"), TOKEN_ANSWERS, ids=[t[0] for t in TOKEN_ANSWERS]
)
async def test_token_endpoint_answers(
    google: Google,
    make_sink: Callable[..., FcmSink],
    case: str,
    reply: Reply,
    outcome: Outcome,
    after: float | None,
    error: str,
    loud: bool,
) -> None:
    google.token_replies = [reply]
    with structlog.testing.capture_logs() as logs:
        result = await make_sink(timeout=0.5).send(MESSAGE, context("device-1", "device-2"))
    assert result.outcome is outcome and result.retry_after == after
    assert error in (result.error or "")
    assert google.received == []
    assert any(entry["log_level"] == "error" for entry in logs) == loud


async def test_a_grant_signed_with_another_key_is_refused(google: Google, make_sink: Callable[..., FcmSink]) -> None:
    sink = make_sink()
    sink.tokens.account = fcm.ServiceAccount(
        CLIENT_EMAIL, rsa.generate_private_key(65537, 2048), None, f"{google.base}/token", PROJECT
    )
    result = await sink.send(MESSAGE, context("device-1"))
    assert result.outcome is Outcome.PERMANENT and "Invalid JWT Signature" in (result.error or "")


# --- a contact with several devices ----------------------------------------------------------------------------

GONE = Reply(404, fcm_error("NOT_FOUND", "Requested entity was not found.", "UNREGISTERED", 404))
MISMATCH = Reply(403, fcm_error("PERMISSION_DENIED", "SenderId mismatch", "SENDER_ID_MISMATCH", 403))
BUSY = Reply(503, fcm_error("UNAVAILABLE", "later", "UNAVAILABLE", 503), {"Retry-After": "40"})
QUOTA = Reply(429, fcm_error("RESOURCE_EXHAUSTED", "Quota exceeded.", "QUOTA_EXCEEDED", 429), {"Retry-After": "60"})
BAD = Reply(400, fcm_error("INVALID_ARGUMENT", "bad", "INVALID_ARGUMENT"))

# (case, one reply per device (None: accepted), outcome, the devices dropped, retry_after)
SEVERAL = [
    ("all accepted", [None, None], Outcome.SENT, [], None),
    ("one gone, one accepted", [GONE, None], Outcome.SENT, [0], None),
    ("all gone", [GONE, MISMATCH], Outcome.ADDRESS_INVALID, [0, 1], None),
    ("all busy", [BUSY, QUOTA], Outcome.RETRY, [], 60.0),
    ("one gone, one busy", [GONE, BUSY], Outcome.RETRY, [0], 40.0),
    ("one refused, one gone", [BAD, GONE], Outcome.PERMANENT, [1], None),
]


@pytest.mark.parametrize(("case", "replies", "outcome", "dropped", "after"), SEVERAL, ids=[s[0] for s in SEVERAL])
async def test_every_device_gets_its_message(
    google: Google,
    make_sink: Callable[..., FcmSink],
    case: str,
    replies: list[Reply | None],
    outcome: Outcome,
    dropped: list[int],
    after: float | None,
) -> None:
    devices = [f"device-{i}" for i in range(len(replies))]
    for device, reply in zip(devices, replies, strict=True):
        if reply is not None:
            google.replies[device] = [reply]
    webpush = {"kind": "webpush", "address": "https://push.example/x", "keys": {}}
    ctx = context(*devices)
    ctx.contact["push_subscriptions"].insert(0, webpush)
    result = await make_sink().send(MESSAGE, ctx)
    assert result.outcome is outcome
    assert result.invalid_addresses == tuple(devices[i] for i in dropped)
    assert result.retry_after == after
    assert sorted(c["body"]["message"]["token"] for c in google.received) == devices
    if case == "all accepted":
        assert len((result.provider_id or "").split(",")) == 2


def test_address_is_the_first_fcm_token(tmp_path: Path) -> None:
    config = FcmConfig(service_account_file=key_file(tmp_path, "https://oauth2.googleapis.com/token"))
    sink = FcmSink("push", config, Deployment(None, "UTC", FakeClock()))
    devices = [
        {"kind": "webpush", "address": "https://a/1"},
        {"kind": "fcm", "address": "t1"},
        {"kind": "fcm", "address": "t2"},
    ]
    assert sink.address({"push_subscriptions": devices}) == "t1"
    assert sink.address({"push_subscriptions": devices[:1]}) is None
    assert sink.url == f"https://fcm.googleapis.com/v1/projects/{PROJECT}/messages:send"


# --- config ----------------------------------------------------------------------------------------------------


def _ec_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


BAD_FILES = [
    ("missing", None, "cannot read"),
    ("not JSON", "{not json", "is not JSON"),
    ("a list", "[]", "has no client_email, private_key, token_uri, project_id"),
    ("no client_email", {"client_email": ""}, "has no client_email"),
    ("not a key", {"private_key": "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"}, "not an RSA"),
    ("an EC key", {"private_key": _ec_pem()}, "not an RSA private key"),
]


@pytest.mark.parametrize(("case", "content", "message"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_a_bad_key_file_is_reported_at_load(tmp_path: Path, case: str, content: Any, message: str) -> None:
    path = key_file(tmp_path, "https://oauth2.googleapis.com/token")
    if content is None:
        Path(path).unlink()
    elif isinstance(content, str):
        Path(path).write_text(content)
    else:
        key_file(tmp_path, "https://oauth2.googleapis.com/token", **content)
    with pytest.raises(ValidationError, match=message):
        FcmConfig.model_validate({"service_account_file": path})


def test_a_bad_data_template_is_reported_at_load(tmp_path: Path) -> None:
    path = key_file(tmp_path, "https://oauth2.googleapis.com/token")
    with pytest.raises(ValidationError, match=r"data\.url: invalid template"):
        FcmConfig.model_validate({"service_account_file": path, "data": {"url": "{{ event.properties.url"}})


# --- end to end: a rule sends through the real app -------------------------------------------------------------


CONFIG = """\
storage: {{url: '{db_url}'}}
sources:
  in: {{plugin: scripted, url_token: tok}}
sinks:
  app:
    plugin: fcm
    service_account_file: {key_file}
    api_base: {api_base}
    data: {{url: "{{{{ event.properties.url }}}}"}}
worker:
  retry_base: 10s
policies:
  consent: {{push: required}}
rules:
  - name: cart
    when: track.cart_left
    send: {{via: app, template: cart}}
"""
TEMPLATES = {
    "cart.subject.j2": "Your cart, {{ contact.first_name }}",
    "cart.txt.j2": "{{ event.properties.count }} items",
}


async def test_a_rule_retries_then_reaches_the_live_device_and_forgets_the_dead_one(
    aiohttp_client: Any, tmp_path: Path, db_url: str, google: Google
) -> None:
    pm = get_plugin_manager(load_entry_points=False, extra=[ScriptedPlugin(), fcm])
    text = CONFIG.format(db_url=db_url, key_file=key_file(tmp_path, f"{google.base}/token"), api_base=google.base)
    settings = load_config(write_deployment(tmp_path, text, TEMPLATES), collect(pm), pm)
    clock = FakeClock(datetime(2026, 6, 1, 12, tzinfo=UTC))
    app = create_app(settings, pm=pm, clock=clock, role="web")
    client = await aiohttp_client(app)
    gateway = app[GATEWAY_KEY]
    google.replies = {"phone": [BUSY], "old-tablet": [GONE]}
    devices = [{"kind": "fcm", "address": "phone"}, {"kind": "fcm", "address": "old-tablet"}]
    event = {
        "type": "track.cart_left",
        "contact": {
            "email": "ada@example.com",
            "first_name": "Ada",
            "consent": {"push": "granted"},
            "push_subscriptions": devices,
        },
        "properties": {"count": 2, "url": "https://shop.example.com/cart"},
        "correlation": ["cart:1"],
    }
    assert (await client.post("/hooks/in/tok", data=json.dumps([event]).encode())).status == 200
    await gateway.worker.drain()

    def state() -> tuple[Any, list[str]]:
        with gateway.db.engine.connect() as conn:
            delivery = conn.execute(sa.text("SELECT status, provider_id, attempts, reason FROM deliveries")).one()
            left = conn.execute(sa.text("SELECT address FROM push_subscriptions")).scalars().all()
        return tuple(delivery), list(left)

    (status, provider_id, attempts, reason), left = state()
    assert (status, provider_id, attempts) == ("retrying", None, 1) and "UNAVAILABLE" in reason
    assert left == ["phone"]  # the dead token goes at once, even though the step will be retried

    clock.advance(timedelta(seconds=41))  # past FCM's Retry-After
    await gateway.worker.drain()
    (status, provider_id, attempts, _), left = state()
    assert (status, attempts) == ("sent", 2) and provider_id == f"projects/{PROJECT}/messages/0:3"
    assert left == ["phone"]
    tokens = [c["body"]["message"]["token"] for c in google.received]
    assert sorted(tokens[:2]) == ["old-tablet", "phone"] and tokens[2:] == ["phone"]
    last = google.received[-1]["body"]["message"]
    assert last == {
        "token": "phone",
        "notification": {"title": "Your cart, Ada", "body": "2 items"},
        "data": {"url": "https://shop.example.com/cart"},
    }


def test_a_relative_key_file_is_read_from_the_config_files_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`declic serve --config /etc/declic/declic.yaml` finds `key.json` beside it, wherever it starts."""
    folder = tmp_path / "deployment"
    folder.mkdir()
    Path(key_file(folder, "https://oauth2.googleapis.com/token")).rename(folder / "key.json")
    config = "sinks:\n  app: {plugin: fcm, service_account_file: key.json}\n"
    path = write_deployment(folder, config, {})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    pm = get_plugin_manager()

    settings = load_config(path, collect(pm), pm)

    _, app = settings.sink_plugins["app"]
    assert isinstance(app, FcmConfig)
    assert Path(app.service_account_file) == folder / "key.json"
