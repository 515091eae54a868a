"""The /api/v1 endpoints: each declares its scope and the models of its query, body and answer.

`Endpoint.handle` checks the token and validates the request against those models before the
handler runs, and validates the answer on the way out; openapi.py describes the same table.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

import structlog
from aiohttp import web
from pydantic import BaseModel, ValidationError
from sqlalchemy.engine import Connection

from ...config import RuleSpec
from ...insight import kpis, records
from ...pipeline import contacts as contact_store
from ...pipeline import inbound
from ...store import jobqueue, jsoncodec
from ..auth import scope_of
from ..running import GATEWAY_KEY, RunningGateway
from . import models as m
from . import queries

log = structlog.get_logger("declic.api")

Handler = Callable[["Call"], Awaitable[BaseModel]]


@dataclass
class Call:
    """One validated request: its query, path and body as models, and the running deployment."""

    gateway: RunningGateway
    query: Any
    path: dict[str, Any]
    body: Any


class ApiError(Exception):
    """An answer other than 200 that a handler chooses: 404 for an unknown contact or rule."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass
class Endpoint:
    method: Literal["GET", "POST"]
    path: str
    summary: str
    handler: Handler
    answer: type[BaseModel]
    scope: Literal["read", "admin"] = "read"
    query: type[BaseModel] | None = None
    body: type[BaseModel] | None = None
    #: Path parameters: name -> model of one field named `value` (a DbId, a rule name).
    path_params: dict[str, type[BaseModel]] = field(default_factory=dict)
    #: Answers other than 200, 400, 401, 403 and 422, which every endpoint may give.
    also: dict[int, str] = field(default_factory=dict)

    async def handle(self, request: web.Request) -> web.Response:
        gateway = request.app[GATEWAY_KEY]
        scope = scope_of(request, gateway.settings.admin)
        if scope is None:
            return problem(401, "a bearer token is required", {"WWW-Authenticate": 'Bearer realm="declic"'})
        if self.scope == "admin" and scope != "admin":
            return problem(403, "this token may only read: acting needs a token with the admin scope")
        try:
            call = Call(gateway, _validate(self.query, dict(request.query)), {}, None)
            for name, model in self.path_params.items():
                call.path[name] = model.model_validate({"value": request.match_info[name]}).value  # type: ignore[attr-defined]
            if self.body is not None:
                call.body = self.body.model_validate_json(await request.read())
        except ValidationError as exc:
            detail = jsoncodec.loads(exc.json(include_url=False, include_input=False))
            return web.json_response(m.Problem(error="invalid request", detail=detail).model_dump(), status=422)
        try:
            answer = await self.handler(call)
        except ApiError as exc:
            return problem(exc.status, exc.reason)
        # Checked on the way out too: the document promises this shape (schemathesis holds us to it).
        data = self.answer.model_validate(answer.model_dump()).model_dump(mode="json")
        if self.scope == "admin":  # what was done, never to whom: no personal data in logs
            log.info("api action", endpoint=f"{self.method} {self.path}")
        return web.json_response(data)


