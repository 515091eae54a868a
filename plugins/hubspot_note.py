"""A note on the contact's HubSpot record (CRM v3 notes API), created at most once per journey step.

HubSpot's create call takes no idempotency key, so a create whose answer was lost (a timeout
after HubSpot stored the note) must not be repeated blindly. Each note carries the step's
idempotency key in a note property of its own (`declic_idempotency_key`, created once in the
portal); every attempt first searches for a note holding the key and reports that note as sent
instead of creating another. When the property has unique values, HubSpot itself refuses a
second note with the key, which closes the gap left by the search index's few seconds of lag.
"""

from __future__ import annotations

import contextlib
import html
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
from pydantic import Field, SecretStr, field_validator

from declic_gateway import (
    DeliveryResult,
    Deployment,
    Message,
    SendContext,
    SendLimiter,
    Sink,
    SinkConfig,
    api_client,
    hookimpl,
    retry_after,
)

#: HubSpot-defined association type "note to contact" (notes guide, association type ids).
NOTE_TO_CONTACT = 202
#: "hs_note_body: the note's text content, limited to 65,536 characters" (notes guide).
BODY_LIMIT = 65_536
#: Worth another try: timeouts, locked (423) and "migration in progress" (477) are documented as transient.
RETRIABLE = frozenset({408, 423, 429, 477})
#: The daily limit resets at midnight in the portal's time zone, which the API does not say.
DAILY_LIMIT_PAUSE = 3600.0
#: The search endpoints allow 4 requests per second per token (changelog "CRM Search API rate limit
#: increase"; the usage guidelines say 5): each note costs one or two searches.
SEARCH_RATE = "4/1s"
#: After a create whose outcome is unknown, wait this long before looking for the note: HubSpot's search
#: index is eventually consistent and shows new records only after "several seconds".
SETTLE_SECONDS = 60.0
_PROPERTY_NAME = re.compile(r"[a-z][a-z0-9_]{0,99}")
_RECORD_ID = re.compile(r"[0-9]{1,30}")


class HubSpotNoteConfig(SinkConfig):
    rate: str | None = Field(
        "90/10s",
        description="At most COUNT HubSpot API calls per DURATION (a note usually costs 2 or 3). The default stays "
        "under the 100 per 10 s that private apps get on Free and Starter portals.",
    )
    app_token: SecretStr = Field(
        description="Private app access token with the scopes crm.objects.contacts.read and "
        "crm.objects.contacts.write (notes are written under the contacts scopes)."
    )
    api_base: str = Field("https://api.hubapi.com", description="Base URL of the HubSpot API.")
    key_property: str | None = Field(
        "declic_idempotency_key",
        description="Internal name of the single-line text note property that stores each step's idempotency key, "
        "so that a retried step finds its note instead of creating a second one. Create it once in the portal; "
        "null turns the check off (a retry after a timeout may then log the note twice).",
    )

    @field_validator("key_property")
    @classmethod
    def _property_name(cls, value: str | None) -> str | None:
        if value is not None and not _PROPERTY_NAME.fullmatch(value):
            raise ValueError(f"{value!r} is not a HubSpot property's internal name (lower case, digits, _)")
        return value


class Stop(Exception):
    """A call ended the send: carries the outcome to report, and HubSpot's answer when there was one."""

    def __init__(self, result: DeliveryResult, status: int | None = None, text: str = ""):
        super().__init__(result.error)
        self.result, self.status, self.text = result, status, text


