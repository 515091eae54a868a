"""The fault suite: real `declic serve` processes, real HTTP, a real SMTP server, real time, and
one fault at a time: SIGKILL mid-burst, the database going away, the SMTP server going away, a
call that can never be processed, a provider that keeps failing, a template that never ends.

Each test prints its figures on one line starting with `FAULT`; docs/reliability.md quotes them.
Timings are printed, never asserted, except the one the design promises: a dead worker's jobs are
taken over within 30 s.
"""

from __future__ import annotations

import base64
import json
import statistics
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from conftest import FIXTURES, SECRET
from declic_gateway.config import WorkerSpec
from declic_gateway.send import links
from declic_gateway.store import Database
from declic_gateway.testing import SmtpCatcher, shopify_headers, write_deployment
from declic_plugins.hubspot import signature_v3
from processes import (
    Answer,
    OwnPostgres,
    Servers,
    Store,
    buyer,
    declic_command,
    own_postgres,
    post_order,
    request,
    wait_until,
)

PUBLIC_URL = "https://hooks.example.com"
WRITE_KEY = "site-write-key"
HUBSPOT_SECRET = "hubspot-client-secret"
HUBSPOT_TOKEN = "pat-eu1-0000-fault"
#: What the design promises for a dead worker's jobs, on SQLite (restart) and PostgreSQL (lease).
TAKEOVER_LIMIT = 30.0

TEMPLATES = {
    "order-confirmation.subject.j2": "Order {{ event.properties.name }}",
    "order-confirmation.txt.j2": "Thanks {{ contact.first_name }} for order {{ event.properties.name }}",
    "welcome.subject.j2": "Welcome {{ contact.first_name }}",
    "welcome.txt.j2": "Hello",
}

CONFIG = """\
public_url: {public_url}
storage: {{url: '{db_url}', busy_timeout: 2s}}
sources:
  shop: {{plugin: shopify, secret: {secret}}}
{sources}sinks:
  email:
    plugin: smtp
    host: 127.0.0.1
    port: {smtp_port}
    tls: none
    sender: "Boutique <shop@example.com>"
    timeout: 5
    connections: 8
worker:
  poll_interval: 200ms
  batch_size: 10
  concurrency: 20
  retry_base: 500ms
  retry_max: 2s
  max_attempts: 50
{worker}rules:
  - name: order-confirmation
    when: order.placed
    kind: transactional
    steps:
      - wait: {wait}
        send: {{via: email, template: order-confirmation}}
{rules}"""


def deployment(
    tmp_path: Path,
    db_url: str,
    smtp_port: int,
    *,
    wait: str = "0s",
    sources: str = "",
    worker: str = "",
    rules: str = "",
    templates: dict[str, str] | None = None,
) -> Path:
    text = CONFIG.format(
        public_url=PUBLIC_URL,
        db_url=db_url,
        secret=SECRET,
        smtp_port=smtp_port,
        wait=wait,
        sources=sources,
        worker=worker,
        rules=rules,
    )
    return write_deployment(tmp_path, text, TEMPLATES | (templates or {}))


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    with Servers.running(tmp_path) as pool:
        yield pool


@pytest.fixture
def slow_smtp() -> Iterator[SmtpCatcher]:
    """An SMTP server that answers each message 0.1 s after keeping it: sends are in flight long enough to
    be caught by a SIGKILL."""
    catcher = SmtpCatcher(reply_delay=0.1).start()
    yield catcher
    catcher.stop()


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    reader = Store(db_url)
    yield reader
    reader.close()


def message_ids(smtp: SmtpCatcher) -> Counter[str]:
    """Messages received, by Message-ID: the SMTP sink derives it from the delivery's idempotency key."""
    return Counter(str(message["Message-ID"]) for message in list(smtp.messages))


def sent_keys(store: Store) -> set[str]:
    """The Message-IDs of the deliveries the database says were sent, one per (rule, contact, occurrence, step)."""
    return {
        f"<{key}@example.com>" for (key,) in store.rows("SELECT idempotency_key FROM deliveries WHERE status = 'sent'")
    }


def duplicates(smtp: SmtpCatcher) -> int:
    """Messages beyond the first for each delivery."""
    return sum(count - 1 for count in message_ids(smtp).values())


