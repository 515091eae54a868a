"""A contact's record: found by what people know them by, shown as a timeline of what happened
and why, exported whole for the person who asks (GDPR art. 15 and 20)."""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..kit.addresses import e164
from ..store import (
    CONSENTS,
    CONTACTS,
    CONVERSIONS,
    DECISIONS,
    DELIVERIES,
    ENROLMENTS,
    EVENTS,
    IDENTITIES,
    INBOX,
    jsoncodec,
)
from . import rendered

I = IDENTITIES.c  # noqa: E741
#: The largest id an INTEGER column holds (32-bit on PostgreSQL).
MAX_ID = 2**31 - 1


def find(conn: Connection, query: str, phone_region: str | None = None) -> list[int]:
    """Contacts named by an e-mail, a phone number (national numbers read in `phone_region`, as
    webhooks' are), `kind:value` (a source's id) or `#id` (Declic's)."""
    text = query.strip()
    if re.fullmatch(r"#\d{1,18}", text):
        if int(text[1:]) > MAX_ID:  # beyond the INTEGER column: PostgreSQL would refuse the comparison
            return []
        found = conn.execute(sa.select(CONTACTS.c.id).where(CONTACTS.c.id == int(text[1:])))
        return list(found.scalars())
    if "@" in text:
        keys = [("email", text.lower())]
    elif re.fullmatch(r"\+?[\d ().-]{6,}", text):
        keys = [("phone", e164(text, phone_region) or text)]
    elif ":" in text:
        kind, value = text.split(":", 1)
        keys = [(kind, value)]
    else:
        return []
    rows = conn.execute(sa.select(I.contact_id).where(sa.tuple_(I.kind, I.value).in_(keys)).distinct())
    return sorted(rows.scalars())


def card(conn: Connection, contact_id: int) -> dict[str, Any] | None:
    """What a contact is known as: names, addresses, their states, and every identity; None if unknown."""
    C = CONTACTS.c
    row = conn.execute(
        sa.select(
            C.id, C.email, C.phone, C.first_name, C.last_name, C.email_status, C.phone_status, C.created_at
        ).where(C.id == contact_id)
    ).first()
    if row is None:
        return None
    identities = conn.execute(sa.select(I.kind, I.value).where(I.contact_id == contact_id).order_by(I.kind, I.value))
    return {**row._asdict(), "identities": [(r.kind, r.value) for r in identities]}


def timeline(conn: Connection, contact_id: int) -> list[dict[str, Any]]:
    """Every event received about the contact and every decision about them, in time order:
    what came in, and for each rule whose trigger matched, what was decided and why."""
    received = sa.func.coalesce(INBOX.c.received_at, EVENTS.c.occurred_at)
    entries = [
        {
            "at": row.received,  # Declic's clock, as for decisions; `occurred_at` is the source's
            "what": "event",
            "type": row.type,
            "source": row.source,
            "event_id": row.id,
            "occurred_at": row.occurred_at,
        }
        for row in conn.execute(
            sa.select(EVENTS.c.id, EVENTS.c.type, EVENTS.c.source, EVENTS.c.occurred_at, received.label("received"))
            .outerjoin(INBOX, INBOX.c.id == EVENTS.c.inbox_id)
            .where(EVENTS.c.contact_id == contact_id)
        )
    ]
    entries += [
        {
            "at": row.at,
            "what": "decision",
            "rule": row.rule,
            "step": row.step,
            "action": row.action,
            "via": row.via,
            "reason": row.reason,
            "event_id": row.event_id,
        }
        for row in conn.execute(sa.select(DECISIONS).where(DECISIONS.c.contact_id == contact_id))
    ]
    entries += [
        {
            "at": row.at,
            "what": "consent",
            "channel": row.channel,
            "state": row.state,
            "source": row.source,
            "applied": row.applied,
            "reason": row.reason,
            "event_id": row.event_id,
        }
        for row in conn.execute(
            sa.select(CONSENTS, sa.func.coalesce(CONSENTS.c.received_at, CONSENTS.c.recorded_at).label("at")).where(
                CONSENTS.c.contact_id == contact_id
            )
        )
    ]
    kept = rendered.of_contact(conn, contact_id)
    entries += [
        {
            "at": row.sent_at,
            "what": "message",
            "rule": row.rule,
            "step": row.step,
            "via": row.sink,
            **kept[row.idempotency_key],
            "event_id": None,
        }
        for row in conn.execute(
            sa.select(DELIVERIES.c.idempotency_key, DELIVERIES.c.rule, DELIVERIES.c.step, DELIVERIES.c.sink)
            .add_columns(DELIVERIES.c.sent_at)
            .where(DELIVERIES.c.contact_id == contact_id, DELIVERIES.c.idempotency_key.in_(kept))
        )
    ]
    # At one moment: call by call (event ids are "inbox id.index"), what came in, then what it caused;
    # the message right after the decision to send it.
    order = {"event": 0, "consent": 1, "decision": 2, "message": 3}
    return sorted(entries, key=lambda entry: (entry["at"], _sequence(entry["event_id"]), order[entry["what"]]))


def _sequence(event_id: str | None) -> tuple[float, ...]:
    """ "12.0" -> (12, 0); what no event caused (a send) comes after what calls brought at that moment."""
    try:
        return tuple(float(part) for part in (event_id or "").split("."))
    except ValueError:
        return (math.inf,)


def export(conn: Connection, contact_id: int) -> dict[str, Any]:
    """The whole record: fields, identities, consent ledger with its evidence, events, journeys,
    messages, decisions and conversions."""

    def rows(table: sa.Table, column: sa.ColumnElement[Any], *stored_json: str) -> list[dict[str, Any]]:
        found = conn.execute(sa.select(table).where(column == contact_id).order_by(*table.primary_key.columns))
        return [_plain(row._asdict(), stored_json) for row in found]

    return {
        "contact": rows(CONTACTS, CONTACTS.c.id, "attributes", "consent")[0],
        "identities": [
            {"kind": row.kind, "value": row.value}
            for row in conn.execute(sa.select(I.kind, I.value).where(I.contact_id == contact_id).order_by(I.kind))
        ],
        "consent_ledger": rows(CONSENTS, CONSENTS.c.contact_id, "evidence"),
        "events": rows(EVENTS, EVENTS.c.contact_id, "properties", "correlation"),
        "journeys": rows(ENROLMENTS, ENROLMENTS.c.contact_id),
        "messages": rows(DELIVERIES, DELIVERIES.c.contact_id),
        "messages_as_sent": [
            {"delivery_key": key, **message} for key, message in sorted(rendered.of_contact(conn, contact_id).items())
        ],
        "decisions": rows(DECISIONS, DECISIONS.c.contact_id),
        "conversions": rows(CONVERSIONS, CONVERSIONS.c.contact_id),
    }


def _plain(row: dict[str, Any], stored_json: tuple[str, ...]) -> dict[str, Any]:
    """A row as JSON-ready values: datetimes in ISO 8601 UTC, columns holding JSON text decoded."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, datetime):
            value = value.isoformat().replace("+00:00", "Z")
        elif key in stored_json and isinstance(value, str):
            value = jsoncodec.loads(value)
        out[key] = value
    return out
