"""Speculative decoding (vLLM's n-gram proposer) on the real engine.

With greedy sampling the target model accepts a proposed token only if it is the
one it would have picked, so outputs must equal a non-speculative server's; vLLM
promises that "up to hardware numerics", and on this CPU in float32 they are equal
token for token (checked here on prompts the proposer does and does not match).
"""

from __future__ import annotations

import json
import re

import httpx
import pytest

from tests.conftest import ServerProcess
from tests.integration.conftest import NGRAM

K = NGRAM["num_speculative_tokens"]
REWRITE = (
    "def mean(xs):\n    total = 0\n    for x in xs:\n        total += x\n"
    "    return total / len(xs)\n"
    "\n# The same function, renamed to average:\ndef average(xs):\n    total = 0\n"
)
PROMPTS = [REWRITE, "import os\nimport sys\nimport os\nimport", "def fibonacci(n):", "class Stack:"]


@pytest.fixture(scope="module")
def speculative(engine_features) -> ServerProcess:
    return engine_features  # n-gram speculation (structured outputs configured too)


def complete(srv: ServerProcess, prompt: str, **extra) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": 64, "temperature": 0, **extra}
    return httpx.post(srv.base_url + "/v1/completions", json=body, timeout=120)


def spec_counters(srv: ServerProcess) -> dict[str, float]:
    text = httpx.get(srv.base_url + "/metrics", timeout=5).text
    found = re.findall(r"^codellama_serve_spec_decode_(\w+?)_total(\{[^}]*\})? (\S+)$", text, re.M)
    return {name + labels: float(value) for name, labels, value in found}


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_outputs_equal_the_non_speculative_server(server, speculative, prompt):
    plain = complete(server, prompt).json()["choices"][0]["text"]
    r = complete(speculative, prompt)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == plain
    assert r.json()["usage"]["completion_tokens"] == 64


def test_acceptance_counters_move(speculative):
    before = spec_counters(speculative)
    assert len([k for k in before if k.startswith("num_accepted_tokens_per_pos")]) == K
    for prompt in PROMPTS:
        assert complete(speculative, prompt, max_tokens=128).status_code == 200
    after = spec_counters(speculative)
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    assert delta["num_drafts"] > 0 and delta["num_draft_tokens"] >= delta["num_drafts"]
    assert 0 < delta["num_accepted_tokens"] <= delta["num_draft_tokens"]
    per_pos = [delta[f'num_accepted_tokens_per_pos{{position="{i}"}}'] for i in range(K)]
    # The i-th proposed token counts only if all before it were accepted.
    assert per_pos == sorted(per_pos, reverse=True)
    assert sum(per_pos) == delta["num_accepted_tokens"]
    rate = delta["num_accepted_tokens"] / delta["num_draft_tokens"]
    positions = [round(p / delta["num_drafts"], 2) for p in per_pos]
    print(f"acceptance {rate:.2f}, per position {positions}")


def test_streaming_equals_non_streaming(speculative):
    whole = complete(speculative, REWRITE).json()["choices"][0]["text"]
    body = {"prompt": REWRITE, "max_tokens": 64, "temperature": 0, "stream": True}
    parts = []
    with httpx.stream(
        "POST", speculative.base_url + "/v1/completions", json=body, timeout=120
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                parts += [c["text"] for c in json.loads(line[6:])["choices"]]
    assert "".join(parts) == whole


def test_constraints_hold_under_speculation(speculative):
    r = complete(speculative, REWRITE, n=3, temperature=1.0, seed=5,
                 structured_outputs={"regex": r"(total|xs)( [+/] (total|xs)){1,3}"})  # fmt: skip
    assert r.status_code == 200, r.text
    for c in r.json()["choices"]:
        assert re.fullmatch(r"(total|xs)( [+/] (total|xs)){1,3}", c["text"]), c["text"]


def test_sampling_options_speculation_cannot_serve_are_400(speculative):
    # (vLLM drops min_p under greedy sampling, so this samples.)
    r = complete(speculative, "x", min_p=0.1, temperature=1.0)
    assert r.status_code == 400, r.text
    assert "min_p" in r.json()["error"]["message"]
    assert complete(speculative, "x", max_tokens=2).status_code == 200
