"""The admin API, /api/v1, over real HTTP after real Shopify webhooks and real SMTP sends, on
SQLite and PostgreSQL: token scopes, every endpoint's behaviour, bad input answered 4xx."""

from __future__ import annotations

import json
from typing import Any

import pytest
from structlog.testing import capture_logs

from conftest import Deployment, Factory, fixture_bytes, fixture_json, refuse
from declic_gateway.cli import logs
from declic_gateway.testing import SmtpCatcher

CAMILLE = "camille.durand@example.org"
ADMIN = "admin-token-for-the-api-tests-0123456789"
READER = "read-only-token-for-the-api-tests-0123"
TOKENS = f"""\
admin:
  token: ${{DECLIC_TEST_API_TOKEN}}
  tokens:
    - {{token: {READER}, scope: read, name: reporting}}
"""


@pytest.fixture(autouse=True)
def admin_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DECLIC_TEST_API_TOKEN", ADMIN)  # the config reads it as ${DECLIC_TEST_API_TOKEN}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def get(d: Deployment, path: str, token: str = READER, expect: int = 200, **query: Any) -> Any:
    response = await d.client.get(f"/api/v1{path}", params=query, headers=bearer(token))
    assert response.status == expect, await response.text()
    return await response.json()


async def post(d: Deployment, path: str, body: Any = None, token: str = ADMIN, status: int = 200) -> Any:
    data = json.dumps(body).encode() if body is not None else b""
    response = await d.client.post(f"/api/v1{path}", data=data, headers=bearer(token))
    assert response.status == status, await response.text()
    return await response.json()


def cart(total: str, token: str) -> bytes:
    body = fixture_json("shopify/checkout.json")
    body.update(total_price=total, token=token)
    return json.dumps(body).encode()


async def test_no_token_or_a_wrong_one_is_401_and_a_read_token_may_not_act(deploy: Factory) -> None:
    d = await deploy(extra=TOKENS)
    for headers in ({}, bearer("not-a-token-we-know-of-at-all"), {"Authorization": f"Basic {ADMIN}"}):
        response = await d.client.get("/api/v1/rules", headers=headers)
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert await response.json() == {"error": "a bearer token is required"}
    response = await d.client.post("/api/v1/dead-letter/replay", json={"all": True}, headers=bearer(READER))
    assert response.status == 403 and "admin scope" in (await response.json())["error"]
    assert await post(d, "/dead-letter/replay", {"all": True}) == {"queued": []}  # the admin token may
    assert (await get(d, "/rules", ADMIN))["rules"]  # and may read
    assert [rule["name"] for rule in (await get(d, "/rules"))["rules"]] == [
        "abandoned-cart",
        "welcome",
        "order-confirmation",
    ]
    response = await d.client.get("/api/openapi.json")  # the document needs no token
    assert response.status == 200 and (await response.json())["openapi"] == "3.1.0"


async def test_without_tokens_in_the_config_every_call_is_refused(deploy: Factory) -> None:
    d = await deploy()
    response = await d.client.get("/api/v1/contacts", params={"q": CAMILLE}, headers=bearer(ADMIN))
    assert response.status == 401


