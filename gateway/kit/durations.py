"""Durations as users write them in the config: 250ms, 90s, 5m, 1h, 3d, 2w, combined (1h30m, 2d12h) or in
ISO 8601 (P1DT12H, PT90M); bounded so that date arithmetic holds."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import time, timedelta
from typing import Annotated

import isodate
from pydantic import AfterValidator, BeforeValidator

#: The longest duration any setting takes. `now + MAX_DURATION` stays far from year 9999, so adding
#: a few of them to a date can never overflow (a huge wait used to fail every call it applied to).
MAX_DURATION = timedelta(days=3650)
MAX_DURATION_TEXT = "10 years (3650d)"

_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
#: One or more `<digits><unit>` parts, largest unit first: 90s, 1h30m, 2d 12h, 1s500ms.
_PATTERN = re.compile(r"^\s*(?:\d+\s*(?:ms|[smhdw])\s*)+$")
_PART = re.compile(r"(\d+)\s*(ms|[smhdw])")
_ORDER = ("w", "d", "h", "m", "s", "ms")
#: ISO 8601 durations are short; a longer text is a mistake or an attack, refused before parsing.
_MAX_ISO = 40
_HELP = "write a number and a unit, as 90s, 5m, 1h, 3d or 2w (or 250ms), several as 1h30m, or ISO 8601 as P1DT12H"
_MAX_MS = MAX_DURATION // timedelta(milliseconds=1)


def parse_duration(value: object) -> timedelta:
    """`90s` -> 90 seconds; an int counts seconds. Between 0 and 10 years, or ValueError."""
    if isinstance(value, timedelta):
        return _bounded(value, value, f"{format_duration(value)}")
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"invalid duration {value}: a duration cannot be negative")
        if value > _MAX_MS // 1000:
            raise ValueError(f"duration {value}s is longer than {MAX_DURATION_TEXT}, the longest Declic accepts")
        return timedelta(seconds=value)
    text = str(value)
    if text.strip().upper().startswith("P"):
        parsed = _iso(text)
        return _bounded(parsed, parsed, _short(text))
    if not _PATTERN.match(text):
        raise ValueError(f"invalid duration {_short(text)}: {_HELP}")
    total = 0
    last = -1
    for digits, unit in _PART.findall(text):
        if _ORDER.index(unit) <= last:
            raise ValueError(f"invalid duration {_short(text)}: write each unit once, largest first, as 1h30m")
        last = _ORDER.index(unit)
        # Compare digits before int(): a 5,000-digit number is a ValueError of its own.
        if len(digits.lstrip("0")) > 15:
            total = _MAX_MS + 1
            break
        total += int(digits) * _UNIT_MS[unit]
    if total > _MAX_MS:
        raise ValueError(f"duration {_short(text)} is longer than {MAX_DURATION_TEXT}, the longest Declic accepts")
    return timedelta(milliseconds=total)


def _iso(text: str) -> timedelta:
    """ISO 8601 through isodate (maintained, and it knows the format's corners: PT1.5H, P1W, P1DT).

    Years and months are refused: their length varies, and a wait must say how long it is.
    """
    text = text.strip()
    if len(text) > _MAX_ISO:
        raise ValueError(f"invalid duration {_short(text)}: longer than any ISO 8601 duration Declic takes")
    try:
        parsed = isodate.parse_duration(text.upper())
    except (ValueError, OverflowError, isodate.ISO8601Error):
        raise ValueError(
            f"invalid duration {_short(text)}: not an ISO 8601 duration such as P1DT12H or PT90M"
        ) from None
    if not isinstance(parsed, timedelta):
        raise ValueError(f"invalid duration {_short(text)}: years and months vary in length; write days, as P30D")
    return parsed


def parse_signed_duration(value: object) -> timedelta:
    """An offset from a date: -5d, +1w, 3h; years (+1y) count as 365 days (calendar years: see triggers).

    At most 10 years either way.
    """
    if isinstance(value, timedelta):
        return _bounded(abs(value), value, format_duration(value))
    text = str(value).strip()
    sign = -1 if text.startswith("-") else 1
    body = text[1:] if text[:1] in "+-" else text
    if re.fullmatch(r"\d+y", body):
        years = body[:-1]
        if len(years.lstrip("0")) > 2 or int(years) * 365 > MAX_DURATION.days:
            raise ValueError(f"offset {_short(text)} is longer than {MAX_DURATION_TEXT}, the longest Declic accepts")
        return sign * timedelta(days=365 * int(years))
    return sign * parse_duration(body)


def _bounded(size: timedelta, value: timedelta, text: str) -> timedelta:
    if size < timedelta(0):
        raise ValueError(f"invalid duration {text}: a duration cannot be negative")
    if size > MAX_DURATION:
        raise ValueError(f"duration {text} is longer than {MAX_DURATION_TEXT}, the longest Declic accepts")
    return value


def _short(text: str) -> str:
    """The value as written, cut so that a hostile megabyte does not fill the error line."""
    return repr(text if len(text) <= 40 else text[:40] + "...")


def format_duration(delta: timedelta) -> str:
    """The shortest exact spelling: 90s -> `90s`, 86400s -> `1d`, 0.25s -> `250ms`."""
    sign, delta = ("-", -delta) if delta < timedelta(0) else ("", delta)
    ms = delta // timedelta(milliseconds=1)
    for unit in ("w", "d", "h", "m", "s"):
        if ms and ms % _UNIT_MS[unit] == 0:
            return f"{sign}{ms // _UNIT_MS[unit]}{unit}"
    return f"{sign}{ms}ms"


@dataclass(frozen=True)
class Between:
    """A setting's own range, tighter than 0 to 10 years: `Annotated[Duration, Between("10s", "1d")]`.

    Use it as an `AfterValidator` through `between()`; the config reference and the tests read
    `low` and `high` back.
    """

    low: str
    high: str

    def __call__(self, value: timedelta) -> timedelta:
        low, high = parse_signed_duration(self.low), parse_signed_duration(self.high)
        if value < low:
            raise ValueError(f"{format_duration(value)} is too short: write {self.low} to {self.high}")
        if value > high:
            raise ValueError(f"{format_duration(value)} is too long: write {self.low} to {self.high}")
        return value


def between(low: str, high: str) -> AfterValidator:
    """A range for one duration setting, written as in the config: `between("1s", "1h")`."""
    return AfterValidator(Between(low, high))


def parse_local_time(value: object) -> time:
    """A time of day as HH:MM (YAML 1.1 may hand "10:00" over as 600 minutes: accept that too)."""
    if isinstance(value, time):
        return value
    if isinstance(value, int) and not isinstance(value, bool):  # sexagesimal: 10:00 -> 600
        hours, minutes = divmod(value, 60)
    else:
        match = re.fullmatch(r"\s*(\d{1,2}):(\d{2})\s*", str(value))
        if not match:
            raise ValueError(f"invalid time of day {_short(str(value))}: write HH:MM, as 10:00 or 21:30")
        hours, minutes = int(match.group(1)), int(match.group(2))
    if not (0 <= hours < 24 and 0 <= minutes < 60):
        raise ValueError(f"invalid time of day {_short(str(value))}: write HH:MM, as 10:00 or 21:30")
    return time(hours, minutes)


#: Config field types: a plugin's `interval: Duration = timedelta(minutes=5)` accepts `5m`.
#: Every Duration is between 0 and 10 years; `between()` narrows one setting further.
Duration = Annotated[timedelta, BeforeValidator(parse_duration)]
#: An offset from a date, -10 to +10 years.
SignedDuration = Annotated[timedelta, BeforeValidator(parse_signed_duration)]
LocalTime = Annotated[time, BeforeValidator(parse_local_time)]
