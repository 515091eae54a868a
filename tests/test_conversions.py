"""What a rule earns: conversions within the attribution window, with their revenue, and a
holdout group that is never messaged but counted. Real Shopify webhooks over HTTP, a real
SMTP server, SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from click.testing import CliRunner

from conftest import Deployment, Factory, fixture_json
from declic_gateway.cli.main import cli
from declic_gateway.testing import SmtpCatcher

RULES = """\
  - name: cart
    when: checkout.started
    goal: order.placed
    exit_on: order.placed
    holdout: 50%
    attribution: 3d
    steps:
      - wait: 1h
        send: {via: email, template: cart-reminder}
      - wait: 1d
        send: {via: email, template: cart-reminder}
"""
BUYERS = 40


def buyer(n: int) -> str:
    return f"buyer{n}@example.org"


def checkout(n: int) -> bytes:
    body = fixture_json("shopify/checkout.json")
    customer = {**body["customer"], "id": 9000 + n, "email": buyer(n), "phone": None}
    body.update(id=500 + n, token=f"tok{n}", email=buyer(n), customer=customer)
    return json.dumps(body).encode()


def order(n: int, total: str) -> bytes:
    body = fixture_json("shopify/order.json")
    customer = {**body["customer"], "id": 9000 + n, "email": buyer(n), "phone": None}
    body.update(id=7000 + n, name=f"#{7000 + n}", email=buyer(n), checkout_token=f"tok{n}", total_price=total)
    body["customer"] = customer
    return json.dumps(body).encode()


async def start_carts(d: Deployment, buyers: range) -> None:
    for n in buyers:
        assert (await d.post_shopify("checkouts/create", checkout(n), f"c{n}")).status == 200
    await d.advance(seconds=1)


async def test_held_out_contacts_are_never_messaged_and_their_orders_count_in_their_group(
    deploy: Factory, smtp: SmtpCatcher
) -> None:
    d = await deploy(RULES)
    await start_carts(d, range(BUYERS))
    await d.advance(hours=1, seconds=1)  # step 1 is due
    held = {row.email for row in d.rows(HELD_OUT)}
    messaged = {str(m["To"]) for m in smtp.messages}
    assert held and messaged, "a 50% holdout over 40 contacts splits them"  # probability 2**-39 otherwise
    assert held.isdisjoint(messaged) and held | messaged == {buyer(n) for n in range(BUYERS)}
    steps = Counter(row.action for row in d.rows("SELECT action FROM decisions WHERE step = 1"))
    assert steps == {"send": len(messaged), "held_out": len(held)}

    for n in range(BUYERS):  # everyone orders a day later, within the 3-day window
        assert (await d.post_shopify("orders/create", order(n, f"{n}.50"), f"o{n}")).status == 200
    await d.advance(days=1)
    got = {(row.email, row.held_out, row.step, row.revenue, row.currency) for row in d.rows(CONVERSIONS)}
    assert got == {(buyer(n), buyer(n) in held, 1, n + 0.5, "EUR") for n in range(BUYERS)}
    # The order is the goal and the exit: the journeys ended, step 2 was cancelled for everyone.
    assert d.scalar("SELECT count(*) FROM enrolments WHERE status = 'converted'") == BUYERS
    assert d.scalar("SELECT count(*) FROM jobs WHERE kind = 'step' AND status = 'pending'") == 0
    assert len(smtp.messages) == len(messaged)

    # The same people stay in the same group when they come back.
    for n in range(BUYERS):
        body = checkout(n).replace(b'"tok%d"' % n, b'"again%d"' % n)
        assert (await d.post_shopify("checkouts/create", body, f"again{n}")).status == 200
    await d.advance(hours=2)
    assert {row.email for row in d.rows(HELD_OUT)} == held
    assert {str(m["To"]) for m in smtp.messages} == messaged


async def test_an_order_outside_the_window_or_before_any_message_is_not_a_conversion(
    deploy: Factory, smtp: SmtpCatcher
) -> None:
    d = await deploy(RULES.replace("    holdout: 50%\n", ""))
    await start_carts(d, range(2))
    assert (await d.post_shopify("orders/create", order(0, "10.00"), "o0")).status == 200  # before the reminder
    await d.advance(hours=2)
    await d.advance(days=1, hours=1)  # buyer 1 got both reminders
    await d.advance(days=4)
    assert (await d.post_shopify("orders/create", order(1, "10.00"), "o1")).status == 200
    await d.advance(seconds=1)
    assert [str(m["To"]) for m in smtp.messages] == [buyer(1), buyer(1)]
    assert d.rows(CONVERSIONS) == []
    reasons = [row.reason for row in d.rows("SELECT reason FROM decisions WHERE action = 'goal'")]
    assert reasons == ["goal order.placed: not counted, no message within 3d before"]  # buyer 1's journey is long over


HELD_OUT = "SELECT DISTINCT c.email FROM enrolments e JOIN contacts c ON c.id = e.contact_id WHERE e.held_out"
CONVERSIONS = """
SELECT c.email, v.held_out, v.step, v.revenue, v.currency
FROM conversions v JOIN contacts c ON c.id = v.contact_id ORDER BY v.id
"""


def kpis(d: Deployment, *args: str) -> dict[str, Any]:
    result = CliRunner().invoke(
        cli, ["kpis", "--config", str(d.path), "--rule", "cart", "--json", *args], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    [line] = result.output.splitlines()
    return dict(json.loads(line))


async def test_kpis_show_what_the_rule_earned_against_its_holdout_group(deploy: Factory, smtp: SmtpCatcher) -> None:
    d = await deploy(RULES)
    await start_carts(d, range(BUYERS))
    await d.advance(hours=1, seconds=1)
    held = {row.email for row in d.rows(HELD_OUT)}
    messaged = sorted(n for n in range(BUYERS) if buyer(n) not in held)
    for n in messaged:  # only the reminded buyers come back, each with 10.25 EUR
        assert (await d.post_shopify("orders/create", order(n, "10.25"), f"o{n}")).status == 200
    await d.advance(hours=1)

    got = kpis(d, "--since", "2026-03-01", "--until", "2026-04-01")
    assert got["entered"] == BUYERS
    assert got["messaged"] == {"enrolled": len(messaged), "converted": len(messaged), "rate": 1.0}
    assert got["held_out"] == {"enrolled": len(held), "converted": 0, "rate": 0.0}
    [step] = got["steps"]
    assert (step["step"], step["sent"], step["converted"]) == (1, len(messaged), len(messaged))
    assert step["revenue"] == got["revenue"] == 10.25 * len(messaged)
    assert got["lift"]["difference"] == 1.0 and got["lift"]["relative"] is None  # nothing to divide by
    # Another range sees none of it.
    assert kpis(d, "--since", "2026-04-01", "--until", "2026-05-01")["steps"] == []


def test_lift_interval_is_the_wald_interval_of_the_difference() -> None:
    from declic_gateway.insight.kpis import Group, lift

    found = lift(Group(enrolled=1000, converted=120), Group(enrolled=200, converted=16))
    assert found is not None
    # 0.12 - 0.08 = 0.04; SE = sqrt(0.12*0.88/1000 + 0.08*0.92/200) = 0.021762; 1.96 SE = 0.042654
    assert round(found.difference, 6) == 0.04
    assert (round(found.low, 4), round(found.high, 4)) == (-0.0027, 0.0827)
    assert round(found.relative or 0, 6) == 0.5
    assert lift(Group(10, 1), Group(0, 0)) is None