def problem(status: int, reason: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(m.Problem(error=reason).model_dump(exclude_none=True), status=status, headers=headers)


def _validate(model: type[BaseModel] | None, values: dict[str, str]) -> Any:
    if model is None:
        return None
    return model.model_validate(values)


# --- handlers ------------------------------------------------------------------------------------


async def list_rules(call: Call) -> m.RuleList:
    gateway, span = call.gateway, call.query
    until = span.until or gateway.clock.now()
    since = span.since or until - timedelta(days=30)
    rules = [rule.spec for rule in gateway.router.rules.values()]
    found = await gateway.db.run(kpis.rule_kpis, [rule.name for rule in rules], since, until)
    return m.RuleList(
        since=since, until=until, rules=[_rule(rule, kpi) for rule, kpi in zip(rules, found, strict=True)]
    )


async def show_rule(call: Call) -> m.Rule:
    gateway, span, name = call.gateway, call.query, call.path["name"]
    compiled = gateway.router.rules.get(name)
    if compiled is None:
        raise ApiError(404, "no rule has this name")
    until = span.until or gateway.clock.now()
    since = span.since or until - timedelta(days=30)
    [found] = await gateway.db.run(kpis.rule_kpis, [name], since, until)
    return _rule(compiled.spec, found)


def _rule(rule: RuleSpec, found: kpis.RuleKpis) -> m.Rule:
    trigger = (
        rule.when
        or rule.on_date
        or (f"inactive for {rule.inactive_for}" if rule.inactive_for else f"score reaches {rule.score_reaches}")
    )
    data = found.as_dict()
    del data["rule"]
    return m.Rule(name=rule.name, kind=rule.kind, trigger=trigger, condition=rule.if_, steps=len(rule.steps), kpis=data)


async def search_contacts(call: Call) -> m.ContactList:
    region = call.gateway.settings.phone_region

    def search(conn: Connection, who: str) -> list[dict[str, Any]]:
        return queries.contacts(conn, records.find(conn, who, region)[: m.MAX_LIMIT])

    return m.ContactList(contacts=await call.gateway.db.run(search, call.query.q))


async def show_contact(call: Call) -> m.ContactView:
    found = await call.gateway.db.run(queries.contact, call.path["contact_id"])
    if found is None:
        raise ApiError(404, "no contact has this id")
    return m.ContactView.model_validate(found)


async def contact_timeline(call: Call) -> m.Timeline:
    contact_id, page = call.path["contact_id"], call.query

    def read(conn: Connection) -> list[dict[str, Any]] | None:
        return records.timeline(conn, contact_id) if queries.exists(conn, contact_id) else None

    entries = await call.gateway.db.run(read)
    if entries is None:
        raise ApiError(404, "no contact has this id")
    end = page.after + page.limit
    more = end if end < len(entries) else None
    return m.Timeline(contact_id=contact_id, entries=entries[page.after : end], next_after=more)


async def export_contact(call: Call) -> m.Export:
    contact_id = call.path["contact_id"]

    def read(conn: Connection) -> dict[str, Any] | None:
        return records.export(conn, contact_id) if queries.exists(conn, contact_id) else None

    found = await call.gateway.db.run(read)
    if found is None:
        raise ApiError(404, "no contact has this id")
    return m.Export.model_validate(found)


async def erase_contact(call: Call) -> m.Erased:
    gateway, contact_id = call.gateway, call.path["contact_id"]

    def erase(conn: Connection) -> bool:
        if not queries.exists(conn, contact_id):
            return False
        contact_store.erase(conn, contact_id, gateway.clock.now())
        return True

    if not await gateway.db.run(erase):
        raise ApiError(404, "no contact has this id")
    return m.Erased(erased=contact_id)


async def list_deliveries(call: Call) -> m.DeliveryList:
    q = call.query
    rows = await call.gateway.db.run(queries.deliveries, q.after, q.limit, q.rule, q.contact_id, q.status)
    return m.DeliveryList(deliveries=rows, next_after=_cursor(rows, q.limit))


async def list_dead_jobs(call: Call) -> m.DeadJobList:
    rows = await call.gateway.db.run(queries.dead_jobs, call.query.after, call.query.limit)
    return m.DeadJobList(jobs=rows, next_after=_cursor(rows, call.query.limit))


async def replay_dead_jobs(call: Call) -> m.Replayed:
    now = call.gateway.clock.now()

    queued = await call.gateway.db.run(jobqueue.requeue, None if call.body.all else call.body.ids, now)
    call.gateway.worker.wake()
    return m.Replayed(queued=queued)


async def list_failed_calls(call: Call) -> m.FailedCallList:
    rows = await call.gateway.db.run(queries.failed_calls, call.query.after, call.query.limit)
    return m.FailedCallList(calls=rows, next_after=_cursor(rows, call.query.limit))


async def replay_failed_calls(call: Call) -> m.Replayed:
    ids = None if call.body.all else call.body.ids
    queued = await call.gateway.db.run(inbound.replay_failed, ids, call.gateway.clock.now())
    call.gateway.worker.wake()
    return m.Replayed(queued=sorted(queued))


def _cursor(rows: list[dict[str, Any]], limit: int) -> int | None:
    return rows[-1]["id"] if len(rows) == limit else None


CONTACT: dict[str, type[BaseModel]] = {"contact_id": m.ContactId}
NOT_FOUND = {404: "No contact has this id."}
V1 = "/api/v1"
ENDPOINTS = [
    Endpoint(
        "GET", f"{V1}/rules", "Every rule with its KPIs over a time range", list_rules, m.RuleList, query=m.KpiRange
    ),
    Endpoint(
        "GET",
        f"{V1}/rules/{{name}}",
        "One rule with its KPIs",
        show_rule,
        m.Rule,
        query=m.KpiRange,
        path_params={"name": m.RuleName},
        also={404: "No rule has this name."},
    ),
    Endpoint("GET", f"{V1}/contacts", "Find contacts", search_contacts, m.ContactList, query=m.ContactSearch),
    Endpoint(
        "GET",
        f"{V1}/contacts/{{contact_id}}",
        "One contact",
        show_contact,
        m.ContactView,
        path_params=CONTACT,
        also=NOT_FOUND,
    ),
    Endpoint(
        "GET",
        f"{V1}/contacts/{{contact_id}}/timeline",
        "What happened to the contact and why, in time order",
        contact_timeline,
        m.Timeline,
        query=m.TimelinePage,
        path_params=CONTACT,
        also=NOT_FOUND,
    ),
    Endpoint(
        "GET",
        f"{V1}/contacts/{{contact_id}}/export",
        "The contact's whole record",
        export_contact,
        m.Export,
        path_params=CONTACT,
        also=NOT_FOUND,
    ),
    Endpoint(
        "POST",
        f"{V1}/contacts/{{contact_id}}/erase",
        "Forget the contact for good",
        erase_contact,
        m.Erased,
        scope="admin",
        path_params=CONTACT,
        also=NOT_FOUND,
    ),
    Endpoint(
        "GET", f"{V1}/deliveries", "Messages, newest last", list_deliveries, m.DeliveryList, query=m.DeliveryFilter
    ),
    Endpoint("GET", f"{V1}/dead-letter", "Jobs that ran out of attempts", list_dead_jobs, m.DeadJobList, query=m.Page),
    Endpoint(
        "POST",
        f"{V1}/dead-letter/replay",
        "Queue dead-lettered jobs again",
        replay_dead_jobs,
        m.Replayed,
        scope="admin",
        body=m.Replay,
    ),
    Endpoint(
        "GET",
        f"{V1}/failed-calls",
        "Stored calls that failed to normalise",
        list_failed_calls,
        m.FailedCallList,
        query=m.Page,
    ),
    Endpoint(
        "POST",
        f"{V1}/failed-calls/replay",
        "Normalise failed calls again",
        replay_failed_calls,
        m.Replayed,
        scope="admin",
        body=m.Replay,
    ),
]
