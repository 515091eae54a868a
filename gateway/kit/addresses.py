"""E-mail addresses: checked with email-validator, in the form that goes on the wire."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import email_validator
import phonenumbers

from ..errors import InvalidAddress


@dataclass(frozen=True, slots=True)
class EmailAddress:
    """A valid address: the local part as given (NFC), the domain in its ASCII (IDNA) form, as SMTP and DNS take it."""

    local_part: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local_part}@{self.domain}"

    @property
    def needs_smtputf8(self) -> bool:
        """A non-ASCII local part has no ASCII form: only a server that offers SMTPUTF8 can carry it."""
        return not self.local_part.isascii()


@functools.lru_cache(maxsize=4096)
def parse_email(text: str) -> EmailAddress:
    """The address `text` holds, or InvalidAddress. Syntax and IDNA rules only: no DNS look-up, so no network,
    and the same answer every time: cached, as an address is checked when a webhook brings it and again when a
    message is sent to it (31 us each, email-validator's own cost)."""
    try:
        valid = email_validator.validate_email(text, check_deliverability=False)
    except email_validator.EmailNotValidError as exc:
        raise InvalidAddress(str(exc)) from None
    return EmailAddress(valid.local_part, valid.ascii_domain)


def e164(phone: str | None, region: str | None) -> str | None:
    """+33612345678 however it was written; a number that cannot be read is kept as written."""
    if not phone:
        return phone
    try:
        number = phonenumbers.parse(phone, None if phone.startswith("+") else region)
    except phonenumbers.NumberParseException:
        return phone
    if not phonenumbers.is_possible_number(number):
        return phone
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def test_recipient(text: str, region: str | None = None) -> str:
    """An e-mail address (lower-cased, its domain in ASCII) or a phone number (E.164), in the one form
    `test_recipients:` entries and `declic send-test --to` are compared in; ValueError when it is neither."""
    text = text.strip()
    if "@" in text:
        try:
            return str(parse_email(text)).lower()
        except InvalidAddress as exc:
            raise ValueError(f"not an e-mail address: {text!r} ({exc})") from None
    try:
        number = phonenumbers.parse(text, None if text.startswith("+") else region)
    except phonenumbers.NumberParseException:
        number = None
    if number is None or not phonenumbers.is_possible_number(number):
        hint = "" if text.startswith("+") or region else " (write it with its country code: +33...)"
        raise ValueError(f"not an e-mail address or a phone number: {text!r}{hint}")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def internal_address(channel: str, text: str) -> str:
    """A `to:` recipient as the sink takes it: an e-mail address, or a phone number in E.164 (+33612345678).

    Raises InvalidAddress saying what was wrong: a bad `to:` fails its step, it is never guessed at."""
    shown = text if len(text) <= 80 else text[:80] + "..."
    if channel == "email":
        try:
            return str(parse_email(text.strip()))
        except InvalidAddress as exc:
            raise InvalidAddress(f"{shown!r} is not an e-mail address: {exc}") from None
    try:
        number = phonenumbers.parse(text.strip(), None)
    except phonenumbers.NumberParseException:
        number = None
    if number is None or not phonenumbers.is_valid_number(number):
        raise InvalidAddress(f"{shown!r} is not a phone number in international form, such as +33612345678")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
