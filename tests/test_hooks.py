"""Every hook, exercised through a plugin the way a community plugin would use it."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import click
import jinja2
import pluggy
import pytest
from aiohttp import web
from click.testing import CliRunner

from declic_gateway import (
    ContactRef,
    DeliveryResult,
    Event,
    Message,
    PluginConfig,
    RawCall,
    SendContext,
    SignatureError,
    Sink,
    Source,
    hookimpl,
)
from declic_gateway import hookspecs as specs
from declic_gateway.cli.main import cli
from declic_gateway.cli.simulate import load_timeline, simulate
from declic_gateway.config import load_config
from declic_gateway.http.app import create_app
from declic_gateway.http.running import GATEWAY_KEY, RunningGateway
from declic_gateway.plugins import DISTRIBUTION, collect, describe, get_plugin_manager
from declic_gateway.testing import FakeClock, write_deployment

ROOT = Path(__file__).resolve().parents[1]


class EchoConfig(PluginConfig):
    token: str


class Echo(Source):
    """A minimal source: a shared token in a header, JSON body {"email", "name"} -> track.echo."""

    name = "echo"
    Config = EchoConfig

    async def verify(self, request: web.Request, body: bytes) -> None:
        if request.headers.get("X-Token") != self.config.token:
            raise SignatureError("bad token")

    def normalize(self, raw: RawCall) -> list[Event]:
        data = json.loads(raw.body)
        return [
            Event(
                type="track.echo",
                occurred_at=raw.received_at,
                contact=ContactRef(email=data["email"]),
                properties={"name": data["name"]},
            )
        ]


class Recorder(Sink):
    name = "recorder"
    channel = "email"
    sent: ClassVar[list[tuple[Message, SendContext]]] = []

    def address(self, contact: dict[str, Any]) -> str | None:
        return contact.get("email")

    async def send(self, message: Message, ctx: SendContext) -> DeliveryResult:
        self.sent.append((message, ctx))
        return DeliveryResult.sent(f"rec-{len(self.sent)}")


class EveryHook:
    """Implements each hook once and records what it saw."""

    def __init__(self) -> None:
        self.started: list[RunningGateway] = []
        self.events: list[Event] = []

    @hookimpl
    def register_sources(self, register: Callable[[type[Source]], None]) -> None:
        register(Echo)

    @hookimpl
    def register_sinks(self, register: Callable[[type[Sink]], None]) -> None:
        register(Recorder)

    @hookimpl
    def startup(self, gateway: RunningGateway) -> Any:
        async def later() -> None:
            await asyncio.sleep(0)
            self.started.append(gateway)

        return later()

    @hookimpl
    def register_routes(self, gateway: RunningGateway) -> list[tuple[str, str, Callable[..., Any]]]:
        async def hello(request: web.Request) -> web.Response:
            return web.json_response({"rules": sorted(request.app[GATEWAY_KEY].router.rules)})

        return [("GET", "/hello", hello)]

    @hookimpl
    def prepare_jinja2_environment(self, env: jinja2.Environment) -> None:
        env.filters["shout"] = lambda text: f"{text}!".upper()

    @hookimpl
    def register_commands(self, cli: click.Group) -> None:
        @cli.command(name="echo-hello")
        def echo_hello() -> None:
            click.echo("hello from a plugin")

    @hookimpl
    def event_received(self, event: Event) -> None:
        self.events.append(event)


CONFIG = """\
sources:
  site:
    plugin: echo
    token: t0ken
sinks:
  rec:
    plugin: recorder
rules:
  - name: greet
    when: track.echo
    kind: transactional
    send: {via: rec, template: greet}
