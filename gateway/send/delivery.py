"""One journey step at send time: re-check, apply guard rails, render, call the sink, record the outcome."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

import jinja2
import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection

from ..config import PoliciesSpec, WorkerSpec
from ..config.settings import CONFIRM_RULE
from ..errors import TemplateProblem
from ..insight import journal, rendered
from ..kit.addresses import internal_address
from ..kit.context import Known
from ..kit.locales import contact_locale, locale_chain, translated
from ..kit.sinks import DeliveryResult, Message, Outcome, SendContext, Sink
from ..kit.templating import RenderLimits, evaluate, render_message
from ..pipeline import contacts, moments
from ..pipeline.eventlog import event_of, load_event
from ..pipeline.history import record_problems
from ..pipeline.router import CompiledRule, Router, warn_once
from ..pipeline.triggers import zone_of
from ..store import CONTACTS, DELIVERIES, ENROLMENTS, EVENTS, appends, jobqueue, sql
from ..store.jobqueue import ClaimedJob
from ..store.tables import INTERNAL_KIND
from . import links
from .policies import Deferral, pressure_until, quiet_until
from .tracking import Tracking, track_html
from .variants import template_for, variant_for

if TYPE_CHECKING:
    from ..kit.clock import Clock

log = structlog.get_logger("declic.delivery")
D = DELIVERIES.c
E = ENROLMENTS.c
#: Outcomes after which a step is over, whatever channel gave them and whatever happens to its job afterwards.
OVER = ("sent", "suppressed", "held_out")
#: Outcomes that spend one channel of a step for good: the next of `via: [sms, email]` is tried, if any.
SPENT = ("address_invalid", "opted_out")

#: deliveries.provider_id's length: a longer id (the ids of every browser a push went to, joined) is cut to fit.
PROVIDER_ID_LENGTH: int = DELIVERIES.c.provider_id.type.length  # type: ignore[attr-defined]

#: Threads that render messages: a slow template holds one of them, never the database thread or the event
#: loop. A few, not one per step: the GIL runs one at a time anyway, and a slow render must not stop the rest.
RENDER_THREADS = 4


@functools.cache
def _renderers() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(RENDER_THREADS, thread_name_prefix="declic-render")


@dataclass(frozen=True)
class Draft:
    """A message before rendering: prepared in a transaction, rendered outside it by call_sink."""

    env: jinja2.Environment
    template: str
    variables: dict[str, Any]
    limits: RenderLimits
    to: str
    idempotency_key: str
    headers: dict[str, str]
    tracking: Tracking | None = None

    def render(self) -> Message:
        """Blocking and CPU-bound within `limits`; raises TemplateProblem."""
        parts = render_message(self.env, self.template, self.variables, self.limits)
        html = parts.get("html")
        if html and self.tracking is not None:
            html = track_html(html, self.tracking)
        return Message(
            to=self.to,
            text=parts["txt"],
            subject=parts.get("subject"),
            html=html,
            idempotency_key=self.idempotency_key,
            headers=self.headers,
        )


@dataclass(frozen=True)
class Send:
    """Everything decided before the sink is called, computed in one transaction."""

    job: ClaimedJob
    rule: CompiledRule
    enrolment_id: int
    contact_id: int
    sink: Sink
    draft: Draft
    context: SendContext
    #: A message about the contact to someone else (`to:`): not the contact's, not in its KPIs or pressure.
    internal: bool = False
    #: The A/B variant the step sends (its `send.variants`), None without variants.
    variant: str | None = None
    #: When it was decided (time.monotonic()): one that waited long for its sink is checked again.
    decided: float = field(default_factory=time.monotonic, compare=False)


@dataclass(frozen=True)
class Step:
    """The step as prepare() sees it: its job, rule, enrolment, contact and sink."""

    job: ClaimedJob
    rule: CompiledRule
    enrolment_id: int
    contact_id: int
    key: str
    sink: Sink
    internal: bool = False
    variant: str | None = None


@dataclass
class StepRunner:
    router: Router
    sinks: dict[str, Sink]
    env: jinja2.Environment
    policies: PoliciesSpec
    worker_spec: WorkerSpec
    clock: Clock
    worker_id: str
    timezone: str = "UTC"
    public_url: str | None = None
    keep_rendered: bool = True
    locale: str = "en"
    _secret: bytes | None = None
    _made: tuple[object, bytes] | None = None  # a link key made by a transaction not known to be committed

    def prepare(self, conn: Connection, job: ClaimedJob) -> Send | None:
        """Decide what to send, or close (or defer) the job here when nothing should be sent now."""
        now = self.clock.now()
        ahead: _Ahead | None = conn.info.get(_AHEAD)
        # The enrolment, its event and its contact in one read (or one for the batch): one per e-mail.
        enrolment = ahead.enrolments.pop(job.id, None) if ahead else None
        if enrolment is None:
            enrolment = conn.execute(_step(conn.dialect.name), {"enrolment_id": job.enrolment_id}).one()
        rule = self.router.rules.get(enrolment.rule)
        if enrolment.status != "active" or rule is None or job.step >= len(rule.spec.steps):
            why = "rule no longer in the config" if rule is None else f"journey {enrolment.status}"
            if enrolment.status == "active":  # no step left to run: ended, or it would stay active forever
                ended = ("exited", "rule removed") if rule is None else ("completed", None)
                why = why if rule is None else "the rule has fewer steps now"
                conn.execute(_END, {"enrolment_id": enrolment.id, "status": ended[0], "by": ended[1], "now": now})
            jobqueue.finish(conn, job, self.worker_id, now, "cancelled", why)
            return None
        spec = rule.spec.steps[job.step]
        key = idempotency_key(enrolment.rule, enrolment.contact_id, enrolment.occurrence, job.step)
        channels = channel_keys(key, spec.send.vias)
        statuses = _statuses(conn, [k for _, k in channels], ahead)
        left = [(via, k) for i, (via, k) in enumerate(channels) if not _spent(statuses.get(k), i == len(channels) - 1)]
        first = left[0] if left else channels[0]
        variant = self._variant(conn, rule, job.step, enrolment.contact_id) if spec.send.variants else None
        step = Step(
            job,
            rule,
            enrolment.id,
            enrolment.contact_id,
            first[1],
            self.sinks[first[0]],
            internal=spec.send.to is not None,
            variant=variant,
        )
        if not left or any(statuses.get(k) in OVER for _, k in channels):
            self._advance(conn, step, now)  # the outcome was recorded, the job was not
            return None
        read = _read_with(enrolment)
        if self._capped(rule) and not step.internal and conn.dialect.name == "postgresql":
            # Serialise one contact's capped sends across workers, so two cannot both take the last slot;
            # the contact is read again once it is locked.
            conn.execute(sa.select(CONTACTS.c.id).where(CONTACTS.c.id == enrolment.contact_id).with_for_update())
            read = _Read(read.event, None)
        context = self._context(conn, rule, job.step, enrolment.contact_id, enrolment.event_id, now, variant, read)
        contact = context["contact"]
        reason = self._too_late(rule, job, contact, context)
        if reason is None:
            holds = self._condition(rule, job.step, context)
            record_problems(conn, contact, rule.name, now, step=job.step + 1)
            if isinstance(holds, str):
                self._fail(conn, step, holds, now)
                return None
            reason = None if holds else "step condition is false"
        if reason:
            self._suppress(conn, step, reason, now)
            return None
        if step.internal:
            return self._internal(conn, step, enrolment.id, context, now)
        chosen, why = self._channel(conn, step, left, contact, now)
        if chosen is None:
            self._suppress(conn, step, why, now)
            return None
        step = chosen
        deferral = self._deferral(conn, rule, step.sink, contact, now)
        if deferral is not None:
            self._defer(conn, step, deferral, now)
            return None
        if enrolment.held_out:  # after the checks: held out is "would have been sent now"
            self._hold_out(conn, step, now)
            return None
        if self._capped(rule):
            self._record(conn, step, "sending", None, now, sent_at=now)  # holds its slot under the cap
        draft = self._draft(conn, rule, job.step, step.sink, step.key, context, now, variant=variant)
        send_context = SendContext(rule.name, job.step + 1, rule.spec.kind, dict(contact), context["event"])
        return Send(job, rule, enrolment.id, step.contact_id, step.sink, draft, send_context, variant=variant)

    @contextlib.contextmanager
    def reading_ahead(self, conn: Connection, jobs: list[ClaimedJob]) -> Iterator[None]:
        """For steps prepared together in one transaction: their enrolments (with event and contact) and their
        delivery rows are read in one statement each, where each step read both (docs/performance.md). Each
        step's rows are its own: preparing one step writes only its enrolment and its deliveries, so what was
        read ahead for the others stays current. A batch with one enrolment twice reads step by step, as alone."""
        enrolment_ids = [job.enrolment_id for job in jobs]
        if len(jobs) < 2 or len(set(enrolment_ids)) < len(jobs):
            yield
            return
        rows = {row.id: row for row in conn.execute(_steps(conn.dialect.name), {"ids": enrolment_ids})}
        enrolments, keys = {}, []
        for job in jobs:
            row = rows.get(job.enrolment_id)
            rule = self.router.rules.get(row.rule) if row is not None else None
            if row is None or rule is None or job.step >= len(rule.spec.steps):
                continue  # prepare() closes it, reading it again
            enrolments[job.id] = row
            key = idempotency_key(row.rule, row.contact_id, row.occurrence, job.step)
            keys += [k for _, k in channel_keys(key, rule.spec.steps[job.step].send.vias)]
        found = _read_statuses(conn, keys) if keys else {}
        conn.info[_AHEAD] = _Ahead(enrolments, {key: found.get(key) for key in keys})
        try:
            yield
        finally:
            conn.info.pop(_AHEAD, None)

    def still_holds(self, conn: Connection, send: Send) -> bool:
        """Whether a decision that waited for its sink (call_sink) still holds: the journey active and, for the
        contact's own message, the channel usable (consent, address) and out of quiet hours, read again in one
        statement. When it does not, the step goes back to be prepared at once, without spending an attempt, and
        prepare() decides afresh: suppressed and journalled, another channel of `via:`, deferred, or nothing (the
        journey ended). The slot it held under the pressure cap is given back: it would count against itself."""
        now = self.clock.now()
        row = conn.execute(_step(conn.dialect.name), {"enrolment_id": send.enrolment_id}).one()
        why = self._changed(send, row, now)
        if why is None:
            return True
        self.take_back(conn, send, now, f"checked again before its send: {why}")
        return False

    def take_back(self, conn: Connection, send: Send, until: datetime, why: str) -> None:
        """A prepared step not sent after all goes back to the queue until `until`, its attempt not spent, to be
        prepared again then; a capped step gives back the slot it held under the pressure cap (it would count
        against itself)."""
        if self._capped(send.rule) and not send.internal:
            conn.execute(_UNHOLD, {"key": send.draft.idempotency_key})
        jobqueue.defer(conn, send.job, self.worker_id, until, self.clock.now(), why)
        number = send.job.step + 1
        log.info("step taken back before its send", rule=send.rule.name, step=number, sink=send.sink.key, reason=why)

    def _changed(self, send: Send, row: Any, now: datetime) -> str | None:
        """What no longer holds of the decision to make `send`, from its enrolment's row as `_step` reads it."""
        if row.status != "active":
            return f"journey {row.status}"
        fields = _read_with(row).contact
        if send.internal or fields is None:
            return None
        contact = contacts.links_of(fields, fields)
        why = self._unusable(send.rule, send.sink, contact)
        if why is None and send.rule.spec.kind == "marketing":
            quiet = quiet_until(self.policies, send.sink.channel, zone_of(contact, self.timezone), now)
            why = quiet.reason if quiet else None
        return why

    def _variant(self, conn: Connection, rule: CompiledRule, index: int, contact_id: int) -> str | None:
        """The contact's variant of this step: the one it was sent before, else its draw."""
        kept = conn.execute(_KEPT_VARIANT, {"contact_id": contact_id, "rule": rule.name, "step": index + 1}).scalar()
        found = variant_for(rule.spec, index, contact_id, kept)
        return found.name if found else None

    def compose(
        self,
        conn: Connection,
        rule: CompiledRule,
        index: int,
        contact_id: int,
        event_id: str,
        key: str,
        now: datetime,
        template: str | None = None,
    ) -> tuple[Draft, dict[str, Any]]:
        """The message step `index` of `rule` sends the contact now on its first channel, and the context it
        is rendered with: what `declic preview` and `declic send-test` show and send, built by the same two
        methods the worker's prepare() uses. `template` overrides the step's (a variant's); nothing is
        written but the link key, on first use."""
        context = self._context(conn, rule, index, contact_id, event_id, now)
        sink = self.sinks[rule.spec.steps[index].send.vias[0]]
        return self._draft(conn, rule, index, sink, key, context, now, template), context

    def suppression(
        self, rule: CompiledRule, step: int, sink: Sink, contact: dict[str, Any], context: dict[str, Any]
    ) -> str | None:
        """Why the worker would not send step `step` on `sink` now (its `if`, the address, consent), or None."""
        holds = self._condition(rule, step, context)
        if isinstance(holds, str):
            return holds
        return self._unusable(rule, sink, contact) if holds else "step condition is false"

    def _context(
        self,
        conn: Connection,
        rule: CompiledRule,
        index: int,
        contact_id: int,
        event_id: str,
        now: datetime,
        variant: str | None = None,
        read: _Read | None = None,
    ) -> dict[str, Any]:
        """What a step's `if` and templates see; `unsubscribe_url` is set once the channel is known. `read`
        holds the event and the contact's row when prepare() read them with the enrolment."""
        read = read or _Read(None, None)
        event = read.event if read.event is not None else load_event(conn, event_id)
        contact = contacts.view(conn, contact_id, now, self.router.wheres, read.contact)
        context: dict[str, Any] = {
            "event": Known("event", event),
            "contact": contact,
            "rule": rule.name,
            "step": index + 1,
            "variant": variant,
            "locale": str(contact_locale(contact.get("locale"), self.locale)),
            "timezone": zone_of(contact, self.timezone).key,
        }
        if rule.name == CONFIRM_RULE:
            channel = str(event["properties"]["channel"])  # type: ignore[index]
            context["confirm_url"] = self._link(conn, links.CONFIRM, contact_id, channel)
        return context

    def _draft(
        self,
        conn: Connection,
        rule: CompiledRule,
        index: int,
        sink: Sink,
        key: str,
        context: dict[str, Any],
        now: datetime,
        template: str | None = None,
        variant: str | None = None,
    ) -> Draft:
        """The message on `sink` (the variant's template, in the contact's language when translated), its
        unsubscribe link and tracking included."""
        contact = context["contact"]
        headers, unsubscribe_url = self._unsubscribe(conn, rule, sink, contact["id"], key)
        if unsubscribe_url:  # no key where there is no link: a template that prints it fails, rather than "None"
            context["unsubscribe_url"] = unsubscribe_url
        chosen = template or template_for(rule.spec, index, variant)
        return Draft(
            self.env,
            translated(self.env, chosen, locale_chain(contact.get("locale"), self.locale)),
            context,
            self._limits(),
            sink.address(context["contact"]) or "",
            key,
            headers,
            self._tracking(conn, rule, sink, contact["id"], key, now),
        )

    def _limits(self) -> RenderLimits:
        limits = self.worker_spec.templates
        return RenderLimits(limits.cpu_time.total_seconds(), limits.output_bytes)

    def _too_late(
        self, rule: CompiledRule, job: ClaimedJob, contact: dict[str, Any], context: dict[str, Any]
    ) -> str | None:
        """A step due at a moment of the event (`at`) is skipped when that moment had passed when it was
        scheduled (a ticket bought an hour before the reminder's moment), or when `at` gave no date-time."""
        template = rule.moment(job.step)
        if template is None:
            return None
        spec = rule.spec.steps[job.step]
        found = moments.step_moment(template, spec, context, zone_of(contact, self.timezone))
        if found.at is None:
            return f"skipped: {found.problem}"
        scheduled = job.created_at or job.due_at
        if found.at < scheduled:
            return (
                f"skipped: its moment ({moments.describe(found.at)}) had passed when the step was scheduled "
                f"({moments.describe(scheduled)})"
            )
        return None

    def _channel(
        self, conn: Connection, step: Step, left: list[tuple[str, str]], contact: dict[str, Any], now: datetime
    ) -> tuple[Step | None, str]:
        """The step on the first channel with consent and a usable address, the ones passed over journalled
        as `fallback`; (None, why) when none is usable."""
        passed: list[tuple[str, str]] = []
        for via, key in left:
            sink = self.sinks[via]
            why = self._unusable(step.rule, sink, contact)
            if why is None:
                for skipped, said in passed:
                    reason = f"{said}; trying {via}"
                    journal.record(
                        conn,
                        now,
                        step.rule.name,
                        step.contact_id,
                        "fallback",
                        step=step.job.step + 1,
                        via=skipped,
                        reason=reason,
                    )
                return replace(step, key=key, sink=sink), ""
            passed.append((via, why))
        return None, passed[0][1] if len(passed) == 1 else "; ".join(f"{via}: {why}" for via, why in passed)

    def _internal(
        self, conn: Connection, step: Step, enrolment_id: int, context: dict[str, Any], now: datetime
    ) -> Send | None:
        """A message about the contact to someone else (`to:`): no consent, quiet hours, pressure or holdout,
        no unsubscribe link or tracking. A `to:` that does not give a valid address fails the step for good."""
        spec = step.rule.spec.steps[step.job.step]
        template = step.rule.recipient(step.job.step)
        try:
            written = template.render(**context) if template is not None else spec.send.to or ""
            to = internal_address(step.sink.channel, written)
        except Exception as exc:  # a template on odd data, or an address that is not one: never retried
            reason = f"internal recipient {spec.send.to}: {exc}"
            self._record(conn, step, "failed", reason, now)
            journal.record(
                conn,
                now,
                step.rule.name,
                step.contact_id,
                "failed",
                step=step.job.step + 1,
                via=step.sink.key,
                reason=reason,
            )
            jobqueue.finish(conn, step.job, self.worker_id, now, "dead", reason)
            return None
        chosen = template_for(step.rule.spec, step.job.step, step.variant)
        draft = Draft(self.env, chosen, context, self._limits(), to, step.key, {})
        event = context["event"]
        send_context = SendContext(
            step.rule.name, step.job.step + 1, step.rule.spec.kind, dict(context["contact"]), event
        )
        return Send(
            step.job,
            step.rule,
            enrolment_id,
            step.contact_id,
            step.sink,
            draft,
            send_context,
            internal=True,
            variant=step.variant,
        )

    def _unsubscribe(
        self, conn: Connection, rule: CompiledRule, sink: Sink, contact_id: int, key: str
    ) -> tuple[dict[str, str], str | None]:
        """Marketing e-mail carries a one-click unsubscribe link (RFC 8058) when the public URL is known;
        it names the message too, so the rule's KPIs count the unsubscribe."""
        if rule.spec.kind != "marketing" or sink.channel != "email" or not self.public_url:
            return {}, None
        url = self._link(conn, links.UNSUBSCRIBE, contact_id, "email", key)
        return {"List-Unsubscribe": f"<{url}>", "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}, url

    def _link(self, conn: Connection, purpose: str, contact_id: int, channel: str, delivery: str | None = None) -> str:
        """A link to /u/TOKEN (unsubscribe) or /c/TOKEN (confirm) on the public URL."""
        path = {links.UNSUBSCRIBE: "u", links.CONFIRM: "c"}[purpose]
        token = links.make_token(self._link_secret(conn), contact_id, channel, purpose, delivery)
        return f"{(self.public_url or '').rstrip('/')}/{path}/{token}"

    def _link_secret(self, conn: Connection) -> bytes:
        """The link key, kept for the process once it was found stored. One this transaction made is kept for the
        transaction only: if it rolls back (it prepared other steps too, and one failed), links signed with that
        key would be refused by /u/ and the redirects, in every e-mail sent with it."""
        if self._secret is not None:
            return self._secret
        transaction = conn.get_transaction()
        if self._made is not None and self._made[0] is transaction:
            return self._made[1]
        secret, made = links.made_link_secret(conn)
        if made:
            self._made = (transaction, secret)
        else:
            self._secret = secret
        return secret

    def _tracking(
        self, conn: Connection, rule: CompiledRule, sink: Sink, contact_id: int, key: str, now: datetime
    ) -> Tracking | None:
        """E-mail tracked as the rule and the sink say, when the public URL is known (the config requires it)."""
        if sink.channel != "email" or not self.public_url:
            return None
        track = rule.spec.tracking(sink.config)
        if not (track.opens or track.clicks):
            return None
        secret = self._link_secret(conn)
        return Tracking(self.public_url, secret, contact_id, key, now, bool(track.opens), bool(track.clicks))

    def _capped(self, rule: CompiledRule) -> bool:
        cap = self.policies.pressure
        return cap is not None and rule.spec.kind not in cap.exempt

    def _condition(self, rule: CompiledRule, step: int, context: dict[str, Any]) -> bool | str:
        """Whether the step's `if` holds, or why it could not be evaluated (a field missing from odd data...)."""
        condition = rule.step_conditions[step]
        if condition is None:
            return True
        try:
            return bool(evaluate(condition, context))
        except Exception as exc:
            warn_once(self.router.warned, f"{rule.name} step {step + 1}", exc)
            return f"if failed: {rule.spec.steps[step].if_}: {type(exc).__name__}: {exc}"

    def _unusable(self, rule: CompiledRule, sink: Sink, contact: dict[str, Any]) -> str | None:
        """Why this channel cannot reach the contact now: no address, a bad one, or no consent."""
        if sink.address(contact) is None:
            return f"contact has no {sink.channel} address"
        if sink.channel == "email" and contact["email_status"] in ("bouncing", "erased"):
            return f"email address is {contact['email_status']}"
        if sink.channel == "sms" and contact["phone_status"] != "ok":
            return f"phone number is {contact['phone_status']}"
        if rule.spec.kind == "marketing":
            # A withdrawal stops marketing whatever the policy; `required` also wants a grant.
            state = contact["consent"].get(sink.channel, "none")
            needs_grant = self.policies.consent.get(sink.channel) in ("required", "double_opt_in")
            if state == "withdrawn" or (needs_grant and state != "granted"):
                return f"no {sink.channel} consent (state: {state})"
        return None

    def _deferral(
        self, conn: Connection, rule: CompiledRule, sink: Sink, contact: dict[str, Any], now: datetime
    ) -> Deferral | None:
        """Marketing waits out quiet hours and the pressure cap; transactional messages never wait."""
        if rule.spec.kind != "marketing":
            return None
        quiet = quiet_until(self.policies, sink.channel, zone_of(contact, self.timezone), now)
        pressure = pressure_until(conn, self.policies, contact["id"], rule.spec.kind, now)
        found = [d for d in (quiet, pressure) if d is not None]
        return max(found, key=lambda d: d.until) if found else None

    def _suppress(self, conn: Connection, step: Step, reason: str, now: datetime) -> None:
        self._record(conn, step, "suppressed", reason, now)
        journal.record(
            conn,
            now,
            step.rule.name,
            step.contact_id,
            "suppressed",
            step=step.job.step + 1,
            via=step.sink.key,
            reason=reason,
        )
        self._advance(conn, step, now)
        log.info("step suppressed", rule=step.rule.name, step=step.job.step + 1, sink=step.sink.key, reason=reason)

    def _fail(self, conn: Connection, step: Step, reason: str, now: datetime) -> None:
        """The step cannot be decided (its `if` raised): recorded as failed, and the journey goes on."""
        self._record(conn, step, "failed", reason, now)
        number, via = step.job.step + 1, step.sink.key
        journal.record(conn, now, step.rule.name, step.contact_id, "failed", step=number, via=via, reason=reason)
        self._advance(conn, step, now)

    def _hold_out(self, conn: Connection, step: Step, now: datetime) -> None:
        """The holdout group's journey goes on without its messages; its goals count against them."""
        self._record(conn, step, "held_out", None, now, sent_at=now)
        number, via = step.job.step + 1, step.sink.key
        reason = f"holdout group ({step.rule.spec.holdout:.0%}): not sent"
        journal.record(conn, now, step.rule.name, step.contact_id, "held_out", step=number, via=via, reason=reason)
        self._advance(conn, step, now)

    def _defer(self, conn: Connection, step: Step, deferral: Deferral, now: datetime) -> None:
        cap = self.policies.pressure
        first_due = step.job.first_due_at or step.job.due_at
        if cap is not None and cap.max_delay is not None and deferral.until - first_due > cap.max_delay:
            self._suppress(conn, step, f"{deferral.reason}; dropped: would wait past max_delay", now)
            return
        jobqueue.defer(conn, step.job, self.worker_id, deferral.until, now, deferral.reason)
        journal.record(
            conn,
            now,
            step.rule.name,
            step.contact_id,
            "deferred",
            step=step.job.step + 1,
            via=step.sink.key,
            reason=f"{deferral.reason} (until {deferral.until:%Y-%m-%d %H:%M} UTC)",
        )
        log.info("step deferred", rule=step.rule.name, step=step.job.step + 1, reason=deferral.reason)

    def record(
        self, conn: Connection, send: Send, result: DeliveryResult, message: Message | None = None, again: bool = False
    ) -> bool:
        """Store the sink's answer (and the message as sent) and move the journey on (or to the step's next
        channel), in one transaction. True when that made a job pending (the next step, this one again, a
        retry): the worker claims again only then. `again`: the record is tried again because the database did
        not answer; if it closed the step's job all the same (the COMMIT went through, its answer was lost), the
        answer is recorded already: written twice, the journal would say it twice."""
        if again and jobqueue.finished_by(conn, send.job, self.worker_id):
            return False
        made = jobqueue.pending_made(conn)
        self._record_outcome(conn, send, _storable(result), message)
        return jobqueue.pending_made(conn) != made

    @staticmethod
    def changes_contact(result: DeliveryResult) -> bool:
        """Whether recording `result` may change its contact (an address refused, an opt-out): steps prepared in
        the same transaction must then read their contacts after it, not ahead of it (`reading_ahead`)."""
        return bool(result.invalid_addresses) or result.outcome in (Outcome.OPTED_OUT, Outcome.ADDRESS_INVALID)

    def _record_outcome(self, conn: Connection, send: Send, result: DeliveryResult, message: Message | None) -> None:
        now = self.clock.now()
        job, rule = send.job, send.rule
        step = Step(
            job,
            rule,
            send.enrolment_id,
            send.contact_id,
            send.draft.idempotency_key,
            send.sink,
            internal=send.internal,
            variant=send.variant,
        )
        number, via = job.step + 1, send.sink.key
        ours = not send.internal  # an internal recipient's failures say nothing about the contact's addresses
        if result.invalid_addresses and result.outcome is not Outcome.ADDRESS_INVALID and ours:
            contacts.forget_addresses(conn, send.contact_id, send.sink.channel, result.invalid_addresses, now)
        following = self._next_channel(step) if ours else None
        then = f"; trying {following}" if following else ""
        if result.outcome is Outcome.SENT:
            self._record(conn, step, "sent", None, now, result.provider_id, sent_at=now)
            if message is not None and self.keep_rendered and ours:  # a rep's alert is not the contact's mail
                rendered.keep(conn, step.key, send.contact_id, now, message)
            said = f"internal: to {send.draft.to}" if send.internal else _sent(send)
            journal.record(conn, now, rule.name, send.contact_id, "send", step=number, via=via, reason=said)
            self._advance(conn, step, now)
        elif result.outcome is Outcome.OPTED_OUT and ours:
            self._record(conn, step, "opted_out", result.error, now)
            journal.record(
                conn,
                now,
                rule.name,
                send.contact_id,
                "failed" if following else "suppressed",
                step=number,
                via=via,
                reason=f"the recipient opted out: {result.error}{then}",
            )
            contacts.withdraw(conn, send.contact_id, send.sink.channel, send.sink.key, now, result.error)
            self._fall_back(conn, step, following, now)
        elif result.outcome is Outcome.ADDRESS_INVALID and ours:
            self._record(conn, step, "address_invalid", result.error, now)
            journal.record(
                conn,
                now,
                rule.name,
                send.contact_id,
                "failed",
                step=number,
                via=via,
                reason=f"address invalid: {result.error}{then}",
            )
            addresses = result.invalid_addresses or (send.draft.to,)
            contacts.forget_addresses(conn, send.contact_id, send.sink.channel, addresses, now)
            self._fall_back(conn, step, following, now)
        elif result.outcome is Outcome.RETRY and not job.retried_too_long(
            now, self.worker_spec.retry_for, self.worker_spec.max_attempts
        ):
            self._record(conn, step, "retrying", result.error, now)
            delay = jobqueue.retry_delay(
                job.attempts, self.worker_spec.retry_base, self.worker_spec.retry_max, result.retry_after
            )
            jobqueue.reschedule(conn, job, self.worker_id, now + delay, now, result.error or "retry")
        else:
            reason = result.error or "failed"
            if result.outcome is Outcome.RETRY:
                reason, following, then = f"gave up after {job.attempts} attempts: {reason}", None, ""
            if send.internal:
                reason = f"internal: to {send.draft.to}: {reason}"
            self._record(conn, step, "failed", reason, now)
            journal.record(conn, now, rule.name, send.contact_id, "failed", step=number, via=via, reason=reason + then)
            if following:
                self._fall_back(conn, step, following, now)
            else:
                jobqueue.finish(conn, job, self.worker_id, now, "dead", reason)

    def _next_channel(self, step: Step) -> str | None:
        """The sink after this one in the step's `via` list, if any."""
        vias = step.rule.spec.steps[step.job.step].send.vias
        index = vias.index(step.sink.key) if step.sink.key in vias else len(vias)
        return vias[index + 1] if index + 1 < len(vias) else None

    def _fall_back(self, conn: Connection, step: Step, following: str | None, now: datetime) -> None:
        """After a permanent failure: the step again at once, where prepare() picks the next usable channel
        (this one is spent); without a next channel, the journey goes on."""
        if following is None:
            self._advance(conn, step, now)
            return
        jobqueue.defer(
            conn, step.job, self.worker_id, now, now, f"{step.sink.key} failed; trying {following}", afresh=True
        )

    def _advance(self, conn: Connection, step: Step, now: datetime) -> None:
        """The step is over: its job done, the next step queued or the journey completed (all written with the
        transaction's other queued rows, store/appends.py)."""
        jobqueue.finish_queued(conn, step.job, self.worker_id, now)
        following = step.job.step + 1
        steps = step.rule.spec.steps
        if following < len(steps):
            due = moments.due_at(
                conn,
                steps[following],
                step.rule.moment(following),
                step.enrolment_id,
                step.contact_id,
                self.timezone,
                now,
            )
            priority, rule = step.rule.spec.priority, step.rule.name
            jobqueue.add_next_step(conn, step.job, self.worker_id, following, due, now, priority, rule)
        else:
            row = {"enrolment_id": step.enrolment_id, "status": "completed", "by": None, "now": now}
            appends.append(conn, _END, row)

    def _record(
        self,
        conn: Connection,
        step: Step,
        status: str,
        reason: str | None,
        now: datetime,
        provider_id: str | None = None,
        sent_at: datetime | None = None,
    ) -> None:
        """One row per step, whatever the attempts: written over on each outcome, in one statement, queued with the
        transaction's other rows (store/appends.py): a statement that reads deliveries writes them first."""
        row = {
            "idempotency_key": step.key,
            "enrolment_id": step.enrolment_id,
            "rule": step.rule.name,
            "step": step.job.step + 1,
            "contact_id": step.contact_id,
            "sink": step.sink.key,
            "variant": step.variant,
            "kind": INTERNAL_KIND if step.internal else step.rule.spec.kind,
            "created_at": now,
            "status": status,
            "reason": reason,
            "attempts": step.job.attempts,
            "updated_at": now,
            "provider_id": provider_id,
            "sent_at": sent_at,
        }
        appends.append(conn, _upsert_delivery(conn.dialect.name), row)


@functools.cache
def _upsert_delivery(dialect: str) -> sa.Insert:
    insert = sql.insert(dialect, DELIVERIES).inline()  # appended: no id read back
    excluded = insert.excluded
    return insert.on_conflict_do_update(
        index_elements=["idempotency_key"],
        set_={
            "status": excluded.status,
            "reason": excluded.reason,
            "attempts": excluded.attempts,
            "updated_at": excluded.updated_at,
            # An outcome without these keeps what an earlier attempt recorded.
            "provider_id": sa.func.coalesce(excluded.provider_id, D.provider_id),
            "sent_at": sa.func.coalesce(excluded.sent_at, D.sent_at),
        },
    )


def _with_event_and_contact(dialect: str) -> sa.Select[Any]:
    """Enrolments with their event and their contact (with its ids and devices), in one statement: the event
    may be gone (retention), the contact never is."""
    return sa.select(
        ENROLMENTS,
        *[column.label(f"event__{column.name}") for column in EVENTS.c],
        *[column.label(f"contact__{column.name}") for column in CONTACTS.c],
        *contacts.links_columns(dialect, E.contact_id),
    ).select_from(
        ENROLMENTS.outerjoin(EVENTS, EVENTS.c.id == E.event_id).outerjoin(CONTACTS, CONTACTS.c.id == E.contact_id)
    )


@functools.cache
def _step(dialect: str) -> sa.Select[Any]:
    return _with_event_and_contact(dialect).where(E.id == sa.bindparam("enrolment_id"))


@functools.cache
def _steps(dialect: str) -> sa.Select[Any]:
    return _with_event_and_contact(dialect).where(E.id.in_(sa.bindparam("ids", expanding=True)))


#: Where `reading_ahead` keeps what it read, by step job id, on the connection while the batch is prepared.
_AHEAD = "declic.steps_ahead"


@dataclass
class _Ahead:
    enrolments: dict[int, Any]  # by job id; taken by the step's prepare()
    statuses: dict[str, str | None]  # by delivery key; None: no row


def _statuses(conn: Connection, keys: list[str], ahead: _Ahead | None) -> dict[str, str]:
    """The status of each channel's delivery row that exists: read ahead for the batch, or now."""
    if ahead is not None and all(key in ahead.statuses for key in keys):
        return {key: status for key in keys if (status := ahead.statuses.pop(key)) is not None}
    return _read_statuses(conn, keys)


def _read_statuses(conn: Connection, keys: list[str]) -> dict[str, str]:
    return {row.idempotency_key: row.status for row in conn.execute(_DELIVERY_STATUSES, {"keys": keys})}


@dataclass(frozen=True)
class _Read:
    """What prepare() read with the enrolment: the event as templates see it, the contact's row and links."""

    event: dict[str, object] | None
    contact: dict[str, Any] | None


def _read_with(row: Any) -> _Read:
    fields = row._mapping
    event = {c.name: fields[f"event__{c.name}"] for c in EVENTS.c} if fields["event__id"] is not None else None
    contact = {c.name: fields[f"contact__{c.name}"] for c in CONTACTS.c} if fields["contact__id"] is not None else None
    if contact is not None:
        contact.update(links__ids=fields["links__ids"], links__devices=fields["links__devices"])
    return _Read(event_of(event) if event else None, contact)


_DELIVERY_STATUSES = sa.select(D.idempotency_key, D.status).where(
    D.idempotency_key.in_(sa.bindparam("keys", expanding=True))
)
_KEPT_VARIANT = (
    sa.select(D.variant)
    .where(D.contact_id == sa.bindparam("contact_id"), D.rule == sa.bindparam("rule"), D.step == sa.bindparam("step"))
    .where(D.variant.is_not(None), D.status == "sent")
    .order_by(D.id.desc())
    .limit(1)
)
#: A capped step's hold on its slot under the pressure cap (prepare() writes it), given back.
_UNHOLD = sa.delete(DELIVERIES).where(D.idempotency_key == sa.bindparam("key"), D.status == "sending")
_END = (
    sa.update(ENROLMENTS)
    .where(E.id == sa.bindparam("enrolment_id"), E.status == "active")
    .values(status=sa.bindparam("status"), ended_by=sa.bindparam("by"), ended_at=sa.bindparam("now"))
)


def _spent(status: str | None, last: bool) -> bool:
    """A channel is spent by a permanent failure; a failed last channel is retried when its job is replayed."""
    return status in SPENT or (status == "failed" and not last)


def channel_keys(key: str, vias: list[str]) -> list[tuple[str, str]]:
    """(sink, delivery key) for each channel of a step: the first keeps the step's key, so a step that gains
    fallback channels keeps its deliveries; the others are keyed by sink name."""
    return [
        (via, key if i == 0 else f"{key}-{hashlib.sha256(via.encode()).hexdigest()[:8]}") for i, via in enumerate(vias)
    ]


def _storable(result: DeliveryResult) -> DeliveryResult:
    """The provider's answer as the database can hold it (`sql.storable`): its id cut to its column, as the record
    shows by its last character. Refused, the record would fail after the send, and the send be made again."""
    provider_id, error = result.provider_id, result.error
    if provider_id is not None:
        provider_id = sql.storable(provider_id, PROVIDER_ID_LENGTH)
    if error is not None:
        error = sql.storable(error)
    if provider_id == result.provider_id and error == result.error:
        return result
    return replace(result, provider_id=provider_id, error=error)


def _sent(send: Send) -> str | None:
    """What the journal says of a send of a variant or a translation: which one went out."""
    template = send.draft.template
    plain = template_for(send.rule.spec, send.job.step, send.variant)
    if send.variant is None and template == plain:
        return None
    said = f"template {template}"
    return f"variant {send.variant}, {said}" if send.variant else said


def idempotency_key(rule: str, contact_id: int, occurrence: str, step: int) -> str:
    """Stable for one (rule, contact, occurrence, step), whatever the retries, replays and restarts."""
    digest = hashlib.sha256(f"{rule}\0{contact_id}\0{occurrence}\0{step}".encode()).hexdigest()
    return f"dcl-{digest[:40]}"


async def call_sink(
    send: Send,
    still_holds: Callable[[Send], Awaitable[bool]] | None = None,
    leave: Callable[[Send], Awaitable[None]] | None = None,
    wait: float = 10.0,
) -> tuple[DeliveryResult, Message | None] | None:
    """Render the message, then send it; the message comes back with the result, to be kept as sent. None when
    nothing was sent: the decision waited for the sink more than `wait` seconds (`worker.sink_wait`) and
    `still_holds` said it no longer holds, or the step, still far back in the sink's line after `wait`, left it
    (`leave(send)` sends it back to the queue for its turn: a worker slot is not held by a sink that will not take
    it soon). In bench/e2e.py (3,000 orders, SMTP at 10 sends at once) steps waited 0.3 s at most for the sink.

    A template that fails or goes over its limits fails the step for good: the same template with the same
    data would fail again. Sinks must not raise for remote failures; one that does is retried, not allowed
    to stop the worker.
    """
    try:
        message = await asyncio.get_running_loop().run_in_executor(_renderers(), send.draft.render)
    except TemplateProblem as exc:  # the worker logs the outcome, the journal keeps the reason
        return DeliveryResult.permanent(str(exc)), None
    limiter = send.sink.limiter
    if not await limiter.enter(None if leave is None else wait) and leave is not None:
        await leave(send)  # it left the sink's line, holding no slot
        return None
    try:
        # Checked once the slot is held: the send follows at once, nothing left to wait for.
        waited = time.monotonic() - send.decided > wait
        if waited and still_holds is not None and not await still_holds(send):
            return None
        return await send.sink.send(message, send.context), message
    except Exception as exc:
        log.exception("sink raised", sink=send.sink.key, rule=send.rule.name)
        return DeliveryResult.retry(f"{type(send.sink).__name__}.send raised {exc!r}"), message
    finally:
        limiter.leave()
