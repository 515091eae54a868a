"""Contacts: resolve who an event is about, then update what we know of them."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection

from ..errors import MalformedPayload
from ..insight import rendered
from ..kit.events import ConsentStatement, ContactRef, Event
from ..kit.sources import RawCall
from ..store import (
    CONSENTS,
    CONTACTS,
    DECISIONS,
    DELIVERIES,
    ENROLMENTS,
    EVENTS,
    IDENTITIES,
    INBOX,
    PUSH_SUBSCRIPTIONS,
    appends,
    ids,
    jobqueue,
    jsoncodec,
    sql,
)
from . import feedback
from .consent import PENDING_REASON, Ruling, awaiting_confirmation, dated, rule_on, utc
from .history import ContactView, Wheres

C = CONTACTS.c
I = IDENTITIES.c  # noqa: E741
#: Declic's own id for a contact, as unsubscribe links and the admin name them.
_OWN = "declic"


class UnknownContact(MalformedPayload):
    """A call names a contact by Declic's own id, and no such contact exists."""


def still_named(conn: Connection, contact_id: int) -> bool:
    """Whether Declic's own id still names someone (an erasure deletes it): a link or a tracked fetch of an erased
    contact would store a call that fails as `UnknownContact`, keeping the request's address and browser."""
    return conn.execute(_DECLIC_ID, {"value": str(contact_id)}).first() is not None


_DECLIC_ID = sa.select(I.contact_id).where(I.kind == _OWN, I.value == sa.bindparam("value"))


_FIELDS = ("email", "phone", "first_name", "last_name", "locale", "timezone")


def identities(ref: ContactRef) -> list[tuple[str, str]]:
    """The ways to recognise this contact, strongest first: the source's own ids, then channels."""
    keys = [(kind, str(value)) for kind, value in sorted(ref.external_ids.items())]
    keys += [(kind, value) for kind, value in sorted(ref.previous_ids.items()) if (kind, value) not in keys]
    if ref.previous_email:
        keys.append(("email", ref.previous_email.strip().lower()))
    return keys + addresses(ref)


def addresses(ref: ContactRef) -> list[tuple[str, str]]:
    """The addresses messages go to, as identities: the e-mail address and the phone number."""
    keys = []
    if ref.email:
        keys.append(("email", ref.email.strip().lower()))
    if ref.phone:
        keys.append(("phone", ref.phone.strip()))
    return keys


def upsert(
    conn: Connection,
    ref: ContactRef,
    source: str,
    now: datetime,
    event: Event | None = None,
    raw: RawCall | None = None,
    double_opt_in: frozenset[str] = frozenset(),
) -> tuple[dict[str, Any], frozenset[str]]:
    """Find or create the contact, record new identities, merge attributes and consent.

    Returns the contact and what changed: field names, and `attributes.NAME` for attributes,
    so that date triggers are recomputed only when a date or a time zone really moved, and
    `confirm:CHANNEL` when a grant now waits for its double opt-in confirmation.
    """
    keys = identities(ref)
    known = _known(conn, keys)
    contact_id = next((known[k] for k in keys if k in known), None)
    if contact_id is None:
        if _OWN in ref.external_ids:  # Declic's own ids name existing contacts; nobody can reserve one
            raise UnknownContact(f"no contact has Declic id {ref.external_ids[_OWN]!r}")
        return _create(conn, ref, keys, source, now, event, raw, double_opt_in)
    existing = True
    if not ref.trusted:
        ref, existing = _as_stranger(conn, ref, known, contact_id)
        keys = [k for k in keys if k[0] not in ("email", "phone")] + addresses(ref)
    for key in ref.previous_ids.items():
        holder = known.get(key)
        if holder is not None and holder != contact_id and _fold_anonymous(conn, holder, contact_id, ref):
            known[key] = contact_id
    # An identity already held by another contact stays theirs: merging people is a human call.
    _claim(conn, [k for k in keys if k not in known and k[0] != _OWN], contact_id)
    ref, for_holders = _leave_to_holders(ref, known, contact_id)
    for holder, consent in for_holders.items():
        _update(conn, holder, ContactRef(consent=consent), source, now, event, raw, double_opt_in)
    return _update(conn, contact_id, ref, source, now, event, raw, double_opt_in, existing)


