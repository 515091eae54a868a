"""Send-time guard rails that defer rather than drop: quiet hours and marketing pressure."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..config import PoliciesSpec
from ..store import DELIVERIES

D = DELIVERIES.c
COUNTED = ("sending", "sent")


@dataclass(frozen=True)
class Deferral:
    until: datetime
    reason: str


def quiet_until(spec: PoliciesSpec, channel: str, zone: ZoneInfo, now: datetime) -> Deferral | None:
    """When `now` falls in the channel's quiet window, in the contact's local time, until when."""
    window = spec.quiet_hours.get(channel) or spec.quiet_hours.get("*")
    if window is None:
        return None
    local = now.astimezone(zone)
    start, end, clock = window.start, window.end, local.time()
    quiet = start <= clock < end if start < end else (clock >= start or clock < end)
    if not quiet:
        return None
    day = local.date() + timedelta(days=1) if start > end and clock >= start else local.date()
    until = datetime.combine(day, end, tzinfo=zone)
    return Deferral(until, f"quiet hours until {_hhmm(end)} {zone.key}")


def pressure_until(conn: Connection, spec: PoliciesSpec, contact_id: int, kind: str, now: datetime) -> Deferral | None:
    """Over the cap, the step waits until the oldest message in the window leaves it."""
    cap = spec.pressure
    if cap is None or kind in cap.exempt:
        return None
    counted = [k for k in ("marketing", "transactional") if k not in cap.exempt]
    window = sa.and_(D.contact_id == contact_id, D.kind.in_(counted), D.status.in_(COUNTED), D.sent_at > now - cap.per)
    count, oldest = conn.execute(sa.select(sa.func.count(), sa.func.min(D.sent_at)).where(window)).one()
    if count < cap.max:
        return None
    return Deferral(oldest + cap.per, f"marketing pressure: {count} of {cap.max} per {_span(cap.per)}")


def _hhmm(moment: time) -> str:
    return moment.strftime("%H:%M")


def _span(delta: timedelta) -> str:
    days, seconds = delta.days, delta.seconds
    return f"{days}d" if days and not seconds else f"{int(delta.total_seconds() // 3600)}h"
