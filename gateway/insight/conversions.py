"""Conversions: a goal counts for a rule when it comes within the rule's attribution window after
the rule's last message to the contact, and is attributed to that message.

A held-out contact's journey records, at each step, the message it would have been sent
(delivery status `held_out`): its goals count the same way, in the held-out group, so the
conversion rates of both groups compare like with like.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..store import CONVERSIONS, DELIVERIES, sql
from ..store.tables import INTERNAL_KIND

D = DELIVERIES.c
#: Where goal events usually carry their money, when the rule does not name the property.
REVENUE_PROPERTIES = ("total_price", "revenue", "value", "total")


@dataclass(frozen=True)
class Attributed:
    enrolment_id: int
    step: int
    sent_at: datetime
    held_out: bool
    revenue: float | None
    currency: str | None

    def describe(self) -> str:
        what = "held-out step" if self.held_out else "step"
        currency = f" {self.currency}" if self.currency else ""
        money = f" ({self.revenue:.2f}{currency})" if self.revenue is not None else ""
        return f"converted: {what} {self.step} of {self.sent_at:%Y-%m-%d %H:%M} UTC{money}"


def attribute(
    conn: Connection,
    rule: str,
    enrolment_ids: list[int],
    contact_id: int,
    event_id: str,
    properties: dict[str, Any],
    at: datetime,
    window: timedelta,
    revenue_property: str | None = None,
) -> Attributed | None:
    """Count the goal for the last message of these journeys within the window before it; None if none."""
    if not enrolment_ids:
        return None
    last = conn.execute(
        sa.select(D.id, D.enrolment_id, D.step, D.sent_at, D.status)
        .where(
            D.enrolment_id.in_(enrolment_ids),
            D.status.in_(("sent", "held_out")),
            D.kind != INTERNAL_KIND,  # the contact did not get it: the goal is not its doing
            D.sent_at <= at,
            D.sent_at >= at - window,
        )
        .order_by(D.sent_at.desc(), D.id.desc())
        .limit(1)
    ).first()
    if last is None:
        return None
    revenue = money(properties, revenue_property)
    currency = properties.get("currency")
    found = Attributed(
        last.enrolment_id,
        last.step,
        last.sent_at,
        last.status == "held_out",
        revenue,
        currency.upper()[:3] if isinstance(currency, str) and currency else None,
    )
    row = {
        "rule": rule,
        "contact_id": contact_id,
        "enrolment_id": found.enrolment_id,
        "step": found.step,
        "delivery_id": last.id,
        "held_out": found.held_out,
        "event_id": event_id,
        "at": at,
        "revenue": found.revenue,
        "currency": found.currency,
    }
    insert = sql.insert(conn.dialect.name, CONVERSIONS).on_conflict_do_nothing(index_elements=["rule", "event_id"])
    conn.execute(insert, row)  # a replayed goal event counts once
    return found


def money(properties: dict[str, Any], name: str | None = None) -> float | None:
    """The goal's money: the named property, else the first of REVENUE_PROPERTIES that is a number."""
    for key in (name,) if name else REVENUE_PROPERTIES:
        value = properties.get(key)
        if isinstance(value, bool) or value is None:
            continue
        try:
            number = float(Decimal(str(value)))
        except (InvalidOperation, ValueError):
            continue
        if math.isfinite(number):
            return number
    return None
