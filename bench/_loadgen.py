"""The load generator shared by the benchmarks: an aiohttp client, closed loop, N concurrent senders.

Run in its own process (bench/ingest.py starts one or more):
    python bench/_loadgen.py --url URL --seconds S --warmup W --concurrency C --start-at EPOCH --prefix P
Prints one JSON object on stdout. Latencies are only those of requests that completed inside the
measured window [start + warmup, start + warmup + seconds]; requests still in flight when the window
closes are awaited (and counted in `ok_total`) but not timed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import order_body, sign, webhook_headers


async def run(args: argparse.Namespace) -> dict[str, object]:
    bodies = [order_body(i) for i in range(args.bodies)]
    digests = [sign(b) for b in bodies]
    counter = iter(range(10**12))
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    latencies: list[float] = []
    measured_ok = 0
    sent = 0

    delay = args.start_at - time.time()
    if delay > 0:
        await asyncio.sleep(delay)
    start = time.perf_counter()
    window_start = start + args.warmup
    window_end = window_start + args.seconds

    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def sender() -> None:
            nonlocal measured_ok, sent
            while time.perf_counter() < window_end:
                n = next(counter)
                k = n % len(bodies)
                headers = webhook_headers(digests[k], f"{args.prefix}-{n}")
                sent += 1
                t0 = time.perf_counter()
                try:
                    async with session.post(args.url, data=bodies[k], headers=headers) as response:
                        await response.read()
                        status = response.status
                except (TimeoutError, aiohttp.ClientError) as exc:
                    errors[type(exc).__name__] += 1
                    continue
                t1 = time.perf_counter()
                statuses[status] += 1
                if status == 200 and window_start <= t1 <= window_end:
                    measured_ok += 1
                    latencies.append(t1 - t0)

        await asyncio.gather(*(sender() for _ in range(args.concurrency)))

    return {
        "sent": sent,
        "ok_total": statuses.get(200, 0),
        "statuses": {str(k): v for k, v in statuses.items()},
        "errors": dict(errors),
        "measured_ok": measured_ok,
        "window_seconds": args.seconds,
        "latencies": latencies,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--start-at", type=float, default=0.0, help="wall-clock time to start at (aligns processes)")
    parser.add_argument("--prefix", default="wh", help="webhook ids are PREFIX-N: unique per process and run")
    parser.add_argument("--bodies", type=int, default=64, help="distinct order bodies to cycle through")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
