"""The history helpers of `if:` (pipeline/history.py): their queries use the indexes that start with the
contact, bad arguments fail the condition with a reason, and they run within the condition's CPU budget."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import jinja2
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from declic_gateway.kit.events import ContactRef, Event
from declic_gateway.kit.templating import (
    RenderLimitExceeded,
    RenderLimits,
    compile_condition,
    evaluate,
    make_environment,
)
from declic_gateway.pipeline.eventlog import store_event
from declic_gateway.pipeline.history import HELPERS, ContactView, Wheres
from declic_gateway.store import DELIVERIES, Database

NOW = datetime(2026, 3, 14, 12, 0, tzinfo=UTC)
ENV = make_environment(None)


def _event(index: int, contact_id: int, kind: str, ago: timedelta, **properties: Any) -> tuple[Event, int]:
    event = Event(
        id=f"e{contact_id}.{index}",
        source="s",
        type=kind,
        occurred_at=NOW - ago,
        contact=ContactRef(),
        properties=properties,
    )
    return event, contact_id


def _fill(conn: Connection) -> None:
    """Contact 1: three views of /pricing (1, 3 and 10 days ago), one of /about, one order. Contact 2: noise."""
    events = [
        _event(1, 1, "page.viewed", timedelta(days=10), path="/pricing"),
        _event(2, 1, "page.viewed", timedelta(days=3), path="/pricing"),
        _event(3, 1, "page.viewed", timedelta(days=2), path="/about"),
        _event(4, 1, "page.viewed", timedelta(days=1), path="/pricing"),
        _event(5, 1, "order.placed", timedelta(hours=5), total=30),
        *[_event(i, 2, "page.viewed", timedelta(hours=i), path="/pricing") for i in range(20)],
    ]
    for event, contact_id in events:
        store_event(conn, event, contact_id)
    conn.execute(
        sa.insert(DELIVERIES),
        [
            {
                "idempotency_key": f"k{i}",
                "enrolment_id": i,
                "rule": "welcome",
                "step": 1,
                "contact_id": 1,
                "sink": "email",
                "status": status,
                "sent_at": NOW - timedelta(days=days),
                "created_at": NOW,
                "updated_at": NOW,
            }
            for i, (status, days) in enumerate([("sent", 2), ("sent", 40), ("suppressed", 1)])
        ],
    )


def _noise(i: int) -> dict[str, Any]:
    """Another contact's recent send of the same rule."""
    return {
        "idempotency_key": f"noise{i}",
        "enrolment_id": 100 + i,
        "rule": "welcome",
        "step": 1,
        "contact_id": 100 + i,
        "sink": "email",
        "status": "sent",
        "sent_at": NOW - timedelta(hours=i % 500),
        "created_at": NOW,
        "updated_at": NOW,
    }


def _ask(conn: Connection, expression: str, contact_id: int = 1) -> Any:
    view = ContactView({"id": contact_id}, conn, NOW, Wheres(ENV))
    return evaluate(compile_condition(ENV, expression), {"contact": view, "event": {}})


# (condition, its value for contact 1)
ANSWERS = [
    ("contact.count('page.viewed')", 4),
    ("contact.count('page.viewed', within='7d')", 3),
    ("contact.count('page.viewed', within='1d12h')", 1),
    ("contact.count('page.viewed', within='P7D', where=\"event.properties.path == '/pricing'\")", 2),
    ("contact.count(['page.viewed', 'order.placed'], within='7d')", 4),
    ("contact.has('order.placed')", True),
    ("contact.has('order.placed', within='1h')", False),
    ("contact.has('order.placed', where='event.properties.total > 50')", False),
    ("contact.last('page.viewed').properties.path", "/pricing"),
    ("contact.last('page.viewed', where=\"event.properties.path == '/about'\").id", "e1.3"),
    ("contact.last('email.opened') is none", True),
    ("contact.sent(rule='welcome')", 2),
    ("contact.sent(rule='welcome', step=1, within='30d')", 1),
    ("contact.sent(rule='other')", 0),
    ("contact.opened(rule='welcome')", False),
]


@pytest.mark.parametrize(("expression", "expected"), ANSWERS, ids=[a for a, _ in ANSWERS])
def test_answers(db: Database, expression: str, expected: Any) -> None:
    with db.engine.begin() as conn:
        _fill(conn)
        assert _ask(conn, expression) == expected


