"""The `declic` command line."""

from __future__ import annotations

import gc
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import click
import sqlalchemy as sa
import structlog

from ..errors import ConfigError, ConfigProblem
from ..pipeline import inbound
from ..plugins import DISTRIBUTION, collect, describe, get_plugin_manager
from ..store import INBOX, JOBS, Database, jobqueue
from . import logs
from .common import CONFIG_OPTION
from .common import load as _load
from .contacts import contacts
from .kpis import kpis
from .plan import plan
from .preview import preview, send_test


@click.group()
@click.version_option(package_name=DISTRIBUTION)
def cli() -> None:
    """Declic: a self-hosted trigger-marketing gateway."""


@cli.command()
@CONFIG_OPTION
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option(
    "--port", default=8080, show_default=True, type=int, help="0: a free port, which the `listening` log line gives."
)
@click.option(
    "--role",
    type=click.Choice(["all", "web", "worker"]),
    default="all",
    show_default=True,
    help="web: HTTP only; worker: jobs only; all: both.",
)
def serve(config_path: str, host: str, port: int, role: str) -> None:
    """Serve webhooks and run the workers."""
    from aiohttp import web

    from ..http.accesslog import AccessLogger
    from ..http.app import create_app
    from ..http.running import Role
    from .listen import bind, event_loop

    settings, pm, _ = _load(config_path)
    logs.configure(settings.logging.level, settings.logging.redact)
    log = structlog.get_logger("declic.serve")
    try:
        # Bound first: a port in use must stop us before the worker claims a job or a plugin starts.
        sockets = bind(host, port)
    except OSError as exc:
        log.error(f"cannot listen on {host}:{port}: {exc.strerror or exc}", host=host, port=port)
        raise SystemExit(1) from None
    loop = event_loop()
    bound = sockets[0].getsockname()[1]  # the kernel's choice for --port 0
    log.info("listening", host=host, port=bound, role=role, event_loop=type(loop).__module__.split(".")[0])
    try:
        app = create_app(settings, pm=pm, role=cast(Role, role))
        app.on_startup.append(_freeze_what_started)  # last: after the gateway's own start-up
        web.run_app(
            app,
            sock=sockets,
            access_log_class=AccessLogger,
            print=None,  # aiohttp's plain-text banner; "listening" above says it as a log line
            loop=loop,
        )
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(problem, err=True)
        raise SystemExit(2) from None


async def _freeze_what_started(_app: object) -> None:
    """Move what start-up built (config, plugins, SQLAlchemy's tables and compiled statements: ~150,000 objects)
    out of the garbage collector's sight: they live as long as the process, yet each full collection walked them
    all, which pushed the slowest acknowledgement under load to 90 ms, and collections took 2.5 % of the CPU.
    Frozen, the collector walks only what requests and jobs create (docs/performance.md, session 13). `declic
    serve` only: a test process starts many gateways and must be able to collect them."""
    gc.freeze()


@cli.command()
@CONFIG_OPTION
@click.option(
    "--format",
    "output",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="json: one JSON document, {ok, problems: [{file, line, column, path, message}]}, for editors and CI.",
)
def check(config_path: str, output: str) -> None:
    """Validate a config, its templates and expressions: `ok` and a summary, or every error at once as
    file:line:col: path: message (exit code 2)."""
    if output == "json":
        _check_json(config_path)
        return
    settings, _, _ = _load(config_path)
    click.echo(f"ok: {config_path}")
    for title, table in (("sources", settings.source_plugins), ("sinks", settings.sink_plugins)):
        click.echo(f"{title}: " + (", ".join(f"{k} ({cls.name})" for k, (cls, _) in table.items()) or "none"))
    click.echo(
        "rules: "
        + (
            ", ".join(f"{r.name} ({r.summary}, {len(r.steps)} step{'s' * (len(r.steps) > 1)})" for r in settings.rules)
            or "none"
        )
    )


def _check_json(config_path: str) -> None:
    import json

    from ..http.app import load as load_deployment

    try:
        settings, _, _ = load_deployment(config_path)
    except ConfigError as exc:
        found = exc.found or [ConfigProblem(config_path, None, None, "", text) for text in exc.problems]
        click.echo(json.dumps({"ok": False, "problems": [vars(p) for p in found]}, ensure_ascii=False, indent=2))
        raise SystemExit(2) from None
    summary = {
        "ok": True,
        "config": config_path,
        "sources": {key: cls.name for key, (cls, _) in settings.source_plugins.items()},
        "sinks": {key: cls.name for key, (cls, _) in settings.sink_plugins.items()},
        "rules": [{"name": r.name, "trigger": r.summary, "steps": len(r.steps)} for r in settings.rules],
    }
    click.echo(json.dumps(summary, ensure_ascii=False, indent=2))


