"""Logs: JSON off a terminal, context on every line, personal data and secrets redacted."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp.test_utils import TestServer
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import BASE_CONFIG, DEFAULT_RULES, SECRET, TEMPLATES, Factory, fixture_bytes, until
from declic_gateway.cli import logs
from declic_gateway.http.accesslog import AccessLogger
from declic_gateway.http.app import create_app, load
from declic_gateway.http.running import GATEWAY_KEY
from declic_gateway.send import links
from declic_gateway.testing import SmtpCatcher, write_deployment


@pytest.fixture
def json_logs(capsys: pytest.CaptureFixture[str]) -> Any:
    logs.configure("info", redact=True, as_json=True)

    def lines() -> list[dict[str, Any]]:
        return [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]

    yield lines
    logs.reset()


def test_emails_phones_and_secrets_are_redacted(json_logs: Any) -> None:
    structlog.get_logger().info(
        "sent to ada@example.com",
        phone="+33 6 12 34 56 78",
        api_token="s3cr3t",
        host="127.0.0.1",
        order=7001002003,
        to="ada@example.com",
    )
    [line] = json_logs()
    text = json.dumps(line)
    assert "ada@example.com" not in text and "12 34 56" not in text and "s3cr3t" not in text
    assert line["api_token"] == "***"
    assert line["event"].startswith("sent to <email:") and line["phone"].startswith("<phone:")
    assert line["host"] == "127.0.0.1" and line["order"] == 7001002003
    assert line["to"] == line["event"].removeprefix("sent to "), "one address, one tag, for correlation"


def test_redaction_can_be_turned_off(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("info", redact=False, as_json=True)
    try:
        structlog.get_logger().info("x", to="ada@example.com")
        assert json.loads(capsys.readouterr().err)["to"] == "ada@example.com"
    finally:
        logs.reset()


async def test_each_line_of_the_flow_carries_event_source_rule_and_sink(
    deploy: Factory, smtp: SmtpCatcher, json_logs: Any
) -> None:
    logs.configure("debug", redact=True, as_json=True)  # an enrolment and a send that went through: at debug
    d = await deploy()
    await d.post_shopify("orders/create", fixture_bytes("shopify/order.json"))
    await d.advance(seconds=1)
    lines = json_logs()
    [sent] = [line for line in lines if line["event"] == "step sent"]
    assert {k: sent[k] for k in ("event_id", "rule", "sink", "step")} == {
        "event_id": "1.0",
        "rule": "order-confirmation",
        "sink": "email",
        "step": 1,
    }
    [enrolled] = [line for line in lines if line["event"] == "enrolled"]
    assert enrolled["source"] == "shop" and enrolled["event_id"] == "1.0"
    assert "camille" not in json.dumps(lines)


async def test_at_info_a_mail_that_goes_through_logs_no_line_and_a_refused_one_logs_its_outcome(
    deploy: Factory, smtp: SmtpCatcher, json_logs: Any
) -> None:
    """The journal, the deliveries table and /metrics keep every enrolment and send: at info the log is what
    needs the operator's eye, not two lines per e-mail (docs/performance.md, session 20)."""
    smtp.refuse["noah.martin@example.org"] = "550 5.1.1 no such user"
    d = await deploy()
    await d.post_shopify("orders/create", fixture_bytes("shopify/order.json"))
    await d.post_shopify(
        "orders/create",
        fixture_bytes("shopify/order.json")
        .replace(b"7001002003", b"7001002004")
        .replace(b"camille.durand@example.org", b"noah.martin@example.org")
        .replace(b"5550001", b"5550002")
        .replace(b"+33612345678", b"+33698765432"),
    )
    await d.advance(seconds=1)
    assert sorted(m["To"] for m in smtp.messages) == ["camille.durand@example.org"]
    lines = json_logs()
    assert not [line for line in lines if line["event"] in ("enrolled", "step sent")]
    [refused] = [line for line in lines if line["event"].startswith("step ")]
    assert refused["event"] == "step address_invalid" and refused["level"] == "info"
    assert refused["rule"] == "order-confirmation" and refused["sink"] == "email" and "550 5.1.1" in refused["error"]


