"""E-mail over SMTP (aiosmtplib): multipart text + HTML, pooled connections, classified failures."""

from __future__ import annotations

import asyncio
import base64
import binascii
import email
import email.policy
import json
import re
import secrets
import ssl
from collections.abc import Callable
from datetime import UTC, datetime
from email.header import Header
from email.utils import format_datetime, formataddr
from typing import Any, Literal

import aiosmtplib
import dkim
from pydantic import Field, SecretStr, field_validator

from declic_gateway import (
    DELIVERY_METADATA,
    ConfigPath,
    DeliveryResult,
    EmailAddress,
    EmailSinkConfig,
    InvalidAddress,
    Message,
    PluginConfig,
    SendContext,
    Sink,
    hookimpl,
    parse_email,
)

DEFAULT_PORTS = {"implicit": 465, "starttls": 587, "none": 25}


class DkimConfig(PluginConfig):
    domain: str = Field(description="The signing domain (d=), usually the From address's domain.")
    selector: str = Field(description="The selector (s=): the key is published at SELECTOR._domainkey.DOMAIN.")
    private_key: SecretStr = Field(description="The RSA private key, PEM (from a file: ${DKIM_KEY} or a path).")


#: Signed headers: what receivers show and what RFC 8058 requires to be covered.
DKIM_HEADERS = (
    b"From",
    b"To",
    b"Subject",
    b"Date",
    b"Message-ID",
    b"MIME-Version",
    b"Content-Type",
    b"List-Unsubscribe",
    b"List-Unsubscribe-Post",
)

#: Set by build; a duplicate in `Message.headers` would make the message ambiguous.
OWN_HEADERS = frozenset(
    ("from", "to", "subject", "date", "message-id", "mime-version", "content-type", "content-transfer-encoding")
)
HEADER_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322 ftext: printable ASCII but ":"
#: `Name <address>` as an operator writes it in the config, the name quoted or not.
NAME_ADDR = re.compile(r"(?P<name>.*?)\s*<(?P<address>[^<>]*)>", re.S)
#: RFC 6531: the envelope and the headers carry UTF-8; the body stays 7-bit, the headers do not.
SMTPUTF8_OPTIONS = ("SMTPUTF8", "BODY=8BITMIME")
NO_SMTPUTF8 = "the recipient's local part is not ASCII and the SMTP server does not offer SMTPUTF8"


class SmtpConfig(EmailSinkConfig):
    host: str = Field("localhost", description="SMTP server host name.")
    port: int | None = Field(None, description="Default: 587 for starttls, 465 for implicit, 25 for none.")
    tls: Literal["starttls", "implicit", "none"] = Field(
        "starttls", description="starttls is required when set: a server without it fails, never downgrades."
    )
    username: str | None = Field(None, description="Log in with this user (after TLS).")
    password: SecretStr | None = Field(None, description="Password for `username`.")
    sender: str = Field(
        description='From header, e.g. "Boutique <bonjour@example.com>"; an IDN domain is sent in its ASCII form.'
    )
    return_path: str | None = Field(None, description="Envelope sender (bounce mailbox). Default: the From address.")
    unsubscribe_mailto: str | None = Field(
        None, description="Also offer unsubscribing by e-mail to this address (List-Unsubscribe mailto)."
    )
    connections: int = Field(4, ge=1, le=64, description="Connections kept open and reused.")
    validate_certs: bool = Field(True, description="Check the server's certificate; leave on in production.")
    ca_file: ConfigPath | None = Field(
        None, description="PEM file of the CA that signs the server's certificate (relative: to the config file)."
    )
    local_hostname: str = Field("declic.localdomain", description="Name sent in EHLO (saves a DNS lookup).")
    dkim: DkimConfig | None = Field(None, description="Sign each message with DKIM (covering List-Unsubscribe).")
    mandrill: bool = Field(
        False,
        description="The server is Mandrill's SMTP relay: each message carries X-MC-Metadata naming its delivery, "
        "which Mandrill echoes in its webhook events, so that their opens, clicks and bounces find it.",
    )

    @field_validator("sender")
    @classmethod
    def _sender(cls, value: str) -> str:
        _from_header(value)  # what the sink will write, so that a sender it cannot write fails at start-up
        return value

    @field_validator("return_path", "unsubscribe_mailto")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None:
            _own_address(value)
        return value


