"""`declic backtest` through the real CLI, against a live database filled by real signed webhooks over
several days: the numbers a new rule would have produced, with nothing sent and nothing written."""

from __future__ import annotations

import asyncio
import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from conftest import BASE_CONFIG, DEFAULT_RULES, SECRET, TEMPLATES, Deployment, Factory, fixture_json
from declic_gateway.cli.main import cli
from declic_gateway.http.app import create_app, load
from declic_gateway.http.running import GATEWAY_KEY
from declic_gateway.store import Database
from declic_gateway.store.db import normalize_url
from declic_gateway.store.readonly import snapshot as snapshot_of
from declic_gateway.testing import FakeClock, SmtpCatcher, write_deployment

START, END = "2026-03-15", "2026-03-18"
QUARTER = timedelta(minutes=15)


def checkout(token: str, customer_id: int, email: str, total: str, consent: str | None) -> bytes:
    body = fixture_json("shopify/checkout.json")
    body.update(token=token, email=email, total_price=total, updated_at=None, created_at=None)
    customer = {"id": customer_id, "email": email, "first_name": email.split("@")[0].title()}
    if consent:
        customer["email_marketing_consent"] = {"state": consent, "consent_updated_at": "2026-03-01T08:00:00Z"}
    body["customer"] = customer
    return json.dumps(body).encode()


def customer(customer_id: int, email: str, consent: str, stated_at: str) -> bytes:
    body = fixture_json("shopify/customer.json")
    body.update(id=customer_id, email=email, first_name="Xavier")
    body["email_marketing_consent"] = {"state": consent, "consent_updated_at": stated_at}
    return json.dumps(body).encode()


def order(token: str, customer_id: int, email: str) -> bytes:
    body = fixture_json("shopify/order.json")
    body.update(id=customer_id * 10, checkout_token=token, email=email, created_at=None)
    body["customer"] = {"id": customer_id, "email": email, "first_name": "Anna"}
    return json.dumps(body).encode()


async def fill(d: Deployment, smtp: SmtpCatcher) -> None:
    """Four days of a shop, 2026-03-14 08:00 to 03-19 08:00 UTC, through signed webhooks."""
    post = d.post_shopify

    async def wait(**delta: float) -> None:
        """The worker runs each quarter of an hour, as a live one would, not once at the end."""
        for _ in range(int(timedelta(**delta) / QUARTER)):
            await d.advance(minutes=15)

    # Before the period: Xavier subscribes, Yann leaves a cart.
    await post("customers/create", customer(11, "xavier@example.org", "subscribed", "2026-03-14T08:00:00Z"))
    await wait(hours=1)
    await post("checkouts/create", checkout("y", 12, "yann@example.org", "30.00", "subscribed"))
    await wait(hours=23)  # 2026-03-15 08:00: the period started at 00:00
    await unsubscribe(d, smtp, "yann@example.org")  # by the link in the reminder he got: a call to Declic
    await wait(hours=1)
    await post("checkouts/create", checkout("a", 13, "anna@example.org", "59.90", "subscribed"))
    await wait(minutes=90)
    await post("checkouts/create", checkout("b", 14, "basile@example.org", "15.00", "subscribed"))
    await wait(minutes=30)
    await post("checkouts/create", checkout("c", 15, "chloe@example.org", "80.00", "not_subscribed"))
    await wait(minutes=45)
    # Anna, who joined during the period, unsubscribes: the replay must find her under another id.
    await unsubscribe(d, smtp, "anna@example.org")
    await wait(minutes=15)
    # Xavier's cart says nothing of consent: his, as of the period's start, is the one he gave on the 14th.
    await post("checkouts/create", checkout("x", 11, "xavier@example.org", "45.00", None))
    await wait(minutes=30)
    await post("orders/create", order("a", 13, "anna@example.org"))  # 12:30: ends Anna's reminders
    await wait(minutes=90)
    await post("checkouts/create", checkout("y2", 12, "yann@example.org", "35.00", None))  # 14:00
    await wait(hours=1)
    await post("checkouts/create", checkout("a2", 13, "anna@example.org", "25.00", None))
    await wait(hours=67)  # 2026-03-18 10:00, after the period
    await post("customers/update", customer(11, "xavier@example.org", "unsubscribed", "2026-03-18T10:00:00Z"))
    await wait(days=1)


