"""The listening sockets, bound before anything starts: a port in use stops `declic serve` before
the worker has claimed a single job; and the event loop that serves them."""

from __future__ import annotations

import asyncio
import socket


def bind(host: str, port: int) -> list[socket.socket]:
    """One socket per address `host` resolves to, bound (not yet listening); OSError if any fails. Port 0: the
    kernel picks a free port for the first address, and the others take the same one."""
    found = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _name, address in dict.fromkeys(found):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            # As asyncio's create_server does: a restart may reuse a port in TIME_WAIT (never one in use).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((address[0], port, *address[2:]))
            port = port or sock.getsockname()[1]
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop where it is installed (a dependency except on Windows, which it does not support): 7.6 %
    fewer instructions per e-mail than asyncio's own loop, whose Python scheduling and socket transports carry
    every webhook, SMTP command and database hand-off (docs/performance.md, session 13); else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
