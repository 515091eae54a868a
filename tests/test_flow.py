"""The whole path through real HTTP and a real SMTP server: webhook -> rule -> e-mail."""

from __future__ import annotations

import json

from conftest import Deployment, Factory, fixture_bytes
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
