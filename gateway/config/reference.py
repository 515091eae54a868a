"""The config reference, generated from the pydantic models so that it cannot drift from the code."""

from __future__ import annotations

import enum
import sys
import types
import typing
from typing import Any

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from ..kit.registry import Registry
from .settings import Settings

HEADER = """# Config reference

Generated from the code by `declic reference --builtin-only > docs/config-reference.md`; a test fails when
it is out of date. The README explains each part with examples.

Every string value may use `${VAR}` or `${VAR:-default}`, read from the environment.
Durations are written `250ms`, `90s`, `5m`, `1h`, `3d` or `2w`, from 0 to 10 years (`3650d`);
a setting may narrow that range, as its description says. A value out of range is an error of
`declic check`.
"""


def render(registry: Registry) -> str:
    parts = [HEADER, "## Deployment (`declic.yaml`)\n", _table(Settings, "")]
    for name, model in _nested(Settings):
        parts += [f"### `{name}`\n", _table(model, name + ".")]
    sections: tuple[tuple[str, dict[str, Any]], ...] = (("Sources", registry.sources), ("Sinks", registry.sinks))
    for title, table in sections:
        parts.append(f"## {title}\n")
        for plugin, cls in sorted(table.items()):
            section = "sources.NAME" if title == "Sources" else "sinks.NAME"
            summary = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip().split("\n")[0]
            parts += [f"### `plugin: {plugin}`\n", summary + "\n", _table(cls.Config, section + ".")]
            for name, model in _nested(cls.Config, section + "."):
                parts += [f"#### `{name}`\n", _table(model, name + ".")]
    return "\n".join(parts)


def _nested(model: type[BaseModel], prefix: str = "") -> list[tuple[str, type[BaseModel]]]:
    found = []
    for name, field in model.model_fields.items():
        for inner in _models(field.annotation):
            key = f"{prefix}{field.alias or name}"
            suffix = "[]" if typing.get_origin(field.annotation) is list else ""
            found.append((key + suffix, inner))
            found += _nested(inner, key + suffix + ".")
    return found


def _models(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models(arg)]


def _table(model: type[BaseModel], prefix: str) -> str:
    rows = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for name, field in model.model_fields.items():
        description = (field.description or "").replace("|", "\\|")
        rows.append(
            f"| `{prefix}{field.alias or name}` | {_type(field.annotation)} | {_default(field)} | {description} |"
        )
    return "\n".join(rows) + "\n"


def _type(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is SecretStr:
        return "secret"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type(a) for a in args if a is not type(None)) + (" or null" if type(None) in args else "")
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin is typing.Annotated:
        return "duration" if "timedelta" in str(args[0]) else _type(args[0])
    if origin is list:
        return f"list of {_type(args[0])}"
    if origin is dict:
        return f"mapping to {_type(args[1])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " \\| ".join(f"`{m.value}`" for m in annotation)
    return getattr(annotation, "__name__", str(annotation)).replace("timedelta", "duration")


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
        return "" if isinstance(value, (BaseModel, dict, list)) else f"`{value}`"
    if field.default is None or field.default is PydanticUndefined:
        return ""
    value = field.default
    if hasattr(value, "total_seconds"):
        return f"`{_duration(value.total_seconds())}`"
    return f"`{value}`"


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds * 1000)}ms"
