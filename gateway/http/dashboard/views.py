"""The dashboard's pages and its two actions (replay a dead-lettered job, replay a failed call).

Reading needs a session of any scope; acting needs the admin scope and, like every form, the
session's CSRF token. Pages carry a strict Content-Security-Policy: no script at all.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from html import escape
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web

from ...insight import kpis, overview, records
from ...pipeline import inbound
from ...store import jobqueue
from ..auth import Scope
from ..running import RunningGateway
from . import charts, sessions

HERE = Path(__file__).parent
#: Rule pages: the ranges offered, in days.
RANGES = (1, 7, 30, 90, 365)
#: How many dead jobs and failed calls a page lists (the oldest beyond it show after replaying the first).
LISTED = 200
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",  # pages show personal data
}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Dashboard:
    gateway: RunningGateway
    sessions: sessions.Sessions
    templates: jinja2.Environment

    async def render(self, request: web.Request, name: str, status: int = 200, **context: Any) -> web.Response:
        session = request[SESSION]
        html = self.templates.get_template(name).render(
            scope=request.get(SCOPE),
            csrf=session.csrf,
            rules=[rule.name for rule in self.gateway.settings.rules],
            **context,
        )
        response = web.Response(text=html, content_type="text/html", status=status)
        if session.new:  # its CSRF token is in the page: the cookie must hold it too
            await self.sessions.save(response, session)
        return response

    async def refuse(self, request: web.Request, status: int, message: str) -> web.Response:
        return await self.render(request, "refused.html", status=status, message=message)


DASHBOARD: web.AppKey[Dashboard] = web.AppKey("dashboard")
SESSION: web.RequestKey[sessions.Session] = web.RequestKey("dashboard_session", sessions.Session)
SCOPE: web.RequestKey[str] = web.RequestKey("dashboard_scope", str)


def create(gateway: RunningGateway) -> web.Application:
    """The /admin/ sub-application: mount it with `app.add_subapp("/admin/", create(gateway))`."""
    public_url = gateway.settings.public_url or ""
    keeper = sessions.Sessions(gateway, secure=public_url.startswith("https://"))
    # Declic's own templates, never user-supplied: a plain autoescaping environment, not the sandbox.
    templates = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True, undefined=jinja2.StrictUndefined
    )
    templates.filters.update(when=_when, duration=_duration, percent=_percent)
    app = web.Application(middlewares=[_security_headers])
    app[DASHBOARD] = Dashboard(gateway, keeper, templates)
    app.router.add_get("/", overview_page)
    app.router.add_get("/login", login_page)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_get("/rules/{name}", rule_page)
    app.router.add_get("/contacts", contacts_page)
    app.router.add_get(r"/contacts/{id:\d{1,18}}", contact_page)
    app.router.add_get("/failures", failures_page)
    app.router.add_post(r"/failures/jobs/{id:\d{1,18}}/replay", replay_job)
    app.router.add_post(r"/failures/calls/{id:\d{1,18}}/replay", replay_call)
    app.router.add_static("/static/", HERE / "static")
    return app


def error_page(status: int, reason: str) -> web.Response:
    """aiohttp's own errors under /admin/ (an unknown page, a wrong method): a page, not JSON."""
    html = (
        f'<!doctype html><html lang="en"><meta charset="utf-8"><title>{status} {escape(reason)}</title>'
        f'<p>{status} {escape(reason)}. <a href="/admin/">Back to the dashboard</a>.</p></html>'
    )
    return web.Response(text=html, content_type="text/html", status=status, headers=HEADERS)


@web.middleware
async def _security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        exc.headers.update(HEADERS)
        raise
    response.headers.update(HEADERS)
    return response