def _as_stranger(
    conn: Connection, ref: ContactRef, known: dict[tuple[str, str], int], contact_id: int
) -> tuple[ContactRef, bool]:
    """What a call signed with a public key may do to the contact it names: add to it, never move its
    addresses or devices. A visitor whom page views made a contact before it gave any address may be
    completed as a new contact may be created (an address nobody holds, consent with evidence): that
    gives the key no power over anyone Declic already writes to. Returns the call as it may apply,
    and whether the contact counts as existing."""
    row = conn.execute(_ADDRESSES, {"contact_id": contact_id}).one()
    given = addresses(ref)
    completes = row.email is None and row.phone is None and row.email_status != "erased"
    completes = completes and not any(key in known for key in given)  # nor someone else's address
    update: dict[str, Any] = {"email": None, "phone": None, "previous_email": None, "push_subscriptions": []}
    if completes:
        update.update({kind: getattr(ref, kind) for kind, _ in given})
    return ref.model_copy(update=update), not completes


#: The kind of identity that is each channel's address: consent on the channel is the address holder's.
ADDRESS_KINDS = {"email": "email", "sms": "phone"}


def _leave_to_holders(
    ref: ContactRef, known: dict[tuple[str, str], int], contact_id: int
) -> tuple[ContactRef, dict[int, dict[str, ConsentStatement]]]:
    """An address that another contact holds does not become this contact's, and what the event states
    about consent on its channel goes to the holder: a STOP from a number, an unsubscribe of an address,
    binds whoever Declic sends to at that address. Returns the event's rest and the holders' statements."""
    held = {
        kind: known[kind, value] for kind, value in addresses(ref) if known.get((kind, value), contact_id) != contact_id
    }
    if not held:
        return ref, {}
    for_holders: dict[int, dict[str, ConsentStatement]] = {}
    kept = {}
    for channel, statement in ref.consent.items():
        holder = held.get(ADDRESS_KINDS.get(channel, ""))
        if holder is None:
            kept[channel] = statement
        else:
            for_holders.setdefault(holder, {})[channel] = statement
    fields = dict.fromkeys(held)  # the identity kinds "email" and "phone" are also the fields' names
    return ref.model_copy(update={"consent": kept, **fields}), for_holders


_QUEUE_CONTACT = sa.insert(CONTACTS).inline()  # appended, with the id given (store/appends.py, store/ids.py)
_QUEUE_IDENTITY = sa.insert(IDENTITIES).inline()
_ADDRESSES = sa.select(C.email, C.phone, C.email_status).where(C.id == sa.bindparam("contact_id"))
_WRITABLE = (*_FIELDS, "phone_status", "attributes", "consent", "updated_at")
_UPDATE_CONTACT = (
    sa.update(CONTACTS).where(C.id == sa.bindparam("contact_id")).values({f: sa.bindparam(f) for f in _WRITABLE})
)