def assert_each_sent_once(smtp: SmtpCatcher, store: Store, expected: set[str]) -> None:
    """Each address in `expected` got one message; the SMTP server and the deliveries table agree."""
    got = Counter(str(message["To"]) for message in list(smtp.messages))
    assert set(got) == expected, sorted(set(got) ^ expected)[:10]
    assert set(message_ids(smtp)) == sent_keys(store)
    assert store.scalar("SELECT count(*) FROM deliveries WHERE status = 'sent'") == len(expected)
    doubled = {to: count for to, count in got.items() if count > 1}
    assert not doubled, f"sent more than once: {doubled}"


def quantiles(seconds: list[float]) -> str:
    """median and p95, in milliseconds."""
    ms = sorted(s * 1000 for s in seconds)
    p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
    return f"median {statistics.median(ms):.1f} ms, p95 {p95:.1f} ms (n={len(ms)})"


class Watch:
    """Polls a condition in a thread from now on; result() is the time.monotonic() at which it first held."""

    def __init__(self, condition: Callable[[], bool], every: float = 0.05):
        self._held_at: float | None = None
        self._done = threading.Event()

        def poll() -> None:
            while not self._done.is_set():
                if condition():
                    self._held_at = time.monotonic()
                    self._done.set()
                    return
                self._done.wait(every)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()

    def result(self, timeout: float) -> float:
        self._thread.join(timeout)
        self._done.set()
        self._thread.join()
        assert self._held_at is not None, f"the condition did not hold within {timeout}s"
        return self._held_at


def paced_post(base_url: str, i: int, pause: float) -> Answer:
    answer = post_order(base_url, i, webhook_id=f"burst-{i}")
    time.sleep(pause)
    return answer


# --- 1. SIGKILL mid-burst --------------------------------------------------------------------------

