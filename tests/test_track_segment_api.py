"""The track source as a drop-in Segment endpoint, over real HTTP: the Tracking API's paths and answers,
gzip bodies and their bounds, CORS for the configured origins, and alias within the public key's limits."""

from __future__ import annotations

import base64
import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from conftest import Deployment
from declic_gateway.config import load_config
from declic_gateway.errors import ConfigError
from declic_gateway.plugins import collect, get_plugin_manager
from declic_gateway.testing import SmtpCatcher, write_deployment
from segment_site import CAMILLE, SECRET_KEY, WRITE_KEY, start_site

PAGE_ORIGIN = "https://www.boutique.example"


def basic(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


def message(**fields: Any) -> dict[str, Any]:
    return {"userId": "cus_1042", "event": "Signed Up", "messageId": "m-1", **fields}


@pytest.fixture
async def site(aiohttp_client: Any, tmp_path: Path, db_url: str, smtp: SmtpCatcher) -> Deployment:
    return await start_site(aiohttp_client, tmp_path, db_url, smtp, allowed_origins=[PAGE_ORIGIN])


# --- Paths and answers: /v1/<call> takes that call (its `type` may be left out), /v1/batch a batch ---------

PATHS = [
    ("v1/track without type", "/v1/track", message(), 200, "track"),
    ("v1/track with its type", "/v1/track", message(type="track"), 200, "track"),
    ("v1/identify", "/v1/identify", {"userId": "u", "traits": {"plan": "pro"}}, 200, "identify"),
    ("v1/page", "/v1/page", {"anonymousId": "a", "name": "Home"}, 200, "page"),
    ("v1/screen", "/v1/screen", {"userId": "u", "name": "Home"}, 200, "screen"),
    ("v1/group", "/v1/group", {"userId": "u", "groupId": "acme"}, 200, "group"),
    ("v1/alias", "/v1/alias", {"userId": "u", "previousId": "a"}, 200, "alias"),
    ("v1/batch", "/v1/batch", {"batch": [message(type="track")]}, 200, None),
    ("analytics.js /t", "/t", message(type="track"), 200, "track"),
    ("the bare source", "", message(type="track"), 200, "track"),
    ("v1/identify given a track", "/v1/identify", message(type="track"), 400, "takes identify calls"),
    ("v1/track given a batch", "/v1/track", {"batch": [message(type="track")]}, 400, "post batches to /v1/batch"),
    ("v1/batch given one message", "/v1/batch", message(type="track"), 400, "takes a batch"),
    ("v1/track without an event name", "/v1/track", message(event=""), 400, "needs an event name"),
    ("v1/group without groupId", "/v1/group", {"userId": "u"}, 400, "groupId"),
    ("v1/alias without previousId", "/v1/alias", {"userId": "u"}, 400, "previousId"),
    ("unknown call", "/v1/order", message(type="track"), 404, "no source named"),
    ("path below a call", "/v1/batch/more", {"batch": []}, 404, "no source named"),
]


@pytest.mark.parametrize(("case", "path", "body", "status", "expected"), PATHS, ids=[p[0] for p in PATHS])
async def test_each_path_takes_its_call_and_answers_as_segment_does(
    site: Deployment, case: str, path: str, body: dict[str, Any], status: int, expected: str | None
) -> None:
    response = await site.client.post(f"/hooks/site{path}", data=json.dumps(body), headers=basic(WRITE_KEY))
    answer = await response.json()
    assert response.status == status, answer
    if status != 200:
        assert expected in answer["error"] and site.scalar("SELECT count(*) FROM inbox") == 0
        return
    assert answer == {"success": True, "status": "accepted"}
    stored = json.loads(site.scalar("SELECT body FROM inbox"))
    assert stored.get("type") == expected  # the stored call says what it is, whatever path it came by
    await site.advance(seconds=1)
    assert site.scalar("SELECT status FROM inbox") == "processed"


async def test_a_redelivery_is_a_success_too_and_a_wrong_key_is_401(site: Deployment) -> None:
    data = json.dumps(message())
    for status in ("accepted", "duplicate"):
        response = await site.client.post("/hooks/site/v1/track", data=data, headers=basic(WRITE_KEY))
        assert await response.json() == {"success": True, "status": status}
    response = await site.client.post("/hooks/site/v1/track", data=data, headers=basic("site-write-kez"))
    assert response.status == 401 and "wrong write key" in (await response.json())["error"]


# --- gzip, as the server libraries send it: decoded, and bounded after decoding ------------------------


def gzipped(data: dict[str, Any] | bytes) -> bytes:
    return gzip.compress(data if isinstance(data, bytes) else json.dumps(data).encode())


GZIP = [
    ("a gzip batch", gzipped({"batch": [message(type="track")]}), 200, None),
    ("not gzip at all", b"\x1f\x8b not really", 400, "could not be decoded"),
    ("a message over 32 KB once decoded", gzipped(message(properties={"x": "y" * 33_000})), 400, "32 KB"),
    ("a batch over 500 KB once decoded", gzipped({"batch": [message(n="y" * 30_000)] * 18}), 400, "500 KB"),
    ("2 MiB of zeros in 2 KB", gzipped(b"0" * 2 * 1024 * 1024), 413, "body over 1048576 bytes"),
]


@pytest.mark.parametrize(("case", "body", "status", "reason"), GZIP, ids=[g[0] for g in GZIP])
async def test_gzip_bodies_are_decoded_and_bounded_after_decoding(
    site: Deployment, case: str, body: bytes, status: int, reason: str | None
) -> None:
    path = "/hooks/site/v1/batch" if "batch" in case else "/hooks/site/v1/track"
    headers = {**basic(WRITE_KEY), "Content-Encoding": "gzip", "Content-Type": "application/json"}
    response = await site.client.post(path, data=body, headers=headers)
    answer = await response.json()
    assert response.status == status, answer
    if reason is not None:
        assert reason in answer["error"] and site.scalar("SELECT count(*) FROM inbox") == 0
    else:
        assert json.loads(site.scalar("SELECT body FROM inbox"))["batch"][0]["messageId"] == "m-1"


# --- The secret key never rests in the inbox: the server libraries copy it into the body ---------------


@pytest.mark.parametrize("spelling", ["json.dumps", "compact", "non-ASCII"])
async def test_the_secret_key_is_taken_out_of_a_stored_body(
    aiohttp_client: Any, tmp_path: Path, db_url: str, smtp: SmtpCatcher, spelling: str
) -> None:
    d = await start_site(aiohttp_client, tmp_path, db_url, smtp)
    batch = {"batch": [message(type="track")], "writeKey": SECRET_KEY}
    body = {
        "json.dumps": json.dumps(batch),  # Python's library
        "compact": json.dumps(batch, separators=(",", ":")),  # Node's JSON.stringify
        "non-ASCII": json.dumps(batch).replace("servers", "serv\\u0065rs"),  # an escape JSON allows
    }[spelling].encode()
    response = await d.client.post("/hooks/site/v1/batch", data=body, headers=basic(SECRET_KEY))
    assert response.status == 200, await response.text()
    stored = d.scalar("SELECT body FROM inbox")
    assert SECRET_KEY.encode() not in stored and json.loads(stored)["writeKey"] == "[secret key removed]"
    assert d.scalar("SELECT dedupe_key FROM inbox").startswith("secret-key:")  # still signed by the server
    only_in_body = await d.client.post("/hooks/site/v1/batch", data=body)
    assert only_in_body.status == 401  # a body alone is no proof: it may come from a page


# --- CORS: the origins of `allowed_origins` get answers they can read -----------------------------------

PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}


