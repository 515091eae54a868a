"""Declic's own open pixel and click redirects, through real HTTP and a real SMTP server.

Each test sends a marketing e-mail through the running app to aiosmtpd, reads the message as
received, and fetches its pixel and links over HTTP as a person (or a machine) would.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from selectolax.lexbor import LexborHTMLParser

from conftest import BASE_CONFIG, SECRET, TEMPLATES, Deployment, fixture_bytes, locked, locked_inbox
from declic_gateway.http.app import create_app, load
from declic_gateway.http.running import GATEWAY_KEY
from declic_gateway.insight.kpis import rule_kpis
from declic_gateway.send import links
from declic_gateway.send.tracking import PIXEL_GIF
from declic_gateway.testing import FakeClock, SmtpCatcher, write_deployment

CUSTOMER = fixture_bytes("shopify/customer.json")  # customers/create, e-mail consent granted: welcome
ORDER = fixture_bytes("shopify/order.json")  # orders/create: order confirmation (transactional)
SHOP = "https://shop.example.com"
BROWSER = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36"

WELCOME_HTML = f"""<!doctype html><html><body>
<p>Hello {{{{ contact.first_name }}}},</p>
<p><a href="{SHOP}/new?utm_source=declic&amp;ref=welcome">New arrivals</a>
<a href="{SHOP}/sale">Sale</a> <a href="mailto:help@example.com">Write to us</a>
<a href="#top">Top</a></p>
<!-- <a href="https://commented.example.com/">not a link</a> -->
<p><a href="{{{{ unsubscribe_url }}}}">Unsubscribe</a></p>
</body></html>"""
TRACKED_TEMPLATES = {
    **TEMPLATES,
    "welcome.html.j2": WELCOME_HTML,
    "welcome.txt.j2": f"Hello {{{{ contact.first_name }}}}, see {SHOP}/new",
    "order-confirmation.html.j2": f'<p>Order {{{{ event.properties.name }}}}: <a href="{SHOP}/orders">track</a></p>',
    "receipt.subject.j2": "Receipt",
    "receipt.txt.j2": "Receipt",
    "receipt.html.j2": f'<p>Receipt: <a href="{SHOP}/orders">track</a></p>',
    "nudge.subject.j2": "Did you see?",
    "nudge.txt.j2": "Did you see our news?",
}
RULES = """\
  - name: welcome
    when: customer.created
    steps:
      - send: {via: email, template: welcome}
      - wait: 1d
        if: "not contact.opened(rule='welcome', step=1)"
        send: {via: email, template: nudge}
  - name: order-confirmation
    when: order.placed
    kind: transactional
    send: {via: email, template: order-confirmation}
  - name: receipt
    when: order.placed
    kind: transactional
    track: {clicks: true}
    send: {via: email, template: receipt}
  - name: clicked-follow-up
    when: email.clicked
    send: {via: email, template: nudge}
