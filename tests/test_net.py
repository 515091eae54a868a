"""The SSRF guard on outbound calls to user-given URLs, against real local servers."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.kit.net import ForbiddenAddress, GuardedClient


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