class SmtpSink(Sink):
    name = "smtp"
    channel = "email"
    Config = SmtpConfig

    def __init__(self, key: str, config: SmtpConfig, deployment: Any):
        super().__init__(key, config, deployment)
        self._from_header, sender = _from_header(config.sender)
        self._envelope_sender = str(_own_address(config.return_path) if config.return_path else sender)
        self._domain = sender.domain
        self._unsubscribe_mailto = str(_own_address(config.unsubscribe_mailto)) if config.unsubscribe_mailto else None
        self._idle: list[aiosmtplib.SMTP] = []
        self._slots = asyncio.Semaphore(config.connections)

    def address(self, contact: dict[str, Any]) -> str | None:
        return contact.get("email") or None

    def build(self, message: Message) -> bytes:
        """Serialise once; the same bytes go to every attempt, with a Message-ID stable across them.

        Raises ValueError (InvalidAddress for the recipient) for what no attempt could send.
        """
        return self._build(message, parse_email(message.to))

    def preview(self, message: Message) -> str:
        """The headers exactly as built (and signed) for sending, then each part decoded, so it can be read."""
        data = self.build(message)
        head, _, _ = data.partition(b"\r\n\r\n")
        parsed = email.message_from_bytes(data, policy=email.policy.default)
        parts = [part for part in parsed.walk() if part.get_content_maintype() == "text"]
        shown = [head.decode().replace("\r\n", "\n"), ""]
        for part in parts:
            text = part.get_content().replace("\r\n", "\n").rstrip("\n")
            shown += [f"----- {part.get_content_type()} -----", text, ""]
        return "\n".join(shown)

    def _build(self, message: Message, to: EmailAddress) -> bytes:
        """Writes the bytes itself rather than through EmailMessage, whose header registry made building
        13-18% of the CPU when sending: the structure is fixed, only headers and bodies need encoding."""
        headers = dict(message.headers)
        if "List-Unsubscribe" in headers and self._unsubscribe_mailto:
            headers["List-Unsubscribe"] += f", <mailto:{self._unsubscribe_mailto}?subject=unsubscribe>"
        if self.config.mandrill and message.idempotency_key:
            headers["X-MC-Metadata"] = json.dumps({DELIVERY_METADATA: message.idempotency_key})
        lines = [
            self._from_header,
            f"To: {to}\r\n",  # validated: no CR/LF; UTF-8 only under SMTPUTF8, never an encoded-word
            _header("Subject", message.subject or ""),
            _header("Date", format_datetime(datetime.now(UTC))),
            _header("Message-ID", f"<{message.idempotency_key or secrets.token_hex(16)}@{self._domain}>"),
        ]
        for name, value in headers.items():
            if not HEADER_NAME.fullmatch(name) or name.lower() in OWN_HEADERS:
                raise ValueError(f"header name not allowed: {name!r}")
            lines.append(_header(name, value))
        lines.append("MIME-Version: 1.0\r\n")
        head = "".join(lines).encode()
        if not message.html:
            return self._sign(head + _part("plain", message.text))
        boundary = f"=_{secrets.token_hex(16)}"  # random, and "=_" never occurs in quoted-printable or base64
        return self._sign(
            head
            + f'Content-Type: multipart/alternative; boundary="{boundary}"\r\n\r\n--{boundary}\r\n'.encode()
            + _part("plain", message.text)
            + f"\r\n--{boundary}\r\n".encode()
            + _part("html", message.html)
            + f"\r\n--{boundary}--\r\n".encode()
        )

    def _sign(self, data: bytes) -> bytes:
        return self._dkim_sign(data) if self.config.dkim else data

    def _dkim_sign(self, data: bytes) -> bytes:
        dkim_config = self.config.dkim
        assert dkim_config is not None
        head = data[: data.index(b"\r\n\r\n") + 2]
        present = [h for h in DKIM_HEADERS if re.search(rb"^" + h + rb":", head, re.M | re.I)]
        signature = dkim.sign(
            data,
            dkim_config.selector.encode(),
            dkim_config.domain.encode(),
            dkim_config.private_key.get_secret_value().encode(),
            include_headers=present,
        )
        return signature + data

    async def send(self, message: Message, ctx: SendContext) -> DeliveryResult:
        try:
            to = parse_email(message.to)
        except InvalidAddress:
            # No retry can fix it. The reason stays out of the result: it may quote the address, and results are logged.
            return DeliveryResult.address_invalid("the recipient is not a valid e-mail address")
        try:
            data = self._build(message, to)
        except ValueError as exc:  # e.g. a CR/LF in a header: the same on every attempt
            return DeliveryResult.permanent(f"cannot build the message: {exc}")
        options = SMTPUTF8_OPTIONS if to.needs_smtputf8 else ()
        async with self._slots:
            try:
                client = await self._acquire()
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                return _classify(exc)
            try:
                await client.sendmail(self._envelope_sender, [str(to)], data, mail_options=options)
            except aiosmtplib.SMTPNotSupported:
                # sendmail raises it only for SMTPUTF8, before MAIL FROM: the connection is still clean.
                self._idle.append(client)
                return DeliveryResult.permanent(NO_SMTPUTF8)
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                client.close()
                return _classify(exc)
            self._idle.append(client)
        return DeliveryResult.sent(f"<{message.idempotency_key}@{self._domain}>")

    async def _acquire(self) -> aiosmtplib.SMTP:
        while self._idle:
            client = self._idle.pop()
            if client.is_connected:
                return client
        cfg = self.config
        client = aiosmtplib.SMTP(
            hostname=cfg.host,
            port=cfg.port or DEFAULT_PORTS[cfg.tls],
            timeout=cfg.timeout,
            use_tls=cfg.tls == "implicit",
            start_tls=cfg.tls == "starttls",  # required, never "if offered"
            validate_certs=cfg.validate_certs,
            local_hostname=cfg.local_hostname,
            tls_context=_tls_context(cfg),
        )
        await client.connect()
        if cfg.username:
            await client.login(cfg.username, cfg.password.get_secret_value() if cfg.password else "")
        return client

    async def close(self) -> None:
        while self._idle:
            client = self._idle.pop()
            try:
                await client.quit()
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                client.close()