async def test_search_and_timeline_say_why_a_small_cart_got_no_reminder(deploy: Factory, smtp: SmtpCatcher) -> None:
    d = await deploy(extra=TOKENS)
    assert (await d.post_shopify("checkouts/create", cart("12.00", "small"), "c1")).status == 200
    assert (await d.post_shopify("checkouts/create", cart("59.90", "big"), "c2")).status == 200
    await d.advance(hours=1, seconds=1)
    assert [str(m["To"]) for m in smtp.messages] == [CAMILLE]

    [found] = (await get(d, "/contacts", q=CAMILLE.upper()))["contacts"]
    assert (found["email"], found["first_name"], found["phone"]) == (CAMILLE, "Camille", "+33612345678")
    for who in ("+33 6 12 34 56 78", "shopify:5550001", f"#{found['id']}"):
        assert (await get(d, "/contacts", q=who))["contacts"] == [found], who
    for nobody in ("nobody@example.org", "#99999999999", "shopify:0", "neither"):  # an id past 32 bits too
        assert (await get(d, "/contacts", q=nobody))["contacts"] == [], nobody

    view = await get(d, f"/contacts/{found['id']}")
    assert {"kind": "shopify", "value": "5550001"} in view["identities"]
    assert view["consent"]["email"]["state"] == "granted"

    timeline = await get(d, f"/contacts/{found['id']}/timeline")
    entries = timeline["entries"]
    assert [(e["what"], e.get("type") or e.get("action") or e.get("channel")) for e in entries] == [
        ("event", "checkout.started"),
        ("consent", "email"),
        ("consent", "sms"),
        ("decision", "not_enrolled"),
        ("event", "checkout.started"),
        ("consent", "email"),
        ("consent", "sms"),
        ("decision", "enrolled"),
        ("decision", "send"),
        ("message", None),
    ]
    assert entries[-1]["subject"] == "Your cart, Camille" and entries[-1]["to"] == CAMILLE
    assert entries[3]["rule"] == "abandoned-cart"
    assert entries[3]["reason"] == "if false: event.properties.total_price > 20"
    assert entries[0]["at"].endswith("Z") and timeline["next_after"] is None

    first = await get(d, f"/contacts/{found['id']}/timeline", limit=4)  # pages of 4: 4 + 4 + 2
    second = await get(d, f"/contacts/{found['id']}/timeline", limit=4, after=first["next_after"])
    third = await get(d, f"/contacts/{found['id']}/timeline", limit=4, after=second["next_after"])
    assert first["entries"] + second["entries"] + third["entries"] == entries and third["next_after"] is None

    for path in ("", "/timeline", "/export"):
        assert await get(d, f"/contacts/999{path}", expect=404) == {"error": "no contact has this id"}


async def test_rule_kpis_count_what_was_sent(deploy: Factory, smtp: SmtpCatcher) -> None:
    d = await deploy(extra=TOKENS)
    assert (await d.post_shopify("checkouts/create", cart("59.90", "big"), "c1")).status == 200
    await d.advance(hours=1, seconds=1)
    assert len(smtp.messages) == 1
    await d.advance(minutes=1)  # the range ends now, excluded: a minute after the send
    rule = await get(d, "/rules/abandoned-cart")
    assert (rule["trigger"], rule["condition"], rule["steps"]) == (
        "checkout.started",
        "event.properties.total_price > 20",
        2,
    )
    assert rule["kpis"]["entered"] == 1
    assert [(s["step"], s["sent"]) for s in rule["kpis"]["steps"]] == [(1, 1)]
    listed = {r["name"]: r for r in (await get(d, "/rules"))["rules"]}
    assert listed["abandoned-cart"] == rule and listed["welcome"]["kpis"]["steps"] == []
    # A range that ends before the send counts nothing.
    early = await get(d, "/rules/abandoned-cart", since="2026-03-01T00:00:00Z", until="2026-03-14T08:00:00Z")
    assert early["kpis"]["entered"] == 0 and early["kpis"]["steps"] == []
    assert await get(d, "/rules/no-such-rule", expect=404) == {"error": "no rule has this name"}
    backwards = await get(d, "/rules", since="2026-03-14T00:00:00", until="2026-03-13T00:00:00", expect=422)
    assert "since must be before until" in json.dumps(backwards)


async def test_export_then_erase_and_search_finds_nothing(deploy: Factory, smtp: SmtpCatcher) -> None:
    d = await deploy(extra=TOKENS)
    order = fixture_bytes("shopify/order.json")
    assert (await d.post_shopify("orders/create", order, "o1")).status == 200
    await d.advance(seconds=1)
    [found] = (await get(d, "/contacts", q=CAMILLE))["contacts"]
    record = await get(d, f"/contacts/{found['id']}/export")
    assert record["contact"]["email"] == CAMILLE
    assert [(m["rule"], m["status"]) for m in record["messages"]] == [("order-confirmation", "sent")]
    assert [e["type"] for e in record["events"]] == ["order.placed"]
    assert record["consent_ledger"][0]["evidence"]["inbox_id"] == 1

    await post(d, f"/contacts/{found['id']}/erase", token=READER, status=403)
    with capture_logs() as logged:
        assert await post(d, f"/contacts/{found['id']}/erase") == {"erased": found["id"]}
        await get(d, "/contacts", q=CAMILLE)
    assert logged == [
        {"event": "api action", "endpoint": "POST /api/v1/contacts/{contact_id}/erase", "log_level": "info"}
    ]
    assert (await get(d, "/contacts", q=CAMILLE))["contacts"] == []
    assert (await get(d, "/contacts", q="shopify:5550001"))["contacts"] == []
    erased = await get(d, f"/contacts/{found['id']}/export")
    assert erased["contact"]["email_status"] == "erased" and erased["identities"] == []
    assert CAMILLE not in json.dumps(erased) and "Camille" not in json.dumps(erased)
    await post(d, "/contacts/999/erase", status=404)


