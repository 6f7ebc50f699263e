"""HTTP-layer behaviour against a FakeEngine (no model): errors, framing, cancellation."""

from __future__ import annotations

import contextlib
import json
import time

import httpx
import pytest

from engine.api.app import create_app
from engine.config import build_settings, resolve
from tests.conftest import free_port
from tests.fakes import FakeEngine, serve_in_thread


def make_server(tokenizer, *, step_delay=0.0, load_delay=0.0, **server_settings):
    settings = build_settings(env={}, overrides=server_settings)
    engine = FakeEngine(tokenizer, step_delay=step_delay, load_delay=load_delay)
    fatal = []
    app = create_app(resolve(settings, gpu=False), engine, on_fatal=lambda: fatal.append(True))
    return app, engine, fatal


@contextlib.contextmanager
def serving(app):
    """The app on a free port in a thread, once /ready answers 200; yields its URL."""
    port = free_port()
    with serve_in_thread(app, port):
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        while httpx.get(url + "/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        yield url


@pytest.fixture(scope="module")
def fake(demo_tokenizer):
    app, engine, _ = make_server(demo_tokenizer, step_delay=0.002, request_timeout_s=2.0,
                                     max_body_bytes=64 * 1024)  # fmt: skip
    with serving(app) as url:
        yield url, engine, app


def post(url, path, body, **kw):
    kw.setdefault("timeout", 10)
    return httpx.post(url + path, json=body, **kw)


def assert_openai_error(r, status, param=None, fragment=""):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert fragment in err["message"]
    if param is not None:
        assert err["param"] == param
    return err


@pytest.mark.parametrize(
    ("path", "body", "param", "fragment"),
    [
        ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, "max_tokens", "valid integer"),
        ("/v1/completions", {"prompt": "x", "temperature": 3}, "temperature", "less than"),
        ("/v1/completions", {"prompt": "x", "n": 0}, "n", "greater than"),
        ("/v1/completions", {"prompt": "x", "n": 99}, "n", "at most"),
        ("/v1/completions", {"prompt": []}, "prompt", ""),
        ("/v1/completions", {}, "prompt", "Field required"),
        ("/v1/completions", {"prompt": "x", "logprobs": 50}, "logprobs", "at most"),
        ("/v1/completions", {"prompt": "x", "best_of": 3}, "best_of", "best_of"),
        ("/v1/completions", {"prompt": [5, 99999]}, "prompt", "out of range"),
        ("/v1/completions", {"prompt": [1, 2], "suffix": "x"}, "prompt", "text prompts"),
        ("/v1/completions", {"prompt": "a", "suffix": "b", "echo": True}, "echo", "suffix"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 1000}, "max_tokens", "256 tokens"),
        ("/v1/completions", {"prompt": "x", "stop": ["a"] * 20}, "stop", "at most 16"),
        ("/v1/chat/completions", {"messages": []}, "messages", "at least one"),
        ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "x"}]},
         "messages", "expected role 'user'"),
        ("/v1/chat/completions", {"messages": [{"role": "user"}], "tools": [{}]}, "tools", ""),
        ("/v1/chat/completions", {"messages": "hi"}, "messages", ""),
    ],
)  # fmt: skip
def test_bad_input_is_a_400_in_openai_format(fake, path, body, param, fragment):
    url, _, _ = fake
    err = assert_openai_error(post(url, path, body), 400, param, fragment)
    assert err["type"] == "invalid_request_error"


def test_context_error_names_both_numbers(fake):
    url, _, _ = fake
    r = post(url, "/v1/completions", {"prompt": "word " * 300, "max_tokens": 10})
    err = assert_openai_error(r, 400, "max_tokens")
    assert "256" in err["message"] and "10 for the completion" in err["message"]
    assert err["code"] == "context_length_exceeded"


def test_malformed_and_non_utf8_bodies(fake):
    url, _, _ = fake
    for raw in (b'{"prompt": "x",', b"\xff\xfe\x00garbage", b"[1, 2]", b""):
        r = httpx.post(url + "/v1/completions", content=raw,
                       headers={"content-type": "application/json"})  # fmt: skip
        assert_openai_error(r, 400)