def _header(name: str, value: str) -> str:
    """One unstructured header line, CRLF-terminated; non-ASCII or over-long values become RFC 2047 encoded-words.

    Not for address headers: an encoded-word may not hold an address (RFC 2047 section 5).
    """
    if "\r" in value or "\n" in value:
        raise ValueError(f"{name}: header values may not contain CR or LF")
    if value.isascii() and len(name) + len(value) <= 996:
        return f"{name}: {value}\r\n"
    words = Header(value, "utf-8", header_name=name).encode(linesep="\r\n")
    return f"{name}: {words}\r\n"


def _from_header(sender: str) -> tuple[str, EmailAddress]:
    """The From line for the configured sender, and its address; ValueError when it cannot be written."""
    match = NAME_ADDR.fullmatch(sender.strip())
    name, address = (_unquote(match["name"]), match["address"]) if match else ("", sender)
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ValueError("the sender's name may not contain control characters")
    parsed = _own_address(address.strip())
    line = f"From: {_mailbox(name, parsed)}\r\n"
    if max(map(len, line.split("\r\n"))) > 998:
        raise ValueError("the sender's name is too long for one header line (RFC 5322: 998 characters)")
    return line, parsed


def _unquote(name: str) -> str:
    """A display name as the operator wrote it, with the quotes they may have put around it taken off."""
    name = name.strip()
    if len(name) >= 2 and name[0] == name[-1] == '"':
        return re.sub(r"\\(.)", r"\1", name[1:-1])
    return name


def _mailbox(name: str, address: EmailAddress) -> str:
    """RFC 5322 name-addr. An ASCII name is quoted when it holds specials (else `Shop @ Home <a@example.com>`
    reads as the address Shop@Home); a non-ASCII one becomes RFC 2047 encoded-words; the address never does."""
    if not name:
        return str(address)
    if name.isascii():
        return formataddr((name, str(address)))
    words = Header(name, "utf-8", header_name="From").encode(linesep="\r\n")
    return f"{words} <{address}>"


def _own_address(text: str) -> EmailAddress:
    """A sender, bounce or unsubscribe mailbox. It goes on every message, so its local part must be ASCII, which
    every server takes; an IDN domain is fine, sent in its ASCII form."""
    try:
        address = parse_email(text)
    except InvalidAddress as exc:
        raise ValueError(f"not an e-mail address: {text!r} ({exc})") from None
    if address.needs_smtputf8:
        raise ValueError("the local part must be ASCII: servers without SMTPUTF8 would refuse every message")
    return address


def _part(subtype: str, text: str) -> bytes:
    """A UTF-8 text/SUBTYPE entity: 7bit when ASCII with short lines, else quoted-printable or base64, the shorter."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.endswith("\n"):
        text += "\n"
    data = text.replace("\n", "\r\n").encode()  # canonical form: CRLF line breaks
    if data.isascii() and max(map(len, text.split("\n"))) <= 78:
        encoding, body = "7bit", data
    else:
        encoding, body = "quoted-printable", binascii.b2a_qp(data)
        if len(body) > len(data) * 4 // 3:
            encoding, body = "base64", base64.encodebytes(data).replace(b"\n", b"\r\n")
    return (
        f'Content-Type: text/{subtype}; charset="utf-8"\r\nContent-Transfer-Encoding: {encoding}\r\n\r\n'.encode()
        + body
    )


def _tls_context(cfg: SmtpConfig) -> ssl.SSLContext | None:
    if cfg.tls == "none":
        return None
    context = ssl.create_default_context(cafile=cfg.ca_file)
    if not cfg.validate_certs:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _classify(exc: BaseException) -> DeliveryResult:
    """4xx and network trouble: retry. A refused recipient: address invalid. Other 5xx: permanent."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused) and exc.recipients:
        exc = exc.recipients[0]
    if isinstance(exc, aiosmtplib.SMTPResponseException) and not isinstance(exc, aiosmtplib.SMTPServerDisconnected):
        text = f"SMTP {exc.code} {exc.message}".strip()
        if 500 <= exc.code < 600:
            if isinstance(exc, aiosmtplib.SMTPRecipientRefused):
                return DeliveryResult.address_invalid(text)
            return DeliveryResult.permanent(text)
        return DeliveryResult.retry(text)
    return DeliveryResult.retry(f"{type(exc).__name__}: {exc}")


@hookimpl
def register_sinks(register: Callable[[type[Sink]], None]) -> None:
    register(SmtpSink)
