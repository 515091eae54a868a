"""Durations as users write them in the config: 250ms, 90s, 5m, 1h, 3d, 2w."""

from __future__ import annotations

import re
from datetime import time, timedelta
from typing import Annotated

from pydantic import BeforeValidator

_UNITS = {"ms": "milliseconds", "s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_PATTERN = re.compile(r"^\s*(\d+)\s*(ms|[smhdw])\s*$")


def parse_duration(value: object) -> timedelta:
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return timedelta(seconds=value)
    match = _PATTERN.match(str(value))
    if not match:
        raise ValueError(f"invalid duration {value!r}: write a number and a unit, as 90s, 5m, 1h, 3d or 2w (or 250ms)")
    amount, unit = match.groups()
    return timedelta(**{_UNITS[unit]: int(amount)})


def parse_signed_duration(value: object) -> timedelta:
    """An offset from a date: -5d, +1w, 3h; years (+1y) count as 365 days (calendar years: see triggers)."""
    if isinstance(value, timedelta):
        return value
    text = str(value).strip()
    sign = -1 if text.startswith("-") else 1
    body = text.lstrip("+-")
    if body.endswith("y") and body[:-1].isdigit():
        return sign * timedelta(days=365 * int(body[:-1]))
    return sign * parse_duration(body)


def parse_local_time(value: object) -> time:
    """A time of day as HH:MM (YAML 1.1 may hand "10:00" over as 600 minutes: accept that too)."""
    if isinstance(value, time):
        return value
    if isinstance(value, int) and not isinstance(value, bool):  # sexagesimal: 10:00 -> 600
        hours, minutes = divmod(value, 60)
    else:
        match = re.fullmatch(r"\s*(\d{1,2}):(\d{2})\s*", str(value))
        if not match:
            raise ValueError(f"invalid time of day {value!r}: write HH:MM, as 10:00 or 21:30")
        hours, minutes = int(match.group(1)), int(match.group(2))
    if not (0 <= hours < 24 and 0 <= minutes < 60):
        raise ValueError(f"invalid time of day {value!r}: write HH:MM, as 10:00 or 21:30")
    return time(hours, minutes)


#: Config field types: a plugin's `interval: Duration = timedelta(minutes=5)` accepts `5m`.
Duration = Annotated[timedelta, BeforeValidator(parse_duration)]
SignedDuration = Annotated[timedelta, BeforeValidator(parse_signed_duration)]
LocalTime = Annotated[time, BeforeValidator(parse_local_time)]
