"""Durations as users write them: every unit combination, ISO 8601, and the forms that were always accepted."""

from __future__ import annotations

from datetime import timedelta

import pytest

from declic_gateway.kit.durations import format_duration, parse_duration, parse_signed_duration

ACCEPTED = [
    # The forms accepted before compound units, unchanged.
    ("250ms", timedelta(milliseconds=250)),
    ("90s", timedelta(seconds=90)),
    ("5m", timedelta(minutes=5)),
    ("1h", timedelta(hours=1)),
    ("3d", timedelta(days=3)),
    ("2w", timedelta(weeks=2)),
    (" 7d ", timedelta(days=7)),
    ("7 d", timedelta(days=7)),
    (90, timedelta(seconds=90)),
    (timedelta(hours=2), timedelta(hours=2)),
    # Several units, largest first.
    ("1h30m", timedelta(hours=1, minutes=30)),
    ("2d12h", timedelta(days=2, hours=12)),
    ("2d 12h", timedelta(days=2, hours=12)),
    ("1w2d", timedelta(days=9)),
    ("1m30s", timedelta(seconds=90)),
    ("1s500ms", timedelta(milliseconds=1500)),
    ("1w1d1h1m1s1ms", timedelta(weeks=1, days=1, hours=1, minutes=1, seconds=1, milliseconds=1)),
    ("3650d", timedelta(days=3650)),
    # ISO 8601, through isodate.
    ("P1DT12H", timedelta(days=1, hours=12)),
    ("PT1H30M", timedelta(hours=1, minutes=30)),
    ("PT90M", timedelta(minutes=90)),
    ("P2W", timedelta(weeks=2)),
    ("PT0.5S", timedelta(milliseconds=500)),
    ("p1dt12h", timedelta(days=1, hours=12)),
]

REFUSED = [
    ("3 days", "write a number and a unit"),
    ("30m1h", "write each unit once, largest first"),
    ("1h1h", "write each unit once, largest first"),
    ("1y", "write a number and a unit"),
    ("P1M", "years and months vary in length"),
    ("P1Y", "years and months vary in length"),
    ("P", "not an ISO 8601 duration"),
    ("P1X", "not an ISO 8601 duration"),
    ("P99999999999999D", "not an ISO 8601 duration"),
    ("P3651D", "longer than 10 years"),
    ("3650d1s", "longer than 10 years"),
    ("9" * 5000 + "s", "longer than 10 years"),
    ("P" + "1" * 100 + "D", "longer than any ISO 8601 duration"),
    ("1h" * 1000, "write each unit once"),
    (-5, "cannot be negative"),
]


@pytest.mark.parametrize(("text", "expected"), ACCEPTED, ids=[str(t)[:20] for t, _ in ACCEPTED])
def test_accepted(text: object, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(("text", "message"), REFUSED, ids=[str(t)[:20] for t, _ in REFUSED])
def test_refused_with_a_reason(text: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("-1h30m", -timedelta(hours=1, minutes=30)), ("+P1D", timedelta(days=1)), ("-1y", -timedelta(days=365))],
)
def test_signed_offsets_combine_units_too(text: str, expected: timedelta) -> None:
    assert parse_signed_duration(text) == expected


@pytest.mark.parametrize("text", ["1h30m", "2d12h", "1s500ms", "90s"])
def test_the_shortest_spelling_reads_back_as_the_same_duration(text: str) -> None:
    assert parse_duration(format_duration(parse_duration(text))) == parse_duration(text)
