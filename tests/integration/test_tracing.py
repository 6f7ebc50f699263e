"""OpenTelemetry traces from the real server (vLLM on the demo model) to an OTLP/HTTP
receiver in the test process: one span per request under the caller's traceparent, its
admission and engine phases (the engine's own timestamps) as children, no key or prompt
text in any attribute."""

from __future__ import annotations

import json
import secrets

import httpx

from tests.integration.conftest import OPS_KEY, OpsServer, auth
from tests.otlp_receiver import ReceivedSpan

PHASES = ("admission", "engine.queue", "engine.prefill", "engine.decode")
SKEW_NS = 5_000_000  # the engine's clock and ours are the same, converted twice


def traceparent() -> tuple[str, str, dict[str, str]]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, {"traceparent": f"00-{trace_id}-{span_id}-01"}


def request_span(ops: OpsServer, trace_id: str) -> tuple[ReceivedSpan, dict[str, ReceivedSpan]]:
    """The request span of `trace_id` and its children by name (waiting for the exporter)."""
    found = ops.receiver.wait_for(lambda s: s.trace_id == trace_id and s.kind == 2)
    assert len(found) == 1, found
    (span,) = found
    # The children end before their parent, so they were exported with it or earlier.
    children = {s.name: s for s in ops.receiver.trace(trace_id) if s.parent_span_id == span.span_id}
    return span, children


def assert_phases(span: ReceivedSpan, children: dict[str, ReceivedSpan]) -> None:
    assert set(children) == set(PHASES), sorted(children)
    previous = None
    for name in PHASES:
        child = children[name]
        assert child.start_ns >= span.start_ns - SKEW_NS, name
        assert child.end_ns <= span.end_ns + SKEW_NS, name
        assert child.end_ns >= child.start_ns, name
        if previous is not None:  # the phases follow each other
            assert child.start_ns >= previous.end_ns - SKEW_NS, (previous.name, name)
        previous = child
    # The engine's phases are contiguous: scheduled ends the queue and starts the prefill.
    assert children["engine.queue"].end_ns == children["engine.prefill"].start_ns
    assert children["engine.prefill"].end_ns == children["engine.decode"].start_ns


def test_a_stream_is_one_span_under_the_callers_trace(ops):
    trace_id, parent, headers = traceparent()
    prompt = f"def private_{secrets.token_hex(4)}():"
    body = {"prompt": prompt, "max_tokens": 40, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", ops.base_url + "/v1/completions", json=body,
                      headers={**auth(), **headers}, timeout=60) as r:  # fmt: skip
        assert r.status_code == 200
        lines = list(r.iter_lines())
        request_id = r.headers["x-request-id"]
    (usage,) = [json.loads(x[6:])["usage"] for x in lines if x.startswith('data: {"id"') and
                '"usage":{' in x]  # fmt: skip
    span, children = request_span(ops, trace_id)
    assert span.parent_span_id == parent and span.name == "POST /v1/completions"
    a = span.attributes
    assert a["http.request.method"] == "POST" and a["http.response.status_code"] == 200
    assert a["codellama_serve.status"] == 200 and "codellama_serve.aborted" not in a
    assert a["gen_ai.request.model"] == "codellama-serve-demo"
    assert a["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert a["gen_ai.usage.output_tokens"] == usage["completion_tokens"] == 40
    assert a["codellama_serve.request_id"] == request_id
    assert a["codellama_serve.key"] == "ops" and a["codellama_serve.endpoint"] == "completions"
    assert span.resource["service.name"] == "codellama-serve"
    assert_phases(span, children)
    decode = children["engine.decode"]
    assert decode.attributes["gen_ai.usage.output_tokens"] == 40
    assert decode.duration_s > 0
    # Neither the key nor the prompt's text is in any attribute, resource included.
    everything = repr([(s.attributes, s.resource) for s in ops.receiver.trace(trace_id)])
    assert OPS_KEY not in everything and prompt not in everything and "private_" not in everything


def test_a_non_streamed_chat_has_the_engine_phases_too(ops):
    trace_id, _, headers = traceparent()
    body = {"messages": [{"role": "user", "content": "Write a sort."}], "max_tokens": 12}
    r = httpx.post(ops.base_url + "/v1/chat/completions", json=body,
                   headers={**auth(), **headers}, timeout=60)  # fmt: skip
    assert r.status_code == 200
    span, children = request_span(ops, trace_id)
    assert span.name == "POST /v1/chat/completions"
    assert span.attributes["gen_ai.operation.name"] == "chat"
    assert span.attributes["gen_ai.usage.output_tokens"] == r.json()["usage"]["completion_tokens"]
    assert_phases(span, children)


def test_without_traceparent_a_trace_starts_here(ops):
    r = httpx.post(ops.base_url + "/v1/completions", json={"prompt": "x", "max_tokens": 2},
                   headers=auth(), timeout=60)  # fmt: skip
    request_id = r.headers["x-request-id"]
    (span,) = ops.receiver.wait_for(
        lambda s: s.attributes.get("codellama_serve.request_id") == request_id and s.kind == 2
    )
    assert span.parent_span_id == ""


def test_an_aborted_stream_says_why(ops):
    trace_id, _, headers = traceparent()
    body = {"prompt": "def g():", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", ops.base_url + "/v1/completions", json=body,
                      headers={**auth(), **headers}, timeout=60) as r:  # fmt: skip
        for n, _ in enumerate(r.iter_lines()):
            if n >= 8:
                break  # the client leaves mid-stream
    span, children = request_span(ops, trace_id)
    a = span.attributes
    assert (
        a["codellama_serve.status"] == 499 and a["codellama_serve.aborted"] == "client_disconnect"
    )
    assert 0 < a["gen_ai.usage.output_tokens"] < 1500
    assert {"admission", "engine.queue", "engine.prefill"} <= set(children)


def test_a_refused_request_is_traced_with_its_status(ops):
    trace_id, _, headers = traceparent()
    r = httpx.post(ops.base_url + "/v1/completions", json={"prompt": "x", "max_tokens": 99999},
                   headers={**auth(), **headers}, timeout=60)  # fmt: skip
    assert r.status_code == 400
    span, children = request_span(ops, trace_id)
    assert span.attributes["http.response.status_code"] == 400 and not children
