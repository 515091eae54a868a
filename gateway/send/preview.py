"""A step's message as the worker would send it now, for `declic preview` and `declic send-test`.

The message comes from the worker's own path (StepRunner.compose, then Draft.render), so a preview is
what a customer gets, not a second rendering that could drift. Nothing is sent and nothing recorded:
the caller runs this in a transaction it rolls back. Links in the message (unsubscribe, open pixel,
clicks) have their real form, but are signed with a key made for this preview alone: the deployment
refuses them, so a colleague who clicks one neither unsubscribes the contact nor counts in the KPIs.
"""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..errors import DeclicError
from ..kit.sinks import Message, SendContext, Sink
from ..pipeline import contacts, triggers
from ..pipeline.router import CompiledRule
from ..store import ENROLMENTS, EVENTS
from .delivery import StepRunner, idempotency_key
from .variants import template_for, variant_for

#: The header that marks a test send, and the subject (or, without one, text) prefix a person sees.
TEST_HEADER = "X-Declic-Test"
TEST_PREFIX = "[TEST] "


class PreviewError(DeclicError):
    """What to preview cannot be found or built: no such step, no event to render with, no variants."""


@dataclass(frozen=True)
class Rendering:
    """One step's message for one contact, and whether the worker would send it now."""

    rule: CompiledRule
    index: int
    sink: Sink
    message: Message
    context: SendContext
    #: Why the worker would not send it to this contact now (no consent, a false step condition...); None if it would.
    held_back: str | None


def preview_runner(runner: StepRunner, sinks: dict[str, Sink]) -> StepRunner:
    """The deployment's step runner with these sinks and a link key of its own (see the module docstring)."""
    return dataclasses.replace(runner, sinks=sinks, _secret=secrets.token_bytes(32))


def step_template(rule: CompiledRule, index: int, variant: str | None, contact_id: int) -> str:
    """The template step `index` renders: `variant`'s when given (refusing a name the step does not
    have), else the one the worker would give this contact."""
    send = rule.spec.steps[index].send
    if variant is not None and not send.variants:
        raise PreviewError(f"rule {rule.name} step {index + 1} has no variants")
    if variant is None and send.variants:
        drawn = variant_for(rule.spec, index, contact_id)
        variant = drawn.name if drawn else None
    try:
        return template_for(rule.spec, index, variant)
    except ValueError as exc:
        raise PreviewError(f"rule {rule.name} step {index + 1}: {exc}") from None


def render(
    conn: Connection,
    runner: StepRunner,
    rule: CompiledRule,
    index: int,
    contact_id: int,
    now: datetime,
    variant: str | None = None,
    test: bool = False,
) -> Rendering:
    """Step `index` of `rule` rendered for the contact, with the event the step would be rendered with.

    Writes (a stand-in trigger event, the link key): run it in a transaction that is rolled back.
    `test` makes a fresh message key, so a test never shares a Message-ID or a provider's metadata with
    the real send. Raises PreviewError, and TemplateProblem when the template fails.
    """
    if not 0 <= index < len(rule.spec.steps):
        raise PreviewError(f"rule {rule.name} has {len(rule.spec.steps)} step(s), not a step {index + 1}")
    template = step_template(rule, index, variant, contact_id)
    event_id, occurrence = _event_for(conn, runner, rule, contact_id, now)
    if test:
        occurrence = f"test:{secrets.token_hex(8)}"
    key = idempotency_key(rule.name, contact_id, occurrence, index)
    draft, context = runner.compose(conn, rule, index, contact_id, event_id, key, now, template)
    sink = runner.sinks[rule.spec.steps[index].send.vias[0]]
    contact = context["contact"]
    held_back = runner.suppression(rule, index, sink, contact, context)
    message = draft.render()  # in the transaction: the contact's view reads from it
    send_context = SendContext(rule.name, index + 1, rule.spec.kind, dict(contact), context["event"])
    return Rendering(rule, index, sink, message, send_context, held_back)


def as_test(rendering: Rendering, to: str) -> Message:
    """The message addressed to a test recipient and marked as a test, in the subject (or text) and a header."""
    message = rendering.message
    headers = {**message.headers, TEST_HEADER: "1"}
    if message.subject is not None:
        return dataclasses.replace(message, to=to, subject=TEST_PREFIX + message.subject, headers=headers)
    return dataclasses.replace(message, to=to, text=TEST_PREFIX + message.text, headers=headers)


def _event_for(
    conn: Connection, runner: StepRunner, rule: CompiledRule, contact_id: int, now: datetime
) -> tuple[str, str]:
    """(event id, occurrence) the step renders with: the contact's latest journey in the rule, else their
    latest event of the rule's trigger type, else (date and inactivity rules) the event the trigger would make."""
    journey = conn.execute(
        sa.select(ENROLMENTS.c.event_id, ENROLMENTS.c.occurrence)
        .where(ENROLMENTS.c.rule == rule.name, ENROLMENTS.c.contact_id == contact_id)
        .order_by(ENROLMENTS.c.created_at.desc(), ENROLMENTS.c.id.desc())
        .limit(1)
    ).first()
    if journey is not None:
        return journey.event_id, journey.occurrence
    spec = rule.spec
    if spec.when is not None or spec.score_reaches is not None:
        query = sa.select(EVENTS.c.id, EVENTS.c.correlation).where(EVENTS.c.contact_id == contact_id)
        if spec.when is not None:
            query = query.where(EVENTS.c.type == spec.when)
        latest = conn.execute(query.order_by(EVENTS.c.occurred_at.desc()).limit(1)).first()
        if latest is None:
            raise PreviewError(
                f"contact #{contact_id} has no {spec.when or 'event'} event and no journey in {rule.name}: "
                "preview with --event FILE"
            )
        return latest.id, f"event:{latest.id}"
    return _trigger_event(conn, runner, rule, contact_id, now)


def _trigger_event(
    conn: Connection, runner: StepRunner, rule: CompiledRule, contact_id: int, now: datetime
) -> tuple[str, str]:
    """The event the contact's date or inactivity trigger would make, from the triggers' own occurrence logic."""
    contact = contacts.load(conn, contact_id)
    spec = rule.spec
    if spec.on_date:
        found = triggers.next_occurrence(conn, spec, contact, runner.timezone, now)
        if found is None:
            raise PreviewError(f"contact #{contact_id} has no {spec.on_date} to come: preview with --event FILE")
        occurrence, due = found.key, found.fire_at
    else:
        activity = [row for row in triggers.last_activity(conn, spec.of) if row[0] == contact_id]
        occurrence, due = f"inactive-since:{activity[0][1] if activity else 'never'}", now
    event = runner.router.synthetic_event(conn, rule, contact, occurrence, due, 0)
    return event.id, occurrence
