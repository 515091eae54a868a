"""Links that messages carry: one-click unsubscribe (RFC 8058), double opt-in confirmation, and
Declic's own open pixel and click redirects, as opaque, tamper-proof tokens.

A token is what the link stands for (a contact and channel; or a delivery, and for a click the
link's URL) sealed with AES-GCM under the deployment's link key: nobody can read a contact id
out of it (ids are sequential, and would tell how many customers a shop has and let anyone
guess a neighbour's link), and nobody can forge or alter one. Each purpose seals with its own
associated data, so a token of one kind never works as another.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy.engine import Connection

from ..store import META, sql

SECRET_KEY = "link_secret"
UNSUBSCRIBE = "unsubscribe"
CONFIRM = "confirm"
OPEN = "open"
CLICK = "click"
_NONCE_BYTES = 12


def link_secret(conn: Connection) -> bytes:
    """The deployment's link key, made once and kept in the database."""
    return made_link_secret(conn)[0]


def made_link_secret(conn: Connection) -> tuple[bytes, bool]:
    """The link key, and whether this transaction made it: then it is kept only if the transaction commits."""
    insert = sql.insert(conn.dialect.name, META).values(key=SECRET_KEY, value=secrets.token_hex(32))
    made = conn.execute(insert.on_conflict_do_nothing().returning(META.c.value)).scalar()
    if made is not None:
        return bytes.fromhex(made), True
    return bytes.fromhex(conn.execute(sa.select(META.c.value).where(META.c.key == SECRET_KEY)).scalar_one()), False


@dataclass(frozen=True)
class Linked:
    """What an unsubscribe or confirmation link names: a contact's channel, and the message it came in."""

    contact_id: int
    channel: str
    delivery: str | None = None  # the delivery's idempotency key, for the rule's unsubscribe count


def make_token(
    secret: bytes, contact_id: int, channel: str, purpose: str = UNSUBSCRIBE, delivery: str | None = None
) -> str:
    return _seal(secret, purpose, ".".join([str(contact_id), channel, *([delivery] if delivery else [])]).encode())


def read_token(secret: bytes, token: str, purpose: str = UNSUBSCRIBE) -> Linked | None:
    """What the link names, or None for anything Declic did not issue for this purpose."""
    if "." in token:
        return _read_signed(secret, token) if purpose == UNSUBSCRIBE else None
    payload = _unseal(secret, token, purpose)
    try:
        contact, channel, *delivery = payload.decode().split(".") if payload is not None else ("", "")
        return Linked(int(contact), channel, delivery[0] if len(delivery) == 1 else None)
    except ValueError:
        return None


@dataclass(frozen=True)
class Tracked:
    """What an open pixel or a click link stands for: which delivery, sent when, and the link followed."""

    contact_id: int
    delivery: str  # the delivery's idempotency key
    sent_at: datetime  # when the message was made, to the second: how soon a fetch came after it
    url: str = ""  # clicks: the URL the rendered message carried, the only place the redirect may go
    link: int = 0  # clicks: the link's place among the message's tracked links, from 1


def make_tracking_token(secret: bytes, purpose: str, tracked: Tracked) -> str:
    fields = (tracked.contact_id, tracked.delivery, int(tracked.sent_at.timestamp()), tracked.link, tracked.url)
    return _seal(secret, purpose, "\n".join(map(str, fields)).encode())


def read_tracking_token(secret: bytes, token: str, purpose: str) -> Tracked | None:
    """The delivery (and link) an OPEN or CLICK token names, or None for anything Declic did not issue as one."""
    payload = _unseal(secret, token, purpose)
    if payload is None:
        return None
    try:
        contact, delivery, sent_at, link, url = payload.decode().split("\n", 4)
        return Tracked(int(contact), delivery, datetime.fromtimestamp(int(sent_at), UTC), url, int(link))
    except (ValueError, OverflowError, OSError):
        return None


def _seal(secret: bytes, purpose: str, payload: bytes) -> str:
    nonce = secrets.token_bytes(_NONCE_BYTES)
    return _b64(nonce + _cipher(secret).encrypt(nonce, payload, _aad(purpose)))


def _unseal(secret: bytes, token: str, purpose: str) -> bytes | None:
    try:
        data = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        return _cipher(secret).decrypt(data[:_NONCE_BYTES], data[_NONCE_BYTES:], _aad(purpose))
    except (ValueError, InvalidTag):
        return None


@functools.lru_cache(maxsize=4)
def _cipher(secret: bytes) -> AESGCM:
    """One cipher per link key: a message with many links seals each with it."""
    return AESGCM(_sealing_key(secret))


def _aad(purpose: str) -> bytes:
    """Sealed with its purpose: an unsubscribe token never confirms a subscription, nor the reverse."""
    return f"declic {purpose} link".encode()


def _sealing_key(secret: bytes) -> bytes:
    """A key of its own for sealing, derived from the link key."""
    return hmac.new(secret, b"declic unsubscribe link", hashlib.sha256).digest()


def _read_signed(secret: bytes, token: str) -> Linked | None:
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
    return Linked(int(contact), channel)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")
