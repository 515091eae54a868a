"""Plugins' outbound calls never follow a redirect, against real local servers."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from test_eventbrite import envelope
from test_eventbrite import make_source as eventbrite_source
from test_eventbrite import raw as eventbrite_raw
from test_fcm import MESSAGE as PUSH
from test_fcm import context, key_file
from test_hubspot import NOW, ONE_CONTACT, raw, source
from test_hubspot_note import CTX as NOTE_CTX
from test_hubspot_note import MESSAGE as NOTE
from test_mailchimp_reports import source as mailchimp_reports_source
from test_twilio import ACCOUNT, TOKEN
from test_twilio import CTX as SMS_CTX
from test_twilio import message as sms

from declic_gateway import Deployment, MalformedPayload, RetryLater
from declic_gateway.testing import FakeClock
from plugins.fcm import FcmConfig, FcmSink
from plugins.hubspot_note import HubSpotNote, HubSpotNoteConfig
from plugins.twilio import TwilioConfig, TwilioSink

#: What the redirect target answers: enough for any of the plugins to go on, had it followed.
ANYTHING = {"id": "201", "properties": {}, "total": 0, "results": [], "access_token": "t", "expires_in": 3600}


class Servers:
    """`api` answers every call with 302 to `elsewhere`, which records what reaches it."""

    def __init__(self) -> None:
        self.api_paths: list[str] = []
        self.elsewhere_paths: list[str] = []
        self.api: TestServer | None = None
        self.elsewhere: TestServer | None = None

    async def start(self) -> None:
        async def landed(request: web.Request) -> web.Response:
            self.elsewhere_paths.append(request.path)
            return web.json_response(ANYTHING)

        async def bounce(request: web.Request) -> web.Response:
            self.api_paths.append(request.path)
            assert self.elsewhere is not None
            raise web.HTTPFound(str(self.elsewhere.make_url("/landed")))

        self.elsewhere = await _serve(landed)
        self.api = await _serve(bounce)

    @property
    def api_url(self) -> str:
        assert self.api is not None
        return str(self.api.make_url("")).rstrip("/")

    async def close(self) -> None:
        for server in (self.api, self.elsewhere):
            if server is not None:
                await server.close()


async def _serve(handler: Callable[[web.Request], Awaitable[web.Response]]) -> TestServer:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


@pytest.fixture
async def servers() -> AsyncIterator[Servers]:
    pair = Servers()
    await pair.start()
    yield pair
    await pair.close()


async def hubspot_source(api: str, tmp_path: Path) -> None:
    src = source(api_base=api)
    await src.start()
    try:
        with pytest.raises(RetryLater, match="redirect, not followed"):
            await src.normalize(raw(ONE_CONTACT))
    finally:
        await src.close()


async def hubspot_note(api: str, tmp_path: Path) -> None:
    config = HubSpotNoteConfig.model_validate({"app_token": "pat-eu1-test-token", "api_base": api, "timeout": 2})
    sink = HubSpotNote("crm", config, Deployment(None, "UTC", FakeClock(NOW)))
    await sink.start()
    try:
        result = await sink.send(NOTE, NOTE_CTX)
    finally:
        await sink.close()
    assert "302" in (result.error or "")


async def fcm(api: str, tmp_path: Path) -> None:
    config = FcmConfig.model_validate(
        {"service_account_file": key_file(tmp_path, f"{api}/token"), "api_base": api, "timeout": 2}
    )
    sink = FcmSink("push", config, Deployment(None, "UTC", FakeClock(NOW)))
    await sink.start()
    try:
        result = await sink.send(PUSH, context("device-1"))
    finally:
        await sink.close()
    assert "302" in json.dumps(result.error or "")


async def eventbrite(api: str, tmp_path: Path) -> None:
    src = eventbrite_source(api)
    try:
        with pytest.raises(MalformedPayload, match="answered 302"):  # failed, replayable: not a transient fault
            await src.normalize(eventbrite_raw(envelope("order.placed")))
    finally:
        await src.close()


async def mailchimp_reports(api: str, tmp_path: Path) -> None:
    src = mailchimp_reports_source(api)
    try:
        with pytest.raises(RetryLater, match="302"):
            await src.poll(None, NOW)
    finally:
        await src.close()


async def twilio(api: str, tmp_path: Path) -> None:
    options = {"account_sid": ACCOUNT, "auth_token": TOKEN, "sender": "+33700000000", "api_base": api, "timeout": 2}
    sink = TwilioSink("sms", TwilioConfig.model_validate(options), Deployment(None, "UTC", FakeClock(NOW)))
    try:
        result = await sink.send(sms(), SMS_CTX)
    finally:
        await sink.close()
    assert "302" in (result.error or "")


CALLERS: list[Callable[[str, Path], Awaitable[Any]]] = [
    hubspot_source,
    hubspot_note,
    fcm,
    eventbrite,
    mailchimp_reports,
    twilio,
]


@pytest.mark.parametrize("call", CALLERS, ids=[c.__name__ for c in CALLERS])
async def test_a_redirect_from_a_provider_is_not_followed(
    servers: Servers, tmp_path: Path, call: Callable[[str, Path], Awaitable[Any]]
) -> None:
    await call(servers.api_url, tmp_path)
    assert servers.api_paths and servers.elsewhere_paths == []
