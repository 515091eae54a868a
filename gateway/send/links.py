"""Signed links that messages carry: one-click unsubscribe (RFC 8058)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..store import META, sql

SECRET_KEY = "link_secret"


def link_secret(conn: Connection) -> bytes:
    """The key that signs links, made once per deployment and kept in the database."""
    conn.execute(
        sql.insert(conn.dialect.name, META).values(key=SECRET_KEY, value=secrets.token_hex(32)).on_conflict_do_nothing()
    )
    return bytes.fromhex(conn.execute(sa.select(META.c.value).where(META.c.key == SECRET_KEY)).scalar_one())


def make_token(secret: bytes, contact_id: int, channel: str) -> str:
    payload = f"{contact_id}.{channel}"
    return f"{_b64(payload.encode())}.{_b64(_sign(secret, payload))}"


def read_token(secret: bytes, token: str) -> tuple[int, str] | None:
    try:
        encoded, signature = token.split(".")
        payload = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
        contact, channel = payload.split(".")
        given = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
    except (ValueError, UnicodeDecodeError):
        return None
    if not hmac.compare_digest(given, _sign(secret, payload)):
        return None
    return int(contact), channel


def _sign(secret: bytes, payload: str) -> bytes:
    return hmac.new(secret, payload.encode(), hashlib.sha256).digest()[:16]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")
