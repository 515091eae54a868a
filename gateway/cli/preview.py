"""`declic preview` and `declic send-test`: a rule's message as a contact would get it, before customers do."""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import pluggy
import sqlalchemy as sa
import yaml

from ..config import Settings
from ..errors import TemplateProblem
from ..http.app import build_gateway
from ..http.running import RunningGateway
from ..insight import records
from ..kit.addresses import test_recipient
from ..kit.sinks import Outcome
from ..send import preview as previews
from ..store import EVENTS, INBOX
from . import logs
from .common import CONFIG_OPTION, load, require_current
from .simulate import TIMELINE_SOURCE, RecordingSink, TimelineItem, inject_directly, timeline_source


def _rendering_options(command: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(
        (
            CONFIG_OPTION,
            click.argument("rule"),
            click.option("--step", default=1, show_default=True, type=click.IntRange(min=1), help="Step number."),
            click.option(
                "--contact",
                "who",
                help="A stored contact: #ID (or a bare ID), an e-mail, a phone number or SOURCE:ID.",
            ),
            click.option(
                "--event",
                "event_file",
                type=click.Path(exists=True, dir_okay=False),
                help="A sample event (YAML or JSON, as an item of a `declic simulate` timeline; `at` "
                "defaults to now), run through the rules in a scratch database.",
            ),
            click.option("--variant", help="The step's variant to render (steps with `variants:` only)."),
        )
    ):
        command = option(command)
    return command


@click.command()
@_rendering_options
@click.option(
    "--html",
    "html_path",
    type=click.Path(dir_okay=False, writable=True),
    help="Also write the HTML part to this file, to open in a browser.",
)
def preview(
    config_path: str,
    rule: str,
    step: int,
    who: str | None,
    event_file: str | None,
    variant: str | None,
    html_path: str | None,
) -> None:
    """Print step N of RULE as it would be sent now to a stored contact (--contact) or to the contact of a
    sample event (--event): e-mail headers as the sink writes them, then the text and HTML parts.

    Nothing is sent or recorded. Links have their real form but are signed with a throwaway key: the
    deployment refuses them, so clicking one changes nothing.
    """
    settings, pm, _ = load(config_path)
    logs.configure("warning", settings.logging.redact)
    rendering = _render(settings, pm, rule, step, who, event_file, variant, test=False)
    if rendering.held_back:
        click.echo(f"note: the worker would not send this to the contact now: {rendering.held_back}", err=True)
    try:
        click.echo(rendering.sink.preview(rendering.message), nl=False)
    except ValueError as exc:
        raise click.ClickException(f"{rendering.sink.key} could not send it: {exc}") from None
    if html_path:
        if rendering.message.html is None:
            raise click.ClickException(f"{rule} step {step} has no HTML part")
        Path(html_path).write_text(rendering.message.html, encoding="utf-8")


@click.command("send-test")
@_rendering_options
@click.option("--to", "to", required=True, help="Where to send it: an address listed in `test_recipients:`.")
def send_test(
    config_path: str,
    rule: str,
    step: int,
    who: str | None,
    event_file: str | None,
    variant: str | None,
    to: str,
) -> None:
    """Send step N of RULE, rendered as `declic preview` shows it, through the rule's sink to a test address.

    The address must be listed under `test_recipients:`. The message is marked as a test (subject, or text
    without one, starts with "[TEST] "; header X-Declic-Test: 1) and is not recorded: no delivery, no
    journal entry, nothing in the KPIs, no effect on the pressure cap.
    """
    settings, pm, _ = load(config_path)
    logs.configure("warning", settings.logging.redact)
    try:
        address = test_recipient(to, settings.phone_region)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--to") from None
    if address not in settings.test_recipients:
        raise click.BadParameter(f"{to} is not listed under `test_recipients:` in {config_path}", param_hint="--to")
    rendering = _render(settings, pm, rule, step, who, event_file, variant, test=True)
    sink = rendering.sink
    if sink.channel not in ("email", "sms"):
        raise click.ClickException(f"{sink.key} sends {sink.channel}: send-test sends e-mail and SMS only")
    if ("@" in address) != (sink.channel == "email"):
        wanted = "an e-mail address" if sink.channel == "email" else "a phone number"
        raise click.BadParameter(f"{sink.key} sends {sink.channel}: give {wanted}", param_hint="--to")
    if rendering.held_back:
        click.echo(f"note: the worker would not send this to the contact now: {rendering.held_back}", err=True)
    result = asyncio.run(_send(rendering, previews.as_test(rendering, address)))
    if result.outcome is not Outcome.SENT:
        raise click.ClickException(f"{sink.key} did not send it: {result.outcome.value}: {result.error}")
    click.echo(f"sent a test of {rule} step {step} through {sink.key} to {address}")


async def _send(rendering: previews.Rendering, message: Any) -> Any:
    sink = rendering.sink
    await sink.start()
    try:
        async with sink.limiter:
            return await sink.send(message, rendering.context)
    finally:
        await sink.close()


def _render(
    settings: Settings,
    pm: pluggy.PluginManager,
    rule_name: str,
    step: int,
    who: str | None,
    event_file: str | None,
    variant: str | None,
    test: bool,
) -> previews.Rendering:
    if (who is None) == (event_file is None):
        raise click.UsageError("give exactly one of --contact or --event")
    now = datetime.now(UTC)
    with _gateway(settings, pm, event_file is not None) as gateway:
        rule = gateway.router.rules.get(rule_name)
        if rule is None:
            known = ", ".join(sorted(gateway.router.rules)) or "none"
            raise click.BadParameter(f"no rule named {rule_name} (rules: {known})", param_hint="RULE")
        if event_file is not None:
            contact_id = asyncio.run(_ingest(gateway, _read_event(Path(event_file), now)))
        else:
            assert who is not None
            contact_id = _contact(gateway, who, settings.phone_region)
        sinks = {key: getattr(sink, "real", sink) for key, sink in gateway.sinks.items()}
        runner = previews.preview_runner(gateway.worker.steps, sinks)
        with gateway.db.engine.connect() as conn:
            transaction = conn.begin()
            try:
                return previews.render(conn, runner, rule, step - 1, contact_id, now, variant, test)
            except (previews.PreviewError, TemplateProblem) as exc:
                raise click.ClickException(str(exc)) from None
            finally:
                transaction.rollback()  # nothing a preview wrote (a stand-in event, the link key) stays


@contextmanager
def _gateway(settings: Settings, pm: pluggy.PluginManager, scratch: bool) -> Iterator[RunningGateway]:
    """The deployment as the worker builds it, on its database or (for a sample event) a scratch one.

    Its sinks record instead of sending, so that ingesting a sample event sends nothing; the rendering
    uses the real ones they wrap."""
    with tempfile.TemporaryDirectory(prefix="declic-preview-") as folder:
        url = f"sqlite:///{folder}/preview.db" if scratch else None
        gateway = build_gateway(
            settings,
            pm=pm,
            role="worker",
            database_url=url,
            wrap_sink=RecordingSink,
            extra_sources=timeline_source,
        )
        try:
            if scratch:
                gateway.db.upgrade()
            else:
                require_current(gateway.db)
            yield gateway
        finally:
            gateway.db.close()


def _read_event(path: Path, now: datetime) -> TimelineItem:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise click.BadParameter(f"{path}: not YAML or JSON: {exc}", param_hint="--event") from None
    if not isinstance(data, dict) or "type" not in data:
        raise click.BadParameter(f"{path}: expected one event: {{type, contact, properties...}}", param_hint="--event")
    data.setdefault("at", now)
    try:
        return TimelineItem.model_validate(data)
    except ValueError as exc:
        raise click.BadParameter(f"{path}: {exc}", param_hint="--event") from None


async def _ingest(gateway: RunningGateway, item: TimelineItem) -> int:
    """Run the sample event through the real intake and rules; the contact it made or found."""
    await inject_directly(gateway, item, 0)
    await gateway.worker.drain()
    query = sa.select(EVENTS.c.contact_id).where(EVENTS.c.source == TIMELINE_SOURCE).limit(1)
    contact_id = await gateway.db.run(lambda conn: conn.execute(query).scalar())
    if contact_id is None:
        failed = await gateway.db.run(lambda conn: conn.execute(sa.select(INBOX.c.error)).scalar())
        raise click.ClickException(f"the sample event was not accepted: {failed}")
    return int(contact_id)


def _contact(gateway: RunningGateway, who: str, phone_region: str | None) -> int:
    query = f"#{who}" if who.isdigit() and len(who) < 6 else who  # a bare id; six digits and more: a phone
    found = gateway.db.transaction(records.find, query, phone_region)
    if not found:
        raise click.ClickException(f"no contact is known as {who}")
    if len(found) > 1:
        raise click.ClickException(f"{who} names {len(found)} contacts ({', '.join(f'#{i}' for i in found)}): give one")
    return found[0]