@cli.command()
@CONFIG_OPTION
@click.option("--show-messages", is_flag=True, help="Also print each message as rendered, after its `send`.")
@click.argument("timeline", type=click.Path(exists=True, dir_okay=False))
def simulate(config_path: str, show_messages: bool, timeline: str) -> None:
    """Run a timeline (YAML list or JSON lines) under a fake clock; print each decision as JSON.

    Nothing is sent and the deployment's database is not touched. Exit code 2 on a timeline that
    is not one (an unknown event type...), 1 when a step failed (a template or an `if:` that raised).
    """
    import asyncio
    import json

    from .simulate import TimelineError, check_types, load_timeline
    from .simulate import simulate as run

    settings, pm, registry = _load(config_path)
    logs.configure("warning", settings.logging.redact)
    try:
        items = load_timeline(Path(timeline), settings.timezone)
        check_types(Path(timeline), items, registry)
    except TimelineError as exc:
        click.echo(str(exc), err=True)
        raise SystemExit(2) from None
    decisions, messages = asyncio.run(run(settings, pm, items))
    for decision in decisions:
        click.echo(json.dumps(decision, ensure_ascii=False))
        sent = messages.get((decision["rule"], decision["step"], decision["contact"]))
        if show_messages and decision["action"] == "send" and sent:
            click.echo(json.dumps({"at": decision["at"], **sent.pop(0)}, ensure_ascii=False))
    failed = [d for d in decisions if d["action"] == "failed"]
    if failed:
        for decision in failed:
            click.echo(f"failed: rule {decision['rule']}, {decision['contact']}: {decision['reason']}", err=True)
        raise SystemExit(1)


@cli.command()
@CONFIG_OPTION
@click.option("--from", "start", type=click.DateTime(), required=True, help="Start of the period, UTC.")
@click.option("--to", "end", type=click.DateTime(), required=True, help="End of the period, UTC, excluded.")
@click.option("--database", help="The live database to read (default: the config's storage.url); never written.")
@click.option("--format", "output", type=click.Choice(["text", "json"]), default="text", show_default=True)
def backtest(config_path: str, start: datetime, end: datetime, database: str | None, output: str) -> None:
    """Replay the calls stored in a period through this config's rules; print per rule what would have been sent.

    Nothing is sent and the live database is only read.
    """
    import asyncio
    import json

    from .backtest import backtest as run
    from .backtest import render

    settings, pm, _ = _load(config_path)
    logs.configure("warning", settings.logging.redact)
    start, end = start.replace(tzinfo=UTC), end.replace(tzinfo=UTC)
    if end <= start:
        raise click.BadParameter("must be after --from", param_hint="--to")
    try:
        report = asyncio.run(run(settings, pm, database or settings.database_url, start, end))
    except ConfigError as exc:
        click.echo("\n".join(exc.problems), err=True)
        raise SystemExit(2) from None
    click.echo(json.dumps(report.as_dict(), ensure_ascii=False) if output == "json" else render(report))


@cli.command()
@click.option("--builtin-only", is_flag=True, help="Only Declic's own plugins (as in docs/config-reference.md).")
def reference(builtin_only: bool) -> None:
    """Print the config reference (Markdown), generated from the installed plugins' models."""
    from ..config.reference import render

    click.echo(render(collect(get_plugin_manager(builtin_only=builtin_only))), nl=False)


@cli.command()
@click.option("--builtin-only", is_flag=True, help="Only Declic's own plugins (as in docs/declic.schema.json).")
def schema(builtin_only: bool) -> None:
    """Print the config's JSON Schema, the installed plugins' options included (for editors)."""
    import json

    from ..config.schema import build

    pm = get_plugin_manager(builtin_only=builtin_only)
    click.echo(json.dumps(build(collect(pm)), indent=2, ensure_ascii=False))


