"""SMS through Twilio's Messages API: E.164 numbers, Twilio's error codes classified, segment counts.

One form-encoded `POST {api_base}/2010-04-01/Accounts/{AccountSid}/Messages.json` per message,
with HTTP Basic auth (AccountSid:AuthToken). Success is 201 with the Message resource, whose
`sid` is the provider id. Errors carry Twilio's envelope
`{"code": 21211, "message": "...", "more_info": "https://www.twilio.com/docs/errors/21211", "status": 400}`
(twilio-python `twilio/base/version.py` reads `code` and `message`; its `TwilioServiceException`
reads the RFC 9457 form `{type, title, status, code, detail}` that newer APIs answer with).

The Messages API takes no idempotency key: a call that timed out or got a 5xx may have
created the message, and its retry can send it twice.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import aiohttp
import phonenumbers
import structlog
from pydantic import Field, SecretStr, field_validator, model_validator
from yarl import URL

from declic_gateway import (
    ConfigError,
    DeliveryResult,
    Message,
    SendContext,
    Sink,
    SinkConfig,
    api_client,
    hookimpl,
    retry_after,
)

log = structlog.get_logger("declic.twilio")

API_BASE = "https://api.twilio.com"
#: Twilio error codes (https://www.twilio.com/docs/api/errors/<code>).
AUTHENTICATE = 20003
TOO_MANY_REQUESTS = 20429
UNSUBSCRIBED = 21610  # the recipient replied STOP to this sender or Messaging Service
BAD_NUMBER = frozenset({21211, 21614})  # invalid 'To' number; 'To' is not a mobile number
#: Longest provider text kept in a delivery's reason (an HTML error page is not worth storing).
MAX_DETAIL = 300

# GSM 03.38 as Twilio counts it (TwilioDevEd/message-segment-calculator `src/libs/UnicodeToGSM.ts`):
# the basic table costs one septet, the extension table two (an escape, then the character).
# Only the capital Ç is in the basic table: a lower-case ç, like ê or any emoji, makes the message UCS-2.
GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENSION = frozenset("\f^{}\\[~]|€")
#: (characters in a single message, per part of a concatenated one) in code units: the 6-byte
#: header each part carries leaves 153 of 160 septets, 67 of 70 UCS-2 units.
LIMITS = {"GSM-7": (160, 153), "UCS-2": (70, 67)}

_SENDER = re.compile(r"^(\+[1-9][0-9]{1,14}|[0-9]{3,8}|(?=.*[A-Za-z])[A-Za-z0-9 +\-_&]{1,11})$")
_SOURCE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


class TwilioConfig(SinkConfig):
    account_sid: str = Field(
        pattern=r"^AC[0-9a-fA-F]{32}$", description="Account SID (Console > Account info): AC and 32 hex digits."
    )
    auth_token: SecretStr = Field(description="The account's Auth Token, sent as the HTTP Basic password.")
    sender: str | None = Field(
        None, description="`From`: an E.164 number (+33700000000), a short code or an alphanumeric sender ID."
    )
    messaging_service_sid: str | None = Field(
        None, pattern=r"^MG[0-9a-fA-F]{32}$", description="Send through this Messaging Service (MG...) instead."
    )
    default_region: str | None = Field(
        None, description="Country (ISO 3166 alpha-2, e.g. FR) of numbers written without +code, when the "
        "contact has no `attributes.country`."
    )  # fmt: skip
    status_callback: str | None = Field(
        None, description="Where Twilio posts delivery status: an http(s) URL, or the name of a twilio_status "
        "source (public_url + /hooks/NAME)."
    )  # fmt: skip
    api_base: str = Field(API_BASE, description="Twilio REST API origin (another only for tests or a Twilio Region).")

    @field_validator("sender")
    @classmethod
    def _sender(cls, value: str | None) -> str | None:
        if value is not None and not _SENDER.match(value):
            raise ValueError(
                "expected an E.164 number without spaces (+33700000000), a short code, "
                "or an alphanumeric sender ID of at most 11 letters, digits and spaces"
            )
        return value

    @field_validator("default_region")
    @classmethod
    def _region(cls, value: str | None) -> str | None:
        if value is not None and value.upper() not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"unknown country {value!r}: expected ISO 3166 alpha-2, e.g. FR, GB, US")
        return value.upper() if value else None

    @field_validator("status_callback")
    @classmethod
    def _callback(cls, value: str | None) -> str | None:
        if value is not None and "://" in value:
            _http_url(value)
        elif value is not None and not _SOURCE_NAME.match(value):
            raise ValueError("expected an http(s) URL or the name of a source under `sources:`")
        return value

    @field_validator("api_base")
    @classmethod
    def _api_base(cls, value: str) -> str:
        return _http_url(value).rstrip("/")

    @model_validator(mode="after")
    def _one_sender(self) -> TwilioConfig:
        if (self.sender is None) == (self.messaging_service_sid is None):
            raise ValueError("set exactly one of `sender` and `messaging_service_sid`")
        return self


def _http_url(value: str) -> str:
    url = URL(value)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"expected an http(s) URL, got {value!r}")
    return value


class TwilioSink(Sink):
    name = "twilio"
    channel = "sms"
    Config = TwilioConfig

    def __init__(self, key: str, config: TwilioConfig, deployment: Any):
        super().__init__(key, config, deployment)
        self.config: TwilioConfig = config
        self._url = f"{config.api_base}/2010-04-01/Accounts/{config.account_sid}/Messages.json"
        headers = {"Accept": "application/json", "Authorization": self._basic_auth()}
        self._client = api_client(config.api_base, config.timeout, headers)

    def address(self, contact: dict[str, Any]) -> str | None:
        """The number in E.164 when it reads as one; as written otherwise, so send() can report it invalid."""
        raw = (contact.get("phone") or "").strip()
        if not raw:
            return None
        try:
            return to_e164(raw, region_of(contact, self.config.default_region))
        except ValueError:
            return raw

    @cached_property
    def callback_url(self) -> str | None:
        """`status_callback` as Twilio must call it; a source name needs the deployment's public_url."""
        value = self.config.status_callback
        if value is None or "://" in value:
            return value
        if not self.deployment.public_url:
            raise ConfigError(
                [f"sinks.{self.key}.status_callback: naming the source {value!r} needs `public_url` "
                 "(the https://host Twilio calls); or give the full URL"]
            )  # fmt: skip
        return f"{self.deployment.public_url.rstrip('/')}/hooks/{value}"

    async def start(self) -> None:
        _ = self.callback_url  # a missing public_url stops start-up, not the first send

    async def close(self) -> None:
        await self._client.close()

    def _basic_auth(self) -> str:
        """HTTP Basic AccountSid:AuthToken (aiohttp.BasicAuth is deprecated, its successor is 3.14+ only)."""
        pair = f"{self.config.account_sid}:{self.config.auth_token.get_secret_value()}"
        return "Basic " + base64.b64encode(pair.encode()).decode()

    def form(self, to: str, text: str) -> dict[str, str]:
        fields = {"To": to, "Body": text}
        if self.config.messaging_service_sid:
            fields["MessagingServiceSid"] = self.config.messaging_service_sid
        else:
            fields["From"] = self.config.sender or ""
        if self.callback_url:
            fields["StatusCallback"] = self.callback_url
        return fields

    async def send(self, message: Message, ctx: SendContext) -> DeliveryResult:
        try:
            to = to_e164(message.to, region_of(ctx.contact, self.config.default_region))
        except UnknownCountry as exc:
            return DeliveryResult.permanent(str(exc))
        except InvalidNumber as exc:
            return DeliveryResult.address_invalid(f"not a valid phone number: {exc}", addresses=(message.to,))
        if not message.text.strip():
            return DeliveryResult.permanent("the rendered SMS is empty: nothing sent")
        encoding, count = segments(message.text)
        try:
            async with self._client.request("POST", self._url, data=self.form(to, message.text)) as reply:
                status, body = reply.status, await reply.read()
                after = retry_after(reply.headers.get("Retry-After"), self.deployment.clock.now())
        except TimeoutError:
            return DeliveryResult.retry(f"Twilio did not answer within {self.config.timeout:g}s")
        except aiohttp.ClientError as exc:
            return DeliveryResult.retry(f"Twilio unreachable: {type(exc).__name__}: {exc}")
        result = classify(status, body, after, to)
        self._log(result, status, body, ctx, encoding, count)
        return result

    def _log(
        self, result: DeliveryResult, status: int, body: bytes, ctx: SendContext, encoding: str, count: int
    ) -> None:
        """Segments are what Twilio bills; DeliveryResult has no field for them, so the log carries them."""
        where = {"sink": self.key, "rule": ctx.rule, "step": ctx.step, "encoding": encoding, "segments": count}
        if result.provider_id:
            log.info("sms sent", sid=result.provider_id, **where)
            return
        code = TwilioError.parse(status, body).code
        if code == AUTHENTICATE or status == 401:
            log.error(
                "Twilio refused the credentials: check account_sid and auth_token; every SMS fails until fixed",
                status=status,
                code=code,
                **where,
            )
        else:
            log.warning("sms not sent", outcome=str(result.outcome), status=status, code=code, **where)


