"""The request path hands each request's class priority to the engine (a named fake engine:
this is HTTP-layer logic; tests/integration/test_priority.py has the real engine)."""

from __future__ import annotations

import httpx
import pytest

from tests.unit.test_http_layer import make_server, serving

KEYS = "sk-ci name=ci priority=batch, sk-ed name=ed priority=interactive, sk-plain name=plain"


def completion(url: str, key: str, **body) -> httpx.Response:
    body = {"prompt": "def f():", "max_tokens": 2, **body}
    return httpx.post(url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {key}"}, timeout=10)  # fmt: skip


@pytest.mark.parametrize("policy", ["priority", "fcfs"])
def test_the_engine_gets_the_class_priority_only_in_priority_mode(demo_tokenizer, policy):
    app, engine, _ = make_server(demo_tokenizer, api_keys=KEYS, scheduling_policy=policy)
    with serving(app) as url:
        cases = [("sk-ci", {}, "batch", 20), ("sk-ed", {}, "interactive", 0),
                 ("sk-plain", {}, "default", 10), ("sk-ci", {"priority": 0}, "batch", 20),
                 ("sk-ed", {"priority": 15}, "default", 15),
                 ("sk-ed", {"priority": "batch", "stream": True}, "batch", 20)]  # fmt: skip
        for key, extra, cls, priority in cases:
            r = completion(url, key, **extra)
            assert r.status_code == 200, r.text
            assert r.headers["x-codellama-priority-class"] == cls
            sent = engine.requests[-1][2].priority
            assert sent == (priority if policy == "priority" else 0), (key, extra)
        text = httpx.get(url + "/metrics").text
        assert 'codellama_serve_class_priority_clamped_total{priority_class="batch"} 1.0' in text
        assert (
            'codellama_serve_class_requests_total{priority_class="interactive",status="200"}'
            in text
        )


def test_a_bad_priority_is_a_400(demo_tokenizer):
    app, _, _ = make_server(demo_tokenizer, scheduling_policy="priority")
    with serving(app) as url:
        for bad in (True, 1.5, "", 2**63, [1]):
            r = completion(url, "none", priority=bad)
            assert r.status_code == 400, (bad, r.text)
            assert r.json()["error"]["param"] == "priority"
