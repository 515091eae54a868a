"""Send-time outcomes against a real SMTP server: retries, dead letter, replay, outages, bounces."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from click.testing import CliRunner

from conftest import (
    BASE_CONFIG,
    DEFAULT_RULES,
    SECRET,
    TEMPLATES,
    Deployment,
    Factory,
    fixture_bytes,
    locked,
    refuse,
    until,
)
from declic_gateway.cli.main import cli
from declic_gateway.config import WorkerSpec
from declic_gateway.errors import TransactionConflict
from declic_gateway.http.app import create_app, load
from declic_gateway.http.running import GATEWAY_KEY
from declic_gateway.kit.sinks import DeliveryResult
from declic_gateway.send.delivery import Send, call_sink
from declic_gateway.store import jobqueue
from declic_gateway.store.jobqueue import ClaimedJob
from declic_gateway.testing import FakeClock, SmtpCatcher, write_deployment

ORDER = fixture_bytes("shopify/order.json")
CUSTOMER = fixture_bytes("shopify/customer.json")
CAMILLE = "camille.durand@example.org"
NOAH = "noah.martin@example.org"
#: Noah's contact row held by another transaction (PostgreSQL).
NOAH_LOCKED = "SELECT id FROM contacts WHERE id = :id FOR UPDATE"


def declic(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


async def test_a_4xx_reply_is_retried_with_backoff_and_sent_once(deploy: Factory, smtp: SmtpCatcher) -> None:
    smtp.replies = ["451 4.3.0 try again later"]
    d = await deploy()
    await d.post_shopify("orders/create", ORDER)
    await d.advance(seconds=1)
    assert smtp.messages == []
    [(status, reason, attempts)] = d.rows("SELECT status, reason, attempts FROM deliveries")
    assert (status, attempts) == ("retrying", 1) and "451" in reason
    due = d.scalar("SELECT due_at FROM jobs WHERE kind = 'step'")
    assert due is not None
    await d.advance(seconds=4)  # backoff is 5..10 s for the first retry (retry_base: 10s)
    assert smtp.messages == []
    await d.advance(seconds=6)
    assert len(smtp.to(CAMILLE)) == 1
    assert d.rows("SELECT status, attempts FROM deliveries") == [("sent", 2)]
    await d.advance(hours=2)
    assert len(smtp.messages) == 1


async def test_a_permanent_5xx_goes_to_the_dead_letter_and_replay_sends_it(deploy: Factory, smtp: SmtpCatcher) -> None:
    smtp.replies = ["554 5.7.1 message refused"]
    d = await deploy()
    await d.post_shopify("orders/create", ORDER)
    await d.advance(seconds=1)
    assert d.scalar("SELECT status FROM jobs WHERE kind = 'step'") == "dead"
    [(status, reason)] = d.rows("SELECT status, reason FROM deliveries")
    assert status == "failed" and "554" in reason
    listing = declic("replay", "--config", str(d.path))
    assert "554 5.7.1 message refused" in listing
    job_id = listing.split()[0]
    assert declic("replay", "--config", str(d.path), job_id) == "queued 1 job again\n"
    d.clock.set(datetime.now(UTC))  # the command line queues at the real time
    await d.advance(seconds=1)
    assert len(smtp.to(CAMILLE)) == 1
    assert declic("replay", "--config", str(d.path)) == "dead letter is empty\n"


async def test_attempts_run_out_into_the_dead_letter(deploy: Factory, smtp: SmtpCatcher) -> None:
    smtp.replies = ["421 4.7.0 busy"] * 3
    d = await deploy(max_attempts=3)
    await d.post_shopify("orders/create", ORDER)
    for _ in range(4):
        await d.advance(minutes=5)
    assert smtp.messages == []
    [(status, reason)] = d.rows("SELECT status, reason FROM deliveries")
    assert status == "failed" and reason.startswith("gave up after 3 attempts: SMTP 421")
    assert d.scalar("SELECT status FROM jobs WHERE kind = 'step'") == "dead"


async def test_a_mail_waits_out_two_days_of_outage_and_not_four(deploy: Factory, smtp: SmtpCatcher) -> None:
    """Retries last `retry_for` (3 days by default) from the first failure, backing off to hourly (`retry_max`)."""
    smtp.stop()
    d = await deploy(max_attempts=500)
    await d.post_shopify("orders/create", ORDER)
    for _ in range(2 * 24 * 4):  # two days, in quarter hours: every due retry runs on time
        await d.advance(minutes=15)
    assert d.scalar("SELECT status FROM jobs WHERE kind = 'step'") == "pending"
    attempts = d.scalar("SELECT attempts FROM jobs WHERE kind = 'step'")
    assert 48 <= attempts <= 110, attempts  # hourly, jittered down to half an hour, after the first half hour
    smtp.start()
    await d.advance(hours=1, minutes=1)
    assert len(smtp.to(CAMILLE)) == 1  # back: the order confirmation goes out, once

    smtp.stop()
    await d.post_shopify("orders/create", ORDER.replace(b"7001002003", b"7001002004"), webhook_id="second")
    for _ in range(4 * 24):  # four days, hour by hour
        await d.advance(hours=1)
    [(status, reason)] = d.rows("SELECT status, reason FROM deliveries WHERE status != 'sent'")
    assert status == "failed" and reason.startswith("gave up after")  # three days after it first failed


async def test_with_the_default_retries_a_mail_outlasts_two_days_of_outage_and_is_dead_after_three(
    aiohttp_client: Any, tmp_path: Path, db_url: str, smtp: SmtpCatcher
) -> None:
    """No `worker:` section: the README's schedule, 30 s doubling to hourly, jittered, for 3 days."""
    assert (WorkerSpec().retry_for, WorkerSpec().max_attempts) == (timedelta(days=3), 500)
    config = f"""\
storage: {{url: '{db_url}'}}
sources: {{shop: {{plugin: shopify, secret: {SECRET}}}}}
sinks: {{email: {{plugin: smtp, host: 127.0.0.1, port: {smtp.port}, tls: none, sender: shop@example.com}}}}
rules:
  - name: order-confirmation
    when: order.placed
    kind: transactional
    send: {{via: email, template: order-confirmation}}
"""
    settings, pm, _ = load(str(write_deployment(tmp_path, config, TEMPLATES)))
    clock = FakeClock(datetime(2026, 3, 14, 8, 0, tzinfo=UTC))
    app = create_app(settings, pm=pm, clock=clock, role="web")
    d = Deployment(await aiohttp_client(app), app[GATEWAY_KEY], clock, tmp_path / "declic.yaml")
    smtp.stop()
    await d.post_shopify("orders/create", ORDER)
    await d.advance(seconds=1)
    failed_at = d.clock.now()
    for _ in range(2 * 24 * 4):  # two days in quarter hours: each retry runs when due
        await d.advance(minutes=15)
    attempts = d.scalar("SELECT attempts FROM jobs WHERE kind = 'step'")
    assert d.scalar("SELECT status FROM jobs WHERE kind = 'step'") == "pending"
    # 8 attempts in the first ~hour, then one every 30 to 60 minutes.
    assert 8 + 47 * 1 <= attempts <= 8 + 47 * 2, attempts
    while d.scalar("SELECT status FROM jobs WHERE kind = 'step'") == "pending":
        await d.advance(minutes=15)
        assert d.clock.now() - failed_at <= timedelta(days=3, hours=1, minutes=15), "still retried past 3 days"
    assert d.clock.now() - failed_at >= timedelta(days=3)  # not a moment before
    [(status, reason)] = d.rows("SELECT status, reason FROM deliveries")
    assert status == "failed" and reason.startswith("gave up after"), reason
    assert int(reason.split()[3]) < 500  # the three days ran out, not the attempts


