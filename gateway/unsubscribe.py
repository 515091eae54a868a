"""One-click unsubscribe (RFC 8058): signed links in marketing e-mail, and the /u/{token} endpoint.

The POST a mail client sends is stored in the inbox like any webhook (200 only after the
commit) and becomes an `email.unsubscribed` event: consent is withdrawn in the ledger and
journeys with `exit_on: [email.unsubscribed]` end, all through the same path as a provider's.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import secrets
from typing import TYPE_CHECKING

import sqlalchemy as sa
from aiohttp import web
from sqlalchemy.engine import Connection

from .errors import StorageUnavailable
from .events import ContactRef, Event
from .ingest import GATEWAY_KEY, RETRY_AFTER_SECONDS, NewCall
from .sources import RawCall, Source
from .store import META, sql

if TYPE_CHECKING:
    from .app import Gateway

SOURCE = "~unsubscribe"  # not a valid config name, so no deployment source can take it
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


class UnsubscribeSource(Source):
    """Reads back the unsubscribe requests the endpoint stored."""

    name = SOURCE

    def normalize(self, raw: RawCall) -> list[Event]:
        contact_id, channel = raw.body.decode().split(".")
        return [
            Event(
                type=f"{channel}.unsubscribed",
                occurred_at=raw.received_at,
                contact=ContactRef(external_ids={"declic": contact_id}, consent={channel: "withdrawn"}),
                properties={"via": "one-click unsubscribe link", "user_agent": raw.header("User-Agent")},
            )
        ]


PAGE = """<!doctype html><html lang="en"><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>Unsubscribe</title><body style="font-family:sans-serif;max-width:32em;margin:4em auto">
{body}</body></html>"""


async def handle(request: web.Request) -> web.Response:
    """GET shows a button (link scanners must not unsubscribe anyone); POST unsubscribes, no questions asked."""
    gateway: Gateway = request.app[GATEWAY_KEY]
    secret = await gateway.db.run(link_secret)
    found = read_token(secret, request.match_info["token"])
    if found is None:
        return _page(404, "<p>This unsubscribe link is not valid.</p>")
    contact_id, channel = found
    if request.method != "POST":
        return _page(
            200,
            f'<form method="post"><p>Stop receiving {html.escape(channel)} from us?</p>'
            '<button name="List-Unsubscribe" value="One-Click">Unsubscribe</button></form>',
        )
    await request.read()
    now = gateway.clock.now()  # each request counts: a contact may subscribe again and leave again
    call = NewCall(
        SOURCE,
        f"{contact_id}.{channel}.{now.timestamp()}",
        now,
        {"User-Agent": request.headers.get("User-Agent", "")},
        f"{contact_id}.{channel}".encode(),
    )
    try:
        await gateway.committer.submit(call)
    except StorageUnavailable:
        return _page(503, "<p>Please try again in a moment.</p>", {"Retry-After": RETRY_AFTER_SECONDS})
    return _page(200, "<p>You are unsubscribed. You will not receive these messages any more.</p>")


def _page(status: int, body: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=PAGE.format(body=body), content_type="text/html", headers=headers)
