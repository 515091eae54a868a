"""`declic preview` and `declic send-test`: a rule's message as a customer would get it, seen first by the team.

Real Shopify webhooks over HTTP into the running app, the real CLI on the same database (SQLite and
PostgreSQL), and a real SMTP server for what is sent."""

from __future__ import annotations

import asyncio
import functools
import json
import re
from email.message import EmailMessage
from pathlib import Path

from click.testing import CliRunner

from conftest import BASE_CONFIG, DEFAULT_RULES, TEMPLATES, Deployment, Factory, fixture_json
from declic_gateway.cli import logs
from declic_gateway.cli.main import cli
from declic_gateway.testing import SmtpCatcher, write_deployment

CAMILLE = "camille.durand@example.org"
TESTERS = "test_recipients: [qa@example.com, '+33 6 12 34 56 78']\n"
#: The tokens of links (unsubscribe, click, open): they differ from one message to the next.
TOKEN = re.compile(r"/(u|t/c|t/o)/[A-Za-z0-9_-]+")


async def declic(d: Deployment, *args: str) -> tuple[int, str, str]:
    """The real command, in a thread of its own: it runs its own event loop, as it does from a shell."""
    invoke = functools.partial(CliRunner().invoke, cli, [*args, "--config", str(d.path)], catch_exceptions=False)
    try:
        result = await asyncio.to_thread(invoke)
    finally:
        logs.reset()  # the command configured logging for the whole process
    return result.exit_code, result.stdout, result.stderr


async def start_cart(d: Deployment, total: str = "59.90") -> None:
    body = fixture_json("shopify/checkout.json")
    body["total_price"] = total
    assert (await d.post_shopify("checkouts/create", json.dumps(body).encode(), "c1")).status == 200
    await d.advance(seconds=1)  # the call is processed: Camille is a contact, enrolled in abandoned-cart


def headers_of(preview: str) -> dict[str, str]:
    head = preview.split("\n\n", 1)[0]
    unfolded = re.sub(r"\n[ \t]+", " ", head)
    return dict(line.split(": ", 1) for line in unfolded.splitlines())


def untokened(text: str) -> str:
    return TOKEN.sub(r"/\1/TOKEN", text)


async def test_the_preview_is_what_the_worker_then_sends(deploy: Factory, smtp: SmtpCatcher, tmp_path: Path) -> None:
    d = await deploy()
    await start_cart(d)
    page = tmp_path / "cart.html"
    code, shown, err = await declic(d, "preview", "abandoned-cart", "--contact", CAMILLE, "--html", str(page))
    assert code == 0, err
    assert err == ""  # nothing holds the message back: Camille agreed to marketing e-mail
    assert smtp.messages == []  # a preview sends nothing

    await d.advance(hours=1, seconds=1)  # the real reminder goes out
    [sent] = smtp.messages
    headers = headers_of(shown)
    for name in ("From", "To", "Subject", "List-Unsubscribe-Post", "MIME-Version"):
        assert headers[name] == sent[name], name
    assert untokened(headers["List-Unsubscribe"]) == untokened(sent["List-Unsubscribe"])
    assert headers["List-Unsubscribe"] != sent["List-Unsubscribe"]  # its own throwaway key, see below
    assert isinstance(sent, EmailMessage)
    text = sent.get_body(("plain",))
    html = sent.get_body(("html",))
    assert text is not None and html is not None
    assert f"----- text/plain -----\n{text.get_content().rstrip()}\n" in shown
    assert untokened(page.read_text()) == untokened(html.get_content().strip())
    assert "/t/o/" in page.read_text()  # the open pixel, as the worker adds it

    # Clicking the preview's unsubscribe link changes nothing: the deployment refuses its key.
    link = re.search(r"<https://hooks\.example\.com(/u/[^>]+)>", headers["List-Unsubscribe"])
    assert link is not None
    assert (await d.client.post(link[1], data={"List-Unsubscribe": "One-Click"})).status == 404
    assert d.scalar("SELECT count(*) FROM consents WHERE state = 'withdrawn'") == 0
    # And the preview left no trace: no stand-in event, no delivery beyond the real one.
    assert d.scalar("SELECT count(*) FROM deliveries") == 1
    assert d.scalar("SELECT count(*) FROM events") == 1


