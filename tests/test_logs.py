"""Logs: JSON off a terminal, context on every line, personal data and secrets redacted."""

from __future__ import annotations

import json
from typing import Any

import pytest
import structlog

from conftest import Factory, fixture_bytes
from gateway.cli import logs
from gateway.testing import SmtpCatcher


@pytest.fixture
def json_logs(capsys: pytest.CaptureFixture[str]) -> Any:
    logs.configure("info", redact=True, as_json=True)

    def lines() -> list[dict[str, Any]]:
        return [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]

    yield lines
    structlog.reset_defaults()


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
        structlog.reset_defaults()


async def test_each_line_of_the_flow_carries_event_source_rule_and_sink(
    deploy: Factory, smtp: SmtpCatcher, json_logs: Any
) -> None:
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


def test_message_ids_are_not_mistaken_for_addresses(json_logs: Any) -> None:
    structlog.get_logger().info("step sent", provider_id="<dcl-0123abcd@example.com>", to="ada@example.com")
    [line] = json_logs()
    assert line["provider_id"] == "<dcl-0123abcd@example.com>" and line["to"].startswith("<email:")
