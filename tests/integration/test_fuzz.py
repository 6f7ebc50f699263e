"""Schema-driven fuzzing of the real server from its own OpenAPI document:
whatever schemathesis sends, the answer is never a 5xx and the server stays up."""

from __future__ import annotations

import hypothesis
import pytest
import schemathesis
from schemathesis.generation.modes import GenerationMode

EXAMPLES_PER_OPERATION = 40


@schemathesis.hook
def map_body(context, body):
    # Keep valid generation requests short so the bounded run stays fast;
    # huge n / max_tokens / logprobs are covered by explicit tests.
    if isinstance(body, dict):
        for field in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(field), int) and body[field] > 8:
                body[field] = 8
        if isinstance(body.get("n"), int) and 2 < body["n"] <= 16:
            body["n"] = 2
    return body


@pytest.fixture(scope="module")
def operations(server):
    schema = schemathesis.openapi.from_url(server.base_url + "/openapi.json")
    ops = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in ops} >= {
        "POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models",
    }  # fmt: skip
    return ops


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors(operations, server, mode):
    seen: dict[int, int] = {}
    for operation in operations:

        @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
        @hypothesis.settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            suppress_health_check=list(hypothesis.HealthCheck),
            derandomize=True,
            database=None,
        )
        def check(case):
            response = case.call(base_url=server.base_url, timeout=60)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            assert response.status_code < 500, (case.body, response.status_code, response.text)
            if response.status_code >= 400:
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"}

        try:
            check()
        except hypothesis.errors.Unsatisfiable:
            # An operation without inputs (GET /health) has no invalid requests to make.
            assert mode == GenerationMode.NEGATIVE
        assert server.proc.poll() is None, "the server crashed"
    print(f"fuzz ({mode}) status codes:", dict(sorted(seen.items())))
