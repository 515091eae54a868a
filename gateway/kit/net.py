"""Outbound HTTP to URLs that users configure, guarded against server-side request forgery.

Every address a name resolves to is checked at connect time (so DNS rebinding cannot slip
past a check made earlier), IP literals are checked before connecting, redirects are never
followed, and only public unicast addresses are reached unless the config allow-lists more.
"""

from __future__ import annotations

import ipaddress
import math
import socket
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class ForbiddenAddress(aiohttp.ClientError):
    """The URL points at an address Declic will not call (loopback, private, link-local...)."""


class Allowance:
    """What the config allow-lists: host names, and networks in CIDR form."""

    def __init__(self, entries: list[str] | tuple[str, ...] = ()):
        self.hosts = {e.lower() for e in entries if not _is_network(e)}
        self.networks = [ipaddress.ip_network(e, strict=False) for e in entries if _is_network(e)]

    def permits(self, host: str, address: IPAddress) -> bool:
        if host.lower() in self.hosts:
            return True
        embedded = embedded_ipv4(address)
        if any(a in network for a in (address, embedded) if a is not None for network in self.networks):
            return True
        if any(address in network for network in _NEVER_PUBLIC):
            return False
        target = embedded or address
        return target.is_global and not target.is_multicast

    def lists(self, host: str) -> bool:
        """Whether the config names this host itself: its name, or for an IP literal a network holding it."""
        if host.lower() in self.hosts:
            return True
        literal = _ip_literal(host)
        return literal is not None and any(literal in network for network in self.networks)


def _is_network(entry: str) -> bool:
    try:
        ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return False
    return True


#: IPv6 ranges whose last 32 bits are an IPv4 address that the packets end up at.
_EMBEDDING = tuple(
    ipaddress.IPv6Network(n)
    for n in (
        "::ffff:0:0/96",  # IPv4-mapped: ::ffff:127.0.0.1
        "::ffff:0:0:0/96",  # IPv4-translated (SIIT): ::ffff:0:127.0.0.1
        "::/96",  # IPv4-compatible, deprecated: ::127.0.0.1
        "64:ff9b::/96",  # NAT64's well-known prefix: DNS64 gives these for public names on IPv6-only hosts
    )
)
#: Not public whatever they carry. Local-use NAT64 (RFC 8215) is an operator's own translator, and where
#: it puts the IPv4 address depends on a prefix length we cannot know. Teredo is relayed over UDP to a
#: client behind a NAT: no service worth calling lives there, and its embedded addresses prove nothing.
_NEVER_PUBLIC = tuple(ipaddress.IPv6Network(n) for n in ("64:ff9b:1::/48", "2001::/32"))


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for: mapped, translated, compatible, NAT64 or 6to4 (2002::/16)."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.sixtofour is not None:
        return address.sixtofour
    if any(address in network for network in _EMBEDDING):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def api_client(api_base: str, timeout: float, headers: dict[str, str] | None = None) -> GuardedClient:
    """A guarded client for a provider's API: its configured host is allowed (a local stand-in in tests,
    a proxy in some deployments), every other address is checked, and no redirect is followed."""
    return GuardedClient(allow=[URL(api_base).raw_host or ""], timeout=timeout, headers=headers)


def check_url(url: str | URL, allowance: Allowance) -> URL:
    """Refuse what no resolver check can catch: other schemes, credentials in the URL, IP literals."""
    parsed = URL(url) if isinstance(url, str) else url
    if parsed.scheme not in ("http", "https"):
        raise ForbiddenAddress(f"only http and https URLs are called, not {parsed.scheme or 'none'!r}")
    if parsed.user is not None or parsed.password is not None:
        raise ForbiddenAddress("URLs with credentials are not called")
    host = parsed.raw_host or ""
    if not host:
        raise ForbiddenAddress("the URL has no host")
    literal = _ip_literal(host)
    if literal is None:
        return parsed  # a name: checked address by address when it is resolved
    if not allowance.permits(host, literal):
        raise ForbiddenAddress(f"{host} is not a public address (allow it under `allow:` to call it)")
    return parsed.with_host(str(literal))


def _ip_literal(host: str) -> IPAddress | None:
    """An address however it is written: 127.0.0.1, [::1], and the old forms 2130706433, 0x7f.1, 0177.0.0.1."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


class GuardedResolver(AbstractResolver):
    """Resolves as usual, then refuses the whole name if any address it gives is not allowed."""

    def __init__(self, allowance: Allowance):
        self._allowance = allowance
        self._inner = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            address = ipaddress.ip_address(result["host"])
            if not self._allowance.permits(host, address):
                raise ForbiddenAddress(
                    f"{host} resolves to {address}, not a public address (allow it under `allow:` to call it)"
                )
        return results

    async def close(self) -> None:
        await self._inner.close()


class GuardedClient:
    """An aiohttp session for user-given URLs: addresses checked, no redirects, a total timeout."""

    def __init__(
        self, allow: list[str] | tuple[str, ...] = (), timeout: float = 10.0, headers: dict[str, str] | None = None
    ):
        self.allowance = Allowance(allow)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._headers = headers
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(resolver=GuardedResolver(self.allowance), use_dns_cache=False)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout, headers=self._headers)
        return self._session

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        """`async with client.request("POST", url, json=...) as response:`; never follows a redirect."""
        target = check_url(url, self.allowance)
        return self.session.request(method, target, allow_redirects=False, **kwargs)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def retry_after(value: str | None, now: datetime) -> float | None:
    """A provider's Retry-After, in seconds or as an HTTP date (RFC 9110); None when absent or unreadable."""
    value = (value or "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            return max((parsedate_to_datetime(value) - now).total_seconds(), 0.0)
        except (TypeError, ValueError):
            return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None
