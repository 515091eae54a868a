"""Push through Firebase Cloud Messaging HTTP v1, authorised by a service account's OAuth2 token.

A contact may have the app on several devices. FCM v1 has no batch endpoint, so each
registration token gets its own call; the message counts as sent when one device's call
succeeded, and the tokens FCM says are gone (UNREGISTERED, SENDER_ID_MISMATCH) are listed so
that the core deletes them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import jinja2
import structlog
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from multidict import CIMultiDictProxy
from pydantic import Field, field_validator
from yarl import URL

from declic_gateway import (
    ConfigPath,
    DeliveryResult,
    GuardedClient,
    Message,
    SendContext,
    Sink,
    SinkConfig,
    hookimpl,
    make_environment,
    retry_after,
)

log = structlog.get_logger("declic.fcm")

KIND = "fcm"
SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
#: RFC 7523 §2.1, the grant google-auth's oauth2/_client.py `jwt_grant` sends.
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
#: google-auth signs service-account assertions for an hour (service_account `_DEFAULT_TOKEN_LIFETIME_SECS`)...
ASSERTION_LIFETIME = 3600
#: ...and refreshes a token this long before it expires (`_helpers.REFRESH_THRESHOLD`, 3 min 45 s).
REFRESH_MARGIN = 225.0
#: firebase-admin-python reads the errorCode of the detail with this @type before the google.rpc status.
FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
#: The SDK's UnregisteredError and SenderIdMismatchError: the token will never work again.
GONE = frozenset({"UNREGISTERED", "SENDER_ID_MISMATCH"})
#: QuotaExceededError, UnavailableError, InternalError (and the canonical RESOURCE_EXHAUSTED): later.
TRANSIENT = frozenset({"QUOTA_EXCEEDED", "UNAVAILABLE", "INTERNAL", "RESOURCE_EXHAUSTED"})
#: ThirdPartyAuthError: the APNs or web push credentials uploaded to the Firebase project are wrong.
THIRD_PARTY = frozenset({"THIRD_PARTY_AUTH_ERROR", "APNS_AUTH_ERROR"})
EXCERPT = 200


@dataclass(frozen=True)
class ServiceAccount:
    """The fields of a service account key file that the JWT bearer grant needs."""

    client_email: str
    private_key: rsa.RSAPrivateKey
    key_id: str | None
    token_uri: str
    project_id: str

    @classmethod
    def load(cls, path: str) -> ServiceAccount:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror}") from None
        except ValueError:
            raise ValueError(f"{path} is not JSON: download the service account key again") from None
        fields = ("client_email", "private_key", "token_uri", "project_id")
        missing = [f for f in fields if not isinstance(data, dict) or not isinstance(data.get(f), str) or not data[f]]
        if missing:
            raise ValueError(f"{path} has no {', '.join(missing)}: is it a service account key file?")
        try:
            key = serialization.load_pem_private_key(data["private_key"].encode(), password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            key = None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError(f"{path}: private_key is not an RSA private key in PEM")
        return cls(data["client_email"], key, data.get("private_key_id"), data["token_uri"], data["project_id"])

    def assertion(self, now: int) -> str:
        """The signed JWT exchanged for an access token (RFC 7523 §3), as google-auth builds it."""
        header: dict[str, str] = {"alg": "RS256", "typ": "JWT"}
        if self.key_id:
            header["kid"] = self.key_id
        claims = {
            "iss": self.client_email,
            "scope": SCOPE,
            "aud": self.token_uri,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME,
        }
        signing_input = f"{_b64json(header)}.{_b64json(claims)}".encode()
        signature = self.private_key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input.decode()}.{_b64(signature)}"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64json(value: dict[str, Any]) -> str:
    return _b64(json.dumps(value, separators=(",", ":")).encode())


class TokenFailed(Exception):
    """The token endpoint gave no token; `result` is what every send waiting on it becomes."""

    def __init__(self, result: DeliveryResult):
        super().__init__(result.error)
        self.result = result


class AccessTokens:
    """One access token at a time: fetched once for concurrent sends, replaced shortly before it expires."""

    def __init__(self, account: ServiceAccount, clock: Callable[[], float] = time.monotonic):
        self.account = account
        self.clock = clock
        self._token: str | None = None
        self._expires = 0.0
        self._lock = asyncio.Lock()

    async def get(self, session: GuardedClient) -> str:
        async with self._lock:
            if self._token is None or self.clock() >= self._expires - REFRESH_MARGIN:
                self._token, lifetime = await self._fetch(session)
                self._expires = self.clock() + lifetime
            return self._token

    def discard(self, token: str) -> None:
        """FCM refused this token; the next get() fetches another (unless one already replaced it)."""
        if self._token == token:
            self._token = None

    async def _fetch(self, session: GuardedClient) -> tuple[str, float]:
        form = {"grant_type": JWT_BEARER, "assertion": self.account.assertion(int(time.time()))}
        try:
            async with session.request("POST", self.account.token_uri, data=form) as response:
                status, body, headers = response.status, await response.read(), response.headers
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TokenFailed(DeliveryResult.retry(f"token endpoint: {_describe(exc)}")) from None
        answer = _json(body)
        if status == 200:
            token, lifetime = answer.get("access_token"), answer.get("expires_in", 3600)
            if isinstance(token, str) and token and isinstance(lifetime, int | float):
                return token, float(lifetime)
            raise TokenFailed(DeliveryResult.retry(f"token endpoint: malformed answer {_excerpt(body)!r}"))
        # RFC 6749 §5.2 error answer, e.g. invalid_grant "Invalid JWT Signature." for a deleted key.
        error = f"token endpoint answered {status}: {answer.get('error', '')} {answer.get('error_description', '')}"
        if status == 429 or status >= 500 or answer.get("error") == "internal_failure":
            raise TokenFailed(
                DeliveryResult.retry(error.strip(), after=retry_after(headers.get("Retry-After"), datetime.now(UTC)))
            )
        log.error(
            "Google refused the FCM service account: create a new key for it and update service_account_file",
            client_email=self.account.client_email,
            answer=error,
        )
        raise TokenFailed(DeliveryResult.permanent(error.strip()))


class FcmConfig(SinkConfig):
    service_account_file: ConfigPath = Field(
        description="Service account key (JSON) from Firebase console > Project settings > Service accounts; "
        "a relative path is read from the config file's folder."
    )
    project_id: str | None = Field(None, description="Firebase project ID; default: the key file's project_id.")
    api_base: str = Field("https://fcm.googleapis.com", description="FCM API root URL; tests and proxies change it.")
    data: dict[str, str] = Field(
        default_factory=dict,
        description='Key-value pairs handed to the app, each a template (e.g. url: "{{ event.properties.url }}"); '
        "empty values are left out.",
    )

    @field_validator("service_account_file")
    @classmethod
    def _readable(cls, value: str) -> str:
        ServiceAccount.load(value)
        return value

    @field_validator("data")
    @classmethod
    def _templates(cls, value: dict[str, str]) -> dict[str, str]:
        env = make_environment(None)
        for key, text in value.items():
            try:
                env.parse(text)
            except jinja2.TemplateSyntaxError as exc:
                raise ValueError(f"data.{key}: invalid template: {exc.message}") from None
        return value


@dataclass(frozen=True)
class Answer:
    """One reply of the FCM API."""

    status: int
    body: bytes
    headers: CIMultiDictProxy[str]

    def error(self) -> tuple[str, str]:
        """(code, message) from the google.rpc.Status envelope, read as firebase-admin-python reads it."""
        error = _json(self.body).get("error")
        if not isinstance(error, dict):
            return f"HTTP {self.status}", _excerpt(self.body)
        details = error.get("details")
        fcm_details = [d for d in details if isinstance(d, dict)] if isinstance(details, list) else []
        codes = [d.get("errorCode") for d in fcm_details if d.get("@type") == FCM_ERROR_TYPE]
        code = next((c for c in codes if isinstance(c, str) and c), None) or error.get("status")
        return str(code or f"HTTP {self.status}"), str(error.get("message") or "")

    @property
    def unauthenticated(self) -> bool:
        """Our access token was refused (not a third party's credentials)."""
        return self.status == 401 and self.error()[0] not in THIRD_PARTY


class FcmSink(Sink):
    name = "fcm"
    channel = "push"
    Config = FcmConfig

    def __init__(self, key: str, config: FcmConfig, deployment: Any):
        super().__init__(key, config, deployment)
        account = ServiceAccount.load(config.service_account_file)
        self.tokens = AccessTokens(account)
        self.url = f"{config.api_base.rstrip('/')}/v1/projects/{config.project_id or account.project_id}/messages:send"
        env = make_environment(None)
        self._data = {name: env.from_string(text) for name, text in config.data.items()}
        # The configured API and token hosts are trusted (a proxy may be local); a redirect is never followed.
        hosts = [URL(url).raw_host or "" for url in (config.api_base, account.token_uri)]
        self._client = GuardedClient(allow=hosts, timeout=config.timeout)

    def address(self, contact: dict[str, Any]) -> str | None:
        return next(iter(registration_tokens(contact)), None)

    def _http(self) -> GuardedClient:
        return self._client

    async def close(self) -> None:
        await self._client.close()

    async def send(self, message: Message, ctx: SendContext) -> DeliveryResult:
        devices = registration_tokens(ctx.contact)
        if not devices:
            return DeliveryResult.permanent("the contact has no FCM registration token")
        try:
            content = self.build(message, ctx)
        except jinja2.TemplateError as exc:
            return DeliveryResult.permanent(f"fcm sink {self.key}: {exc}")
        try:
            bearer = await self.tokens.get(self._http())
        except TokenFailed as exc:
            return exc.result
        results = await asyncio.gather(*(self._push(device, content, bearer) for device in devices))
        return DeliveryResult.combine(list(zip(devices, results, strict=True)))

    def build(self, message: Message, ctx: SendContext) -> dict[str, Any]:
        """The message fields every device gets: the notification, and the data strings (FCM takes only strings)."""
        notification = {"title": message.subject, "body": message.text} if message.subject else {"body": message.text}
        context = {"event": ctx.event, "contact": ctx.contact, "rule": ctx.rule, "step": ctx.step}
        data = {name: template.render(context) for name, template in self._data.items()}
        content: dict[str, Any] = {"notification": notification}
        if any(data.values()):
            content["data"] = {name: value for name, value in data.items() if value}
        return content

    async def _push(self, device: str, content: dict[str, Any], bearer: str) -> DeliveryResult:
        answer = await self._call(device, content, bearer)
        if isinstance(answer, Answer) and answer.unauthenticated:
            # The access token was revoked or expired early: fetch another and try once more.
            self.tokens.discard(bearer)
            try:
                bearer = await self.tokens.get(self._http())
            except TokenFailed as exc:
                return exc.result
            answer = await self._call(device, content, bearer)
        return answer if isinstance(answer, DeliveryResult) else self._classify(answer)

    async def _call(self, device: str, content: dict[str, Any], bearer: str) -> Answer | DeliveryResult:
        body = {"message": {"token": device, **content}}
        try:
            auth = {"Authorization": f"Bearer {bearer}"}
            async with self._http().request("POST", self.url, json=body, headers=auth) as reply:
                return Answer(reply.status, await reply.read(), reply.headers)
        except (aiohttp.ClientError, TimeoutError) as exc:
            return DeliveryResult.retry(_describe(exc))

    def _classify(self, answer: Answer) -> DeliveryResult:
        """What FCM's answer means for this device (firebase-admin-python messaging error classes)."""
        if 200 <= answer.status < 300:
            name = _json(answer.body).get("name")
            if isinstance(name, str) and name:
                return DeliveryResult.sent(name)
            log.warning("FCM accepted a message without naming it", sink=self.key, answer=_excerpt(answer.body))
            return DeliveryResult.sent(None)
        code, text = answer.error()
        error = f"FCM {answer.status} {code}: {text}".strip().rstrip(":")
        if code in GONE:
            return DeliveryResult.address_invalid(error)
        if code in THIRD_PARTY:
            log.error(
                "FCM could not use the APNs or web push credentials of the Firebase project: fix them in the "
                "Firebase console (Project settings > Cloud Messaging)",
                sink=self.key,
                error=error,
            )
            return DeliveryResult.permanent(error)
        if code != "INVALID_ARGUMENT" and (code in TRANSIENT or answer.status == 429 or answer.status >= 500):
            return DeliveryResult.retry(error, after=retry_after(answer.headers.get("Retry-After"), datetime.now(UTC)))
        if answer.status in (401, 403):
            log.error(
                "FCM refused the service account: check its project, its roles, and that the Firebase Cloud "
                "Messaging API is enabled",
                sink=self.key,
                error=error,
            )
        return DeliveryResult.permanent(error)


def registration_tokens(contact: dict[str, Any]) -> list[str]:
    return [d["address"] for d in contact.get("push_subscriptions") or () if d.get("kind") == KIND and d.get("address")]


def _json(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _excerpt(body: bytes) -> str:
    return body[:EXCERPT].decode("utf-8", "replace").strip()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".rstrip(": ")


@hookimpl
def register_sinks(register: Callable[[type[Sink]], None]) -> None:
    register(FcmSink)
