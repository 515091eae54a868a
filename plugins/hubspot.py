"""HubSpot webhooks (signature v1, v2, v3) enriched from the CRM v3 API.

HubSpot posts a JSON array of notifications that carry object ids only. `verify` checks the
signature version the headers announce, over the raw bytes. `normalize` runs after the
acknowledgement: it fetches each contact or deal from the CRM v3 API with the private app's
token, so that events name a reachable person (e-mail, phone, names) and carry the consent
that the contact properties named in `consent` state, dated by HubSpot.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

import aiohttp
import structlog
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from declic_gateway import (
    BadRequest,
    Clock,
    ConsentState,
    ConsentStatement,
    ContactRef,
    Deployment,
    Event,
    GuardedClient,
    MalformedPayload,
    PluginConfig,
    RawCall,
    RetryLater,
    SignatureError,
    Source,
    api_client,
    hookimpl,
    retry_after,
)

log = structlog.get_logger("declic.hubspot")

#: HubSpot: "reject the request if the timestamp is older than 5 minutes" (v3 only).
MAX_AGE_MS = 300_000
#: hs_language is the contact's preferred language (`fr`, `fr-ca`): Declic's locale for translated templates.
CONTACT_PROPERTIES = ("email", "phone", "firstname", "lastname", "hs_language", "lifecyclestage")
DEAL_PROPERTIES = ("dealname", "dealstage", "pipeline", "amount", "deal_currency_code", "closedate")
DEAL_PARAMS = {"properties": ",".join(DEAL_PROPERTIES), "associations": "contacts"}
#: The daily limit resets at midnight in the portal's own time zone, which the API does not say.
DAILY_LIMIT_PAUSE = 3600.0
#: Statuses worth another try: HubSpot documents 423 (locked, retry shortly) and 477 (migration in progress).
RETRIABLE = frozenset({408, 423, 429, 477})
#: Calls whose fetched objects are kept for their retries.
REMEMBERED_CALLS = 64
#: The v3 doc asks to URL-decode these in the URI before signing; HubSpot's SDKs don't. Both forms are tried.
_DECODED = {
    "%3A": ":", "%2F": "/", "%3F": "?", "%40": "@", "%21": "!", "%24": "$",
    "%27": "'", "%28": "(", "%29": ")", "%2A": "*", "%2C": ",", "%3B": ";",
}  # fmt: skip
_ESCAPED = re.compile("|".join(_DECODED), re.IGNORECASE)
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_PROPERTY_NAME = re.compile(r"[A-Za-z0-9_.-]+")
#: HubSpot's "Unsubscribed from all email": set to true when a contact opts out of all e-mail.
OPT_OUT = "hs_email_optout"
#: One e-mail subscription type's opt-out: hs_email_optout_<subscription id>.
_SUBSCRIPTION_OPT_OUT = re.compile(OPT_OUT + r"_([0-9]+)")


def _property_name(name: str) -> str:
    if not _PROPERTY_NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not a HubSpot property's internal name")
    return name


class ConsentRule(BaseModel):
    """One contact property that states consent on one channel, and which of its values mean what."""

    model_config = ConfigDict(extra="forbid")

    property: str = Field(
        description="The contact property's internal name: hs_email_optout (unsubscribed from all e-mail), "
        "hs_email_optout_ followed by an e-mail subscription type's id, or a property of your own."
    )
    channel: str = Field(
        "email",
        pattern=r"^[a-z][a-z0-9_]*$",
        description="The channel it speaks for, as in policies.consent: email, sms...",
    )
    withdrawn: list[str] = Field(
        default_factory=list,
        description='Values that mean consent is withdrawn, compared ignoring case (HubSpot sends checkboxes as "true" '
        'and "false").',
    )
    granted: list[str] = Field(
        default_factory=list,
        description="Values that mean consent is given. Empty: the property never grants consent. Other values, "
        "and an empty property, state nothing.",
    )

    @field_validator("property")
    @classmethod
    def _name(cls, name: str) -> str:
        return _property_name(name)

    @field_validator("withdrawn", "granted")
    @classmethod
    def _values(cls, values: list[str]) -> list[str]:
        return [value.strip().lower() for value in values]

    @model_validator(mode="after")
    def _one_meaning_per_value(self) -> ConsentRule:
        if both := sorted(set(self.withdrawn) & set(self.granted)):
            raise ValueError(f"{self.property}: {', '.join(both)} cannot both grant and withdraw consent")
        return self

    def state(self, value: Any) -> ConsentState | None:
        """What the property's value says; None when it says nothing (unlisted, empty, or not a string)."""
        text = value.strip().lower() if isinstance(value, str) else ""
        if text and text in self.withdrawn:
            return "withdrawn"
        return "granted" if text and text in self.granted else None