class HubSpotNote(Sink):
    name = "hubspot_note"
    channel = "crm"
    Config = HubSpotNoteConfig

    def __init__(self, key: str, config: HubSpotNoteConfig, deployment: Deployment):
        super().__init__(key, config, deployment)
        self.base = config.api_base.rstrip("/")
        self._auth = {"Authorization": f"Bearer {config.app_token.get_secret_value()}"}
        # The core's limiter counts sends; HubSpot counts calls, and a note may take three.
        self._calls = SendLimiter(1000, config.rate)
        self._searches = SendLimiter(1000, SEARCH_RATE)
        # The configured API host is trusted (a proxy may be local); a redirect is never followed.
        self._client = api_client(self.base, config.timeout)
        #: Set when HubSpot said the rolling window is used up: until then a call would only earn a 429.
        self._resume_at: datetime | None = None

    def address(self, contact: dict[str, Any]) -> str | None:
        return hubspot_id(contact) or contact.get("email") or None

    async def close(self) -> None:
        await self._client.close()

    async def send(self, message: Message, ctx: SendContext) -> DeliveryResult:
        body = note_body(message)
        if len(body) > BODY_LIMIT:
            return DeliveryResult.permanent(f"the note is {len(body)} characters; HubSpot takes at most {BODY_LIMIT}")
        try:
            existing = await self._find_note(message.idempotency_key)
            if existing is not None:
                return DeliveryResult.sent(existing)
            contact_id = await self._contact_id(message.to)
            return DeliveryResult.sent(await self._create(body, contact_id, message.idempotency_key))
        except Stop as stop:
            return stop.result

    # -- the three steps -------------------------------------------------------------------------

    async def _find_note(self, key: str) -> str | None:
        """The note an earlier attempt of this step created, if any."""
        prop = self.config.key_property
        if prop is None or not key:
            return None
        data = await self._call("POST", "/crm/v3/objects/notes/search", _search(prop, key), search=True)
        return _first_id(data, "POST /crm/v3/objects/notes/search")

    async def _contact_id(self, address: str) -> str:
        """The HubSpot record id: the address itself when Declic knows it, else found by e-mail."""
        if _RECORD_ID.fullmatch(address):
            return address
        data = await self._call("POST", "/crm/v3/objects/contacts/search", _search("email", address), search=True)
        found = _first_id(data, "POST /crm/v3/objects/contacts/search")
        if found is None:
            error = f"no HubSpot contact has the e-mail {address}: create it, then replay the step"
            raise Stop(DeliveryResult.permanent(error))
        return found

    async def _create(self, body: str, contact_id: str, key: str) -> str:
        properties = {"hs_timestamp": _timestamp(self.deployment.clock.now()), "hs_note_body": body}
        if self.config.key_property and key:
            properties[self.config.key_property] = key
        payload = {
            "properties": properties,
            "associations": [
                {
                    "to": {"id": contact_id},
                    "types": [{"associationCategory": "HUBSPOT_DEFINED", "associationTypeId": NOTE_TO_CONTACT}],
                }
            ],
        }
        try:
            data = await self._call("POST", "/crm/v3/objects/notes", payload, ambiguous=True)
        except Stop as stop:
            if not _is_conflict(stop):
                raise
            return await self._note_by_key(key)
        note_id = _id_of(data)
        if note_id is None:
            # HubSpot said yes without saying which note: find it by its key once the index has it.
            raise Stop(DeliveryResult.retry("HubSpot created the note but sent no id", after=SETTLE_SECONDS))
        return note_id

    async def _note_by_key(self, key: str) -> str:
        """HubSpot refused a second note with this key (a unique property): read the first one directly."""
        prop = self.config.key_property or ""
        path = f"/crm/v3/objects/notes/{key}?idProperty={prop}"
        try:
            found = _id_of(await self._call("GET", path, None))
        except Stop:
            found = None
        if found is None:
            raise Stop(DeliveryResult.retry("HubSpot holds a note with this key already", after=SETTLE_SECONDS))
        return found

    # -- HTTP ------------------------------------------------------------------------------------

    async def _call(
        self, method: str, path: str, payload: dict[str, Any] | None, search: bool = False, ambiguous: bool = False
    ) -> dict[str, Any]:
        """One API call; any answer but a 2xx JSON object raises Stop with its outcome."""
        self._wait_for_window()
        what = f"{method} {path.partition('?')[0]}"
        try:
            async with self._searches if search else contextlib.nullcontext(), self._calls:
                status, headers, text = await self._exchange(method, path, payload)
        except (aiohttp.ClientError, TimeoutError) as exc:
            error = f"HubSpot API unreachable ({what}): {type(exc).__name__}: {exc}".rstrip(": ")
            raise Stop(DeliveryResult.retry(error, after=SETTLE_SECONDS if ambiguous else None)) from None
        self._note_window(headers)
        if 200 <= status < 300:
            data = _json(text)
            if data is None:
                error = f"HubSpot answered {what} with something other than a JSON object: {text[:200]!r}"
                raise Stop(DeliveryResult.retry(error, after=SETTLE_SECONDS if ambiguous else None))
            return data
        raise Stop(self._failure(status, headers, text, what, ambiguous), status, text)

    async def _exchange(self, method: str, path: str, payload: dict[str, Any] | None) -> tuple[int, Any, str]:
        async with self._client.request(method, self.base + path, json=payload, headers=self._auth) as reply:
            return reply.status, reply.headers, (await reply.read()).decode("utf-8", "replace")

    def _failure(self, status: int, headers: Any, text: str, what: str, ambiguous: bool) -> DeliveryResult:
        detail = _detail(text)
        if status == 429:
            after = self._throttle_delay(headers, text)
            return DeliveryResult.retry(f"HubSpot rate limit (429): {detail}", after=after)
        if status in (401, 403):
            return DeliveryResult.permanent(
                f"HubSpot refused the app_token ({status}): {detail}; check the token and its scopes "
                "crm.objects.contacts.read and crm.objects.contacts.write"
            )
        if status in RETRIABLE or status >= 500:
            after = retry_after(headers.get("Retry-After"), self.deployment.clock.now())
            if ambiguous:  # a 5xx may come after the note was stored
                after = max(after or 0.0, SETTLE_SECONDS)
            return DeliveryResult.retry(f"HubSpot answered {status} to {what}: {detail}", after=after)
        return DeliveryResult.permanent(f"HubSpot answered {status} to {what}: {detail}{self._hint(text)}")

    def _hint(self, text: str) -> str:
        prop = self.config.key_property
        if prop and prop in text and "PROPERTY_DOESNT_EXIST" in text:
            return f" (create the note property {prop}: see the hubspot_note docs, or set key_property: null)"
        return ""

    def _wait_for_window(self) -> None:
        now = self.deployment.clock.now()
        if self._resume_at is not None and now < self._resume_at:
            raise Stop(
                DeliveryResult.retry(
                    "HubSpot rate-limit window used up (X-HubSpot-RateLimit-Remaining: 0)",
                    after=(self._resume_at - now).total_seconds(),
                )
            )

    def _note_window(self, headers: Any) -> None:
        interval = _int(headers.get("X-HubSpot-RateLimit-Interval-Milliseconds"))
        if headers.get("X-HubSpot-RateLimit-Remaining") == "0" and interval:
            self._resume_at = self.deployment.clock.now() + timedelta(milliseconds=interval)

    def _throttle_delay(self, headers: Any, text: str) -> float | None:
        """Retry-After when HubSpot sends it (not guaranteed); else the daily pause; else the window's length."""
        if (after := retry_after(headers.get("Retry-After"), self.deployment.clock.now())) is not None:
            return after
        policy = (_json(text) or {}).get("policyName")
        if policy == "DAILY" or headers.get("X-HubSpot-RateLimit-Daily-Remaining") == "0":
            return DAILY_LIMIT_PAUSE
        interval = _int(headers.get("X-HubSpot-RateLimit-Interval-Milliseconds"))
        return interval / 1000 if interval else None


