"""Links that messages carry: one-click unsubscribe (RFC 8058) and double opt-in confirmation,
as opaque, tamper-proof tokens.

A token is the contact and channel sealed with AES-GCM under the deployment's link key: nobody
can read a contact id out of it (ids are sequential, and would tell how many customers a shop
has and let anyone guess a neighbour's link), and nobody can forge or alter one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

import sqlalchemy as sa
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy.engine import Connection

from ..store import META, sql

SECRET_KEY = "link_secret"
UNSUBSCRIBE = "unsubscribe"
CONFIRM = "confirm"
_NONCE_BYTES = 12


def link_secret(conn: Connection) -> bytes:
    """The deployment's link key, made once and kept in the database."""
    conn.execute(
        sql.insert(conn.dialect.name, META).values(key=SECRET_KEY, value=secrets.token_hex(32)).on_conflict_do_nothing()
    )
    return bytes.fromhex(conn.execute(sa.select(META.c.value).where(META.c.key == SECRET_KEY)).scalar_one())


def make_token(secret: bytes, contact_id: int, channel: str, purpose: str = UNSUBSCRIBE) -> str:
    nonce = secrets.token_bytes(_NONCE_BYTES)
    sealed = AESGCM(_sealing_key(secret)).encrypt(nonce, f"{contact_id}.{channel}".encode(), _aad(purpose))
    return _b64(nonce + sealed)


def read_token(secret: bytes, token: str, purpose: str = UNSUBSCRIBE) -> tuple[int, str] | None:
    """(contact id, channel), or None for anything Declic did not issue for this purpose."""
    if "." in token:
        return _read_signed(secret, token) if purpose == UNSUBSCRIBE else None
    try:
        data = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        payload = AESGCM(_sealing_key(secret)).decrypt(data[:_NONCE_BYTES], data[_NONCE_BYTES:], _aad(purpose))
        contact, channel = payload.decode().split(".")
        return int(contact), channel
    except (ValueError, InvalidTag):
        return None


def _aad(purpose: str) -> bytes:
    """Sealed with its purpose: an unsubscribe token never confirms a subscription, nor the reverse."""
    return f"declic {purpose} link".encode()


def _sealing_key(secret: bytes) -> bytes:
    """A key of its own for sealing, derived from the link key."""
    return hmac.new(secret, b"declic unsubscribe link", hashlib.sha256).digest()


def _read_signed(secret: bytes, token: str) -> tuple[int, str] | None:
    """Links sent before tokens were sealed (0.1) carried the contact id in clear, signed: still honoured."""
    try:
        encoded, signature = token.split(".")
        payload = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
        contact, channel = payload.split(".")
        given = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
    except (ValueError, UnicodeDecodeError):
        return None
    expected = hmac.new(secret, payload.encode(), hashlib.sha256).digest()[:16]
    if not hmac.compare_digest(given, expected):
        return None
    return int(contact), channel


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")