def _create(
    conn: Connection,
    ref: ContactRef,
    keys: list[tuple[str, str]],
    source: str,
    now: datetime,
    event: Event | None,
    raw: RawCall | None,
    double_opt_in: frozenset[str],
) -> tuple[dict[str, Any], frozenset[str]]:
    """A new contact, written in one INSERT from what the event says: nothing to read back."""
    row: dict[str, Any] = {
        **dict.fromkeys(_FIELDS),
        "attributes": "{}",
        "consent": "{}",
        "email_status": "ok",
        "phone_status": "ok",
        "score": 0.0,
        "score_at": None,
        "created_at": now,
        "updated_at": now,
    }
    changes, moved, rulings = _merge(row, ref, source, now, event, False, double_opt_in, raw)
    row.update(changes)
    contact_id = row["id"] = _insert(conn, row, keys)
    _write_links(conn, contact_id, ref, rulings, now, event, raw)
    created: dict[int, set[tuple[str, str]]] | None = conn.info.get(_NEW)
    if created is not None:
        created[contact_id] = set()
    devices = {
        (d.kind, d.address): {"kind": d.kind, "address": d.address, "keys": d.keys} for d in ref.push_subscriptions
    }
    contact = {
        **_fields_of(row),
        "external_ids": {
            kind: value for kind, value in sorted([(_OWN, str(contact_id)), *keys]) if kind not in ("email", "phone")
        },
        "push_subscriptions": list(devices.values()),
    }
    return contact, moved


def _update(
    conn: Connection,
    contact_id: int,
    ref: ContactRef,
    source: str,
    now: datetime,
    event: Event | None,
    raw: RawCall | None,
    double_opt_in: frozenset[str],
    existing: bool = True,
) -> tuple[dict[str, Any], frozenset[str]]:
    found = conn.execute(_contact_with_links(conn.dialect.name), {"contact_id": contact_id}).one()._mapping
    row = {column.name: found[column.name] for column in CONTACTS.c}
    if row["email_status"] == "erased":
        return links_of(row, found), frozenset()  # an erasure is final: later events bring nobody back
    changes, moved, rulings = _merge(row, ref, source, now, event, existing, double_opt_in, raw)
    if changes:
        row.update(changes, updated_at=now)
        conn.execute(_UPDATE_CONTACT, {"contact_id": contact_id, **{f: row[f] for f in _WRITABLE}})
    _write_links(conn, contact_id, ref, rulings, now, event, raw)
    return (load(conn, contact_id) if ref.push_subscriptions else links_of(row, found)), moved


def _merge(
    row: dict[str, Any],
    ref: ContactRef,
    source: str,
    now: datetime,
    event: Event | None,
    existing: bool,
    double_opt_in: frozenset[str],
    raw: RawCall | None,
) -> tuple[dict[str, Any], frozenset[str], list[Ruling]]:
    """What the event changes in the stored row: the new column values, what moved (fields, and
    `attributes.NAME`), and a ruling on each consent statement for the ledger."""
    arrived = raw.received_at if raw else now  # when the statements reached Declic
    changes: dict[str, Any] = _given_fields(ref)
    if ref.phone and ref.phone != row["phone"]:
        changes["phone_status"] = "ok"  # a new number gets a fresh start
    moved = {f for f in _FIELDS if f in changes and changes[f] != row[f]}
    if ref.attributes:
        before = jsoncodec.loads(row["attributes"])
        moved |= {f"attributes.{k}" for k, v in ref.attributes.items() if before.get(k) != v}
        changes["attributes"] = jsoncodec.dumps({**before, **ref.attributes})
    consent = jsoncodec.loads(row["consent"])
    rulings = _new_addresses(row, changes, consent, source, arrived, double_opt_in)
    moved |= {f"confirm:{ruling.channel}" for ruling in rulings}
    if ref.consent:
        for channel, statement in ref.consent.items():
            statement = dated(statement, event, arrived)
            veto = None if ref.trusted else _untrusted_veto(statement, existing)
            if veto is not None:
                ruling = Ruling(channel, statement, source, False, veto)
            else:
                ruling = rule_on(consent.get(channel), channel, statement, source, received=arrived)
            in_force = consent.get(channel, {}).get("state")
            if in_force != "granted":  # a confirmed subscriber restating a grant is not asked again
                ruling = awaiting_confirmation(ruling, double_opt_in)
            rulings.append(ruling)
            if ruling.applied:
                if ruling.becomes == "pending" and in_force != "pending":  # one confirmation message per request
                    moved.add(f"confirm:{channel}")
                consent[channel] = ruling.entry
    if any(r.applied for r in rulings):
        changes["consent"] = jsoncodec.dumps(consent)
    return changes, frozenset(moved), rulings


