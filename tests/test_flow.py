"""The whole path through real HTTP and a real SMTP server: webhook -> rule -> e-mail."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from conftest import Deployment, Factory, fixture_bytes, until
from declic_gateway.store import jobqueue
from declic_gateway.testing import SmtpCatcher

CAMILLE = "camille.durand@example.org"


async def test_checkout_reminder_goes_out_after_the_wait(deploy: Factory, smtp: SmtpCatcher) -> None:
    d: Deployment = await deploy()
    response = await d.post_shopify("checkouts/create", fixture_bytes("shopify/checkout.json"))
    assert response.status == 200
    assert (await response.json())["status"] == "accepted"
    await d.advance(minutes=59)
    assert smtp.messages == []
    await d.advance(minutes=1)
    [mail] = smtp.messages
    assert mail["To"] == CAMILLE
    assert mail["Subject"] == "Your cart, Camille"
    text = mail.get_body(("plain",)).get_content()
    assert "59.90 EUR" in text and "/recover?key=k1" in text
    assert "Tasse en grès" in mail.get_body(("html",)).get_content()
    assert mail["Message-ID"].endswith("@example.com>") and mail["Date"]


async def test_order_cancels_the_pending_cart_reminders(deploy: Factory, smtp: SmtpCatcher) -> None:
    d = await deploy()
    await d.post_shopify("checkouts/create", fixture_bytes("shopify/checkout.json"))
    await d.advance(minutes=10)
    await d.post_shopify("orders/create", fixture_bytes("shopify/order.json"))
    await d.advance(minutes=1)
    assert [m["Subject"] for m in smtp.messages] == ["Order #1042"]
    await d.advance(days=3)
    assert [m["Subject"] for m in smtp.messages] == ["Order #1042"]
    assert d.scalar("SELECT status FROM enrolments WHERE rule = 'abandoned-cart'") == "exited"


async def test_redelivery_with_the_same_webhook_id_creates_no_new_work(deploy: Factory, smtp: SmtpCatcher) -> None:
    d = await deploy()
    body = fixture_bytes("shopify/order.json")
    first = await d.post_shopify("orders/create", body, webhook_id="wh-1")
    again = await d.post_shopify("orders/create", body, webhook_id="wh-1")
    assert (first.status, again.status) == (200, 200)
    assert (await again.json())["status"] == "duplicate"
    await d.advance(seconds=1)
    assert len(smtp.messages) == 1
    assert d.scalar("SELECT count(*) FROM inbox") == 1


async def test_marketing_email_needs_consent_transactional_does_not(deploy: Factory, smtp: SmtpCatcher) -> None:
    d = await deploy()
    customer = json.loads(fixture_bytes("shopify/customer.json"))
    customer["email_marketing_consent"]["state"] = "not_subscribed"
    await d.post_shopify("customers/create", json.dumps(customer).encode())
    order = json.loads(fixture_bytes("shopify/order.json"))
    order["customer"] = {"id": customer["id"], "email": customer["email"], "first_name": "Noah"}
    order["email"] = customer["email"]
    await d.post_shopify("orders/create", json.dumps(order).encode())
    await d.advance(seconds=1)
    assert [m["Subject"] for m in smtp.messages] == ["Order #1042"]
    [(status, reason)] = d.rows("SELECT status, reason FROM deliveries WHERE rule = 'welcome'")
    assert status == "suppressed" and reason == "no email consent (state: none)"


async def test_a_running_worker_sends_an_order_confirmation_in_four_transactions_on_sqlite_five_on_postgresql(
    deploy: Factory, smtp: SmtpCatcher
) -> None:
    """Light load pays each transaction for one webhook. On SQLite the worker takes the call in the transaction
    that stores it; on PostgreSQL it claims the call (reading it in that same transaction). It claims the step the
    call made due in the transaction that applied the call, and nothing once the step is recorded: the
    confirmation ends its journey and queues nothing more to claim."""
    d = await deploy(role="all", worker="  poll_interval: 1m\n")  # no claim from the timer during the test
    claims: list[str] = []
    transactions: list[object] = []

    def capture(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.startswith("UPDATE jobs SET status=") and "attempts=(jobs.attempts +" in statement:
            claims.append(statement)

    started = "SELECT count(*) FROM jobs WHERE status IN ('pending', 'running') AND occurrence != 'retention'"
    await until(lambda: d.scalar(started) == 0)  # start-up's own work (retention runs a day later)
    await asyncio.sleep(0.2)
    sa.event.listen(d.gateway.db.engine, "before_cursor_execute", capture)
    sa.event.listen(d.gateway.db.engine, "begin", gateways_own(transactions.append))
    response = await d.post_shopify("orders/create", fixture_bytes("shopify/order.json"))
    assert response.status == 200
    await until(lambda: d.scalar("SELECT status FROM deliveries") == "sent")
    await asyncio.sleep(0.3)  # time for a claim the worker would make after recording the send

    assert [m["Subject"] for m in smtp.messages] == ["Order #1042"]
    assert d.scalar("SELECT status FROM enrolments WHERE rule = 'order-confirmation'") == "completed"
    sqlite = d.gateway.db.is_sqlite
    assert len(claims) == (1 if sqlite else 2)
    # The acknowledgement (taking the call, on SQLite), the call's claim (PostgreSQL), applying the call (and claiming
    # its step), preparing the step, recording it.
    assert len(transactions) == (4 if sqlite else 5)
    assert d.rows("SELECT status, attempts FROM jobs WHERE kind = 'inbox'") == [("done", 1)]


async def test_a_running_worker_sends_a_step_due_at_once_after_the_one_before_without_waiting_for_its_timer(
    deploy: Factory, smtp: SmtpCatcher
) -> None:
    """Recording a step that queues the next one, due now, wakes the worker: the timer is a minute away."""
    rules = """\
  - name: order-and-thanks
    when: order.placed
    kind: transactional
    steps:
      - send: {via: email, template: order-confirmation}
      - send: {via: email, template: order-confirmation}
