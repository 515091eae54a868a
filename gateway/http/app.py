"""create_app(settings): the aiohttp application around one running deployment."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from functools import partial

import pluggy
import structlog
from aiohttp import web

from ..config import Settings
from ..errors import ConfigError, StorageUnavailable
from ..insight.metrics import Metrics
from ..jobs import polls, retention, wakeup
from ..jobs.worker import ACKS_FLOOD, Worker, make_worker_id
from ..kit.clock import Clock, SystemClock
from ..kit.sinks import Sink
from ..kit.sources import Deployment, Source
from ..kit.templating import make_environment
from ..pipeline import plan
from ..pipeline.router import Router
from ..plugins import Registry, collect, get_plugin_manager, notify_event_received, plugin_set
from ..send.delivery import StepRunner
from ..store import Database, jobqueue, replicas, sinkrates
from ..store.inbox import SQLITE_LINGER, GroupCommitter
from . import api, consent_links, dashboard, tracking
from .auth import scope_of
from .hooks import handle_hook, handle_ping, handle_preflight, json_error_middleware_factory
from .metrics import handle_metrics
from .running import GATEWAY_KEY, RETRY_AFTER_SECONDS, Role, RunningGateway

log = structlog.get_logger("declic.app")
#: On shutdown, sends in flight get this long to finish before they are cancelled.
STOP_GRACE_SECONDS = 10.0


def build_gateway(
    settings: Settings,
    *,
    pm: pluggy.PluginManager | None = None,
    clock: Clock | None = None,
    role: Role = "all",
    database_url: str | None = None,
    wrap_sink: Callable[[Sink], Sink] | None = None,
    extra_sources: Callable[[Deployment], dict[str, Source]] | None = None,
    rehearsal: bool = False,
) -> RunningGateway:
    """The running parts of a deployment; `declic simulate` swaps the database and the sinks. In a
    rehearsal (simulate, backtest) plugins' `event_received` hooks are not called: an observer that
    forwards events must not see made-up or replayed ones."""
    pm = pm or get_plugin_manager()
    clock = clock or SystemClock()
    deployment = Deployment(settings.public_url, settings.timezone, clock)
    sources = {key: cls(key, cfg, deployment) for key, (cls, cfg) in settings.source_plugins.items()}
    # Internal sources read back what Declic's own endpoints stored: the worker knows them, /hooks never.
    internal: dict[str, Source] = {
        **{cls.name: cls(cls.name, None, deployment) for cls in consent_links.SOURCES},
        **{cls.name: cls(cls.name, settings.tracking, deployment) for cls in tracking.SOURCES},
        **(extra_sources(deployment) if extra_sources else {}),
    }
    sinks = {key: cls(key, cfg, deployment) for key, (cls, cfg) in settings.sink_plugins.items()}
    if wrap_sink is not None:
        sinks = {key: wrap_sink(sink) for key, sink in sinks.items()}
    env = make_environment(settings.templates_dir, pm)
    confirmation = settings.policies.confirmation_rule()
    rules = [*settings.rules, *([confirmation] if confirmation else [])]
    router = Router(rules, env, settings.scoring, settings.timezone, settings.policies.double_opt_in)
    router.machine_events = settings.tracking.route_machine_events
    db = Database(database_url or settings.database_url, settings.storage.busy_timeout)
    metrics = Metrics(sources, sinks)
    db.on_unavailable = metrics.storage_unavailable
    db.on_work = metrics.database_work
    steps = StepRunner(
        router,
        sinks,
        env,
        settings.policies,
        settings.worker,
        clock,
        make_worker_id(),
        settings.timezone,
        settings.public_url,
        settings.storage.keep_rendered,
        locale=settings.locale,
    )
    worker = Worker(
        db,
        settings.worker,
        {**sources, **internal},
        router,
        steps,
        (lambda event: None) if rehearsal else partial(notify_event_received, pm),
        settings.phone_region,
        acks_waiting=lambda: committer.waiting,  # the committer is made next; asked only once running
        metrics=metrics,
        retention_periods=retention.Periods.of(settings),
    )
    # PostgreSQL's acknowledgements have database threads of their own: they make no other work wait.
    linger = SQLITE_LINGER if db.is_sqlite else 0.0
    committer = GroupCommitter(db, on_commit=worker.wake, taker=worker, linger=linger, enough=ACKS_FLOOD)
    return RunningGateway(settings, pm, clock, db, sources, sinks, env, router, committer, worker, metrics, role)


def create_app(
    settings: Settings, *, pm: pluggy.PluginManager | None = None, clock: Clock | None = None, role: Role = "all"
) -> web.Application:
    gateway = build_gateway(settings, pm=pm, clock=clock, role=role)
    largest = max([settings.limits.max_body_bytes, *(s.max_body_bytes or 0 for s in gateway.sources.values())])
    app = web.Application(
        client_max_size=largest, middlewares=[json_error_middleware_factory({"/admin/": dashboard.error_page})]
    )
    app[GATEWAY_KEY] = gateway
    if role != "worker":
        # A token may hold slashes: the track source serves Segment's paths, /hooks/site/v1/batch.
        for path in ("/hooks/{source}", "/hooks/{source}/{token:.+}"):
            app.router.add_post(path, handle_hook)
            app.router.add_get(path, handle_ping)  # and HEAD
            app.router.add_route("OPTIONS", path, handle_preflight)
        for path, handler in consent_links.ROUTES:
            app.router.add_get(path, handler)  # and HEAD (add_route("GET") would answer HEAD with 405)
            app.router.add_route("POST", path, handler)
        for path, handler in tracking.ROUTES:
            app.router.add_get(path, handler)  # and HEAD, which link scanners send
        app.add_subapp("/admin/", dashboard.create(gateway))
        api.register(app)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", handle_metrics)
    for routes in gateway.pm.hook.register_routes(gateway=gateway):
        for method, path, handler in routes or ():
            app.router.add_route(method, path, handler)
    app.cleanup_ctx.append(_lifecycle)
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    gateway = app[GATEWAY_KEY]
    try:
        await _start(gateway)
    except BaseException:
        await _stop(gateway)
        raise
    try:
        yield
    finally:
        await _stop(gateway)


async def _start(gateway: RunningGateway) -> None:
    db = gateway.db
    loop = asyncio.get_running_loop()
    if db.is_sqlite:
        db.lock_sqlite_file()
        await loop.run_in_executor(None, db.upgrade)  # embedded database: keep it current ourselves
        # Holding the file's lock, this is the only process: a job still `running` lost its worker.
        released = await db.run(jobqueue.release_orphans, gateway.clock.now())
        if released:
            log.info("released jobs left running by a previous process", jobs=released)
    elif not await loop.run_in_executor(None, db.is_current):
        raise ConfigError(["the database schema is not current: run `declic db upgrade --config FILE` first"])
    else:
        await _join_replicas(gateway)
        for sink in gateway.sinks.values():  # a sink's rate is the deployment's, not each replica's
            sink.limiter.share(partial(db.run, sinkrates.reserve, sink.key))
    await _note_rule_changes(gateway)
    # Date and inactivity triggers a config change added get scheduled once, by one replica.
    await db.run(jobqueue.add_tick, "reconcile", gateway.clock.now())
    if gateway.role != "web":
        # Retention runs once a day across all replicas, the first a day after the first start. Scheduled by
        # the processes that run workers only: a web-only process (and the tests and simulations that step
        # the clock through every due job) never meets it.
        await db.run(retention.schedule, gateway.clock.now() + retention.EVERY, gateway.clock.now())
    for key in polls.pollers(gateway.sources):
        await db.run(polls.schedule, key, gateway.clock.now(), gateway.clock.now())
    for plugin in gateway.plugins():
        await plugin.start()
    gateway.tasks.append(asyncio.create_task(gateway.committer.run(), name="declic-committer"))
    for result in gateway.pm.hook.startup(gateway=gateway):
        if inspect.isawaitable(result):
            await result
    # Last: a job is claimed only once the database, the plugins and their start-up hooks are ready.
    if gateway.role != "web":
        gateway.tasks.append(asyncio.create_task(_supervise(gateway), name="declic-worker"))
        if not db.is_sqlite:  # other replicas queue work too: hear of it at once, not at the next poll
            listening = wakeup.listen(wakeup.libpq_url(db.engine.url), gateway.worker.wake)
            gateway.tasks.append(asyncio.create_task(listening, name="declic-wakeup"))
    log.info(
        "gateway started",
        role=gateway.role,
        sources=sorted(gateway.sources),
        sinks=sorted(gateway.sinks),
        rules=len(gateway.router.rules),
        metrics="by token" if gateway.settings.metrics.token or gateway.settings.admin.token else "closed: no token",
    )


async def _note_rule_changes(gateway: RunningGateway) -> None:
    """Log what `declic plan` would have said about this config, when its rules differ from the last start's."""
    settings = gateway.settings
    rules = [rule.spec for rule in gateway.router.rules.values()]
    found = await gateway.db.run(plan.on_start, rules, settings.templates_dir, settings.timezone, gateway.clock.now())
    if found is not None:
        log.info("rules changed since the last start", since=found.since, plan=found.lines())


