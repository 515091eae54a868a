"""The JSON Schema of a deployment config, from the same pydantic models that validate it, the
installed plugins' options included: editors complete and check `declic.yaml` with it.

It describes the file as written, before `${VAR}` substitution: any value may be a string
holding a `${VAR}` reference. `declic check` stays the judge; the schema cannot see
cross-references (a rule's `via` naming a sink) nor template files.
"""

from __future__ import annotations

import copy
from datetime import time, timedelta
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, models_json_schema
from pydantic_core import core_schema

from ..kit.durations import format_duration
from ..kit.registry import Registry
from .settings import Settings

DIALECT = "https://json-schema.org/draft/2020-12/schema"
#: A string holding an environment reference, `${VAR}` or `${VAR:-default}`, anywhere in it.
ENV_REFERENCE = {
    "type": "string",
    "pattern": r"\$\{[A-Za-z_][A-Za-z0-9_]*(:-[^}]*)?\}",
    "description": "Read from the environment when the config is loaded: ${VAR} or ${VAR:-default}.",
}
_ANNOTATIONS = ("title", "description", "default", "examples", "deprecated")


class _Generator(GenerateJsonSchema):
    """Durations and times of day as the config spells them (`90s`, `10:00`), not ISO 8601."""

    def timedelta_schema(self, schema: core_schema.TimedeltaSchema) -> dict[str, Any]:
        return {
            "anyOf": [
                {"type": "string", "pattern": r"^\s*[+-]?\d+\s*(ms|[smhdwy])\s*$"},
                {"type": "integer", "minimum": 0, "description": "seconds"},
            ],
            "description": "A duration: 250ms, 90s, 5m, 1h, 3d or 2w (an offset may be signed: -5d, +1y).",
        }

    def time_schema(self, schema: core_schema.TimeSchema) -> dict[str, Any]:
        return {"type": "string", "pattern": r"^\s*\d{1,2}:\d{2}\s*$", "description": "A time of day, HH:MM."}

    def encode_default(self, dft: Any) -> Any:
        if isinstance(dft, timedelta):
            return format_duration(dft)
        if isinstance(dft, time):
            return dft.strftime("%H:%M")
        return super().encode_default(dft)


def build(registry: Registry) -> dict[str, Any]:
    """The whole config's schema: Settings, with `sources` and `sinks` entries chosen by `plugin`."""
    plugins: list[tuple[str, str, type[BaseModel]]] = [
        *(("sources", name, cls.Config) for name, cls in sorted(registry.sources.items())),
        *(("sinks", name, cls.Config) for name, cls in sorted(registry.sinks.items())),
    ]
    models: list[type[BaseModel]] = [Settings, *dict.fromkeys(model for _, _, model in plugins)]
    refs, top = models_json_schema([(m, "validation") for m in models], schema_generator=_Generator)
    defs: dict[str, Any] = top["$defs"]
    for table, name, model in plugins:
        options = copy.deepcopy(defs[_def_name(refs[(model, "validation")])])
        # `plugin` is read before the options are validated: it is not a field of the plugin's model.
        options["properties"] = {"plugin": {"const": name, "description": "The plugin."}, **options["properties"]}
        options["required"] = ["plugin", *options.get("required", [])]
        options["title"] = f"plugin: {name}"
        key = f"{table}.{name}"
        defs[key] = options
    settings = defs.pop(_def_name(refs[(Settings, "validation")]))
    # `scoring` is mostly written flat (`email.opened: 1`): its model folds that into `points` first.
    scoring = defs["ScoringSpec"]
    scoring["additionalProperties"] = {
        "anyOf": [{"type": "number"}, scoring["properties"]["points"]["additionalProperties"]]
    }
    schema = {"$schema": DIALECT, **settings, "title": "Declic deployment config", "$defs": defs}
    schema = _EnvReferences(defs).allow(schema)
    schema["$defs"]["env"] = ENV_REFERENCE
    for table in ("sources", "sinks"):
        entry = schema["properties"][table]
        # pydantic keys the names by patternProperties, which would leave the options unchecked.
        entry["propertyNames"] = {"pattern": next(iter(entry.pop("patternProperties")))}
        entry["additionalProperties"] = {
            "type": "object",
            "properties": {
                "plugin": {
                    "enum": sorted(name for t, name, _ in plugins if t == table),
                    "description": "The plugin; see `declic plugins`.",
                }
            },
            "required": ["plugin"],
            # if/then rather than oneOf: a mistake is reported against the named plugin's options only.
            "allOf": [
                {
                    "if": {"properties": {"plugin": {"const": name}}, "required": ["plugin"]},
                    "then": {"$ref": f"#/$defs/{table}.{name}"},
                }
                for name in sorted(name for t, name, _ in plugins if t == table)
            ],
        }
    return schema


def _def_name(ref: dict[str, Any]) -> str:
    return str(ref["$ref"]).removeprefix("#/$defs/")


class _EnvReferences:
    """Every value that is not a mapping, a list or already any string may also be a `${VAR}` reference."""

    def __init__(self, defs: dict[str, Any]):
        self.defs = defs

    def allow(self, schema: dict[str, Any]) -> dict[str, Any]:
        out = dict(schema)
        if "properties" in out:
            out["properties"] = {k: self._or_env(self.allow(v)) for k, v in out["properties"].items()}
        for key in ("additionalProperties", "items"):
            if isinstance(out.get(key), dict):
                out[key] = self._or_env(self.allow(out[key]))
        for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
            if key in out:
                out[key] = [self.allow(s) for s in out[key]]
        if "$defs" in out:
            out["$defs"] = {k: self.allow(v) for k, v in out["$defs"].items()}
        return out

    def _or_env(self, schema: dict[str, Any]) -> dict[str, Any]:
        inner = {key: value for key, value in schema.items() if key not in _ANNOTATIONS}
        choices = inner["anyOf"] if list(inner) == ["anyOf"] else [inner]
        if "const" in inner or any(self._free_or_structured(choice) for choice in choices):
            return schema  # `plugin: NAME` picks the options, never from the environment
        outer = {key: schema[key] for key in _ANNOTATIONS if key in schema}
        return {**outer, "anyOf": [*choices, {"$ref": "#/$defs/env"}]}

    def _free_or_structured(self, schema: dict[str, Any]) -> bool:
        if "$ref" in schema:
            schema = self.defs.get(_def_name(schema), {})
        if schema.get("type") in ("object", "array"):
            return True  # a `${VAR}` in place of a mapping or a list is an error of `declic check`
        return schema.get("type") == "string" and not {"pattern", "enum", "const", "format"} & schema.keys()
