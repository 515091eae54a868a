"""`declic contacts`: find a contact, see why they got (or did not get) a message, export or
erase their record."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import click
from sqlalchemy.engine import Connection

from ..insight import records
from ..pipeline import contacts as contact_store
from ..store import Database
from .common import CONFIG_OPTION, load


def _options(command: Callable[..., Any]) -> Callable[..., Any]:
    return CONFIG_OPTION(click.argument("who")(command))


@click.group()
def contacts() -> None:
    """A contact's timeline, export and erasure. WHO is an e-mail, a phone number,
    SOURCE_KIND:ID (e.g. shopify:207119551) or #ID (Declic's own id)."""


@contacts.command()
@_options
def timeline(config_path: str, who: str) -> None:
    """Every event about the contact and every decision about them, one JSON object per line."""
    _each(config_path, who, lambda conn, contact_id: _lines(records.timeline(conn, contact_id)))


@contacts.command()
@_options
def export(config_path: str, who: str) -> None:
    """The contact's whole record as one JSON document (fields, identities, consent ledger with its
    evidence, events, journeys, messages, decisions, conversions)."""
    _each(config_path, who, lambda conn, contact_id: _json(records.export(conn, contact_id), indent=2))


@contacts.command()
@_options
@click.option("--yes", is_flag=True, help="Erase without asking.")
def erase(config_path: str, who: str, yes: bool) -> None:
    """Forget the contact for good: personal fields, identities, stored bodies, journeys. A later
    call about the same person starts a new contact, with no history and no consent."""
    if not yes:
        click.confirm(f"Erase {who} for good?", abort=True)

    def forget(conn: Connection, contact_id: int) -> str:
        contact_store.erase(conn, contact_id, datetime.now(UTC))
        return f"erased contact #{contact_id}"

    _each(config_path, who, forget)


def _each(config_path: str, who: str, work: Callable[[Connection, int], str]) -> None:
    """Run `work` for each contact WHO names, in one transaction each; exit 1 when none."""
    settings, _, _ = load(config_path)
    database = Database(settings.database_url)
    try:
        found = database.transaction(records.find, who, settings.phone_region)
        if not found:
            click.echo(f"no contact is known as {who}", err=True)
            raise SystemExit(1)
        for contact_id in found:
            click.echo(database.transaction(work, contact_id))
    finally:
        database.close()


def _lines(entries: list[dict[str, Any]]) -> str:
    return "\n".join(_json(entry) for entry in entries)


def _json(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, default=_plain, ensure_ascii=False, indent=indent)


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    return str(value)  # Decimal money, exactly as stored