async def test_preview_of_a_sample_event_needs_no_stored_contact(deploy: Factory, tmp_path: Path) -> None:
    d = await deploy()
    sample = tmp_path / "cart.yaml"
    sample.write_text(
        "type: checkout.started\n"
        "contact: {email: lea@example.org, first_name: Léa, consent: {email: granted}}\n"
        "correlation: checkout:sample\n"
        "properties: {total_price: '42.50', currency: EUR, recovery_url: 'https://shop.example/r/1',"
        " line_items: [{title: Écharpe}]}\n",
        encoding="utf-8",
    )
    code, shown, err = await declic(d, "preview", "abandoned-cart", "--step", "2", "--event", str(sample))
    assert code == 0, err
    headers = headers_of(shown)
    assert (headers["To"], headers["Subject"]) == (
        "lea@example.org",
        "=?utf-8?b?WW91ciBjYXJ0LCBMw6lh?=",
    )  # "Your cart, Léa", on the wire
    assert "Total 42.50 EUR: https://shop.example/r/1" in shown
    assert "<p>Hello Léa, Écharpe</p>" in shown  # parts decoded, to be read
    assert d.scalar("SELECT count(*) FROM contacts") == 0  # the deployment's database is not touched


async def test_preview_says_what_it_cannot_do(deploy: Factory, tmp_path: Path) -> None:
    d = await deploy()
    await start_cart(d, total="12.00")  # below the rule's threshold: no journey, but the event is stored
    code, shown, err = await declic(d, "preview", "abandoned-cart", "--contact", "1", "--variant", "b")
    assert (code, err.strip().splitlines()[-1]) == (1, "Error: rule abandoned-cart step 1 has no variants")
    code, _, err = await declic(d, "preview", "abandoned-cart", "--contact", "#1", "--step", "3")
    assert (code, err.strip()) == (1, "Error: rule abandoned-cart has 2 step(s), not a step 3")
    code, _, err = await declic(d, "preview", "welcome", "--contact", CAMILLE)
    assert code == 1 and "has no customer.created event and no journey in welcome" in err
    code, _, err = await declic(d, "preview", "nope", "--contact", CAMILLE)
    assert code == 2 and "no rule named nope (rules: abandoned-cart, order-confirmation, welcome)" in err
    code, _, err = await declic(d, "preview", "welcome")
    assert code == 2 and "give exactly one of --contact or --event" in err
    code, _, err = await declic(d, "preview", "welcome", "--contact", "nobody@example.org")
    assert (code, err.strip()) == (1, "Error: no contact is known as nobody@example.org")
    # Not in the journey (if false), but previewable from the event it would have entered with.
    code, shown, err = await declic(d, "preview", "abandoned-cart", "--contact", CAMILLE)
    assert code == 0, err
    assert "Total 12.00 EUR" in shown


async def test_preview_of_a_date_an_event_carries_is_what_is_sent_that_day(deploy: Factory, smtp: SmtpCatcher) -> None:
    """A date rule on an event property: the preview finds the contact's coming date among her events."""
    rules = (
        "  - {name: follow-up, on_date: event.properties.completed_at, of: checkout.started, at: '10:00',"
        " send: {via: email, template: cart-reminder}}\n"
    )
    d = await deploy(rules)
    # `declic preview` reads the real time (the deployment's clock is fake): a date years ahead is to come for both.
    body = fixture_json("shopify/checkout.json") | {"completed_at": "2036-03-20T15:00:00+01:00"}
    assert (await d.post_shopify("checkouts/create", json.dumps(body).encode(), "c1")).status == 200
    await d.advance(seconds=1)
    code, shown, err = await declic(d, "preview", "follow-up", "--contact", CAMILLE)
    assert code == 0, err
    assert smtp.messages == []
    await d.advance(days=3659, hours=1)  # 20 March 2036, 10:00 in Paris (09:00 UTC) has passed
    [sent] = smtp.messages
    assert headers_of(shown)["Subject"] == sent["Subject"]
    text = sent.get_body(("plain",))
    assert text is not None and text.get_content().rstrip() in shown  # the checkout's total, from the event
    assert d.scalar("SELECT count(*) FROM events WHERE type = 'date.reached'") == 1  # the preview stored none


VARIANT_RULES = """\
  - name: abandoned-cart
    when: checkout.started
    steps:
      - wait: 1h
        send:
          via: email
          variants:
            - {name: plain, template: cart-reminder}
            - {name: warm, template: cart-warm}
"""