async def test_an_allowed_origins_preflight_and_answers_carry_cors_headers(site: Deployment) -> None:
    preflight = await site.client.options("/hooks/site/t", headers={"Origin": PAGE_ORIGIN, **PREFLIGHT})
    assert preflight.status == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == PAGE_ORIGIN
    assert preflight.headers["Access-Control-Allow-Methods"] == "POST"
    assert preflight.headers["Access-Control-Allow-Headers"] == "authorization,content-type"
    assert "Origin" in preflight.headers["Vary"] and "Access-Control-Allow-Credentials" not in preflight.headers
    for key, status in ((WRITE_KEY, 200), ("wrong", 401)):  # a refusal must be readable too, or it is resent
        headers = {"Origin": PAGE_ORIGIN, "Content-Type": "text/plain", **basic(key)}
        response = await site.client.post("/hooks/site/t", data=json.dumps(message(type="track")), headers=headers)
        assert response.status == status
        assert response.headers["Access-Control-Allow-Origin"] == PAGE_ORIGIN
        assert response.headers["Access-Control-Expose-Headers"] == "Retry-After"


@pytest.mark.parametrize(
    ("origin", "headers"),
    [
        ("https://evil.example", PREFLIGHT),
        ("https://www.boutique.example:8443", PREFLIGHT),  # another port is another origin
        ("http://www.boutique.example", PREFLIGHT),
        (PAGE_ORIGIN, {}),  # not a preflight: no method asked
    ],
)
async def test_other_origins_get_no_cors_answer(site: Deployment, origin: str, headers: dict[str, str]) -> None:
    preflight = await site.client.options("/hooks/site/v1/batch", headers={"Origin": origin, **headers})
    assert preflight.status == 403 and "Access-Control-Allow-Origin" not in preflight.headers
    if origin != PAGE_ORIGIN:
        post = await site.client.post(
            "/hooks/site/t", data=json.dumps(message(type="track")), headers={"Origin": origin, **basic(WRITE_KEY)}
        )
        assert post.status == 200 and "Access-Control-Allow-Origin" not in post.headers  # the key decides, not CORS


