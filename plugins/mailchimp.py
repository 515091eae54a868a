"""Mailchimp audience webhooks (form-encoded, URL token).

Mailchimp signs nothing, so the source is served at /hooks/NAME/URL_TOKEN and the core checks
the token in constant time. Mailchimp GETs the URL when the webhook is saved, then POSTs
`type`, `fired_at` and bracketed `data[...]` fields (`data[merges][FNAME]`) for subscribe,
unsubscribe, profile, upemail, cleaned and campaign. It sends no delivery id either: the
dedupe key is the default SHA-256 of the body, which a retry repeats byte for byte.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web
from pydantic import Field, SecretStr

from declic_gateway import (
    BadRequest,
    ConsentState,
    ConsentStatement,
    ContactRef,
    Event,
    MalformedPayload,
    PluginConfig,
    RawCall,
    Source,
    hookimpl,
)

#: `data[merges][FNAME]` -> "data", "[merges][FNAME]"
_NAME = re.compile(r"([^\[\]]+)((?:\[[^\[\]]*\])*)")
_PART = re.compile(r"\[([^\[\]]*)\]")
#: Merge fields that become the contact's own fields rather than attributes.
_OWN_MERGES = frozenset({"EMAIL", "FNAME", "LNAME"})


class MailchimpConfig(PluginConfig):
    url_token: SecretStr = Field(
        description="A long random secret that ends the webhook URL (/hooks/NAME/URL_TOKEN): Mailchimp signs nothing."
    )


class Mailchimp(Source):
    name = "mailchimp"
    Config = MailchimpConfig
    needs_url_token = True

    async def ping(self, request: web.Request) -> web.StreamResponse | None:
        return web.Response(text="ok")  # Mailchimp GETs the URL and wants a 200 before it saves the webhook

    async def verify(self, request: web.Request, body: bytes) -> None:
        try:
            fields = dict(form_fields(body))
        except ValueError as exc:
            raise BadRequest(f"not a form-encoded body: {exc}") from None
        if not fields.get("type"):
            raise BadRequest("no `type` field: not a Mailchimp audience webhook")

    def normalize(self, raw: RawCall) -> list[Event]:
        try:
            form = nest(form_fields(raw.body))
        except ValueError as exc:
            raise MalformedPayload(f"body: {exc}") from None
        kind, data = form.get("type"), form.get("data")
        handler = TYPES.get(kind) if isinstance(kind, str) else None
        if handler is None:
            return []  # `campaign` (about a sending, not a contact) and types Mailchimp may add later
        if not isinstance(data, dict):
            raise MalformedPayload(f"{kind}: no data[...] fields")
        try:
            return [handler(data, fired_at(form.get("fired_at"), raw))]
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedPayload(f"{kind}: {type(exc).__name__}: {exc}") from None


def form_fields(body: bytes) -> list[tuple[str, str]]:
    return parse_qsl(body.decode("utf-8"), keep_blank_values=True, errors="strict")


def nest(fields: list[tuple[str, str]]) -> dict[str, Any]:
    """`data[merges][FNAME]=Ada` -> {"data": {"merges": {"FNAME": "Ada"}}}; a repeated name: the last wins."""
    root: dict[str, Any] = {}
    for name, value in fields:
        match = _NAME.fullmatch(name)
        path = [match[1], *_PART.findall(match[2])] if match else [name]
        node = root
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"{name!r} conflicts with another field")
        if isinstance(node.get(path[-1]), dict):
            raise ValueError(f"{name!r} conflicts with another field")
        node[path[-1]] = value
    return root


def fired_at(value: Any, raw: RawCall) -> datetime:
    """`fired_at` is "YYYY-MM-DD HH:MM:SS" with no zone; taken as UTC (not documented by Mailchimp)."""
    if not value:
        return raw.received_at
    when = datetime.fromisoformat(str(value))
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _text(data: dict[str, Any], key: str) -> str:
    value = data[key]
    if not isinstance(value, str) or not value:
        raise ValueError(f"data[{key}] is empty")
    return value


def _member(data: dict[str, Any], consent: dict[str, ConsentStatement]) -> ContactRef:
    """The member: names from FNAME/LNAME, other non-blank merge fields as lower-case attributes."""
    merges = data.get("merges") or {}
    if not isinstance(merges, dict):
        raise TypeError("data[merges] is not a set of fields")
    return ContactRef(
        email=_text(data, "email"),
        first_name=merges.get("FNAME") or None,
        last_name=merges.get("LNAME") or None,
        # A blank merge field is one this form did not collect, not a reason to erase what we know.
        attributes={k.lower(): v for k, v in merges.items() if k not in _OWN_MERGES and v not in ("", {})},
        consent=consent,
    )


def _action(state: ConsentState, when: datetime, data: dict[str, Any], *evidence: str) -> ConsentStatement:
    """What the member did on Mailchimp's side, at `fired_at`, with the fields that show it (IP of the opt-in...)."""
    shown = {key: data[key] for key in evidence if data.get(key) not in (None, "")}
    return ConsentStatement(state=state, stated_at=when, action=True, evidence=shown)


