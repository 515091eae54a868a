"""The admin REST API, /api/v1, and its OpenAPI 3.1 document at /api/openapi.json (docs/api.md)."""

from __future__ import annotations

from aiohttp import web

from .endpoints import ENDPOINTS
from .openapi import document

__all__ = ["register"]


def register(app: web.Application) -> None:
    """Add the API's routes to the app."""
    for endpoint in ENDPOINTS:
        app.router.add_route(endpoint.method, endpoint.path, endpoint.handle)
    app.router.add_get("/api/openapi.json", serve_document)


async def serve_document(_request: web.Request) -> web.Response:
    """Served without a token: it is the same for every deployment (generated from code, published
    in the docs) and names no rule, contact or setting; clients and generators fetch it as is."""
    return web.json_response(document())
