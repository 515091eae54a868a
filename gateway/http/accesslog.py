"""The access log: one structlog line per request, without query strings, bodies or the tokens in paths."""

from __future__ import annotations

import structlog
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, Request, StreamResponse

log = structlog.get_logger("declic.access")
#: Route parameters that are credentials or carry personal data: an unsubscribe or tracking token,
#: a source's URL token. Logged as `***`.
SECRET_PARAMETERS = frozenset({"token"})
#: Probes that a load balancer or a health check sends every few seconds: at debug level when they succeed.
PROBES = frozenset({"/healthz", "/readyz", "/metrics"})
#: Accepted webhooks are at debug level too: the inbox keeps each one and /metrics counts them by source
#: and status, so an info line each would only double the log's volume (and a sizeable share of the CPU
#: an e-mail costs, measured in docs/performance.md). Refused ones (4xx, 5xx) stay at info.
WEBHOOKS = "/hooks/"
#: Paths are cut to this many characters.
MAX_PATH = 200


class AccessLogger(AbstractAccessLogger):
    """Replaces aiohttp's Apache-style text line, which carries the query string, the client's IP
    address and its user agent."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        path = route_path(request)
        quiet = response.status < 400 and (path in PROBES or path.startswith(WEBHOOKS))
        (log.debug if quiet else log.info)(
            "request", method=request.method, path=path, status=response.status, ms=round(time * 1000, 1)
        )


def route_path(request: BaseRequest) -> str:
    """The path as the route spells it, secret parameters masked: `/u/***`, `/hooks/shop`."""
    info = request.match_info if isinstance(request, Request) else None  # None: the request line was bad
    resource = info.route.resource if info is not None else None
    if info is None or resource is None:  # no route matched (404, 405): nothing to mask by name
        return unmatched_path(request.path)
    values = {name: "***" if name in SECRET_PARAMETERS else value for name, value in info.items()}
    try:
        return resource.canonical.format_map(values)[:MAX_PATH]
    except (KeyError, IndexError, ValueError):  # a canonical form with braces of its own
        return resource.canonical[:MAX_PATH]


def unmatched_path(path: str) -> str:
    """Its first segment only: what follows may be a token whatever the path, a link's with a slash added
    (`/u/TOKEN/` is `/u/***`) or a source's under a misspelt prefix (`/hook/shop/TOKEN` is `/hook/***`)."""
    first, slash, _ = path[1:].partition("/")
    return ("/" + first)[:MAX_PATH] + ("/***" if slash else "")