async def unsubscribe(d: Deployment, smtp: SmtpCatcher, email: str) -> None:
    [link] = [str(m["List-Unsubscribe"]).strip()[1:-1] for m in smtp.messages if m["To"] == email]
    assert (await d.client.post(urlsplit(link).path, data={"List-Unsubscribe": "One-Click"})).status == 200


def snapshot(db_url: str) -> dict[str, Any]:
    """Every row of every table, and for SQLite the bytes of the database and its write-ahead log."""
    engine = sa.create_engine(normalize_url(db_url))
    try:
        with engine.connect() as conn:
            tables = sa.inspect(conn).get_table_names()
            rows = {t: sorted(map(repr, conn.execute(sa.text(f'SELECT * FROM "{t}"')))) for t in tables}
    finally:
        engine.dispose()
    if db_url.startswith("sqlite"):
        path = Path(db_url.removeprefix("sqlite:///"))
        for file in (path, path.with_name(path.name + "-wal")):
            rows[file.name] = hashlib.sha256(file.read_bytes()).hexdigest() if file.exists() else None
    return rows


def new_config(folder: Path, db_url: str, smtp: SmtpCatcher, threshold: int, policies: str = "") -> Path:
    folder.mkdir()
    rules = DEFAULT_RULES.replace("total_price > 20", f"total_price > {threshold}")
    text = BASE_CONFIG.format(db_url=db_url, secret=SECRET, smtp_port=smtp.port, rules=rules, max_attempts=5, worker="")
    text = text.replace("  consent: {email: required}\n", "  consent: {email: required}\n" + policies)
    assert policies in text
    return write_deployment(folder, text, TEMPLATES)


def readme_example() -> str:
    """The output shown in the README's `declic backtest` section."""
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    command = f"declic backtest --config config/new.yaml --from {START} --to {END}\n```\n\n```text\n"
    return readme.split(command)[1].split("```")[0]


async def run_cli(*args: str) -> Any:
    # The command runs its own event loop: in a thread, as it would in its own process.
    return await asyncio.to_thread(CliRunner().invoke, cli, list(args), catch_exceptions=False)