"""
    d = await deploy(rules, role="all", worker="  poll_interval: 1m\n")
    assert (await d.post_shopify("orders/create", fixture_bytes("shopify/order.json"))).status == 200
    await until(lambda: len(smtp.messages) == 2, seconds=5)
    # Recorded once the SMTP server answered: a moment after the message arrived there.
    await until(lambda: d.scalar("SELECT count(*) FROM deliveries WHERE status = 'sent'") == 2)


def gateways_own(listener: Callable[[Any], None]) -> Callable[[Any], None]:
    """`listener`, for the gateway's own transactions: those run in its database threads, the test's in this one."""
    return lambda conn: None if threading.current_thread() is threading.main_thread() else listener(conn)


async def test_a_step_a_call_makes_due_in_two_seconds_goes_out_then_not_at_the_next_poll(
    deploy: Factory, smtp: SmtpCatcher
) -> None:
    """The transaction that applies a call claims what is due now; a step it made due later must still move
    the worker's timer, which is a minute away here."""
    rules = """\
  - name: order-follow-up
    when: order.placed
    kind: transactional
    steps:
      - wait: 2s
        send: {via: email, template: order-confirmation}
"""
    d = await deploy(rules, role="all", worker="  poll_interval: 1m\n")
    assert (await d.post_shopify("orders/create", fixture_bytes("shopify/order.json"))).status == 200
    await until(lambda: d.scalar("SELECT count(*) FROM jobs WHERE kind = 'step' AND status = 'pending'") >= 1)
    d.clock.advance(timedelta(seconds=2))
    await until(lambda: any(m["Subject"] == "Order #1042" for m in smtp.messages), seconds=5)


async def test_a_running_worker_sweeps_the_claims_index_on_postgresql_only(
    deploy: Factory, smtp: SmtpCatcher, monkeypatch: Any
) -> None:
    """Between VACUUMs, the claim's index fills with the entries of jobs since processed; the worker reads them
    in plain index scans every SWEEP_EVERY so that they are marked dead (jobqueue.sweep_claim_index). SQLite
    removes an index entry with its row version: nothing to sweep there."""
    monkeypatch.setattr(jobqueue, "SWEEP_EVERY", 0.05)
    d = await deploy(role="all")
    swept: list[str] = []
    sa.event.listen(
        d.gateway.db.engine,
        "before_cursor_execute",
        lambda _conn, _cursor, statement, *_: swept.append(statement) if "enable_bitmapscan" in statement else None,
    )
    if d.gateway.db.is_sqlite:
        await asyncio.sleep(0.3)
        assert swept == []
    else:
        await until(lambda: len(swept) >= 2)
