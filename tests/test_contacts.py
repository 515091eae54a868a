"""What the core does with contacts: identity, e-mail change, erasure, delivery feedback."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from conftest import postgres_database
from declic_gateway.config import load_config
from declic_gateway.http.app import create_app
from declic_gateway.http.running import GATEWAY_KEY
from declic_gateway.kit.events import ContactRef, PushRef
from declic_gateway.pipeline import contacts
from declic_gateway.plugins import collect, get_plugin_manager
from declic_gateway.store import Database
from declic_gateway.testing import FakeClock, ScriptedPlugin, SmtpCatcher, write_deployment


class Deployment:
    def __init__(self, client: Any, app: Any, clock: FakeClock):
        self.client, self.gateway, self.clock = client, app[GATEWAY_KEY], clock

    async def emit(self, *events: dict[str, Any]) -> None:
        response = await self.client.post("/hooks/in/tok", data=json.dumps(events).encode())
        assert response.status == 200
        await self.gateway.worker.drain()

    async def advance(self, **delta: float) -> None:
        self.clock.advance(timedelta(**delta))
        await self.gateway.worker.drain()

    def rows(self, sql: str) -> list[Any]:
        with self.gateway.db.engine.connect() as conn:
            return list(conn.exec_driver_sql(sql))


@pytest.fixture
async def d(aiohttp_client: Any, tmp_path: Path, db_url: str, smtp: SmtpCatcher) -> Deployment:
    return await deployment(aiohttp_client, tmp_path, db_url, smtp)


NURTURE = """\
  - name: nurture
    when: track.signed_up
    kind: transactional
    steps:
      - send: {via: email, template: hello}
      - wait: 1d
        send: {via: email, template: hello}
"""


async def deployment(
    aiohttp_client: Any, tmp_path: Path, db_url: str, smtp: SmtpCatcher, rules: str = NURTURE
) -> Deployment:
    pm = get_plugin_manager(extra=[ScriptedPlugin()])
    config = f"""\
storage: {{url: '{db_url}'}}
sources:
  in: {{plugin: scripted, url_token: tok}}
sinks:
  email: {{plugin: smtp, host: 127.0.0.1, port: {smtp.port}, tls: none, sender: shop@example.com}}
