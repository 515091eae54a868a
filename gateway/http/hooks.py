"""POST /hooks/{source}: verify, dedupe, group-commit, and only then acknowledge; CORS for pages."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ..errors import BadRequest, RejectedRequest, StorageUnavailable
from ..insight.metrics import UNKNOWN_SOURCE
from ..kit.sources import PEER_HEADER, Source
from ..store.inbox import NewCall, fit_key
from .running import GATEWAY_KEY, RETRY_AFTER_SECONDS, RunningGateway

log = structlog.get_logger("declic.ingest")

#: Headers that authenticate the caller: never stored with the call.
_UNSTORED_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})
#: How long a browser may reuse a preflight's answer (Chromium caps it at 2 hours).
_PREFLIGHT_MAX_AGE = "7200"
#: What a dedupe key may not hold: control characters, and the lone surrogates aiohttp keeps for a header's
#: bytes that are not UTF-8, which no database can store.
_NOT_TEXT = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def _source(request: web.Request) -> Source | web.Response:
    """The source the path names, or a 404 that does not tell a wrong token from a wrong name."""
    name = request.match_info["source"]
    source = request.app[GATEWAY_KEY].sources.get(name)
    if source is None or not source.url_token_matches(request.match_info.get("token")):
        return _problem(404, f"no source named {name!r} in this deployment")
    return source


async def handle_ping(request: web.Request) -> web.StreamResponse:
    """GET/HEAD on a hook: the validation request some providers send before the first call."""
    source = _source(request)
    if isinstance(source, web.Response):
        return source
    answer = await source.ping(request)
    return answer if answer is not None else _problem(405, "this source only takes POST", {"Allow": "POST"})


async def handle_preflight(request: web.Request) -> web.StreamResponse:
    """OPTIONS: a browser asks whether a page of another origin may post to this source.

    Hand-written rather than aiohttp-cors, which configures origins per route: here they differ per
    source behind one route. Any header the page asks for is allowed (the source ignores the others).
    """
    source = _source(request)
    if isinstance(source, web.Response):
        return source
    origin = request.headers.get("Origin")
    allowed = source.cors_origin(origin) if origin else None
    if allowed is None or "Access-Control-Request-Method" not in request.headers:
        reason = f"origin {origin!r} may not call this source from a browser (see its allowed_origins)"
        return _problem(403, reason if origin else "not a CORS preflight: no Origin header")
    headers = {
        "Access-Control-Allow-Origin": allowed,
        "Access-Control-Allow-Methods": "POST",
        "Access-Control-Max-Age": _PREFLIGHT_MAX_AGE,
        "Vary": "Origin",
    }
    if asked := request.headers.get("Access-Control-Request-Headers"):
        headers["Access-Control-Allow-Headers"] = asked
    return web.Response(status=204, headers=headers)


async def handle_hook(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter()
    gateway: RunningGateway = request.app[GATEWAY_KEY]
    source = _source(request)
    if isinstance(source, web.Response):
        name = request.match_info["source"]  # any text a caller sends: only config names become labels
        label, status = (name, "rejected") if name in gateway.sources else (UNKNOWN_SOURCE, "unknown_source")
        gateway.metrics.webhook(label, status, source.status, time.perf_counter() - started)
        return source
    status, response = await _receive(request, gateway, source)
    gateway.metrics.webhook(source.key, status, response.status, time.perf_counter() - started)
    origin = request.headers.get("Origin")
    if origin and (allowed := source.cors_origin(origin)) is not None:  # so the page can read the answer
        response.headers["Access-Control-Allow-Origin"] = allowed
        response.headers["Access-Control-Expose-Headers"] = "Retry-After"
        response.headers.add("Vary", "Origin")
    return response


async def _receive(request: web.Request, gateway: RunningGateway, source: Source) -> tuple[str, web.StreamResponse]:
    """What became of the call (accepted, duplicate, rejected, too_large, unavailable), and the answer."""
    name = source.key
    limit = source.max_body_bytes or gateway.settings.limits.max_body_bytes
    if (request.content_length or 0) > limit:
        return "too_large", _problem(413, f"body over {limit} bytes")
    try:
        # aiohttp decodes `Content-Encoding: gzip` (and deflate, br) as it reads, and stops at the
        # app's client_max_size (the largest limit) with 413: a body is bounded after decompression.
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return "too_large", _problem(413, f"body over {limit} bytes")
    except (HttpProcessingError, web.RequestPayloadError) as exc:  # a corrupt gzip body, a truncated one
        return "rejected", _problem(400, f"body could not be decoded ({type(exc).__name__})")
    if len(body) > limit:
        return "too_large", _problem(413, f"body over {limit} bytes")
    try:
        await source.verify(request, body)
        key = source.dedupe_key(request, body)
        if _NOT_TEXT.search(key):
            raise BadRequest("the delivery id (dedupe key) holds a control character or a byte that is not UTF-8")
        stored = source.stored_body(request, body)
    except RejectedRequest as exc:
        log.info("webhook rejected", source=name, status=exc.status, reason=exc.reason)
        return "rejected", _problem(exc.status, exc.reason)
    except Exception:  # a plugin bug on odd input is still odd input: 400, and a traceback for the maintainer
        log.exception("verify crashed", source=name)
        return "rejected", _problem(400, "this call could not be read")
    headers = dict(request.headers)
    if any(name in request.headers for name in _UNSTORED_HEADERS):  # case-insensitive; rare, so checked first
        headers = {k: v for k, v in headers.items() if k.lower() not in _UNSTORED_HEADERS}
    if request.remote:  # who called, kept with the call: evidence when it states consent
        headers = {k: v for k, v in headers.items() if k.lower() != PEER_HEADER.lower()}
        headers[PEER_HEADER] = request.remote
    call = NewCall(name, fit_key(key), gateway.clock.now(), headers, stored)
    try:
        accepted = await gateway.committer.submit(call)
    except StorageUnavailable as exc:
        log.error("webhook not stored", source=name, error=str(exc))
        return "unavailable", _problem(503, "storage unavailable, retry later", {"Retry-After": RETRY_AFTER_SECONDS})
    status = "duplicate" if accepted.duplicate else "accepted"
    # Debug: one line per webhook costs ~8% of the ack path; rejections and failures stay at info.
    log.debug("webhook " + status, source=name, inbox_id=accepted.inbox_id)
    answer = source.acknowledge(status, accepted.inbox_id)
    return status, answer or web.json_response({"status": status, "id": accepted.inbox_id})


def _problem(status: int, reason: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": reason}, status=status, headers=headers)


def json_error_middleware_factory(pages: dict[str, Callable[[int, str], web.Response]] | None = None) -> Any:
    """Answer aiohttp's own errors (413, 405...) with the same JSON shape as ours, and storage
    failures on any route (plugins' included) with 503 and Retry-After: the caller comes back.
    Under a prefix of `pages` (the dashboard, read by people), errors are that prefix's page instead."""
    prefixes = tuple((pages or {}).items())

    @web.middleware
    async def middleware(request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
        try:
            return await handler(request)
        except StorageUnavailable as exc:
            log.warning("storage unavailable", path=request.path, error=str(exc))
            return _problem(503, "storage unavailable, retry later", {"Retry-After": RETRY_AFTER_SECONDS})
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            for prefix, page in prefixes:
                if request.path.startswith(prefix):
                    return page(exc.status, exc.reason)
            return _problem(exc.status, exc.reason, {k: v for k, v in exc.headers.items() if k == "Allow"})

    return middleware