@pytest.mark.parametrize(("origins", "status", "allowed"), [(None, 403, None), (["*"], 204, "*")], ids=["none", "*"])
async def test_cors_is_off_by_default_and_star_only_when_written(
    aiohttp_client: Any,
    tmp_path: Path,
    db_url: str,
    smtp: SmtpCatcher,
    origins: list[str] | None,
    status: int,
    allowed: str | None,
) -> None:
    d = await start_site(aiohttp_client, tmp_path, db_url, smtp, allowed_origins=origins)
    preflight = await d.client.options("/hooks/site/t", headers={"Origin": "https://any.example", **PREFLIGHT})
    assert preflight.status == status
    assert preflight.headers.get("Access-Control-Allow-Origin") == allowed


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("https://Shop.Example:443/", "https://shop.example"),
        ("http://localhost:8080", "http://localhost:8080"),
        ("https://shop.example/path", None),
        ("shop.example", None),
        ("ftp://shop.example", None),
        ("https://user@shop.example", None),
    ],
)
def test_allowed_origins_are_origins(tmp_path: Path, given: str, expected: str | None) -> None:
    config = f"""\
sources:
  site: {{plugin: track, write_key: k, allowed_origins: ["{given}"]}}
"""
    path = write_deployment(tmp_path, config)
    if expected is None:
        with pytest.raises(ConfigError, match=r"allowed_origins.*is not an origin"):
            load_config(path, collect(get_plugin_manager()))
    else:
        [(_, config)] = load_config(path, collect(get_plugin_manager())).source_plugins.values()
        assert config.allowed_origins == [expected]


# --- alias: an anonymous visitor's id joins the user it signed up as; two people are never merged -------


async def post(d: Deployment, path: str, body: dict[str, Any], key: str = WRITE_KEY) -> None:
    response = await d.client.post(f"/hooks/site{path}", data=json.dumps(body), headers=basic(key))
    assert response.status == 200, await response.text()
    await d.advance(seconds=1)


def holder(d: Deployment, kind: str, value: str) -> int:
    return int(d.scalar("SELECT contact_id FROM identities WHERE kind = :k AND value = :v", k=kind, v=value))


async def her_account(d: Deployment) -> int:
    traits = {"email": CAMILLE, "consent": {"email": "granted"}}
    await post(d, "/v1/identify", {"userId": "cus_1042", "traits": traits}, SECRET_KEY)
    return holder(d, "site", "cus_1042")


async def test_alias_folds_the_anonymous_visitor_into_her_contact_with_the_write_key(site: Deployment) -> None:
    await post(site, "/p", {"type": "page", "anonymousId": "browser-7"})
    visitor = holder(site, "site_anonymous", "browser-7")
    camille = await her_account(site)
    assert visitor != camille
    await post(site, "/a", {"type": "alias", "userId": "cus_1042", "previousId": "browser-7"})
    assert holder(site, "site_anonymous", "browser-7") == camille
    await post(site, "/p", {"type": "page", "anonymousId": "browser-7"})
    assert site.scalar("SELECT contact_id FROM events ORDER BY id DESC LIMIT 1") == camille
    kinds = site.rows("SELECT type, contact_id FROM events WHERE type = 'contact.aliased'")
    assert [(r.type, r.contact_id) for r in kinds] == [("contact.aliased", camille)]


@pytest.mark.parametrize("key", [WRITE_KEY, SECRET_KEY], ids=["write key", "secret key"])
async def test_alias_never_merges_two_known_contacts(site: Deployment, key: str) -> None:
    """Mallory's browser id is known as hers (she gave an address): no alias moves it to Camille."""
    await post(site, "/i", {"type": "identify", "anonymousId": "mallory-7", "traits": {"email": "m@attacker.example"}})
    mallory = holder(site, "site_anonymous", "mallory-7")
    camille = await her_account(site)
    await post(site, "/v1/alias", {"userId": "cus_1042", "previousId": "mallory-7"}, key)
    assert holder(site, "site_anonymous", "mallory-7") == mallory != camille
    assert site.scalar("SELECT email FROM contacts WHERE id = :c", c=camille) == CAMILLE


async def test_alias_of_a_new_id_links_it(site: Deployment) -> None:
    camille = await her_account(site)
    await post(site, "/v1/alias", {"userId": "cus_1042", "previousId": "browser-9"})
    assert holder(site, "site_anonymous", "browser-9") == camille
