"""The listening sockets, bound before anything starts: a port in use stops `declic serve` before
the worker has claimed a single job."""

from __future__ import annotations

import socket


def bind(host: str, port: int) -> list[socket.socket]:
    """One socket per address `host` resolves to, bound (not yet listening); OSError if any fails."""
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
            sock.bind(address)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets
