"""structlog set-up: JSON off a terminal, readable on one, personal data and secrets redacted."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
from typing import Any

import structlog

_EMAIL = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}")
#: International numbers only (+33 6 12 34 56 78): bare digit runs are usually order or row ids.
_PHONE = re.compile(r"(?<![\w+.])\+\d[\d \-()]{6,}\d(?![\w.])")
#: Values under these keys are personal data whatever they look like.
_PERSONAL_KEYS = re.compile(r"^(phone|email|to|recipient|address|first_name|last_name)$", re.I)
_SECRET_KEYS = re.compile(r"secret|token|password|passwd|authorization|api_key|apikey|auth", re.I)
#: Per-process salt: the same address gets the same tag within a run, but tags are not reversible.
_SALT = os.urandom(16)


def _tag(kind: str, value: str) -> str:
    return f"<{kind}:{hashlib.blake2s(value.lower().encode(), key=_SALT, digest_size=4).hexdigest()}>"


def redact_text(text: str) -> str:
    text = _EMAIL.sub(lambda m: _tag("email", m.group()), text)
    return _PHONE.sub(lambda m: _tag("phone", m.group()), text)


def _redact(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: _redact_field(str(k), v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_redact(v) for v in value)
    return value


#: Ids that merely look like addresses (a Message-ID is <id@sender-domain>): operators need them verbatim.
_ID_KEYS = frozenset({"provider_id", "message_id", "idempotency_key"})


def _redact_field(key: str, value: Any) -> Any:
    if key in _ID_KEYS:
        return value
    if _SECRET_KEYS.search(key) and value is not None:
        return "***"
    if _PERSONAL_KEYS.match(key) and isinstance(value, str) and value:
        kind = "email" if "@" in value else "phone" if value.lstrip("+").replace(" ", "").isdigit() else "pii"
        return _tag(kind, value)
    return _redact(value)


def redact_processor(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    return _redact(event_dict)


def configure(level: str = "info", redact: bool = True, as_json: bool | None = None) -> None:
    if as_json is None:
        as_json = not sys.stderr.isatty()
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    if redact:
        processors.append(redact_processor)
    processors.append(structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer())
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        # Looked up at each logger creation, so a replaced sys.stderr (tests, daemons) is honoured.
        logger_factory=lambda *_args: structlog.PrintLogger(sys.stderr),
        cache_logger_on_first_use=False,
    )