async def test_preview_shows_the_variant_asked_for_or_the_one_the_contact_would_get(
    deploy: Factory, smtp: SmtpCatcher
) -> None:
    templates = TEMPLATES | {
        "cart-warm.subject.j2": "Still thinking, {{ contact.first_name }}?",
        "cart-warm.txt.j2": "x",
    }
    d = await deploy(VARIANT_RULES, templates=templates)
    await start_cart(d)
    subjects = {}
    for variant in ("plain", "warm"):
        code, shown, err = await declic(d, "preview", "abandoned-cart", "--contact", CAMILLE, "--variant", variant)
        assert code == 0, err
        subjects[variant] = headers_of(shown)["Subject"]
    assert subjects == {"plain": "Your cart, Camille", "warm": "Still thinking, Camille?"}
    code, _, err = await declic(d, "preview", "abandoned-cart", "--contact", CAMILLE, "--variant", "cold")
    assert code == 1 and "cold" in err
    # Without --variant: the variant the worker then sends her.
    code, shown, err = await declic(d, "preview", "abandoned-cart", "--contact", CAMILLE)
    assert code == 0, err
    await d.advance(hours=1, seconds=1)
    [mail] = smtp.messages
    assert headers_of(shown)["Subject"] == mail["Subject"]


async def test_preview_notes_when_the_contact_would_not_get_it(deploy: Factory) -> None:
    d = await deploy()
    body = fixture_json("shopify/checkout.json")
    body["customer"]["email_marketing_consent"] = {"state": "unsubscribed", "opt_in_level": "single_opt_in"}
    body.pop("buyer_accepts_marketing", None)
    assert (await d.post_shopify("checkouts/create", json.dumps(body).encode(), "c1")).status == 200
    await d.advance(seconds=1)
    code, shown, err = await declic(d, "preview", "abandoned-cart", "--contact", CAMILLE)
    assert code == 0
    assert headers_of(shown)["To"] == CAMILLE
    assert err.startswith("note: the worker would not send this to the contact now: no email consent")


async def test_send_test_goes_to_an_allowed_address_marked_and_uncounted(deploy: Factory, smtp: SmtpCatcher) -> None:
    d = await deploy(extra=TESTERS)
    await start_cart(d)
    code, _, err = await declic(d, "send-test", "abandoned-cart", "--contact", CAMILLE, "--to", "boss@example.com")
    assert code == 2 and "boss@example.com is not listed under `test_recipients:`" in err
    code, _, err = await declic(d, "send-test", "abandoned-cart", "--contact", CAMILLE, "--to", "+33612345678")
    assert code == 2 and "email sends email: give an e-mail address" in err
    assert smtp.messages == []

    code, out, err = await declic(d, "send-test", "abandoned-cart", "--contact", CAMILLE, "--to", "QA@example.com")
    assert (code, out) == (0, "sent a test of abandoned-cart step 1 through email to qa@example.com\n"), err
    [test] = smtp.messages
    assert (test["To"], test["Subject"], test["X-Declic-Test"]) == ("qa@example.com", "[TEST] Your cart, Camille", "1")
    assert d.scalar("SELECT count(*) FROM deliveries") == 0  # nothing recorded: not in KPIs, not under the cap
    assert d.scalar("SELECT count(*) FROM decisions WHERE action NOT IN ('enrolled')") == 0

    await d.advance(hours=1, seconds=1)  # the real reminder still goes to Camille, once, unmarked
    assert [(m["To"], m["Subject"], m["X-Declic-Test"]) for m in smtp.messages[1:]] == [
        (CAMILLE, "Your cart, Camille", None)
    ]
    assert test["Message-ID"] != smtp.messages[1]["Message-ID"]
    code, out, _ = await declic(d, "kpis", "--rule", "abandoned-cart", "--json", "--since", "2026-03-01")
    assert code == 0
    assert json.loads(out)["steps"][0]["sent"] == 1


def test_test_recipients_must_be_addresses(tmp_path: Path) -> None:
    config = BASE_CONFIG.format(
        db_url=f"sqlite:///{tmp_path}/d.db", secret="s", smtp_port=25, max_attempts=5, worker="", rules=DEFAULT_RULES
    )
    path = write_deployment(tmp_path, config + "test_recipients: [qa@example.com, not-an-address]\n", TEMPLATES)
    result = CliRunner().invoke(cli, ["check", "--config", str(path)])
    assert result.exit_code == 2
    assert re.search(
        r"declic\.yaml:\d+:\d+: test_recipients\[1\]: .*not an e-mail address or a phone number", result.stderr
    ), result.stderr
