"""One journey step at send time: re-check, render, call the sink, record the outcome."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import jinja2
import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection

from . import contacts, scheduler
from .config import PoliciesSpec, WorkerSpec
from .errors import TemplateProblem
from .inbound import load_event
from .router import CompiledRule, Router
from .scheduler import ClaimedJob
from .sinks import DeliveryResult, Message, Outcome, SendContext, Sink
from .store import DELIVERIES, ENROLMENTS
from .templating import render_message

if TYPE_CHECKING:
    from .clock import Clock

log = structlog.get_logger("declic.delivery")
D = DELIVERIES.c
E = ENROLMENTS.c


@dataclass(frozen=True)
class Send:
    """Everything decided before the sink is called, computed in one read transaction."""

    job: ClaimedJob
    rule: CompiledRule
    enrolment_id: int
    contact_id: int
    sink: Sink
    message: Message
    context: SendContext


@dataclass
class StepRunner:
    router: Router
    sinks: dict[str, Sink]
    env: jinja2.Environment
    policies: PoliciesSpec
    worker_spec: WorkerSpec
    clock: Clock
    worker_id: str

    def prepare(self, conn: Connection, job: ClaimedJob) -> Send | None:
        """Decide what to send, or close the job here when nothing should be sent."""
        now = self.clock.now()
        enrolment = conn.execute(sa.select(ENROLMENTS).where(E.id == job.enrolment_id)).one()
        rule = self.router.rules.get(enrolment.rule)
        if enrolment.status != "active" or rule is None or job.step >= len(rule.spec.steps):
            why = "rule no longer in the config" if rule is None else f"journey {enrolment.status}"
            scheduler.finish(conn, job, self.worker_id, now, "cancelled", why)
            return None
        key = idempotency_key(enrolment.rule, enrolment.contact_id, enrolment.occurrence, job.step)
        done = conn.execute(sa.select(D.status).where(D.idempotency_key == key)).scalar_one_or_none()
        if done in ("sent", "suppressed", "address_invalid"):
            self._advance(conn, job, rule, enrolment.id, now)  # the outcome was recorded, the job was not
            return None
        step = rule.spec.steps[job.step]
        sink = self.sinks[step.send.via]
        contact = contacts.load(conn, enrolment.contact_id)
        event = load_event(conn, enrolment.event_id)
        context = {"event": event, "contact": contact, "rule": rule.name, "step": job.step + 1}
        reason = self._suppression(rule, job.step, sink, contact, context)
        if reason:
            self._record(conn, job, rule, enrolment.id, contact["id"], key, sink, "suppressed", reason, now)
            self._advance(conn, job, rule, enrolment.id, now)
            log.info("step suppressed", rule=rule.name, step=job.step + 1, sink=sink.key, reason=reason)
            return None
        try:
            parts = render_message(self.env, step.send.template, context)
        except TemplateProblem as exc:
            self._record(conn, job, rule, enrolment.id, contact["id"], key, sink, "failed", str(exc), now)
            scheduler.finish(conn, job, self.worker_id, now, "dead", str(exc))
            log.error("template failed", rule=rule.name, step=job.step + 1, error=str(exc))
            return None
        message = Message(
            to=sink.address(contact) or "",
            text=parts["txt"],
            subject=parts.get("subject"),
            html=parts.get("html"),
            idempotency_key=key,
        )
        send_context = SendContext(rule.name, job.step + 1, rule.spec.kind, contact, event)
        return Send(job, rule, enrolment.id, contact["id"], sink, message, send_context)

    def _suppression(
        self, rule: CompiledRule, step: int, sink: Sink, contact: dict[str, Any], context: dict[str, Any]
    ) -> str | None:
        condition = rule.step_conditions[step]
        if condition is not None:
            try:
                if not condition(**context):
                    return "step condition is false"
            except Exception as exc:
                return f"step condition failed: {exc}"
        if sink.address(contact) is None:
            return f"contact has no {sink.channel} address"
        if sink.channel == "email" and contact["email_status"] == "bouncing":
            return "email address is bouncing"
        if rule.spec.kind == "marketing" and self.policies.consent.get(sink.channel) == "required":
            state = contact["consent"].get(sink.channel, "none")
            if state != "granted":
                return f"no {sink.channel} consent (state: {state})"
        return None

    def record(self, conn: Connection, send: Send, result: DeliveryResult) -> None:
        """Store the sink's answer and move the journey on, in one transaction."""
        now = self.clock.now()
        job, rule, key = send.job, send.rule, send.message.idempotency_key
        args = (conn, job, rule, send.enrolment_id, send.contact_id, key, send.sink)
        if result.outcome is Outcome.SENT:
            self._record(*args, "sent", None, now, result.provider_id)
            self._advance(conn, job, rule, send.enrolment_id, now)
        elif result.outcome is Outcome.ADDRESS_INVALID:
            self._record(*args, "address_invalid", result.error, now)
            if send.sink.channel == "email":
                contacts.mark_email_bouncing(conn, send.contact_id, now)
            self._advance(conn, job, rule, send.enrolment_id, now)
        elif result.outcome is Outcome.RETRY and job.attempts < self.worker_spec.max_attempts:
            self._record(*args, "retrying", result.error, now)
            delay = scheduler.retry_delay(
                job.attempts, self.worker_spec.retry_base, self.worker_spec.retry_max, result.retry_after
            )
            scheduler.reschedule(conn, job, self.worker_id, now + delay, now, result.error or "retry")
        else:
            reason = result.error or "failed"
            if result.outcome is Outcome.RETRY:
                reason = f"gave up after {job.attempts} attempts: {reason}"
            self._record(*args, "failed", reason, now)
            scheduler.finish(conn, job, self.worker_id, now, "dead", reason)

    def _advance(self, conn: Connection, job: ClaimedJob, rule: CompiledRule, enrolment_id: int, now: datetime) -> None:
        scheduler.finish(conn, job, self.worker_id, now)
        following = job.step + 1
        if following < len(rule.spec.steps):
            scheduler.add_step(conn, enrolment_id, following, now + rule.spec.steps[following].wait, now)
        else:
            conn.execute(
                sa.update(ENROLMENTS)
                .where(E.id == enrolment_id, E.status == "active")
                .values(status="completed", ended_at=now)
            )

    def _record(
        self,
        conn: Connection,
        job: ClaimedJob,
        rule: CompiledRule,
        enrolment_id: int,
        contact_id: int,
        key: str,
        sink: Sink,
        status: str,
        reason: str | None,
        now: datetime,
        provider_id: str | None = None,
    ) -> None:
        values = {
            "status": status,
            "reason": reason,
            "attempts": job.attempts,
            "provider_id": provider_id,
            "updated_at": now,
        }
        updated = conn.execute(sa.update(DELIVERIES).where(D.idempotency_key == key).values(**values))
        if updated.rowcount == 0:
            conn.execute(
                sa.insert(DELIVERIES).values(
                    idempotency_key=key,
                    enrolment_id=enrolment_id,
                    rule=rule.name,
                    step=job.step + 1,
                    contact_id=contact_id,
                    sink=sink.key,
                    created_at=now,
                    **values,
                )
            )


def idempotency_key(rule: str, contact_id: int, occurrence: str, step: int) -> str:
    """Stable for one (rule, contact, occurrence, step), whatever the retries, replays and restarts."""
    digest = hashlib.sha256(f"{rule}\0{contact_id}\0{occurrence}\0{step}".encode()).hexdigest()
    return f"dcl-{digest[:40]}"


async def call_sink(send: Send) -> DeliveryResult:
    """Sinks must not raise for remote failures; one that does is retried, not allowed to stop the worker."""
    try:
        return await send.sink.send(send.message, send.context)
    except Exception as exc:
        log.exception("sink raised", sink=send.sink.key, rule=send.rule.name)
        return DeliveryResult.retry(f"{type(send.sink).__name__}.send raised {exc!r}")