async def test_smtp_down_for_an_hour_every_mail_goes_out_once_it_is_back(deploy: Factory, smtp: SmtpCatcher) -> None:
    smtp.stop()
    d = await deploy(max_attempts=12)
    await d.post_shopify("orders/create", ORDER)
    await d.post_shopify("customers/create", CUSTOMER)
    for _ in range(12):
        await d.advance(minutes=5)
    assert smtp.messages == []
    assert d.scalar("SELECT count(*) FROM deliveries WHERE status = 'retrying'") == 2
    smtp.start()
    for _ in range(8):
        await d.advance(minutes=10)
    assert sorted(m["To"] for m in smtp.messages) == [CAMILLE, "noah.martin@example.org"]
    assert d.scalar("SELECT count(*) FROM deliveries WHERE status = 'sent'") == 2


async def test_a_refused_recipient_marks_the_address_and_later_mail_is_suppressed(
    deploy: Factory, smtp: SmtpCatcher
) -> None:
    smtp.refuse[CAMILLE] = "550 5.1.1 no such user"
    d = await deploy()
    await d.post_shopify("orders/create", ORDER)
    await d.advance(seconds=1)
    [(status, reason)] = d.rows("SELECT status, reason FROM deliveries")
    assert status == "address_invalid" and "550 5.1.1" in reason
    assert d.scalar("SELECT email_status FROM contacts") == "bouncing"
    second = ORDER.replace(b"7001002003", b"7001002004")
    await d.post_shopify("orders/create", second)
    await d.advance(seconds=1)
    assert d.rows("SELECT status, reason FROM deliveries ORDER BY id")[1] == ("suppressed", "email address is bouncing")


