"""Web Push notifications (RFC 8030), encrypted with aes128gcm (RFC 8291) and identified by VAPID (RFC 8292).

A contact may have several browsers. Each subscription gets its own encrypted copy; the
message counts as sent when one browser's push service took it, and the subscriptions a
push service says are gone (404, 410) are listed so that the core deletes them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal

import aiohttp
import click
import jinja2
import structlog
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from multidict import CIMultiDictProxy
from pydantic import Field, SecretStr, field_validator
from yarl import URL

from declic_gateway import (
    DeliveryResult,
    ForbiddenAddress,
    GuardedClient,
    Message,
    SendContext,
    Sink,
    SinkConfig,
    hookimpl,
    make_environment,
    retry_after,
)

log = structlog.get_logger("declic.webpush")

KIND = "webpush"
#: RFC 8291 §4 (and Appendix A): one record, announced as 4096 octets.
RECORD_SIZE = 4096
#: RFC 8291 §4: a push service need only take 4096 octets of body; less the 86-octet header
#: (salt 16, rs 4, idlen 1, sender key 65), the 16-octet GCM tag and the 1-octet padding
#: delimiter, that leaves 3993 octets of plaintext.
MAX_PLAINTEXT = RECORD_SIZE - 86 - 16 - 1
#: RFC 8292 §2: `exp` at most 24 h ahead. Tokens are reused per push service until an hour before.
VAPID_LIFETIME = 12 * 3600
VAPID_REUSE_MARGIN = 3600
#: RFC 8030 §5.4: a topic is at most 32 characters of the URL-safe base64 alphabet.
TOPIC = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
BODY_EXCERPT = 200


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    """Browsers give unpadded base64url; standard base64 decodes too."""
    return base64.urlsafe_b64decode(text.strip() + "=" * (-len(text.strip()) % 4))


def _point(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def load_private_key(text: str) -> ec.EllipticCurvePrivateKey:
    """A P-256 private key written as base64url of its 32 raw bytes, or as PEM."""
    text = text.strip()
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_private_key(text.encode(), password=None)
        else:
            raw = b64url_decode(text)
            if len(raw) != 32:
                raise ValueError(f"{len(raw)} bytes, not 32")
            key = ec.derive_private_key(int.from_bytes(raw, "big"), ec.SECP256R1())
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"not a P-256 private key ({exc}); make a key pair with `declic webpush-keys`") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("not a P-256 (prime256v1) EC private key; make a key pair with `declic webpush-keys`")
    return key


def generate_vapid_keys() -> tuple[str, str]:
    """A new VAPID key pair: (private key as base64url of 32 bytes, public key as base64url uncompressed point)."""
    key = ec.generate_private_key(ec.SECP256R1())
    return b64url(key.private_numbers().private_value.to_bytes(32, "big")), b64url(_point(key.public_key()))


def encrypt(
    plaintext: bytes,
    p256dh: bytes,
    auth: bytes,
    sender: ec.EllipticCurvePrivateKey | None = None,
    salt: bytes | None = None,
) -> bytes:
    """RFC 8291 §3-4: the aes128gcm body for the browser holding (p256dh, auth); sender and salt fresh per message."""
    if len(p256dh) != 65 or p256dh[0] != 4:
        raise ValueError("p256dh is not an uncompressed P-256 point")
    if len(auth) != 16:
        raise ValueError("auth is not 16 bytes")
    sender = sender or ec.generate_private_key(ec.SECP256R1())
    salt = salt or os.urandom(16)
    browser = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), p256dh)
    ours = _point(sender.public_key())
    shared = sender.exchange(ec.ECDH(), browser)
    ikm = _hkdf(auth, shared, b"WebPush: info\0" + p256dh + ours, 32)
    key = _hkdf(salt, ikm, b"Content-Encoding: aes128gcm\0", 16)
    nonce = _hkdf(salt, ikm, b"Content-Encoding: nonce\0", 12)
    record = AESGCM(key).encrypt(nonce, plaintext + b"\x02", None)  # 0x02: the last (only) record, no padding
    return salt + RECORD_SIZE.to_bytes(4, "big") + bytes([len(ours)]) + ours + record


def _hkdf(salt: bytes, ikm: bytes, info: bytes, length: int) -> bytes:
    return HKDF(hashes.SHA256(), length, salt=salt, info=info).derive(ikm)


def vapid_token(key: ec.EllipticCurvePrivateKey, audience: str, subject: str, expires: int) -> str:
    """RFC 8292 §2: an ES256 JWT naming the push service's origin, our contact, and an expiry."""
    header = b64url(b'{"typ":"JWT","alg":"ES256"}')
    claims = b64url(json.dumps({"aud": audience, "exp": expires, "sub": subject}, separators=(",", ":")).encode())
    signing_input = f"{header}.{claims}".encode()
    r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
    return f"{header}.{claims}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def _template(value: str | None) -> str | None:
    if value is not None:
        try:
            make_environment(None).parse(value)
        except jinja2.TemplateSyntaxError as exc:
            raise ValueError(f"invalid template: {exc.message}") from None
    return value


