"""A contact's past as `if:` sees it: `contact.count`, `has`, `last`, `sent`, `opened` and `clicked`.

Both a rule's `if:` (at enrolment) and a step's `if:` (at send time) get a ContactView: the contact's
fields, plus the helpers named in HELPERS. Each helper is one query that starts from the contact (events
by contact, type and time; deliveries by contact), so what it costs grows with that contact's own
history, never with the size of the tables (docs/performance.md). `where=` is an expression compiled
once and evaluated against each of the contact's matching events, under the condition's CPU budget.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any

import jinja2
import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection

from ..config.conditions import HELPERS
from ..insight import journal
from ..kit.context import Known
from ..kit.durations import parse_duration
from ..kit.templating import compile_condition, spend
from ..store import DELIVERIES, EVENTS, jsoncodec

__all__ = ["HELPERS", "ContactView", "Wheres", "record_problems"]
log = structlog.get_logger("declic.history")
V = EVENTS.c
D = DELIVERIES.c

#: `where=` reads at most this many of the contact's latest events of the type(s) asked, so that one
#: contact with a runaway history (a bot's page views) cannot hold the database thread.
MAX_SCANNED = 10_000
#: Distinct `where=` expressions kept compiled; they come from the config, so a handful in practice.
MAX_COMPILED = 256


class Wheres:
    """`where=` expressions compiled once per environment (the router's and the worker's)."""

    def __init__(self, env: jinja2.Environment):
        self.env = env
        self._compiled: dict[str, Any] = {}

    def compiled(self, expression: str) -> Any:
        """Raises jinja2.TemplateSyntaxError when the text is not an expression."""
        found = self._compiled.get(expression)
        if found is None:
            if len(self._compiled) >= MAX_COMPILED:  # an expression built at run time: don't grow without end
                self._compiled.clear()
            found = self._compiled[expression] = compile_condition(self.env, expression)
        return found


class ContactView(Known):
    """The contact as `if:` and templates see it, with its history (HELPERS).

    Valid only within the transaction it was made in: a template rendered later may read the fields,
    not call the helpers.
    """

    def __init__(
        self,
        fields: dict[str, Any],
        conn: Connection,
        now: datetime,
        wheres: Wheres | None = None,
    ):
        super().__init__("contact", fields)
        self._conn = conn
        self._now = now
        self._wheres = wheres
        self._feedback: list[tuple[str, int, str]] | None = None
        #: `where=` failures since the last _take_problems(), the first per expression: journalled by the caller.
        self._problems: dict[str, str] = {}

    def count(self, event: str | Iterable[str], within: Any = None, where: str | None = None) -> int:
        """How many events of this type (or types) the contact has, within a duration back from now,
        for which `where` is true; the event being routed counts too."""
        query = self._events(event, within)
        if where is None:
            counted = sa.select(sa.func.count()).select_from(query.subquery())
            return int(self._connection().execute(counted).scalar_one())
        return sum(1 for _ in self._matching(query, where))

    def has(self, event: str | Iterable[str], within: Any = None, where: str | None = None) -> bool:
        """Whether the contact has at least one such event: `count(...) > 0`, stopping at the first."""
        query = self._events(event, within)
        if where is None:
            return self._connection().execute(sa.select(query.exists())).scalar_one() is True
        return next(iter(self._matching(query, where)), None) is not None

    def last(self, event: str | Iterable[str], within: Any = None, where: str | None = None) -> dict[str, Any] | None:
        """The contact's latest such event (`{type, occurred_at, properties, ...}`), or none."""
        return next(iter(self._matching(self._events(event, within), where)), None)

    def sent(self, rule: str | None = None, step: int | None = None, within: Any = None) -> int:
        """How many messages were sent to the contact (of that rule and step, within that duration back)."""
        query = sa.select(sa.func.count()).where(D.contact_id == self["id"], D.status == "sent")
        if rule is not None:
            query = query.where(D.rule == str(rule))
        if step is not None:
            query = query.where(D.step == _step(step))
        if within is not None:
            query = query.where(D.sent_at >= self._since(within))
        return int(self._connection().execute(query).scalar_one())

    def opened(self, rule: str | None = None, step: int | None = None) -> bool:
        """Whether a person opened (or clicked) a message of that rule and step; machines' opens do not count."""
        return self._did("opened", rule, step) or self._did("clicked", rule, step)

    def clicked(self, rule: str | None = None, step: int | None = None) -> bool:
        """Whether a person clicked a message of that rule and step; machines' clicks do not count."""
        return self._did("clicked", rule, step)

    def _take_problems(self) -> list[str]:
        """The `where=` failures since the last call: one per expression, however many events it failed on."""
        problems, self._problems = list(self._problems.values()), {}
        return problems

    def _did(self, what: str, rule: str | None, step: int | None) -> bool:
        if self._feedback is None:  # read when a condition first asks: most steps never do
            rows = self._connection().execute(_FEEDBACK, {"contact_id": self["id"]})
            self._feedback = [(r.rule, r.step, r.feedback) for r in rows]
        return any(what in seen.split(",") and rule in (None, r) and step in (None, s) for r, s, seen in self._feedback)

    def _connection(self) -> Connection:
        if self._conn.closed:
            raise RuntimeError("contact history helpers work in `if:` conditions, not in message templates")
        return self._conn

    def _events(self, event: str | Iterable[str], within: Any) -> sa.Select[Any]:
        types = [event] if isinstance(event, str) else list(event) if isinstance(event, (list, tuple)) else None
        if not types or not all(isinstance(t, str) for t in types):
            raise TypeError(f"name an event type, as contact.count('page.viewed'), not {event!r}")
        query = sa.select(V.id, V.source, V.type, V.occurred_at, V.correlation, V.properties).where(
            V.contact_id == self["id"], V.type.in_(types) if len(types) > 1 else V.type == types[0]
        )
        if within is not None:
            query = query.where(V.occurred_at >= self._since(within))
        return query

    def _since(self, within: Any) -> datetime:
        return self._now - _duration(within)

    def _matching(self, query: sa.Select[Any], where: str | None) -> Iterable[dict[str, Any]]:
        """The events the query finds, latest first, for which `where` holds."""
        test = self._where(where)
        latest = query.order_by(V.occurred_at.desc(), V.id.desc()).limit(1 if test is None else MAX_SCANNED)
        rows = self._connection().execute(latest)
        try:
            for row in rows:
                spend()
                event = _event(row)
                if test is None or test(event):
                    yield event
        finally:
            rows.close()

    def _where(self, where: str | None) -> Callable[[dict[str, Any]], bool] | None:
        if where is None:
            return None
        if not isinstance(where, str) or self._wheres is None:
            raise TypeError("where= takes an expression as a string, as where=\"event.properties.path == '/pricing'\"")
        condition = self._wheres.compiled(where)
        fields = dict(self)

        def test(event: dict[str, Any]) -> bool:
            try:
                return bool(condition(event=event, contact=fields))
            except Exception as exc:  # odd data in one past event: that event does not match
                if where not in self._problems:
                    log.warning("where failed", contact_id=self["id"], error=str(exc))
                    self._problems[where] = f"where failed, counted as false: {where}: {type(exc).__name__}: {exc}"
                return False

        return test


