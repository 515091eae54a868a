"""A deployment as it was at a moment, copied out of its database into another: for `declic backtest`.

Read from `live` (a read-only snapshot), written to `scratch` (a throwaway database):
- contacts created before the moment, with their ids (unsubscribe links name them), identities and
  devices; their consent as the ledger had it then (the latest statement applied before the moment);
  names, attributes and e-mail/phone status as they are now, for no history of them is kept; the lead
  score only when it was last changed before the moment;
- their events stored before the moment (their history: `contact.count(...)`, the last activity that
  inactivity rules count from, dates carried by events), under ids of their own, as the replay
  numbers its events from its own calls; Declic's own events (date reached, inactive) are left out;
- the messages sent within the pressure window before the moment, so that the caps start full;
- the stored calls received in a period, oldest first, to replay; a call to one of Declic's own
  endpoints names a contact by its live id, which the replay finds again by its identities.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..store import CONSENTS, CONTACTS, DELIVERIES, EVENTS, IDENTITIES, INBOX, PUSH_SUBSCRIPTIONS, jsoncodec
from ..store.inbox import NewCall
from .consent import PENDING_REASON

C, L, P, D, E, IN = CONTACTS.c, CONSENTS.c, PUSH_SUBSCRIPTIONS.c, DELIVERIES.c, EVENTS.c, INBOX.c
I = IDENTITIES.c  # noqa: E741
PAGE = 500


def copy_contacts(live: Connection, scratch: Connection, moment: datetime) -> int:
    """The contacts as of `moment`; returns how many."""
    copied, after = 0, 0
    while True:
        rows = live.execute(
            sa.select(CONTACTS).where(C.created_at < moment, C.id > after).order_by(C.id).limit(PAGE)
        ).all()
        if not rows:
            break
        ids = [row.id for row in rows]
        consent = consent_as_of(live, ids, moment)
        scratch.execute(sa.insert(CONTACTS), [_as_of(row._asdict(), consent.get(row.id, {}), moment) for row in rows])
        _copy(live, scratch, IDENTITIES, I.contact_id.in_(ids))
        _copy(live, scratch, PUSH_SUBSCRIPTIONS, sa.and_(P.contact_id.in_(ids), P.created_at < moment))
        _copy_events(live, scratch, ids, moment)
        copied, after = copied + len(rows), ids[-1]
    _reserve_ids(live, scratch, moment)
    return copied


def consent_as_of(live: Connection, contact_ids: list[int], moment: datetime) -> dict[int, dict[str, Any]]:
    """Each contact's consent entries in force at `moment`: the last statement the ledger applied before it."""
    rows = live.execute(
        sa.select(L.contact_id, L.channel, L.state, L.source, L.stated_at, L.action, L.reason)
        .where(L.contact_id.in_(contact_ids), L.applied, L.recorded_at < moment)
        .order_by(L.recorded_at, L.id)
    )
    found: dict[int, dict[str, Any]] = {}
    for row in rows:
        pending = row.state == "granted" and PENDING_REASON in (row.reason or "")
        found.setdefault(row.contact_id, {})[row.channel] = {
            "state": "pending" if pending else row.state,
            "source": row.source,
            "at": row.stated_at.replace(tzinfo=UTC).isoformat() if row.stated_at else None,
            "action": row.action,
        }
    return found


def _as_of(row: dict[str, Any], consent: dict[str, Any], moment: datetime) -> dict[str, Any]:
    erased = row["email_status"] == "erased"  # its data is gone, and so is any consent it gave
    scored = row["score_at"] is not None and row["score_at"] < moment.replace(tzinfo=None)
    return {
        **row,
        "consent": jsoncodec.dumps({} if erased else consent),
        "score": row["score"] if scored else 0.0,
        "score_at": row["score_at"] if scored else None,
    }


def _copy_events(live: Connection, scratch: Connection, contact_ids: list[int], moment: datetime) -> None:
    received_later = sa.exists().where(IN.id == E.inbox_id, IN.received_at >= moment)  # the replay makes those
    query = sa.select(EVENTS).where(
        E.contact_id.in_(contact_ids), E.occurred_at < moment, E.source != "declic", ~received_later
    )
    rows = [{**row._asdict(), "id": f"live-{row.id}", "inbox_id": None} for row in live.execute(query)]
    if rows:
        scratch.execute(sa.insert(EVENTS), rows)


def _reserve_ids(live: Connection, scratch: Connection, moment: datetime) -> None:
    """Contacts the replay creates must not take the id of a live contact made after `moment`: a
    consent link naming that one would land on a stranger. An empty, erased row holds the highest id."""
    highest = live.execute(sa.select(sa.func.max(C.id))).scalar_one_or_none()
    if highest is None or scratch.execute(sa.select(C.id).where(C.id == highest)).first() is not None:
        return
    scratch.execute(
        sa.insert(CONTACTS).values(
            id=highest, email_status="erased", attributes="{}", consent="{}", created_at=moment, updated_at=moment
        )
    )


def copy_recent_sends(live: Connection, scratch: Connection, moment: datetime, window: timedelta) -> int:
    """Messages sent in the `window` before `moment`, which pressure caps count."""
    where = sa.and_(D.status.in_(("sending", "sent")), D.sent_at >= moment - window, D.sent_at < moment)
    return _copy(live, scratch, DELIVERIES, where)


def _copy(live: Connection, scratch: Connection, table: sa.Table, where: Any) -> int:
    rows = [row._asdict() for row in live.execute(sa.select(table).where(where))]
    if rows:
        scratch.execute(sa.insert(table), rows)
    return len(rows)


def identities_of(live: Connection, contact_id: int) -> list[tuple[str, str]]:
    """How a live contact is recognised: its addresses and its sources' ids."""
    return [(row.kind, row.value) for row in live.execute(sa.select(I.kind, I.value).where(I.contact_id == contact_id))]


def holder(scratch: Connection, keys: list[tuple[str, str]]) -> int | None:
    """The replayed contact recognised by one of a live contact's identities (a copied one has its id too)."""
    if not keys:
        return None
    found = scratch.execute(sa.select(I.contact_id).where(sa.tuple_(I.kind, I.value).in_(keys)).limit(1))
    return found.scalar_one_or_none()


def calls_between(live: Connection, start: datetime, end: datetime) -> Iterator[NewCall]:
    """The calls received in [start, end), in the order they arrived, read a page at a time."""
    after: tuple[datetime, int] | None = None
    while True:
        query = sa.select(INBOX).where(IN.received_at >= start, IN.received_at < end)
        if after is not None:
            query = query.where(sa.tuple_(IN.received_at, IN.id) > sa.tuple_(*after))
        rows = live.execute(query.order_by(IN.received_at, IN.id).limit(PAGE)).all()
        for row in rows:
            received = row.received_at.replace(tzinfo=UTC)
            yield NewCall(row.source, row.dedupe_key, received, json.loads(row.headers), bytes(row.body))
        if len(rows) < PAGE:
            return
        after = (rows[-1].received_at, rows[-1].id)
