"""JSON that keeps Decimal money exact through the database and back."""

from __future__ import annotations

import json
from datetime import date, datetime
from decimal import Decimal
from typing import Any

_DECIMAL = "$decimal"


def _encode(value: Any) -> Any:
    if isinstance(value, Decimal):
        return {_DECIMAL: str(value)}
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    raise TypeError(f"cannot store {type(value).__name__} as JSON")


def _decode(obj: dict[str, Any]) -> Any:
    if len(obj) == 1 and _DECIMAL in obj:
        return Decimal(obj[_DECIMAL])
    return obj


# One encoder and one decoder for the process: json.dumps and json.loads build a new one (and its C scanner)
# on every call that passes an option, which was a third of each call's time (py-spy, docs/performance.md).
# Both are stateless between calls, so threads may share them.
_ENCODER = json.JSONEncoder(default=_encode, separators=(",", ":"), ensure_ascii=False)
_DECODER = json.JSONDecoder(object_hook=_decode)


def dumps(value: Any) -> str:
    return _ENCODER.encode(value)


def loads(text: str) -> Any:
    return _DECODER.decode(text)