def record_problems(
    conn: Connection, view: Any, rule: str, now: datetime, step: int | None = None, event_id: str | None = None
) -> None:
    """Journal the `where=` failures a condition met, once each, as `failed` with the expression and error."""
    if not isinstance(view, ContactView):
        return
    for problem in view._take_problems():
        journal.record(conn, now, rule, view["id"], "failed", step=step, reason=problem, event_id=event_id)


@functools.lru_cache(maxsize=256)
def _parsed(text: str) -> timedelta:
    return parse_duration(text)


def _duration(within: Any) -> timedelta:
    """`within='7d'`, `within='1h30m'`, `within='P1D'`, or seconds."""
    if isinstance(within, timedelta):
        return parse_duration(within)
    if isinstance(within, int) and not isinstance(within, bool):
        return parse_duration(within)
    if isinstance(within, str):
        return _parsed(within)
    raise TypeError(f"within= takes a duration, as within='7d', not {within!r}")


def _step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"step= takes a step number, as step=1, not {step!r}")
    return step


def _event(row: Any) -> dict[str, Any]:
    """A stored event as `where=` and `contact.last()` give it, like `event` in `if:`."""
    return {
        "id": row.id,
        "source": row.source,
        "type": row.type,
        "occurred_at": row.occurred_at,
        "correlation": jsoncodec.loads(row.correlation),
        "properties": jsoncodec.loads(row.properties),
    }


_FEEDBACK = sa.select(D.rule, D.step, D.feedback).where(
    D.contact_id == sa.bindparam("contact_id"), D.feedback.is_not(None)
)
