"""The API's OpenAPI 3.1 document: served without a token, valid, made of the handlers' own
models; and schemathesis, driven from it against the real app over HTTP, finds no 5xx and no
answer that breaks the document."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from openapi_spec_validator import validate

from conftest import Factory, fixture_bytes
from declic_gateway.http.api import models
from declic_gateway.http.api.endpoints import ENDPOINTS
from declic_gateway.http.api.openapi import REF, document
from declic_gateway.testing import SmtpCatcher

ADMIN = "admin-token-for-the-openapi-tests-0123"
TOKENS = f"admin: {{token: {ADMIN}}}\n"


async def test_the_served_document_is_valid_openapi_3_1_made_of_the_models(deploy: Factory) -> None:
    d = await deploy(extra=TOKENS)
    response = await d.client.get("/api/openapi.json")
    assert response.status == 200
    served = await response.json()
    validate(served)  # raises on an invalid document
    assert served["openapi"] == "3.1.0" and served == json.loads(json.dumps(document()))
    routes = {(e.method.lower(), e.path) for e in ENDPOINTS}
    assert {(method, path) for path, ops in served["paths"].items() for method in ops} == routes
    schemas = served["components"]["schemas"]
    # The same schema the handler validates a replay body with, and answers a timeline with.
    assert schemas["Replay"] == models.Replay.model_json_schema(ref_template=REF)
    assert (
        schemas["Timeline"]["properties"]["entries"]
        == models.Timeline.model_json_schema(ref_template=REF, mode="serialization")["properties"]["entries"]
    )
    replay = served["paths"]["/api/v1/dead-letter/replay"]["post"]
    assert replay["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Replay"}
    assert set(replay["responses"]) == {"200", "401", "403", "422", "503"}
    assert "403" not in served["paths"]["/api/v1/rules"]["get"]["responses"]  # reading needs any token


async def test_schemathesis_finds_no_server_error_and_no_answer_off_the_document(
    deploy: Factory, smtp: SmtpCatcher, tmp_path: Path
) -> None:
    d = await deploy(extra=TOKENS)
    smtp.replies = ["554 5.7.1 refused"]  # one dead-lettered step, so the lists have something to show
    await d.post_shopify("orders/create", fixture_bytes("shopify/order.json"))
    await d.post_shopify("orders/create", b'{"not": "an order"}')  # and one failed call
    await d.advance(seconds=1)
    base = str(d.client.make_url("")).rstrip("/")
    st = Path(sys.executable).parent / "st"
    # A subprocess, so the app keeps serving on this event loop while schemathesis calls it.
    proc = await asyncio.create_subprocess_exec(
        str(st),
        "run",
        f"{base}/api/openapi.json",
        "--header",
        f"Authorization: Bearer {ADMIN}",
        "--checks",
        "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,ignored_auth",
        "--max-examples",
        "15",
        "--workers",
        "1",
        "--seed",
        "1",
        "--request-timeout",
        "10",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=tmp_path,  # its own files (.hypothesis) stay out of the repository
    )
    output, _ = await proc.communicate()
    text = output.decode()
    assert proc.returncode == 0, text
    assert "No issues found" in text, text