def needs(scope: Scope) -> Callable[[Handler], Handler]:
    """A handler for a logged-in session (else to the login form); POSTs with its CSRF token; `admin`:
    only for a session of an admin token."""

    def wrap(handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            dashboard = request.app[DASHBOARD]
            session = request[SESSION] = await dashboard.sessions.load(request)
            granted = await dashboard.sessions.scope(session, dashboard.gateway.settings.admin)
            if granted is None:
                raise web.HTTPSeeOther("/admin/login")
            request[SCOPE] = granted
            if request.method == "POST" and not await sessions.csrf_ok(request, session):
                return await dashboard.refuse(request, 403, "This form is out of date or did not come from here.")
            if scope == "admin" and granted != "admin":
                return await dashboard.refuse(request, 403, "Your token may look, not act: this needs the admin scope.")
            return await handler(request)

        return guarded

    return wrap


# --- logging in and out ---------------------------------------------------------------------------


async def login_page(request: web.Request) -> web.StreamResponse:
    dashboard = request.app[DASHBOARD]
    request[SESSION] = await dashboard.sessions.load(request)
    return await dashboard.render(request, "login.html", error=None)


async def login(request: web.Request) -> web.StreamResponse:
    dashboard = request.app[DASHBOARD]
    session = request[SESSION] = await dashboard.sessions.load(request)
    if not await sessions.csrf_ok(request, session):
        return await dashboard.refuse(request, 403, "This form is out of date: open the login page again.")
    token = (await sessions.form(request)).get("token")
    if not isinstance(token, str) or not token or dashboard.gateway.settings.admin.scope_of(token) is None:
        error = "That token is not one of this deployment's."
        return await dashboard.render(request, "login.html", status=403, error=error)
    # A new session (new CSRF token): one planted before login is worth nothing after it.
    redirect = web.HTTPSeeOther("/admin/")
    await dashboard.sessions.save(redirect, sessions.Session(who=await dashboard.sessions.fingerprint(token)))
    raise redirect


@needs("read")
async def logout(request: web.Request) -> web.StreamResponse:
    redirect = web.HTTPSeeOther("/admin/login")
    request.app[DASHBOARD].sessions.clear(redirect)
    raise redirect


# --- pages ------------------------------------------------------------------------------------------


@needs("read")
async def overview_page(request: web.Request) -> web.StreamResponse:
    dashboard = request.app[DASHBOARD]
    now = dashboard.gateway.clock.now()
    figures = await dashboard.gateway.db.run(overview.overview, now, now - timedelta(hours=24))
    return await dashboard.render(request, "overview.html", figures=figures, now=now)


@needs("read")
async def rule_page(request: web.Request) -> web.StreamResponse:
    dashboard = request.app[DASHBOARD]
    name = request.match_info["name"]
    if name not in [rule.name for rule in dashboard.gateway.settings.rules]:
        return await dashboard.refuse(request, 404, "No rule has that name in this deployment's config.")
    days = {str(offered): offered for offered in RANGES}.get(request.query.get("days", "30"))
    if days is None:  # matched as written: "³" is a digit to isdigit(), not to int()
        return await dashboard.refuse(request, 400, f"days must be one of {', '.join(map(str, RANGES))}.")
    now = dashboard.gateway.clock.now()
    until = now + timedelta(seconds=1)  # the range ends before `until`: include this very moment's sends
    since = now - timedelta(days=days)
    [found] = await dashboard.gateway.db.run(kpis.rule_kpis, [name], since, until)
    dead = await dashboard.gateway.db.run(overview.dead_jobs, LISTED, name)
    return await dashboard.render(
        request,
        "rule.html",
        kpi=found,
        funnel=charts.funnel(found.steps),
        days=days,
        ranges=RANGES,
        since=since,
        until=now,
        dead=len(dead),
    )


@needs("read")
async def contacts_page(request: web.Request) -> web.StreamResponse:
    dashboard = request.app[DASHBOARD]
    query = request.query.get("q", "")[:320]
    if "\0" in query:  # SQLite would search for it, PostgreSQL refuses it
        return await dashboard.refuse(request, 400, "A search cannot hold a NUL character.")
    found: list[dict[str, Any]] = []
    if query.strip():
        found = await dashboard.gateway.db.run(_cards, query, dashboard.gateway.settings.phone_region)
    return await dashboard.render(request, "contacts.html", query=query, found=found)


def _cards(conn: Any, query: str, phone_region: str | None) -> list[dict[str, Any]]:
    ids = records.find(conn, query, phone_region)[:50]
    return [card for card in (records.card(conn, contact_id) for contact_id in ids) if card is not None]


@needs("read")
async def contact_page(request: web.Request) -> web.StreamResponse:
    dashboard = request.app[DASHBOARD]
    contact_id = _path_id(request)
    found = await dashboard.gateway.db.run(_record, contact_id)
    if found is None:
        return await dashboard.refuse(request, 404, f"No contact #{contact_id}.")
    card, entries = found
    return await dashboard.render(request, "contact.html", card=card, timeline=entries)


def _record(conn: Any, contact_id: int) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    card = records.card(conn, contact_id)
    return None if card is None else (card, records.timeline(conn, contact_id))


@needs("read")
async def failures_page(request: web.Request) -> web.StreamResponse:
    dashboard = request.app[DASHBOARD]
    jobs = await dashboard.gateway.db.run(overview.dead_jobs, LISTED)
    calls = await dashboard.gateway.db.run(overview.failed_calls, LISTED)
    replayed = request.query.get("replayed", "")
    return await dashboard.render(request, "failures.html", jobs=jobs, calls=calls, replayed=replayed, listed=LISTED)


# --- actions ----------------------------------------------------------------------------------------


@needs("admin")
async def replay_job(request: web.Request) -> web.StreamResponse:
    """Queue a dead-lettered job again with a fresh attempt budget, as `declic replay ID` does."""
    gateway = request.app[DASHBOARD].gateway
    job_id = _path_id(request)
    queued = await gateway.db.run(jobqueue.requeue, [job_id], gateway.clock.now())
    gateway.worker.wake()
    went_out = [] if queued else await gateway.db.run(jobqueue.went_out, [job_id])
    raise web.HTTPSeeOther(f"/admin/failures?replayed={'job' if queued else 'went_out' if went_out else 'none'}")


@needs("admin")
async def replay_call(request: web.Request) -> web.StreamResponse:
    """Send a failed call through its source again, as `declic replay --failed ID` does."""
    gateway = request.app[DASHBOARD].gateway
    call_id = _path_id(request)
    done = await gateway.db.run(inbound.replay_failed, [call_id], gateway.clock.now())
    gateway.worker.wake()
    raise web.HTTPSeeOther(f"/admin/failures?replayed={'call' if done else 'none'}")


def _path_id(request: web.Request) -> int:
    """The path's {id}; past the INTEGER columns (32-bit on PostgreSQL, a driver error there) it names nothing."""
    value = int(request.match_info["id"])
    if value > records.MAX_ID:
        raise web.HTTPNotFound()
    return value


# --- template filters -------------------------------------------------------------------------------


def _when(moment: datetime | None) -> str:
    return "" if moment is None else f"{moment:%Y-%m-%d %H:%M:%S} UTC"


def _duration(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def _percent(rate: float | None, signed: bool = False) -> str:
    if rate is None:
        return "n/a"
    return f"{rate:+.1%}" if signed else f"{rate:.1%}"