async def test_unsubscribe_between_steps_suppresses_the_next_step(deploy: Factory, smtp: SmtpCatcher) -> None:
    d = await deploy()
    await d.post_shopify("checkouts/create", fixture_bytes("shopify/checkout.json"))
    await d.advance(hours=1)
    assert len(smtp.messages) == 1
    unsubscribe = (
        b'{"customer_id": 5550001, "email_address": "camille.durand@example.org",'
        b' "email_marketing_consent": {"state": "unsubscribed", "consent_updated_at": null}}'
    )
    await d.post_shopify("customers_email_marketing_consent/update", unsubscribe)
    await d.advance(days=1)
    assert len(smtp.messages) == 1
    assert d.rows("SELECT step, status, reason FROM deliveries ORDER BY step") == [
        (1, "sent", None),
        (2, "suppressed", "no email consent (state: withdrawn)"),
    ]


def other_checkout(checkout: bytes) -> bytes:
    """Camille's checkout made Noah's (customer 5550002)."""
    return (
        checkout.replace(b"981726354", b"981726355")
        .replace(b"c0ffee5ca7e1", b"c0ffee5ca7e2")
        .replace(CAMILLE.encode(), NOAH.encode())
        .replace(b"5550001", b"5550002")
        .replace(b"+33612345678", b"+33698765432")
    )


async def two_carts_due(d: Deployment) -> list[ClaimedJob]:
    """Camille's and Noah's checkouts, applied, then an hour later their cart reminders claimed, in that order."""
    checkout = fixture_bytes("shopify/checkout.json")
    await d.post_shopify("checkouts/create", checkout)
    await d.post_shopify("checkouts/create", other_checkout(checkout))
    await d.advance(seconds=1)
    d.clock.advance(timedelta(hours=1))
    jobs = await d.gateway.db.run(jobqueue.claim, d.gateway.worker.id, d.clock.now(), timedelta(minutes=5), 10)
    return sorted((job for job in jobs if job.kind == "step"), key=lambda job: job.id)


async def test_preparing_a_step_and_recording_another_send_share_a_transaction(deploy: Factory) -> None:
    """Steps run side by side: what arrives while a transaction runs, a step to prepare or a sink's answer to
    record, shares the next one (docs/performance.md, session 20)."""
    d = await deploy()
    first, second = await two_carts_due(d)
    worker, db = d.gateway.worker, d.gateway.db
    send = await worker.prepare_step(first)
    assert send is not None
    transactions: list[float] = []
    counted = db.on_work
    db.on_work = lambda busy, cpu: (transactions.append(busy), counted(busy, cpu))  # one per transaction run
    try:
        started, release = threading.Event(), threading.Event()
        holding = asyncio.create_task(db.run(lambda conn: (started.set(), release.wait(30))))
        await asyncio.to_thread(started.wait, 30)  # the database thread is busy: both wait for it
        both = asyncio.gather(
            worker.prepare_step(second), worker.record_send(send, DeliveryResult.sent("<a@declic.test>"), None)
        )
        for _ in range(100):
            await asyncio.sleep(0)
        release.set()
        await holding
        prepared, queued = await asyncio.wait_for(both, 30)
    finally:
        db.on_work = counted
    assert len(transactions) == 2, "the hold, then one transaction for the step and the send together"
    assert prepared is not None and prepared.job == second
    assert queued is True  # the cart's second reminder, a day later
    assert d.rows("SELECT status FROM deliveries WHERE idempotency_key = :key", key=send.draft.idempotency_key) == [
        ("sent",)
    ]