def test_message_ids_are_not_mistaken_for_addresses(json_logs: Any) -> None:
    structlog.get_logger().info("step sent", provider_id="<dcl-0123abcd@example.com>", to="ada@example.com")
    [line] = json_logs()
    assert line["provider_id"] == "<dcl-0123abcd@example.com>" and line["to"].startswith("<email:")


PERSONAL = [
    pytest.param("jürgen@münchen.example", "email", id="email-latin"),
    pytest.param("δοκιμή@παράδειγμα.δοκιμή", "email", id="email-greek"),
    pytest.param("संपर्क@डाटामेल.भारत", "email", id="email-devanagari"),
    pytest.param("例え@例え。テスト", "email", id="email-ideographic-dot"),
    pytest.param("e\u0301lodie@exa\u0301mple.fr", "email", id="email-combining-accents"),
    pytest.param("ada@example.xn--p1ai", "email", id="email-punycode-tld"),
    pytest.param("06 12 34 56 78", "phone", id="phone-fr-spaces"),
    pytest.param("06.12.34.56.78", "phone", id="phone-fr-dots"),
    pytest.param("0612345678", "phone", id="phone-fr-digits"),
    pytest.param("06\u00a012\u00a034\u00a056\u00a078", "phone", id="phone-fr-nbsp"),
    pytest.param("020 7946 0958", "phone", id="phone-uk"),
    pytest.param("(415) 555-0132", "phone", id="phone-us-parens"),
    pytest.param("415-555-0132", "phone", id="phone-us-dashes"),
    pytest.param("0033 6 12 34 56 78", "phone", id="phone-international-00"),
]


@pytest.mark.parametrize(("value", "kind"), PERSONAL)
@pytest.mark.parametrize("template", ["{}", "écrit à {}, puis relancé", "sent to {}.", "to={};"])
def test_addresses_and_numbers_are_redacted_as_written(json_logs: Any, value: str, kind: str, template: str) -> None:
    structlog.get_logger().info(template.format(value), contact=value)
    [line] = json_logs()
    before, after = template.split("{}")
    assert re.fullmatch(re.escape(before) + f"<{kind}:[0-9a-f]{{8}}>" + re.escape(after), line["event"])
    assert re.fullmatch(f"<{kind}:[0-9a-f]{{8}}>", line["contact"])


@pytest.mark.parametrize("number", ["+33 6 12 34 56 78", "+1 (415) 555-0132", "+33.6.12.34.56.78"])
def test_an_international_number_ending_a_sentence_is_redacted(json_logs: Any, number: str) -> None:
    structlog.get_logger().info(f"SMS sent to {number}.")
    assert re.fullmatch(r"SMS sent to <phone:[0-9a-f]{8}>\.", json_logs()[0]["event"])


@pytest.mark.parametrize(
    "text",
    [
        "order 7001002003 paid",
        "row 12345 of 67890",
        "took 0.0123s",
        "2026-05-01T10:00:00+02:00",
        "listening on 10.0.0.1:5432",
        "version 0.12.3",
        "event 1700000000.5",
        "job 0612a3b4-9c1d",
    ],
)
def test_ids_times_and_addresses_of_machines_stay_readable_beside_a_number(json_logs: Any, text: str) -> None:
    structlog.get_logger().info(f"{text}, call 06 12 34 56 78")
    assert re.fullmatch(re.escape(text) + ", call <phone:[0-9a-f]{8}>", json_logs()[0]["event"])


def test_credentials_written_in_text_are_masked(json_logs: Any) -> None:
    structlog.get_logger().info("GET /x?token=abc123 Authorization: Bearer eyJhbGciOi.x-y_z, Basic dXNlcjpwYXNz")
    structlog.get_logger().info("Bearer token missing: basic auth refused, token expired")
    [masked, words] = json_logs()
    assert masked["event"] == "GET /x?token=*** Authorization: Bearer ***, Basic ***"
    assert words["event"] == "Bearer token missing: basic auth refused, token expired"


