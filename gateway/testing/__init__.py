"""Helpers for tests of Declic and of plugins: configs on disk, signed calls, a real SMTP catcher."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import socket
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email import message_from_bytes, message_from_string, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from .. import hookimpl
from ..kit.clock import FakeClock
from ..kit.events import Event
from ..kit.sources import PluginConfig, RawCall, Source

__all__ = [
    "FakeClock",
    "ScriptedPlugin",
    "ScriptedSource",
    "SmtpCatcher",
    "free_port",
    "parse_message",
    "shopify_headers",
    "write_deployment",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_deployment(folder: Path, config: str, templates: dict[str, str] | None = None) -> Path:
    """Write `declic.yaml` and its templates into folder; return the config path."""
    (folder / "templates").mkdir(parents=True, exist_ok=True)
    for name, text in (templates or {}).items():
        (folder / "templates" / name).write_text(text, encoding="utf-8")
    path = folder / "declic.yaml"
    path.write_text(textwrap.dedent(config), encoding="utf-8")
    return path


def shopify_headers(
    body: bytes, secret: str, topic: str, webhook_id: str, shop: str = "demo.myshopify.com"
) -> dict[str, str]:
    digest = base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()
    return {
        "Content-Type": "application/json",
        "X-Shopify-Topic": topic,
        "X-Shopify-Hmac-Sha256": digest,
        "X-Shopify-Shop-Domain": shop,
        "X-Shopify-API-Version": "2026-07",
        "X-Shopify-Webhook-Id": webhook_id,
    }


@dataclass
class SmtpCatcher:
    """A real SMTP server (aiosmtpd) on 127.0.0.1 that keeps what it receives.

    `replies` queues SMTP replies to give instead of accepting, e.g. ["451 try later"];
    `refuse` maps recipients to the reply given at RCPT TO; `smtputf8` makes EHLO offer SMTPUTF8
    (RFC 6531), off by default as in aiosmtpd. `raw` keeps each message's bytes as received, `arrived`
    the `time.monotonic()` at which each was kept.

    `reply_delay` holds the final 250 back for that many seconds after a message is kept, as a slow
    server does: a sender that dies in that window has handed the message over without hearing so
    (RFC 1047's duplicate window). Such messages stay in `messages` and are also listed in `unanswered`.
    """

    port: int = field(default_factory=free_port)
    messages: list[EmailMessage] = field(default_factory=list)
    envelopes: list[tuple[str, list[str]]] = field(default_factory=list)
    replies: list[str] = field(default_factory=list)
    refuse: dict[str, str] = field(default_factory=dict)
    tls_context: Any = None
    smtputf8: bool = False
    raw: list[bytes] = field(default_factory=list)
    arrived: list[float] = field(default_factory=list)
    reply_delay: float = 0.0
    unanswered: list[EmailMessage] = field(default_factory=list)
    _controller: Any = None

    def start(self) -> SmtpCatcher:
        from aiosmtpd.controller import Controller

        kwargs: dict[str, Any] = {"enable_SMTPUTF8": self.smtputf8}
        if self.tls_context is not None:
            kwargs.update(tls_context=self.tls_context, require_starttls=True)
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port, **kwargs)
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: Any) -> str:
        if address in self.refuse:
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.replies:
            return self.replies.pop(0)
        self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
        self.raw.append(envelope.content)
        message = parse_message(envelope.content, envelope.smtp_utf8)
        self.arrived.append(time.monotonic())
        self.messages.append(message)
        if self.reply_delay:
            try:
                await asyncio.sleep(self.reply_delay)
            except asyncio.CancelledError:  # aiosmtpd cancels the handler when the sender's connection drops
                self.unanswered.append(message)
                raise
        return "250 Message accepted for delivery"

    def to(self, address: str) -> list[EmailMessage]:
        return [m for m in self.messages if m["To"] == address]


def parse_message(data: bytes, smtputf8: bool = False) -> EmailMessage:
    """What a receiving client reads: under SMTPUTF8 the headers are UTF-8 text (RFC 6532), else ASCII."""
    if smtputf8:
        return message_from_string(data.decode("utf-8"), policy=policy.default)
    return message_from_bytes(data, policy=policy.default)


class ScriptedConfig(PluginConfig):
    url_token: SecretStr


class ScriptedSource(Source):
    """Test-only source: the body is a JSON list of events to emit, as `Event` fields.

    Never installed by an entry point: a test opts in with
    `get_plugin_manager(extra=[ScriptedPlugin()])` and `sources: {in: {plugin: scripted, url_token: tok}}`.
    """

    name = "scripted"
    Config = ScriptedConfig
    needs_url_token = True

    def normalize(self, raw: RawCall) -> list[Event]:
        return [Event(occurred_at=raw.received_at, **item) for item in json.loads(raw.body)]


class ScriptedPlugin:
    @hookimpl
    def register_sources(self, register: Callable[[type[Source]], None]) -> None:
        register(ScriptedSource)