#: Without a rule of the config's own for hs_email_optout, its "true" withdraws e-mail consent.
DEFAULT_RULE = ConsentRule(property=OPT_OUT, channel="email", withdrawn=["true"])


class HubSpotConfig(PluginConfig):
    client_secret: SecretStr = Field(
        description="The app's client secret (app settings, Auth tab): it signs every call."
    )
    app_token: SecretStr | None = Field(
        None,
        description="Private app access token with crm.objects.contacts.read and crm.objects.deals.read, used to "
        "fetch contacts and deals. Without it, contact events carry HubSpot ids only and deal events are skipped.",
    )
    properties: list[str] = Field(
        default_factory=list,
        description="Extra contact properties to fetch into the contact's attributes, besides email, phone, "
        "firstname, lastname, hs_language (the locale) and lifecyclestage.",
    )
    consent: list[ConsentRule] = Field(
        default_factory=lambda: [DEFAULT_RULE],
        description="Contact properties that state consent, each with its channel and the values that withdraw or "
        "grant it, dated by the time HubSpot changed them. Whatever is listed, hs_email_optout: true withdraws "
        "e-mail consent unless a rule names hs_email_optout itself. Nothing grants consent unless a rule lists "
        "granted values.",
    )
    api_base: str = Field("https://api.hubapi.com", description="Base URL of the HubSpot API.")

    @field_validator("properties")
    @classmethod
    def _property_names(cls, names: list[str]) -> list[str]:
        return [_property_name(name) for name in names]

    @field_validator("consent")
    @classmethod
    def _consent_rules(cls, rules: list[ConsentRule]) -> list[ConsentRule]:
        pairs = [(rule.property, rule.channel) for rule in rules]
        if len(set(pairs)) < len(pairs):
            raise ValueError("a property is listed twice for the same channel")
        return rules if OPT_OUT in {rule.property for rule in rules} else [*rules, DEFAULT_RULE]


# -- signatures ------------------------------------------------------------------------------------


def signature_v1(secret: bytes, body: bytes) -> str:
    return hashlib.sha256(secret + body).hexdigest()


def signature_v2(secret: bytes, method: str, uri: str, body: bytes) -> str:
    return hashlib.sha256(secret + f"{method}{uri}".encode() + body).hexdigest()


def signature_v3(secret: bytes, method: str, uri: str, body: bytes, timestamp: str) -> str:
    message = f"{method}{uri}".encode() + body + timestamp.encode()
    return base64.b64encode(hmac.new(secret, message, hashlib.sha256).digest()).decode()


def _matches(given: str, expected: list[str]) -> bool:
    candidate = given.strip().encode("utf-8", "replace")
    return any([hmac.compare_digest(candidate, e.encode()) for e in expected])