BURST, SENDERS = 200, 16


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_sigkill_mid_burst_loses_nothing_and_sends_again_at_most_what_was_in_flight(
    tmp_path: Path, db_url: str, slow_smtp: SmtpCatcher, store: Store, servers: Servers
) -> None:
    """A burst of orders, each confirmed at once through a slow SMTP server; SIGKILL when a fifth of the
    mails are out; a replacement started at once on the same port; the provider redelivers what got no 2xx.

    On SQLite the replacement releases the dead process's jobs at start; on PostgreSQL they are taken over
    when their lease runs out (worker.lease).
    """
    smtp = slow_smtp
    config = deployment(tmp_path, db_url, smtp.port)
    with servers.logs_on_failure():
        first = servers.start(config, name="first")
        held_by_dead = (
            f"SELECT count(*) FROM jobs WHERE status = 'running' AND locked_by LIKE '%:{first.pid}:%'"  # host:pid:rand
        )
        with ThreadPoolExecutor(SENDERS) as pool:
            # Each sender pauses 0.2 s between orders: the burst lasts ~3 s and the kill falls inside it.
            futures = [pool.submit(paced_post, first.url, i, 0.2) for i in range(BURST)]
            wait_until(lambda: len(smtp.messages) >= BURST // 5, 60, "a fifth of the mails")
            first.sigkill()
            killed = time.monotonic()
            # Read before anything restarts: what the dead process held, what was stored.
            in_flight = store.scalar(held_by_dead + " AND kind = 'step'")
            held = store.scalar(held_by_dead)
            stored_at_kill = {row[0] for row in store.rows("SELECT id FROM inbox")}
            sent_at_kill = len(smtp.messages)
            freed = Watch(lambda: store.scalar(held_by_dead) == 0)

            restarted = time.monotonic()
            second = servers.start(config, name="second", port=first.port)
            ready = time.monotonic() - restarted
            answers = [future.result() for future in futures]

        acked = [a for a in answers if a.ok and a.at < restarted]  # the replacement cannot have answered these
        unanswered = [i for i, a in enumerate(answers) if not a.ok]
        # Shopify redelivers a webhook that got no 2xx, with the same webhook id.
        redelivered = Counter(post_order(second.url, i, webhook_id=f"burst-{i}").body.get("status") for i in unanswered)

        drained = wait_until(
            lambda: store.scalar("SELECT count(*) FROM deliveries WHERE status = 'sent'") >= BURST,
            90,
            "every order's confirmation sent",
        )
        takeover = freed.result(TAKEOVER_LIMIT + 5) - killed
        time.sleep(1.5)  # several poll intervals: a late duplicate would have gone out by now
        assert second.alive()

        first_new = min(at for at in list(smtp.arrived) if at > restarted) - restarted
        stored = store.scalar("SELECT count(*) FROM inbox")
        doubled = duplicates(smtp)
        print(
            f"\nFAULT sigkill-mid-burst [{db_url.split(':')[0]}]: acknowledged {len(acked)} before the kill, "
            f"stored {len(stored_at_kill)} at the kill, {sent_at_kill} mails out; in flight at the kill: "
            f"{in_flight} steps (and {held - in_flight} calls held), {len(smtp.unanswered)} mails kept by the SMTP "
            f"server unanswered; "
            f"replacement ready {ready:.2f}s after start, first new send {first_new:.2f}s after start, "
            f"dead process's jobs taken over {takeover:.2f}s after the kill, all sent {drained:.2f}s after the "
            f"redeliveries; no answer {len(unanswered)} (redelivered: {dict(redelivered)}); "
            f"finally stored {stored}, sent {len(message_ids(smtp))} distinct, duplicated {doubled}"
        )
        assert {a.body["id"] for a in acked} <= stored_at_kill, "an acknowledged call was lost"
        assert stored == BURST  # each order once: a redelivery of a stored call is a duplicate
        got = Counter(str(message["To"]) for message in list(smtp.messages))
        assert set(got) == {buyer(i) for i in range(BURST)}
        assert set(message_ids(smtp)) == sent_keys(store)  # what was sent is what the database says was sent
        assert store.scalar("SELECT count(*) FROM deliveries WHERE status = 'sent'") == BURST
        assert doubled <= in_flight, f"{doubled} messages sent twice, but only {in_flight} sends were in flight"
        assert takeover <= TAKEOVER_LIMIT


# --- 2. the database goes away ---------------------------------------------------------------------


@pytest.fixture
def postgres(tmp_path: Path) -> Iterator[OwnPostgres]:
    with own_postgres(tmp_path) as server:
        yield server


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(120)
def test_a_postgresql_outage_answers_503_and_everything_acknowledged_goes_out_once_after(
    tmp_path: Path, postgres: OwnPostgres, smtp: SmtpCatcher, servers: Servers
) -> None:
    """PostgreSQL (the test's own) stops while Declic runs and starts again; Declic is never restarted.

    Orders acknowledged before the outage come due during it (wait: 3s); orders posted during it get 503 with
    Retry-After and are redelivered after, as a provider does."""
    url = postgres.create_database("declic")
    database = Database(url)
    database.upgrade()
    database.close()
    store = Store(url)
    config = deployment(tmp_path, url, smtp.port, wait="3s")
    try:
        with servers.logs_on_failure():
            declic = servers.start(config)
            before = 20
            assert [post_order(declic.url, i).status for i in range(before)] == [200] * before
            wait_until(
                lambda: store.scalar("SELECT count(*) FROM inbox WHERE status = 'processed'") == before,
                20,
                "the orders processed, their confirmations due in 3 s",
            )
            [(contact_id,)] = store.rows("SELECT id FROM contacts WHERE email = :email", email=buyer(0))
            with store.engine.begin() as conn:
                unsubscribe = "/u/" + links.make_token(links.link_secret(conn), contact_id, "email")

            postgres.stop()
            down = time.monotonic()
            during: list[Answer] = []
            readiness, link = Counter[int](), Counter[int]()
            i = before
            while time.monotonic() - down < 6:  # past the orders' due time: they come due during the outage
                during.append(post_order(declic.url, i, webhook_id=f"order-{i}"))
                readiness[request(declic.url + "/readyz").status] += 1
                link[request(declic.url + unsubscribe).status] += 1
                i += 1
                time.sleep(0.2)
            assert smtp.messages == []  # the confirmations were due, but nothing can be claimed
            postgres.start()
            back = time.monotonic()
            outage = back - down

            after: list[Answer] = []
            while not (after and after[-1].ok):  # the provider keeps calling; how soon is it accepted again?
                after.append(post_order(declic.url, i, webhook_id=f"order-{i}"))
                i += 1
                if not after[-1].ok:
                    time.sleep(0.1)
            recovered = after[-1].at - back
            ready_again = wait_until(lambda: request(declic.url + "/readyz").status == 200, 30, "ready again")
            # The provider redelivers what got no 2xx, with the same webhook id.
            retried = [i for i, a in zip(range(before, i), during + after, strict=True) if not a.ok]
            redelivered = Counter(post_order(declic.url, j, webhook_id=f"order-{j}").status for j in retried)
            assert request(declic.url + unsubscribe).status == 200

            expected = {buyer(j) for j in range(i)}
            drained = wait_until(lambda: len(smtp.messages) >= len(expected), 40, "every confirmation")
            time.sleep(1.5)  # several poll intervals: a duplicate would have gone out by now
            assert declic.alive()
            assert_each_sent_once(smtp, store, expected)
            assert store.scalar("SELECT count(*) FROM inbox") == len(expected)
            resumed = min(smtp.arrived) - back

        statuses = Counter(a.status for a in during)
        print(
            f"\nFAULT database-outage [postgresql]: outage {outage:.2f}s; during it webhooks answered "
            f"{dict(statuses)} (Retry-After {sorted({a.headers.get('Retry-After') for a in during})}), /readyz "
            f"{dict(readiness)}, /u/TOKEN {dict(link)}; after PostgreSQL was back: first webhook accepted "
            f"{recovered:.2f}s later ({len(after) - 1} more 503 first), /readyz 200 {ready_again:.2f}s after "
            f"that, first mail {resumed:.2f}s after PostgreSQL was back; redelivered {dict(redelivered)}; "
            f"{len(expected)} orders, {len(smtp.messages)} mails, "
            f"all sent {drained:.2f}s after the redeliveries, duplicated {duplicates(smtp)}"
        )
        assert statuses == Counter({503: len(during)})
        assert {a.headers.get("Retry-After") for a in during} == {"5"}
        assert readiness == Counter({503: len(during)}) and link == Counter({503: len(during)})
        assert redelivered == Counter({200: len(retried)})
    finally:
        store.close()


# --- 3. the SMTP server goes away ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_an_smtp_outage_delays_mail_and_sends_each_once_when_it_is_back(
    tmp_path: Path, db_url: str, store: Store, servers: Servers
) -> None:
    """The SMTP server stops while orders keep coming, and starts again on the same port; Declic is never
    restarted: each confirmation goes out once, retried with backoff (retry_base 500ms, retry_max 2s)."""
    smtp = SmtpCatcher().start()
    try:
        config = deployment(tmp_path, db_url, smtp.port)
        with servers.logs_on_failure():
            declic = servers.start(config)
            before = 10
            assert [post_order(declic.url, i).status for i in range(before)] == [200] * before
            wait_until(lambda: len(smtp.messages) == before, 20, "the mails before the outage")

            smtp.stop()
            down = time.monotonic()
            during = []
            i = before
            while time.monotonic() - down < 3:
                during.append(post_order(declic.url, i))
                i += 1
                time.sleep(0.1)
            wait_until(
                lambda: store.scalar("SELECT count(*) FROM deliveries WHERE status = 'retrying'") == len(during),
                20,
                "every send during the outage failed and waits for a retry",
            )
            failed_attempts = store.scalar("SELECT sum(attempts) FROM deliveries WHERE status = 'retrying'")
            smtp.start()
            back = time.monotonic()
            outage = back - down
            drained = wait_until(lambda: len(smtp.messages) >= i, 30, "every mail after the outage")
            time.sleep(1.5)  # several poll intervals: a duplicate would have gone out by now
            assert declic.alive()

            assert_each_sent_once(smtp, store, {buyer(j) for j in range(i)})
            attempts = [a for (a,) in store.rows("SELECT attempts FROM deliveries ORDER BY id")]
            resumed = min(at for at in smtp.arrived if at > back) - back
        print(
            f"\nFAULT smtp-outage [{db_url.split(':')[0]}]: outage {outage:.2f}s; {len(during)} orders during it, "
            f"answered {dict(Counter(a.status for a in during))}, {failed_attempts} failed attempts, no mail; "
            f"after SMTP was back: first mail {resumed:.2f}s, all {i} mails {drained:.2f}s; attempts per delivery "
            f"{dict(sorted(Counter(attempts).items()))}; duplicated {duplicates(smtp)}"
        )
        assert Counter(a.status for a in during) == Counter({200: len(during)})
        assert all(a > 1 for a in attempts[before:])  # they did fail while SMTP was down
    finally:
        smtp.stop()


