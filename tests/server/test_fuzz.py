"""The HTTP API fuzzed from its own OpenAPI schema (schemathesis, property-based) against a real server
process: no 5xx, every status, content type and body as the schema documents it, and the server healthy
afterwards. Seeded and bounded; `make fuzz` runs many more examples (SPECSERVE_FUZZ_EXAMPLES)."""

import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support.servers import start_server, stop_server

pytestmark = pytest.mark.small_model
SMALL = ("--target", "smollm2-135m", "--target-backend", "llama.cpp", "--draft", "none")
EXAMPLES = int(os.environ.get("SPECSERVE_FUZZ_EXAMPLES", "30"))  # per operation
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fuzzed_server(smollm2_path):
    # A valid request may ask for thousands of tokens: the deadline keeps each one short.
    proc, base, _ = start_server(*SMALL, "--request-timeout", "0.25", "--max-queue", "4")
    yield base
    stop_server(proc)


def test_every_answer_is_one_the_schema_documents(fuzzed_server):
    # schemathesis's own pytest parametrization does not run under this pytest; its strategies, with
    # hypothesis's @given, are the same cases.
    schema = schemathesis.openapi.from_url(f"{fuzzed_server}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {
        "POST /v1/chat/completions",
        "POST /v1/completions",
        "POST /v1/responses",
        "POST /infill",
        "POST /tokenize",
        "POST /detokenize",
    }
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
        def check(case):
            case.call_and_validate(base_url=fuzzed_server, checks=CHECKS, timeout=60)

        check()


def test_the_server_is_healthy_after_the_fuzzing(fuzzed_server):
    health = httpx.get(f"{fuzzed_server}/health", timeout=10)
    assert health.status_code == 200 and health.json()["in_flight"] == 0