"""


@pytest.fixture
def plugin() -> EveryHook:
    Recorder.sent = []
    return EveryHook()


@pytest.fixture
def pm(plugin: EveryHook) -> pluggy.PluginManager:
    return get_plugin_manager(extra=[plugin])


async def test_sources_sinks_startup_routes_jinja_and_events(
    aiohttp_client: Any, tmp_path: Path, plugin: EveryHook, pm: pluggy.PluginManager
) -> None:
    path = write_deployment(tmp_path, CONFIG, {"greet.txt.j2": "{{ event.properties.name | shout }}"})
    settings = load_config(path, collect(pm), pm)
    app = create_app(settings, pm=pm, clock=FakeClock(datetime(2026, 1, 1, tzinfo=UTC)), role="web")
    client = await aiohttp_client(app)
    gateway = app[GATEWAY_KEY]
    assert plugin.started == [gateway]  # startup (awaitable)
    assert await (await client.get("/hello")).json() == {"rules": ["greet"]}  # register_routes
    refused = await client.post("/hooks/site", data=b"{}", headers={"X-Token": "nope"})
    assert refused.status == 401  # register_sources: verify
    body = json.dumps({"email": "ada@example.com", "name": "ada"}).encode()
    assert (await client.post("/hooks/site", data=body, headers={"X-Token": "t0ken"})).status == 200
    await gateway.worker.drain()
    assert [e.type for e in plugin.events] == ["track.echo"]  # event_received
    [(message, ctx)] = Recorder.sent  # register_sinks
    assert (message.to, message.text, ctx.rule) == ("ada@example.com", "ADA!", "greet")  # jinja filter


async def test_a_simulation_is_not_shown_to_event_observers(
    tmp_path: Path, plugin: EveryHook, pm: pluggy.PluginManager
) -> None:
    """`declic simulate` (and backtest) make up or replay events: a plugin forwarding events must not see them."""
    path = write_deployment(tmp_path, CONFIG, {"greet.txt.j2": "{{ event.properties.name }}"})
    settings = load_config(path, collect(pm), pm)
    timeline = tmp_path / "timeline.yaml"
    timeline.write_text('- {at: "2026-01-01T10:00:00Z", type: track.echo, contact: {email: ada@example.com}}\n')
    seen, _ = await simulate(settings, pm, load_timeline(timeline, settings.timezone))
    assert [d["action"] for d in seen if d["action"] == "send"] == ["send"]  # it did run
    assert plugin.events == []


def test_register_commands_adds_a_subcommand(pm: pluggy.PluginManager) -> None:
    pm.hook.register_commands(cli=cli)
    try:
        result = CliRunner().invoke(cli, ["echo-hello"])
        assert result.output == "hello from a plugin\n"
    finally:
        cli.commands.pop("echo-hello", None)


def test_a_failing_observer_never_stops_the_flow(pm: pluggy.PluginManager) -> None:
    from declic_gateway.plugins import notify_event_received

    class Broken:
        @hookimpl
        def event_received(self, event: Event) -> None:
            raise RuntimeError("observer bug")

    pm.register(Broken())
    notify_event_received(pm, Event(type="track.x", occurred_at=datetime.now(UTC), contact=ContactRef()))


def test_a_misspelt_hook_is_refused_at_start() -> None:
    class Typo:
        @hookimpl
        def register_sourcse(self, register: Any) -> None: ...

    with pytest.raises(pluggy.PluginValidationError, match="register_sourcse"):
        get_plugin_manager(load_entry_points=False, extra=[Typo()])


def test_two_plugins_registering_one_name_is_an_error(pm: pluggy.PluginManager) -> None:
    class Again:
        @hookimpl
        def register_sources(self, register: Callable[[type[Source]], None]) -> None:
            register(Echo)

    pm.register(Again(), name="again")
    with pytest.raises(ValueError, match="source 'echo' registered by again and by"):
        collect(pm)


def test_blocked_plugins_do_not_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DECLIC_BLOCK_PLUGINS", "smtp")
    registry = collect(get_plugin_manager())
    assert "shopify" in registry.sources and "smtp" not in registry.sinks


def test_builtin_plugins_load_through_entry_points_with_versions() -> None:
    infos = {info.name: info for info in describe(get_plugin_manager())}
    assert infos["shopify"].distribution == DISTRIBUTION and infos["shopify"].version
    assert infos["shopify"].hooks == ["register_sources"]
    assert infos["smtp"].hooks == ["register_sinks"]
    output = CliRunner().invoke(cli, ["plugins"]).output
    assert re.search(rf"^shopify \d+\.\d+\.\d+\S*  \[{re.escape(DISTRIBUTION)}\]$", output, re.M), output
    assert "  provides: source:shopify" in output


HOOKS = sorted(name for name in dir(specs) if hasattr(getattr(specs, name), "declic_spec"))


def test_hookspecs_are_found() -> None:
    assert len(HOOKS) == 7


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_tested_and_documented(hook: str) -> None:
    assert f"def {hook}(" in Path(__file__).read_text(), f"{hook} has no implementation in this test module"
    docs = (ROOT / "docs" / "plugins.md").read_text()
    assert f"`{hook}(" in docs, f"{hook} is not documented in docs/plugins.md"
    assert getattr(specs, hook).__doc__.strip().count("\n") == 0, "one-line docstring"