def _new_addresses(
    row: dict[str, Any],
    changes: dict[str, Any],
    consent: dict[str, Any],
    source: str,
    arrived: datetime,
    double_opt_in: frozenset[str],
) -> list[Ruling]:
    """Under double opt-in a grant counts once the address proved it reads its mail: when a contact's address
    changes, the new one has proved nothing, so a grant (or one awaiting confirmation) waits again for the new
    address to confirm (`consent` is changed in place). Elsewhere consent is the person's and follows them."""
    rulings = []
    for channel, field in ADDRESS_KINDS.items():
        old, new = row[field], changes.get(field)
        if channel not in double_opt_in or old is None or new is None or new == old:
            continue
        if consent.get(channel, {}).get("state") not in ("granted", "pending"):
            continue  # nothing to confirm; a withdrawal stays, whatever the address
        statement = ConsentStatement(state="granted", stated_at=utc(arrived), evidence={"changed": field})
        reason = f"the {field} changed: {PENDING_REASON} at the new one"
        ruling = Ruling(channel, statement, source, True, reason, becomes="pending")
        consent[channel] = ruling.entry
        rulings.append(ruling)
    return rulings


def _untrusted_veto(statement: ConsentStatement, existing: bool) -> str | None:
    """Why a call signed with a public key cannot make this statement, if it cannot."""
    if existing:
        return "a public key cannot change an existing contact's consent: use the secret key or the provider"
    if statement.state == "granted" and not statement.evidence:
        return "a public key grants consent only with evidence (IP, user agent, form)"
    return None


def _write_links(
    conn: Connection,
    contact_id: int,
    ref: ContactRef,
    rulings: list[Ruling],
    now: datetime,
    event: Event | None,
    raw: RawCall | None,
) -> None:
    """The consent ledger's new rows and the contact's devices."""
    for ruling in rulings:
        record_consent(conn, contact_id, ruling, now, event, raw)
    for device in ref.push_subscriptions:
        add_push_subscription(conn, contact_id, device.kind, device.address, device.keys, now)


def _given_fields(ref: ContactRef) -> dict[str, Any]:
    """The contact fields the event gives a value for, as stored."""
    fields: dict[str, Any] = {f: getattr(ref, f) for f in _FIELDS if getattr(ref, f)}
    if ref.email:
        fields["email"] = ref.email.strip().lower()
    return fields


def withdraw(conn: Connection, contact_id: int, channel: str, source: str, now: datetime, evidence: str | None) -> None:
    """A provider reported, at send time, that the recipient opted out: a withdrawal stated now."""
    row = conn.execute(sa.select(CONTACTS.c.consent).where(C.id == contact_id)).one()
    consent = jsoncodec.loads(row.consent)
    statement = ConsentStatement(
        state="withdrawn", stated_at=now, action=True, evidence={"provider_error": evidence} if evidence else {}
    )
    ruling = rule_on(consent.get(channel), channel, statement, source, received=now)
    if ruling.applied:
        consent[channel] = ruling.entry
        conn.execute(
            sa.update(CONTACTS).where(C.id == contact_id).values(consent=jsoncodec.dumps(consent), updated_at=now)
        )
    record_consent(conn, contact_id, ruling, now)


