"""Sent messages as they were rendered: kept so that a contact's timeline shows what they received.

Stored as zlib-compressed JSON (level 1: HTML mail shrinks several times for a few microseconds
per message; nothing ever queries inside a body).
"""

from __future__ import annotations

import functools
import json
import zlib
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..kit.sinks import Message
from ..store import RENDERED, appends, sql

R = RENDERED.c


def keep(conn: Connection, delivery_key: str, contact_id: int, at: datetime, message: Message) -> None:
    """Keep the copy of a sent message; a step sent again after a lost outcome keeps the first copy."""
    body = {
        "to": message.to,
        "headers": message.headers,
        "subject": message.subject,
        "text": message.text,
        "html": message.html,
    }
    packed = _compress(json.dumps(body, ensure_ascii=False).encode())
    row = {"delivery_key": delivery_key, "contact_id": contact_id, "at": at, "body": packed}
    appends.append(conn, _insert(conn.dialect.name), row)


def _compress(data: bytes) -> bytes:
    """zlib at level 1, with a window no larger than the message and a small hash table: zlib clears both for
    each message, which took 3/4 of the time for a mail of a few KB (67 -> 17 us, same size); a large body
    keeps the full window."""
    packer = zlib.compressobj(1, zlib.DEFLATED, min(15, max(9, len(data).bit_length())), 4)
    return packer.compress(data) + packer.flush()


@functools.cache
def _insert(dialect: str) -> sa.Insert:
    return sql.insert(dialect, RENDERED).on_conflict_do_nothing().inline()  # appended (store/appends.py)


def of_contact(conn: Connection, contact_id: int) -> dict[str, dict[str, Any]]:
    """The contact's kept messages by delivery key."""
    rows = conn.execute(sa.select(R.delivery_key, R.body).where(R.contact_id == contact_id))
    return {row.delivery_key: unpack(row.body) for row in rows}


def unpack(body: bytes) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(zlib.decompress(body))
    return loaded


def forget_contact(conn: Connection, contact_id: int) -> None:
    conn.execute(sa.delete(RENDERED).where(R.contact_id == contact_id))
