"""The links in Declic's own messages that state consent: one-click unsubscribe (RFC 8058,
`/u/{token}`) and double opt-in confirmation (`/c/{token}`).

A GET shows a button (link scanners follow links and must change nothing); the POST is stored
in the inbox like any webhook (200 only after the commit) and becomes an event whose consent
statement carries the request's IP and user agent as evidence: the ledger, `exit_on` and the
rules see it through the same path as a provider's. Their sources are internal: they read
back what these endpoints stored and are never served under /hooks. A link of a contact since
erased stores nothing: unsubscribing says it is done, confirming that the link is gone.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass

import structlog
from aiohttp import web

from ..errors import MalformedPayload, StorageUnavailable
from ..kit.events import ConsentState, ConsentStatement, ContactRef, Event
from ..kit.sources import RawCall, Source
from ..pipeline import contacts
from ..pipeline.consent import CONFIRM_SOURCE
from ..send import links
from ..store.inbox import NewCall
from .running import GATEWAY_KEY, RETRY_AFTER_SECONDS, RunningGateway

log = structlog.get_logger("declic.consent")


@dataclass(frozen=True)
class LinkAction:
    """What following one kind of link states, and what the person is told."""

    source: str  # not a valid config name, so no deployment source can take it
    purpose: str  # the token's purpose: a token of one kind never works for the other
    state: ConsentState
    event: str  # event type, with {channel}
    via: str
    question: str  # with {channel}
    button: str
    done: str
    logged: str  # the log line once stored
    gone: tuple[int, str]  # the answer for a contact since erased: nothing is stored, nobody brought back


UNSUBSCRIBED = "You are unsubscribed. You will not receive these messages any more."
UNSUBSCRIBE = LinkAction(
    "~unsubscribe",
    links.UNSUBSCRIBE,
    "withdrawn",
    "{channel}.unsubscribed",
    "unsubscribe link",
    "Stop receiving {channel} from us?",
    '<button name="List-Unsubscribe" value="One-Click">Unsubscribe</button>',
    UNSUBSCRIBED,
    "unsubscribed",
    (200, UNSUBSCRIBED),  # true: nothing of them is kept to write to
)
CONFIRM = LinkAction(
    CONFIRM_SOURCE,
    links.CONFIRM,
    "granted",
    "{channel}.subscribed",
    "double opt-in link",
    "Confirm that you want to receive {channel} from us?",
    '<button name="confirm" value="yes">Confirm</button>',
    "Thank you: your subscription is confirmed.",
    "subscription confirmed",
    (410, "This link is no longer valid."),  # an erasure is final: there is nobody left to confirm
)


class LinkSource(Source):
    """Reads back the requests a consent link's endpoint stored."""

    action: LinkAction = UNSUBSCRIBE

    def normalize(self, raw: RawCall) -> list[Event]:
        if raw.body.startswith(b"{"):
            request = json.loads(raw.body)
            contact_id, channel = str(request.pop("contact")), str(request.pop("channel"))
            delivery = request.pop("delivery", None)
        else:  # stored by 0.1, before requests kept their evidence
            contact_id, channel = raw.body.decode().split(".")
            request, delivery = {"user_agent": raw.header("User-Agent")}, None
        if not contact_id.isdigit():
            raise MalformedPayload(f"not a contact id: {contact_id!r}")
        statement = ConsentStatement(
            state=self.action.state,
            stated_at=raw.received_at,
            action=True,
            evidence={"via": self.action.via, **request},
        )
        return [
            Event(
                type=self.action.event.format(channel=channel),
                occurred_at=raw.received_at,
                contact=ContactRef(external_ids={"declic": contact_id}, consent={channel: statement}),
                properties={
                    "via": self.action.via,
                    "user_agent": request.get("user_agent"),
                    **({"delivery": str(delivery)} if delivery else {}),
                },
            )
        ]


class UnsubscribeSource(LinkSource):
    name = UNSUBSCRIBE.source
    action = UNSUBSCRIBE


class ConfirmSource(LinkSource):
    name = CONFIRM.source
    action = CONFIRM


SOURCES: tuple[type[LinkSource], ...] = (UnsubscribeSource, ConfirmSource)


PAGE = """<!doctype html><html lang="en"><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>{title}</title><body style="font-family:sans-serif;max-width:32em;margin:4em auto">
{body}</body></html>"""


async def handle_unsubscribe(request: web.Request) -> web.Response:
    return await _handle(request, UNSUBSCRIBE)


async def handle_confirm(request: web.Request) -> web.Response:
    return await _handle(request, CONFIRM)


async def _handle(request: web.Request, action: LinkAction) -> web.Response:
    """GET shows a button; POST states the consent, no questions asked (RFC 8058's one click)."""
    gateway: RunningGateway = request.app[GATEWAY_KEY]
    try:
        secret = await gateway.link_secret()
    except StorageUnavailable:
        return _unavailable()
    found = links.read_token(secret, request.match_info["token"], action.purpose)
    if found is None:
        return _page(404, "<p>This link is not valid.</p>")
    contact_id, channel = found.contact_id, found.channel
    try:
        named = await gateway.db.run(contacts.still_named, contact_id)
    except StorageUnavailable:
        return _unavailable()
    if not named:  # erased: the stored call would fail (no such contact) and keep the request's evidence
        log.info("consent link of an erased contact: nothing stored", link=action.via, contact_id=contact_id)
        return _page(action.gone[0], f"<p>{html.escape(action.gone[1])}</p>")
    if request.method != "POST":
        question = html.escape(action.question.format(channel=channel))
        return _page(200, f'<form method="post"><p>{question}</p>{action.button}</form>')
    now = gateway.clock.now()  # each request counts: a contact may subscribe again and leave again
    evidence = {
        "contact": contact_id,
        "channel": channel,
        "delivery": found.delivery,  # the message the link came in: the rule's unsubscribe count
        "ip": request.remote,
        "forwarded_for": request.headers.get("X-Forwarded-For"),
        "user_agent": request.headers.get("User-Agent"),
    }
    body = json.dumps({k: v for k, v in evidence.items() if v is not None}).encode()
    call = NewCall(action.source, f"{contact_id}.{channel}.{now.timestamp()}", now, {}, body)
    try:
        await gateway.committer.submit(call)
    except StorageUnavailable:
        return _unavailable()
    # Who, by contact id only: the address is personal data, the id finds it for whoever may see it.
    log.info(action.logged, contact_id=contact_id, channel=channel, delivery=found.delivery)
    return _page(200, f"<p>{html.escape(action.done)}</p>")


ROUTES = (("/u/{token}", handle_unsubscribe), ("/c/{token}", handle_confirm))


def _unavailable() -> web.Response:
    return _page(503, "<p>Please try again in a moment.</p>", {"Retry-After": RETRY_AFTER_SECONDS})


def _page(status: int, body: str, headers: dict[str, str] | None = None) -> web.Response:
    page = PAGE.format(title="Your subscription", body=body)
    return web.Response(status=status, text=page, content_type="text/html", headers=headers)