def record_consent(
    conn: Connection,
    contact_id: int,
    ruling: Ruling,
    now: datetime,
    event: Event | None = None,
    raw: RawCall | None = None,
) -> None:
    """The consent ledger: every statement, applied or not, with why, where it came from and what shows it."""
    statement = ruling.statement
    evidence: dict[str, Any] = {**statement.evidence}
    if event is not None:
        evidence.update(event=event.type, occurred_at=event.occurred_at)
    if raw is not None:
        evidence.update(inbox_id=raw.id, webhook_id=raw.dedupe_key or None)
    appends.append(
        conn,
        _INSERT_CONSENT,
        {
            "contact_id": contact_id,
            "channel": ruling.channel,
            "state": statement.state,
            "source": ruling.source,
            "event_id": event.id if event else None,
            "evidence": jsoncodec.dumps(evidence),
            "stated_at": statement.stated_at,
            "received_at": raw.received_at if raw is not None else now,
            "action": statement.action,
            "applied": ruling.applied,
            "reason": ruling.reason,
            "recorded_at": now,
        },
    )


_INSERT_CONSENT = sa.insert(CONSENTS).inline()  # appended: no id read back (store/appends.py)


def add_push_subscription(
    conn: Connection, contact_id: int, kind: str, address: str, keys: dict[str, str], now: datetime
) -> None:
    """A device subscribes; if it belonged to someone else (a shared browser), it is theirs no more."""
    conn.execute(
        sql.insert(conn.dialect.name, PUSH_SUBSCRIPTIONS)
        .values(contact_id=contact_id, kind=kind, address=address, keys=jsoncodec.dumps(keys), created_at=now)
        .on_conflict_do_update(
            index_elements=["kind", "address"], set_={"contact_id": contact_id, "keys": jsoncodec.dumps(keys)}
        )
    )


def forget_addresses(
    conn: Connection, contact_id: int, channel: str, addresses: tuple[str, ...], now: datetime
) -> None:
    """What a provider said no longer exists: push subscriptions go, a number or address is marked."""
    if channel == "push":
        conn.execute(
            sa.delete(PUSH_SUBSCRIPTIONS).where(
                PUSH_SUBSCRIPTIONS.c.contact_id == contact_id, PUSH_SUBSCRIPTIONS.c.address.in_(addresses)
            )
        )
    elif channel == "sms":
        conn.execute(sa.update(CONTACTS).where(C.id == contact_id).values(phone_status="invalid", updated_at=now))
    elif channel == "email":
        mark_email_bouncing(conn, contact_id, now)


#: On SQLite, two INs rather than `(kind, value) IN (...)`, which SQLite answers by scanning the whole table;
#: the pairs that were not asked for are dropped below.
_LOOKUP = sa.select(I.kind, I.value, I.contact_id).where(
    I.kind.in_(sa.bindparam("kinds", expanding=True)), I.value.in_(sa.bindparam("values", expanding=True))
)
#: On PostgreSQL, the pairs as two arrays joined to the table. `(kind, value) IN ((...), ...)` became a filter of
#: one OR per pair that PostgreSQL ran on every row while the table was small, say under 10,000 identities (a new
#: deployment's first days): 10-30 ms per batch of calls, 40 % of the database's CPU in `bench/e2e.py`, and a
#: statement of its own for each number of pairs. Joined, the pairs are probed by the primary key or hashed, one
#: statement whatever their number (docs/performance.md, session 24).
_WANTED = (
    sa.func.unnest(sa.bindparam("kinds", type_=ARRAY(sa.Text)), sa.bindparam("values", type_=ARRAY(sa.Text)))
    .table_valued("kind", "value")
    .render_derived(name="wanted")
)
_LOOKUP_PAIRS = sa.select(I.kind, I.value, I.contact_id).join(
    _WANTED, sa.and_(I.kind == _WANTED.c.kind, I.value == _WANTED.c.value)
)


def _lookup(conn: Connection, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], int]:
    wanted = set(keys)
    if not wanted:
        return {}
    if conn.dialect.name == "postgresql":
        pairs = sorted(wanted)
        rows = conn.execute(_LOOKUP_PAIRS, {"kinds": [k for k, _ in pairs], "values": [v for _, v in pairs]})
    else:
        kinds, values = sorted({k for k, _ in wanted}), sorted({v for _, v in wanted})
        rows = conn.execute(_LOOKUP, {"kinds": kinds, "values": values})
    return {(r.kind, r.value): r.contact_id for r in rows if (r.kind, r.value) in wanted}