def test_oversized_body_is_413(fake):
    url, _, _ = fake
    r = post(url, "/v1/completions", {"prompt": "x" * 100_000})
    assert_openai_error(r, 413, fragment="exceeds the limit")


def test_unknown_model_is_404(fake):
    url, _, _ = fake
    err = assert_openai_error(post(url, "/v1/completions", {"prompt": "x", "model": "gpt-4"}), 404)
    assert err["code"] == "model_not_found"
    assert_openai_error(httpx.get(url + "/v1/models/gpt-4"), 404)


def test_unknown_route_and_method(fake):
    url, _, _ = fake
    assert_openai_error(httpx.get(url + "/v2/nothing"), 404, fragment="Unknown endpoint")
    assert_openai_error(httpx.get(url + "/v1/completions"), 405)


def test_request_id_header(fake):
    url, _, _ = fake
    r = httpx.get(url + "/health")
    assert len(r.headers["x-request-id"]) == 32
    r = httpx.get(url + "/health", headers={"X-Request-Id": "client-abc.1"})
    assert r.headers["x-request-id"] == "client-abc.1"
    r = httpx.get(url + "/health", headers={"X-Request-Id": "bad id/x"})
    assert r.headers["x-request-id"] != "bad id/x"


def sse_events(text: str) -> list[str]:
    assert text.endswith("\n\n")
    events = text.strip("\n").split("\n\n")
    assert all(e.startswith("data: ") for e in events), events
    return [e[len("data: ") :] for e in events]


def test_completion_stream_framing(fake):
    url, _, _ = fake
    r = post(url, "/v1/completions", {"prompt": "x", "max_tokens": 3, "stream": True,
                                      "stream_options": {"include_usage": True}})  # fmt: skip
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["text"] for c in chunks[:-1]] == ["t0 ", "t1 ", "t2 "]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None, None, "length"]
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3