async def test_backtest_counts_a_new_threshold_and_touches_nothing(
    deploy: Factory, smtp: SmtpCatcher, db_url: str, tmp_path: Path
) -> None:
    d = await deploy()
    await fill(d, smtp)
    live_mail = len(smtp.messages)
    assert live_mail == 6  # welcome, Yann, Anna, Anna's order, Xavier x2; Chloe and unsubscribed Yann not
    before = snapshot(db_url)

    # The README's example: a lower threshold, and at most one marketing message per 2 days.
    lower = new_config(tmp_path / "lower", db_url, smtp, threshold=10, policies="  pressure: {max: 1, per: 2d}\n")
    result = await run_cli("backtest", "--config", str(lower), "--from", START, "--to", END, "--format", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # warnings, if any, go to stderr
    rules = {rule["rule"]: rule for rule in report.pop("rules")}
    assert report == {
        "from": "2026-03-15T00:00:00Z",
        "to": "2026-03-18T00:00:00Z",
        "contacts": 2,  # Xavier and Yann existed then
        "calls": 9,
        "unprocessed": {},
        "recorded_messages": 5,
    }
    assert rules["abandoned-cart"] == {
        "rule": "abandoned-cart",
        "entered": 6,  # Basile's 15.00 too
        "sent": {"1": 3, "2": 1},  # Anna once (her order ends it), Basile twice, Xavier once
        "held_out": {},
        "not_entered": {},
        # Chloe never subscribed; Yann's and Anna's unsubscribes, replayed, hold for their second carts.
        "suppressed": {"no email consent (state: withdrawn)": 4, "no email consent (state: none)": 2},
        # Xavier's welcome on the 14th (sent before the period) holds his first reminder to the 16th
        # and his second past the period's end; Basile's second waits a day.
        "deferred": {"marketing pressure": 3},
        "failed": {},
        "exited": 1,
        "goals": 0,
        "waiting": 1,
    }
    assert rules["order-confirmation"]["sent"] == {"1": 1}
    assert rules["welcome"]["entered"] == 0  # Xavier joined before the period

    result = await run_cli("backtest", "--config", str(lower), "--from", START, "--to", END)
    assert result.exit_code == 0, result.output
    assert result.stdout == readme_example()

    # The rule as it runs live, for comparison: Basile's cart stays out, and says why.
    same = new_config(tmp_path / "same", db_url, smtp, threshold=20)
    result = await run_cli("backtest", "--config", str(same), "--from", START, "--to", END)
    assert result.exit_code == 0, result.output
    text = result.stdout
    cart = text.split("\nabandoned-cart\n")[1].split("\n\n")[0]
    assert cart.splitlines() == [
        "  entered      5",
        "  sent         step 1: 2, step 2: 1",
        "  not entered  1",
        "               1  if false: event.properties.total_price > 20",
        "  suppressed   6",
        "               4  no email consent (state: withdrawn)",
        "               2  no email consent (state: none)",
        "  exited 1",
    ]

    assert len(smtp.messages) == live_mail
    assert snapshot(db_url) == before


async def test_the_live_database_is_read_in_a_transaction_that_refuses_writes(db_url: str) -> None:
    database = Database(db_url)
    database.upgrade()
    database.close()
    with snapshot_of(db_url) as live, pytest.raises(sa.exc.DBAPIError, match=r"(?i)read.?only"):
        live.execute(sa.text("INSERT INTO meta (key, value) VALUES ('k', 'v')"))
    with snapshot_of(db_url) as live:
        assert live.execute(sa.text("SELECT count(*) FROM meta")).scalar() == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--from", "2026-03-18", "--to", "2026-03-15"], "Invalid value for --to: must be after --from"),
        (["--from", "2026-03-15"], "Missing option '--to'"),
        (["--from", "2026-03-15", "--to", "2026-03-18", "--database", "sqlite:///nowhere.db"], "no SQLite database"),
        (["--from", "yesterday", "--to", "2026-03-18"], "Invalid value for '--from'"),
    ],
)
def test_bad_arguments_say_what_is_wrong(tmp_path: Path, smtp: SmtpCatcher, args: list[str], message: str) -> None:
    config = new_config(tmp_path / "new", f"sqlite:///{tmp_path}/live.db", smtp, threshold=10)
    result = CliRunner().invoke(cli, ["backtest", "--config", str(config), *args])
    assert result.exit_code == 2 and message in result.output, result.output


DOUBLE_OPT_IN = """\
public_url: https://hooks.example.com
storage: {{url: '{db_url}'}}
sources:
  shop: {{plugin: shopify, secret: {secret}}}
sinks:
  email: {{plugin: smtp, host: 127.0.0.1, port: {smtp_port}, tls: none, sender: "Boutique <shop@example.com>"}}
policies:
  consent: {{email: double_opt_in}}
  confirmation: {{via: email, template: confirm}}
rules:
{rules}"""
CONFIRM_TEMPLATES = {**TEMPLATES, "confirm.subject.j2": "Please confirm", "confirm.txt.j2": "{{ confirm_url }}"}


async def test_a_grant_awaiting_confirmation_at_the_start_is_pending_until_the_replayed_confirmation(
    aiohttp_client: Any, tmp_path: Path, db_url: str, smtp: SmtpCatcher
) -> None:
    text = DOUBLE_OPT_IN.format(db_url=db_url, secret=SECRET, smtp_port=smtp.port, rules=DEFAULT_RULES)
    settings, pm, _ = load(str(write_deployment(tmp_path, text, CONFIRM_TEMPLATES)))
    app = create_app(settings, pm=pm, clock=FakeClock(datetime(2026, 3, 14, 8, 0, tzinfo=UTC)), role="web")
    d = Deployment(await aiohttp_client(app), app[GATEWAY_KEY], app[GATEWAY_KEY].clock, tmp_path)  # type: ignore[arg-type]
    await d.post_shopify("customers/create", customer(11, "xavier@example.org", "subscribed", "2026-03-14T08:00:00Z"))
    await d.advance(minutes=1)
    await d.advance(hours=24, minutes=59)  # 2026-03-15 09:00: Xavier has not confirmed yet
    await d.post_shopify("checkouts/create", checkout("x1", 11, "xavier@example.org", "45.00", None))
    await d.advance(hours=3)
    [confirmation] = [m for m in smtp.messages if m["Subject"] == "Please confirm"]
    path = urlsplit(confirmation.get_content().strip()).path
    assert (await d.client.post(path)).status == 200  # 12:00: confirmed
    await d.advance(hours=1)
    await d.post_shopify("checkouts/create", checkout("x2", 11, "xavier@example.org", "45.00", None))
    await d.advance(hours=2)
    assert [m["Subject"] for m in smtp.messages] == ["Please confirm", "Your cart, Xavier"]
    before = snapshot(db_url)

    config = write_deployment(tmp_path / "new", text, CONFIRM_TEMPLATES)
    result = await run_cli(
        "backtest", "--config", str(config), "--from", START, "--to", "2026-03-16", "--format", "json"
    )
    assert result.exit_code == 0, result.output
    [cart] = [rule for rule in json.loads(result.stdout)["rules"] if rule["rule"] == "abandoned-cart"]
    assert (cart["entered"], cart["sent"]) == (2, {"1": 1})
    assert cart["suppressed"] == {"no email consent (state: pending)": 1}
    assert len(smtp.messages) == 2
    assert snapshot(db_url) == before