#: Where `known_ahead` keeps who holds each identity (None: nobody) while a batch of calls is applied.
_AHEAD = "declic.identities"
#: And the contacts the batch created, each with the (rule, occurrence) pairs it was enrolled in since.
_NEW = "declic.new_contacts"


@contextlib.contextmanager
def known_ahead(conn: Connection, refs: Iterable[ContactRef]) -> Iterator[None]:
    """Look up who the refs name in one statement, for a batch of calls applied in one transaction: one
    round trip where each call took one (docs/performance.md). Every write to identities is in this
    module and keeps the answers current (`_remember`) or drops them (`_forget`); a key not covered, or
    one whose holder is no longer sure, is read from the database as before."""
    keys = {key for ref in refs for key in identities(ref)}
    found = _lookup(conn, keys)
    conn.info[_AHEAD] = {key: found.get(key) for key in keys}
    conn.info[_NEW] = {}
    try:
        yield
    finally:
        conn.info.pop(_AHEAD, None)
        conn.info.pop(_NEW, None)


def enrolled_since_created(conn: Connection, contact_id: int) -> set[tuple[str, str]] | None:
    """For a contact this batch of calls created: the (rule, occurrence) pairs it was enrolled in since (the
    caller adds to them). None for any other contact. No other transaction sees an uncommitted contact, so
    these are all its enrolments: one can be written without asking the database (router.enrol)."""
    created: dict[int, set[tuple[str, str]]] | None = conn.info.get(_NEW)
    return None if created is None else created.get(contact_id)


def _known(conn: Connection, keys: list[tuple[str, str]]) -> dict[tuple[str, str], int]:
    """Who holds each key: from what `known_ahead` read when it covers them all, else from the database."""
    ahead: dict[tuple[str, str], int | None] | None = conn.info.get(_AHEAD)
    if ahead is None or not all(key in ahead for key in keys):
        return _lookup(conn, keys)
    return {key: holder for key in keys if (holder := ahead[key]) is not None}


def _remember(conn: Connection, keys: list[tuple[str, str]], won: set[tuple[str, str]], contact_id: int) -> None:
    """After a claim: the keys won are the contact's; the others someone else's, read again if asked."""
    ahead = conn.info.get(_AHEAD)
    if ahead is not None:
        for key in keys:
            if key in won:
                ahead[key] = contact_id
            else:
                ahead.pop(key, None)


def _forget(conn: Connection) -> None:
    """Identities moved or went (a merge, an erasure): the rest of the batch reads them from the database, and
    no contact counts as new any more."""
    conn.info.pop(_AHEAD, None)
    conn.info.pop(_NEW, None)


def _claim(conn: Connection, keys: list[tuple[str, str]], contact_id: int) -> set[tuple[str, str]]:
    """Link identities to the contact unless another contact holds them; return those linked."""
    if not keys:
        return set()
    # executemany with RETURNING: one compiled statement whatever the number of identities.
    rows = [{"kind": k, "value": v, "contact_id": contact_id} for k, v in keys]
    won = {(r.kind, r.value) for r in conn.execute(_link_identities(conn.dialect.name), rows)}
    _remember(conn, keys, won, contact_id)
    return won


def _insert(conn: Connection, row: dict[str, Any], keys: list[tuple[str, str]]) -> int:
    """Queue a new contact and its identities, Declic's own id first, with the transaction's other rows
    (store/ids.py): `upsert` read every key free, and no statement waits for an answer here.

    SQLite: the transaction holds the database's only write lock from its BEGIN (IMMEDIATE), so nobody else can
    link a key meanwhile. PostgreSQL: a concurrent transaction may link one first; the identities' INSERT (no ON
    CONFLICT) then fails on their primary key, and `Database.transaction` runs the whole transaction again, which
    reads the key as theirs. Each new contact took a round trip of its own (an INSERT ... RETURNING) on the path
    that applies calls one transaction at a time (docs/performance.md, session 15)."""
    contact_id = ids.queue_insert(conn, _QUEUE_CONTACT, row)
    linked = [(_OWN, str(contact_id)), *keys]
    for kind, value in linked:
        appends.append(conn, _QUEUE_IDENTITY, {"kind": kind, "value": value, "contact_id": contact_id})
    _remember(conn, linked, set(linked), contact_id)
    return contact_id


