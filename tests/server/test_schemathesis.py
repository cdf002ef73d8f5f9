"""A bounded schemathesis run against the live tiny server on 127.0.0.1: the documented schema (/openapi.json)
matches behaviour — no 5xx, every status and content type documented, every JSON body conforming to its schema."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from autoglm.server.app import create_app
from autoglm.server.config import ServerConfig
from tests.fixtures.server import ServerProcess

pytest.importorskip("schemathesis")

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
OPERATIONS = r"^/(v1/chat/completions|v1/completions|v1/models|health)$"


def test_openapi_documents_what_the_server_answers() -> None:
    doc = create_app(ServerConfig()).openapi()
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    for path in ("/v1/chat/completions", "/v1/completions"):
        responses = doc["paths"][path]["post"]["responses"]
        assert "422" not in responses
        assert {"400", "401", "404", "413", "429", "503", "504"} <= set(responses)
        error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
        assert responses["400"]["content"]["application/json"]["schema"] == error_ref
        assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
    schemas = doc["components"]["schemas"]
    assert schemas["ChatCompletionRequest"]["properties"]["messages"]["minItems"] == 1
    prompt = schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"]
    assert {"type": "string", "minLength": 1} in prompt
    assert {"type": "array", "items": {"type": "integer"}, "minItems": 1} in prompt
    nested = next(p for p in prompt if p.get("items", {}).get("type") == "array")
    assert nested["items"] == {"type": "array", "items": {"type": "integer"}, "minItems": 1}


def test_schemathesis_finds_no_5xx_and_no_schema_violation(server: ServerProcess, tmp_path: Path) -> None:
    cmd = [
        sys.executable, "-c", "import sys; from schemathesis.cli import schemathesis; sys.exit(schemathesis())",
        "run", f"{server.base_url}/openapi.json", "--checks", CHECKS, "--include-path-regex", OPERATIONS,
        "--phases", "examples,coverage,fuzzing", "--max-examples", "30", "--seed", "11", "--workers", "1",
        "--generation-database", "none", "--suppress-health-check", "all", "--request-timeout", "60",
        "--no-color", "--report", "junit", "--report-dir", str(tmp_path),
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)  # its cache goes there
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-6000:]
    assert "test cases" in out or "passed" in out.lower(), out[-2000:]
    assert server.alive()