def _properties(data: dict[str, Any], *keys: str) -> dict[str, Any]:
    found = {"list_id": data.get("list_id"), "member_id": data.get("id")}
    return found | {key: data.get(key) for key in keys}


def subscribe(data: dict[str, Any], when: datetime) -> Event:
    return Event(
        type="email.subscribed",
        occurred_at=when,
        contact=_member(data, {"email": _action("granted", when, data, "ip_opt", "ip_signup")}),
        properties=_properties(data, "email_type", "ip_opt", "ip_signup"),
    )


def unsubscribe(data: dict[str, Any], when: datetime) -> Event:
    """`action` unsub or delete (removed from the audience), `reason` manual or abuse: all withdraw consent."""
    return Event(
        type="email.unsubscribed",
        occurred_at=when,
        contact=_member(data, {"email": _action("withdrawn", when, data, "action", "reason", "campaign_id")}),
        properties=_properties(data, "action", "reason", "campaign_id"),
    )


def profile(data: dict[str, Any], when: datetime) -> Event:
    return Event(
        type="profile.updated",
        occurred_at=when,
        contact=_member(data, {}),
        properties=_properties(data, "email_type"),
    )


def upemail(data: dict[str, Any], when: datetime) -> Event:
    """An address change: the core finds the contact by the old address and moves it to the new one."""
    return Event(
        type="profile.updated",
        occurred_at=when,
        contact=ContactRef(email=_text(data, "new_email"), previous_email=_text(data, "old_email")),
        properties={"list_id": data.get("list_id"), "member_id": data.get("new_id"), "changed": ["email"]},
    )


def cleaned(data: dict[str, Any], when: datetime) -> Event:
    """Mailchimp removed an address it cannot mail: a hard bounce, or an abuse (spam) complaint."""
    reason = data.get("reason") or "unknown"
    properties = _properties(data, "campaign_id", "reason")
    if reason == "abuse":
        contact = ContactRef(email=_text(data, "email"), consent={"email": _action("withdrawn", when, data, "reason")})
        return Event(type="email.complained", occurred_at=when, contact=contact, properties=properties)
    contact = ContactRef(email=_text(data, "email"))
    # Only "hard" marks the address bouncing; a reason Mailchimp adds later is passed on as it is.
    return Event(type="email.bounced", occurred_at=when, contact=contact, properties=properties | {"bounce": reason})


TYPES: dict[str, Callable[[dict[str, Any], datetime], Event]] = {
    "subscribe": subscribe,
    "unsubscribe": unsubscribe,
    "profile": profile,
    "upemail": upemail,
    "cleaned": cleaned,
}


@hookimpl
def register_sources(register: Callable[[type[Source]], None]) -> None:
    register(Mailchimp)