class InvalidNumber(ValueError):
    """Not a number a text message can reach: the contact's phone is wrong."""


class UnknownCountry(ValueError):
    """A number written without +country code, and no country to read it in: the config lacks it."""


def region_of(contact: dict[str, Any], default: str | None) -> str | None:
    """`attributes.country` (ISO alpha-2, any case) when it names a country, else the configured default."""
    country = (contact.get("attributes") or {}).get("country")
    if isinstance(country, str) and country.strip().upper() in phonenumbers.SUPPORTED_REGIONS:
        return country.strip().upper()
    return default


def to_e164(raw: str, region: str | None) -> str:
    """+33612345678 from "06 12 34 56 78" in FR; raise InvalidNumber or UnknownCountry."""
    try:
        number = phonenumbers.parse(raw, region)
    except phonenumbers.NumberParseException as exc:
        national = exc.error_type == phonenumbers.NumberParseException.INVALID_COUNTRY_CODE
        if national and region is None and not raw.lstrip().startswith("+"):
            raise UnknownCountry(
                "the number has no +country code and neither attributes.country nor default_region says "
                "which country it belongs to"
            ) from None
        raise InvalidNumber(re.sub(r"^\(\d+\) ", "", str(exc))) from None
    if not phonenumbers.is_valid_number(number):
        raise InvalidNumber(f"no such number in {phonenumbers.region_code_for_number(number) or 'any country'}")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def segments(text: str) -> tuple[str, int]:
    """("GSM-7" | "UCS-2", parts): how many SMS Twilio sends (and bills) for this text.

    A character never straddles two parts: an extension character (2 septets) or an emoji
    (2 UTF-16 units) that does not fit moves whole to the next part, as on the air.
    """
    if not text:
        return "GSM-7", 0
    if all(char in GSM7_BASIC or char in GSM7_EXTENSION for char in text):
        encoding, sizes = "GSM-7", [2 if char in GSM7_EXTENSION else 1 for char in text]
    else:
        encoding, sizes = "UCS-2", [2 if ord(char) > 0xFFFF else 1 for char in text]
    single, part = LIMITS[encoding]
    if sum(sizes) <= single:
        return encoding, 1
    count, used = 1, 0
    for size in sizes:
        if used + size > part:
            count, used = count + 1, 0
        used += size
    return encoding, count