def test_chat_stream_starts_with_the_role(fake):
    url, _, _ = fake
    r = post(
        url,
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True},
    )
    chunks = [json.loads(e) for e in sse_events(r.text)[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "t0 t1 "
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_multiple_prompts_and_n(fake):
    url, _, _ = fake
    r = post(url, "/v1/completions", {"prompt": ["a", "b"], "n": 2, "max_tokens": 2})
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert all(c["text"] == "t0 t1 " for c in body["choices"])
    assert body["usage"]["completion_tokens"] == 8


def test_streaming_disconnect_aborts(fake):
    url, engine, _ = fake
    body = {"prompt": "x", "max_tokens": 200, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body) as r:
        next(r.iter_lines())
    deadline = time.monotonic() + 2
    while engine.running:
        assert time.monotonic() < deadline, engine.running
        time.sleep(0.02)
    assert engine.requests[-1][0] in engine.aborted


def test_non_streaming_disconnect_aborts(fake):
    url, engine, _ = fake
    with pytest.raises(httpx.ReadTimeout):
        post(url, "/v1/completions", {"prompt": "x", "max_tokens": 200}, timeout=0.1)
    deadline = time.monotonic() + 2
    while engine.running:
        assert time.monotonic() < deadline, engine.running
        time.sleep(0.02)
    assert engine.requests[-1][0] in engine.aborted


def test_timeout_aborts_with_504(demo_tokenizer):
    app, engine, _ = make_server(demo_tokenizer, step_delay=0.05, request_timeout_s=0.3)
    with serving(app) as url:
        err = assert_openai_error(
            post(url, "/v1/completions", {"prompt": "x", "max_tokens": 200}), 504
        )
        assert err["code"] == "request_timeout"
        r = post(url, "/v1/completions", {"prompt": "x", "max_tokens": 200, "stream": True})
        events = sse_events(r.text)
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "request_timeout"
        assert len(engine.aborted) == 2


def test_loading_is_503_and_health_stays_up(demo_tokenizer):
    app, _, _ = make_server(demo_tokenizer, load_delay=3)
    port = free_port()
    with serve_in_thread(app, port):
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(url + "/health").json() == {"status": "loading"}
        assert httpx.get(url + "/ready").status_code == 503
        r = post(url, "/v1/completions", {"prompt": "x"})
        err = assert_openai_error(r, 503)
        assert err["code"] == "model_loading" and r.headers["retry-after"]


def test_draining_refuses_new_work(fake):
    url, _, app = fake
    state = app.state.server
    state.draining = True
    try:
        assert httpx.get(url + "/ready").json() == {"status": "draining"}
        err = assert_openai_error(post(url, "/v1/completions", {"prompt": "x"}), 503)
        assert err["code"] == "draining"
    finally:
        state.draining = False


def test_engine_death(demo_tokenizer):
    app, engine, fatal = make_server(demo_tokenizer, step_delay=0.05)
    with serving(app) as url:
        body = {"prompt": "x", "max_tokens": 100, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            next(lines)
            engine.die()
            rest = "\n".join(lines)
        assert '"engine_dead"' in rest and rest.rstrip().endswith("data: [DONE]")
        assert httpx.get(url + "/health").status_code == 503
        err = assert_openai_error(post(url, "/v1/completions", {"prompt": "x"}), 503)
        assert err["code"] == "engine_dead"
        deadline = time.monotonic() + 3
        while not fatal:
            assert time.monotonic() < deadline, "the watchdog did not ask the process to exit"
            time.sleep(0.05)


def test_metrics_count_requests_by_status(fake):
    url, _, _ = fake
    post(url, "/v1/completions", {"prompt": "x", "max_tokens": 1})
    post(url, "/v1/completions", {"prompt": "x", "model": "nope"})
    text = httpx.get(url + "/metrics").text
    assert 'codellama_serve_requests_total{endpoint="completions",status="200"}' in text
    assert "codellama_serve_time_to_first_token_seconds_bucket" in text
    assert "codellama_serve_requests_running" in text


def test_api_keys_gate_the_api_not_the_probes(demo_tokenizer, tmp_path, caplog):
    app, _, _ = make_server(demo_tokenizer, api_keys="sk-good-key", access_log=True)
    with serving(app) as url:
        r = post(url, "/v1/completions", {"prompt": "x", "max_tokens": 1})
        err = assert_openai_error(r, 401, fragment="Missing API key")
        assert err["type"] == "authentication_error" and r.headers["www-authenticate"]
        bad = {"Authorization": "Bearer sk-wrong"}
        assert_openai_error(httpx.get(url + "/v1/models", headers=bad), 401, fragment="Incorrect")
        good = {"Authorization": "Bearer sk-good-key"}
        assert (
            post(url, "/v1/completions", {"prompt": "x", "max_tokens": 1}, headers=good).status_code
            == 200
        )
        for path in ("/health", "/ready", "/metrics"):
            assert httpx.get(url + path).status_code == 200
        assert (
            'codellama_serve_requests_refused_total{reason="unauthorized"} 2.0'
            in httpx.get(url + "/metrics").text
        )
    assert "sk-good-key" not in caplog.text and "sk-wrong" not in caplog.text


def test_closed_probes(demo_tokenizer):
    app, _, _ = make_server(demo_tokenizer, api_keys="k", auth_open_ops_endpoints=False)
    port = free_port()
    with serve_in_thread(app, port):
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(url + "/metrics").status_code == 401
        assert httpx.get(url + "/health", headers={"Authorization": "Bearer k"}).status_code == 200


def test_the_start_up_heap_is_frozen_while_serving(demo_tokenizer):
    # Fake engine, real lifespan: what start-up allocated is kept out of the
    # GC's walks while the server runs, and handed back at shutdown.
    import gc

    gc.unfreeze()
    app, _, _ = make_server(demo_tokenizer)
    with serving(app):
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0