rules:
{rules}"""
    path = write_deployment(tmp_path, config, {"hello.txt.j2": "Hello", "hello.subject.j2": "Hi"})
    settings = load_config(path, collect(pm), pm)
    clock = FakeClock(datetime(2026, 6, 1, tzinfo=UTC))
    app = create_app(settings, pm=pm, clock=clock, role="web")
    return Deployment(await aiohttp_client(app), app, clock)


def signed_up(email: str, **contact: Any) -> dict[str, Any]:
    return {"type": "track.signed_up", "contact": {"email": email, **contact}, "correlation": [f"signup:{email}"]}


async def test_one_person_across_sources_is_one_contact(d: Deployment) -> None:
    await d.emit(
        {"type": "customer.created", "contact": {"external_ids": {"shopify": "1"}, "email": "Ada@Example.com"}}
    )
    await d.emit({"type": "page.viewed", "contact": {"email": "ada@example.com", "phone": "+33612345678"}})
    await d.emit({"type": "customer.updated", "contact": {"external_ids": {"shopify": "1"}, "first_name": "Ada"}})
    assert d.rows("SELECT id, email, phone, first_name FROM contacts") == [
        (1, "ada@example.com", "+33612345678", "Ada")
    ]


async def test_an_email_change_keeps_the_contact_and_mails_the_new_address(d: Deployment, smtp: SmtpCatcher) -> None:
    await d.emit(signed_up("old@example.com"))
    await d.emit(
        {"type": "profile.updated", "contact": {"previous_email": "old@example.com", "email": "new@example.com"}}
    )
    await d.advance(days=1)
    assert [m["To"] for m in smtp.messages] == ["old@example.com", "new@example.com"]
    assert d.rows("SELECT count(*) FROM contacts") == [(1,)]


async def test_erasure_forgets_the_person_and_ends_their_journeys(d: Deployment, smtp: SmtpCatcher) -> None:
    await d.emit(signed_up("ada@example.com", first_name="Ada", external_ids={"crm": "77"}))
    await d.emit({"type": "contact.erased", "contact": {"external_ids": {"crm": "77"}}})
    await d.advance(days=2)
    assert len(smtp.messages) == 1  # the first step went out before the request; the second never does
    assert d.rows("SELECT email, first_name, email_status FROM contacts") == [(None, None, "erased")]
    assert d.rows("SELECT kind FROM identities ORDER BY kind") == []  # never found again (erasure sticks)
    bodies = d.rows("SELECT status, body FROM inbox ORDER BY id")
    assert bodies[0] == ("erased", b"")
    assert d.rows("SELECT status FROM enrolments") == [("exited",)]
    assert "ada" not in json.dumps([list(r) for r in d.rows("SELECT properties, correlation FROM events")])


async def test_an_erasure_in_the_same_call_also_blanks_what_that_call_journalled(d: Deployment) -> None:
    # Journal rows are written when the transaction ends (store/appends.py): the erasure must reach them too.
    ada = signed_up("ada@example.com", external_ids={"crm": "77"})
    await d.emit(ada, ada, {"type": "contact.erased", "contact": {"external_ids": {"crm": "77"}}})
    journal = d.rows("SELECT action, reason FROM decisions ORDER BY id")
    assert [action for action, _ in journal] == ["enrolled", "not_enrolled"]
    assert [reason for _, reason in journal] == [None, None]  # "already enrolled for signup:ada@..." is gone


async def test_a_contact_new_in_a_batch_is_enrolled_once_per_occurrence_and_within_reenter(
    aiohttp_client: Any, tmp_path: Path, db_url: str, smtp: SmtpCatcher
) -> None:
    """A contact created by the batch of calls being applied is enrolled without asking the database whether
    it already is (nobody else has seen it): the batch's own enrolments of it still count, for the same
    occurrence and for `reenter: never`."""
    rules = """\
  - name: cart
    when: checkout.started
    kind: transactional
    send: {via: email, template: hello}
  - name: first-checkout
    when: checkout.started
    kind: transactional
    reenter: never
    send: {via: email, template: hello}
