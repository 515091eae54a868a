"""GET /metrics: the Prometheus exposition, for the holder of the metrics or the admin token."""

from __future__ import annotations

from aiohttp import web

from .auth import may_scrape
from .running import GATEWAY_KEY


async def handle_metrics(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY_KEY]
    if not may_scrape(request, gateway.settings):
        # The same answer whether or not a token is configured: callers learn nothing about the deployment.
        return web.json_response(
            {"error": "/metrics needs `Authorization: Bearer TOKEN` with the metrics or admin token"},
            status=401,
            headers={"WWW-Authenticate": 'Bearer realm="declic"'},
        )
    await gateway.metrics.refresh(gateway.db, gateway.clock.now())
    body, content_type = gateway.metrics.exposition(request.headers.get("Accept"))
    return web.Response(body=body, headers={"Content-Type": content_type, "Cache-Control": "no-store"})