class WebPushConfig(SinkConfig):
    vapid_private_key: SecretStr = Field(
        description="VAPID private key: base64url of the 32-byte P-256 key (as `declic webpush-keys` prints) or PEM."
    )
    vapid_subject: str = Field(
        description="How push services reach you about your traffic: a mailto: or https: URL (the JWT `sub`)."
    )
    ttl: int = Field(
        86400, ge=0, description="Seconds a push service keeps a message for an offline browser (TTL header)."
    )
    urgency: Literal["very-low", "low", "normal", "high"] | None = Field(
        None, description="Urgency header; none sent means normal."
    )
    topic: str | None = Field(
        None,
        description="Topic header, a template: a newer undelivered message with the same topic replaces the older "
        "(at most 32 characters: letters, digits, - and _).",
    )
    url: str | None = Field(
        None, description='Page to open on a click, a template (e.g. "{{ event.properties.recovery_url }}").'
    )
    allow: list[str] = Field(
        default_factory=list,
        description="Host names or CIDR networks an endpoint may reach besides public addresses (endpoints come "
        "from browsers, so private addresses are refused by default).",
    )

    @field_validator("vapid_private_key")
    @classmethod
    def _loads(cls, value: SecretStr) -> SecretStr:
        load_private_key(value.get_secret_value())
        return value

    @field_validator("vapid_subject")
    @classmethod
    def _contact(cls, value: str) -> str:
        if not value.startswith(("mailto:", "https:")):
            raise ValueError("must be a mailto: or https: URL (RFC 8292), e.g. mailto:push@example.com")
        if "localhost" in value.lower():
            # Apple's push service answers 403 BadJwtToken (web-push-libs/web-push#947).
            raise ValueError("must be a real address: Apple's push service refuses a localhost subject")
        return value

    @field_validator("url")
    @classmethod
    def _url_template(cls, value: str | None) -> str | None:
        return _template(value)

    @field_validator("topic")
    @classmethod
    def _topic_template(cls, value: str | None) -> str | None:
        if value is not None and "{" not in value and not TOPIC.match(value):
            raise ValueError("at most 32 characters: letters, digits, - and _")
        return _template(value)