class HubSpot(Source):
    name = "hubspot"
    Config = HubSpotConfig

    def __init__(self, key: str, config: HubSpotConfig, deployment: Deployment):
        super().__init__(key, config, deployment)
        token = config.app_token
        self.crm = Crm(config.api_base, token, deployment.clock) if token else None
        #: inbox id -> objects fetched for that call, kept while it waits for a retry.
        self._found: OrderedDict[int, dict[tuple[str, str], dict[str, Any] | None]] = OrderedDict()

    async def start(self) -> None:
        if self.crm:
            self.crm.open()

    async def close(self) -> None:
        if self.crm:
            await self.crm.close()

    async def verify(self, request: web.Request, body: bytes) -> None:
        secret = self.config.client_secret.get_secret_value().encode()
        if (v3 := request.headers.get("X-HubSpot-Signature-v3")) is not None:
            self._check_v3(request, body, secret, v3)
        elif (legacy := request.headers.get("X-HubSpot-Signature")) is not None:
            self._check_legacy(request, body, secret, legacy)
        else:
            raise SignatureError("missing X-HubSpot-Signature-v3 or X-HubSpot-Signature header")
        if not body.strip():
            raise BadRequest("empty body")

    def _check_v3(self, request: web.Request, body: bytes, secret: bytes, given: str) -> None:
        stamp = (request.headers.get("X-HubSpot-Request-Timestamp") or "").strip()
        if not re.fullmatch(r"[0-9]{1,15}", stamp):
            raise SignatureError("X-HubSpot-Request-Timestamp is missing or not epoch milliseconds")
        now_ms = self.deployment.clock.now().timestamp() * 1000
        if abs(now_ms - int(stamp)) > MAX_AGE_MS:  # future stamps too: a skewed clock is no excuse to replay
            raise SignatureError("X-HubSpot-Request-Timestamp is more than 5 minutes away from now")
        # Some proxies turn the base64 '+' into a space; base64 never holds one.
        given = given.strip().replace(" ", "+")
        expected = [signature_v3(secret, request.method, uri, body, stamp) for uri in self._uris(request)]
        if not _matches(given, expected):
            raise SignatureError("X-HubSpot-Signature-v3 does not match (check client_secret and public_url)")

    def _check_legacy(self, request: web.Request, body: bytes, secret: bytes, given: str) -> None:
        # HubSpot always sends the version; v1 is what its Webhooks API uses and the Node SDK's default.
        version = (request.headers.get("X-HubSpot-Signature-Version") or "v1").strip().lower()
        if version == "v1":
            expected = [signature_v1(secret, body)]
        elif version == "v2":
            expected = [signature_v2(secret, request.method, uri, body) for uri in self._uris(request)]
        else:
            raise SignatureError(f"unsupported X-HubSpot-Signature-Version {version[:20]!r}")
        if not _matches(given.lower(), expected):
            raise SignatureError(f"X-HubSpot-Signature ({version}) does not match (check client_secret)")

    def _uris(self, request: web.Request) -> list[str]:
        """The URL HubSpot called: behind a proxy only public_url knows its scheme and host."""
        base = self.deployment.public_url or f"{request.scheme}://{request.host}"
        uri = base.rstrip("/") + request.raw_path
        decoded = _ESCAPED.sub(lambda m: _DECODED[m.group().upper()], uri)
        return [uri] if decoded == uri else [uri, decoded]

    def dedupe_key(self, request: web.Request, body: bytes) -> str:
        """The notifications' own ids: a retry re-sends them with another attemptNumber, so not the body's hash."""
        try:
            ids = sorted(_notification_key(item) for item in parse_notifications(body))
        except MalformedPayload:
            return super().dedupe_key(request, body)
        return "notifications:" + hashlib.sha256("\n".join(ids).encode()).hexdigest()

    async def normalize(self, raw: RawCall) -> list[Event]:
        notifications = parse_notifications(raw.body)
        config = self.config
        lookup = Lookup(self.crm, self._remembered(raw.id), tuple(config.properties), tuple(config.consent))
        try:
            events = await _events(notifications, raw, lookup)
        except RetryLater:
            raise  # keep what was fetched: the retry resumes where HubSpot stopped us
        except BaseException:
            self._found.pop(raw.id, None)
            raise
        self._found.pop(raw.id, None)
        return events

    def about(self, raw: RawCall) -> list[ContactRef] | None:
        """The contacts the notifications name; None when one is a deal's (its contact needs a fetch)."""
        try:
            named = [_named(item) for item in parse_notifications(raw.body)]
        except (MalformedPayload, KeyError, TypeError, ValueError):
            return None
        if any(ids is None for ids in named):
            return None
        return [ContactRef(external_ids={"hubspot": i}) for ids in named for i in ids or ()]

    def _remembered(self, inbox_id: int) -> dict[tuple[str, str], dict[str, Any] | None]:
        found = self._found.setdefault(inbox_id, {})
        self._found.move_to_end(inbox_id)
        while len(self._found) > REMEMBERED_CALLS:
            self._found.popitem(last=False)
        return found


