"""Reads the API lists that no other module has: contacts by id, deliveries, dead jobs, failed calls.

Each list is keyset-paginated on its primary key (`id > after ORDER BY id LIMIT n`), so a page
costs the same however deep it is.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ...store import CONTACTS, DELIVERIES, IDENTITIES, INBOX, JOBS, jsoncodec

C, D, J = CONTACTS.c, DELIVERIES.c, JOBS.c
CONTACT_COLUMNS = (
    "id",
    "email",
    "phone",
    "first_name",
    "last_name",
    "locale",
    "timezone",
    "email_status",
    "phone_status",
    "score",
    "created_at",
    "updated_at",
)


def contacts(conn: Connection, ids: list[int]) -> list[dict[str, Any]]:
    columns = [C[name] for name in CONTACT_COLUMNS]
    return [row._asdict() for row in conn.execute(sa.select(*columns).where(C.id.in_(ids)).order_by(C.id))]


def contact(conn: Connection, contact_id: int) -> dict[str, Any] | None:
    """The contact's fields, decoded attributes and consent, and identities; None when unknown."""
    row = conn.execute(sa.select(CONTACTS).where(C.id == contact_id)).first()
    if row is None:
        return None
    found = {name: getattr(row, name) for name in CONTACT_COLUMNS}
    found["attributes"] = jsoncodec.loads(row.attributes)
    found["consent"] = jsoncodec.loads(row.consent)
    identities = sa.select(IDENTITIES.c.kind, IDENTITIES.c.value).where(IDENTITIES.c.contact_id == contact_id)
    found["identities"] = [row._asdict() for row in conn.execute(identities.order_by(IDENTITIES.c.kind))]
    return found


def exists(conn: Connection, contact_id: int) -> bool:
    return conn.execute(sa.select(C.id).where(C.id == contact_id)).first() is not None


def deliveries(
    conn: Connection, after: int, limit: int, rule: str | None, contact_id: int | None, status: str | None
) -> list[dict[str, Any]]:
    query = sa.select(DELIVERIES).where(D.id > after)
    for column, value in ((D.rule, rule), (D.contact_id, contact_id), (D.status, status)):
        if value is not None:
            query = query.where(column == value)
    rows = conn.execute(query.order_by(D.id).limit(limit))
    return [{k: v for k, v in row._asdict().items() if k != "idempotency_key"} for row in rows]


def dead_jobs(conn: Connection, after: int, limit: int) -> list[dict[str, Any]]:
    columns = [J.id, J.kind, J.rule, J.step, J.enrolment_id, J.contact_id, J.inbox_id, J.attempts, J.last_error]
    query = sa.select(*columns, J.created_at, J.updated_at).where(J.status == "dead", J.id > after)
    return [row._asdict() for row in conn.execute(query.order_by(J.id).limit(limit))]


def failed_calls(conn: Connection, after: int, limit: int) -> list[dict[str, Any]]:
    columns = [INBOX.c.id, INBOX.c.source, INBOX.c.received_at, INBOX.c.error]
    query = sa.select(*columns).where(INBOX.c.status == "failed", INBOX.c.id > after)
    return [row._asdict() for row in conn.execute(query.order_by(INBOX.c.id).limit(limit))]
