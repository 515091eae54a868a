"""Who is looking at the dashboard: a token typed once into the login form, then a session cookie.

The cookie is a Fernet token (`cryptography`: AES-CBC + HMAC-SHA256, with its time of issue, so
it expires) under a key derived from the deployment's link key: replicas share sessions and
nothing new is stored. It holds no token, only an HMAC of the token the person logged in with
(`who`) and the session's CSRF token. The scope is worked out again from `who` on every request:
removing a token from the config, or narrowing its scope, applies to open sessions at the next
restart.

Hand-written around Fernet rather than aiohttp-session (2.12.1): that library keeps its state under
string request keys, which aiohttp 3.14 warns about on every request, and what the dashboard
needs of it (load, save, clear one cookie) is the few lines below.

`SameSite=Lax`: the browser never sends the cookie with another site's POST (nor its frames and
fetches), and a link to a rule page pasted in a chat still opens logged in, where `Strict` would
show the login form. Every form carries the CSRF token as well, checked in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from base64 import urlsafe_b64encode
from collections.abc import Mapping
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from cryptography.fernet import Fernet, InvalidToken

from ...config import AdminSpec
from ..auth import Scope
from ..running import RunningGateway

COOKIE = "declic_admin"
PATH = "/admin/"
#: A session ends this long after login (or when the person logs out).
SESSION_SECONDS = 8 * 3600
#: Larger cookies are not Declic's: not even decrypted.
MAX_COOKIE_CHARS = 1000


@dataclass
class Session:
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    who: str | None = None  # HMAC of the token logged in with; None before login
    new: bool = True  # not yet in a cookie


@dataclass
class Sessions:
    """The session cookie: read, written, cleared; its key comes from the database on first use."""

    gateway: RunningGateway
    secure: bool
    _key: bytes | None = None

    async def key(self) -> bytes:
        if self._key is None:
            link_secret = await self.gateway.link_secret()
            # A key of its own: a leaked session key forges no message link, nor the reverse.
            self._key = hmac.new(link_secret, b"declic dashboard session", hashlib.sha256).digest()
        return self._key

    async def load(self, request: web.Request) -> Session:
        """The request's session, or a new one (a missing, forged, altered or expired cookie)."""
        value = request.cookies.get(COOKIE, "")
        if not value or len(value) > MAX_COOKIE_CHARS:
            return Session()
        fernet = Fernet(urlsafe_b64encode(await self.key()))
        try:
            data = json.loads(fernet.decrypt(value + "=" * (-len(value) % 4), ttl=SESSION_SECONDS))
            return Session(str(data["csrf"]), data["who"] and str(data["who"]), new=False)
        except (InvalidToken, ValueError, KeyError, TypeError):
            return Session()

    async def save(self, response: web.StreamResponse, session: Session) -> None:
        fernet = Fernet(urlsafe_b64encode(await self.key()))
        sealed = fernet.encrypt(json.dumps({"csrf": session.csrf, "who": session.who}).encode())
        value = sealed.decode().rstrip("=")  # "=" would make the cookie a quoted string
        response.set_cookie(
            COOKIE,
            value,
            path=PATH,
            max_age=SESSION_SECONDS,
            httponly=True,
            samesite="Lax",
            secure=self.secure,
        )

    def clear(self, response: web.StreamResponse) -> None:
        response.del_cookie(COOKIE, path=PATH, httponly=True, samesite="Lax", secure=self.secure)

    async def fingerprint(self, token: str) -> str:
        """What a session keeps of the token: an HMAC under the session key, never the token."""
        return hmac.new(await self.key(), token.encode(), hashlib.sha256).hexdigest()

    async def scope(self, session: Session, admin: AdminSpec) -> Scope | None:
        if session.who is None:
            return None
        key, who = await self.key(), session.who
        return admin.scope_matching(
            lambda secret: hmac.compare_digest(hmac.new(key, secret.encode(), hashlib.sha256).hexdigest(), who)
        )


async def form(request: web.Request) -> Mapping[str, object]:
    """The posted form, or a 400 for one that cannot be read: an unknown charset (LookupError), multipart
    without its boundary or bytes not in the charset (ValueError), a part in an unknown transfer encoding
    (RuntimeError), with too many headers (HttpProcessingError), or a body cut short."""
    try:
        return await request.post()
    except (LookupError, ValueError, RuntimeError, HttpProcessingError, web.RequestPayloadError) as exc:
        raise web.HTTPBadRequest(reason="Bad form") from exc


async def csrf_ok(request: web.Request, session: Session) -> bool:
    """The posted form's `csrf` field is the session's token (constant-time comparison)."""
    if session.new:
        return False
    given = (await form(request)).get("csrf")
    return isinstance(given, str) and hmac.compare_digest(given.encode(), session.csrf.encode())