@pytest.mark.parametrize("db_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True)
async def test_a_contact_locked_elsewhere_holds_back_its_own_step_not_a_send_recorded_beside_it(
    deploy: Factory, smtp: SmtpCatcher, db_url: str
) -> None:
    """Under a pressure cap a step locks its contact's row while it is prepared (PostgreSQL). Held elsewhere past
    busy_timeout, that fails the step's transaction: a send recorded in the same transaction must still be
    recorded (then the transaction runs again item by item), or its job would be retried and the mail sent again."""
    d = await deploy(policies="  pressure: {max: 10, per: 1d}\n")
    first, second = await two_carts_due(d)
    worker = d.gateway.worker
    send = await worker.prepare_step(first)
    assert send is not None and send.draft.to == CAMILLE
    result, message = await call_sink(send)
    noah = d.scalar("SELECT contact_id FROM enrolments WHERE id = :e", e=second.enrolment_id)
    with locked(db_url, NOAH_LOCKED, id=noah):  # another replica's capped step, an API write...
        prepared, recorded = await asyncio.gather(
            worker.prepare_step(second), worker.record_send(send, result, message), return_exceptions=True
        )
    assert isinstance(prepared, TransactionConflict)
    assert recorded is True  # the cart's second reminder queued, a day later
    assert d.rows("SELECT status FROM deliveries WHERE idempotency_key = :key", key=send.draft.idempotency_key) == [
        ("sent",)
    ]
    await d.advance(minutes=6)  # Noah's step, still claimed, is taken again once its lease is over
    assert [len(smtp.to(CAMILLE)), len(smtp.to(NOAH))] == [1, 1]


async def test_a_send_recorded_after_its_lease_was_taken_over_leaves_the_next_step_to_the_new_holder(
    deploy: Factory, smtp: SmtpCatcher
) -> None:
    """A worker that missed its heartbeats still records the send it made; the worker that took the job over
    finds it recorded and moves the journey on. Only that one queues the next step: queued by both, it would
    be two jobs, each sending it."""
    d = await deploy()
    await d.post_shopify("checkouts/create", fixture_bytes("shopify/checkout.json"))
    await d.advance(seconds=1)
    d.clock.advance(timedelta(hours=1))
    worker, db = d.gateway.worker, d.gateway.db
    jobs = await db.run(jobqueue.claim, worker.id, d.clock.now(), timedelta(seconds=20), 10)
    [job] = [job for job in jobs if job.kind == "step"]
    send = await worker.prepare_step(job)
    assert send is not None
    result, message = await call_sink(send)  # the first reminder goes out
    d.clock.advance(timedelta(seconds=30))  # the lease ran out: another worker takes the job
    other = dataclasses.replace(worker.steps, worker_id="other")
    [taken] = await db.run(jobqueue.claim, "other", d.clock.now(), timedelta(seconds=20), 10)
    assert taken.id == job.id
    await worker.record_send(send, result, message)  # the first worker's record commits now
    assert await db.run(other.prepare, taken) is None  # the new holder sees it sent, and moves on
    assert d.rows("SELECT step, status FROM jobs WHERE kind = 'step' ORDER BY id") == [(0, "done"), (1, "pending")]
    await d.advance(days=1, hours=1)
    assert len(smtp.to(CAMILLE)) == 2  # each reminder once
    assert d.rows("SELECT step, status FROM deliveries ORDER BY step") == [(1, "sent"), (2, "sent")]


@pytest.mark.parametrize("db_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True)
async def test_the_link_key_made_in_a_transaction_that_rolled_back_is_not_used_for_links(
    deploy: Factory, smtp: SmtpCatcher, db_url: str
) -> None:
    """A new deployment makes its link key with its first link, in the transaction that prepares that step. When
    that transaction fails (another step in it waited for a locked contact), the key is not stored: links signed
    with it would be refused by /u/, whatever the worker said in the e-mail."""
    d = await deploy(policies="  pressure: {max: 10, per: 1d}\n")
    first, second = await two_carts_due(d)
    worker = d.gateway.worker
    noah = d.scalar("SELECT contact_id FROM enrolments WHERE id = :e", e=second.enrolment_id)
    with locked(db_url, NOAH_LOCKED, id=noah):
        send, _ = await asyncio.gather(worker.prepare_step(first), worker.prepare_step(second), return_exceptions=True)
    assert isinstance(send, Send)  # prepared again on its own once the shared transaction failed
    unsubscribe = send.draft.headers["List-Unsubscribe"].strip("<>")
    answer = await d.client.get(urlsplit(unsubscribe).path)
    assert answer.status == 200


async def test_a_send_whose_record_fails_is_recorded_once_the_database_answers_and_never_sent_again(
    deploy: Factory, smtp: SmtpCatcher, db_url: str
) -> None:
    """The e-mail went out; the database did not take its record (locked past busy_timeout, or down). The worker
    tries the record again until it goes in: sending the job back to the queue would send the e-mail again."""
    d = await deploy()
    await d.post_shopify("checkouts/create", fixture_bytes("shopify/checkout.json"))
    await d.advance(seconds=1)
    d.clock.advance(timedelta(hours=1))  # the cart reminder is due
    worker, db = d.gateway.worker, d.gateway.db
    [job] = await db.run(jobqueue.claim, worker.id, d.clock.now(), timedelta(minutes=5), 10)
    send = await worker.prepare_step(job)
    assert send is not None
    result, message = await call_sink(send)
    failures: list[int] = []
    counted = db.on_unavailable
    db.on_unavailable = lambda: (failures.append(1), counted())  # type: ignore[func-returns-value]
    try:
        with locked(d.gateway.settings.storage.url, "LOCK TABLE deliveries IN ACCESS EXCLUSIVE MODE"):
            recording = asyncio.create_task(worker.record_send(send, result, message))
            await until(lambda: len(failures) >= 1)  # one attempt refused after busy_timeout
            assert not recording.done()
        assert await asyncio.wait_for(recording, 10) is True  # the second reminder queued, a day later
    finally:
        db.on_unavailable = counted
    assert d.rows("SELECT step, status FROM deliveries") == [(1, "sent")]
    assert d.rows("SELECT step, status FROM jobs WHERE kind = 'step' ORDER BY id") == [(0, "done"), (1, "pending")]
    await d.advance(minutes=10)  # past the lease the job had: nothing runs it again
    assert len(smtp.to(CAMILLE)) == 1


async def test_a_step_prepared_with_the_record_of_a_refused_address_does_not_send_to_it(
    deploy: Factory, smtp: SmtpCatcher
) -> None:
    """Two journeys mail Camille at the same hour; the first send is refused (no such user) and its record marks
    the address bouncing, in the transaction that prepares the second: that one must see the address bouncing."""
    rules = "".join(
        f"  - name: {name}\n    when: checkout.started\n    steps:\n      - wait: 1h\n"
        "        send: {via: email, template: cart-reminder}\n"
        for name in ("cart-a", "cart-b")
    )
    d = await deploy(rules)
    jobs = {job.enrolment_id: job for job in await two_carts_due(d)}
    worker = d.gateway.worker
    enrolments = d.rows("SELECT e.id, e.rule, c.email FROM enrolments e JOIN contacts c ON c.id = e.contact_id")
    step = {(rule, email): jobs[enrolment] for enrolment, rule, email in enrolments}
    send = await worker.prepare_step(step["cart-a", CAMILLE])
    assert send is not None
    refused = DeliveryResult.address_invalid("550 5.1.1 no such user")
    _, second, noahs = await asyncio.gather(  # one transaction: Noah's step makes it a batch that reads ahead
        worker.record_send(send, refused, None),
        worker.prepare_step(step["cart-b", CAMILLE]),
        worker.prepare_step(step["cart-a", NOAH]),
    )
    assert second is None and noahs is not None
    assert d.rows("SELECT rule, status, reason FROM deliveries WHERE rule = 'cart-b'") == [
        ("cart-b", "suppressed", "email address is bouncing")
    ]


async def test_a_record_tried_again_after_its_commit_went_through_unanswered_writes_nothing_twice(
    deploy: Factory, smtp: SmtpCatcher
) -> None:
    """The database took a send's record but its answer was lost (the connection dropped during COMMIT): the
    worker tries the record again. The step's job is closed by it already: nothing is written a second time (no
    second `send` in the journal, no second job for the next step)."""
    d = await deploy()
    first, _ = await two_carts_due(d)
    worker = d.gateway.worker
    send = await worker.prepare_step(first)
    assert send is not None
    result, message = await call_sink(send)
    assert await worker.record_send(send, result, message) is True
    again = await d.gateway.db.run(worker.steps.record, send, result, message, True)
    assert again is False
    assert d.rows("SELECT action, step FROM decisions WHERE action = 'send'") == [("send", 1)]
    assert d.rows(
        "SELECT step, status FROM jobs WHERE kind = 'step' AND enrolment_id = :e ORDER BY id", e=first.enrolment_id
    ) == [
        (0, "done"),
        (1, "pending"),
    ]


async def test_a_send_whose_record_is_refused_is_recorded_without_its_copy_and_never_sent_again(
    deploy: Factory, smtp: SmtpCatcher
) -> None:
    """The e-mail went out; the database refuses the copy kept of it (a value it cannot hold). That is no reason to
    send it again, as the job put back in the queue did: the outcome is recorded without the copy."""
    d = await deploy()
    refuse(d, "rendered_messages")
    await d.post_shopify("orders/create", ORDER)
    await d.advance(seconds=1)
    await d.advance(hours=2)  # past any retry
    assert len(smtp.to(CAMILLE)) == 1
    assert d.rows("SELECT status, attempts FROM deliveries") == [("sent", 1)]
    assert d.rows("SELECT status FROM jobs WHERE kind = 'step'") == [("done",)]
    assert d.rows("SELECT action FROM decisions WHERE action = 'send'") == [("send",)]
    assert d.scalar("SELECT count(*) FROM rendered_messages") == 0


async def test_a_send_no_record_of_which_is_taken_goes_to_the_dead_letter_saying_it_went_out(
    deploy: Factory, smtp: SmtpCatcher
) -> None:
    """When even the outcome alone is refused, nothing records that the e-mail went out but the job: it goes to the
    dead letter, saying so (a replay would send it again), and the e-mail is not sent again meanwhile."""
    d = await deploy()
    refuse(d, "deliveries", "NEW.status = 'sent'")
    await d.post_shopify("orders/create", ORDER)
    await d.advance(seconds=1)
    await d.advance(hours=2)
    assert len(smtp.to(CAMILLE)) == 1
    [(job_id, status, error)] = d.rows("SELECT id, status, last_error FROM jobs WHERE kind = 'step'")
    assert status == "dead"
    assert error.startswith("email answered sent (the message went out) but the database refused its record, so only")
    # A replay leaves it (it would send the e-mail again), and says how to send it all the same.
    replayed = declic("replay", "--config", str(d.path), "--all")
    left = f"left {job_id}: the message went out (its record was refused); --resend sends it again"
    assert replayed == f"queued 0 jobs again\n{left}\n"
    assert d.rows("SELECT status FROM jobs WHERE kind = 'step'") == [("dead",)]
    assert declic("replay", "--config", str(d.path), "--resend", str(job_id)) == "queued 1 job again\n"
    assert d.rows("SELECT status, attempts, failing_since FROM jobs WHERE kind = 'step'") == [("pending", 0, None)]


@pytest.mark.parametrize("db_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True)
@pytest.mark.parametrize(
    ("wait", "due"), [("4d", {"days": 4}), ("1h", {"hours": 1})], ids=["scheduled-4-days-ahead", "control-1-hour-ahead"]
)
async def test_a_step_due_days_after_it_was_scheduled_that_meets_a_lock_is_tried_again_not_dead_lettered(
    deploy: Factory, smtp: SmtpCatcher, db_url: str, wait: str, due: dict[str, float]
) -> None:
    """A capped step locks its contact while it is prepared (PostgreSQL); held elsewhere past busy_timeout, the
    preparation fails, to be tried again. `retry_for` (3 days) was counted from the job's created_at, when the step
    was scheduled: one scheduled more than 3 days ahead went to the dead letter at its first failure, never sent."""
    rules = (
        "  - name: win-back\n    when: order.placed\n    steps:\n"
        f"      - wait: {wait}\n        send: {{via: email, template: order-confirmation}}\n"
    )
    d = await deploy(rules, policies="  pressure: {max: 10, per: 1d}\n")
    await d.post_shopify("orders/create", ORDER)
    await d.advance(seconds=1)
    contact = d.scalar("SELECT contact_id FROM enrolments")
    with locked(db_url, "SELECT id FROM contacts WHERE id = :id FOR UPDATE", id=contact):
        await d.advance(**due, seconds=1)  # due: its preparation waits for the lock, 1 s, and fails
    assert d.rows("SELECT status, attempts FROM jobs WHERE kind = 'step'") == [("pending", 1)]
    await d.advance(hours=2)
    assert len(smtp.to(CAMILLE)) == 1


@pytest.mark.parametrize("db_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True)
async def test_a_step_the_pressure_cap_deferred_past_retry_for_is_retried_not_dead_at_its_second_failure(
    deploy: Factory, smtp: SmtpCatcher, db_url: str
) -> None:
    """`retry_for` (3 days) counts from a job's first failure. For a step that failed before its send (here its
    preparation, which meets a lock on its contact) it was counted from when the step was first due: deferred 5 days
    by the pressure cap, it went to the dead letter at its second failure, a minute after its first, never sent."""
    rules = "".join(
        f"  - name: {name}\n    when: order.placed\n    send: {{via: email, template: order-confirmation}}\n"
        for name in ("thanks", "win-back")
    )
    d = await deploy(rules, max_attempts=50, policies="  pressure: {max: 1, per: 5d, max_delay: 30d}\n")
    await d.post_shopify("orders/create", ORDER)
    await d.advance(seconds=1)
    assert len(smtp.to(CAMILLE)) == 1  # the other waits five days for the cap
    contact = d.scalar("SELECT contact_id FROM enrolments LIMIT 1")
    with locked(db_url, "SELECT id FROM contacts WHERE id = :id FOR UPDATE", id=contact):
        await d.advance(days=5, seconds=1)  # due: its preparation waits for the lock, 1 s, and fails
        await d.advance(minutes=1)  # and again
        assert d.rows("SELECT status, attempts FROM jobs WHERE kind = 'step' AND status != 'done'") == [("pending", 2)]
    await d.advance(hours=1)
    assert len(smtp.to(CAMILLE)) == 2


SINK_WAIT = "  sink_wait: 1s\n"


async def test_an_unsubscribe_applied_while_a_prepared_step_waits_for_the_sink_s_rate_is_seen(
    aiohttp_client: Any, tmp_path: Path, db_url: str, smtp: SmtpCatcher
) -> None:
    """Consent is checked when a step is prepared, then the step waits for its sink: here its rate, one e-mail per
    4 s. Noah's unsubscribe applied meanwhile was not seen: the reminder went out against his will. A decision that
    waited more than `worker.sink_wait` (1 s here) is checked again before the send, and the step prepared again,
    now suppressed."""
    text = BASE_CONFIG.format(
        db_url=db_url, secret=SECRET, smtp_port=smtp.port, rules=DEFAULT_RULES, max_attempts=5, worker=SINK_WAIT
    ).replace("    timeout: 5\n", "    timeout: 5\n    rate: 1/4s\n")
    settings, pm, _ = load(str(write_deployment(tmp_path, text, TEMPLATES)))
    clock = FakeClock(datetime(2026, 3, 14, 8, 0, tzinfo=UTC))
    app = create_app(settings, pm=pm, clock=clock, role="web")
    d = Deployment(await aiohttp_client(app), app[GATEWAY_KEY], clock, tmp_path)
    checkout = fixture_bytes("shopify/checkout.json")
    await d.post_shopify("checkouts/create", checkout)
    await d.post_shopify("checkouts/create", other_checkout(checkout))
    await d.advance(seconds=1)
    clock.advance(timedelta(hours=1))
    sending = asyncio.create_task(d.gateway.worker.drain())  # both reminders prepared; one waits for the rate
    await until(lambda: len(smtp.messages) == 1)
    [first] = smtp.messages
    customer, waiting = (5550001, NOAH) if first["To"] == CAMILLE else (5550002, CAMILLE)
    unsubscribe = {
        "customer_id": customer,
        "email_address": waiting,
        "email_marketing_consent": {"state": "unsubscribed", "consent_updated_at": None},
    }
    await d.post_shopify("customers_email_marketing_consent/update", json.dumps(unsubscribe).encode())
    await d.gateway.worker.drain()  # the unsubscribe applied
    assert not sending.done()
    await asyncio.wait_for(sending, 10)
    assert [m["To"] for m in smtp.messages] == [first["To"]]
    assert d.rows("SELECT c.email, d.status, d.reason FROM deliveries d JOIN contacts c ON c.id = d.contact_id") == [
        (first["To"], "sent", None),
        (waiting, "suppressed", "no email consent (state: withdrawn)"),
    ]
