"""Durations as users write them in the config: 250ms, 90s, 5m, 1h, 3d, 2w."""

from __future__ import annotations

import re
from datetime import timedelta

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
