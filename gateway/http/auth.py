"""Who is calling: the admin's bearer token, checked in constant time."""

from __future__ import annotations

import hmac

from aiohttp import web

from ..config import AdminSpec


def bearer_token(request: web.Request) -> str | None:
    """The token of `Authorization: Bearer TOKEN` (the scheme in any case, RFC 9110), or None."""
    scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def is_admin(request: web.Request, admin: AdminSpec) -> bool:
    """True only when the config sets a token and the request carries the same one."""
    given = bearer_token(request)
    if admin.token is None or given is None:
        return False
    return hmac.compare_digest(given.encode(), admin.token.get_secret_value().encode())