async def test_a_dead_lettered_step_replayed_through_the_api_is_sent(deploy: Factory, smtp: SmtpCatcher) -> None:
    smtp.replies = ["554 5.7.1 message refused"]
    d = await deploy(extra=TOKENS)
    await d.post_shopify("orders/create", fixture_bytes("shopify/order.json"))
    await d.advance(seconds=1)
    [job] = (await get(d, "/dead-letter"))["jobs"]
    assert job["kind"] == "step" and "554 5.7.1 message refused" in job["last_error"]
    [delivery] = (await get(d, "/deliveries", rule="order-confirmation"))["deliveries"]
    assert delivery["status"] == "failed" and "554" in delivery["reason"]
    assert delivery["enrolment_id"] == job["enrolment_id"]

    assert await post(d, "/dead-letter/replay", {"ids": [job["id"] + 1000]}) == {"queued": []}  # not dead: skipped
    assert await post(d, "/dead-letter/replay", {"ids": [job["id"]]}) == {"queued": [job["id"]]}
    await d.advance(seconds=1)
    assert len(smtp.to(CAMILLE)) == 1
    assert (await get(d, "/dead-letter"))["jobs"] == []
    [delivery] = (await get(d, "/deliveries", contact_id=delivery["contact_id"]))["deliveries"]
    assert delivery["status"] == "sent" and delivery["sent_at"].endswith("Z")


async def test_a_dead_step_whose_message_went_out_is_left_by_a_replay_of_everything(
    deploy: Factory, smtp: SmtpCatcher
) -> None:
    """Its e-mail went out though the database refused the record: a replay would send it again, so it is left."""
    d = await deploy(extra=TOKENS)
    refuse(d, "deliveries", "NEW.status = 'sent'")
    await d.post_shopify("orders/create", fixture_bytes("shopify/order.json"))
    await d.advance(seconds=1)
    [job] = (await get(d, "/dead-letter"))["jobs"]
    assert "(the message went out)" in job["last_error"]
    assert await post(d, "/dead-letter/replay", {"all": True}) == {"queued": []}
    assert await post(d, "/dead-letter/replay", {"ids": [job["id"]]}) == {"queued": []}
    await d.advance(hours=1)
    assert len(smtp.to(CAMILLE)) == 1
    assert [j["id"] for j in (await get(d, "/dead-letter"))["jobs"]] == [job["id"]]


async def test_a_failed_call_is_listed_and_replayed(deploy: Factory) -> None:
    d = await deploy(extra=TOKENS)
    await d.post_shopify("orders/create", b'{"this": "is not an order"}', "bad")
    await d.post_shopify("orders/create", fixture_bytes("shopify/order.json"), "good")
    await d.advance(seconds=1)
    [call] = (await get(d, "/failed-calls"))["calls"]
    assert call["source"] == "shop" and "KeyError" in call["error"]
    assert await post(d, "/failed-calls/replay", {"ids": [call["id"]]}) == {"queued": [call["id"]]}
    assert (await get(d, "/failed-calls"))["calls"] == []  # queued again, not yet run
    assert d.scalar("SELECT status FROM inbox WHERE id = :id", id=call["id"]) == "received"
    assert await d.advance(seconds=1) == 1  # normalised once more: the same body fails the same way
    assert [c["id"] for c in (await get(d, "/failed-calls"))["calls"]] == [call["id"]]
    assert await post(d, "/failed-calls/replay", {"all": True}) == {"queued": [call["id"]]}


