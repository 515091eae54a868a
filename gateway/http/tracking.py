"""Declic's own open pixel (`/t/o/{token}`) and click redirect (`/t/c/{token}`).

Each fetch is stored in the inbox like a webhook, with what shows who made it (method, address,
user agent, how long after sending), and becomes an `email.opened` or `email.clicked` event on
its delivery through the same path as a provider's feedback. Its source is internal: it reads
back what these endpoints stored and is never served under /hooks.

The person comes first: the pixel is served and the click redirected even when the fetch cannot
be stored (storage down), since a broken image or link would not bring the event back; the pixel
is served even before the link key could be read (a click cannot be: its URL is sealed). A click
goes only to the URL sealed in its token, the one the rendered message carried: nothing in the
request can choose where it goes (no open redirect). An unknown or forged token gets a 404. A fetch
naming a contact since erased (an old message opened) is served or redirected, and stores nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from datetime import datetime, timedelta
from typing import Any, ClassVar, Literal

import structlog
from aiohttp import web

from ..config import TrackingSpec
from ..errors import MalformedPayload, StorageUnavailable
from ..kit.events import ContactRef, Event
from ..kit.machines import machine_reasons
from ..kit.sources import RawCall, Source
from ..pipeline import contacts
from ..pipeline.feedback import CLICK_SOURCE, OPEN_SOURCE, fetch_key
from ..send import links
from ..send.tracking import PIXEL_GIF, followed
from ..store.inbox import NewCall
from .running import GATEWAY_KEY, RETRY_AFTER_SECONDS, RunningGateway

log = structlog.get_logger("declic.tracking")
#: Nothing in between may keep a copy: each fetch is someone opening or clicking now.
NO_STORE = {"Cache-Control": "no-store, no-cache, must-revalidate, private", "Pragma": "no-cache"}


class TrackingSource(Source):
    """Reads back the fetches the tracking endpoints stored, and tells people's from machines'."""

    kind: ClassVar[Literal["open", "click"]] = "open"
    event_type = "email.opened"

    def normalize(self, raw: RawCall) -> list[Event]:
        try:
            fetch = json.loads(raw.body)
            contact_id, delivery = int(fetch["contact"]), str(fetch["delivery"])
            sent_at = datetime.fromisoformat(fetch["sent_at"])
        except (ValueError, KeyError, TypeError) as exc:
            raise MalformedPayload(f"not a stored fetch: {type(exc).__name__}: {exc}") from None
        window = self.config.scanner_window if isinstance(self.config, TrackingSpec) else timedelta(seconds=10)
        reasons = machine_reasons(
            self.kind,
            method=str(fetch.get("method") or "GET"),
            user_agent=fetch.get("user_agent"),
            ip=fetch.get("forwarded_for") or fetch.get("ip"),
            after=raw.received_at - sent_at,
            scanner_window=window,
        )
        properties: dict[str, Any] = {
            "delivery": delivery,
            "via": "declic",
            "machine": bool(reasons),
            "machine_reasons": reasons,
            "method": fetch.get("method"),
            "ip": fetch.get("ip"),
            "user_agent": fetch.get("user_agent"),
            "seconds_after_send": round((raw.received_at - sent_at).total_seconds(), 3),
        }
        once = f"{delivery}:{self.kind}"
        if self.kind == "click":
            properties.update(url=fetch.get("url"), link=fetch.get("link"))
            once += f":{fetch.get('link')}"
        return [
            Event(
                type=self.event_type,
                occurred_at=raw.received_at,
                contact=ContactRef(external_ids={"declic": str(contact_id)}),
                properties=properties,
                correlation=[f"delivery:{delivery}"],
                # A person's first open (first click on each link) counts once; so does a machine's.
                dedupe_key=f"{once}:{'machine' if reasons else 'person'}",
            )
        ]


class OpenSource(TrackingSource):
    name = OPEN_SOURCE


class ClickSource(TrackingSource):
    name = CLICK_SOURCE
    kind = "click"
    event_type = "email.clicked"


SOURCES: tuple[type[TrackingSource], ...] = (OpenSource, ClickSource)


async def handle_open(request: web.Request) -> web.Response:
    try:
        tracked = await _tracked(request, links.OPEN)
    except StorageUnavailable:  # the link key cannot be read: the open is lost, the image served all the same
        return _pixel()
    if isinstance(tracked, web.Response):
        return tracked
    await _store(request, OPEN_SOURCE, tracked)
    return _pixel()


async def handle_click(request: web.Request) -> web.Response:
    try:
        tracked = await _tracked(request, links.CLICK)
    except StorageUnavailable:  # the link key cannot be read, so there is nowhere to send the person
        retry = {"Retry-After": RETRY_AFTER_SECONDS}
        return web.Response(status=503, text="Please try again in a moment.", headers=retry)
    if isinstance(tracked, web.Response):
        return tracked
    await _store(request, CLICK_SOURCE, tracked)
    return web.Response(status=302, headers={"Location": tracked.url, "Referrer-Policy": "no-referrer", **NO_STORE})


def _pixel() -> web.Response:
    return web.Response(body=PIXEL_GIF, content_type="image/gif", headers=NO_STORE)


ROUTES = (("/t/o/{token}", handle_open), ("/t/c/{token}", handle_click))


async def _tracked(request: web.Request, purpose: str) -> links.Tracked | web.Response:
    """The token's content, or the 404 for an unknown or forged one; StorageUnavailable when the link key
    cannot be read yet."""
    gateway: RunningGateway = request.app[GATEWAY_KEY]
    secret = await gateway.link_secret()
    tracked = links.read_tracking_token(secret, request.match_info["token"], purpose)
    if tracked is not None and purpose == links.CLICK:
        # Links sealed before sealing cleaned them may hold a newline: followed as a browser would.
        url = followed(tracked.url)
        tracked = dataclasses.replace(tracked, url=url) if url else None
    if tracked is None:
        return web.Response(status=404, text="This link is not valid.", headers=NO_STORE)
    return tracked


async def _store(request: web.Request, source: str, tracked: links.Tracked) -> None:
    """Keep the fetch durably; if it cannot be kept, say so in the log and let the person through."""
    gateway: RunningGateway = request.app[GATEWAY_KEY]
    try:
        # Urgent, as the commit: the person waits for the image or the redirect.
        if await gateway.db.run(contacts.still_named, tracked.contact_id, urgent=True):
            await gateway.committer.submit(_call(request, source, tracked, gateway.clock.now()))
        else:  # erased: the stored fetch would fail (no such contact) and keep the address and user agent
            log.debug("open or click of an erased contact: nothing stored", source=source)
    except StorageUnavailable as exc:
        log.error("open or click not stored", source=source, error=str(exc))


def _call(request: web.Request, source: str, tracked: links.Tracked, now: datetime) -> NewCall:
    fetch = {
        "contact": tracked.contact_id,
        "delivery": tracked.delivery,
        "sent_at": tracked.sent_at.isoformat(),
        "link": tracked.link or None,
        "url": tracked.url or None,
        "method": request.method,
        "ip": request.remote,
        "forwarded_for": _client(request.headers.get("X-Forwarded-For")),
        "user_agent": request.headers.get("User-Agent"),
    }
    body = json.dumps({k: v for k, v in fetch.items() if v is not None}, sort_keys=True).encode()
    # The same request twice at the same instant is one fetch (a retry); any other fetch is its own call.
    key = fetch_key(tracked.contact_id, hashlib.sha256(body + now.isoformat().encode()).hexdigest())
    return NewCall(source, key, now, {}, body)


def _client(forwarded_for: str | None) -> str | None:
    """The first address of X-Forwarded-For: the client as the proxies in front of Declic saw it."""
    first = (forwarded_for or "").split(",")[0].strip()
    return first[:64] or None
