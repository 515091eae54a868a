"""The SSRF guard on outbound calls to user-given URLs, against real local servers."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from declic_gateway.kit.net import Allowance, ForbiddenAddress, GuardedClient


@pytest.fixture
async def server() -> AsyncIterator[TestServer]:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="reached")

    async def bounce(request: web.Request) -> web.Response:
        raise web.HTTPFound("http://169.254.169.254/latest/meta-data/")

    app = web.Application()
    app.router.add_get("/", ok)
    app.router.add_get("/redirect", bounce)
    test_server = TestServer(app, host="127.0.0.1")
    await test_server.start_server()
    yield test_server
    await test_server.close()


REFUSED = [
    "http://127.0.0.1:{port}/",
    "http://localhost:{port}/",  # a name that resolves to a loopback address
    "http://[::1]:{port}/",
    "http://[::ffff:127.0.0.1]:{port}/",  # IPv4-mapped IPv6
    "http://2130706433:{port}/",  # 127.0.0.1 written as one decimal number
    "http://0x7f.0.0.1:{port}/",  # hexadecimal
    "http://0177.0.0.1:{port}/",  # octal
    "http://10.1.2.3:{port}/",
    "http://172.16.0.1:{port}/",
    "http://172.31.255.254:{port}/",
    "http://192.168.1.1:{port}/",
    "http://169.254.169.254/latest/meta-data/",  # cloud metadata
    "http://[fd00::1]/",  # unique local IPv6
    "http://0.0.0.0:{port}/",
    # IPv6 addresses that carry an internal IPv4 one
    "http://[64:ff9b::7f00:1]:{port}/",  # NAT64 to 127.0.0.1
    "http://[64:ff9b::10.1.2.3]:{port}/",  # NAT64 to a private address
    "http://[64:ff9b::169.254.169.254]/latest/meta-data/",
    "http://[64:ff9b:1::7f00:1]:{port}/",  # local-use NAT64
    "http://[2002:7f00:1::]:{port}/",  # 6to4 of 127.0.0.1
    "http://[2002:c0a8:101::1]:{port}/",  # 6to4 of 192.168.1.1
    "http://[2002:a9fe:a9fe::]/latest/meta-data/",
    "http://[::127.0.0.1]:{port}/",  # IPv4-compatible
    "http://[::10.1.2.3]:{port}/",
    "http://[::169.254.169.254]/latest/meta-data/",
    "http://[::ffff:0:127.0.0.1]:{port}/",  # IPv4-translated (SIIT)
    "ftp://example.com/",
    "http://user:pass@example.com/",
]


@pytest.mark.parametrize("url", REFUSED)
async def test_internal_addresses_are_refused(server: TestServer, url: str) -> None:
    client = GuardedClient(timeout=2)
    try:
        with pytest.raises(ForbiddenAddress):
            async with client.request("GET", url.format(port=server.port)):
                pass
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("allow", "url"),
    [
        (["127.0.0.1/32"], "http://127.0.0.1:{port}/"),
        (["localhost"], "http://localhost:{port}/"),
        (["127.0.0.0/8"], "http://2130706433:{port}/"),
    ],
)
async def test_allow_listed_addresses_are_reached(server: TestServer, allow: list[str], url: str) -> None:
    client = GuardedClient(allow=allow, timeout=2)
    try:
        async with client.request("GET", url.format(port=server.port)) as response:
            assert (response.status, await response.text()) == (200, "reached")
    finally:
        await client.close()


async def test_a_redirect_to_an_internal_address_is_never_followed(server: TestServer) -> None:
    client = GuardedClient(allow=["127.0.0.1/32"], timeout=2)
    try:
        async with client.request("GET", f"http://127.0.0.1:{server.port}/redirect") as response:
            assert response.status == 302
            assert response.headers["Location"].startswith("http://169.254.169.254/")
    finally:
        await client.close()


#: (address, allow-list, permitted): an IPv6 address that carries an IPv4 one is judged by the IPv4 one.
EMBEDDED = [
    ("64:ff9b::8.8.8.8", [], True),  # NAT64 of a public address: what DNS64 gives on an IPv6-only host
    ("64:ff9b::127.0.0.1", [], False),
    ("64:ff9b::10.0.0.1", [], False),
    ("64:ff9b::172.16.0.1", [], False),
    ("64:ff9b::192.168.0.1", [], False),
    ("64:ff9b::169.254.169.254", [], False),
    ("64:ff9b::100.64.0.1", [], False),  # shared address space (carrier-grade NAT)
    ("64:ff9b::0.0.0.0", [], False),
    ("64:ff9b::224.0.0.1", [], False),  # multicast
    ("64:ff9b::127.0.0.1", ["127.0.0.0/8"], True),  # allow-listing the IPv4 network covers its spellings
    ("64:ff9b:1::8.8.8.8", [], False),  # local-use NAT64: never public
    ("64:ff9b:1:7f00:1::", [], False),
    ("2002:808:808::1", [], True),  # 6to4 of a public address
    ("2002:7f00:1::1", [], False),
    ("2002:a00:1::", [], False),
    ("2002:ac10:1::", [], False),
    ("2002:a9fe:a9fe::", [], False),
    ("2002:a00:1::", ["10.0.0.0/8"], True),
    ("::127.0.0.1", [], False),  # IPv4-compatible
    ("::10.0.0.1", [], False),
    ("::8.8.8.8", [], True),
    ("::ffff:127.0.0.1", [], False),  # IPv4-mapped
    ("::ffff:169.254.169.254", [], False),
    ("::ffff:8.8.8.8", [], True),
    ("::ffff:0:127.0.0.1", [], False),  # IPv4-translated
    ("::ffff:0:192.168.0.1", [], False),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", [], False),  # Teredo: never public, whatever it embeds
    ("2001:0:808:808::7f00:1", [], False),
    ("2606:4700::1111", [], True),  # plain public IPv6
]


def test_embedded_ipv4_addresses_are_judged_by_the_ipv4_address() -> None:
    wrong = [
        (address, allow, expected)
        for address, allow, expected in EMBEDDED
        if Allowance(allow).permits("host.example", ipaddress.ip_address(address)) != expected
    ]
    assert wrong == []


# (host, allow, whether the config names that host itself)
LISTED = [
    ("127.0.0.1", ["127.0.0.1/32"], True),
    ("[::1]", ["::1/128"], True),
    ("Push.Internal", ["push.internal"], True),
    ("localhost", ["127.0.0.1/32"], False),  # a name: where it leads is known only when it is resolved
    ("8.8.8.8", [], False),  # public, so reached, but named by nobody
    ("10.0.0.1", ["::/0"], False),
]


def test_a_host_is_listed_by_its_name_or_a_network_holding_its_address() -> None:
    assert [(host, allow) for host, allow, listed in LISTED if Allowance(allow).lists(host) != listed] == []


def test_every_outbound_http_session_is_the_guarded_one() -> None:
    """A plugin that opened its own aiohttp session would skip the address checks and the no-redirect rule."""
    root = Path(__file__).resolve().parent.parent
    opened = [
        f"{path.relative_to(root)}:{number}"
        for folder in ("gateway", "plugins")
        for path in sorted((root / folder).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"\bClientSession\(", line)
    ]
    assert [where.split(":")[0] for where in opened] == ["gateway/kit/net.py"], opened
