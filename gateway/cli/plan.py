"""`declic plan`: what a new config would do to the running deployment, before it is deployed."""

from __future__ import annotations

from datetime import UTC, datetime

import click

from ..http.app import build_gateway
from ..pipeline import plan as plans
from . import logs
from .common import CONFIG_OPTION, load, require_current

FORMATS = ["%Y-%m-%d", "%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S"]


@click.command()
@CONFIG_OPTION
@click.option("--at", type=click.DateTime(FORMATS), help="Count firings from this moment, UTC, instead of now.")
def plan(config_path: str, at: datetime | None) -> None:
    """Compare the rules of the config at --config with those the deployment (its database) runs.

    For each rule added, removed or changed: what changed, its active journeys and pending steps and what
    becomes of them (continue, cancelled, re-timed), and for date and inactivity rules how many contacts
    they fire for in the next 24 hours and 7 days. Nothing is changed. `declic serve` logs the same when
    it starts with rules that differ from its last start's.
    """
    settings, pm, _ = load(config_path)
    logs.configure("warning", settings.logging.redact)
    gateway = build_gateway(settings, pm=pm, role="worker")
    rules = [rule.spec for rule in gateway.router.rules.values()]
    require_current(gateway.db)
    now = at.replace(tzinfo=UTC) if at else datetime.now(UTC)
    try:
        with gateway.db.engine.connect() as conn:
            transaction = conn.begin()
            try:
                found = plans.plan(conn, rules, settings.templates_dir, settings.timezone, now)
            finally:
                transaction.rollback()  # a plan reads only; this makes sure of it
    finally:
        gateway.db.close()
    if found.since is None:
        click.echo("no record of the rules the deployment runs (`declic serve` records them when it starts):")
        click.echo("only the work in flight is compared")
    else:
        click.echo(f"{config_path} against the rules the deployment started with at {found.since[:16]} UTC:")
    for line in found.lines():
        click.echo(line)
    click.echo("nothing was changed")
