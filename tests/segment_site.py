"""A deployment whose `track` source is fed by Segment's own clients, and one rule per kind of call.

Each rule mails the contact, so a test sees every call arrive as the documented event at a real
SMTP server: the subject names the event type and the message id.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from conftest import Deployment
from declic_gateway.http.app import create_app, load
from declic_gateway.http.running import GATEWAY_KEY
from declic_gateway.testing import FakeClock, SmtpCatcher, write_deployment

WRITE_KEY = "site-write-key"
SECRET_KEY = "site-secret-key-for-servers"
CAMILLE = "camille.durand@example.org"
#: The documented event of each kind of call, as docs/connect/track.md lists them.
EVENT_OF_CALL = {
    "identify": "profile.updated",
    "track": "track.signed_up",
    "page": "page.viewed",
    "screen": "screen.viewed",
    "group": "group.joined",
    "alias": "contact.aliased",
}
CONFIG = """\
public_url: https://hooks.example.com
timezone: Europe/Paris
storage: {{url: '{db_url}'}}
sources:
  site:
    plugin: track
    write_key: {write_key}
    secret_key: {secret_key}
{origins}sinks:
  email: {{plugin: smtp, host: 127.0.0.1, port: {smtp_port}, tls: none, sender: "Boutique <shop@example.com>"}}
policies: {{consent: {{email: required}}}}
rules:
{rules}"""
RULE = "  - {{name: on-{name}, when: {event}, send: {{via: email, template: note}}}}\n"
TEMPLATES = {
    "note.subject.j2": "{{ event.type }} {{ event.properties.message_id }}",
    "note.txt.j2": "Hello {{ contact.first_name }}: {{ event.properties | tojson }}",
}


async def start_site(
    aiohttp_client: Any, tmp_path: Path, db_url: str, smtp: SmtpCatcher, allowed_origins: list[str] | None = None
) -> Deployment:
    """The real app over real HTTP (role web: the test runs the worker with `advance`)."""
    events = {**EVENT_OF_CALL, "item": "track.item_viewed"}
    text = CONFIG.format(
        db_url=db_url,
        write_key=WRITE_KEY,
        secret_key=SECRET_KEY,
        smtp_port=smtp.port,
        origins="" if allowed_origins is None else f"    allowed_origins: {allowed_origins}\n",
        rules="".join(RULE.format(name=name, event=event) for name, event in events.items()),
    )
    settings, pm, _ = load(str(write_deployment(tmp_path, text, TEMPLATES)))
    clock = FakeClock(datetime(2026, 3, 14, 8, 0, tzinfo=UTC))
    app = create_app(settings, pm=pm, clock=clock, role="web")
    return Deployment(await aiohttp_client(app), app[GATEWAY_KEY], clock, tmp_path)


def mailed(smtp: SmtpCatcher) -> list[tuple[str, str, str]]:
    """(recipient, event type, message id) of each e-mail received."""
    envelopes = zip(smtp.messages, smtp.envelopes, strict=True)
    return [(rcpts[0], *str(message["Subject"]).split(" ", 1)) for message, (_, rcpts) in envelopes]