# --- 4. a call about one contact that cannot be processed, now or for a while ------------------------

#: Valid JSON, sent with the site's public write key, but no database can store a lone surrogate.
POISON = (
    b'{"type": "identify", "messageId": "poison-1", "userId": "u1", '
    b'"traits": {"email": "poison@example.org", "name": "\\ud800"}}'
)


def declic_cli(config: Path, *args: str) -> str:
    done = subprocess.run(
        [*declic_command(), *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=config.parent,
    )
    return done.stdout


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_a_poisoned_call_fails_at_once_while_other_contacts_mail_keeps_flowing(
    tmp_path: Path, db_url: str, smtp: SmtpCatcher, store: Store, servers: Servers
) -> None:
    site = f"  site: {{plugin: track, write_key: {WRITE_KEY}}}\n"
    config = deployment(tmp_path, db_url, smtp.port, sources=site)
    basic = {"Authorization": "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()}
    with servers.logs_on_failure():
        declic = servers.start(config)
        answers = [post_order(declic.url, i) for i in range(20)]
        poison = request(declic.url + "/hooks/site", POISON, {**basic, "Content-Type": "application/json"})
        answers += [post_order(declic.url, i) for i in range(20, 40)]
        assert poison.status == 200 and [a.status for a in answers] == [200] * 40
        assert poison.body == {"success": True, "status": "accepted"}  # Segment's answer: no inbox id in it
        poison_id = store.scalar("SELECT id FROM inbox WHERE source = 'site'")
        failed_in = Watch(lambda: store.scalar("SELECT status FROM inbox WHERE id = :id", id=poison_id) == "failed")
        drained = wait_until(lambda: len(smtp.messages) >= 40, 30, "every confirmation")
        failed_after = failed_in.result(10) - poison.at

        [(status, error)] = store.rows("SELECT status, error FROM inbox WHERE id = :id", id=poison_id)
        assert status == "failed" and "surrogate" in error
        assert store.rows("SELECT status, attempts FROM jobs WHERE inbox_id = :id", id=poison_id) == [("done", 1)]
        # Replayable: `declic replay --failed ID` queues it again; it fails again at once (same data), and
        # the mail behind it still flows.
        assert declic_cli(config, "replay", "--failed", str(poison_id)).strip() == "queued 1 call again"
        assert [post_order(declic.url, i).status for i in range(40, 45)] == [200] * 5
        wait_until(lambda: len(smtp.messages) >= 45, 30, "the confirmations after the replay")
        wait_until(
            lambda: (
                store.rows("SELECT status, attempts FROM jobs WHERE inbox_id = :id ORDER BY id", id=poison_id)
                == [("done", 1), ("done", 1)]
            ),
            10,
            "the replayed call tried once",
        )
        time.sleep(1)
        assert store.scalar("SELECT status FROM inbox WHERE id = :id", id=poison_id) == "failed"
        assert_each_sent_once(smtp, store, {buyer(i) for i in range(45)})
        assert store.scalar("SELECT count(*) FROM contacts WHERE email = 'poison@example.org'") == 0
    print(
        f"\nFAULT poisoned-call [{db_url.split(':')[0]}]: 40 orders around one poisoned call, all acknowledged; "
        f"the call failed {failed_after:.2f}s after its acknowledgement, tried once; 40 confirmations sent "
        f"{drained:.2f}s after the last order; replayed: failed again once, 5 more orders confirmed; "
        f"duplicated {duplicates(smtp)}"
    )


@dataclass
class HubSpotApi:
    """HubSpot's CRM v3 read API, `GET /crm/v3/objects/contacts/{id}` with the properties asked for, as far as
    the hubspot source uses it; it answers 503 while `down`, as during an incident."""

    contacts: dict[str, dict[str, Any]]
    down: bool = True
    calls: list[tuple[float, int]] = field(default_factory=list)  # (time.monotonic(), status)

    def answer(self, path: str, query: dict[str, list[str]], authorization: str | None) -> tuple[int, dict[str, Any]]:
        if self.down:
            return 503, {"status": "error", "message": "Service Unavailable", "category": "SERVICE_UNAVAILABLE"}
        if authorization != f"Bearer {HUBSPOT_TOKEN}":
            return 401, {"status": "error", "message": "Authentication credentials not found."}
        found = self.contacts.get(path.removeprefix("/crm/v3/objects/contacts/"))
        if found is None:
            return 404, {"status": "error", "message": "resource not found", "category": "OBJECT_NOT_FOUND"}
        names = ",".join(query.get("properties", [])).split(",")
        stored = found["properties"]
        always = {"hs_object_id", "createdate", "lastmodifieddate"}
        properties = {n: stored.get(n) for n in names if n} | {n: stored[n] for n in always if n in stored}
        return 200, {**found, "properties": properties, "propertiesWithHistory": {}}


@contextmanager
def hubspot_api() -> Iterator[tuple[HubSpotApi, str]]:
    """The fake API on a free port, in a thread of its own (the test itself blocks on HTTP calls)."""
    from urllib.parse import parse_qs, urlsplit

    api = HubSpotApi({"201": json.loads((FIXTURES / "hubspot" / "api_contact_201.json").read_text())})

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urlsplit(self.path)
            status, body = api.answer(url.path, parse_qs(url.query), self.headers.get("Authorization"))
            api.calls.append((time.monotonic(), status))
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # quiet: pytest shows what the test prints
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield api, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def hubspot_call(object_id: int) -> tuple[bytes, dict[str, str]]:
    """A contact.creation notification, v3-signed as HubSpot signs it (over our public URL, with the time)."""
    item = {
        "eventId": 9,
        "subscriptionId": 1,
        "portalId": 8,
        "occurredAt": int(time.time() * 1000),
        "subscriptionType": "contact.creation",
        "objectId": object_id,
    }
    body = json.dumps([item]).encode()
    stamp = str(int(time.time() * 1000))
    signature = signature_v3(HUBSPOT_SECRET.encode(), "POST", PUBLIC_URL + "/hooks/crm", body, stamp)
    headers = {
        "Content-Type": "application/json",
        "X-HubSpot-Signature-v3": signature,
        "X-HubSpot-Request-Timestamp": stamp,
    }
    return body, headers


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_a_call_whose_provider_keeps_failing_holds_back_no_other_contacts_mail(
    tmp_path: Path, db_url: str, smtp: SmtpCatcher, store: Store, servers: Servers
) -> None:
    """A HubSpot call whose CRM API answers 503 sits among order confirmations for other contacts.

    Ordering is per contact: the call says whom it is about (HubSpot contact 201), so the confirmations after
    it go out as fast as those before it, with `ordering_timeout` at its default (5 min) and nothing noted
    `overtook`. They all go out while HubSpot is still down; the call is processed when it is back.
    """
    with hubspot_api() as (api, api_url):
        crm = (
            f"  crm: {{plugin: hubspot, client_secret: {HUBSPOT_SECRET}, app_token: {HUBSPOT_TOKEN}, "
            f"api_base: '{api_url}'}}\n"
        )
        welcome = "  - name: welcome\n    when: contact.created\n    kind: transactional\n"
        welcome += "    send: {via: email, template: welcome}\n"
        config = deployment(tmp_path, db_url, smtp.port, sources=crm, rules=welcome)
        with servers.logs_on_failure():
            declic = servers.start(config)
            before = [post_order(declic.url, i) for i in range(10)]
            body, headers = hubspot_call(201)
            call = request(declic.url + "/hooks/crm", body, headers)
            after = [post_order(declic.url, i) for i in range(10, 20)]
            assert call.status == 200 and [a.status for a in before + after] == [200] * 20

            wait_until(lambda: len(smtp.messages) >= 20, 30, "every order's confirmation, HubSpot still down")
            assert api.down and api.calls and {status for _, status in api.calls} == {503}
            assert store.scalar("SELECT status FROM inbox WHERE id = :id", id=call.body["id"]) == "received"
            assert store.scalar("SELECT count(*) FROM decisions WHERE action = 'overtook'") == 0  # none held
            tries_while_down = len(api.calls)

            api.down = False
            back = time.monotonic()
            wait_until(lambda: len(smtp.messages) >= 21, 30, "the HubSpot contact's welcome once HubSpot is back")
            time.sleep(1.5)
            assert store.scalar("SELECT status FROM inbox WHERE id = :id", id=call.body["id"]) == "processed"
            assert_each_sent_once(smtp, store, {buyer(i) for i in range(20)} | {"lea.moreau@example.org"})

        # `arrived` is appended before `messages`: read second, it is never the shorter.
        arrived = {str(m["To"]): at for m, at in zip(list(smtp.messages), list(smtp.arrived), strict=False)}
        delay_before = [arrived[buyer(i)] - a.at for i, a in enumerate(before)]
        delay_after = [arrived[buyer(i)] - a.at for i, a in enumerate(after, start=10)]
        welcome_after = arrived["lea.moreau@example.org"] - back
    print(
        f"\nFAULT provider-down [{db_url.split(':')[0]}]: HubSpot answered 503 {tries_while_down} times; "
        f"confirmations for other contacts, acknowledgement to mail: before the HubSpot call "
        f"median {statistics.median(delay_before):.2f}s max {max(delay_before):.2f}s, after it median "
        f"{statistics.median(delay_after):.2f}s max {max(delay_after):.2f}s (ordering_timeout 5m, none "
        f"noted `overtook`); HubSpot back: the call processed and its "
        f"contact's mail sent {welcome_after:.2f}s later; duplicated {duplicates(smtp)}"
    )


# --- 5. a template that would never end --------------------------------------------------------------

#: Ten billion iterations: only worker.templates.cpu_time (2 s by default) stops it.
ENDLESS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


def checkout_call(number: int) -> tuple[bytes, dict[str, str]]:
    body = json.loads((FIXTURES / "shopify" / "checkout.json").read_text())
    body.update(id=9_000_000 + number, token=uuid.uuid4().hex)
    data = json.dumps(body).encode()
    return data, shopify_headers(data, SECRET, "checkouts/create", f"checkout-{number}")


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_acknowledgements_stay_fast_while_a_pathological_template_burns_its_cpu_time(
    tmp_path: Path, db_url: str, smtp: SmtpCatcher, store: Store, servers: Servers
) -> None:
    """Orders are acknowledged and confirmed while one step renders a template that only its CPU limit stops;
    that step fails once, for good, with the reason in the journal. Latencies are printed, not asserted."""
    rule = "  - name: cart\n    when: checkout.started\n    kind: transactional\n"
    rule += "    send: {via: email, template: cart}\n"
    config = deployment(
        tmp_path, db_url, smtp.port, rules=rule, templates={"cart.subject.j2": "Cart", "cart.txt.j2": ENDLESS}
    )
    limit = WorkerSpec().templates.cpu_time.total_seconds()
    with servers.logs_on_failure():
        declic = servers.start(config)
        warmup = [post_order(declic.url, i) for i in range(10)]
        baseline = [post_order(declic.url, i) for i in range(10, 110)]

        body, headers = checkout_call(1)
        assert request(declic.url + "/hooks/shop", body, headers).status == 200
        rendering = (
            "SELECT count(*) FROM jobs JOIN enrolments ON enrolments.id = jobs.enrolment_id "
            "WHERE enrolments.rule = 'cart' AND jobs.status = 'running'"
        )
        wait_until(lambda: store.scalar(rendering) > 0 or failed(store), 20, "the render started")
        started = time.monotonic()
        during: list[Answer] = []
        i = 110
        while not failed(store):
            during.append(post_order(declic.url, i))
            i += 1
        assert len(during) > 5, "the render ended before acknowledgements could be measured"
        wait_until(lambda: len(smtp.messages) >= i, 30, "every confirmation")
        time.sleep(1)

        assert [a.status for a in warmup + baseline + during] == [200] * i
        [(status, reason, attempts)] = store.rows("SELECT status, reason, attempts FROM deliveries WHERE rule = 'cart'")
        assert (status, attempts) == ("failed", 1) and f"more than {limit:g}s of CPU time" in reason
        journal = "SELECT action, reason FROM decisions WHERE rule = 'cart' AND action != 'enrolled'"
        assert store.rows(journal) == [("failed", reason)]
        assert store.rows("SELECT status, attempts FROM jobs WHERE kind = 'step' AND status != 'done'") == [("dead", 1)]
        assert_each_sent_once(smtp, store, {buyer(j) for j in range(i)})
        window = during[-1].at - started
    print(
        f"\nFAULT pathological-template [{db_url.split(':')[0]}]: acknowledgement latency without it "
        f"{quantiles([a.seconds for a in baseline])}; "
        f"during the render {quantiles([a.seconds for a in during])}; the step failed once, for good "
        f"(cpu_time {limit:g}s, {window:.2f}s of wall time): {reason!r}; all {i} orders acknowledged and confirmed"
    )


def failed(store: Store) -> bool:
    return store.scalar("SELECT count(*) FROM deliveries WHERE rule = 'cart' AND status = 'failed'") > 0
