"""HTTP-layer pieces of issue 16 against a FakeEngine (no model): the stream write timeout,
tracing's middleware (spans to a local OTLP receiver), counting requests that never run,
and the server's connection settings."""

from __future__ import annotations

import asyncio
import resource
import subprocess
import sys
import time

import httpx
import pytest

from engine.api.streaming import CLIENT_CLOSED, SSEResponse
from engine.config import build_settings, resolve
from engine.server import FD_RESERVE, raise_fd_limit, uvicorn_config
from tests.otlp_receiver import OTLPReceiver
from tests.unit.test_http_layer import make_server, post, serving

# ---------------------------------------------------------------- write timeout


async def _frames(n: int, closed: list[bool]):
    try:
        for i in range(n):
            yield f"data: {i}\n\n".encode()
    finally:
        closed.append(True)


async def test_a_write_the_client_does_not_take_ends_the_stream():
    finished: list[int] = []
    stalled: list[bool] = []
    closed: list[bool] = []
    sent: list[dict] = []

    async def finish(status: int) -> None:
        finished.append(status)

    async def send(message: dict) -> None:
        if len(sent) == 3:  # the client stops reading after two frames
            await asyncio.Event().wait()
        sent.append(message)

    async def receive() -> dict:
        await asyncio.Event().wait()
        return {}

    response = SSEResponse(
        _frames(100, closed), finish, write_timeout_s=0.2,
        on_write_timeout=lambda: stalled.append(True),
    )  # fmt: skip
    started = time.monotonic()
    scope = {"type": "http", "asgi": {"spec_version": "2.3"}}
    await asyncio.wait_for(response(scope, receive, send), 5)
    assert 0.2 <= time.monotonic() - started < 2
    assert stalled == [True] and finished == [CLIENT_CLOSED] and closed == [True]
    assert sent[0]["type"] == "http.response.start" and len(sent) == 3


async def test_without_a_write_timeout_a_slow_client_is_waited_for():
    finished: list[int] = []
    sent: list[dict] = []

    async def finish(status: int) -> None:
        finished.append(status)

    async def send(message: dict) -> None:
        await asyncio.sleep(0.01)
        sent.append(message)

    async def receive() -> dict:
        await asyncio.Event().wait()
        return {}

    response = SSEResponse(_frames(5, []), finish, write_timeout_s=None)
    await response({"type": "http", "asgi": {"spec_version": "2.3"}}, receive, send)
    assert finished == [200] and sent[-1] == {
        "type": "http.response.body", "body": b"", "more_body": False,
    }  # fmt: skip


# ---------------------------------------------------------------- requests that never run


def test_requests_refused_before_running_are_counted(demo_tokenizer):
    app, _, _ = make_server(demo_tokenizer, api_keys="sk-good-key")
    with serving(app) as url:
        assert post(url, "/v1/completions", {"prompt": "x"}).status_code == 401
        ok = {"Authorization": "Bearer sk-good-key"}
        r = post(url, "/v1/completions", {"prompt": "x", "model": "nope"}, headers=ok)
        assert r.status_code == 404
        assert post(url, "/v1/chat/completions", {"messages": []}, headers=ok).status_code == 400
        assert post(url, "/v1/completions", {"prompt": "x", "max_tokens": 1}, headers=ok)
        text = httpx.get(url + "/metrics").text
    for line in (
        'codellama_serve_requests_total{endpoint="completions",status="401"} 1.0',
        'codellama_serve_requests_total{endpoint="completions",status="404"} 1.0',
        'codellama_serve_requests_total{endpoint="chat",status="400"} 1.0',
        'codellama_serve_requests_total{endpoint="completions",status="200"} 1.0',
    ):
        assert line in text, line


# ---------------------------------------------------------------- tracing


@pytest.fixture()
def receiver():
    r = OTLPReceiver()
    yield r
    r.close()