# -- the body --------------------------------------------------------------------------------------


def parse_notifications(body: bytes) -> list[dict[str, Any]]:
    """HubSpot's JSON array of notifications; a single notification object counts as a batch of one."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise MalformedPayload(f"body is not JSON ({type(exc).__name__})") from None
    if isinstance(data, dict) and _kind(data):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        raise MalformedPayload("expected a JSON array of notifications")
    return data


def _kind(item: dict[str, Any]) -> str | None:
    """Real deliveries say `subscriptionType`; the doc's example says `eventType`."""
    kind = item.get("subscriptionType") or item.get("eventType")
    return kind if isinstance(kind, str) else None


def _notification_key(item: dict[str, Any]) -> str:
    """HubSpot: eventId alone is "not guaranteed to be unique"; this tuple is."""
    values = [item.get(k) for k in ("portalId", "subscriptionId", "eventId", "occurredAt")]
    if any(v is None or isinstance(v, (dict, list)) for v in values):
        raise MalformedPayload("a notification lacks portalId, subscriptionId, eventId or occurredAt")
    return ":".join(str(v) for v in values)


def _id(value: Any) -> str:
    """An object id, checked to be digits since it goes into an API path."""
    text = str(value) if isinstance(value, (int, str)) and not isinstance(value, bool) else ""
    if not re.fullmatch(r"[0-9]{1,30}", text):
        raise ValueError(f"{value!r} is not a HubSpot object id")
    return text


def _named(item: dict[str, Any]) -> list[str] | None:
    """The contact ids a notification names; None for a deal's, [] for one no rule uses."""
    kind = _kind(item) or ""
    if kind.startswith("deal."):
        return None
    if kind not in HANDLERS:
        return []
    ids = [item.get("objectId"), item.get("primaryObjectId"), item.get("newObjectId"), *item.get("mergedObjectIds", [])]
    return list(dict.fromkeys(_id(i) for i in ids if i is not None))


def _when(item: dict[str, Any], raw: RawCall) -> datetime:
    value = item.get("occurredAt")
    if value is None:
        return raw.received_at
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"occurredAt {value!r} is not epoch milliseconds")
    try:
        return datetime.fromtimestamp(value / 1000, UTC)
    except (OverflowError, OSError, ValueError) as exc:
        raise ValueError(f"occurredAt {value!r}: {exc}") from None


def _number(value: Any) -> int | float | None:
    """HubSpot sends every property value as a string; rules comparing a score want a number."""
    if not isinstance(value, str) or len(value) > 40 or not _NUMBER.fullmatch(text := value.strip()):
        return None
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    number = float(text)
    return number if math.isfinite(number) else None


def _money(value: Any) -> Decimal | None:
    try:
        return None if value in (None, "") else Decimal(str(value))
    except InvalidOperation:
        return None


def _change_key(prefix: str, name: str, value: Any) -> str:
    """One occurrence per (object, property, value): a redelivery enrols nobody twice, a new value does."""
    text = "" if value is None else str(value)
    if len(text) > 64:
        text = "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]
    return f"{prefix}:{name}:{text}"


# -- the CRM API -----------------------------------------------------------------------------------


