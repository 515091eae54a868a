"""One-click unsubscribe (RFC 8058): the /u/{token} endpoint behind the links in marketing e-mail.

The POST a mail client sends is stored in the inbox like any webhook (200 only after the
commit) and becomes an `email.unsubscribed` event: consent is withdrawn in the ledger, with
the request's IP and user agent as evidence, and journeys with `exit_on: [email.unsubscribed]`
end, all through the same path as a provider's. Its source is internal: it reads back what
this endpoint stored and is never served under /hooks.
"""

from __future__ import annotations

import html
import json

from aiohttp import web

from ..errors import MalformedPayload, StorageUnavailable
from ..kit.events import ConsentStatement, ContactRef, Event
from ..kit.sources import RawCall, Source
from ..send.links import link_secret, read_token
from ..store.inbox import NewCall
from .running import GATEWAY_KEY, RETRY_AFTER_SECONDS, RunningGateway

SOURCE = "~unsubscribe"  # not a valid config name, so no deployment source can take it


class UnsubscribeSource(Source):
    """Reads back the unsubscribe requests the endpoint stored."""

    name = SOURCE

    def normalize(self, raw: RawCall) -> list[Event]:
        if raw.body.startswith(b"{"):
            request = json.loads(raw.body)
            contact_id, channel = str(request.pop("contact")), str(request.pop("channel"))
        else:  # stored by 0.1, before requests kept their evidence
            contact_id, channel = raw.body.decode().split(".")
            request = {"user_agent": raw.header("User-Agent")}
        if not contact_id.isdigit():
            raise MalformedPayload(f"not a contact id: {contact_id!r}")
        statement = ConsentStatement(
            state="withdrawn", stated_at=raw.received_at, action=True, evidence={"via": "unsubscribe link", **request}
        )
        return [
            Event(
                type=f"{channel}.unsubscribed",
                occurred_at=raw.received_at,
                contact=ContactRef(external_ids={"declic": contact_id}, consent={channel: statement}),
                properties={"via": "one-click unsubscribe link", "user_agent": request.get("user_agent")},
            )
        ]


PAGE = """<!doctype html><html lang="en"><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>Unsubscribe</title><body style="font-family:sans-serif;max-width:32em;margin:4em auto">
{body}</body></html>"""


async def handle(request: web.Request) -> web.Response:
    """GET shows a button (link scanners must not unsubscribe anyone); POST unsubscribes, no questions asked."""
    gateway: RunningGateway = request.app[GATEWAY_KEY]
    try:
        secret = await gateway.db.run(link_secret)
    except StorageUnavailable:
        return _unavailable()
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
    now = gateway.clock.now()  # each request counts: a contact may subscribe again and leave again
    evidence = {
        "contact": contact_id,
        "channel": channel,
        "ip": request.remote,
        "forwarded_for": request.headers.get("X-Forwarded-For"),
        "user_agent": request.headers.get("User-Agent"),
    }
    body = json.dumps({k: v for k, v in evidence.items() if v is not None}).encode()
    call = NewCall(SOURCE, f"{contact_id}.{channel}.{now.timestamp()}", now, {}, body)
    try:
        await gateway.committer.submit(call)
    except StorageUnavailable:
        return _unavailable()
    return _page(200, "<p>You are unsubscribed. You will not receive these messages any more.</p>")


def _unavailable() -> web.Response:
    return _page(503, "<p>Please try again in a moment.</p>", {"Retry-After": RETRY_AFTER_SECONDS})


def _page(status: int, body: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=PAGE.format(body=body), content_type="text/html", headers=headers)
