"""`declic backtest`: the calls a deployment stored over a period, replayed through a new config's rules.

It replays the inbox (the calls as they arrived, byte for byte), not the events table: normalising
them again under the new config lets a changed source mapping count too, and the calls carry what
the events table does not keep (the contact's fields and consent statements, an unsubscribe's
evidence). The machinery is `declic simulate`'s: the real worker under a fake clock that jumps to
each call's arrival and to each due step, on a throwaway SQLite database, with sinks that record
instead of sending. The live database is only read, in one read-only snapshot.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import pluggy
import sqlalchemy as sa

from ..config import Settings
from ..http import consent_links, tracking
from ..http.app import build_gateway
from ..http.running import RunningGateway
from ..insight.tally import RuleTally, reason_kind, tally
from ..kit.clock import FakeClock
from ..pipeline import backdate, triggers
from ..pipeline.router import Router
from ..store import INBOX, jobqueue
from ..store.inbox import NewCall, commit_calls
from ..store.readonly import snapshot
from .simulate import RecordingSink, run_until


@dataclass
class Report:
    start: datetime
    end: datetime
    contacts: int = 0
    calls: int = 0
    #: Calls the new config could not normalise (a source it no longer has...), by reason.
    unprocessed: dict[str, int] = field(default_factory=dict)
    recorded: int = 0
    rules: list[RuleTally] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "from": _iso(self.start),
            "to": _iso(self.end),
            "contacts": self.contacts,
            "calls": self.calls,
            "unprocessed": self.unprocessed,
            "recorded_messages": self.recorded,
            "rules": [rule.as_dict() for rule in self.rules],
        }


async def backtest(
    settings: Settings, pm: pluggy.PluginManager, live_url: str, start: datetime, end: datetime
) -> Report:
    report = Report(start, end)
    clock = FakeClock(start)
    with tempfile.TemporaryDirectory(prefix="declic-backtest-") as folder:
        gateway = build_gateway(
            settings,
            pm=pm,
            clock=clock,
            role="worker",
            rehearsal=True,
            database_url=f"sqlite:///{folder}/backtest.db",
            wrap_sink=RecordingSink,
        )
        try:
            gateway.db.upgrade()
            with snapshot(live_url) as live:
                report.contacts = gateway.db.transaction(_copy_state, live, settings, start)
                gateway.db.transaction(_arm_triggers, gateway.router, start)
                report.calls = await _replay(gateway, clock, live, start, end)
            # `--to` is excluded: a step due then belongs to the next period, and counts as waiting.
            await run_until(gateway, clock, end - timedelta(microseconds=1))
            report.rules = await gateway.db.run(tally, [rule.name for rule in settings.rules], start, end)
            report.unprocessed = await gateway.db.run(_unprocessed)
            report.recorded = sum(len(sink.sent) for sink in gateway.sinks.values() if isinstance(sink, RecordingSink))
        finally:
            gateway.db.close()
    return report


def _copy_state(scratch: sa.Connection, live: sa.Connection, settings: Settings, start: datetime) -> int:
    if settings.policies.pressure is not None:
        backdate.copy_recent_sends(live, scratch, start, settings.policies.pressure.per)
    return backdate.copy_contacts(live, scratch, start)


def _arm_triggers(conn: sa.Connection, router: Router, start: datetime) -> None:
    """Date and inactivity triggers from the copied contacts and history, as a live start-up would arm
    them; an inactivity firing due before the period moves to its first repeat in it, if any."""
    router.reconcile(conn, start)
    for rule in router.rules.values():
        if rule.spec.inactive_for is not None:
            triggers.skip_inactivity_before(conn, rule.spec, start)


async def _replay(
    gateway: RunningGateway, clock: FakeClock, live: sa.Connection, start: datetime, end: datetime
) -> int:
    """Each call at the moment it arrived, after every step that was due before it."""
    await gateway.db.run(jobqueue.add_tick, "reconcile", clock.now())
    replayed = 0
    for call in backdate.calls_between(live, start, end):
        await run_until(gateway, clock, call.received_at)
        if call.source in NAMING_CONTACTS:
            call = await _renamed(gateway, live, call)
        await gateway.db.run(commit_calls, [call])
        await gateway.worker.drain()
        replayed += 1
    return replayed


#: Declic's own endpoints (consent links, open and click tracking) store the contact's id in the call.
NAMING_CONTACTS = frozenset(cls.name for cls in (*consent_links.SOURCES, *tracking.SOURCES))


async def _renamed(gateway: RunningGateway, live: sa.Connection, call: NewCall) -> NewCall:
    """The call naming the replay's contact: one created during the period may have another id there."""
    try:
        body = json.loads(call.body)
        live_id = int(body["contact"])
    except (ValueError, TypeError, KeyError):
        return call  # an older format, or not a contact's: replayed as it is
    found = await gateway.db.run(backdate.holder, backdate.identities_of(live, live_id))
    if found is None or found == live_id:
        return call
    body["contact"] = type(body["contact"])(found)
    return replace(call, body=json.dumps(body).encode())


def _unprocessed(conn: sa.Connection) -> dict[str, int]:
    rows = conn.execute(sa.select(INBOX.c.error).where(INBOX.c.status != "processed"))
    found: dict[str, int] = {}
    for (error,) in rows:
        kind = reason_kind(error or "not processed")
        found[kind] = found.get(kind, 0) + 1
    return found


def render(report: Report) -> str:
    """The report as text, one block per rule."""
    lines = [
        f"backtest from {_when(report.start)} to {_when(report.end)} UTC",
        f"replayed {report.calls} call{'s' * (report.calls != 1)} against {report.contacts} "
        f"contact{'s' * (report.contacts != 1)} as of {_when(report.start)} UTC; nothing was sent",
    ]
    for reason, n in report.unprocessed.items():
        lines.append(f"not processed: {n} ({reason})")
    for rule in report.rules:
        lines += ["", rule.rule, *_rule_lines(rule)]
    return "\n".join(lines)


def _rule_lines(rule: RuleTally) -> list[str]:
    sent = ", ".join(f"step {step}: {n}" for step, n in sorted(rule.sent.items())) or "0"
    lines = [f"  entered      {rule.entered}", f"  sent         {sent}"]
    if rule.held_out:
        lines.append("  held out     " + ", ".join(f"step {s}: {n}" for s, n in sorted(rule.held_out.items())))
    for title, counts in (
        ("not entered", rule.not_entered),
        ("suppressed", rule.suppressed),
        ("deferred", rule.deferred),
        ("failed", rule.failed),
    ):
        if counts:
            lines.append(f"  {title:<12} {sum(counts.values())}")
            lines += [f"{'':15}{n}  {reason}" for reason, n in counts.most_common()]  # under the total
    ends = [f"exited {rule.exited}"] * bool(rule.exited) + [f"goals {rule.goals}"] * bool(rule.goals)
    if rule.waiting:
        ends.append(f"still waiting at the end {rule.waiting}")
    if ends:
        lines.append("  " + ", ".join(ends))
    return lines


def _when(moment: datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M}"


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
