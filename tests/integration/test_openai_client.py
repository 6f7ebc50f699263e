"""The real vLLM engine on the demo model, driven with the official `openai` client."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest

from engine.codellama import ChatMessage, CodeLlamaPrompts

MODEL = "codellama-serve-demo"


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.openai_base_url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def aclient(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.openai_base_url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def prompts(demo_tokenizer) -> CodeLlamaPrompts:
    return CodeLlamaPrompts(demo_tokenizer)


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_completion(client, prompts):
    r = client.completions.create(model=MODEL, prompt="def fib(n):", max_tokens=12, temperature=0)
    c = r.choices[0]
    assert c.finish_reason in ("stop", "length") and c.text
    assert r.usage.prompt_tokens == len(prompts.completion("def fib(n):"))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_usage_equals_token_count(client):
    r = client.completions.create(
        model=MODEL, prompt="import os\n", max_tokens=20, temperature=0.8, seed=3, logprobs=1
    )
    assert len(r.choices[0].logprobs.tokens) == r.usage.completion_tokens
    assert r.usage.completion_tokens <= 20


def test_completion_stream_matches_non_stream(client):
    kwargs = dict(model=MODEL, prompt="class Stack:", max_tokens=16, temperature=0)
    whole = client.completions.create(**kwargs)
    stream = client.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    )
    texts, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            texts.append(c.text)
            finish = c.finish_reason or finish
    assert "".join(texts) == whole.choices[0].text
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert finish == whole.choices[0].finish_reason


def test_chat(client, prompts):
    messages = [
        {"role": "system", "content": "You write Python."},
        {"role": "user", "content": "Write a function that reverses a string."},
    ]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content
    expected = prompts.chat([ChatMessage(m["role"], m["content"]) for m in messages])
    assert r.usage.prompt_tokens == len(expected)


def test_chat_stream(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0,
        stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content
    assert chunks[-1].usage.completion_tokens == 8


def test_n_choices(client):
    r = client.completions.create(
        model=MODEL, prompt="def ", max_tokens=8, n=3, temperature=1.0, seed=7
    )
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == sum(8 for _ in r.choices)
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4, n=2, temperature=1
    )
    assert len(chat.choices) == 2


def test_seed_reproducible(client):
    kwargs = dict(model=MODEL, prompt="for i in", max_tokens=10, temperature=1.0, seed=1234)
    assert client.completions.create(**kwargs).choices[0].text == (
        client.completions.create(**kwargs).choices[0].text
    )


def test_stop_string(client):
    base = client.completions.create(model=MODEL, prompt="def f(x):", max_tokens=16, temperature=0)
    text = base.choices[0].text
    stop = text.strip()[:2]
    assert stop, text
    r = client.completions.create(
        model=MODEL, prompt="def f(x):", max_tokens=16, temperature=0, stop=[stop]
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == text[: text.index(stop)]


def test_stop_token_ids_end_generation(client, demo_tokenizer):
    """Infilling stops at <EOT> through stop_token_ids: the engine must honour them."""
    kwargs = dict(model=MODEL, prompt="def fibonacci(n):", max_tokens=24, temperature=0)
    text = client.completions.create(**kwargs).choices[0].text
    assert "\n" in text, text
    newline = demo_tokenizer.convert_tokens_to_ids("<0x0A>")  # newlines are byte tokens
    r = client.completions.create(**kwargs, extra_body={"stop_token_ids": [newline]})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == text[: text.index("\n")]


def test_infill_with_suffix(client, prompts):
    prefix, suffix = "def add(a, b):\n    ", "\n    return c\n"
    r = client.completions.create(
        model=MODEL, prompt=prefix, suffix=suffix, max_tokens=16, temperature=0
    )
    assert r.usage.prompt_tokens == len(prompts.infill(prefix, suffix))
    assert r.choices[0].finish_reason in ("stop", "length")
    assert "<EOT>" not in r.choices[0].text and "<MID>" not in r.choices[0].text
    spm = client.completions.create(
        model=MODEL, prompt=prefix, suffix=suffix, max_tokens=4, temperature=0,
        extra_body={"suffix_first": True},
    )  # fmt: skip
    assert spm.usage.prompt_tokens == len(prompts.infill(prefix, suffix, suffix_first=True))


def test_echo_and_logprobs(client, prompts):
    r = client.completions.create(
        model=MODEL, prompt="import sys", max_tokens=3, temperature=0, echo=True, logprobs=2
    )
    c = r.choices[0]
    assert c.text.startswith("import sys")
    lp = c.logprobs
    # The prompt's tokens (without our BOS) then the 3 generated ones.
    assert len(lp.tokens) == len(prompts.completion("import sys")) - 1 + 3
    assert all(len(t) <= 3 for t in lp.top_logprobs)


def test_context_window_error(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x " * 2000, max_tokens=100)
    assert "2048" in str(e.value) and "100 for the completion" in str(e.value)


def test_bad_dialog_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        )
    assert "alternating" in str(e.value)


async def test_disconnect_mid_stream_leaves_the_engine_idle(aclient, server):
    async def start_and_leave() -> None:
        stream = await aclient.completions.create(
            model=MODEL, prompt="def loop():", max_tokens=1500, temperature=0, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        n = 0
        async for _ in stream:
            n += 1
            if n == 3:
                break
        await stream.close()

    await asyncio.gather(*(start_and_leave() for _ in range(8)))
    deadline = time.monotonic() + 2.0
    while True:
        running = server.metric("codellama_serve_requests_running")
        waiting = server.metric("codellama_serve_requests_waiting")
        if running == 0 and waiting == 0:
            break
        assert time.monotonic() < deadline, (running, waiting)
        await asyncio.sleep(0.05)


def test_prefix_cache_counters_see_a_repeated_prompt(client, server):
    prompt = "def shared_prefix_of_a_file(x):\n" + "    y = x + 1\n" * 40
    queries = server.metric("codellama_serve_prefix_cache_queries_total")
    hits = server.metric("codellama_serve_prefix_cache_hits_total")
    for _ in range(2):
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0)
    assert server.metric("codellama_serve_prefix_cache_queries_total") > queries
    # The second request finds the first one's full blocks in the cache.
    assert server.metric("codellama_serve_prefix_cache_hits_total") - hits >= 16