@functools.cache
def _link_identities(dialect: str) -> sa.Insert:
    """Built once: SQLAlchemy then finds it in its compiled cache without rebuilding its cache key."""
    insert = sql.insert(dialect, IDENTITIES)
    return insert.on_conflict_do_nothing(index_elements=["kind", "value"]).returning(I.kind, I.value)


def _fold_anonymous(conn: Connection, anonymous: int, into: int, ref: ContactRef) -> bool:
    """Move an anonymous record's ids to the contact an alias names; False if the record is a person's.

    Any key may do this, the site's public one included: a record with no e-mail, phone, consent,
    device or id of another kind than `previous_ids`' holds nothing of anyone. Its past events stay
    where they are. Two contacts that each show a person are never merged.
    """
    row = conn.execute(sa.select(C.email, C.phone, C.consent, C.email_status).where(C.id == anonymous)).one()
    if row.email or row.phone or jsoncodec.loads(row.consent) or row.email_status == "erased":
        return False
    kinds = set(conn.execute(sa.select(I.kind).where(I.contact_id == anonymous).distinct()).scalars())
    devices = conn.execute(sa.select(sa.func.count()).where(P.contact_id == anonymous)).scalar_one()
    if devices or kinds - {_OWN, *ref.previous_ids}:
        return False
    conn.execute(sa.update(IDENTITIES).where(I.contact_id == anonymous, I.kind != _OWN).values(contact_id=into))
    _forget(conn)
    return True


P = PUSH_SUBSCRIPTIONS.c


def links_columns(dialect: str, contact_id: sa.ColumnElement[int]) -> list[sa.Label[Any]]:
    """The external ids and the devices of the contact `contact_id` names, as two JSON arrays read with the
    row that holds it: one statement where three were (a step is prepared for each e-mail). `links_of`
    reads them back."""
    if dialect == "postgresql":
        array, aggregate = sa.func.json_build_array, sa.func.json_agg
    else:
        array, aggregate = sa.func.json_array, sa.func.json_group_array
    external = sa.select(aggregate(array(I.kind, I.value))).where(
        I.contact_id == contact_id, I.kind != "email", I.kind != "phone"
    )
    devices = sa.select(aggregate(array(P.id, P.kind, P.address, P["keys"]))).where(P.contact_id == contact_id)
    return [external.scalar_subquery().label("links__ids"), devices.scalar_subquery().label("links__devices")]


@functools.cache
def _contact_with_links(dialect: str) -> sa.Select[Any]:
    return sa.select(CONTACTS, *links_columns(dialect, C.id)).where(C.id == sa.bindparam("contact_id"))


def load(conn: Connection, contact_id: int) -> dict[str, Any]:
    """The contact as rules and templates see it."""
    row = conn.execute(_contact_with_links(conn.dialect.name), {"contact_id": contact_id}).one()._mapping
    return links_of(row, row)


def links_of(fields: Mapping[Any, Any], links: Mapping[Any, Any]) -> dict[str, Any]:
    """The contact from its row (`fields`) and the two arrays of `links_columns` (in `links`)."""
    devices = sorted(_array(links["links__devices"]))  # by id: the order they subscribed in
    return {
        **_fields_of(fields),
        "external_ids": dict(sorted((kind, value) for kind, value in _array(links["links__ids"]))),
        "push_subscriptions": [
            {"kind": kind, "address": address, "keys": jsoncodec.loads(keys)} for _, kind, address, keys in devices
        ],
    }