@dataclass(frozen=True)
class TwilioError:
    """Twilio's error envelope, legacy (`code`, `message`, `more_info`) or RFC 9457 (`detail`, `type`)."""

    status: int
    code: int | None
    message: str
    more_info: str | None

    @classmethod
    def parse(cls, status: int, body: bytes) -> TwilioError:
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            data = None
        if not isinstance(data, dict):
            snippet = body[:80].decode("utf-8", "replace").strip()
            return cls(status, None, f"no Twilio error body ({snippet!r})" if snippet else "empty body", None)
        code = data.get("code")
        message = data.get("message") or data.get("detail") or data.get("title") or ""
        more_info = data.get("more_info") or data.get("type")
        return cls(
            status,
            int(code) if isinstance(code, int | str) and str(code).isdigit() else None,
            str(message)[:MAX_DETAIL],
            str(more_info)[:MAX_DETAIL] if more_info else None,
        )

    def __str__(self) -> str:
        code = f" {self.code}" if self.code is not None else ""
        more = f" ({self.more_info})" if self.more_info else ""
        return f"Twilio{code} (HTTP {self.status}): {self.message}{more}"


def classify(status: int, body: bytes, after: float | None, to: str) -> DeliveryResult:
    """One Twilio answer -> sent / retry / permanent / address invalid."""
    if 200 <= status < 300:
        sid = _sid(body)
        if sid:
            return DeliveryResult.sent(sid)
        # Twilio has most likely created the message: a retry could text the person twice.
        return DeliveryResult.permanent(
            f"Twilio answered {status} without a message sid; the SMS may have gone out: "
            "check the Twilio console before replaying"
        )
    error = TwilioError.parse(status, body)
    if status == 429 or error.code == TOO_MANY_REQUESTS or status >= 500:
        return DeliveryResult.retry(str(error), after=after)
    if error.code in BAD_NUMBER:
        return DeliveryResult.address_invalid(str(error), addresses=(to,))
    if error.code == UNSUBSCRIBED:
        # Not address_invalid: the number is fine; SMS consent is withdrawn until they reply START.
        return DeliveryResult.opted_out(
            f"{error}: the recipient opted out (replied STOP); Twilio refuses SMS to them until they reply START"
        )
    if error.code == AUTHENTICATE or status == 401:
        return DeliveryResult.permanent(f"{error}: check account_sid and auth_token, then replay")
    return DeliveryResult.permanent(str(error))


def _sid(body: bytes) -> str | None:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    sid = data.get("sid") if isinstance(data, dict) else None
    return sid if isinstance(sid, str) and re.fullmatch(r"[A-Za-z0-9]{2,64}", sid) else None


@hookimpl
def register_sinks(register: Callable[[type[Sink]], None]) -> None:
    register(TwilioSink)
