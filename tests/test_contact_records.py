"""`declic contacts`: why a contact got a message or did not, their whole record, and an erasure
that sticks. Real Shopify webhooks over HTTP, a real SMTP server, SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from click.testing import CliRunner

from conftest import Deployment, Factory, fixture_json
from declic_gateway.cli.main import cli
from declic_gateway.insight import rendered
from declic_gateway.kit.sinks import Message
from declic_gateway.store import Database
from declic_gateway.testing import SmtpCatcher

CAMILLE = "camille.durand@example.org"


def declic(d: Deployment, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["contacts", *args, "--config", str(d.path)], catch_exceptions=False)
    return result.exit_code, result.output


def timeline(d: Deployment, who: str) -> list[dict[str, Any]]:
    code, output = declic(d, "timeline", who)
    assert code == 0, output
    return [json.loads(line) for line in output.splitlines()]


def cart(total: str, token: str) -> bytes:
    body = fixture_json("shopify/checkout.json")
    body.update(total_price=total, token=token)
    return json.dumps(body).encode()


async def test_the_timeline_says_why_a_cart_below_the_threshold_got_no_reminder(
    deploy: Factory, smtp: SmtpCatcher
) -> None:
    d = await deploy(extra="phone_region: FR\n")
    assert (await d.post_shopify("checkouts/create", cart("12.00", "small"), "c1")).status == 200
    assert (await d.post_shopify("checkouts/create", cart("59.90", "big"), "c2")).status == 200
    await d.advance(hours=1, seconds=1)
    entries = timeline(d, CAMILLE)
    assert [(e["what"], e.get("type") or e.get("action") or e.get("channel")) for e in entries] == [
        ("event", "checkout.started"),
        ("consent", "email"),  # the customer's snapshot in the checkout, both channels
        ("consent", "sms"),
        ("decision", "not_enrolled"),
        ("event", "checkout.started"),
        ("consent", "email"),
        ("consent", "sms"),
        ("decision", "enrolled"),
        ("decision", "send"),
        ("message", None),
    ]
    ruled_out = entries[3]
    assert ruled_out["rule"] == "abandoned-cart"
    assert ruled_out["reason"] == "if false: event.properties.total_price > 20"
    [mail] = smtp.messages
    assert str(mail["To"]) == CAMILLE
    # The message as it was rendered and sent: what she received, word for word.
    sent = entries[-1]
    assert (sent["rule"], sent["step"], sent["via"], sent["to"]) == ("abandoned-cart", 1, "email", CAMILLE)
    assert sent["subject"] == mail["Subject"] == "Your cart, Camille"
    assert sent["text"] == mail.get_body(("plain",)).get_content().rstrip("\r\n")
    assert sent["text"].startswith("Total 59.90 EUR: ")
    assert "Camille" in sent["html"] and sent["headers"]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert timeline(d, "shopify:5550001") == entries  # the same person, by Shopify's id
    assert timeline(d, "06 12 34 56 78") == entries  # and by her number as people write it in France
    assert declic(d, "timeline", "nobody@example.org") == (1, "no contact is known as nobody@example.org\n")


async def test_export_gives_the_whole_record_and_erasure_sticks(deploy: Factory, smtp: SmtpCatcher) -> None:
    d = await deploy()
    order = fixture_json("shopify/order.json")
    assert (await d.post_shopify("orders/create", json.dumps(order).encode(), "o1")).status == 200
    await d.advance(seconds=1)
    code, output = declic(d, "export", CAMILLE)
    assert code == 0, output
    record = json.loads(output)
    assert record["contact"]["email"] == CAMILLE and record["contact"]["first_name"] == "Camille"
    assert {"kind": "shopify", "value": "5550001"} in record["identities"]
    [consent] = record["consent_ledger"]
    assert (consent["channel"], consent["state"], consent["source"]) == ("email", "granted", "shop")
    assert consent["evidence"]["inbox_id"] == 1  # what shows it: the stored webhook
    assert [e["type"] for e in record["events"]] == ["order.placed"]
    assert [(m["rule"], m["status"]) for m in record["messages"]] == [("order-confirmation", "sent")]
    assert {row["action"] for row in record["decisions"]} == {"enrolled", "send"}
    [as_sent] = record["messages_as_sent"]
    assert as_sent["delivery_key"] == record["messages"][0]["idempotency_key"]
    assert (as_sent["to"], as_sent["subject"]) == (CAMILLE, f"Order {order['name']}")

    assert declic(d, "erase", CAMILLE, "--yes") == (0, "erased contact #1\n")
    assert declic(d, "export", CAMILLE)[0] == 1  # nothing is known by that address any more
    code, output = declic(d, "export", "#1")
    erased = json.loads(output)
    assert erased["contact"]["email"] is None and erased["contact"]["email_status"] == "erased"
    assert erased["identities"] == [] and CAMILLE not in output and "Camille" not in output
    assert erased["messages_as_sent"] == []  # the copy of what she was sent went with her

    # The same customer orders again: a new contact, no history, no old consent; the confirmation goes out.
    order.update(id=order["id"] + 1, name="#1002")
    order["customer"] = {**order["customer"], "email_marketing_consent": None}
    assert (await d.post_shopify("orders/create", json.dumps(order).encode(), "o2")).status == 200
    await d.advance(seconds=1)
    again = json.loads(declic(d, "export", CAMILLE)[1])
    assert again["contact"]["id"] == 2 and again["contact"]["consent"] == {}
    assert [e["type"] for e in again["events"]] == ["order.placed"] and again["consent_ledger"] == []
    assert [str(m["To"]) for m in smtp.messages] == [CAMILLE, CAMILLE]


async def test_a_deployment_can_keep_no_copy_of_what_it_sent(deploy: Factory, smtp: SmtpCatcher) -> None:
    d = await deploy(storage="  keep_rendered: false\n")
    order = fixture_json("shopify/order.json")
    assert (await d.post_shopify("orders/create", json.dumps(order).encode(), "o1")).status == 200
    await d.advance(seconds=1)
    assert len(smtp.messages) == 1
    record = json.loads(declic(d, "export", CAMILLE)[1])
    assert [m["status"] for m in record["messages"]] == ["sent"] and record["messages_as_sent"] == []
    assert "message" not in {entry["what"] for entry in timeline(d, CAMILLE)}


@pytest.mark.parametrize("html_size", [0, 300, 5_000, 200_000])
def test_a_kept_copy_reads_back_exactly_whatever_its_size(db_url: str, html_size: int) -> None:
    """Copies are compressed with a window sized to the message: a one-line mail and a long newsletter
    (with non-ASCII text) both come back as they were sent."""
    database = Database(db_url)
    database.upgrade()
    html = "".join(f"<tr><td>Article n°{n} – {n * 7919 % 1000} €</td></tr>" for n in range(html_size))[:html_size]
    message = Message(to=CAMILLE, subject="Vos nouveautés", text="Bonjour Camille", html=html, headers={"X-A": "1"})
    at = datetime(2026, 12, 5, tzinfo=UTC)
    database.transaction(rendered.keep, "key-1", 7, at, message)
    [copy] = database.transaction(rendered.of_contact, 7).values()
    database.close()
    assert copy == {
        "to": CAMILLE,
        "headers": {"X-A": "1"},
        "subject": "Vos nouveautés",
        "text": "Bonjour Camille",
        "html": html,
    }