# (condition, what the failure says): the router and the delivery turn it into `if failed: ...`
BAD = [
    ("contact.count(3)", "name an event type"),
    ("contact.count('page.viewed', within='a week')", "invalid duration 'a week'"),
    ("contact.count('page.viewed', within='P1M')", "years and months vary"),
    ("contact.count('page.viewed', where=3)", "where= takes an expression"),
    ("contact.count('page.viewed', where='event.properties.path ==')", "unexpected .end of template"),
    ("contact.sent(step='one')", "step= takes a step number"),
]


@pytest.mark.parametrize(("expression", "message"), BAD, ids=[b for b, _ in BAD])
def test_bad_arguments_fail_the_condition_with_a_reason(db: Database, expression: str, message: str) -> None:
    with db.engine.begin() as conn, pytest.raises((TypeError, ValueError, jinja2.TemplateSyntaxError), match=message):
        _ask(conn, expression)


def test_a_where_runs_within_the_condition_cpu_budget(db: Database) -> None:
    with db.engine.begin() as conn:
        _fill(conn)
        view = ContactView({"id": 2}, conn, NOW, Wheres(ENV))
        condition = compile_condition(ENV, "contact.count('page.viewed', where='event.id') > 0")
        with pytest.raises(RenderLimitExceeded, match="CPU time"):
            evaluate(condition, {"contact": view}, RenderLimits(cpu_time=0.0))


def test_helpers_refuse_to_run_after_the_transaction(db: Database) -> None:
    with db.engine.begin() as conn:
        view = ContactView({"id": 1}, conn, NOW, Wheres(ENV))
    with pytest.raises(RuntimeError, match="not in message templates"):
        view.count("page.viewed")


def test_the_helpers_are_listed_for_declic_check() -> None:
    assert all(callable(getattr(ContactView, name)) for name in HELPERS)
    assert set(HELPERS) == {"count", "has", "last", "sent", "opened", "clicked"}


def _statements(conn: Connection, expression: str) -> list[tuple[str, Any]]:
    seen: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        seen.append((statement, parameters))

    sa.event.listen(conn, "before_cursor_execute", record)
    try:
        _ask(conn, expression)
    finally:
        sa.event.remove(conn, "before_cursor_execute", record)
    return seen


PLANS = [
    ("contact.count('page.viewed', within='7d')", "ix_events_contact_history"),
    ("contact.has('order.placed')", "ix_events_contact_history"),
    (
        "contact.count('page.viewed', within='7d', where=\"event.properties.path == '/pricing'\")",
        "ix_events_contact_history",
    ),
    ("contact.last('page.viewed')", "ix_events_contact_history"),
    ("contact.sent(rule='welcome', within='30d')", "ix_deliveries_contact_"),  # PostgreSQL may take either
    ("contact.sent()", "ix_deliveries_contact_"),  # _id or _history: both start with the contact
]


@pytest.mark.parametrize(("expression", "index"), PLANS, ids=[p for p, _ in PLANS])
def test_each_question_reads_an_index_that_starts_with_the_contact(db: Database, expression: str, index: str) -> None:
    """Never a scan of the table: what a question costs grows with the contact's history, not the table's."""
    with db.engine.begin() as conn:
        _fill(conn)
        [(statement, parameters)] = _statements(conn, expression)
        if conn.dialect.name == "sqlite":
            plan = " ".join(str(row[-1]) for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters))
            assert re.search(f"USING (COVERING )?INDEX {index}[a-z_]* \\(contact_id=\\?", plan), plan
        else:
            # The table as it is in production: other contacts' sends of the same rule (which the KPI index,
            # led by the rule, would read through), and statistics about it.
            conn.execute(sa.insert(DELIVERIES), [_noise(i) for i in range(2000)])
            conn.exec_driver_sql("ANALYZE deliveries")
            conn.exec_driver_sql("ANALYZE events")
            # A few rows make a sequential scan cheapest: forbid it, and see which index the planner takes then.
            conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
            plan = " ".join(row[0] for row in conn.exec_driver_sql(f"EXPLAIN {statement}", parameters))
            assert index in plan and "contact_id" in plan.split(index, 1)[1]
        assert "SCAN events" not in plan and "SCAN deliveries" not in plan, plan
