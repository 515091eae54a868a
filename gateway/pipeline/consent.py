"""Consent decided by the latest statement: which statement is in force on a channel, and why.

Webhooks arrive late, twice and out of order, and many of them merely repeat a state they
copied from somewhere (the customer inside an order). So a statement changes a contact's
consent only when it was stated after the one in force; a snapshot that gives no time of its
own never overrides anything; a tie goes to the withdrawal. In doubt, a withdrawal stands: only
a grant lifts it, a time ahead of the statement's arrival counts as its arrival, and a
withdrawal that gave no time stands against anything stated before it reached Declic. Every
statement is ruled on, and the ledger keeps the ruling, applied or not.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, overload

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
    #: When the statement reached Declic: what an undated entry in force keeps, to be weighed against.
    received: datetime | None = None

    @property
    def entry(self) -> dict[str, Any]:
        """The contact's consent entry for the channel once this statement is in force."""
        when = self.statement.stated_at
        entry = {
            "state": self.becomes or self.statement.state,
            "source": self.source,
            "at": when.isoformat() if when else None,
            "action": self.statement.action,
        }
        if when is None and self.received is not None:
            entry["received"] = utc(self.received).isoformat()
        return entry


def dated(statement: ConsentStatement, event: Event | None, arrived: datetime) -> ConsentStatement:
    """The statement with the time it was made: an action the source did not date is dated by its event.

    Nothing is stated after it arrived: a time ahead of `arrived` (a source whose clock runs fast, a
    mistake) would outrank every statement made meanwhile, an unsubscribe included, so the arrival is taken
    instead, and the time the source gave is kept in the evidence."""
    action = statement.action or (event is not None and event.type in CONSENT_ACTION_TYPES)
    stated_at = utc(statement.stated_at or (event.occurred_at if action and event is not None else None))
    evidence = statement.evidence
    arrived = utc(arrived)
    if stated_at is not None and stated_at > arrived:
        evidence = {**evidence, "stated_at_given": stated_at.isoformat()}
        stated_at = arrived
    return statement.model_copy(update={"action": action, "stated_at": stated_at, "evidence": evidence})


def rule_on(
    current: dict[str, Any] | None,
    channel: str,
    statement: ConsentStatement,
    source: str,
    received: datetime | None = None,
) -> Ruling:
    """Rule on a dated statement against the channel's entry in force (None: nothing known yet); `received`
    is when the statement reached Declic."""

    def ruling(applied: bool, reason: str) -> Ruling:
        return Ruling(channel, statement, source, applied, reason, received=received)

    if current is None:
        return ruling(True, "first statement on this channel")
    when = utc(statement.stated_at)
    in_force = utc(datetime.fromisoformat(current["at"])) if current.get("at") else None
    same = statement.state == current.get("state")
    withdrawn = current.get("state") == "withdrawn"
    if when is None:
        return ruling(False, "repeats the state in force" if same else "no stated time: a snapshot never overrides")
    if in_force is None and withdrawn and current.get("received") and statement.state != "withdrawn":
        # The withdrawal gave no time: it was made before it reached Declic, maybe after this statement.
        known = utc(datetime.fromisoformat(current["received"]))
        if when <= known:
            return ruling(
                False,
                f"the withdrawal in force gave no time and reached Declic at {known:%Y-%m-%d %H:%M:%S} UTC, "
                "after this statement was made",
            )
    if in_force is None or when > in_force:
        if withdrawn and statement.state not in ("granted", "withdrawn"):
            return ruling(False, f"a withdrawal is lifted only by a grant, not by {statement.state!r}")
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


@overload
def utc(moment: datetime) -> datetime: ...
@overload
def utc(moment: None) -> None: ...
@overload
def utc(moment: datetime | None) -> datetime | None: ...
def utc(moment: datetime | None) -> datetime | None:
    """The moment in UTC, so that statements from sources in any zone compare (no zone: already UTC)."""
    if moment is None:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