HISTORY_RULES = """\
  - name: win-back
    inactive_for: 5d
    repeat_every: 2d
    max_times: 3
    of: [order.placed]
    kind: transactional
    send: {via: email, template: welcome}
  - name: second-order
    when: order.placed
    if: "contact.count('order.placed') >= 2"
    kind: transactional
    send: {via: email, template: welcome}
"""


def nth_order(order_id: int, customer_id: int, email: str) -> bytes:
    body = fixture_json("shopify/order.json")
    body.update(id=order_id, name=f"#{order_id}", checkout_token=None, email=email, created_at=None)
    body["customer"] = {"id": customer_id, "email": email, "first_name": email.split("@")[0].title()}
    return json.dumps(body).encode()


async def test_history_before_the_period_counts_for_inactivity_and_conditions(
    deploy: Factory, smtp: SmtpCatcher, db_url: str, tmp_path: Path
) -> None:
    """Olga and Paul ordered before the period, Paul and Quentin order during it. Replayed under a win-back
    rule (5 days without an order, then every 2 days, 3 times in all) and a second-order rule, the
    backtest sees the orders from before the period as the live deployment would have: Olga's firings
    in the period are her 2nd and 3rd (the 1st fell before it), Paul's order in the period is his third."""
    d = await deploy()
    await d.post_shopify("orders/create", nth_order(1, 21, "olga@example.org"))  # 2026-03-14 08:00
    await d.post_shopify("orders/create", nth_order(2, 22, "paul@example.org"))
    await d.advance(days=3)
    await d.post_shopify("orders/create", nth_order(3, 22, "paul@example.org"))  # 03-17 08:00
    await d.advance(days=4)
    await d.post_shopify("orders/create", nth_order(4, 22, "paul@example.org"))  # 03-21 08:00
    await d.post_shopify("orders/create", nth_order(5, 23, "quentin@example.org"))
    await d.advance(days=6)
    before = snapshot(db_url)

    folder = tmp_path / "history"
    folder.mkdir()
    text = BASE_CONFIG.format(
        db_url=db_url,
        secret=SECRET,
        smtp_port=smtp.port,
        rules=DEFAULT_RULES + HISTORY_RULES,
        max_attempts=5,
        worker="",
    )
    config = write_deployment(folder, text, TEMPLATES)
    result = await run_cli(
        "backtest", "--config", str(config), "--from", "2026-03-20", "--to", "2026-03-26", "--format", "json"
    )
    assert result.exit_code == 0, result.output
    rules = {rule["rule"]: rule for rule in json.loads(result.stdout)["rules"]}
    # Olga: 03-21 and 03-23 (03-19 was before the period). Paul: his 03-17 order's firing on 03-22 was
    # called off by his 03-21 order, whose own comes on 03-26, after the period. Quentin: 03-26 too.
    assert (rules["win-back"]["entered"], rules["win-back"]["sent"]) == (2, {"1": 2})
    assert rules["second-order"]["entered"] == 1  # Paul; Quentin's first order is not a second one
    assert rules["second-order"]["not_entered"] == {"if false: contact.count('order.placed') >= 2": 1}
    assert snapshot(db_url) == before