"""
    d = await deployment(aiohttp_client, tmp_path, db_url, smtp, rules)

    def checkout(key: str) -> dict[str, Any]:
        return {"type": "checkout.started", "contact": {"email": "eve@example.com"}, "correlation": [key]}

    await apply_together(d, [checkout("checkout:1"), checkout("checkout:1")], [checkout("checkout:2")])
    assert d.rows("SELECT rule, occurrence FROM enrolments ORDER BY id") == [
        ("cart", "checkout:1"),
        ("first-checkout", "checkout:1"),
        ("cart", "checkout:2"),
    ]
    journal = d.rows("SELECT rule, action, reason FROM decisions WHERE action != 'send' ORDER BY id")
    assert [(rule, action) for rule, action, _ in journal] == [
        ("cart", "enrolled"),
        ("first-checkout", "enrolled"),
        ("cart", "not_enrolled"),
        ("first-checkout", "not_enrolled"),
        ("cart", "enrolled"),
        ("first-checkout", "not_enrolled"),
    ]
    assert journal[2][2] == "already enrolled for occurrence checkout:1"
    assert journal[3][2].startswith("reenter never: enrolled")
    assert journal[5][2].startswith("reenter never: enrolled")
    assert len(smtp.messages) == 3  # one per enrolment, none twice
    assert d.rows("SELECT count(*) FROM jobs WHERE kind = 'step'") == [(3,)]


async def apply_together(d: Deployment, *calls: list[dict[str, Any]]) -> list[str]:
    """Post the calls, then apply them in one batch; return the SQL statements that ran."""
    statements: list[str] = []

    def capture(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    for events in calls:
        assert (await d.client.post("/hooks/in/tok", data=json.dumps(events).encode())).status == 200
    sa.event.listen(d.gateway.db.engine, "before_cursor_execute", capture)
    try:
        await d.gateway.worker.drain()
    finally:
        sa.event.remove(d.gateway.db.engine, "before_cursor_execute", capture)
    return statements


def lookups(statements: list[str]) -> int:
    return sum(s.startswith("SELECT identities.kind, identities.value, identities.contact_id") for s in statements)


async def test_calls_applied_together_look_up_their_contacts_once_and_see_each_others_writes(d: Deployment) -> None:
    """A batch of calls reads who they are about in one statement (docs/performance.md), yet each call sees
    the contacts the calls before it created or erased."""
    statements = await apply_together(
        d,
        [signed_up("bob@example.com"), signed_up("BOB@example.com", first_name="Bob")],  # created, then found
        [signed_up("bob@example.com", last_name="Lee")],
        # Erased, then back in the same call: erasure sticks, the address starts a new contact.
        [{"type": "contact.erased", "contact": {"email": "bob@example.com"}}, signed_up("bob@example.com")],
        [signed_up("cy@example.com")],
    )
    assert d.rows("SELECT id, email, email_status FROM contacts ORDER BY id") == [
        (1, None, "erased"),
        (2, "bob@example.com", "ok"),
        (3, "cy@example.com", "ok"),
    ]
    assert d.rows("SELECT contact_id FROM identities WHERE kind = 'email'") == [(2,), (3,)]
    assert d.rows("SELECT contact_id FROM events ORDER BY id") == [(1,), (1,), (1,), (1,), (2,), (3,)]
    # One for the batch; once the erasure removed identities, each event after it reads the database again.
    assert lookups(statements) == 3
    # New contacts and their identities are queued with the transaction's rows: none waits for an id of its own.
    assert [s for s in statements if s.startswith("INSERT INTO contacts") and "RETURNING" in s] == []


@pytest.fixture
def pg_url() -> Iterator[str]:
    yield from postgres_database()


@pytest.mark.postgres
async def test_on_postgresql_a_batch_of_calls_and_its_sends_wait_for_the_server_only_where_they_read(
    aiohttp_client: Any, tmp_path: Path, pg_url: str, smtp: SmtpCatcher
) -> None:
    """On a database across a network each wait for an answer costs a round trip (SQLite runs in the process):
    applying calls waits for the contacts' lookup; a new contact, its identities and its enrolment take ids
    read ahead (one read per table for the batch) and go out with the COMMIT, as closing the calls, recording
    the sends and finishing their steps do (psycopg's pipeline mode)."""
    from psycopg import pq

    d = await deployment(aiohttp_client, tmp_path, pg_url, smtp)

    waited: list[tuple[str, bool]] = []  # (statement, run in the pipeline: nothing waits for its answer)

    def capture(conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        pipelined = conn.connection.driver_connection.pgconn.pipeline_status != pq.PipelineStatus.OFF
        waited.append((" ".join(statement.split()), pipelined))

    await d.gateway.worker.drain()  # the start-up's own jobs (triggers, retention) first
    for email in ["ana@example.com", "ben@example.com", "cy@example.com"]:
        assert (await d.client.post("/hooks/in/tok", data=json.dumps([signed_up(email)]).encode())).status == 200
    sa.event.listen(d.gateway.db.engine, "before_cursor_execute", capture)
    try:
        await d.gateway.worker.drain()
    finally:
        sa.event.remove(d.gateway.db.engine, "before_cursor_execute", capture)
    assert len(smtp.messages) == 3
    writes = [(s, piped) for s, piped in waited if s.startswith(("INSERT", "UPDATE"))]
    # Nobody reads the answer of a write without RETURNING: none waits for it on its own.
    assert [s for s, piped in writes if "RETURNING" not in s and not piped] == []
    closing = ["UPDATE inbox", "UPDATE jobs", "INSERT INTO events", "INSERT INTO deliveries", "INSERT INTO jobs"]
    new = ["INSERT INTO contacts", "INSERT INTO identities", "INSERT INTO enrolments"]
    for statement in [*closing, *new]:
        assert any(s.startswith(statement) and piped for s, piped in writes), statement
    assert [s for s, piped in waited if s.startswith(tuple(new)) and not piped] == []
    # What waits for ids, per batch: the contacts' and the enrolments', read ahead from their sequences.
    assert sum(s.startswith("SELECT nextval(") for s, _ in waited) == 2


@pytest.mark.postgres
async def test_on_postgresql_a_contact_another_transaction_creates_meanwhile_is_joined_not_doubled(
    aiohttp_client: Any, tmp_path: Path, pg_url: str, smtp: SmtpCatcher
) -> None:
    """A new contact's identities go out with the COMMIT, counted free since the batch read them. When another
    transaction (another replica) links the same address in between, that write fails on the key: the batch
    runs again and the call lands on their contact. The call does not fail, and one address stays one person."""
    d = await deployment(aiohttp_client, tmp_path, pg_url, smtp)
    await d.gateway.worker.drain()
    assert (
        await d.client.post("/hooks/in/tok", data=json.dumps([signed_up("ana@example.com")]).encode())
    ).status == 200
    with d.gateway.db.engine.connect() as other, d.gateway.db.engine.connect() as watch:
        theirs, _ = contacts.upsert(other, ContactRef(email="ana@example.com"), "elsewhere", datetime.now(UTC))
        draining = asyncio.create_task(d.gateway.worker.drain())  # reads ana free: the row above is uncommitted
        waiting = (  # this test's database only: other tests may run beside it on the same server
            "SELECT count(*) FROM pg_locks WHERE NOT granted"
            " AND pid IN (SELECT pid FROM pg_stat_activity WHERE datname = current_database())"
        )
        for _ in range(200):  # until the batch's write of ana's address waits for the other transaction
            if draining.done() or watch.exec_driver_sql(waiting).scalar():
                break
            await asyncio.sleep(0.025)
        assert not draining.done(), "the batch did not wait for the other transaction's address"
        other.commit()
        await draining

    assert d.rows("SELECT status FROM inbox") == [("processed",)]
    assert d.rows("SELECT id, email FROM contacts") == [(theirs["id"], "ana@example.com")]
    assert d.rows("SELECT contact_id FROM identities WHERE kind = 'email'") == [(theirs["id"],)]
    assert d.rows("SELECT contact_id FROM events") == [(theirs["id"],)]
    assert [m["To"] for m in smtp.messages] == ["ana@example.com"]


async def test_on_sqlite_a_batchs_new_contacts_and_their_enrolments_are_written_one_statement_per_table(
    aiohttp_client: Any, tmp_path: Path, smtp: SmtpCatcher
) -> None:
    """SQLite's transaction holds the only write lock, so the ids of new contacts and of their enrolments are
    the tables' next ones: their rows go out with the batch's other queued rows, and ids carry on from what
    is stored, also when a known contact's enrolment (which asks the database) comes between new ones."""
    d = await deployment(aiohttp_client, tmp_path, f"sqlite:///{tmp_path}/declic.db", smtp)
    await d.gateway.worker.drain()
    inserts = await apply_together(d, [signed_up("ana@example.com")], [signed_up("ben@example.com")])
    assert sum(s.startswith("INSERT INTO contacts") for s in inserts) == 1
    assert sum(s.startswith("INSERT INTO identities") for s in inserts) == 1
    assert sum(s.startswith("INSERT INTO enrolments") for s in inserts) == 1
    again = {"type": "track.signed_up", "contact": {"email": "ana@example.com"}, "correlation": ["signup:again"]}
    await apply_together(d, [signed_up("cy@example.com")], [again], [signed_up("dee@example.com")])
    assert d.rows("SELECT id, email FROM contacts ORDER BY id") == [
        (1, "ana@example.com"),
        (2, "ben@example.com"),
        (3, "cy@example.com"),
        (4, "dee@example.com"),
    ]
    assert d.rows("SELECT kind, value, contact_id FROM identities ORDER BY contact_id, kind") == [
        (kind, value, n)
        for n, email in enumerate(["ana", "ben", "cy", "dee"], start=1)
        for kind, value in [("declic", str(n)), ("email", f"{email}@example.com")]
    ]
    assert d.rows("SELECT id, contact_id, occurrence FROM enrolments ORDER BY id") == [
        (1, 1, "signup:ana@example.com"),
        (2, 2, "signup:ben@example.com"),
        (3, 3, "signup:cy@example.com"),
        (4, 1, "signup:again"),
        (5, 4, "signup:dee@example.com"),
    ]
    assert d.rows("SELECT enrolment_id FROM jobs WHERE kind = 'step' AND step = 0 ORDER BY enrolment_id") == [
        (n,) for n in range(1, 6)
    ]
    assert sorted(m["To"] for m in smtp.messages) == sorted(
        f"{name}@example.com" for name in ["ana", "ben", "cy", "ana", "dee"]
    )


async def test_steps_prepared_together_read_their_enrolments_and_deliveries_once(
    d: Deployment, smtp: SmtpCatcher
) -> None:
    """Steps due together are prepared in one transaction (`Grouped`), which reads their enrolments, events and
    contacts in one statement and their delivery rows in another, instead of two statements per step."""
    people = [f"p{n}@example.com" for n in range(10)]
    await d.gateway.worker.drain()  # the start-up's own jobs (triggers, retention) first
    statements = await apply_together(d, [signed_up(email) for email in people])  # ten steps due at once
    assert sorted(m["To"] for m in smtp.messages) == sorted(people)
    enrolment_reads = [s for s in statements if s.startswith("SELECT enrolments.id, enrolments.rule")]
    delivery_reads = [s for s in statements if s.startswith("SELECT deliveries.idempotency_key, deliveries.status")]
    # The ten claimed together are prepared together.
    assert (len(enrolment_reads), len(delivery_reads)) == (1, 1)
    await d.advance(days=1)  # the second steps: what was read ahead did not stand in for the first steps' rows
    assert len(smtp.messages) == 20
    assert d.rows("SELECT count(*), count(DISTINCT idempotency_key) FROM deliveries WHERE status = 'sent'") == [
        (20, 20)
    ]


async def test_a_merge_in_a_batch_is_seen_by_the_calls_after_it(d: Deployment) -> None:
    await d.emit({"type": "page.viewed", "contact": {"external_ids": {"site_anonymous": "b7"}}})  # anonymous: 1
    await d.emit(signed_up("ada@example.com", external_ids={"crm": "c1"}))  # 2
    aliased = {"external_ids": {"crm": "c1"}, "previous_ids": {"site_anonymous": "b7"}}
    viewed = {"type": "page.viewed", "contact": {"external_ids": {"site_anonymous": "b7"}}}
    statements = await apply_together(
        d, [{**viewed, "properties": {"path": "/"}}], [{"type": "contact.aliased", "contact": aliased}, viewed]
    )
    # Ada's account named the visitor: its id moved to her, and the page view after it is hers.
    assert d.rows("SELECT contact_id FROM identities WHERE value = 'b7'") == [(2,)]
    assert d.rows("SELECT contact_id FROM events WHERE type = 'page.viewed' ORDER BY id") == [(1,), (1,), (2,)]
    assert lookups(statements) == 2


async def test_provider_feedback_lands_on_the_delivery(d: Deployment, smtp: SmtpCatcher) -> None:
    await d.emit(signed_up("ada@example.com"))
    [(provider_id,)] = d.rows("SELECT provider_id FROM deliveries")
    await d.emit(
        {
            "type": "email.bounced",
            "contact": {"email": "ada@example.com"},
            "properties": {"provider_message_id": provider_id, "bounce": "hard"},
        }
    )
    assert d.rows("SELECT feedback FROM deliveries") == [("bounced",)]
    assert d.rows("SELECT email_status FROM contacts") == [("bouncing",)]
    await d.advance(days=1)
    assert d.rows("SELECT step, status, reason FROM deliveries ORDER BY step")[1] == (
        2,
        "suppressed",
        "email address is bouncing",
    )


async def test_feedback_finds_the_delivery_by_declics_key_or_its_message_id(d: Deployment) -> None:
    await d.emit(signed_up("ada@example.com"))
    [(key, message_id)] = d.rows("SELECT idempotency_key, provider_id FROM deliveries")
    assert message_id.startswith(f"<{key}@")  # the SMTP sink's own Message-ID names the delivery
    ada = {"email": "ada@example.com"}
    await d.emit({"type": "email.opened", "contact": ada, "properties": {"message_id": message_id}})
    assert d.rows("SELECT feedback FROM deliveries") == [("opened",)]
    machine = {"delivery": key, "machine": True, "machine_reasons": ["robot-agent"]}
    await d.emit({"type": "email.clicked", "contact": ada, "properties": machine})
    assert d.rows("SELECT feedback FROM deliveries") == [("opened",)]  # a machine's click is no feedback
    await d.emit({"type": "email.clicked", "contact": ada, "properties": {"delivery": key}})
    await d.emit({"type": "email.complained", "contact": ada, "properties": {"delivery": key}})
    await d.emit({"type": "email.unsubscribed", "contact": ada, "properties": {"delivery": key}})
    # Longer than the 20 characters the column once had, which PostgreSQL refused.
    assert d.rows("SELECT feedback FROM deliveries") == [("clicked,complained,opened,unsubscribed",)]


async def test_a_providers_clicks_on_two_links_at_once_are_a_scanners(d: Deployment) -> None:
    await d.emit(signed_up("ada@example.com"))
    [(key,)] = d.rows("SELECT idempotency_key FROM deliveries")
    for url in ("https://shop.example.com/a", "https://shop.example.com/b"):
        click = {"delivery": key, "url": url, "machine": False, "machine_reasons": []}
        await d.emit({"type": "email.clicked", "contact": {"email": "ada@example.com"}, "properties": click})
    flags = [json.loads(p) for (p,) in d.rows("SELECT properties FROM events WHERE type = 'email.clicked' ORDER BY id")]
    assert [(f["machine"], f["machine_reasons"]) for f in flags] == [(True, ["burst"]), (True, ["burst"])]
    assert d.rows("SELECT feedback FROM deliveries") == [(None,)]


async def test_an_erased_contact_is_never_relinked_later_news_starts_a_new_contact(d: Deployment) -> None:
    await d.emit(signed_up("ada@example.com", first_name="Ada", external_ids={"crm": "77"}))
    await d.emit({"type": "contact.erased", "contact": {"external_ids": {"crm": "77"}}})
    await d.emit(
        {
            "type": "customer.updated",
            "contact": {"external_ids": {"crm": "77"}, "email": "ada@example.com", "first_name": "Ada"},
        }
    )
    assert d.rows("SELECT id, email, first_name, email_status FROM contacts ORDER BY id") == [
        (1, None, None, "erased"),
        (2, "ada@example.com", "Ada", "ok"),
    ]
    assert d.rows("SELECT DISTINCT contact_id FROM identities") == [(2,)]
    assert d.rows("SELECT type FROM events WHERE contact_id = 2") == [("customer.updated",)]  # no history


async def test_push_subscriptions_are_kept_moved_and_forgotten(d: Deployment) -> None:
    device = {"kind": "webpush", "address": "https://push.example.net/sub/1", "keys": {"p256dh": "k", "auth": "a"}}
    await d.emit({"type": "profile.updated", "contact": {"email": "a@example.com", "push_subscriptions": [device]}})
    await d.emit({"type": "profile.updated", "contact": {"email": "b@example.com", "push_subscriptions": [device]}})
    assert d.rows("SELECT c.email FROM push_subscriptions p JOIN contacts c ON c.id = p.contact_id") == [
        ("b@example.com",)
    ]  # a shared browser now belongs to whoever subscribed last


async def test_phones_are_stored_in_e164_so_a_stop_reply_finds_the_person(
    aiohttp_client: Any, tmp_path: Path, db_url: str, smtp: SmtpCatcher
) -> None:
    pm = get_plugin_manager(extra=[ScriptedPlugin()])
    config = f"storage: {{url: '{db_url}'}}\nphone_region: FR\nsources:\n  in: {{plugin: scripted, url_token: tok}}\n"
    settings = load_config(write_deployment(tmp_path, config), collect(pm), pm)
    app = create_app(settings, pm=pm, clock=FakeClock(datetime(2026, 6, 1, tzinfo=UTC)), role="web")
    d = Deployment(await aiohttp_client(app), app, FakeClock())
    await d.emit({"type": "customer.created", "contact": {"email": "a@example.com", "phone": "06 12 34 56 78"}})
    await d.emit(
        {
            "type": "customer.created",
            "contact": {"email": "b@example.com", "phone": "(415) 555-0100", "attributes": {"country": "US"}},
        }
    )
    await d.emit({"type": "sms.opted_out", "contact": {"phone": "+33612345678", "consent": {"sms": "withdrawn"}}})
    rows = d.rows("SELECT email, phone, consent FROM contacts ORDER BY id")
    assert [(email, phone, "withdrawn" in consent) for email, phone, consent in rows] == [
        ("a@example.com", "+33612345678", True),
        ("b@example.com", "+14155550100", False),
    ]


async def test_a_new_phone_number_clears_an_invalid_mark(d: Deployment) -> None:
    await d.emit({"type": "customer.created", "contact": {"email": "a@example.com", "phone": "+33600000000"}})
    with d.gateway.db.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE contacts SET phone_status = 'invalid'")
    await d.emit({"type": "customer.updated", "contact": {"email": "a@example.com", "phone": "+33612345678"}})
    assert d.rows("SELECT phone, phone_status FROM contacts") == [("+33612345678", "ok")]


@pytest.mark.parametrize(
    "second",
    [
        None,
        ContactRef(email="ADA@example.com", first_name="Ada", attributes={"plan": "pro"}),
        ContactRef(
            external_ids={"shopify": "1"},
            phone="+33612345678",
            consent={"email": "withdrawn", "sms": "granted"},
            push_subscriptions=[PushRef(kind="fcm", address="token-2")],
        ),
    ],
)
def test_the_contact_upsert_returns_is_the_one_stored(db_url: str, second: ContactRef | None) -> None:
    """Rules and templates see what upsert returns; it is built without reading back, so it must match."""
    first = ContactRef(
        email="ada@example.com",
        external_ids={"shopify": "1", "hubspot": "77"},
        first_name="Ada",
        timezone="Europe/Paris",
        attributes={"birthday": "1990-02-28", "nothing": None},
        consent={"email": "granted"},
        push_subscriptions=[PushRef(kind="webpush", address="https://push.example/1", keys={"auth": "a"})],
    )
    database = Database(db_url)
    database.upgrade()
    now = datetime(2026, 6, 1, tzinfo=UTC)
    try:
        for ref in [first] if second is None else [first, second]:
            returned, _ = database.transaction(contacts.upsert, ref, "test", now)
            assert returned == database.transaction(contacts.load, returned["id"])
    finally:
        database.close()


async def test_processing_an_event_and_sending_never_scans_a_whole_table(
    aiohttp_client: Any, tmp_path: Path, smtp: SmtpCatcher
) -> None:
    """Each statement of the hot path finds its rows through an index: its cost must not grow with the tables.
    (SQLite's plans: PostgreSQL's planner rightly scans tables this small.)"""
    d = await deployment(aiohttp_client, tmp_path, f"sqlite:///{tmp_path / 'plans.db'}", smtp)
    seen: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, many: bool) -> None:
        if not many and statement.lstrip().upper().startswith(("SELECT", "UPDATE", "DELETE")):
            seen.append((statement, parameters))

    await d.emit(signed_up("ada@example.com", external_ids={"shopify": "1"}))  # a contact to find again
    sa.event.listen(d.gateway.db.engine, "before_cursor_execute", capture)
    try:
        await d.emit(signed_up("ada@example.com", first_name="Ada"))
        await d.emit(signed_up("bob@example.com", phone="+33612345678"))
        await d.advance(days=1)
    finally:
        sa.event.remove(d.gateway.db.engine, "before_cursor_execute", capture)

    scans = []
    with d.gateway.db.engine.connect() as conn:
        for statement, parameters in seen:
            for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters):
                if row[-1].startswith("SCAN ") and "CONSTANT ROW" not in row[-1]:
                    scans.append(f"{row[-1]}: {statement}")
    assert len(seen) > 20
    assert sorted(set(scans)) == []
