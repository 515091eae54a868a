"""The events table: each canonical event stored once, and read back at send time."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..kit.events import Event
from ..store import EVENTS, appends, jsoncodec

_INSERT_EVENT = sa.insert(EVENTS).inline()  # appended: no id read back (store/appends.py)


def store_event(conn: Connection, event: Event, contact_id: int) -> None:
    appends.append(
        conn,
        _INSERT_EVENT,
        {
            "id": event.id,
            "inbox_id": event.raw_ref,
            "source": event.source,
            "type": event.type,
            "occurred_at": event.occurred_at,
            "contact_id": contact_id,
            "correlation": jsoncodec.dumps(event.correlation),
            "properties": jsoncodec.dumps(event.properties),
            "dedupe_key": event.dedupe_key,
        },
    )


_EVENT = sa.select(EVENTS).where(EVENTS.c.id == sa.bindparam("event_id"))


def load_event(conn: Connection, event_id: str) -> dict[str, object]:
    return event_of(conn.execute(_EVENT, {"event_id": event_id}).one()._mapping)


def event_of(row: Mapping[Any, Any]) -> dict[str, object]:
    """A row of the events table as rules and templates see the event."""
    return {
        "id": row["id"],
        "source": row["source"],
        "type": row["type"],
        "occurred_at": row["occurred_at"],
        "correlation": jsoncodec.loads(row["correlation"]),
        "properties": jsoncodec.loads(row["properties"]),
    }


_PROPERTIES = sa.select(EVENTS.c.properties).where(EVENTS.c.id == sa.bindparam("event_id"))


def event_properties(conn: Connection, event_id: str) -> dict[str, Any]:
    """A stored event's properties; empty when retention or an erasure removed the event."""
    stored = conn.execute(_PROPERTIES, {"event_id": event_id}).scalar()
    return jsoncodec.loads(stored) if stored is not None else {}