def hubspot_id(contact: dict[str, Any]) -> str | None:
    """The contact's HubSpot record id when Declic knows it (the HubSpot source records it as an identity)."""
    value = (contact.get("external_ids") or {}).get("hubspot") or (contact.get("attributes") or {}).get("hubspot_id")
    text = str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else ""
    return text if _RECORD_ID.fullmatch(text) else None


def note_body(message: Message) -> str:
    """HubSpot shows the body as rich text: HTML as rendered, or the text escaped with its line breaks kept."""
    body = message.html or "<br>".join(html.escape(line) for line in message.text.splitlines())
    if message.subject:
        body = f"<p><strong>{html.escape(message.subject)}</strong></p>{body}"
    return body


def _search(prop: str, value: str) -> dict[str, Any]:
    return {
        "filterGroups": [{"filters": [{"propertyName": prop, "operator": "EQ", "value": value}]}],
        "properties": [prop],
        "limit": 1,
    }


def _first_id(data: dict[str, Any], what: str) -> str | None:
    results = data.get("results")
    if not isinstance(results, list):
        raise Stop(DeliveryResult.retry(f"HubSpot answered {what} without a results list"))
    return next((found for item in results if (found := _id_of(item)) is not None), None)


def _id_of(item: Any) -> str | None:
    value = item.get("id") if isinstance(item, dict) else None
    text = str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else ""
    return text if _RECORD_ID.fullmatch(text) else None


def _is_conflict(stop: Stop) -> bool:
    """A second note with a unique key: 409, or a 400 VALIDATION_ERROR saying the value is taken."""
    return stop.status == 409 or (stop.status == 400 and "already has that value" in stop.text)


def _timestamp(now: datetime) -> str:
    """hs_timestamp in UTC with milliseconds, as HubSpot's examples write it: 2024-01-15T10:30:00.000Z."""
    return now.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json(text: str) -> dict[str, Any] | None:
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _detail(text: str) -> str:
    """HubSpot's error body: `message` and `category` (rate limits: `policyName`); else the text, cut short."""
    data = _json(text) or {}
    message, category = data.get("message"), data.get("category") or data.get("policyName")
    if isinstance(message, str):
        return f"{category}: {message}"[:300] if category else message[:300]
    return text[:300] or "(empty body)"


def _int(value: str | None) -> int | None:
    return int(value) if value and re.fullmatch(r"[0-9]{1,12}", value.strip()) else None


@hookimpl
def register_sinks(register: Callable[[type[Sink]], None]) -> None:
    register(HubSpotNote)
