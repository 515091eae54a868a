"""structlog set-up: JSON off a terminal, readable on one, personal data and secrets redacted."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import sys
from typing import Any

import structlog
import structlog.tracebacks
from aiohttp.http_exceptions import HttpProcessingError

#: Letters and marks outside ASCII (ü, δ, 例, the signs of Devanagari...), not spaces nor punctuation (« » “ ” 、).
_INTL = (
    r"\u00c0-\u1fff\u2070-\u218f\u2c00-\u2fff\u3040-\ud7ff\uf900-\ufe2f\ufe70-\ufefe\uff10-\uff19"
    r"\uff21-\uff3a\uff41-\uff5a\uff66-\uffef\U00010000-\U0010ffff"
)
_LABEL = rf"[A-Za-z0-9\-{_INTL}]"
#: Internationalised addresses too (jürgen@münchen.example, δοκιμή@παράδειγμα.δοκιμή); IDN dots 。．｡ count.
_EMAIL = re.compile(rf"[A-Za-z0-9._%+\-{_INTL}]+@(?:{_LABEL}+[.\u3002\uff0e\uff61])+[A-Za-z{_INTL}]{_LABEL}+")
_SEP = r"[ .\-\u00a0\u202f]"
#: Numbers as people write them; bare digit runs not starting with 0 stay, they are usually order or row ids.
_PHONE = re.compile(
    r"(?<![\w+.\-])(?:"
    r"\+[1-9][\d \-().\u00a0\u202f]{6,}\d"  # international: +33 6 12 34 56 78, +1 (415) 555-0132
    rf"|00[1-9](?:{_SEP}?\d){{7,13}}"  # international after 00: 0033 6 12 34 56 78
    rf"|0[1-9](?:{_SEP}?\d){{7,10}}"  # national, trunk 0: 06 12 34 56 78, 0612345678, 020 7946 0958
    rf"|\(\d{{3}}\){_SEP}?\d{{3}}{_SEP}\d{{4}}"  # North American: (415) 555-0132
    r"|[2-9]\d{2}([.\-])\d{3}\1\d{4}"  # 415-555-0132, 415.555.0132
    r")(?!\w|[.,]\d)"
)
#: Credentials inside text: an Authorization header's value, a token in a query string. Short words
#: after Bearer or Basic ("Bearer token missing", "basic auth") are left alone: credentials are longer.
_CREDENTIAL = re.compile(
    r"(?i)\b(?:(bearer|basic)(\s+)(?=[A-Za-z0-9\-._~+/%]{8})|(access_token|token|api_key|apikey|secret|password)(=))"
    r"[A-Za-z0-9\-._~+/%]+=*"
)
#: Values under these keys are personal data whatever they look like.
_PERSONAL_KEYS = re.compile(r"^(phone|email|to|recipient|address|first_name|last_name)$", re.I)
_SECRET_KEYS = re.compile(r"secret|token|password|passwd|authorization|api_key|apikey|auth", re.I)
#: Per-process salt: the same address gets the same tag within a run, but tags are not reversible.
_SALT = os.urandom(16)


def _tag(kind: str, value: str) -> str:
    return f"<{kind}:{hashlib.blake2s(value.lower().encode(), key=_SALT, digest_size=4).hexdigest()}>"


#: What each pattern cannot match without: a credential follows `=` or a space, an address holds `@`, a
#: number digits. Most values logged (ids, rule and sink names) hold none of these, and a search for one
#: character costs a tenth of the three substitutions (a log line's redaction was half its cost).
_MAY_HOLD_CREDENTIAL = re.compile(r"[=\s]")
_MAY_HOLD_NUMBER = re.compile(r"\d")


def redact_text(text: str) -> str:
    if _MAY_HOLD_CREDENTIAL.search(text):
        text = _CREDENTIAL.sub(lambda m: f"{m.group(1) or m.group(3)}{m.group(2) or m.group(4)}***", text)
    if "@" in text:
        text = _EMAIL.sub(lambda m: _tag("email", m.group()), text)
    if _MAY_HOLD_NUMBER.search(text):
        text = _PHONE.sub(lambda m: _tag("phone", m.group()), text)
    return text


def _redact(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: _redact_field(str(k), v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_redact(v) for v in value)
    return value


#: Ids that merely look like addresses (a Message-ID is <id@sender-domain>): operators need them verbatim.
_VERBATIM_KEYS = frozenset({"provider_id", "message_id", "idempotency_key"})
#: What structlog's processors put on every line, from its own values: nothing personal to search for.
_STRUCTLOG_KEYS = frozenset({"timestamp", "level"})


def _redact_field(key: str, value: Any) -> Any:
    kind = _kind_of_key(key)
    if not kind:  # most fields: the value's own text is searched
        return redact_text(value) if isinstance(value, str) else _redact(value)
    if kind == "verbatim":
        return value
    if kind == "secret" and value is not None:
        return "***"
    if kind == "personal" and isinstance(value, str) and value:
        tag = "email" if "@" in value else "phone" if _PHONE.fullmatch(value.strip()) else "pii"
        return _tag(tag, value)
    return _redact(value)


@functools.lru_cache(maxsize=1024)
def _kind_of_key(key: str) -> str:
    """What a key says of its value: an id kept verbatim, a secret, personal data, or nothing. Log lines use
    a few dozen keys, so each is matched once (two regexes per field were a fifth of a line's redaction)."""
    if key in _VERBATIM_KEYS:
        return "verbatim"
    if _SECRET_KEYS.search(key):
        return "secret"
    return "personal" if _PERSONAL_KEYS.match(key) else ""


def redact_processor(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    return {k: v if k in _STRUCTLOG_KEYS else _redact_field(k, v) for k, v in event_dict.items()}


def configure(level: str = "info", redact: bool = True, as_json: bool | None = None) -> None:
    if as_json is None:
        as_json = not sys.stderr.isatty()
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        # Off a terminal a traceback is data inside the one JSON line (frames without locals), never loose text.
        _EXCEPTION_AS_DATA if as_json else structlog.processors.format_exc_info,
    ]
    if redact:
        processors.append(redact_processor)
    processors.append(structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer())
    threshold = getattr(logging, level.upper())
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        # Looked up at each logger creation, so a replaced sys.stderr (tests, daemons) is honoured.
        logger_factory=lambda *_args: structlog.PrintLogger(sys.stderr),
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, StdlibBridge)]:
        root.removeHandler(handler)
    root.addHandler(StdlibBridge())
    # Libraries' own info lines (alembic on every readiness check...) are noise: they speak from warning up.
    root.setLevel(max(threshold, logging.WARNING))


def reset() -> None:
    """Undo configure(): structlog's defaults, and stdlib logging without the bridge."""
    structlog.reset_defaults()
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, StdlibBridge)]:
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)


_EXCEPTION_AS_DATA = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False, use_rich=False)
)
_LEVELS = (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL)


class StdlibBridge(logging.Handler):
    """Libraries' stdlib log records (aiohttp, asyncio...) sent through structlog: one redacted line each.

    Without it, Python's last-resort handler prints them with plain-text tracebacks, and aiohttp's
    "Error handling request" quotes the raw request line or headers, credentials included.
    """

    def emit(self, record: logging.LogRecord) -> None:
        level = max([n for n in _LEVELS if n <= record.levelno], default=logging.DEBUG)
        fields: dict[str, Any] = {"logger": record.name}
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            # A malformed request is the client's fault, and the parser's message quotes the raw bytes.
            fields.update(error=type(error).__name__, status=error.code)
            level = min(level, logging.WARNING)
        elif record.exc_info:
            fields["exc_info"] = record.exc_info
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            message = str(record.msg)
        structlog.get_logger(record.name).log(level, message, **fields)
