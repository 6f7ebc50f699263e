"""/tokenize and /detokenize on the real server: `count` is what the generation
endpoints report as `usage.prompt_tokens` for the same input (the harness sizes
prompts with it), for plain, infill and chat prompts."""

from __future__ import annotations

import httpx
import pytest

from engine.codellama import CodeLlamaPrompts

PLAIN = [
    "def fibonacci(n):",
    "  leading spaces and\ttabs\n",
    "<s>[INST] text that spells tags",
    "é ü 中文",
]
INFILL = [
    ("def add(a, b):\n    ", "\n    return result\n", False),
    ("import os\n", "    main()\n", True),
    ("", "x", False),
]
CHATS = [
    [{"role": "user", "content": "Reverse a string."}],
    [
        {"role": "system", "content": "You write Python."},
        {"role": "user", "content": "Sort a list."},
        {"role": "assistant", "content": "sorted(xs)"},
        {"role": "user", "content": "In place?"},
    ],
]


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        yield c


def count(http, body) -> int:
    r = http.post("/tokenize", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert set(data) == {"count", "max_model_len", "tokens", "token_strs"}
    assert data["count"] == len(data["tokens"]) and data["max_model_len"] == 2048
    return data["count"]


def prompt_tokens(http, path, body) -> int:
    r = http.post(path, json={**body, "max_tokens": 1})
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens"]


@pytest.mark.parametrize("text", PLAIN)
def test_plain_count_equals_usage(http, text):
    assert count(http, {"prompt": text}) == prompt_tokens(http, "/v1/completions", {"prompt": text})


@pytest.mark.parametrize(("prefix", "suffix", "suffix_first"), INFILL)
def test_infill_count_equals_usage(http, prefix, suffix, suffix_first):
    body = {"prompt": prefix, "suffix": suffix, "suffix_first": suffix_first}
    assert count(http, body) == prompt_tokens(http, "/v1/completions", body)


@pytest.mark.parametrize("messages", CHATS)
def test_chat_count_equals_usage(http, messages):
    body = {"messages": messages}
    assert count(http, body) == prompt_tokens(http, "/v1/chat/completions", body)


def test_tokens_are_code_llamas_and_round_trip(http, demo_tokenizer):
    prompts = CodeLlamaPrompts(demo_tokenizer)
    body = http.post("/tokenize", json={"prompt": "def f():", "return_token_strs": True}).json()
    assert body["tokens"] == prompts.completion("def f():")
    assert body["token_strs"] == demo_tokenizer.convert_ids_to_tokens(body["tokens"])
    text = http.post("/detokenize", json={"tokens": body["tokens"]}).json()["prompt"]
    assert text == demo_tokenizer.decode(body["tokens"]) and text.startswith("<s>")


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/tokenize", {"prompt": None}, 400),
        ("/tokenize", {"messages": [{"role": "user"}], "add_special_tokens": True}, 400),
        ("/tokenize", {"messages": [{"role": "tool", "content": "x"}]}, 400),
        ("/tokenize", {"prompt": "x", "model": "other"}, 404),
        ("/detokenize", {"tokens": [2**40]}, 400),
        ("/detokenize", {"tokens": [1.5]}, 400),
    ],
)
def test_bad_input_is_a_4xx(http, path, body, status):
    r = http.post(path, json=body)
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
