"""What each rule did and earned over a time range: the funnel per step (and per A/B variant),
conversions and their revenue, and, for a rule with a holdout group, the lift of messaging over
not messaging.

Read from the `deliveries`, `enrolments` and `conversions` tables with one grouped query each,
over indexes that start with (rule, time): see docs/performance.md for the figures.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..store import CONVERSIONS, DELIVERIES, ENROLMENTS
from ..store.tables import INTERNAL_KIND

D, E, V = DELIVERIES.c, ENROLMENTS.c, CONVERSIONS.c
#: What providers and Declic's own tracking said about a sent message; people's opens and clicks
#: only (machines' are never written to `feedback`).
FEEDBACK = ("delivered", "bounced", "opened", "clicked", "unsubscribed", "complained")
#: z for a two-sided 95 % interval.
Z95 = 1.959963984540054


@dataclass
class VariantKpis:
    """One A/B variant of a step: its messages sent in the range, what became of them, what they earned."""

    variant: str
    sent: int = 0
    delivered: int = 0
    bounced: int = 0
    opened: int = 0
    clicked: int = 0
    unsubscribed: int = 0
    complained: int = 0
    converted: int = 0
    revenue: float = 0.0


@dataclass
class StepKpis:
    step: int
    sent: int = 0
    delivered: int = 0
    bounced: int = 0
    opened: int = 0
    clicked: int = 0
    unsubscribed: int = 0
    complained: int = 0
    converted: int = 0
    revenue: float = 0.0
    #: A step with `variants`: the same figures per variant, which add up to the step's.
    variants: list[VariantKpis] = field(default_factory=list)

    def variant(self, name: str) -> VariantKpis:
        found = next((v for v in self.variants if v.variant == name), None)
        if found is None:
            found = VariantKpis(name)
            self.variants.append(found)
            self.variants.sort(key=lambda v: v.variant)
        return found


@dataclass
class Group:
    """Contacts enrolled in the range, in one arm of the holdout, and how many of them converted."""

    enrolled: int = 0
    converted: int = 0

    @property
    def rate(self) -> float | None:
        return self.converted / self.enrolled if self.enrolled else None


@dataclass
class Lift:
    """Conversion rate of messaged contacts minus that of held-out ones, in points, with a 95 % interval."""

    difference: float
    low: float
    high: float
    relative: float | None  # messaged rate / held-out rate - 1


@dataclass
class RuleKpis:
    rule: str
    entered: int = 0
    steps: list[StepKpis] = field(default_factory=list)
    converted: int = 0
    revenue: float = 0.0
    messaged: Group = field(default_factory=Group)
    held_out: Group = field(default_factory=Group)
    lift: Lift | None = None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["messaged"]["rate"], data["held_out"]["rate"] = self.messaged.rate, self.held_out.rate
        return data


def rule_kpis(conn: Connection, rules: list[str], since: datetime, until: datetime) -> list[RuleKpis]:
    """Each rule's KPIs for messages sent, contacts enrolled and goals reached in [since, until)."""
    found = {rule: RuleKpis(rule) for rule in rules}
    _funnel(conn, found, since, until)
    _conversions(conn, found, since, until)
    _groups(conn, found, since, until)
    for kpis in found.values():
        kpis.lift = lift(kpis.messaged, kpis.held_out)
    return list(found.values())


def _funnel(conn: Connection, found: dict[str, RuleKpis], since: datetime, until: datetime) -> None:
    said = [sa.func.sum(sa.case((D.feedback.contains(word), 1), else_=0)).label(word) for word in FEEDBACK]
    rows = conn.execute(
        sa.select(D.rule, D.step, D.variant, sa.func.count().label("sent"), *said)
        .where(D.rule.in_(list(found)), D.sent_at >= since, D.sent_at < until, D.status == "sent")
        .where(D.kind != INTERNAL_KIND)  # a message about the contact to someone else is not one the contact got
        .group_by(D.rule, D.step, D.variant)
        .order_by(D.rule, D.step)
    )
    for row in rows:
        counts = {word: int(getattr(row, word) or 0) for word in FEEDBACK}
        step = _step(found[row.rule], row.step)
        step.sent += row.sent
        for word, count in counts.items():
            setattr(step, word, getattr(step, word) + count)
        if row.variant is not None:
            variant = step.variant(row.variant)
            variant.sent = row.sent
            for word, count in counts.items():
                setattr(variant, word, count)


def _step(kpis: RuleKpis, number: int) -> StepKpis:
    step = next((s for s in kpis.steps if s.step == number), None)
    if step is None:  # e.g. the message went out before the range, the goal came within it
        step = StepKpis(number)
        kpis.steps.append(step)
        kpis.steps.sort(key=lambda s: s.step)
    return step


def _conversions(conn: Connection, found: dict[str, RuleKpis], since: datetime, until: datetime) -> None:
    """Conversions in the range, on the step (and variant) of the message each is attributed to."""
    rows = conn.execute(
        sa.select(
            V.rule, V.step, D.variant, sa.func.count().label("converted"), sa.func.sum(V.revenue).label("revenue")
        )
        .select_from(CONVERSIONS.outerjoin(DELIVERIES, D.id == V.delivery_id))
        .where(V.rule.in_(list(found)), V.at >= since, V.at < until, sa.not_(V.held_out))
        .group_by(V.rule, V.step, D.variant)
    )
    for row in rows:
        kpis = found[row.rule]
        step = _step(kpis, row.step)
        revenue = float(row.revenue or 0)
        step.converted += row.converted
        step.revenue += revenue
        if row.variant is not None:
            variant = step.variant(row.variant)
            variant.converted, variant.revenue = row.converted, revenue
        kpis.converted += row.converted
        kpis.revenue += revenue


def _groups(conn: Connection, found: dict[str, RuleKpis], since: datetime, until: datetime) -> None:
    """Contacts enrolled in the range, per arm, and how many of those enrolments converted (at any time)."""
    converted = sa.exists().where(V.enrolment_id == E.id)
    rows = conn.execute(
        sa.select(
            E.rule,
            E.held_out,
            sa.func.count().label("enrolled"),
            sa.func.sum(sa.case((converted, 1), else_=0)).label("converted"),
        )
        .where(E.rule.in_(list(found)), E.created_at >= since, E.created_at < until)
        .group_by(E.rule, E.held_out)
    )
    for row in rows:
        kpis = found[row.rule]
        group = Group(row.enrolled, int(row.converted or 0))
        kpis.entered += group.enrolled
        if row.held_out:
            kpis.held_out = group
        else:
            kpis.messaged = group


def lift(messaged: Group, held_out: Group) -> Lift | None:
    """The difference of the two conversion rates with a 95 % Wald interval (normal approximation).

    Three lines of arithmetic, hand-written: statsmodels has it (`confint_proportions_2indep`) but
    would bring numpy, scipy and pandas into the gateway for this alone.
    """
    if messaged.rate is None or held_out.rate is None:
        return None
    p1, p0 = messaged.rate, held_out.rate
    spread = Z95 * math.sqrt(p1 * (1 - p1) / messaged.enrolled + p0 * (1 - p0) / held_out.enrolled)
    difference = p1 - p0
    relative = p1 / p0 - 1 if p0 else None
    return Lift(difference, difference - spread, difference + spread, relative)
