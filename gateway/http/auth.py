"""Who is calling: bearer tokens from the config and the scope they grant, checked in constant time."""

from __future__ import annotations

import hmac
from typing import Literal

from aiohttp import web

from ..config import AdminSpec, Settings

Scope = Literal["read", "admin"]


def bearer_token(request: web.Request) -> str | None:
    """The token of `Authorization: Bearer TOKEN` (the scheme in any case, RFC 9110), or None."""
    scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    try:  # aiohttp keeps a header's bytes that are not UTF-8 as lone surrogates: no configured token has one
        token.encode()
    except UnicodeEncodeError:
        return None
    return token


def scope_of(request: web.Request, admin: AdminSpec) -> Scope | None:
    """What the request's bearer token may do: `read`, `admin`, or nothing (None)."""
    given = bearer_token(request)
    return None if given is None else admin.scope_of(given)


def is_admin(request: web.Request, admin: AdminSpec) -> bool:
    """True only when the request carries a token with the admin scope."""
    return scope_of(request, admin) == "admin"


def may_scrape(request: web.Request, settings: Settings) -> bool:
    """/metrics is for the metrics token's holder (a Prometheus server) and any admin or read token."""
    given = bearer_token(request)
    if given is None:
        return False
    metrics = settings.metrics.token
    # Both checks always run, so the time taken does not tell which token came close.
    scraper = metrics is not None and hmac.compare_digest(given.encode(), metrics.get_secret_value().encode())
    return settings.admin.scope_of(given) is not None or scraper
