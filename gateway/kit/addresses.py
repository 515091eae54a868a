"""E-mail addresses: checked with email-validator, in the form that goes on the wire."""

from __future__ import annotations

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


def parse_email(text: str) -> EmailAddress:
    """The address `text` holds, or InvalidAddress. Syntax and IDNA rules only: no DNS look-up, so no network."""
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