@pytest.fixture()
def otel_http(monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")


def test_tracing_off_imports_nothing_and_adds_no_middleware():
    code = (
        "import sys\n"
        "from engine.api.app import create_app\n"
        "from engine.config import build_settings, resolve\n"
        "from tests.fakes import FakeEngine\n"
        "app = create_app(resolve(build_settings(env={}), gpu=False), FakeEngine(None))\n"
        "assert 'engine.tracing' not in sys.modules\n"
        "assert not any('Tracing' in m.cls.__name__ for m in app.user_middleware)\n"
        "assert not any(m.startswith('opentelemetry.sdk') for m in sys.modules), 'SDK imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_spans_continue_the_callers_trace_and_carry_no_secrets(demo_tokenizer, receiver, otel_http):
    app, _, _ = make_server(
        demo_tokenizer, step_delay=0.001, api_keys="sk-secret-key-42 name=team",
        otlp_traces_endpoint=receiver.endpoint,
    )  # fmt: skip
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    headers = {
        "Authorization": "Bearer sk-secret-key-42",
        "traceparent": f"00-{trace_id}-{parent}-01",
    }
    prompt = "def very_private_function():"
    with serving(app) as url:
        r = post(url, "/v1/completions", {"prompt": prompt, "max_tokens": 3}, headers=headers)
        assert r.status_code == 200
        httpx.get(url + "/health")
        spans = receiver.wait_for(lambda s: s.trace_id == trace_id and s.name.startswith("POST"))
    (span,) = spans
    assert span.parent_span_id == parent and span.kind == 2  # SERVER
    a = span.attributes
    assert a["http.response.status_code"] == 200 and a["codellama_serve.status"] == 200
    assert a["gen_ai.usage.output_tokens"] == 3 and a["codellama_serve.key"] == "team"
    assert a["codellama_serve.request_id"] == r.headers["x-request-id"]
    assert span.resource["service.name"] == "codellama-serve"
    admission = [s for s in receiver.trace(trace_id) if s.name == "admission"]
    assert admission and admission[0].parent_span_id == span.span_id
    everything = repr([(s.attributes, s.resource) for s in receiver.spans])
    assert "sk-secret-key-42" not in everything and "very_private_function" not in everything
    # Probes are not traced.
    assert all(s.attributes.get("url.path") != "/health" for s in receiver.spans)


def test_prompt_text_only_when_allowed(demo_tokenizer, receiver, otel_http):
    app, _, _ = make_server(
        demo_tokenizer, otlp_traces_endpoint=receiver.endpoint, otlp_traces_prompts=True
    )
    with serving(app) as url:
        assert post(url, "/v1/completions", {"prompt": "def shown():", "max_tokens": 2})
        (span,) = receiver.wait_for(lambda s: s.name == "POST /v1/completions")
    assert "def shown():" in span.attributes["gen_ai.prompt"][0]


def test_an_unknown_otlp_protocol_is_refused(monkeypatch, demo_tokenizer):
    from engine.config import ConfigError

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json")
    with pytest.raises(ConfigError, match="http/json"):
        make_server(demo_tokenizer, otlp_traces_endpoint="http://127.0.0.1:1/v1/traces")


# ---------------------------------------------------------------- connection settings


def test_uvicorn_gets_the_connection_settings():
    settings = resolve(
        build_settings(env={}, overrides={"limit_concurrency": 5000, "timeout_keep_alive_s": 7.0,
                                          "backlog": 512}),
        gpu=False,
    )  # fmt: skip
    config = uvicorn_config(object(), settings)
    assert (config.limit_concurrency, config.timeout_keep_alive, config.backlog) == (5000, 7, 512)
    defaults = uvicorn_config(object(), resolve(build_settings(env={}), gpu=False))
    assert (defaults.limit_concurrency, defaults.timeout_keep_alive) == (8192, 30)


def test_the_open_file_limit_is_raised_to_fit_the_connections():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        got = raise_fd_limit(1000)
        want = 1000 + FD_RESERVE if hard == resource.RLIM_INFINITY else min(1000 + FD_RESERVE, hard)
        assert got == want == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert raise_fd_limit(10) == want  # never lowered
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_past_the_concurrency_limit_new_requests_get_503(demo_tokenizer):
    """--limit-concurrency reaches uvicorn: idle connections count towards it."""
    import socket
    import threading

    import uvicorn

    from tests.conftest import free_port

    app, _, _ = make_server(demo_tokenizer, limit_concurrency=4)
    port = free_port()
    config = uvicorn_config(app, app.state.server.settings)
    config.port, config.loop, config.log_level = port, "asyncio", "warning"
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    idle = []
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(url + "/health").status_code == 200
        for _ in range(4):
            idle.append(socket.create_connection(("127.0.0.1", port)))
        time.sleep(0.2)
        assert httpx.get(url + "/health").status_code == 503
        for s in idle:
            s.close()
        time.sleep(0.2)
        assert httpx.get(url + "/health").status_code == 200
    finally:
        for s in idle:
            s.close()
        server.should_exit = True
        thread.join(10)
