"""Segment's official Python library (segment-analytics-python), unmodified, feeding the track source.

Set up as docs/connect/track.md says (`host` = the source's URL, the secret key as `write_key`), it
posts to HOST/v1/batch with Basic auth, gzip on or off; every call becomes its documented event and
a rule mails Camille through a real SMTP server (SQLite and PostgreSQL).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from segment.analytics import Client
from segment.analytics.request import APIError

from conftest import Deployment
from declic_gateway.testing import SmtpCatcher
from segment_site import CAMILLE, EVENT_OF_CALL, SECRET_KEY, WRITE_KEY, mailed, start_site


def segment_client(d: Deployment, key: str, errors: list[Exception], **options: Any) -> Client:
    """The library as a site's server sets it up: only `host` points at Declic."""
    host = str(d.client.make_url("/hooks/site"))
    return Client(key, host=host, on_error=lambda error, _batch: errors.append(error), max_retries=0, **options)


async def call(method: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """One call of the library, made in a thread, as the app answers it in this event loop."""
    await asyncio.to_thread(method, *args, **kwargs)


@pytest.mark.parametrize("gzip", [False, True], ids=["plain", "gzip"])
async def test_each_call_of_the_python_library_becomes_its_event_and_mails_her(
    aiohttp_client: Any, tmp_path: Path, db_url: str, smtp: SmtpCatcher, gzip: bool
) -> None:
    d = await start_site(aiohttp_client, tmp_path, db_url, smtp)
    errors: list[Exception] = []
    server = segment_client(d, SECRET_KEY, errors, gzip=gzip, sync_mode=True)  # one request per call
    visitor = segment_client(d, WRITE_KEY, errors, gzip=gzip, sync_mode=True)

    await call(visitor.page, anonymous_id="browser-7", name="Pricing", properties={"url": "https://shop.example/p"})
    signup = {"email": CAMILLE, "firstName": "Camille", "consent": {"email": "granted"}}
    await call(server.identify, "cus_1042", signup, context={"ip": "203.0.113.9"})
    await d.advance(seconds=1)
    await call(server.alias, "browser-7", "cus_1042")  # the visitor she was before signing up
    await call(server.track, "cus_1042", "Signed Up", {"plan": "pro", "price": 19.9})
    await call(server.page, "cus_1042", "Docs", "Getting started", {"url": "https://shop.example/docs"})
    await call(server.screen, "cus_1042", "Onboarding", "Welcome")
    await call(server.group, "cus_1042", "acme", {"name": "Acme SAS", "employees": 40})
    await call(visitor.page, anonymous_id="browser-7", name="Cart")  # now hers
    await d.advance(seconds=1)

    assert errors == []
    stored = d.rows("SELECT dedupe_key, headers, body FROM inbox ORDER BY id")
    assert len(stored) == 8 and all(json.loads(r.headers)["User-Agent"].startswith("analytics-python/") for r in stored)
    assert not any(SECRET_KEY.encode() in r.body for r in stored)  # the library copies it into the body
    assert [r.dedupe_key.startswith("secret-key:") for r in stored] == [False, *[True] * 6, False]
    sent = mailed(smtp)
    assert {recipient for recipient, _, _ in sent} == {CAMILLE}
    assert sorted(kind for _, kind, _ in sent) == sorted([*EVENT_OF_CALL.values(), "page.viewed"])
    [contact] = d.rows("SELECT id, email, first_name FROM contacts WHERE email IS NOT NULL")
    assert (contact.email, contact.first_name) == (CAMILLE, "Camille")
    ids = d.rows("SELECT kind, value FROM identities WHERE contact_id = :c ORDER BY kind", c=contact.id)
    assert [(r.kind, r.value) for r in ids if r.kind != "declic"] == [
        ("email", CAMILLE),
        ("site", "cus_1042"),
        ("site_anonymous", "browser-7"),
    ]
    [track] = d.rows("SELECT properties FROM events WHERE type = 'track.signed_up'")
    assert json.loads(track.properties)["price"] == {"$decimal": "19.9"}  # money stays exact
    assert json.loads(track.properties)["plan"] == "pro"


@pytest.mark.parametrize("gzip", [False, True], ids=["plain", "gzip"])
async def test_a_batch_of_100_calls_is_one_request_and_100_events(
    aiohttp_client: Any, tmp_path: Path, db_url: str, smtp: SmtpCatcher, gzip: bool
) -> None:
    d = await start_site(aiohttp_client, tmp_path, db_url, smtp)
    errors: list[Exception] = []
    setup = segment_client(d, SECRET_KEY, errors, sync_mode=True)
    await call(setup.identify, "cus_1042", {"email": CAMILLE, "consent": {"email": "granted"}})

    def hundred_calls() -> None:
        # The library's own queue: it sends 100 calls at once, or what it holds after upload_interval.
        server = segment_client(d, SECRET_KEY, errors, gzip=gzip, upload_size=100, upload_interval=2)
        for n in range(100):
            server.track("cus_1042", "Item Viewed", {"sku": f"RL-{n}"}, message_id=f"item-{n}")
        server.flush()
        server.join()

    await asyncio.to_thread(hundred_calls)
    await d.advance(seconds=1)

    assert errors == []
    [batch] = d.rows("SELECT body, headers FROM inbox WHERE id > 1")
    assert len(json.loads(batch.body)["batch"]) == 100
    assert json.loads(batch.headers).get("Content-Encoding") == ("gzip" if gzip else None)
    items = sorted(message_id for _, kind, message_id in mailed(smtp) if kind == "track.item_viewed")
    assert items == sorted(f"item-{n}" for n in range(100))


async def test_the_library_gets_segments_answers(
    aiohttp_client: Any, tmp_path: Path, db_url: str, smtp: SmtpCatcher
) -> None:
    """A wrong key is a 401 the library does not retry; nothing is stored."""
    d = await start_site(aiohttp_client, tmp_path, db_url, smtp)
    wrong = segment_client(d, "not-the-key", [], sync_mode=True)
    with pytest.raises(APIError) as refused:
        await call(wrong.track, "cus_1042", "Signed Up")
    assert refused.value.status == 401 and "wrong write key" in refused.value.message
    assert d.scalar("SELECT count(*) FROM inbox") == 0
