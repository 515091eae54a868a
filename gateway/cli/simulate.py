"""`declic simulate`: a timeline through the real router, scheduler and policies, under a fake clock.

Nothing is sent (sinks are replaced by recorders) and the deployment's database is not
touched (a throwaway SQLite file is used). The output is the decisions journal, one JSON
object per line, sorted by time.
"""

from __future__ import annotations

import difflib
import json
import tempfile
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pluggy
import sqlalchemy as sa
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy.engine import Connection

from ..config import Settings
from ..config.settings import CONFIRM_EVENT
from ..errors import DeclicError
from ..http.app import build_gateway
from ..http.running import RunningGateway
from ..kit.clock import FakeClock
from ..kit.events import CANONICAL_TYPES, ConsentState, ConsentStatement, ContactRef, Event, is_known_type
from ..kit.registry import Registry
from ..kit.sinks import DeliveryResult, Message, SendContext, Sink
from ..kit.sources import Deployment, RawCall, Source
from ..store import CONTACTS, DECISIONS, jobqueue
from ..store.inbox import NewCall, commit_calls

#: The timeline's events enter through this source name, which no config can use (names are [a-z0-9_-]).
TIMELINE_SOURCE = "~timeline"
DEFAULT_TAIL = timedelta(days=30)


class TimelineError(DeclicError):
    """The timeline file is not a list of events."""


