"""The OpenAPI 3.1 document of /api/v1, generated from the endpoint table and its pydantic models.

Paths are assembled here (a few lines per endpoint); every schema comes from pydantic, whose JSON
Schema 2020-12 is the dialect of OpenAPI 3.1, so what the document promises is what the handlers
check.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import version
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from ...plugins import DISTRIBUTION
from . import models as m
from .endpoints import ENDPOINTS, Endpoint

REF = "#/components/schemas/{model}"
COMMON_ANSWERS = {
    "401": "No bearer token, or one the configuration does not hold.",
    "403": "A read-only token on an endpoint that acts.",
    "422": "A query, path or body that does not validate; `detail` lists each field.",
    "503": "Storage unavailable: retry after `Retry-After` seconds.",
}


@cache
def document() -> dict[str, Any]:
    wanted: list[tuple[type[BaseModel], JsonSchemaMode]] = [(m.Problem, "serialization")]
    for endpoint in ENDPOINTS:
        wanted.append((endpoint.answer, "serialization"))
        wanted += [(model, "validation") for model in _inputs(endpoint)]
    refs, defs = models_json_schema(wanted, ref_template=REF)
    schemas = defs.get("$defs", {})
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in ENDPOINTS:
        operation = _operation(endpoint, refs)
        paths.setdefault(endpoint.path, {})[endpoint.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Declic admin API",
            "version": version(DISTRIBUTION),
            "description": "Rules and their KPIs, contacts, deliveries, dead letter and failed calls. "
            "Every call needs `Authorization: Bearer TOKEN`, a token from the configuration's `admin` "
            "section: read-only tokens may GET, admin tokens may also POST.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


def _inputs(endpoint: Endpoint) -> list[type[BaseModel]]:
    return [model for model in (endpoint.query, endpoint.body, *endpoint.path_params.values()) if model is not None]


def _operation(endpoint: Endpoint, refs: dict[Any, Any]) -> dict[str, Any]:
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": _fields(model)["value"][0]}
        for name, model in endpoint.path_params.items()
    ]
    if endpoint.query is not None:
        parameters += [
            {"name": name, "in": "query", "required": required, "schema": schema}
            for name, (schema, required) in _fields(endpoint.query).items()
        ]
    problem = {"application/json": {"schema": refs[(m.Problem, "serialization")]}}
    answers = {str(status): text for status, text in endpoint.also.items()} | COMMON_ANSWERS
    if endpoint.scope != "admin":
        del answers["403"]
    operation: dict[str, Any] = {
        "operationId": endpoint.handler.__name__,
        "summary": endpoint.summary,
        "description": "Needs the admin scope." if endpoint.scope == "admin" else "Any token, read or admin.",
        "parameters": parameters,
        "responses": {
            "200": {
                "description": "OK",
                "content": {"application/json": {"schema": refs[(endpoint.answer, "serialization")]}},
            },
            **{status: {"description": text, "content": problem} for status, text in sorted(answers.items())},
        },
    }
    if endpoint.body is not None:
        body_schema = refs[(endpoint.body, "validation")]
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": body_schema}}}
    return operation


def _fields(model: type[BaseModel]) -> dict[str, tuple[dict[str, Any], bool]]:
    """Each field's schema, and whether it is required, from the model's own schema.

    A query parameter that may be left out needs no `null`: there is no way to send one.
    """
    schema = model.model_json_schema(ref_template=REF)
    required = set(schema.get("required", ()))
    fields = {}
    for name, field_schema in schema["properties"].items():
        branches = [b for b in field_schema.get("anyOf", ()) if b != {"type": "null"}]
        if len(branches) == 1:
            field_schema = {**{k: v for k, v in field_schema.items() if k not in ("anyOf", "default")}, **branches[0]}
        fields[name] = (field_schema, name in required)
    return fields