async def _join_replicas(gateway: RunningGateway) -> None:
    """On a shared PostgreSQL: refuse to start beside live replicas that loaded other plugins, else beat."""
    plugins = plugin_set(gateway.pm)
    refused = await gateway.db.run(replicas.join, gateway.worker.id, plugins, datetime.now(UTC))
    if refused:
        raise ConfigError([refused])
    gateway.tasks.append(asyncio.create_task(_heartbeat(gateway, plugins), name="declic-replica-heartbeat"))


async def _heartbeat(gateway: RunningGateway, plugins: dict[str, str]) -> None:
    # Wall time, not the deployment's clock: liveness is about real processes, also under a fake clock.
    while True:
        await asyncio.sleep(replicas.HEARTBEAT.total_seconds())
        try:
            await gateway.db.run(replicas.beat, gateway.worker.id, plugins, datetime.now(UTC))
        except StorageUnavailable as exc:
            log.warning("cannot renew the replica heartbeat", error=str(exc))


#: A dead worker is restarted after 1 s, then 2, 4... up to this; a worker that ran this long starts over at 1 s.
RESTART_MAX_SECONDS = 60.0


async def _supervise(gateway: RunningGateway) -> None:
    """Run the worker; when it dies, say why, turn /readyz not-ready, and restart it with backoff:
    acknowledged calls must be processed whatever happened."""
    delay = 1.0
    while True:
        started = time.monotonic()
        try:
            await gateway.worker.run()
            return  # stopped on purpose
        except Exception as exc:
            gateway.worker_down = f"{type(exc).__name__}: {exc}"
            if time.monotonic() - started > RESTART_MAX_SECONDS:
                delay = 1.0
            log.error("worker died; restarting", error=gateway.worker_down, seconds=delay, exc_info=exc)
        await asyncio.sleep(delay)
        delay = min(delay * 2, RESTART_MAX_SECONDS)
        gateway.worker_down = None


