"""Per-sink limits: sends in flight and sends per period, as every sink's config sets them."""

from __future__ import annotations

import asyncio
import time

import pytest

from declic_gateway.kit.limits import SendLimiter, parse_rate


async def test_concurrency_caps_sends_in_flight() -> None:
    limiter = SendLimiter(concurrency=3)
    in_flight, peak = 0, 0

    async def send() -> None:
        nonlocal in_flight, peak
        async with limiter:
            in_flight += 1
            peak = max(peak, in_flight)
            await asyncio.sleep(0.01)
            in_flight -= 1

    await asyncio.gather(*(send() for _ in range(20)))
    assert peak == 3


async def test_rate_spaces_sends_after_the_burst() -> None:
    limiter = SendLimiter(concurrency=100, rate="5/250ms")  # a burst of 5, then one every 50 ms
    stamps = []

    async def send() -> None:
        async with limiter:
            stamps.append(time.monotonic())

    await asyncio.gather(*(send() for _ in range(10)))
    span = stamps[-1] - stamps[0]
    assert 0.2 <= span < 1.0  # 5 more tokens at 20/s take 250 ms; none may come early


@pytest.mark.parametrize(
    ("text", "expected"), [("100/10s", (100, 10.0)), ("5/1s", (5, 1.0)), ("1000/1h", (1000, 3600.0))]
)
def test_rates_as_users_write_them(text: str, expected: tuple[int, float]) -> None:
    count, period = parse_rate(text)
    assert (count, period.total_seconds()) == expected


@pytest.mark.parametrize("text", ["100", "0/1s", "ten/1s", "5/soon"])
def test_bad_rates_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="rate"):
        parse_rate(text)