class Crm:
    """HubSpot's CRM v3 API as normalisation needs it: one object by id; failures become RetryLater."""

    def __init__(self, api_base: str, token: SecretStr, clock: Clock):
        self.base = api_base.rstrip("/")
        self.clock = clock
        self._auth = {"Authorization": f"Bearer {token.get_secret_value()}"}
        # The configured API host is trusted (a proxy may be local); a redirect is never followed.
        self._client = api_client(self.base, 10)
        #: Set when HubSpot said the rate-limit window is used up: the next call would only earn a 429.
        self._resume_at: datetime | None = None

    def open(self) -> GuardedClient:
        return self._client

    async def close(self) -> None:
        await self._client.close()

    async def get(self, path: str, params: dict[str, str]) -> dict[str, Any] | None:
        """The object, or None when HubSpot no longer has it (404)."""
        self._wait_for_window()
        try:
            async with self._client.request("GET", self.base + path, params=params, headers=self._auth) as response:
                status, headers = response.status, response.headers
                text = (await response.read()).decode("utf-8", "replace")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RetryLater(f"HubSpot API unreachable: {type(exc).__name__}: {exc}") from None
        self._note_window(headers)
        if status == 200:
            return _json_object(text, path)
        if status == 404:
            return None
        if 300 <= status < 400:
            raise RetryLater(f"HubSpot answered {status} to GET {path}, a redirect, not followed: check api_base")
        detail = _detail(text)
        if status == 429:
            raise RetryLater(f"HubSpot rate limit (429): {detail}", after=self._throttle_delay(headers, text))
        if status in (401, 403):
            raise RetryLater(f"HubSpot refused the app_token ({status}): {detail}; check the token and its scopes")
        if status in RETRIABLE or status >= 500:
            raise RetryLater(
                f"HubSpot answered {status}: {detail}", after=retry_after(headers.get("Retry-After"), self.clock.now())
            )
        raise MalformedPayload(f"HubSpot answered {status} to GET {path}: {detail}")

    def _wait_for_window(self) -> None:
        now = self.clock.now()
        if self._resume_at is not None and now < self._resume_at:
            raise RetryLater(
                "HubSpot rate-limit window used up (X-HubSpot-RateLimit-Remaining: 0)",
                after=(self._resume_at - now).total_seconds(),
            )

    def _note_window(self, headers: Any) -> None:
        interval = _int(headers.get("X-HubSpot-RateLimit-Interval-Milliseconds"))
        if headers.get("X-HubSpot-RateLimit-Remaining") == "0" and interval:
            self._resume_at = self.clock.now() + timedelta(milliseconds=interval)

    def _throttle_delay(self, headers: Any, text: str) -> float | None:
        """Retry-After first; else the daily limit's pause; else the rolling window's length."""
        if (after := retry_after(headers.get("Retry-After"), self.clock.now())) is not None:
            return after
        policy = _json_field(text, "policyName")
        if policy == "DAILY" or headers.get("X-HubSpot-RateLimit-Daily-Remaining") == "0":
            return DAILY_LIMIT_PAUSE
        interval = _int(headers.get("X-HubSpot-RateLimit-Interval-Milliseconds"))
        return interval / 1000 if interval else None


def _int(value: str | None) -> int | None:
    return int(value) if value and re.fullmatch(r"[0-9]{1,12}", value.strip()) else None


