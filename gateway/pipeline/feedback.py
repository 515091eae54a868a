"""Delivery feedback: what a provider, or Declic's own pixel and links, said about a sent message.

An event finds its delivery whichever way the message went: by Declic's delivery key
(`properties.delivery`: Declic's own tracking, Mandrill's `msg.metadata`), by the provider's own
id (`properties.provider_message_id`: a Twilio SID, a Mandrill `_id` sent through its API), or by
the RFC 5322 Message-ID the SMTP sink wrote (`properties.message_id`). Opens and clicks flagged as
a machine's are stored with their event but never become the delivery's feedback: `contact.opened()`
means a person opened it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..insight import journal
from ..kit.events import FEEDBACK_TYPES, Event
from ..store import DELIVERIES, ENROLMENTS, EVENTS, jobqueue, jsoncodec

D = DELIVERIES.c
EV = EVENTS.c
#: The internal sources that store the fetches of Declic's own pixel and click redirects (http/tracking.py).
OPEN_SOURCE, CLICK_SOURCE = "~open", "~click"
TRACKING_SOURCES = (OPEN_SOURCE, CLICK_SOURCE)
#: Clicks on two different links of one message this close together are a scanner's: people click one.
BURST = timedelta(seconds=2)
#: The delivery key inside a Message-ID the SMTP sink wrote: `<dcl-...@domain>`.
_OWN_MESSAGE_ID = re.compile(r"<?(dcl-[0-9a-f]{40})@[^>]*>?")


def fetch_key(contact_id: int, digest: str) -> str:
    """A stored fetch's key names its contact: an erasure finds the fetches that made no event (a second open)."""
    return f"c{contact_id}:{digest}"


def fetch_keys_of(contact_id: int) -> str:
    return fetch_key(contact_id, "")


def apply(conn: Connection, event: Event, contact_id: int, now: datetime) -> Event:
    """Record the event's feedback on its delivery; a click in a burst comes back flagged as a machine's."""
    if event.type == "email.clicked" and event.properties.get("delivery") and not is_machine(event):
        event = _flag_burst(conn, event, contact_id, now)
    if not is_machine(event):
        record(conn, event, FEEDBACK_TYPES[event.type], now)
    return event


def is_machine(event: Event) -> bool:
    return bool(event.properties.get("machine"))


def record(conn: Connection, event: Event, feedback: str, now: datetime) -> int:
    """Add `feedback` to the set (as "clicked,delivered,opened") of each delivery the event names."""
    where = _names(event)
    if where is None:
        return 0
    rows = conn.execute(sa.select(D.id, D.feedback).where(where)).all()
    for row in rows:
        merged = ",".join(sorted({*filter(None, (row.feedback or "").split(",")), feedback}))
        conn.execute(sa.update(DELIVERIES).where(D.id == row.id).values(feedback=merged, feedback_at=now))
    return len(rows)


def _names(event: Event) -> sa.ColumnElement[bool] | None:
    properties = event.properties
    found: list[sa.ColumnElement[bool]] = []
    if isinstance(key := properties.get("delivery"), str) and key:
        found.append(D.idempotency_key == key)
    if isinstance(provider_id := properties.get("provider_message_id"), str) and provider_id:
        found.append(D.provider_id == provider_id)
    if isinstance(message_id := properties.get("message_id"), str) and message_id:
        own = _OWN_MESSAGE_ID.fullmatch(message_id.strip())
        found.append(D.idempotency_key == own[1] if own else D.provider_id == message_id.strip())
    return sa.or_(*found) if found else None


def _flag_burst(conn: Connection, event: Event, contact_id: int, now: datetime) -> Event:
    """A click on another link of the same message moments before this one: both are a scanner's.

    This click is flagged before anything acts on it. The earlier ones are flagged in the events table
    (for KPIs) and lose their dedupe key, so that a person's later click on that link still counts; what
    they did is undone: the journeys they started end, and the delivery is no longer `clicked` unless a
    person's click remains. (Score points they added stay.)
    """
    delivery, link = event.properties["delivery"], _link(event.properties)
    clicks = _clicks(conn, contact_id, event.source, delivery)
    window = (event.occurred_at - BURST, event.occurred_at + BURST)
    burst = [c for c in clicks if window[0] <= c.at <= window[1] and _link(c.properties) != link]
    if not burst:
        return event
    unmasked = [c for c in burst if not c.properties.get("machine")]
    for click in unmasked:
        reasons = [*click.properties.get("machine_reasons", []), "burst"]
        flagged = {**click.properties, "machine": True, "machine_reasons": reasons}
        conn.execute(
            sa.update(EVENTS).where(EV.id == click.id).values(properties=jsoncodec.dumps(flagged), dedupe_key=None)
        )
    if unmasked:
        _unwind(conn, [c.id for c in unmasked], now)
        people = [c for c in clicks if not c.properties.get("machine") and c not in unmasked]
        if not people:
            _forget(conn, delivery, "clicked", now)
    reasons = [*event.properties.get("machine_reasons", []), "burst"]
    properties = {**event.properties, "machine": True, "machine_reasons": reasons}
    dedupe_key = event.dedupe_key.replace(":person", ":machine") if event.dedupe_key else None
    return event.model_copy(update={"properties": properties, "dedupe_key": dedupe_key})


def _link(properties: dict[str, Any]) -> Any:
    """Which link: its number in Declic's own tracking, its URL in a provider's report."""
    return properties.get("link") or properties.get("url")


@dataclass(frozen=True)
class _Click:
    id: str
    at: datetime
    properties: dict[str, Any]


def _clicks(conn: Connection, contact_id: int, source: str, delivery: str) -> list[_Click]:
    """The contact's clicks on this delivery from this source (a contact has few; their JSON is read here)."""
    rows = conn.execute(
        sa.select(EV.id, EV.occurred_at, EV.properties).where(
            EV.contact_id == contact_id, EV.type == "email.clicked", EV.source == source
        )
    ).all()
    found = [_Click(row.id, _utc(row.occurred_at), jsoncodec.loads(row.properties)) for row in rows]
    return [c for c in found if c.properties.get("delivery") == delivery]


def _utc(when: datetime) -> datetime:
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _unwind(conn: Connection, event_ids: list[str], now: datetime) -> None:
    """End the journeys that clicks, now known to be a scanner's, started."""
    ended = conn.execute(
        sa.update(ENROLMENTS)
        .where(ENROLMENTS.c.event_id.in_(event_ids), ENROLMENTS.c.status == "active")
        .values(status="exited", ended_at=now)
        .returning(ENROLMENTS.c.id, ENROLMENTS.c.rule, ENROLMENTS.c.contact_id, ENROLMENTS.c.event_id)
    ).all()
    if not ended:
        return
    pending = dict(jobqueue.cancel_pending(conn, [row.id for row in ended], now))
    for row in ended:
        step = pending.get(row.id)
        reason = "the click that started it was a link scanner's"
        journal.record(
            conn, now, row.rule, row.contact_id, "exited", step=None if step is None else step + 1, reason=reason
        )


def _forget(conn: Connection, delivery: str, feedback: str, now: datetime) -> None:
    row = conn.execute(sa.select(D.id, D.feedback).where(D.idempotency_key == delivery)).first()
    if row is None or not row.feedback:
        return
    left = ",".join(sorted(set(row.feedback.split(",")) - {feedback})) or None
    conn.execute(sa.update(DELIVERIES).where(D.id == row.id).values(feedback=left, feedback_at=now))
