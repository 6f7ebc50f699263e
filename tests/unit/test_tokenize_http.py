"""/tokenize and /detokenize over the HTTP layer (FakeEngine, the demo model's real
tokenizer), and structured-output fields reaching the engine's SamplingOptions.
The same checks against the real engine are in tests/integration/test_tokenize.py."""

from __future__ import annotations

import httpx
import pytest

from engine.codellama import ChatMessage, CodeLlamaPrompts
from engine.llm import OutputConstraint
from tests.unit.test_http_layer import assert_openai_error, make_server, post, serving

CODE = "def add(a, b):\n    return a + b\n"


@pytest.fixture(scope="module")
def fake(demo_tokenizer):
    app, engine, _ = make_server(demo_tokenizer)
    with serving(app) as url:
        yield url, engine


@pytest.fixture(scope="module")
def prompts(demo_tokenizer) -> CodeLlamaPrompts:
    return CodeLlamaPrompts(demo_tokenizer)


def test_completion_form_is_what_completions_send(fake, prompts, demo_tokenizer):
    url, _ = fake
    r = post(url, "/tokenize", {"prompt": CODE})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body == {
        "count": len(prompts.completion(CODE)),
        "max_model_len": 256,  # the fake's context window
        "tokens": prompts.completion(CODE),
        "token_strs": None,
    }
    assert body["tokens"][0] == demo_tokenizer.bos_token_id
    bare = post(url, "/tokenize", {"prompt": CODE, "add_special_tokens": False}).json()
    assert bare["tokens"] == body["tokens"][1:]
    strs = post(url, "/tokenize", {"prompt": CODE, "return_token_strs": True}).json()
    assert strs["token_strs"] == demo_tokenizer.convert_ids_to_tokens(body["tokens"])
    assert strs["token_strs"][0] == "<s>"


def test_infill_and_chat_forms(fake, prompts):
    url, _ = fake
    r = post(url, "/tokenize", {"prompt": "def f(x):\n    ", "suffix": "\n    return y\n"})
    assert r.json()["tokens"] == prompts.infill("def f(x):\n    ", "\n    return y\n")
    spm = post(url, "/tokenize", {"prompt": "a", "suffix": "b", "suffix_first": True}).json()
    assert spm["tokens"] == prompts.infill("a", "b", suffix_first=True)
    messages = [
        {"role": "system", "content": "You write Python."},
        {"role": "user", "content": "Reverse a string."},
    ]
    chat = post(url, "/tokenize", {"messages": messages}).json()
    assert chat["tokens"] == prompts.chat([ChatMessage(m["role"], m["content"]) for m in messages])
    # Code Llama's template has no separate generation prompt.
    same = post(url, "/tokenize", {"messages": messages, "add_generation_prompt": False}).json()
    assert same["tokens"] == chat["tokens"]


def test_detokenize_round_trip(fake, prompts, demo_tokenizer):
    url, _ = fake
    ids = prompts.completion(CODE)
    r = post(url, "/detokenize", {"tokens": ids})
    assert r.status_code == 200, r.text
    assert r.json() == {"prompt": demo_tokenizer.decode(ids)}
    assert r.json()["prompt"].startswith("<s>")
    assert post(url, "/detokenize", {"tokens": []}).json() == {"prompt": ""}


@pytest.mark.parametrize(
    ("path", "body", "param", "fragment"),
    [
        ("/tokenize", {}, "prompt", "Field required"),
        ("/tokenize", {"prompt": 5}, "prompt", "valid string"),
        ("/tokenize", {"prompt": ["a", "b"]}, "prompt", "valid string"),
        ("/tokenize", {"prompt": "x", "add_special_tokens": "yes"}, "add_special_tokens", ""),
        ("/tokenize", {"messages": "hi"}, "messages", "valid list"),
        ("/tokenize", {"messages": []}, "messages", "at least one"),
        ("/tokenize", {"messages": [{"role": "assistant", "content": "x"}]}, "messages",
         "expected role 'user'"),
        ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "add_special_tokens": True},
         "add_special_tokens", "places BOS and EOS itself"),
        ("/tokenize", {"messages": [{"role": "user", "content": "x"}],
                       "continue_final_message": True}, "continue_final_message", ""),
        ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "chat_template": "{{x}}"},
         "chat_template", ""),
        ("/detokenize", {}, "tokens", "Field required"),
        ("/detokenize", {"tokens": [1, 99999]}, "tokens", "out of range"),
        ("/detokenize", {"tokens": [-1]}, "tokens", "greater than or equal to 0"),
        ("/detokenize", {"tokens": "abc"}, "tokens", "valid list"),
    ],
)  # fmt: skip
def test_bad_input_is_a_400(fake, path, body, param, fragment):
    url, _ = fake
    assert_openai_error(post(url, path, body), 400, param, fragment)


def test_unknown_model_and_malformed_body(fake):
    url, _ = fake
    assert_openai_error(post(url, "/tokenize", {"model": "gpt-4", "prompt": "x"}), 404, "model")
    assert_openai_error(post(url, "/detokenize", {"model": "gpt-4", "tokens": [1]}), 404, "model")
    for raw in (b"{not json", b"\xff\xfe\x00garbage", b""):
        r = httpx.post(url + "/tokenize", content=raw,
                       headers={"content-type": "application/json"}, timeout=10)  # fmt: skip
        assert_openai_error(r, 400)
    assert_openai_error(post(url, "/tokenize", [1, 2]), 400)


def test_tokenizer_endpoints_need_an_api_key(demo_tokenizer):
    app, _, _ = make_server(demo_tokenizer, api_keys="sk-tok")
    with serving(app) as url:
        for path, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]})):
            assert_openai_error(post(url, path, body), 401)
            ok = post(url, path, body, headers={"Authorization": "Bearer sk-tok"})
            assert ok.status_code == 200, ok.text


def test_constraints_reach_the_engine_as_sampling_options(fake):
    url, engine = fake
    body = {"prompt": "x", "max_tokens": 2, "structured_outputs": {"choice": ["a", "b"]}}
    assert post(url, "/v1/completions", body).status_code == 200
    assert engine.requests[-1][2].constraint == OutputConstraint("choice", ["a", "b"])
    chat = {
        "messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
        "response_format": {"type": "json_object"},
    }  # fmt: skip
    assert post(url, "/v1/chat/completions", chat).status_code == 200
    assert engine.requests[-1][2].constraint == OutputConstraint("json_object", True)
    assert post(url, "/v1/completions", {"prompt": "x", "max_tokens": 2}).status_code == 200
    assert engine.requests[-1][2].constraint is None