async def test_lists_page_by_id(deploy: Factory, smtp: SmtpCatcher) -> None:
    d = await deploy(extra=TOKENS)
    order = fixture_json("shopify/order.json")
    for n in range(5):
        order.update(id=order["id"] + 1, name=f"#20{n}")
        await d.post_shopify("orders/create", json.dumps(order).encode(), f"o{n}")
    await d.advance(seconds=1)
    assert len(smtp.messages) == 5
    seen: list[int] = []
    after = 0
    while after is not None:
        page = await get(d, "/deliveries", limit=2, after=after)
        seen += [row["id"] for row in page["deliveries"]]
        after = page["next_after"]
    assert seen == sorted(seen) and len(seen) == len(set(seen)) == 5
    assert (await get(d, "/deliveries", status="failed"))["deliveries"] == []


@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    [
        ("GET", "/deliveries?limit=0", None, "limit"),
        ("GET", "/deliveries?limit=100000", None, "limit"),
        ("GET", "/deliveries?after=abc", None, "after"),
        ("GET", "/deliveries?contact_id=99999999999999999999999", None, "contact_id"),
        ("GET", "/deliveries?colour=red", None, "colour"),
        ("GET", "/contacts", None, "q"),
        ("GET", "/contacts/abc", None, "value"),
        ("GET", "/contacts/0/timeline", None, "value"),
        ("GET", "/contacts/2147483648/export", None, "value"),  # past the 32-bit INTEGER column
        ("GET", "/rules?since=yesterday", None, "since"),
        # Moments near the calendar's ends: converted to UTC, or 30 days taken off, they would overflow (a 500).
        ("GET", "/rules?until=0001-01-01T00:00:00Z", None, "until"),
        ("GET", "/rules/welcome?since=0001-01-01T00:00:00%2B14:00", None, "since"),
        ("GET", "/rules?until=9999-12-31T23:59:59-05:00", None, "until"),
        ("GET", "/rules/welcome?since=1969-12-31T23:59:59Z", None, "since"),
        ("POST", "/dead-letter/replay", b"", None),
        ("POST", "/dead-letter/replay", b"{not json", None),
        ("POST", "/dead-letter/replay", b"{}", None),
        ("POST", "/failed-calls/replay", b'{"ids": [], "all": false}', "ids"),
        ("POST", "/failed-calls/replay", b'{"ids": [1], "all": true}', None),
        ("POST", "/failed-calls/replay", b'{"ids": ["x"]}', "ids"),
    ],
)
async def test_bad_input_is_a_422_that_says_what(
    deploy: Factory, method: str, path: str, body: bytes | None, field: str | None
) -> None:
    d = await deploy(extra=TOKENS)
    response = await d.client.request(method, f"/api/v1{path}", data=body, headers=bearer(ADMIN))
    assert response.status == 422, await response.text()
    problem = await response.json()
    assert problem["error"] == "invalid request" and problem["detail"]
    if field is not None:
        assert field in [str(part) for error in problem["detail"] for part in error["loc"]]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("/contacts?q=shopify:Camille%20Durand%00", "q"),
        ("/contacts?q=camille.durand%00@example.org", "q"),
        ("/deliveries?rule=%00", "rule"),
        ("/deliveries?status=%00", "status"),
    ],
)
async def test_a_nul_in_a_text_filter_is_a_422_and_the_search_stays_out_of_the_log(
    deploy: Factory, capsys: pytest.CaptureFixture[str], query: str, field: str
) -> None:
    """SQLite would search for a NUL, PostgreSQL refuses it: on both, a 422 before any query, and no traceback
    quoting the search (a name, an address)."""
    logs.configure("info", redact=True, as_json=True)
    d = await deploy(extra=TOKENS)
    response = await d.client.get(f"/api/v1{query}", headers=bearer(READER))
    assert response.status == 422, await response.text()
    assert [part for error in (await response.json())["detail"] for part in error["loc"]] == [field]
    logged = capsys.readouterr().err
    assert "Camille Durand" not in logged and "camille.durand" not in logged
