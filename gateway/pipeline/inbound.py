"""From a stored call to events: normalise, resolve contacts, store events, route."""

from __future__ import annotations

import inspect
import json
from datetime import datetime

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection

from ..config.settings import CONFIRM_EVENT
from ..errors import InvalidAddress, MalformedPayload, RetryLater
from ..kit.addresses import e164, parse_email
from ..kit.events import ERASE_TYPE, FEEDBACK_TYPES, ContactRef, Event
from ..kit.sources import RawCall, Source
from ..store import EVENTS, INBOX, appends, jobqueue
from ..store.inbox import fit_key
from . import contacts, feedback
from .eventlog import store_event
from .router import Router

log = structlog.get_logger("declic.inbound")
IN = INBOX.c


_LOAD_CALLS = sa.select(INBOX).where(IN.id.in_(sa.bindparam("ids", expanding=True)), IN.status == "received")


def load_calls(conn: Connection, inbox_ids: list[int]) -> dict[int, RawCall]:
    """The stored calls still to process, by id: one processed or failed already is left out,
    so a job run twice does nothing."""
    rows = conn.execute(_LOAD_CALLS, {"ids": inbox_ids})
    return {
        row.id: RawCall(row.id, row.source, row.received_at, json.loads(row.headers), row.body, row.dedupe_key)
        for row in rows
    }


async def normalize(source: Source | None, raw: RawCall, phone_region: str | None = None) -> list[Event]:
    """Run the plugin's normalize (plain or async), then name and fit its events for the tables (`named`, `fit`).
    Raises Unprocessable or RetryLater.

    Fitting is done here, on the event loop, not in the transaction that applies the call: it needs no
    database, and SQLite's one database thread, which applies calls in turn, is where the queue forms near
    capacity (docs/performance.md, session 18)."""
    if source is None:
        raise Unprocessable(f"source {raw.source!r} is no longer in the config")
    try:
        result = source.normalize(raw)
        events = await result if inspect.isawaitable(result) else result
    except (MalformedPayload, RetryLater):
        raise
    except Exception as exc:  # a plugin bug must not stop the queue; the call stays replayable
        log.exception("normalize crashed", source=raw.source, inbox_id=raw.id)
        raise Unprocessable(f"{type(source).__name__}.normalize crashed: {exc!r}") from exc
    try:
        return [fit(named(raw, index, event), phone_region) for index, event in enumerate(events)]
    except MalformedPayload:
        raise
    except Exception as exc:  # odd values from a plugin (or a bug here): this call fails, not its neighbours
        log.exception("events could not be fitted", source=raw.source, inbox_id=raw.id)
        raise Unprocessable(f"the events of {type(source).__name__}.normalize could not be stored: {exc!r}") from exc


def about(source: Source | None, raw: RawCall) -> list[tuple[str, str]] | None:
    """The identities a call waiting for a retry is about, as its source reads them; None: anyone."""
    if source is None:
        return None
    try:
        refs = source.about(raw)
    except Exception:  # a plugin bug here only costs ordering precision: the call holds everyone
        log.exception("about crashed", source=raw.source, inbox_id=raw.id)
        return None
    return None if refs is None else [key for ref in refs for key in contacts.identities(ref)]


class Unprocessable(MalformedPayload):
    """Normalisation cannot succeed as things are: the call is marked failed, replayable after a fix."""


def apply_calls(
    conn: Connection, calls: list[tuple[RawCall, list[Event]]], router: Router, now: datetime
) -> list[list[Event]]:
    """Apply calls (their events as `normalize` gives them) in the order given, in one transaction; the events
    stored, call by call. Who they are about is looked up in one statement for all of them; the caller marks
    the calls processed."""
    with contacts.known_ahead(conn, [event.contact for _, events in calls for event in events]):
        return [apply_events(conn, raw, events, router, now) for raw, events in calls]


def named(raw: RawCall, index: int, event: Event) -> Event:
    """The event as stored: its id says which call it came from (named before `fit`, whose logs say which)."""
    return event.model_copy(update={"id": f"{raw.id}.{index}", "source": raw.source, "raw_ref": raw.id})


def apply_events(conn: Connection, raw: RawCall, events: list[Event], router: Router, now: datetime) -> list[Event]:
    """Resolve contacts, store and route each event of a call, named and fitted (`normalize`)."""
    stored = []
    for event in events:
        if event.dedupe_key and seen_before(conn, raw.source, event.dedupe_key):
            continue
        contact, changed = contacts.upsert(conn, event.contact, raw.source, now, event, raw, router.double_opt_in)
        if event.type == ERASE_TYPE:
            contacts.erase(conn, contact["id"], now)
            event = event.model_copy(update={"properties": {}, "correlation": []})
        elif event.type in FEEDBACK_TYPES:
            event = feedback.apply(conn, event, contact["id"], now)
            if event.dedupe_key and seen_before(conn, raw.source, event.dedupe_key):
                continue  # flagged as a machine's click just now, and one was stored before
        if event.type == "email.bounced" and event.properties.get("bounce") == "hard":
            contacts.mark_email_bouncing(conn, contact["id"], now)
        store_event(conn, event, contact["id"])
        stored.append(event)
        if feedback.is_machine(event) and not router.machine_events:
            continue  # kept and flagged for the record; journeys and scores are about people
        with structlog.contextvars.bound_contextvars(event_id=event.id, source=raw.source):
            router.route(conn, event, contact, raw.received_at, changed)
            for request in confirmation_requests(event, changed):
                store_event(conn, request, contact["id"])
                router.route(conn, request, contact, raw.received_at)
    return stored


