"""Who is calling: a bearer token from the config, and the scope it grants, checked in constant time."""

from __future__ import annotations

from typing import Literal

from aiohttp import web

from ..config import AdminSpec

Scope = Literal["read", "admin"]


def bearer_token(request: web.Request) -> str | None:
    """The token of `Authorization: Bearer TOKEN` (the scheme in any case, RFC 9110), or None."""
    scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def scope_of(request: web.Request, admin: AdminSpec) -> Scope | None:
    """What the request's bearer token may do: `read`, `admin`, or nothing (None)."""
    given = bearer_token(request)
    return None if given is None else admin.scope_of(given)


def is_admin(request: web.Request, admin: AdminSpec) -> bool:
    """True only when the request carries a token with the admin scope."""
    return scope_of(request, admin) == "admin"
