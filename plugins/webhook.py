"""Signed outbound webhooks (Standard Webhooks) to a configured URL.

Each step POSTs one JSON document about the message to `url`, signed as Standard Webhooks
prescribes, so that a receiver verifies it with any of that project's libraries:
`webhook-id` (the step's idempotency key, the same on every retry: receivers dedupe on it),
`webhook-timestamp` (seconds) and `webhook-signature` = `v1,` + base64(HMAC-SHA256(secret,
"{id}.{timestamp}.{body}")). The URL is the user's, so calls go through the core's SSRF guard:
every resolved address is checked at connect time and redirects are never followed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Callable
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import aiohttp
from pydantic import Field, SecretStr, field_validator
from yarl import URL

from declic_gateway import (
    DeliveryResult,
    Deployment,
    ForbiddenAddress,
    GuardedClient,
    Message,
    SendContext,
    Sink,
    SinkConfig,
    hookimpl,
    retry_after,
)

SECRET_PREFIX = "whsec_"
#: How much of a receiver's answer goes into the delivery's error text.
BODY_CAP = 1024
#: Where a receiver may say which id it gave the message, after a JSON body's `id`.
ID_HEADERS = ("X-Message-Id", "X-Request-Id")
_CONTACT_FIELDS = ("id", "email", "phone", "first_name", "last_name")


class WebhookConfig(SinkConfig):
    url: str = Field(description="The receiver's URL (http or https); every step of a rule POSTs here.")
    secret: SecretStr = Field(
        description="Standard Webhooks signing secret: whsec_ followed by base64 (24 to 64 random bytes), "
        "or the base64 part alone, as the receiver's Standard Webhooks library takes it."
    )
    allow: list[str] = Field(
        default_factory=list,
        description="Host names and CIDR networks that may be called although they are not public addresses, "
        "e.g. [hooks.internal, 10.0.0.0/8]. Default: only public addresses are called.",
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        url = URL(value)
        if url.scheme not in ("http", "https") or not url.raw_host:
            raise ValueError(f"{value!r} is not an http(s) URL with a host")
        if url.user is not None or url.password is not None:
            raise ValueError("credentials in the URL are not sent; drop them (the signature authenticates us)")
        return value

    @field_validator("secret")
    @classmethod
    def _base64_secret(cls, value: SecretStr) -> SecretStr:
        secret_key(value.get_secret_value())
        return value


def secret_key(secret: str) -> bytes:
    """The HMAC key: the base64 after an optional whsec_ prefix (padding optional), as reference libraries read it."""
    encoded = secret.strip().removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(
            "the secret must be base64, optionally prefixed with whsec_; generate one with: python -c "
            "\"import base64, secrets; print('whsec_' + base64.b64encode(secrets.token_bytes(32)).decode())\""
        ) from None
    if not key:
        raise ValueError("the secret is empty")
    return key


def sign(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """The webhook-signature header value (Standard Webhooks, version v1)."""
    digest = hmac.new(key, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


class Webhook(Sink):
    name = "webhook"
    channel = "webhook"
    Config = WebhookConfig

    def __init__(self, key: str, config: WebhookConfig, deployment: Deployment):
        super().__init__(key, config, deployment)
        self._key = secret_key(config.secret.get_secret_value())
        self._client: GuardedClient | None = None

    def address(self, contact: dict[str, Any]) -> str | None:
        return str(self.config.url)

    async def start(self) -> None:
        self._guarded()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    def _guarded(self) -> GuardedClient:
        if self._client is None:
            self._client = GuardedClient(allow=self.config.allow, timeout=self.config.timeout)
        return self._client

    async def send(self, message: Message, ctx: SendContext) -> DeliveryResult:
        body = payload(message, ctx)
        timestamp = int(self.deployment.clock.now().timestamp())
        headers = {
            "Content-Type": "application/json",
            "webhook-id": message.idempotency_key,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(self._key, message.idempotency_key, timestamp, body),
        }
        try:
            async with self._guarded().request("POST", self.config.url, data=body, headers=headers) as response:
                head = await _head(response)
                return self._outcome(response.status, response.headers, head, message.idempotency_key)
        except ForbiddenAddress as exc:
            return DeliveryResult.permanent(f"not called: {exc}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            return DeliveryResult.retry(f"receiver unreachable: {type(exc).__name__}: {exc}".rstrip(": "))

    def _outcome(self, status: int, headers: Any, head: bytes, webhook_id: str) -> DeliveryResult:
        """2xx sent; 408, 429 and 5xx retried (Retry-After honoured); redirects and other 4xx are permanent."""
        if 200 <= status < 300:
            return DeliveryResult.sent(_provider_id(headers, head) or webhook_id)
        said = f"receiver answered {status}: {_excerpt(head)}"
        if 300 <= status < 400:
            where = headers.get("Location", "(no Location)")
            return DeliveryResult.permanent(f"redirects are not followed ({status} to {where}); fix `url`")
        if status in (408, 429) or status >= 500:
            return DeliveryResult.retry(
                said, after=retry_after(headers.get("Retry-After"), self.deployment.clock.now())
            )
        if status == 410:
            return DeliveryResult.permanent(f"{said} (410 Gone: the receiver retired this endpoint)")
        return DeliveryResult.permanent(said)


def payload(message: Message, ctx: SendContext) -> bytes:
    document = {
        "type": "declic.message",
        "rule": ctx.rule,
        "step": ctx.step,
        "kind": ctx.kind,
        "contact": {name: ctx.contact.get(name) for name in _CONTACT_FIELDS},
        "event": ctx.event,
        "message": {"subject": message.subject, "text": message.text, "html": message.html},
    }
    return json.dumps(document, default=_plain, ensure_ascii=False, separators=(",", ":")).encode()


def _plain(value: Any) -> Any:
    """Money stays exact as a string; times are ISO 8601."""
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    raise TypeError(f"cannot send {type(value).__name__} as JSON")


async def _head(response: aiohttp.ClientResponse) -> bytes:
    """The first BODY_CAP bytes of the answer: enough to explain a failure, never a receiver's whole page."""
    head = b""
    while len(head) < BODY_CAP:
        chunk = await response.content.read(BODY_CAP - len(head))
        if not chunk:
            break
        head += chunk
    return head


def _excerpt(head: bytes) -> str:
    text = head.decode("utf-8", "replace").strip()
    return text + ("…" if len(head) >= BODY_CAP else "") if text else "(empty body)"


def _provider_id(headers: Any, head: bytes) -> str | None:
    try:
        data = json.loads(head)
    except (ValueError, RecursionError):
        data = None
    value = data.get("id") if isinstance(data, dict) else None
    if isinstance(value, (str, int)) and not isinstance(value, bool) and 0 < len(str(value)) <= 200:
        return str(value)
    return next((headers[name][:200] for name in ID_HEADERS if headers.get(name)), None)


@hookimpl
def register_sinks(register: Callable[[type[Sink]], None]) -> None:
    register(Webhook)