async def _stop(gateway: RunningGateway) -> None:
    log.info("gateway stopping")
    await gateway.worker.stop(grace=STOP_GRACE_SECONDS)
    for task in gateway.tasks:
        task.cancel()
    await asyncio.gather(*gateway.tasks, return_exceptions=True)
    for plugin in gateway.plugins():
        await plugin.close()
    if not gateway.db.is_sqlite:
        with contextlib.suppress(Exception):  # a replica that cannot say goodbye goes stale instead
            await gateway.db.run(replicas.leave, gateway.worker.id)
    gateway.db.close()
    log.info("gateway stopped")


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready or not to anyone (200 or 503); why, only to the admin: errors name hosts and ports."""
    gateway = request.app[GATEWAY_KEY]
    details = await _readiness(gateway.db)
    if gateway.worker_down is not None:
        details.update(status="unavailable", worker=gateway.worker_down)
    status = 200 if details["status"] == "ok" else 503
    headers = {"Retry-After": RETRY_AFTER_SECONDS} if status == 503 else None
    if scope_of(request, gateway.settings.admin) is None:  # details: for any token, read or admin
        return web.json_response({"status": details["status"]}, status=status, headers=headers)
    return web.json_response(details, status=status, headers=headers)


async def _readiness(db: Database) -> dict[str, str]:
    loop = asyncio.get_running_loop()
    try:
        current = await loop.run_in_executor(None, db.is_current)
    except Exception as exc:
        error = str(StorageUnavailable(str(exc).splitlines()[0]))
        return {"status": "unavailable", "database": error, "migrations": "unknown"}
    if not current:
        return {"status": "unavailable", "database": "ok", "migrations": "pending"}
    return {"status": "ok", "database": "ok", "migrations": "current"}


def load(config_path: str, pm: pluggy.PluginManager | None = None) -> tuple[Settings, pluggy.PluginManager, Registry]:
    from ..config import load_config

    pm = pm or get_plugin_manager()
    registry = collect(pm)
    return load_config(config_path, registry, pm), pm, registry