def _json_object(text: str, path: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise RetryLater(f"HubSpot answered GET {path} with something other than a JSON object: {text[:200]!r}")
    return data


def _json_field(text: str, name: str) -> Any:
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data.get(name) if isinstance(data, dict) else None


def _detail(text: str) -> str:
    """HubSpot's error body says `message` and `category` (rate limits: `policyName`); else the text, cut short."""
    message = _json_field(text, "message")
    category = _json_field(text, "category") or _json_field(text, "policyName")
    if isinstance(message, str):
        return f"{category}: {message}"[:300] if category else message[:300]
    return text[:300] or "(empty body)"


@dataclass
class Lookup:
    """The objects one stored call needs, each fetched once, kept across the call's retries."""

    crm: Crm | None
    found: dict[tuple[str, str], dict[str, Any] | None]
    attribute_names: tuple[str, ...]
    consent: Sequence[ConsentRule] = ()
    contact_params: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        watched = list(dict.fromkeys(rule.property for rule in self.consent if rule.withdrawn or rule.granted))
        names = dict.fromkeys([*CONTACT_PROPERTIES, *self.attribute_names, *watched])
        self.contact_params = {"properties": ",".join(names)}
        if watched:  # the history dates each value: when the person opted out, not when we asked
            self.contact_params["propertiesWithHistory"] = ",".join(watched)

    async def contact(self, object_id: str) -> dict[str, Any] | None:
        return await self._fetch("contacts", object_id, self.contact_params)

    async def deal(self, object_id: str) -> dict[str, Any] | None:
        return await self._fetch("deals", object_id, DEAL_PARAMS)

    async def _fetch(self, kind: str, object_id: str, params: dict[str, str]) -> dict[str, Any] | None:
        if self.crm is None:
            return None
        if (kind, object_id) not in self.found:
            self.found[kind, object_id] = await self.crm.get(f"/crm/v3/objects/{kind}/{object_id}", params)
        return self.found[kind, object_id]


# -- consent ---------------------------------------------------------------------------------------

#: (channel, statement) pairs, several per channel when several properties speak for it.
Statements = Sequence[tuple[str, ConsentStatement]]


def notified_consent(item: dict[str, Any], when: datetime, object_id: str, rules: Sequence[ConsentRule]) -> Statements:
    """What a property change says, stated when it occurred; an opt-out is something the person did."""
    name, value = item.get("propertyName"), item.get("propertyValue")
    origin = {"portal_id": item.get("portalId"), "object_id": object_id}
    stated_at = when if item.get("occurredAt") is not None else None  # without it, the event dates an opt-out
    found = []
    for rule in rules:
        if rule.property == name and (state := rule.state(value)) is not None:
            shown = _evidence(rule, value, origin, change_source=item.get("changeSource"), event_id=item.get("eventId"))
            statement = ConsentStatement(state=state, stated_at=stated_at, action=state == "withdrawn", evidence=shown)
            found.append((rule.channel, statement))
    return found


def recorded_consent(found: dict[str, Any] | None, rules: Sequence[ConsentRule], origin: dict[str, Any]) -> Statements:
    """What the fetched record says, dated by the property's history; undated, it is a mere snapshot."""
    props = (found or {}).get("properties") or {}
    histories = (found or {}).get("propertiesWithHistory") or {}
    statements = []
    for rule in rules:
        newest = _newest(histories.get(rule.property)) or {}
        value = props.get(rule.property)
        value = newest.get("value") if value is None else value
        if (state := rule.state(value)) is None:
            continue
        stated_at = _stamp(newest.get("timestamp")) if newest.get("value") == value else None
        shown = _evidence(rule, value, origin, source_type=newest.get("sourceType"))
        action = state == "withdrawn" and stated_at is not None
        statement = ConsentStatement(state=state, stated_at=stated_at, action=action, evidence=shown)
        statements.append((rule.channel, statement))
    return statements


def latest(statements: Statements) -> dict[str, ConsentStatement]:
    """One statement per channel, the one HubSpot dates last; dated beats undated, a withdrawal wins a tie,
    and otherwise the first listed stays."""
    chosen: dict[str, ConsentStatement] = {}
    for channel, statement in statements:
        if channel not in chosen or _rank(statement) > _rank(chosen[channel]):
            chosen[channel] = statement
    return chosen


def _rank(statement: ConsentStatement) -> tuple[bool, datetime, bool]:
    return statement.stated_at is not None, statement.stated_at or _EPOCH, statement.state == "withdrawn"


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _newest(history: Any) -> dict[str, Any] | None:
    """The property's current value in `propertiesWithHistory`: the latest entry, whatever the list's order."""
    entries = history if isinstance(history, list) else []
    dated = [(when, e) for e in entries if isinstance(e, dict) and (when := _stamp(e.get("timestamp")))]
    return max(dated, key=lambda pair: pair[0])[1] if dated else None


def _stamp(value: Any) -> datetime | None:
    """A history timestamp: ISO 8601 in CRM v3 (epoch milliseconds taken too)."""
    try:
        if isinstance(value, str):
            moment = datetime.fromisoformat(value)
            return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
        if isinstance(value, int) and not isinstance(value, bool):
            return datetime.fromtimestamp(value / 1000, UTC)
    except (ValueError, OverflowError, OSError):
        pass
    return None


def _evidence(rule: ConsentRule, value: Any, origin: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """What shows the statement: the property and its value, the portal and record, the subscription type."""
    subscription = _SUBSCRIPTION_OPT_OUT.fullmatch(rule.property)
    shown = {"property": rule.property, "value": value, **origin, **extra}
    shown["subscription_id"] = subscription.group(1) if subscription else None
    return {key: v for key, v in shown.items() if v is not None}


# -- notifications -> events -----------------------------------------------------------------------


async def _events(notifications: list[dict[str, Any]], raw: RawCall, lookup: Lookup) -> list[Event]:
    """Events in the order things happened: HubSpot does not keep order within a batch."""
    try:
        timed = sorted(((_when(item, raw), index, item) for index, item in enumerate(notifications)))
    except ValueError as exc:
        raise MalformedPayload(str(exc)) from None
    events: list[Event] = []
    for when, index, item in timed:
        kind = _kind(item) or ""
        handler = HANDLERS.get(kind)
        if handler is None:
            continue  # a subscription no rule can use (companies, tickets...): kept in the inbox, no event
        try:
            events.extend(await handler(kind, item, when, lookup))
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedPayload(f"notification {index} ({kind}): {type(exc).__name__}: {exc}") from None
    return events


def contact_ref(
    object_id: str,
    found: dict[str, Any] | None,
    attribute_names: tuple[str, ...],
    consent: dict[str, ConsentStatement] | None = None,
) -> ContactRef:
    """The contact as HubSpot has it now; with ids only when it could not be fetched."""
    props = (found or {}).get("properties") or {}

    def text(name: str) -> str | None:
        value = props.get(name)
        return str(value) if value not in (None, "") else None

    attributes = {name: text(name) for name in ("lifecyclestage", *attribute_names) if text(name) is not None}
    return ContactRef(
        email=text("email"),
        phone=text("phone"),
        first_name=text("firstname"),
        last_name=text("lastname"),
        locale=text("hs_language"),
        external_ids={"hubspot": object_id},
        attributes=attributes,
        consent=consent or {},
    )


def person(
    object_id: str, found: dict[str, Any] | None, item: dict[str, Any], lookup: Lookup, notified: Statements = ()
) -> ContactRef:
    """The contact with the consent its record states, and what a property change just told (`notified`)."""
    recorded = recorded_consent(found, lookup.consent, {"portal_id": item.get("portalId"), "object_id": object_id})
    return contact_ref(object_id, found, lookup.attribute_names, latest([*notified, *recorded]))


def _base_properties(item: dict[str, Any], object_id: str, found: bool | None = None) -> dict[str, Any]:
    properties = {"object_id": object_id, "portal_id": item.get("portalId"), "change_source": item.get("changeSource")}
    if found is False:
        properties["object_missing"] = True  # deleted since the notification, or no app_token to fetch it
    return properties


CONTACT_TYPES = {
    "contact.creation": "contact.created",
    "contact.propertyChange": "contact.property_changed",
    "contact.deletion": "contact.deleted",
    "contact.privacyDeletion": "contact.erased",
    "contact.merge": "contact.merged",
}


async def contact_event(kind: str, item: dict[str, Any], when: datetime, lookup: Lookup) -> list[Event]:
    object_id = _id(item["objectId"])
    found = await lookup.contact(object_id)
    properties = _base_properties(item, object_id, found is not None)
    correlation = [f"hubspot-contact:{object_id}"]
    notified: Statements = ()
    if kind == "contact.propertyChange":
        name, value = str(item["propertyName"]), item.get("propertyValue")
        properties.update(name=name, value=value, number=_number(value))
        correlation.insert(0, _change_key(correlation[0], name, value))
        notified = notified_consent(item, when, object_id, lookup.consent)
    contact = person(object_id, found, item, lookup, notified)
    return [
        Event(
            type=CONTACT_TYPES[kind], occurred_at=when, contact=contact, properties=properties, correlation=correlation
        )
    ]


async def removal_event(kind: str, item: dict[str, Any], when: datetime, lookup: Lookup) -> list[Event]:
    """Deletion and privacy deletion: nothing is fetched (the record is gone, or must no longer be read)."""
    object_id = _id(item["objectId"])
    return [
        Event(
            type=CONTACT_TYPES[kind],
            occurred_at=when,
            contact=ContactRef(external_ids={"hubspot": object_id}),
            properties=_base_properties(item, object_id),
            correlation=[f"hubspot-contact:{object_id}"],
        )
    ]


async def merge_event(kind: str, item: dict[str, Any], when: datetime, lookup: Lookup) -> list[Event]:
    """The record that survives the merge: `newObjectId` when HubSpot made one, else the primary."""
    primary = _id(item.get("primaryObjectId") or item["objectId"])
    survivor = _id(item["newObjectId"]) if item.get("newObjectId") else primary
    merged = [_id(v) for v in item.get("mergedObjectIds") or []]
    found = await lookup.contact(survivor)
    properties = {
        **_base_properties(item, survivor, found is not None),
        "primary_id": primary,
        "merged_ids": merged,
    }
    others = [i for i in dict.fromkeys([primary, *merged]) if i != survivor]
    return [
        Event(
            type="contact.merged",
            occurred_at=when,
            contact=person(survivor, found, item, lookup),
            properties=properties,
            correlation=[f"hubspot-contact:{i}" for i in [survivor, *others]],
        )
    ]


def first_contact(deal: dict[str, Any] | None) -> str | None:
    """The deal's first associated contact, in the order HubSpot lists them (it marks none as primary)."""
    results = (((deal or {}).get("associations") or {}).get("contacts") or {}).get("results") or []
    return _id(results[0]["id"]) if results else None


async def deal_event(kind: str, item: dict[str, Any], when: datetime, lookup: Lookup) -> list[Event]:
    if kind == "deal.propertyChange" and item.get("propertyName") != "dealstage":
        return []  # only stage changes drive journeys; nothing is fetched for the others
    deal_id = _id(item["objectId"])
    deal = await lookup.deal(deal_id)
    contact_id = first_contact(deal)
    if contact_id is None:  # no one to act on; a contact-less event would invent an anonymous contact
        log.info("deal event skipped: no associated contact", deal_id=deal_id, deal_found=deal is not None)
        return []
    props = (deal or {}).get("properties") or {}
    stage = item.get("propertyValue") if kind == "deal.propertyChange" else props.get("dealstage")
    correlation = [f"deal:{deal_id}", f"hubspot-contact:{contact_id}"]
    if kind == "deal.propertyChange":
        correlation.insert(0, _change_key(f"deal:{deal_id}", "stage", stage))
    properties = {
        **_base_properties(item, deal_id),
        "deal_id": deal_id,
        "name": props.get("dealname"),
        "stage": stage,
        "pipeline": props.get("pipeline"),
        "amount": _money(props.get("amount")),
        "currency": props.get("deal_currency_code"),
        "close_date": props.get("closedate"),
        "contact_id": contact_id,
    }
    contact = person(contact_id, await lookup.contact(contact_id), item, lookup)
    event_type = "deal.created" if kind == "deal.creation" else "deal.stage_changed"
    return [Event(type=event_type, occurred_at=when, contact=contact, properties=properties, correlation=correlation)]


Handler = Callable[[str, dict[str, Any], datetime, Lookup], Awaitable[list[Event]]]
HANDLERS: dict[str, Handler] = {
    "contact.creation": contact_event,
    "contact.propertyChange": contact_event,
    "contact.deletion": removal_event,
    "contact.privacyDeletion": removal_event,
    "contact.merge": merge_event,
    "deal.creation": deal_event,
    "deal.propertyChange": deal_event,
}


@hookimpl
def register_sources(register: Callable[[type[Source]], None]) -> None:
    register(HubSpot)