def confirmation_requests(event: Event, changed: frozenset[str]) -> list[Event]:
    """A grant now pending under double opt-in asks for its confirmation: Declic's own rule sends it."""
    return [
        Event(
            id=f"{event.id}.confirm-{channel}",
            source="declic",
            type=CONFIRM_EVENT,
            occurred_at=event.occurred_at,
            contact=ContactRef(),
            properties={"channel": channel},
            correlation=[f"confirm:{channel}:{event.id}"],
            raw_ref=event.raw_ref,
        )
        for channel in sorted(key.removeprefix("confirm:") for key in changed if key.startswith("confirm:"))
    ]


def mark_processed(conn: Connection, inbox_ids: list[int], now: datetime) -> None:
    """Written with the transaction's other queued rows (store/appends.py): on PostgreSQL, with its COMMIT."""
    for inbox_id in inbox_ids:
        appends.append(conn, _MARK_PROCESSED, {"inbox_id": inbox_id, "processed_at": now})


_MARK_PROCESSED = (
    sa.update(INBOX)
    .where(IN.id == sa.bindparam("inbox_id"))
    .values(status="processed", error=None, processed_at=sa.bindparam("processed_at"))
)


def fail_call(conn: Connection, inbox_id: int, now: datetime, reason: str) -> None:
    log.warning("call failed to normalise", inbox_id=inbox_id, reason=reason)
    _mark(conn, inbox_id, "failed", now, reason)


_SEEN = (
    sa.select(EVENTS.c.id)
    .where(EVENTS.c.source == sa.bindparam("source"), EVENTS.c.dedupe_key == sa.bindparam("key"))
    .limit(1)
)


def seen_before(conn: Connection, source: str, key: str) -> bool:
    return conn.execute(_SEEN, {"source": source, "key": key}).first() is not None


#: Column sizes (gateway/store/tables.py): PostgreSQL refuses what does not fit, SQLite would keep it.
_LIMITS = {"first_name": 200, "last_name": 200}
_DROP_IF_LONGER = {"phone": 40, "locale": 35, "timezone": 64}


def fit(event: Event, phone_region: str | None = None) -> Event:
    """Make a plugin's event fit the tables: over-long keys hashed, over-long fields cut or dropped, no NUL,
    phone numbers in E.164, so that "06 12 34 56 78" and Twilio's "+33612345678" are one person, and e-mail
    addresses valid, with the domain in its ASCII form, so that "münchen" and "xn--mnchen-3ya" are one too."""
    if len(event.type) > 100 or "\0" in event.type:
        raise Unprocessable(f"event type {event.type[:40]!r}... is longer than 100 characters")
    ref = event.contact
    updates: dict[str, object] = {}
    for name, limit in _DROP_IF_LONGER.items():
        value = _clean(getattr(ref, name))
        updates[name] = value if value is None or len(value) <= limit else None
    for name, limit in _LIMITS.items():
        value = _clean(getattr(ref, name))
        updates[name] = value[:limit] if value else value
    country = ref.attributes.get("country")
    region = country.upper() if isinstance(country, str) and len(country) == 2 else phone_region
    updates["phone"] = e164(updates["phone"], region)  # type: ignore[arg-type]
    for name in ("email", "previous_email"):
        updates[name] = valid_email(_clean(getattr(ref, name)), name, event)
    updates["external_ids"] = {_clean(k) or "": fit_key(_clean(str(v)) or "", 320) for k, v in ref.external_ids.items()}
    return event.model_copy(
        update={
            "contact": ref.model_copy(update=updates),
            "correlation": [fit_key(_clean(key) or "") for key in event.correlation],
            "dedupe_key": fit_key(event.dedupe_key) if event.dedupe_key else None,
        }
    )


def valid_email(address: str | None, field: str, event: Event) -> str | None:
    """The address as mail goes to it (IDN domain in ASCII), or None when it cannot be one: a bad address
    must neither become the contact's nor fail the whole call. The log line leaves the address out (personal
    data), and email-validator's reason too, as it may quote parts of the address."""
    if not address or not address.strip():
        return None
    try:
        return str(parse_email(address.strip()))
    except InvalidAddress:
        log.warning(
            "invalid e-mail address dropped", field=field, event_id=event.id, event_type=event.type, source=event.source
        )
        return None


def _clean(value: str | None) -> str | None:
    return value.replace("\0", "") if isinstance(value, str) else value


def _mark(conn: Connection, inbox_id: int, status: str, now: datetime, error: str | None = None) -> None:
    conn.execute(sa.update(INBOX).where(IN.id == inbox_id).values(status=status, error=error, processed_at=now))


def replay_failed(conn: Connection, inbox_ids: list[int] | None, now: datetime) -> list[int]:
    """Send failed calls through normalisation again, e.g. after a plugin fix."""
    where = IN.status == "failed"
    if inbox_ids is not None:
        where = sa.and_(where, IN.id.in_(inbox_ids))
    ids = list(
        conn.execute(sa.update(INBOX).where(where).values(status="received", error=None).returning(IN.id)).scalars()
    )
    if ids:
        jobqueue.add_inbox_jobs(conn, ids, now)
    return ids