def _array(value: str | list[Any] | None) -> list[Any]:
    """A JSON array as the driver gives it: text (SQLite), decoded (PostgreSQL), or None for no rows."""
    if value is None:
        return []
    return value if isinstance(value, list) else list(jsoncodec.loads(value))


def _fields_of(row: Mapping[Any, Any]) -> dict[str, Any]:
    consent = jsoncodec.loads(row["consent"])
    return {
        "id": row["id"],
        **{f: row[f] for f in _FIELDS},
        "attributes": jsoncodec.loads(row["attributes"]),
        "consent": {channel: entry["state"] for channel, entry in consent.items()},
        "email_status": row["email_status"],
        "phone_status": row["phone_status"],
    }


def erase(conn: Connection, contact_id: int, now: datetime) -> None:
    """Forget who the contact is: personal fields, every identity, stored bodies and events.

    Erasure sticks: with no identity left, the row is never found again, so a later call about
    the same person starts a new contact with no history and no consent of the old one. The
    row stays, emptied, so counts (deliveries, conversions) keep adding up; active journeys end.
    """
    conn.execute(
        sa.update(CONTACTS)
        .where(C.id == contact_id)
        .values(**dict.fromkeys(_FIELDS), attributes="{}", consent="{}", email_status="erased", updated_at=now)
    )
    conn.execute(sa.delete(IDENTITIES).where(I.contact_id == contact_id))
    _forget(conn)
    conn.execute(sa.delete(PUSH_SUBSCRIPTIONS).where(PUSH_SUBSCRIPTIONS.c.contact_id == contact_id))
    inbox_ids = sa.select(EVENTS.c.inbox_id).where(EVENTS.c.contact_id == contact_id).scalar_subquery()
    conn.execute(sa.update(INBOX).where(INBOX.c.id.in_(inbox_ids)).values(body=b"", headers="{}", status="erased"))
    # Fetches of Declic's pixel and links that made no event (a second open) hold an address and user agent too.
    fetches = sa.and_(
        INBOX.c.source.in_(feedback.TRACKING_SOURCES), INBOX.c.dedupe_key.startswith(feedback.fetch_keys_of(contact_id))
    )
    conn.execute(sa.update(INBOX).where(fetches).values(body=b"", headers="{}", status="erased"))
    conn.execute(sa.update(EVENTS).where(EVENTS.c.contact_id == contact_id).values(properties="{}", correlation="[]"))
    # Providers' error texts may quote the address ("550 no such user a@b.c", Twilio's 21211).
    conn.execute(sa.update(DELIVERIES).where(DELIVERIES.c.contact_id == contact_id).values(reason=None))
    rendered.forget_contact(conn, contact_id)
    conn.execute(sa.update(DECISIONS).where(DECISIONS.c.contact_id == contact_id).values(reason=None))
    ended = list(
        conn.execute(
            sa.update(ENROLMENTS)
            .where(ENROLMENTS.c.contact_id == contact_id, ENROLMENTS.c.status == "active")
            .values(status="exited", ended_at=now)
            .returning(ENROLMENTS.c.id)
        ).scalars()
    )
    if ended:
        jobqueue.cancel_pending(conn, ended, now)


def view(
    conn: Connection, contact_id: int, now: datetime, wheres: Wheres | None = None, row: dict[str, Any] | None = None
) -> ContactView:
    """The contact for a step being prepared, with its history: valid only within that transaction.
    `row` is its row of the contacts table with the columns of `links_columns`, when the caller read it."""
    fields = links_of(row, row) if row is not None else load(conn, contact_id)
    return ContactView(fields, conn, now, wheres)


def mark_email_bouncing(conn: Connection, contact_id: int, now: datetime) -> None:
    conn.execute(sa.update(CONTACTS).where(C.id == contact_id).values(email_status="bouncing", updated_at=now))
