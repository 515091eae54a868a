"""`declic kpis`: what each rule sent and earned over a time range."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import click

from ..insight import kpis as rule_kpis
from ..store import Database
from .common import CONFIG_OPTION, load

HEADERS = ("step", "sent", "delivered", "bounced", "opened", "clicked", "unsub", "complained", "converted", "revenue")


@click.command()
@CONFIG_OPTION
@click.option("--rule", "rules", multiple=True, help="Only this rule (repeatable); default: every rule.")
@click.option("--since", type=click.DateTime(), help="Start, UTC (default: 30 days ago).")
@click.option("--until", type=click.DateTime(), help="End, UTC, excluded (default: now).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per rule.")
def kpis(
    config_path: str, rules: tuple[str, ...], since: datetime | None, until: datetime | None, as_json: bool
) -> None:
    """Per rule and step (and A/B variant): sent, delivered, bounced, opened and clicked (people, not machines),
    unsubscribed, complained, converted and revenue; with a holdout, the lift and its 95 % interval."""
    settings, _, _ = load(config_path)
    known = [rule.name for rule in settings.rules]
    unknown = sorted(set(rules) - set(known))
    if unknown:
        raise click.BadParameter(f"no rule named {', '.join(unknown)}", param_hint="--rule")
    end = (until or datetime.now(UTC)).replace(tzinfo=UTC)
    start = (since or end - timedelta(days=30)).replace(tzinfo=UTC)
    database = Database(settings.database_url)
    try:
        found = database.transaction(rule_kpis.rule_kpis, list(rules) or known, start, end)
    finally:
        database.close()
    for kpi in found:
        click.echo(json.dumps(kpi.as_dict()) if as_json else _table(kpi, start, end))


def _table(kpi: rule_kpis.RuleKpis, start: datetime, end: datetime) -> str:
    lines = [f"{kpi.rule}  {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC  entered {kpi.entered}"]
    lines.append("  ".join(f"{h:>10}" for h in HEADERS))
    for s in kpi.steps:
        lines.append(_row(s.step, s))
        lines += [_row(f"{s.step} {v.variant}", v) for v in s.variants]
    if kpi.held_out.enrolled:
        lines.append(_arm("messaged", kpi.messaged) + "   " + _arm("held out", kpi.held_out))
        if kpi.lift is not None:
            lift = kpi.lift
            relative = f", {lift.relative:+.0%} relative" if lift.relative is not None else ""
            lines.append(f"lift {lift.difference:+.1%} (95 % interval {lift.low:+.1%} to {lift.high:+.1%}){relative}")
    return "\n".join(lines) + "\n"


def _row(label: object, s: rule_kpis.StepKpis | rule_kpis.VariantKpis) -> str:
    """One step's funnel, or one of its variants' (labelled `1 a`, `1 b`)."""
    values = (label, s.sent, s.delivered, s.bounced, s.opened, s.clicked, s.unsubscribed, s.complained)
    return "  ".join(f"{v:>10}" for v in values) + f"  {s.converted:>10}  {s.revenue:>10.2f}"


def _arm(name: str, group: rule_kpis.Group) -> str:
    rate = f"{group.rate:.1%}" if group.rate is not None else "n/a"
    return f"{name}: {group.converted} of {group.enrolled} converted ({rate})"
