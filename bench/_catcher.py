"""The benchmarks' SMTP server, in a process of its own, noting when each message arrived and its subject.

In the benchmark's process it shared the interpreter lock with the client posting the webhooks, and parsed
every message in full (declic_gateway.testing.SmtpCatcher keeps them for tests to read): at about 500
e-mails/s on a 2-core machine it was the bottleneck, so the harness measured itself (docs/performance.md,
session 14). Here it reads the headers alone and reports `<time>\\t<message-id>\\t<subject>` lines on its
standard output. The time is time.perf_counter() unless asked for time.time(): perf_counter is
CLOCK_MONOTONIC on Linux, one clock for every process, so arrivals compare with the posts' times taken in the
benchmark's process.

    catcher = TimedCatcher().start()   # .port, .arrivals, .message_ids, .everything, .expected, .stop()
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from email.header import decode_header, make_header
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import IO, Any

from _common import free_port

_HEADERS = BytesHeaderParser(policy=compat32)
CLOCKS: dict[str, Callable[[], float]] = {"perf_counter": time.perf_counter, "time": time.time}


class _Handler:
    def __init__(self, out: IO[str], clock: Callable[[], float]) -> None:
        self.out, self.clock = out, clock

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        arrived = self.clock()
        headers = _HEADERS.parsebytes(envelope.content)
        subject = make_header(decode_header(headers["Subject"] or ""))
        self.out.write(f"{arrived}\t{headers['Message-ID'] or ''}\t{subject}\n")
        self.out.flush()
        return "250 OK"


def serve(port: int, clock: str) -> None:
    """The child: serve until the parent closes our standard input."""
    from aiosmtpd.controller import Controller

    controller = Controller(_Handler(sys.stdout, CLOCKS[clock]), hostname="127.0.0.1", port=port)
    controller.start()
    print(f"port\t{port}", flush=True)
    sys.stdin.read()
    controller.stop()


class TimedCatcher:
    """The parent's handle: `arrivals` fills with (time, subject) as messages arrive, `message_ids` with
    their Message-IDs; `everything` is set once `expected` have arrived. `clock`: "perf_counter" (default) or
    "time", for arrivals compared with epoch times."""

    def __init__(self, clock: str = "perf_counter") -> None:
        self.clock = clock
        self.arrivals: list[tuple[float, str]] = []
        self.message_ids: list[str] = []  # in the order of arrivals
        self.everything = threading.Event()
        self.expected = 0
        self.port = 0
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> TimedCatcher:
        self._process = subprocess.Popen(
            [sys.executable, __file__, str(free_port()), self.clock],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._process.stdout is not None
        first = self._process.stdout.readline()
        if not first.startswith("port\t"):
            self.stop()
            raise RuntimeError(f"the SMTP catcher did not start: {first!r}")
        self.port = int(first.split("\t")[1])
        self._reader = threading.Thread(target=self._read, args=(self._process.stdout,), daemon=True)
        self._reader.start()
        return self

    def _read(self, lines: IO[str]) -> None:
        for line in lines:
            arrived, message_id, subject = line.rstrip("\n").split("\t", 2)
            self.message_ids.append(message_id)
            self.arrivals.append((float(arrived), subject))
            if len(self.arrivals) >= self.expected:
                self.everything.set()

    def stop(self) -> None:
        if self._process is None:
            return
        try:
            if self._process.stdin:
                self._process.stdin.close()
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        if self._reader is not None:
            self._reader.join(timeout=10)
        self._process = None


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2])