class TimelineContact(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: str | None = None
    phone: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    locale: str | None = None
    timezone: str | None = None
    birthday: str | None = None
    external_ids: dict[str, str] = Field(default_factory=dict)
    attributes: dict[str, Any] = Field(default_factory=dict)
    #: A bare state ("granted") is the person's own statement at the item's time; a mapping
    #: (`{state, stated_at, action}`) can say otherwise: a stale snapshot, a late webhook.
    consent: dict[str, ConsentState | ConsentStatement] = Field(default_factory=dict)

    @field_validator("birthday", mode="before")
    @classmethod
    def _iso(cls, value: Any) -> Any:
        return value.isoformat() if hasattr(value, "isoformat") else value

    def ref(self, at: datetime) -> ContactRef:
        attributes = dict(self.attributes)
        if self.birthday:
            attributes["birthday"] = self.birthday
        fields = self.model_dump(exclude={"birthday", "attributes", "consent"})
        consent = {
            channel: ConsentStatement(state=given, stated_at=at, action=True) if isinstance(given, str) else given
            for channel, given in self.consent.items()
        }
        return ContactRef(**fields, attributes=attributes, consent=consent)


class TimelineItem(BaseModel):
    """`{at, type, contact, properties, correlation}`, or `{at, end: true}` to run the clock to `at`."""

    model_config = ConfigDict(extra="forbid")

    at: datetime
    type: str | None = None
    contact: TimelineContact = Field(default_factory=TimelineContact)
    properties: dict[str, Any] = Field(default_factory=dict)
    correlation: list[str] = Field(default_factory=list)
    end: bool = False

    @field_validator("correlation", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


def load_timeline(path: Path, timezone: str) -> list[TimelineItem]:
    """A YAML list, or JSON lines. Times without an offset are in the deployment's time zone."""
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".jsonl", ".ndjson") or text.lstrip().startswith("{"):
            raw = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            raw = yaml.safe_load(text) or []
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise TimelineError(f"{path}: not YAML or JSON lines: {exc}") from None
    if not isinstance(raw, list):
        raise TimelineError(f"{path}: expected a list of events")
    items = []
    for index, entry in enumerate(raw, 1):
        try:
            item = TimelineItem.model_validate(entry)
        except ValidationError as exc:
            problem = exc.errors()[0]
            where = ".".join(str(part) for part in problem["loc"])
            raise TimelineError(f"{path}: item {index}: {where}: {problem['msg']}") from None
        if item.type is None and not item.end:
            raise TimelineError(f"{path}: item {index}: needs `type` (an event) or `end: true`")
        if item.at.tzinfo is None:
            item.at = item.at.replace(tzinfo=ZoneInfo(timezone))
        items.append(item)
    return sorted(items, key=lambda item: item.at)


class TimelineSource(Source):
    """Reads back the timeline items the simulator stored; never served over HTTP."""

    name = "~timeline"

    def normalize(self, raw: RawCall) -> list[Event]:
        item = TimelineItem.model_validate_json(raw.body)
        assert item.type is not None
        return [
            Event(
                type=item.type,
                occurred_at=item.at,
                contact=item.contact.ref(item.at),
                properties=item.properties,
                correlation=item.correlation,
            )
        ]


class RecordingSink(Sink):
    """Stands in for a real sink: same channel and addresses, records instead of sending."""

    def __init__(self, real: Sink):
        super().__init__(real.key, real.config, real.deployment)
        self.real = real
        self.channel = real.channel  # type: ignore[misc]
        self.name = real.name  # type: ignore[misc]
        self.sent: list[tuple[Message, SendContext]] = []

    def address(self, contact: dict[str, Any]) -> str | None:
        return self.real.address(contact)

    async def send(self, message: Message, ctx: SendContext) -> DeliveryResult:
        self.sent.append((message, ctx))
        return DeliveryResult.sent(f"simulated-{len(self.sent)}")


Inject = Callable[[RunningGateway, TimelineItem, int], Awaitable[None]]


async def inject_directly(gateway: RunningGateway, item: TimelineItem, index: int) -> None:
    call = NewCall(TIMELINE_SOURCE, f"item-{index}", item.at, {}, item.model_dump_json().encode())
    await gateway.db.run(commit_calls, [call])


async def play(
    gateway: RunningGateway,
    clock: FakeClock,
    items: list[TimelineItem],
    inject: Inject = inject_directly,
    tail: timedelta = DEFAULT_TAIL,
) -> None:
    """Step the clock through every due job and every timeline item, in time order."""
    await gateway.db.run(jobqueue.add_tick, "reconcile", clock.now())
    for index, item in enumerate(items):
        await run_until(gateway, clock, item.at)
        if not item.end:
            await inject(gateway, item, index)
            await gateway.worker.drain()
    events = [item.at for item in items if not item.end]
    ends = [item.at for item in items if item.end]
    await run_until(gateway, clock, max(ends) if ends else (max(events) + tail if events else clock.now()))


async def run_until(gateway: RunningGateway, clock: FakeClock, moment: datetime) -> None:
    while True:
        due = await gateway.db.run(jobqueue.next_due)
        if due is None or due > moment:
            break
        clock.set(max(due, clock.now()))
        if await gateway.worker.drain() == 0 and await gateway.db.run(jobqueue.next_due) == due:
            break  # due but not claimable (held by a lease): nothing more to do at this moment
    clock.set(max(moment, clock.now()))


def decisions(conn: Connection) -> list[dict[str, Any]]:
    """The journal as `declic simulate` prints it; `contact` is the e-mail, else the phone, else the id."""
    rows = conn.execute(
        sa.select(DECISIONS, CONTACTS.c.email, CONTACTS.c.phone)
        .join(CONTACTS, CONTACTS.c.id == DECISIONS.c.contact_id)
        .order_by(DECISIONS.c.at, DECISIONS.c.id)
    )
    return [
        {
            "at": row.at.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "rule": row.rule,
            "step": row.step,
            "contact": row.email or row.phone or str(row.contact_id),
            "action": row.action,
            "via": row.via,
            "reason": row.reason,
        }
        for row in rows
    ]


Messages = dict[tuple[str, int, str], list[dict[str, Any]]]


async def simulate(
    settings: Settings, pm: pluggy.PluginManager, items: list[TimelineItem]
) -> tuple[list[dict[str, Any]], Messages]:
    """The decisions, and each rendered message by (rule, step, contact) as the decisions name them."""
    start = items[0].at if items else datetime.now(ZoneInfo(settings.timezone))
    clock = FakeClock(start)
    recorders: list[RecordingSink] = []

    def record(sink: Sink) -> Sink:
        recorders.append(RecordingSink(sink))
        return recorders[-1]

    with tempfile.TemporaryDirectory(prefix="declic-simulate-") as folder:
        gateway = build_gateway(
            settings,
            pm=pm,
            clock=clock,
            role="worker",
            rehearsal=True,
            database_url=f"sqlite:///{folder}/simulation.db",
            wrap_sink=record,
            extra_sources=timeline_source,
        )
        try:
            gateway.db.upgrade()
            await play(gateway, clock, items)
            return await gateway.db.run(decisions), _messages(recorders)
        finally:
            gateway.db.close()


def _messages(recorders: list[RecordingSink]) -> Messages:
    found: Messages = {}
    for sink in recorders:
        for message, ctx in sink.sent:
            contact = ctx.contact.get("email") or ctx.contact.get("phone") or str(ctx.contact.get("id"))
            shown = {"rule": ctx.rule, "step": ctx.step, "contact": contact, "action": "message", "via": sink.key}
            shown |= {"to": message.to}
            shown |= {"subject": message.subject, "text": message.text, "html": message.html}
            found.setdefault((ctx.rule, ctx.step, contact), []).append(shown)
    return found


def check_types(path: Path, items: list[TimelineItem], registry: Registry) -> None:
    """A misspelt event type would enrol nobody, silently: refuse the timeline instead."""
    extra = frozenset().union(*(cls.event_types for cls in registry.sources.values())) | {CONFIRM_EVENT}
    for item in items:
        if item.type is not None and not is_known_type(item.type, extra):
            close = difflib.get_close_matches(item.type, sorted(CANONICAL_TYPES | extra), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else " (see the event types in the README)"
            raise TimelineError(f"{path}: item at {item.at.isoformat()}: unknown event type {item.type!r}{hint}")


def timeline_source(deployment: Deployment) -> dict[str, Source]:
    return {TIMELINE_SOURCE: TimelineSource(TIMELINE_SOURCE, None, deployment)}
