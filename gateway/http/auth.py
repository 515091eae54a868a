"""Who is calling: bearer tokens from the config, checked in constant time."""

from __future__ import annotations

import hmac

from aiohttp import web
from pydantic import SecretStr

from ..config import AdminSpec, Settings


def bearer_token(request: web.Request) -> str | None:
    """The token of `Authorization: Bearer TOKEN` (the scheme in any case, RFC 9110), or None."""
    scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def carries_one_of(request: web.Request, *tokens: SecretStr | None) -> bool:
    """True only when the request carries one of the tokens the config sets (unset ones match nothing)."""
    given = bearer_token(request)
    if given is None:
        return False
    # Every token is compared, so the time taken does not tell which one came close.
    matches = [hmac.compare_digest(given.encode(), t.get_secret_value().encode()) for t in tokens if t is not None]
    return any(matches)


def is_admin(request: web.Request, admin: AdminSpec) -> bool:
    """True only when the config sets an admin token and the request carries the same one."""
    return carries_one_of(request, admin.token)


def may_scrape(request: web.Request, settings: Settings) -> bool:
    """/metrics is for the metrics token's holder (a Prometheus server) and the admin."""
    return carries_one_of(request, settings.metrics.token, settings.admin.token)
