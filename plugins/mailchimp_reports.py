"""Mailchimp campaign opens, clicks and bounces, polled from the Marketing API's email-activity reports.

Mailchimp calls no webhook when a campaign is opened or clicked, so Declic asks. Every
`interval` it takes the configured campaigns (or lists those sent within `sent_within`), then
reads `GET /3.0/reports/{campaign_id}/email-activity?since=CURSOR` page by page. Each
activity (one open, click or bounce by one recipient) becomes its own inbox call keyed by
campaign, recipient, action, timestamp and URL. The next cursor is the latest activity seen
less `overlap`, for activity Mailchimp reports late: windows overlap, and the keys make
what was stored before a duplicate.

With `sent_to: true` it also reads, once per campaign sent since the source started, who the
campaign was sent to (`GET /3.0/reports/{campaign_id}/sent-to`): each recipient becomes an
`email.sent` event keyed like the campaign's opens and clicks, so that a rule can follow up
those who did not open (`when: email.sent`, `exit_on: [email.opened, email.clicked]`). The
cursor then also lists the campaigns whose recipients are settled (read, or sent too long ago).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import aiohttp
import structlog
from pydantic import Field, SecretStr, field_validator, model_validator

from declic_gateway import (
    ContactRef,
    Deployment,
    Duration,
    Event,
    Fetched,
    MalformedPayload,
    PluginConfig,
    PollingSource,
    RawCall,
    RetryLater,
    Source,
    api_client,
    hookimpl,
    retry_after,
)

log = structlog.get_logger("declic.mailchimp_reports")

#: Mailchimp activity `action` -> canonical event type.
ACTIONS = {"open": "email.opened", "click": "email.clicked", "bounce": "email.bounced"}
#: What activity_events turns a recipient of `sent-to` into.
SENT = {"sent": "email.sent"}
#: The data center a key ends with (`-us6`): it becomes a host name, so nothing else gets through.
_DATA_CENTER = re.compile(r"[a-z]{2,8}[0-9]{1,4}")
#: What a campaign id may be: it goes into a URL path.
CampaignId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
ACTIVITY_FIELDS = "emails.campaign_id,emails.list_id,emails.email_id,emails.email_address,emails.activity,total_items"
SENT_TO_FIELDS = "sent_to.email_id,sent_to.email_address,sent_to.status,sent_to.list_id,total_items"
TIMEOUT = 60.0  # seconds: a page of 1,000 recipients with their activity is large
#: The wait when Mailchimp names none. The core's backoff does not grow for polls (a deferred poll
#: spends no attempt), so without this a failing poll would ask again every few seconds.
RETRY_FLOOR = timedelta(minutes=1)


class MailchimpReportsConfig(PluginConfig):
    api_key: SecretStr = Field(
        description="Mailchimp Marketing API key (Profile > Extras > API keys). It ends in -<dc>, e.g. -us6, "
        "which names the API host https://<dc>.api.mailchimp.com."
    )
    campaigns: list[CampaignId] = Field(
        default_factory=list,
        description="Ids of the campaigns to poll; empty or omitted: every campaign sent within `sent_within`.",
    )
    sent_within: Duration = Field(
        timedelta(days=30), description="With no `campaigns`: poll the campaigns sent this recently."
    )
    interval: Duration = Field(timedelta(minutes=15), description="How often to poll (at least 1m).")
    overlap: Duration = Field(
        timedelta(hours=1),
        description="Each poll reads from this long before the latest activity already seen (never from earlier "
        "than the poll before it), for activity Mailchimp reports late; what was stored before is skipped.",
    )
    backfill: Duration = Field(
        timedelta(hours=1),
        description="How far back the very first poll reads. Kept short so that old opens and clicks do not "
        "start journeys the day the source is added.",
    )
    filter_bots: bool = Field(
        False,
        description="Ask Mailchimp to leave out bot and Apple Mail Privacy Protection activity (`filter_bots=true`).",
    )
    sent_to: bool = Field(
        False,
        description="Also read who each campaign sent from now on was sent to (one request per 1,000 recipients, "
        "once per campaign): each recipient becomes an `email.sent` event, for rules that follow up those who "
        "did not open.",
    )
    page_size: int = Field(1000, ge=1, le=1000, description="Records per request (Mailchimp's `count`, at most 1000).")
    api_base: str | None = Field(
        None,
        description="API origin; by default https://<dc>.api.mailchimp.com from the key's suffix "
        "(another only for tests).",
    )

    @field_validator("interval")
    @classmethod
    def _not_too_often(cls, value: timedelta) -> timedelta:
        if value < timedelta(minutes=1):
            raise ValueError("poll at most once a minute: Mailchimp's reports are not real time")
        return value

    @model_validator(mode="after")
    def _origin(self) -> MailchimpReportsConfig:
        if self.api_base is None:
            self.api_base = f"https://{data_center(self.api_key.get_secret_value())}.api.mailchimp.com"
        elif not re.match(r"^https?://[^/]+", self.api_base):
            raise ValueError(f"api_base: not an http(s) URL: {self.api_base!r}")
        self.api_base = self.api_base.rstrip("/")
        return self


def data_center(api_key: str) -> str:
    _, _, dc = api_key.rpartition("-")
    if not _DATA_CENTER.fullmatch(dc):
        raise ValueError("api_key: a Mailchimp key ends in -<data center>, e.g. -us6 (or set api_base)")
    return dc


class MailchimpReports(PollingSource):
    name = "mailchimp_reports"
    Config = MailchimpReportsConfig

    def __init__(self, key: str, config: MailchimpReportsConfig, deployment: Deployment):
        super().__init__(key, config, deployment)
        self.interval = config.interval
        # Requests go one at a time: Mailchimp allows 10 connections per account, shared with other tools.
        headers = {"Accept": "application/json", "Authorization": basic_auth(config.api_key)}
        self._client = api_client(config.api_base, TIMEOUT, headers)

    async def close(self) -> None:
        await self._client.close()

    async def poll(self, cursor: str | None, now: datetime) -> Fetched:
        """The cursor is where the next poll reads from: the latest activity seen, less `overlap`."""
        read_from, settled = parse_cursor(cursor)
        since = read_from or now - self.config.backfill
        items: dict[str, tuple[datetime, bytes]] = {}
        campaigns = list(dict.fromkeys(self.config.campaigns or await self._recent_campaigns(now)))
        for campaign_id in campaigns:
            if self.config.sent_to and campaign_id not in settled:
                recipients = await self._recipients(campaign_id, since)
                if recipients is not None:
                    items.update(recipients)
                    settled.add(campaign_id)
            for member in await self._activity(campaign_id, since):
                items.update(member_items(campaign_id, member, since))
        latest = max([when for when, _ in items.values()], default=since)
        # Never back: a later poll must not read what the backfill left out, nor skip ahead of our clock.
        following = format_time(max(since, min(latest, now) - self.config.overlap))
        ordered = sorted(items.items(), key=lambda kv: (kv[1][0], kv[0]))  # oldest first: an open before its click
        if self.config.sent_to:  # only campaigns still polled are remembered: the list does not grow for ever
            following = json.dumps({"since": following, "settled": sorted(settled & set(campaigns))})
        return Fetched([(key, body) for key, (_, body) in ordered], cursor=following)

    async def _recipients(self, campaign_id: str, since: datetime) -> dict[str, tuple[datetime, bytes]] | None:
        """Who the campaign was sent to, once it is sent; None while it is not. A campaign sent before the
        window gives nobody: following up an old campaign the day the source is added would surprise."""
        campaign = await self._get(f"/3.0/campaigns/{campaign_id}", {"fields": "id,status,send_time"})
        send_time = parse_time(campaign.get("send_time")) if campaign else None
        if campaign is None or campaign.get("status") != "sent" or send_time is None:
            return None if campaign is not None else {}
        if send_time < since:
            return {}
        params = {"fields": SENT_TO_FIELDS}
        recipients = await self._pages(f"/3.0/reports/{campaign_id}/sent-to", params, "sent_to", missing_ok=True)
        return sent_items(campaign_id, send_time, recipients or [])

    async def _recent_campaigns(self, now: datetime) -> list[str]:
        params = {
            "status": "sent",
            "since_send_time": format_time(now - self.config.sent_within),
            "fields": "campaigns.id,total_items",
            "sort_field": "send_time",
            "sort_dir": "DESC",
        }
        pages = await self._pages("/3.0/campaigns", params, "campaigns")
        return [c["id"] for c in pages or () if isinstance(c.get("id"), str) and c["id"]]

    async def _activity(self, campaign_id: str, since: datetime) -> list[dict[str, Any]]:
        params = {"since": format_time(since), "fields": ACTIVITY_FIELDS}
        if self.config.filter_bots:
            params["filter_bots"] = "true"
        members = await self._pages(f"/3.0/reports/{campaign_id}/email-activity", params, "emails", missing_ok=True)
        if members is None:
            log.warning("campaign not found, skipped", source=self.key, campaign_id=campaign_id)
            return []
        return members

    async def _pages(
        self, path: str, params: dict[str, str], key: str, missing_ok: bool = False
    ) -> list[dict[str, Any]] | None:
        """Every record of a collection, `count` at a time, until `total_items` or an empty page."""
        found: list[dict[str, Any]] = []
        offset = 0
        while True:
            page = await self._get(path, {**params, "count": str(self.config.page_size), "offset": str(offset)})
            if page is None:
                if missing_ok:
                    return None
                raise RetryLater(f"Mailchimp answered 404 for {path}", RETRY_FLOOR.total_seconds())
            records, total = page.get(key), page.get("total_items")
            if not isinstance(records, list) or not isinstance(total, int):
                reason = f"Mailchimp's answer for {path} has no `{key}` list or no `total_items`"
                raise RetryLater(reason, RETRY_FLOOR.total_seconds())
            found += [r for r in records if isinstance(r, dict)]
            offset += len(records)
            if not records or offset >= total:
                return found

    async def _get(self, path: str, params: dict[str, str]) -> dict[str, Any] | None:
        """The JSON object Mailchimp answers; None for a 404; RetryLater for anything else."""
        try:
            async with self._client.request("GET", self.config.api_base + path, params=params) as reply:
                status, body, wait = reply.status, await reply.read(), reply.headers.get("Retry-After")
        except (aiohttp.ClientError, TimeoutError) as exc:
            reason = f"Mailchimp API unreachable ({path}): {type(exc).__name__}: {exc}"
            raise RetryLater(reason, RETRY_FLOOR.total_seconds()) from None
        if status == 200:
            data = _json(body)
            if not isinstance(data, dict):
                reason = f"Mailchimp answered 200 for {path} with a body that is not a JSON object"
                raise RetryLater(reason, RETRY_FLOOR.total_seconds())
            return data
        if status == 404:
            return None
        raise self._failure(path, status, body, retry_after(wait, self.deployment.clock.now()))

    def _failure(self, path: str, status: int, body: bytes, after: float | None) -> RetryLater:
        said = f"Mailchimp answered {status} {problem(body)} ({path})"
        if status in (401, 403):
            # The poll never dies: it asks again each interval, loudly, until the key is fixed.
            log.error("Mailchimp refused the API key: check api_key", source=self.key, status=status)
            return RetryLater(f"{said}: check api_key", after or self.interval.total_seconds())
        # 429 (10 connections per account), 5xx, and the 4xx that only a fix cures: none stops the polls.
        return RetryLater(said, after or RETRY_FLOOR.total_seconds())

    def normalize(self, raw: RawCall) -> list[Event]:
        item = _json(raw.body)
        if not isinstance(item, dict):
            raise MalformedPayload("not a JSON object: Declic stores each activity as one")
        try:
            return activity_events(item)
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedPayload(f"{type(exc).__name__}: {exc}") from None


def sent_items(
    campaign_id: str, send_time: datetime, recipients: list[dict[str, Any]]
) -> dict[str, tuple[datetime, bytes]]:
    """One stored item per recipient the campaign reached (`status: sent`; bounces come as activity)."""
    items = {}
    for recipient in recipients:
        email = recipient.get("email_address")
        if not isinstance(email, str) or not email or recipient.get("status") != "sent":
            continue
        email_id = recipient.get("email_id")
        if not isinstance(email_id, str) or not email_id:
            email_id = hashlib.md5(email.lower().encode()).hexdigest()
        key = f"{campaign_id}:{email_id}:sent"
        body = {
            "id": key,
            "campaign_id": campaign_id,
            "list_id": recipient.get("list_id"),
            "email_id": email_id,
            "email_address": email,
            "sent": {"status": "sent", "timestamp": format_time(send_time)},
        }
        items[key] = (send_time, json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    return items


def member_items(campaign_id: str, member: dict[str, Any], since: datetime) -> dict[str, tuple[datetime, bytes]]:
    """One stored item per activity of a recipient, keyed by its id; unreadable or older activity is left out."""
    email = member.get("email_address")
    activity = member.get("activity")
    if not isinstance(email, str) or not email or not isinstance(activity, list):
        return {}
    email_id = member.get("email_id")
    if not isinstance(email_id, str) or not email_id:
        email_id = hashlib.md5(email.lower().encode()).hexdigest()  # Mailchimp's own definition of email_id
    items = {}
    for action in activity:
        when = parse_time(action.get("timestamp")) if isinstance(action, dict) else None
        if when is None or when < since or not isinstance(action.get("action"), str) or action["action"] not in ACTIONS:
            continue
        key = activity_id(campaign_id, email_id, action["action"], when, action.get("url"))
        body = {
            "id": key,
            "campaign_id": campaign_id,
            "list_id": member.get("list_id"),
            "email_id": email_id,
            "email_address": email,
            "activity": action,
        }
        items[key] = (when, json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    return items


def activity_id(campaign_id: str, email_id: str, action: str, when: datetime, url: Any) -> str:
    """Stable across polls: Mailchimp has no id for an activity, so its content is its identity."""
    key = f"{campaign_id}:{email_id}:{action}:{format_time(when)}"
    return f"{key}:{url}" if action == "click" and isinstance(url, str) else key


def activity_events(item: dict[str, Any]) -> list[Event]:
    activity = item["sent"] if "sent" in item else item["activity"]
    if "sent" in item:
        activity = {**activity, "action": "sent"}
    kind = {**ACTIONS, **SENT}.get(activity["action"])
    if kind is None:
        return []  # an action this version does not know: kept, nothing to route
    key, email, campaign_id = item["id"], item["email_address"], item["campaign_id"]
    if not all(isinstance(v, str) and v for v in (key, email, campaign_id)):
        raise ValueError("id, email_address and campaign_id must be non-empty strings")
    when = parse_time(activity.get("timestamp"))
    if when is None:
        raise ValueError(f"unreadable activity timestamp {activity.get('timestamp')!r}")
    properties: dict[str, Any] = {"campaign_id": campaign_id, "list_id": _text(item.get("list_id"))}
    if kind == "email.clicked":
        properties["url"] = _text(activity.get("url"))
    if kind == "email.bounced":
        properties["bounce"] = _text(activity.get("type"))  # hard marks the address bouncing
    elif kind != "email.sent":
        properties["ip"] = _text(activity.get("ip"))
    return [
        Event(
            type=kind,
            occurred_at=when,
            contact=ContactRef(email=email),
            properties=properties,
            # One journey per recipient and campaign: a click then ends what an open started.
            correlation=[
                f"mailchimp-campaign:{campaign_id}:{item.get('email_id') or email}",
                f"mailchimp-activity:{key}",
            ],
            dedupe_key=key,
        )
    ]


def parse_time(value: Any) -> datetime | None:
    """An ISO 8601 time as Mailchimp writes it (`2015-09-15T19:15:47+00:00`); no zone means UTC."""
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value.strip())
        return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    except (ValueError, OverflowError):
        return None


def parse_cursor(cursor: str | None) -> tuple[datetime | None, set[str]]:
    """(where to read from, campaigns whose recipients are settled): a time, or JSON with `sent_to` on."""
    data = _json(cursor.encode()) if cursor and cursor.startswith("{") else None
    settled = data.get("settled") if isinstance(data, dict) else None
    when = parse_time(data.get("since") if isinstance(data, dict) else cursor)
    if cursor is not None and when is None:
        log.warning("unreadable cursor, polling as for the first time", cursor=cursor)
    return when, {c for c in settled if isinstance(c, str)} if isinstance(settled, list) else set()


def format_time(when: datetime) -> str:
    return when.astimezone(UTC).replace(microsecond=0).isoformat()


def basic_auth(api_key: SecretStr) -> str:
    """Mailchimp takes any user name with the key as password."""
    return "Basic " + base64.b64encode(f"declic:{api_key.get_secret_value()}".encode()).decode()


def problem(body: bytes) -> str:
    """`title: detail` of Mailchimp's problem JSON (RFC 7807), else the start of the body."""
    data = _json(body)
    if isinstance(data, dict) and (data.get("title") or data.get("detail")):
        text = f"{data.get('title') or ''}: {data.get('detail') or ''}"
    else:
        text = body[:200].decode("utf-8", "replace")
    return " ".join(text.split())[:300]


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


@hookimpl
def register_sources(register: Callable[[type[Source]], None]) -> None:
    register(MailchimpReports)