class WebPushSink(Sink):
    name = "webpush"
    channel = "push"
    Config = WebPushConfig

    def __init__(self, key: str, config: WebPushConfig, deployment: Any):
        super().__init__(key, config, deployment)
        self._key = load_private_key(config.vapid_private_key.get_secret_value())
        #: What browsers pass to pushManager.subscribe() as applicationServerKey.
        self.public_key = b64url(_point(self._key.public_key()))
        self._client = GuardedClient(config.allow, timeout=config.timeout)
        self._tokens: dict[str, tuple[str, int]] = {}
        env = make_environment(None)
        self._url = env.from_string(config.url) if config.url else None
        self._topic = env.from_string(config.topic) if config.topic else None

    def address(self, contact: dict[str, Any]) -> str | None:
        return next((device["address"] for device in subscriptions(contact)), None)

    async def start(self) -> None:
        log.info("webpush sink ready", sink=self.key, application_server_key=self.public_key)

    async def close(self) -> None:
        await self._client.close()

    async def send(self, message: Message, ctx: SendContext) -> DeliveryResult:
        devices = subscriptions(ctx.contact)
        if not devices:
            return DeliveryResult.permanent("the contact has no webpush subscription")
        try:
            payload, headers = self.build(message, ctx)
        except (jinja2.TemplateError, ValueError) as exc:
            return DeliveryResult.permanent(f"webpush sink {self.key}: {exc}")
        results = await asyncio.gather(*(self._push(device, payload, headers) for device in devices))
        return DeliveryResult.combine(list(zip((d["address"] for d in devices), results, strict=True)))

    def build(self, message: Message, ctx: SendContext) -> tuple[bytes, dict[str, str]]:
        """The plaintext every browser gets, and the headers every push service gets; refused when too large."""
        context = {"event": ctx.event, "contact": ctx.contact, "rule": ctx.rule, "step": ctx.step}
        data = {"title": message.subject or "", "body": message.text}
        url = self._url.render(context).strip() if self._url else ""
        if url:
            data["url"] = url
        payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
        if len(payload) > MAX_PLAINTEXT:
            raise ValueError(f"payload is {len(payload)} bytes; Web Push only guarantees {MAX_PLAINTEXT} (RFC 8291)")
        headers = {
            "TTL": str(self.config.ttl),
            "Content-Encoding": "aes128gcm",
            "Content-Type": "application/octet-stream",
        }
        if self.config.urgency:
            headers["Urgency"] = self.config.urgency
        topic = self._topic.render(context).strip() if self._topic else ""
        if topic:
            if not TOPIC.match(topic):
                raise ValueError(f"topic {topic!r} is not 1-32 characters of letters, digits, - and _")
            headers["Topic"] = topic
        return payload, headers

    async def _push(self, device: dict[str, Any], payload: bytes, headers: dict[str, str]) -> DeliveryResult:
        endpoint = device["address"]
        try:
            audience = self._audience(endpoint)
            keys = device.get("keys") or {}
            body = encrypt(payload, b64url_decode(keys.get("p256dh", "")), b64url_decode(keys.get("auth", "")))
        except ValueError as exc:
            # The browser gave something no push service can take: the subscription is useless.
            log.warning("unusable webpush subscription dropped", sink=self.key, error=str(exc))
            return DeliveryResult.address_invalid(f"unusable subscription: {exc}")
        headers = {**headers, "Authorization": self._authorization(audience)}
        try:
            async with self._client.request("POST", endpoint, data=body, headers=headers) as response:
                excerpt = (await response.content.read(BODY_EXCERPT)).decode("utf-8", "replace")
                return self._classify(response.status, response.headers, excerpt)
        except ForbiddenAddress as exc:
            log.warning("webpush endpoint refused by the address guard", sink=self.key, error=str(exc))
            return DeliveryResult.permanent(f"endpoint refused: {exc}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            return DeliveryResult.retry(f"{type(exc).__name__}: {exc}".rstrip(": "))

    def _audience(self, endpoint: str) -> str:
        """The push service's origin, as VAPID names it; ValueError for an endpoint that is no push service's."""
        url = URL(endpoint)
        if url.scheme not in ("http", "https") or not url.raw_host:
            raise ValueError("the endpoint is not an http(s) URL")
        # Push services listen on https:443, the only endpoints track.py takes. One stored before it checked could
        # aim Declic at whatever listens on another port of a public host (SMTP, Redis...). A host that `allow`
        # names (a push service of one's own, a test's stand-in) may listen anywhere.
        if (url.scheme, url.port) != ("https", 443) and not self._client.allowance.lists(url.raw_host):
            raise ValueError("the endpoint is not https on port 443")
        return str(url.origin())

    def _authorization(self, audience: str) -> str:
        now = int(time.time())  # push services check `exp` against real time, never a simulated clock
        token = self._tokens.get(audience)
        if token is None or token[1] - now < VAPID_REUSE_MARGIN:
            if len(self._tokens) > 100:  # endpoints are user-given: keep the cache bounded
                self._tokens.clear()
            expires = now + VAPID_LIFETIME
            token = self._tokens[audience] = (
                vapid_token(self._key, audience, self.config.vapid_subject, expires),
                expires,
            )
        return f"vapid t={token[0]}, k={self.public_key}"

    def _classify(self, status: int, headers: CIMultiDictProxy[str], excerpt: str) -> DeliveryResult:
        """RFC 8030 §5-8 and RFC 8292 §4: what each push service answer means for this subscription."""
        error = f"push service answered {status}" + (f": {excerpt.strip()}" if excerpt.strip() else "")
        if 200 <= status < 300:
            return DeliveryResult.sent(headers.get("Location") or None)
        if status in (404, 410):
            return DeliveryResult.address_invalid(error)
        if status == 429 or status >= 500:
            return DeliveryResult.retry(error, after=retry_after(headers.get("Retry-After"), datetime.now(UTC)))
        if status in (400, 401, 403):
            log.error(
                "push service refused the request: check vapid_private_key and vapid_subject; a subscription made "
                "with another applicationServerKey is refused too",
                sink=self.key,
                status=status,
                answer=excerpt.strip(),
            )
        return DeliveryResult.permanent(error)


def subscriptions(contact: dict[str, Any]) -> list[dict[str, Any]]:
    return [device for device in contact.get("push_subscriptions") or () if device.get("kind") == KIND]


@click.command("webpush-keys")
def webpush_keys() -> None:
    """Print a new VAPID key pair for the webpush sink.

    Put the private key in the sink's `vapid_private_key` (through an environment variable)
    and give the public key to your site's pushManager.subscribe() as applicationServerKey.
    """
    private, public = generate_vapid_keys()
    click.echo(f"VAPID_PRIVATE_KEY={private}")
    click.echo(f"VAPID_PUBLIC_KEY={public}")


@hookimpl
def register_sinks(register: Callable[[type[Sink]], None]) -> None:
    register(WebPushSink)


@hookimpl
def register_commands(cli: click.Group) -> None:
    cli.add_command(webpush_keys)