#: Pieces that make up log texts where a pattern may start or stop matching, non-ASCII digits and spaces included.
_PIECES = st.sampled_from(
    [
        "Bearer ",
        "basic\u00a0",
        "token=",
        "api_key=",
        "a",
        "Z",
        "é",
        "@",
        ".",
        "-",
        "+",
        "(",
        ")",
        " ",
        "0",
        "6",
        "1",
        "33",
        "415",
        "\u0666",
        "\u3000",
        "\u202f",
        "\n",
        "=",
        "/",
        "x.example",
        "münchen",
        "ü",
        "%",
        "_",
    ]
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_PIECES, max_size=24).map("".join))
def test_redaction_skips_no_text_a_pattern_would_change(text: str) -> None:
    """The cheap checks that let most values through unsearched never let through what a pattern masks."""
    every = logs._CREDENTIAL.sub(lambda m: f"{m.group(1) or m.group(3)}{m.group(2) or m.group(4)}***", text)
    every = logs._EMAIL.sub(lambda m: logs._tag("email", m.group()), every)
    every = logs._PHONE.sub(lambda m: logs._tag("phone", m.group()), every)
    assert logs.redact_text(text) == every


def test_a_field_named_like_structlogs_own_is_redacted_inside_a_value(json_logs: Any) -> None:
    """Only the line's own time and level skip redaction, not a payload's keys of the same name."""
    structlog.get_logger().info("call", payload={"timestamp": "ada@example.com", "level": "+33 6 12 34 56 78"})
    payload = json_logs()[0]["payload"]
    assert re.fullmatch("<email:[0-9a-f]{8}>", payload["timestamp"])
    assert re.fullmatch("<phone:[0-9a-f]{8}>", payload["level"])


def test_library_errors_come_out_as_one_redacted_json_line(json_logs: Any, capsys: pytest.CaptureFixture[str]) -> None:
    secret = "s3cr3t-T0KEN"  # a local of the failing frame: it must not be shown
    try:
        raise ValueError(f"no contact jürgen@münchen.example (Bearer {secret})")
    except ValueError:
        logging.getLogger("aiohttp.server").exception("Error handling request from %s", "127.0.0.1")
    [line] = json_logs()
    assert (line["logger"], line["level"], line["event"]) == (
        "aiohttp.server",
        "error",
        "Error handling request from 127.0.0.1",
    )
    [error] = line["exception"]
    assert error["exc_type"] == "ValueError" and error["exc_value"].startswith("no contact <email:")
    assert "locals" not in error["frames"][-1]
    assert "s3cr3t" not in json.dumps(line) and "münchen" not in json.dumps(line, ensure_ascii=False)
    assert capsys.readouterr().err == ""


def test_library_info_lines_stay_out(json_logs: Any) -> None:
    logging.getLogger("alembic.runtime.migration").info("Context impl SQLiteImpl.")
    logging.getLogger("asyncio").warning("Executing took 0.2 seconds")
    assert [line["event"] for line in json_logs()] == ["Executing took 0.2 seconds"]


async def test_a_token_in_a_path_no_route_matches_stays_out_of_the_access_log(
    aiohttp_client: Any, tmp_path: Path, smtp: SmtpCatcher, json_logs: Any
) -> None:
    """`/u/TOKEN/` (a slash added to the link) matches no route, and the token still unsubscribes whoever POSTs
    it; a source's URL token under a misspelt prefix is a credential too. A path no route matches is logged by
    its first segment only."""
    config = BASE_CONFIG.format(
        db_url=f"sqlite:///{tmp_path}/d.db",
        secret=SECRET,
        smtp_port=smtp.port,
        rules=DEFAULT_RULES,
        max_attempts=3,
        worker="",
    )
    settings, pm, _ = load(str(write_deployment(tmp_path, config, TEMPLATES)))
    app = create_app(settings, pm=pm, role="web")
    server = TestServer(app)
    await server.start_server(access_log_class=AccessLogger)  # as `declic serve` does
    client = await aiohttp_client(server)
    token = links.make_token(await app[GATEWAY_KEY].link_secret(), 1, "email")
    for path in (f"/u/{token}", f"/u/{token}/", f"/hook/shop/{token}", "/wp-login.php"):
        await client.get(path)
    requests: list[dict[str, Any]] = []

    def logged() -> bool:
        requests.extend(line for line in json_logs() if line["event"] == "request")
        return len(requests) == 4

    await until(logged)
    assert [(line["path"], line["status"]) for line in requests] == [
        ("/u/***", 200),
        ("/u/***", 404),
        ("/hook/***", 404),
        ("/wp-login.php", 404),
    ]
    assert token not in json.dumps(requests)