@cli.group(invoke_without_command=True)
@click.pass_context
def plugins(ctx: click.Context) -> None:
    """List loaded plugins (default), or install one."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(plugins_list)


@plugins.command("list")
def plugins_list() -> None:
    """Every loaded plugin, its version, what it registers and the hooks it implements."""
    pm = get_plugin_manager()
    registry = collect(pm)
    for info in describe(pm):
        provides = [k for k, origin in registry.origin.items() if origin == info.name]
        click.echo(
            f"{info.name} {info.version or '(no version)'}"
            f"{'  [' + info.distribution + ']' if info.distribution else ''}"
        )
        click.echo(f"  hooks: {', '.join(info.hooks) or 'none'}")
        if provides:
            click.echo(f"  provides: {', '.join(sorted(provides))}")


@plugins.command("install")
@click.argument("names", nargs=-1, required=True)
def plugins_install(names: tuple[str, ...]) -> None:
    """pip-install plugins into the environment Declic runs in."""
    raise SystemExit(subprocess.call([sys.executable, "-m", "pip", "install", *names]))


@plugins.command("new")
@click.argument("name")
@click.option("--kind", type=click.Choice(["source", "sink"]), required=True, help="What the plugin provides.")
@click.option(
    "--into",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Folder to create the project in.",
)
def plugins_new(name: str, kind: str, into: Path) -> None:
    """Write a plugin project (pyproject with the entry point, the plugin, tests that pass as written)."""
    from .scaffold import ScaffoldError, write

    try:
        root = write(name, kind, into)
    except ScaffoldError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote {root}")
    setup = "python3 -m venv .venv && .venv/bin/pip install -e '.[test]'"
    click.echo(f"next: cd {root} && {setup} && .venv/bin/python -m pytest")


@cli.group()
def db() -> None:
    """Database maintenance."""


@db.command("upgrade")
@CONFIG_OPTION
def db_upgrade(config_path: str) -> None:
    """Apply pending migrations (serve does this itself for embedded SQLite)."""
    settings, _, _ = _load(config_path)
    database = Database(settings.database_url)
    database.upgrade()
    database.close()
    click.echo("database is current")


@cli.command()
@CONFIG_OPTION
@click.option("--failed", is_flag=True, help="Work on inbox calls that failed to normalise.")
@click.option("--all", "replay_all", is_flag=True, help="Replay every listed item.")
@click.option("--resend", is_flag=True, help="Also queue jobs whose message went out unrecorded: sent again.")
@click.argument("ids", nargs=-1, type=int)
def replay(config_path: str, failed: bool, replay_all: bool, resend: bool, ids: tuple[int, ...]) -> None:
    """List dead-lettered jobs (or --failed calls); with IDS or --all, queue them again."""
    settings, _, _ = _load(config_path)
    database = Database(settings.database_url)
    try:
        if not ids and not replay_all:
            _list_dead(database, failed)
            return
        now = datetime.now(UTC)
        chosen = None if replay_all else list(ids)
        if failed:
            count = len(database.transaction(inbound.replay_failed, chosen, now))
        else:
            count = len(database.transaction(jobqueue.requeue, chosen, now, resend))
        click.echo(f"queued {count} {'call' if failed else 'job'}{'s' * (count != 1)} again")
        if not failed and not resend and (left := database.transaction(jobqueue.went_out, chosen)):
            listed = " ".join(map(str, left))
            click.echo(f"left {listed}: the message went out (its record was refused); --resend sends it again")
    finally:
        database.close()


def _list_dead(database: Database, failed: bool) -> None:
    if failed:
        table = INBOX
        query = (
            sa.select(table.c.id, table.c.source, table.c.received_at, table.c.error)
            .where(table.c.status == "failed")
            .order_by(table.c.id)
        )
    else:
        table = JOBS
        query = (
            sa.select(table.c.id, table.c.kind, table.c.updated_at, table.c.last_error)
            .where(table.c.status == "dead")
            .order_by(table.c.id)
        )
    rows = database.transaction(lambda conn: conn.execute(query).all())
    if not rows:
        click.echo("nothing failed" if failed else "dead letter is empty")
    for row in rows:
        click.echo(f"{row[0]}\t{row[1]}\t{row[2]:%Y-%m-%d %H:%M:%S}\t{logs.redact_text(row[3] or '')}")


cli.add_command(contacts)
cli.add_command(kpis)
cli.add_command(preview)
cli.add_command(send_test)
cli.add_command(plan)


def main() -> None:
    get_plugin_manager().hook.register_commands(cli=cli)
    cli()
