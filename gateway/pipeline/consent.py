"""Consent decided by the latest statement: which statement is in force on a channel, and why.

Webhooks arrive late, twice and out of order, and many of them merely repeat a state they
copied from somewhere (the customer inside an order). So a statement changes a contact's
consent only when it was stated after the one in force; a snapshot that gives no time of its
own never overrides anything; a tie goes to the withdrawal. Every statement is ruled on, and
the ledger keeps the ruling, applied or not.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from ..kit.events import CONSENT_ACTION_TYPES, ConsentStatement, Event

#: The internal source of double opt-in confirmations (the /c/{token} endpoint's).
CONFIRM_SOURCE = "~confirm"
#: How the ledger says a grant put `pending` in force (it stores the state stated, `granted`).
PENDING_REASON = "pending until the double opt-in link is followed"


@dataclass(frozen=True)
class Ruling:
    """What became of one statement: whether it is now in force on its channel, and why."""

    channel: str
    statement: ConsentStatement
    source: str
    applied: bool
    reason: str
    #: The state it puts in force, when not the one stated: a grant awaiting double opt-in is `pending`.
    becomes: str | None = None

    @property
    def entry(self) -> dict[str, Any]:
        """The contact's consent entry for the channel once this statement is in force."""
        when = self.statement.stated_at
        return {
            "state": self.becomes or self.statement.state,
            "source": self.source,
            "at": when.isoformat() if when else None,
            "action": self.statement.action,
        }


def dated(statement: ConsentStatement, event: Event | None) -> ConsentStatement:
    """The statement with the time it was made: an action the source did not date is dated by its event."""
    action = statement.action or (event is not None and event.type in CONSENT_ACTION_TYPES)
    stated_at = statement.stated_at or (event.occurred_at if action and event is not None else None)
    return statement.model_copy(update={"action": action, "stated_at": utc(stated_at)})


def rule_on(current: dict[str, Any] | None, channel: str, statement: ConsentStatement, source: str) -> Ruling:
    """Rule on a dated statement against the channel's entry in force (None: nothing known yet)."""

    def ruling(applied: bool, reason: str) -> Ruling:
        return Ruling(channel, statement, source, applied, reason)

    if current is None:
        return ruling(True, "first statement on this channel")
    when = utc(statement.stated_at)
    in_force = utc(datetime.fromisoformat(current["at"])) if current.get("at") else None
    same = statement.state == current.get("state")
    if when is None:
        return ruling(False, "repeats the state in force" if same else "no stated time: a snapshot never overrides")
    if in_force is None or when > in_force:
        return ruling(True, "restates the state in force" if same else "newer than the statement in force")
    if when == in_force and not same:
        if statement.state == "withdrawn":
            return ruling(True, "stated at the same time as the statement in force: a withdrawal wins a tie")
        return ruling(False, "stated at the same time as the statement in force, which it does not outrank")
    return ruling(
        False,
        f"not newer than the statement in force ({current.get('state')}, stated {in_force:%Y-%m-%d %H:%M:%S} UTC)",
    )


def awaiting_confirmation(ruling: Ruling, double_opt_in: frozenset[str]) -> Ruling:
    """Under double opt-in, a grant puts `pending` in force until the person follows the confirmation link."""
    statement = ruling.statement
    if not ruling.applied or statement.state != "granted" or ruling.channel not in double_opt_in:
        return ruling
    if ruling.source == CONFIRM_SOURCE:  # the confirmation link itself (an internal source: nobody forges it)
        return ruling
    reason = f"{ruling.reason}; {PENDING_REASON}"
    return replace(ruling, becomes="pending", reason=reason)


def utc(moment: datetime | None) -> datetime | None:
    """The moment in UTC, so that statements from sources in any zone compare (no zone: already UTC)."""
    if moment is None:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