"""
START = datetime(2026, 3, 14, 8, 0, tzinfo=UTC)


@pytest.fixture
async def start(aiohttp_client: Any, tmp_path: Any, db_url: str, smtp: SmtpCatcher) -> Any:
    async def start(rules: str = RULES, sink: str = "", extra: str = "") -> Deployment:
        config = BASE_CONFIG.format(
            db_url=db_url, secret=SECRET, smtp_port=smtp.port, rules=rules, max_attempts=3, worker=""
        )
        config = config.replace("    timeout: 5\n", "    timeout: 5\n" + sink) + extra
        path = write_deployment(tmp_path, config, TRACKED_TEMPLATES)
        settings, pm, _ = load(str(path))
        clock = FakeClock(START)
        app = create_app(settings, pm=pm, clock=clock, role="web")
        return Deployment(await aiohttp_client(app), app[GATEWAY_KEY], clock, path)

    return start


async def welcome(start: Any, smtp: SmtpCatcher, **options: str) -> tuple[Deployment, EmailMessage]:
    d: Deployment = await start(**options)
    assert (await d.post_shopify("customers/create", CUSTOMER)).status == 200
    await d.advance(seconds=1)
    [mail] = smtp.messages
    return d, mail


def html_of(mail: EmailMessage) -> str:
    part = mail.get_body(("html",))
    assert part is not None
    return str(part.get_content())


def text_of(mail: EmailMessage) -> str:
    part = mail.get_body(("plain",))
    assert part is not None
    return str(part.get_content())


def hrefs(mail: EmailMessage) -> list[str]:
    return [a.attributes["href"] or "" for a in LexborHTMLParser(html_of(mail)).css("a[href]")]


def pixels(mail: EmailMessage) -> list[str]:
    return [
        img.attributes["src"] or ""
        for img in LexborHTMLParser(html_of(mail)).css("img")
        if "/t/o/" in str(img.attributes.get("src"))
    ]


def path_of(url: str) -> str:
    """Links point at public_url (https://hooks.example.com); the test server is that deployment."""
    assert url.startswith("https://hooks.example.com/"), url
    return urlsplit(url).path


async def fetch(client: TestClient, url: str, agent: str = BROWSER, method: str = "GET", **headers: str) -> Any:
    return await client.request(method, path_of(url), headers={"User-Agent": agent, **headers}, allow_redirects=False)


def events(d: Deployment, kind: str) -> list[dict[str, Any]]:
    rows = d.rows("SELECT properties FROM events WHERE type = :kind ORDER BY id", kind=kind)
    return [json.loads(properties) for (properties,) in rows]


async def funnel(d: Any, rule: str) -> list[tuple[int, int, int, int]]:
    """(step, sent, opened, clicked) as `declic kpis` and the dashboard count them, over the last day."""
    now = d.clock.now()
    [kpis] = await d.gateway.db.run(rule_kpis, [rule], now - timedelta(days=1), now + timedelta(minutes=1))
    return [(s.step, s.sent, s.opened, s.clicked) for s in kpis.steps]


async def test_a_persons_open_and_click_show_up_as_one_human_open_and_one_click(start: Any, smtp: SmtpCatcher) -> None:
    d, mail = await welcome(start, smtp)
    links_in_mail = hrefs(mail)
    tracked = [h for h in links_in_mail if "/t/c/" in h]
    assert len(tracked) == 2  # the two shop links; mailto, the anchor and the unsubscribe link stay
    assert "mailto:help@example.com" in links_in_mail and "#top" in links_in_mail
    assert any("/u/" in h for h in links_in_mail)
    assert "commented.example.com" in html_of(mail)  # a comment is not a link: left as it was
    assert text_of(mail).strip() == f"Hello Noah, see {SHOP}/new"  # the text part keeps its links
    [pixel] = pixels(mail)

    d.clock.advance(timedelta(minutes=3))  # a person opens the message a few minutes later
    image = await fetch(d.client, pixel)
    assert (image.status, image.content_type) == (200, "image/gif")
    assert "no-store" in image.headers["Cache-Control"]
    d.clock.advance(timedelta(seconds=40))
    click = await fetch(d.client, tracked[0])
    assert click.status == 302
    assert click.headers["Location"] == f"{SHOP}/new?utm_source=declic&ref=welcome"  # as the message had it
    again = await fetch(d.client, pixel)  # reading it again later: stored, not a second open
    assert again.status == 200
    await d.advance(seconds=1)

    [opened] = events(d, "email.opened")
    [clicked] = events(d, "email.clicked")
    [(key,)] = d.rows("SELECT idempotency_key FROM deliveries WHERE rule = 'welcome'")
    assert (opened["delivery"], opened["machine"], opened["machine_reasons"]) == (key, False, [])
    assert (clicked["delivery"], clicked["link"], clicked["machine"]) == (key, 1, False)
    assert clicked["url"] == f"{SHOP}/new?utm_source=declic&ref=welcome"
    assert d.rows("SELECT feedback FROM deliveries WHERE rule = 'welcome'") == [("clicked,opened",)]
    assert d.scalar("SELECT count(*) FROM inbox WHERE source = '~open'") == 2  # both fetches kept
    assert await funnel(d, "welcome") == [(1, 1, 1, 1)]  # the KPIs: step 1 sent, one open, one click
    # The click drives rules like a provider's would: the follow-up went out.
    assert d.scalar("SELECT count(*) FROM enrolments WHERE rule = 'clicked-follow-up'") == 1
    await d.advance(days=1)
    assert d.rows("SELECT status, reason FROM deliveries WHERE rule = 'welcome' AND step = 2") == [
        ("suppressed", "step condition is false")
    ]  # she opened it: no "did you see?" for her


async def test_scanner_and_proxy_fetches_are_stored_flagged_and_drive_nothing(start: Any, smtp: SmtpCatcher) -> None:
    d, mail = await welcome(start, smtp)
    first, second = [h for h in hrefs(mail) if "/t/c/" in h]
    [pixel] = pixels(mail)
    # Apple Mail Privacy Protection loads the pixel as the message arrives, with a bare user agent.
    assert (await fetch(d.client, pixel, agent="Mozilla/5.0")).status == 200
    # A security gateway checks every link as the message arrives: HEAD, then GET, seconds after sending.
    assert (await fetch(d.client, first, method="HEAD")).status == 302
    assert (await fetch(d.client, first)).status == 302
    d.clock.advance(timedelta(minutes=5))
    # Later, a gateway that names itself, and one that clicks both links at once.
    assert (await fetch(d.client, second, agent="Mozilla/5.0 (compatible; Barracuda Sentinel)")).status == 302
    d.clock.advance(timedelta(minutes=5))
    assert (await fetch(d.client, first)).status == 302
    d.clock.advance(timedelta(milliseconds=400))
    assert (await fetch(d.client, second)).status == 302
    await d.advance(seconds=1)

    [opened] = events(d, "email.opened")
    assert (opened["machine"], opened["machine_reasons"]) == (True, ["apple-mpp"])
    clicks = events(d, "email.clicked")
    reasons = [sorted(c["machine_reasons"]) for c in clicks]
    assert all(c["machine"] for c in clicks), reasons
    # A machine's click counts once per link (the GET after the HEAD, the second link of the burst are
    # stored in the inbox, not again as events); the first click of the burst looked like a person's
    # when it came, and was flagged when the second came.
    assert reasons == [["head", "too-soon"], ["robot-agent"], ["burst"]]
    assert d.scalar("SELECT count(*) FROM inbox WHERE source = '~click'") == 5
    assert d.rows("SELECT feedback FROM deliveries WHERE rule = 'welcome'") == [(None,)]
    assert await funnel(d, "welcome") == [(1, 1, 0, 0)]  # machines' opens and clicks stay out of the KPIs
    # The first click of the burst looked like a person's, and started a journey: it was ended, unsent.
    assert d.rows("SELECT status FROM enrolments WHERE rule = 'clicked-follow-up'") == [("exited",)]
    await d.advance(days=1)
    # Nobody opened it: the follow-up for those who did not goes out.
    assert d.rows("SELECT status FROM deliveries WHERE rule = 'welcome' AND step = 2") == [("sent",)]
    assert [m["Subject"] for m in smtp.messages] == ["Welcome Noah", "Did you see?"]


async def test_a_person_still_counts_after_a_scanner_clicked_first(start: Any, smtp: SmtpCatcher) -> None:
    d, mail = await welcome(start, smtp)
    first = next(h for h in hrefs(mail) if "/t/c/" in h)
    assert (await fetch(d.client, first)).status == 302  # a scanner, at delivery
    d.clock.advance(timedelta(hours=2))
    assert (await fetch(d.client, first)).status == 302  # the person, later, from a browser
    await d.advance(seconds=1)
    assert [c["machine"] for c in events(d, "email.clicked")] == [True, False]
    assert d.rows("SELECT feedback FROM deliveries WHERE rule = 'welcome'") == [("clicked",)]


async def test_unknown_or_forged_tokens_get_404_and_store_nothing(start: Any, smtp: SmtpCatcher) -> None:
    d, mail = await welcome(start, smtp)
    click = path_of(next(h for h in hrefs(mail) if "/t/c/" in h)).removeprefix("/t/c/")
    pixel = path_of(pixels(mail)[0]).removeprefix("/t/o/")
    unsubscribe = path_of(next(h for h in hrefs(mail) if "/u/" in h)).removeprefix("/u/")
    flipped = click[:30] + ("A" if click[30] != "A" else "B") + click[31:]
    forged = [
        f"/t/c/{flipped}",
        f"/t/c/{click[:-3]}",
        f"/t/c/{pixel}",  # an open token is not a click token
        f"/t/o/{click}",  # nor the reverse
        f"/t/o/{unsubscribe}",  # nor an unsubscribe token
        "/t/c/nonsense",
        "/t/o/%00%ff",
        "/t/c/" + "A" * 3000,
    ]
    for path in forged:
        response = await d.client.get(path, allow_redirects=False)
        assert response.status == 404, path
        assert "Location" not in response.headers
    assert d.scalar("SELECT count(*) FROM inbox WHERE source IN ('~open', '~click')") == 0


async def test_a_click_never_redirects_where_the_request_says(start: Any, smtp: SmtpCatcher) -> None:
    d, mail = await welcome(start, smtp)
    click = path_of(next(h for h in hrefs(mail) if "/t/c/" in h))
    evil = "https://evil.example.net/phish"
    attempts = [
        await d.client.get(f"{click}?url={evil}&redirect={evil}&next={evil}", allow_redirects=False),
        await d.client.get(click, headers={"Referer": evil, "Host": "evil.example.net"}, allow_redirects=False),
    ]
    for response in attempts:
        assert (response.status, response.headers["Location"]) == (302, f"{SHOP}/new?utm_source=declic&ref=welcome")
    assert (await d.client.get(f"{click}/{evil}", allow_redirects=False)).status == 404
    # A token sealed by another deployment's key is as good as forged.
    other = links.Tracked(1, "dcl-" + "0" * 40, START, evil, 1)
    token = links.make_tracking_token(b"another deployment's key".ljust(32), links.CLICK, other)
    assert (await d.client.get(f"/t/c/{token}", allow_redirects=False)).status == 404


async def test_a_link_sealed_with_a_newline_redirects_where_a_browser_would_go(start: Any, smtp: SmtpCatcher) -> None:
    """Links sent before sealing dropped tabs and newlines still work; one with another control character, which no
    Location header may carry, is a 404 rather than a dropped connection."""
    d, _ = await welcome(start, smtp)
    secret = await d.gateway.link_secret()

    async def click(url: str) -> Any:
        token = links.make_tracking_token(secret, links.CLICK, links.Tracked(1, "dcl-" + "0" * 40, START, url, 1))
        return await d.client.get(f"/t/c/{token}", allow_redirects=False)

    response = await click(f"{SHOP}/new\r\n?ref=\tx")
    assert (response.status, response.headers["Location"]) == (302, f"{SHOP}/new?ref=x")
    assert (await click(f"{SHOP}/n\x01ew")).status == 404


async def test_transactional_mail_is_not_tracked_unless_its_rule_says_so(start: Any, smtp: SmtpCatcher) -> None:
    d: Deployment = await start()
    await d.post_shopify("orders/create", ORDER)
    await d.advance(seconds=1)
    mails = {m["Subject"].split()[0]: m for m in smtp.messages}
    assert hrefs(mails["Order"]) == [f"{SHOP}/orders"] and pixels(mails["Order"]) == []
    [link] = hrefs(mails["Receipt"])  # `track: {clicks: true}`: clicks only, no pixel
    assert link.startswith("https://hooks.example.com/t/c/") and pixels(mails["Receipt"]) == []


async def test_a_sink_can_turn_tracking_off_for_what_its_provider_tracks(start: Any, smtp: SmtpCatcher) -> None:
    _, mail = await welcome(start, smtp, sink="    track: {opens: false}\n")
    assert pixels(mail) == []
    assert len([h for h in hrefs(mail) if "/t/c/" in h]) == 2  # clicks: the rule's default stands


async def test_the_person_gets_through_while_storage_is_unavailable(start: Any, smtp: SmtpCatcher, db_url: str) -> None:
    d, mail = await welcome(start, smtp)
    click = next(h for h in hrefs(mail) if "/t/c/" in h)
    [pixel] = pixels(mail)
    d.clock.advance(timedelta(minutes=10))
    assert (await fetch(d.client, pixel)).status == 200  # reads the link key once
    with locked_inbox(db_url):
        image = await fetch(d.client, pixel, agent=BROWSER + " again")
        redirect = await fetch(d.client, click)
        assert (image.status, image.content_type) == (200, "image/gif")
        assert (redirect.status, redirect.headers["Location"]) == (302, f"{SHOP}/new?utm_source=declic&ref=welcome")
    await d.advance(seconds=1)
    assert len(events(d, "email.opened")) == 1


async def test_an_unreadable_stored_fetch_is_marked_failed_not_crashed(start: Any, smtp: SmtpCatcher) -> None:
    d: Deployment = await start()
    from declic_gateway.store.inbox import NewCall

    await d.gateway.committer.submit(NewCall("~click", "bad", d.clock.now(), {}, b'{"contact": "x"}'))
    await d.advance(seconds=1)
    [(status, error)] = d.rows("SELECT status, error FROM inbox WHERE source = '~click'")
    assert status == "failed" and error.startswith("not a stored fetch")


# The rewriting and the heuristics on their own, as tables.

SECRET_KEY = bytes(range(32))


def rewrite(html: str, opens: bool = True, clicks: bool = True) -> tuple[str, list[links.Tracked]]:
    from declic_gateway.send.tracking import Tracking, track_html

    tracking = Tracking("https://hooks.example.com", SECRET_KEY, 7, "dcl-" + "a" * 40, START, opens, clicks)
    out = track_html(html, tracking)
    tree = LexborHTMLParser(out)
    tokens = [(a.attributes.get("href") or "").rpartition("/t/c/")[2] for a in tree.css("a[href]")]
    found = [links.read_tracking_token(SECRET_KEY, t, links.CLICK) for t in tokens if t]
    return out, [t for t in found if t is not None]


@pytest.mark.parametrize(
    ("html", "urls"),
    [
        ("<a href=https://a.example/x>unquoted</a>", ["https://a.example/x"]),
        ('<a href="HTTP://A.example/Y">upper case</a>', ["HTTP://A.example/Y"]),
        ('<a href="  https://a.example/?a=1&amp;b=2 ">entities, spaces</a>', ["https://a.example/?a=1&b=2"]),
        ('<a href="https://a.example/é?q=ü">non-ASCII</a>', ["https://a.example/é?q=ü"]),
        # Tabs and newlines go as browsers drop them; any other control character: left for the browser to read.
        ('<a href="https://a.example/new\n?ref=x">newline</a>', ["https://a.example/new?ref=x"]),
        ('<a href="\thttps://a.example/\r\nx\t?\ty">tabs, returns</a>', ["https://a.example/x?y"]),
        ('<a href="https://a.example/\x01x">control</a><a href="https://a.example/\x7f">DEL</a>', []),
        ('<a href="https://hooks.example.com/u/tok">own link</a>', []),
        ('<a href="javascript:alert(1)">js</a><a href="ftp://a.example/">ftp</a><a href="//a.example/">rel</a>', []),
        ('<a href="https://a.example/' + "x" * 2100 + '">very long</a>', []),
        ("<textarea><a href='https://a.example/t'></textarea><script>'<a href=\"https://a.example/s\">'</script>", []),
        ('<!-- <a href="https://a.example/c"> -->', []),
    ],
)
def test_only_the_http_links_a_reader_sees_are_rewritten(html: str, urls: list[str]) -> None:
    _, tracked = rewrite(html, opens=False)
    assert [t.url for t in tracked] == urls
    assert [t.link for t in tracked] == list(range(1, len(urls) + 1))
    assert all((t.contact_id, t.delivery, t.sent_at) == (7, "dcl-" + "a" * 40, START) for t in tracked)


def test_the_doctype_and_outlooks_conditional_comments_are_kept() -> None:
    doctype = (
        '<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN" '
        '"http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">'
    )
    mso = "<!--[if gte mso 9]><xml><o:OfficeDocumentSettings><o:AllowPNG/></o:OfficeDocumentSettings></xml><![endif]-->"
    html = f'{doctype}\n<html><head>{mso}</head><body><a href="https://a.example/">a</a></body></html>'
    out, [tracked] = rewrite(html)
    assert out.startswith(doctype + "<html>") and mso in out and tracked.url == "https://a.example/"
    assert rewrite("<!doctype html><p>x</p>")[0].startswith("<!doctype html><html>")
    assert rewrite("<p>no doctype</p>")[0].startswith("<html>")


def test_a_fragment_gets_its_pixel_and_opens_alone_leave_links_alone() -> None:
    out, tracked = rewrite('<p>Hi <a href="https://a.example/">there</a></p>', clicks=False)
    assert tracked == [] and 'href="https://a.example/"' in out
    [img] = LexborHTMLParser(out).css("img")
    token = (img.attributes.get("src") or "").rpartition("/t/o/")[2]
    assert links.read_tracking_token(SECRET_KEY, token, links.OPEN) == links.Tracked(7, "dcl-" + "a" * 40, START)


@pytest.mark.parametrize(
    ("kind", "method", "agent", "ip", "after", "reasons"),
    [
        ("open", "GET", BROWSER, "203.0.113.7", None, []),
        ("open", "GET", "Mozilla/5.0", "203.0.113.7", None, ["apple-mpp"]),
        ("open", "GET", BROWSER, "17.58.101.12", None, ["apple-mpp"]),
        ("open", "GET", "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)",
         "66.249.84.1", None, []),  # Gmail fetches the image when the person opens the message
        ("click", "GET", "Mozilla/5.0", "17.58.101.12", timedelta(minutes=5), []),  # MPP does not click
        ("click", "HEAD", BROWSER, "198.51.100.4", timedelta(minutes=5), ["head"]),
        ("click", "GET", "", "198.51.100.4", timedelta(minutes=5), ["no-agent"]),
        ("click", "GET", "python-requests/2.32", "198.51.100.4", timedelta(minutes=5), ["robot-agent"]),
        ("click", "GET", "Mozilla/5.0 (compatible; Barracuda Sentinel (EE))", "198.51.100.4", timedelta(hours=1),
         ["robot-agent"]),
        ("click", "GET", "Slackbot-LinkExpanding 1.0", "198.51.100.4", timedelta(hours=1), ["robot-agent"]),
        ("click", "GET", "Mozilla/5.0 (Linux; Android 10; CUBOT X30) Chrome/120.0 Mobile", "198.51.100.4",
         timedelta(hours=1), []),  # a phone brand, not a robot
        ("click", "GET", BROWSER, "198.51.100.4", timedelta(seconds=3), ["too-soon"]),
        ("click", "GET", BROWSER, "198.51.100.4", timedelta(seconds=30), []),
    ],
)  # fmt: skip
def test_machine_heuristics(
    kind: Any, method: str, agent: str, ip: str, after: timedelta | None, reasons: list[str]
) -> None:
    from declic_gateway import machine_reasons

    assert machine_reasons(kind, method=method, user_agent=agent, ip=ip, after=after) == reasons


def test_a_tracked_rule_without_public_url_is_a_config_error(tmp_path: Any) -> None:
    from declic_gateway.errors import ConfigError

    config = BASE_CONFIG.format(
        db_url=f"sqlite:///{tmp_path}/d.db", secret=SECRET, smtp_port=25, rules=RULES, max_attempts=3, worker=""
    )
    config = config.replace("public_url: https://hooks.example.com\n", "")
    with pytest.raises(ConfigError) as refused:
        load(str(write_deployment(tmp_path, config, TRACKED_TEMPLATES)))
    said = "rules[2].track: rule 'receipt' tracks opens or clicks: needs `public_url:`"
    assert any(said in problem for problem in refused.value.problems), refused.value.problems


@pytest.fixture
async def one_app(aiohttp_client: Any, tmp_path: Any, smtp: SmtpCatcher) -> TestClient:
    """One app for every example of the property test (fixtures run per test, not per example)."""
    config = BASE_CONFIG.format(
        db_url=f"sqlite:///{tmp_path}/d.db", secret=SECRET, smtp_port=smtp.port, rules=RULES, max_attempts=3, worker=""
    )
    settings, pm, _ = load(str(write_deployment(tmp_path, config, TRACKED_TEMPLATES)))
    return await aiohttp_client(create_app(settings, pm=pm, clock=FakeClock(START), role="web"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kind=st.sampled_from(["o", "c"]),
    token=st.text(st.characters(codec="utf-8", exclude_characters="/?#"), min_size=1, max_size=300)
    | st.binary(min_size=1, max_size=200).map(lambda b: base64.urlsafe_b64encode(b).decode().rstrip("=")),
    method=st.sampled_from(["GET", "HEAD"]),
)
async def test_whatever_the_token_the_answer_is_404_never_5xx(
    one_app: TestClient, kind: str, token: str, method: str
) -> None:
    response = await one_app.request(method, f"/t/{kind}/{quote(token, safe='')}", allow_redirects=False)
    assert response.status == 404, await response.text()


async def test_erasing_a_contact_erases_every_fetch_of_their_pixel_and_links(start: Any, smtp: SmtpCatcher) -> None:
    from declic_gateway.pipeline import contacts

    d, mail = await welcome(start, smtp)
    [pixel] = pixels(mail)
    for minutes in (5, 60):  # the second open makes no event, and still holds her address and user agent
        d.clock.advance(timedelta(minutes=minutes))
        assert (await fetch(d.client, pixel, **{"X-Forwarded-For": "203.0.113.9"})).status == 200
    await d.advance(seconds=1)
    assert len(events(d, "email.opened")) == 1
    [(contact_id,)] = d.rows("SELECT id FROM contacts")
    await d.gateway.db.run(contacts.erase, contact_id, d.clock.now())
    assert d.rows("SELECT status, body FROM inbox WHERE source = '~open'") == [("erased", b"")] * 2


async def test_an_erased_contacts_old_mail_still_shows_and_links_and_keeps_nothing(
    start: Any, smtp: SmtpCatcher
) -> None:
    """An erased person may open an old message and click its links: the image shows and the link goes where it
    went, and nothing is stored about them, nor fails in the lists operators watch: the stored fetch named a
    contact that no longer exists, failed, and kept their address and user agent."""
    from declic_gateway.pipeline import contacts

    d, mail = await welcome(start, smtp)
    click = next(h for h in hrefs(mail) if "/t/c/" in h)
    [pixel] = pixels(mail)
    [(contact_id,)] = d.rows("SELECT id FROM contacts")
    await d.gateway.db.run(contacts.erase, contact_id, d.clock.now())
    d.clock.advance(timedelta(days=3))

    image = await fetch(d.client, pixel, **{"X-Forwarded-For": "203.0.113.9"})
    redirect = await fetch(d.client, click, **{"X-Forwarded-For": "203.0.113.9"})
    await d.advance(seconds=1)

    assert (image.status, image.content_type, await image.read()) == (200, "image/gif", PIXEL_GIF)
    assert (redirect.status, redirect.headers["Location"]) == (302, f"{SHOP}/new?utm_source=declic&ref=welcome")
    assert d.rows("SELECT source, status FROM inbox ORDER BY id") == [("shop", "erased")]
    assert d.scalar("SELECT count(*) FROM jobs WHERE status = 'dead'") == 0
    assert d.rows("SELECT id, email, email_status FROM contacts") == [(contact_id, None, "erased")]
    assert d.scalar("SELECT count(*) FROM identities") == 0
    assert events(d, "email.opened") == events(d, "email.clicked") == []


async def test_the_person_gets_through_while_identities_are_locked(start: Any, smtp: SmtpCatcher, db_url: str) -> None:
    """Whether the contact was erased is read before storing a fetch: that read failing loses the fetch, as a
    failed commit does, and nothing else."""
    d, mail = await welcome(start, smtp)
    click = next(h for h in hrefs(mail) if "/t/c/" in h)
    [pixel] = pixels(mail)
    await d.gateway.link_secret()
    with locked(db_url, "LOCK TABLE identities IN ACCESS EXCLUSIVE MODE"):
        image = await fetch(d.client, pixel)
        redirect = await fetch(d.client, click)
    assert (image.status, image.content_type) == (200, "image/gif")
    assert (redirect.status, redirect.headers["Location"]) == (302, f"{SHOP}/new?utm_source=declic&ref=welcome")
    assert d.scalar("SELECT count(*) FROM inbox WHERE source IN ('~open', '~click')") == 0
