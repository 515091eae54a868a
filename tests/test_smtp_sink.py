"""SMTP sink against a real aiosmtpd server: each reply class maps to one outcome."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import trustme
from pydantic import ValidationError

from declic_gateway import Message, Outcome, SendContext
from declic_gateway.config import load_config
from declic_gateway.kit.clock import FakeClock
from declic_gateway.kit.sources import Deployment
from declic_gateway.plugins import collect, get_plugin_manager
from declic_gateway.testing import SmtpCatcher, free_port, write_deployment
from declic_plugins.smtp import SmtpConfig, SmtpSink

CTX = SendContext(rule="r", step=1, kind="transactional", contact={"email": "to@example.org"}, event={})
MESSAGE = Message(
    to="to@example.org", text="plain body", subject="Hello", html="<p>html body</p>", idempotency_key="dcl-abc123"
)


def sink(port: int, **options: Any) -> SmtpSink:
    config = SmtpConfig.model_validate(
        {"host": "127.0.0.1", "port": port, "tls": "none", "sender": "Shop <shop@example.com>", "timeout": 2, **options}
    )
    return SmtpSink("email", config, Deployment(None, "UTC", FakeClock()))


@pytest.fixture
def server() -> Iterator[SmtpCatcher]:
    catcher = SmtpCatcher().start()
    yield catcher
    catcher.stop()


# (case, set-up of the server, expected outcome, text in the error)
REPLIES = [
    ("accepted", {}, Outcome.SENT, None),
    ("4xx at DATA", {"replies": ["451 4.3.0 local error"]}, Outcome.RETRY, "SMTP 451"),
    ("5xx at DATA", {"replies": ["554 5.7.1 rejected as spam"]}, Outcome.PERMANENT, "SMTP 554"),
    ("5xx at RCPT", {"refuse": {"to@example.org": "550 5.1.1 unknown user"}}, Outcome.ADDRESS_INVALID, "SMTP 550"),
    ("4xx at RCPT", {"refuse": {"to@example.org": "452 4.2.2 mailbox full"}}, Outcome.RETRY, "SMTP 452"),
]


@pytest.mark.parametrize(("case", "setup", "outcome", "error"), REPLIES, ids=[r[0] for r in REPLIES])
async def test_reply_classes(
    server: SmtpCatcher, case: str, setup: dict[str, Any], outcome: Outcome, error: str | None
) -> None:
    for key, value in setup.items():
        setattr(server, key, value)
    smtp = sink(server.port)
    result = await smtp.send(MESSAGE, CTX)
    await smtp.close()
    assert result.outcome is outcome
    assert (error or "") in (result.error or "")
    assert len(server.messages) == (1 if outcome is Outcome.SENT else 0)


async def test_multipart_with_message_id_date_and_envelope(server: SmtpCatcher) -> None:
    smtp = sink(server.port, return_path="bounces@example.com")
    result = await smtp.send(MESSAGE, CTX)
    await smtp.close()
    [mail] = server.messages
    assert result.provider_id == "<dcl-abc123@example.com>" == mail["Message-ID"]
    assert mail["From"] == "Shop <shop@example.com>" and mail["Subject"] == "Hello" and mail["Date"]
    assert mail.get_content_type() == "multipart/alternative"
    assert mail.get_body(("plain",)).get_content().strip() == "plain body"
    assert mail.get_body(("html",)).get_content().strip() == "<p>html body</p>"
    assert server.envelopes == [("bounces@example.com", ["to@example.org"])]


async def test_connections_are_reused(server: SmtpCatcher) -> None:
    smtp = sink(server.port, connections=2)
    results = await asyncio.gather(*(smtp.send(MESSAGE, CTX) for _ in range(10)))
    assert {r.outcome for r in results} == {Outcome.SENT}
    assert len(smtp._idle) <= 2
    await smtp.close()
    assert len(server.messages) == 10


async def test_connection_refused_is_retried() -> None:
    result = await sink(free_port()).send(MESSAGE, CTX)
    assert result.outcome is Outcome.RETRY and "SMTPConnectError" in (result.error or "")


async def test_a_server_that_never_answers_is_a_timeout_to_retry() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    try:
        result = await sink(listener.getsockname()[1], timeout=0.5).send(MESSAGE, CTX)
    finally:
        listener.close()
    assert result.outcome is Outcome.RETRY and "Timeout" in (result.error or "")


@pytest.fixture
def tls() -> tuple[trustme.CA, ssl.SSLContext]:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    return ca, server_context


async def test_starttls_sends_over_tls_to_a_server_our_ca_vouches_for(
    tls: tuple[trustme.CA, ssl.SSLContext], tmp_path: Path
) -> None:
    ca, server_context = tls
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    server = SmtpCatcher(tls_context=server_context).start()
    try:
        smtp = sink(server.port, tls="starttls", ca_file=str(tmp_path / "ca.pem"))
        result = await smtp.send(MESSAGE, CTX)
        await smtp.close()
    finally:
        server.stop()
    assert result.outcome is Outcome.SENT and len(server.messages) == 1


async def test_starttls_refuses_a_certificate_nobody_vouches_for(tls: tuple[trustme.CA, ssl.SSLContext]) -> None:
    server = SmtpCatcher(tls_context=tls[1]).start()
    try:
        result = await sink(server.port, tls="starttls").send(MESSAGE, CTX)
    finally:
        server.stop()
    assert result.outcome is Outcome.RETRY and "CERTIFICATE_VERIFY_FAILED" in (result.error or "")
    assert server.messages == []


async def test_starttls_is_required_never_a_silent_downgrade(server: SmtpCatcher) -> None:
    result = await sink(server.port, tls="starttls").send(MESSAGE, CTX)
    assert result.outcome is Outcome.RETRY and "STARTTLS" in (result.error or "")
    assert server.messages == []


def test_secrets_do_not_show_in_the_config_repr() -> None:
    config = SmtpConfig.model_validate({"sender": "a@example.com", "username": "u", "password": "hunter2"})
    assert "hunter2" not in repr(config) and "hunter2" not in str(config.model_dump())


async def test_dkim_signature_covers_the_unsubscribe_headers_and_verifies(server: SmtpCatcher) -> None:
    import dkim
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    ).decode()
    public = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    record = b"v=DKIM1; k=rsa; p=" + __import__("base64").b64encode(public)
    smtp = sink(server.port, dkim={"domain": "example.com", "selector": "s1", "private_key": pem})
    marketing = Message(
        to="to@example.org",
        text="hi",
        subject="Offer",
        idempotency_key="dcl-1",
        headers={
            "List-Unsubscribe": "<https://hooks.example.com/u/t>",
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        },
    )
    assert (await smtp.send(marketing, CTX)).outcome is Outcome.SENT
    await smtp.close()
    [mail] = server.messages
    raw = mail.as_bytes()
    signed = mail["DKIM-Signature"]
    assert "list-unsubscribe:list-unsubscribe-post" in signed.lower().replace(" ", "")
    assert dkim.verify(raw, dnsfunc=lambda name, timeout=5: record if name == b"s1._domainkey.example.com." else None)
    tampered = raw.replace(b"List-Unsubscribe-Post: List-Unsubscribe=One-Click", b"List-Unsubscribe-Post: x")
    assert not dkim.verify(tampered, dnsfunc=lambda name, timeout=5: record)


UNSUBSCRIBE = {
    "List-Unsubscribe": "<https://hooks.example.com/u/t>",
    "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
}


def parse(data: bytes) -> EmailMessage:
    """What a receiving client sees, after checking what every SMTP server accepts: 7-bit, CRLF, short lines."""
    assert data.isascii(), "8-bit data needs 8BITMIME, which is not negotiated"
    assert b"\r" not in data.replace(b"\r\n", b"") and b"\n" not in data.replace(b"\r\n", b""), "bare CR or LF"
    assert max(len(line) for line in data.split(b"\r\n")) <= 998, "a line over RFC 5322's limit"
    mail = message_from_bytes(data, policy=policy.default)
    assert isinstance(mail, EmailMessage) and not [p.defects for p in mail.walk() if p.defects]
    return mail


def decoded(mail: EmailMessage, subtype: str) -> str:
    part = mail.get_body((subtype,))
    assert part is not None and part.get_content_charset() == "utf-8"
    return str(part.get_content()).replace("\r\n", "\n")


async def test_the_built_message_decodes_to_what_was_rendered() -> None:
    smtp = sink(25, sender="Café Zoë <bonjour@example.com>", unsubscribe_mailto="unsubscribe@example.com")
    text = "Bonjour Zoë,\n\n10 % de réduction — jusqu'à dimanche.  \nÀ bientôt 🙂\n"
    html = '<p>Bonjour Zoë,</p>\n<p>10 % de réduction — <a href="https://shop.example.com/?a=1&b=2">voir</a></p>\n'
    message = Message(
        to="zoe@example.org",
        text=text,
        subject="Café Zoë — 10 % off",
        html=html,
        idempotency_key="dcl-42",
        headers=UNSUBSCRIBE,
    )
    mail = parse(smtp.build(message))
    [sender] = mail["From"].addresses
    assert (sender.display_name, sender.addr_spec) == ("Café Zoë", "bonjour@example.com")
    assert mail["To"] == "zoe@example.org" and mail["Subject"] == "Café Zoë — 10 % off"
    assert mail["Message-ID"] == "<dcl-42@example.com>"
    assert abs(mail["Date"].datetime - datetime.now(UTC)) < timedelta(minutes=1)
    assert (
        mail["List-Unsubscribe"]
        == "<https://hooks.example.com/u/t>, <mailto:unsubscribe@example.com?subject=unsubscribe>"
    )
    assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert [p.get_content_type() for p in mail.iter_parts()] == ["text/plain", "text/html"]
    assert decoded(mail, "plain") == text and decoded(mail, "html") == html


# (case, rendered body, what a client decodes)
BODIES = [
    ("short ASCII lines", "Hello\nworld\n", "Hello\nworld\n"),
    ("accents", "Café Zoë — 10 % off\n", "Café Zoë — 10 % off\n"),
    ("mostly Cyrillic", "Привет, мир! " * 200, "Привет, мир! " * 200 + "\n"),
    ("one 5,000-character ASCII line", "<p>" + "x" * 5000 + "</p>", "<p>" + "x" * 5000 + "</p>\n"),
    ("one 3,000-character accented line", "é" * 3000, "é" * 3000 + "\n"),
    ("trailing spaces and tabs", "a  \nb\t\n", "a  \nb\t\n"),
    ("CRLF and lone CR", "a\r\nb\rc", "a\nb\nc\n"),
    ("a lone dot and From at line starts", ".\nFrom here\n", ".\nFrom here\n"),
    ("= signs", 'href="https://x.example/?a=1&b=2" =3D\n', 'href="https://x.example/?a=1&b=2" =3D\n'),
]


@pytest.mark.parametrize(("case", "body", "expected"), BODIES, ids=[b[0] for b in BODIES])
@pytest.mark.parametrize("with_html", [False, True], ids=["text only", "text and HTML"])
def test_bodies_decode_exactly_from_a_wire_safe_encoding(case: str, body: str, expected: str, with_html: bool) -> None:
    message = Message(to="to@example.org", text=body, subject="s", html=body if with_html else None)
    mail = parse(sink(25).build(message))
    assert mail.get_content_type() == ("multipart/alternative" if with_html else "text/plain")
    assert decoded(mail, "plain") == expected
    if with_html:
        assert decoded(mail, "html") == expected


SUBJECTS = ["Hello", "", "Café Zoë — 10 % off", " ".join(["Привет"] * 60), "x" * 1500, "é" * 600]


@pytest.mark.parametrize("subject", SUBJECTS, ids=["ASCII", "empty", "accents", "long Cyrillic", "long word", "long é"])
def test_subjects_decode_exactly(subject: str) -> None:
    mail = parse(sink(25).build(Message(to="to@example.org", text="t", subject=subject)))
    assert mail["Subject"] == subject


# (case, fields of a message that would smuggle in a header)
INJECTIONS = [
    ("CRLF in the subject", {"subject": "Hello\r\nBcc: x@evil.example"}),
    ("LF in the subject", {"subject": "Hello\nBcc: x@evil.example"}),
    ("CRLF in the recipient", {"to": "to@example.org\r\nBcc: x@evil.example"}),
    ("CRLF in a header value", {"headers": {"List-Unsubscribe": "<https://x.example>\r\nBcc: x@evil.example"}}),
    ("CRLF in a header name", {"headers": {"X-Tag\r\nBcc": "x@evil.example"}}),
    ("a second Subject", {"headers": {"subject": "Other"}}),
]


@pytest.mark.parametrize(("case", "fields"), INJECTIONS, ids=[i[0] for i in INJECTIONS])
def test_a_message_that_would_inject_a_header_is_refused(case: str, fields: dict[str, Any]) -> None:
    message = Message(**{"to": "to@example.org", "text": "t", "subject": "s", **fields})
    with pytest.raises(ValueError):
        sink(25).build(message)


def test_a_message_without_an_idempotency_key_still_gets_a_unique_message_id() -> None:
    smtp = sink(25)
    ids = {parse(smtp.build(Message(to="to@example.org", text="t")))["Message-ID"] for _ in range(2)}
    assert len(ids) == 2 and all(i.startswith("<") and i.endswith("@example.com>") and len(i) > 15 for i in ids)


def test_a_relative_ca_file_is_read_from_the_config_files_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = "sinks:\n  email: {plugin: smtp, sender: a@example.com, ca_file: certs/ca.pem}\n"
    path = write_deployment(tmp_path, config, {})
    monkeypatch.chdir("/")
    pm = get_plugin_manager()

    _, email = load_config(path, collect(pm), pm).sink_plugins["email"]

    assert isinstance(email, SmtpConfig)
    assert email.ca_file == str(tmp_path / "certs" / "ca.pem")


# (case, recipient, does the server offer SMTPUTF8, expected outcome, envelope recipient and parsed To if sent)
RECIPIENTS = [
    ("IDN domain", "info@münchen.example", False, Outcome.SENT, "info@xn--mnchen-3ya.example"),
    ("IDN domain, SMTPUTF8 offered", "info@münchen.example", True, Outcome.SENT, "info@xn--mnchen-3ya.example"),
    (
        "non-ASCII local part, SMTPUTF8 offered",
        "jörg@münchen.example",
        True,
        Outcome.SENT,
        "jörg@xn--mnchen-3ya.example",
    ),
    ("non-ASCII local part, no SMTPUTF8", "jörg@example.org", False, Outcome.PERMANENT, None),
    ("CR/LF", "to@example.org\r\nBcc: x@evil.example", True, Outcome.ADDRESS_INVALID, None),
    ("LF", "to@example.org\nBcc: x@evil.example", True, Outcome.ADDRESS_INVALID, None),
    ("no @", "to.example.org", True, Outcome.ADDRESS_INVALID, None),
    ("display name", "Zoë <to@example.org>", True, Outcome.ADDRESS_INVALID, None),
    ("special-use domain", "to@printer.local", True, Outcome.ADDRESS_INVALID, None),
    ("empty", "", True, Outcome.ADDRESS_INVALID, None),
]


@pytest.mark.parametrize(("case", "to", "smtputf8", "outcome", "sent_to"), RECIPIENTS, ids=[r[0] for r in RECIPIENTS])
async def test_recipients(case: str, to: str, smtputf8: bool, outcome: Outcome, sent_to: str | None) -> None:
    server = SmtpCatcher(smtputf8=smtputf8).start()
    try:
        smtp = sink(server.port)
        result = await smtp.send(Message(to=to, text="t", subject="s", idempotency_key="dcl-1"), CTX)
        await smtp.close()
    finally:
        server.stop()
    assert result.outcome is outcome, result.error
    if sent_to is None:
        local_part = to.partition("@")[0]
        assert server.messages == [] and not (local_part and local_part in (result.error or "")), "results are logged"
        return
    assert server.envelopes == [("shop@example.com", [sent_to])]
    [mail] = server.messages
    assert [a.addr_spec for a in mail["To"].addresses] == [sent_to]


async def test_without_smtputf8_the_failure_says_why_and_the_connection_stays_usable(server: SmtpCatcher) -> None:
    smtp = sink(server.port, connections=1)
    refused = await smtp.send(Message(to="jörg@example.org", text="t"), CTX)
    sent = await smtp.send(MESSAGE, CTX)
    await smtp.close()
    assert refused.outcome is Outcome.PERMANENT and "SMTPUTF8" in (refused.error or "")
    assert sent.outcome is Outcome.SENT and len(server.messages) == 1


def test_an_address_header_never_holds_an_encoded_word() -> None:
    data = sink(25).build(Message(to="jörg@example.org", text="t"))
    assert b"\r\nTo: j\xc3\xb6rg@example.org\r\n" in data and b"=?" not in data


# (case, configured sender, display name and address a client reads in From)
SENDERS = [
    ("plain", "Boutique <shop@example.com>", "Boutique", "shop@example.com"),
    ("bare address", "shop@example.com", "", "shop@example.com"),
    ("ASCII name with specials", "Shop @ Home <shop@example.com>", "Shop @ Home", "shop@example.com"),
    ("comma and dot", "Martin, Fils & Cie. <shop@example.com>", "Martin, Fils & Cie.", "shop@example.com"),
    ("already quoted", '"Shop @ Home" <shop@example.com>', "Shop @ Home", "shop@example.com"),
    ("quotes inside", r'"Le \"Petit\" Shop" <shop@example.com>', 'Le "Petit" Shop', "shop@example.com"),
    ("non-ASCII name", "Café Zoë <bonjour@example.com>", "Café Zoë", "bonjour@example.com"),
    ("non-ASCII name with specials", "Café @ Zoë <bonjour@example.com>", "Café @ Zoë", "bonjour@example.com"),
    ("IDN domain", "Café <bonjour@münchen.example>", "Café", "bonjour@xn--mnchen-3ya.example"),
    ("bare IDN address", "bonjour@münchen.example", "", "bonjour@xn--mnchen-3ya.example"),
]


@pytest.mark.parametrize(("case", "sender", "name", "address"), SENDERS, ids=[s[0] for s in SENDERS])
def test_from_reads_back_as_configured(case: str, sender: str, name: str, address: str) -> None:
    mail = parse(sink(25, sender=sender).build(MESSAGE))
    [author] = mail["From"].addresses
    assert (author.display_name, author.addr_spec) == (name, address)
    assert mail["Message-ID"] == f"<dcl-abc123@{address.partition('@')[2]}>"


async def test_an_idn_sender_goes_out_in_ascii_form_in_the_envelope_too(server: SmtpCatcher) -> None:
    smtp = sink(server.port, sender="Café <bonjour@münchen.example>")
    result = await smtp.send(MESSAGE, CTX)
    await smtp.close()
    assert result.outcome is Outcome.SENT and result.provider_id == "<dcl-abc123@xn--mnchen-3ya.example>"
    assert server.envelopes == [("bonjour@xn--mnchen-3ya.example", ["to@example.org"])]


# (case, option, value, text in the config error)
BAD_OWN_ADDRESSES = [
    ("no address", "sender", "Boutique", "not an e-mail address"),
    ("no address in brackets", "sender", "Boutique <>", "not an e-mail address"),
    ("special-use domain", "sender", "Boutique <shop@printer.local>", "not an e-mail address"),
    ("bad IDN domain", "sender", "shop@münchen..example", "not an e-mail address"),
    ("non-ASCII local part", "sender", "Zoë <zoë@example.com>", "local part must be ASCII"),
    ("CR/LF in the name", "sender", "Shop\r\nBcc: x@evil.example <shop@example.com>", "control characters"),
    ("a name too long for a header line", "sender", "x" * 1000 + " <shop@example.com>", "too long"),
    ("bad return path", "return_path", "bounces", "not an e-mail address"),
    ("bad unsubscribe mailbox", "unsubscribe_mailto", "unsubscribe@", "not an e-mail address"),
]


@pytest.mark.parametrize(("case", "option", "value", "error"), BAD_OWN_ADDRESSES, ids=[b[0] for b in BAD_OWN_ADDRESSES])
def test_own_addresses_are_checked_when_the_config_loads(case: str, option: str, value: str, error: str) -> None:
    options = {"sender": "shop@example.com", option: value}
    with pytest.raises(ValidationError, match=error):
        SmtpConfig.model_validate(options)


async def test_a_message_that_cannot_be_built_fails_for_good_rather_than_raise(server: SmtpCatcher) -> None:
    message = Message(to="to@example.org", text="t", subject="Hello\r\nBcc: x@evil.example")
    result = await sink(server.port).send(message, CTX)
    assert result.outcome is Outcome.PERMANENT and "CR or LF" in (result.error or "")
    assert server.messages == []
