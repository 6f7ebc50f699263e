"""The routing key: the token ids the engine sees, for FIM, chat and plain completions.

Golden sequences on the demo tokenizer (pieces spelled out, or SentencePiece's own
encoding for longer texts, as in test_codellama.py), and the key checked against
what the API really hands the engine (the HTTP layer on a named fake engine).
"""

from __future__ import annotations

import inspect

import httpx
import pytest

from engine import prefix_routing
from engine.codellama import CodeLlamaPrompts
from engine.routing_key import block_hashes, engine_prompt, session_key
from tests.unit.test_http_layer import make_server, serving

BOS, EOS = 1, 2


@pytest.fixture(scope="module")
def prompts(demo_tokenizer) -> CodeLlamaPrompts:
    return CodeLlamaPrompts(demo_tokenizer)


@pytest.fixture(scope="module")
def ids(demo_sp):
    def to_ids(*pieces: str) -> list[int]:
        out = [demo_sp.piece_to_id(p) for p in pieces]
        assert [demo_sp.id_to_piece(i) for i in out] == list(pieces)
        return out

    return to_ids


def test_fim_key_is_bos_pre_then_the_prefix(prompts, ids):
    s = prompts.ids
    key = engine_prompt(prompts, {"prompt": "def add(a, b):\n", "suffix": "    return x"})
    assert key == (
        [BOS, s.prefix]
        + ids("▁def", "▁add", "(", "a", ",", "▁b", "):", "<0x0A>")
        + [s.suffix]
        + ids("▁▁▁▁", "return", "▁x")
        + [s.middle]
    )


def test_fim_suffix_first_key_leads_with_the_suffix(prompts, ids):
    s = prompts.ids
    body = {"prompt": "def add(a, b):\n", "suffix": "    return x", "suffix_first": True}
    assert engine_prompt(prompts, body) == (
        [BOS, s.prefix, s.suffix]
        + ids("▁▁▁▁", "return", "▁x")
        + [s.middle]
        + ids("▁def", "▁add", "(", "a", ",", "▁b", "):", "<0x0A>")
    )


def test_chat_key_is_system_and_earlier_turns_first(prompts, demo_sp):
    body = {
        "messages": [
            {"role": "system", "content": "Answer in Python."},
            {"role": "user", "content": "Sort a list."},
            {"role": "assistant", "content": [{"type": "text", "text": "sorted(xs)"}]},
            {"role": "user", "content": "Reverse it."},
        ]
    }
    assert engine_prompt(prompts, body) == (
        [BOS]
        + demo_sp.encode(
            "[INST] <<SYS>>\nAnswer in Python.\n<</SYS>>\n\nSort a list. [/INST] sorted(xs) "
        )
        + [EOS, BOS]
        + demo_sp.encode("[INST] Reverse it. [/INST]")
    )


def test_plain_completion_key(prompts, ids, demo_sp):
    assert engine_prompt(prompts, {"prompt": "def add(a, b):\n"}) == [BOS] + ids(
        "▁def", "▁add", "(", "a", ",", "▁b", "):", "<0x0A>"
    )
    code = inspect.getsource(prefix_routing)[:1500]
    assert engine_prompt(prompts, {"prompt": code}) == [BOS] + demo_sp.encode(code)


def test_token_ids_and_prompt_lists(prompts):
    assert engine_prompt(prompts, {"prompt": [5, 6, 7]}) == [5, 6, 7]
    assert engine_prompt(prompts, {"prompt": [[5, 6], [7]]}) == [5, 6]
    assert engine_prompt(prompts, {"prompt": ["a", "b"]}) == prompts.completion("a")


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"model": "x"},
        {"prompt": []},
        {"prompt": "x", "max_tokens": "5"},  # the API's 400s have no key
        {"messages": [{"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": "[INST] x"}]},
        {"prompt": [1, 2], "suffix": "x"},
    ],
)
def test_requests_the_api_refuses_have_no_key(prompts, body):
    assert engine_prompt(prompts, body) is None


def test_text_far_beyond_the_context_gets_no_key(prompts):
    """The router does not tokenize what the replica will refuse (400: context length)."""
    body = {"prompt": "x" * 600, "suffix": "y" * 500}
    assert engine_prompt(prompts, body, max_chars=1000) is None
    assert engine_prompt(prompts, body, max_chars=1100) is not None
    chat = {"messages": [{"role": "user", "content": [{"type": "text", "text": "z" * 900}]}]}
    assert engine_prompt(prompts, chat, max_chars=800) is None
    assert engine_prompt(prompts, chat, max_chars=900) is not None


def test_session_key_is_the_user_field():
    assert session_key({"user": "alice"}) == "alice"
    assert session_key({"user": ""}) is None
    assert session_key({"user": 5}) is None
    assert session_key({}) is None


def test_block_hashes_share_exactly_the_shared_full_blocks():
    a = list(range(100))
    b = list(range(90)) + [7] * 10
    ha, hb = block_hashes(a, 16), block_hashes(b, 16)
    assert len(ha) == 6  # 96 tokens in full blocks; the last 4 are never cached
    assert ha[:5] == hb[:5] and ha[5] != hb[5]  # tokens 80..95 differ from token 90 on
    # A change in the first block changes every later hash (each covers all before it).
    c = [99] + a[1:]
    assert not set(block_hashes(c, 16)) & set(ha)
    assert block_hashes(a[:15], 16) == []


def test_fim_requests_of_one_file_share_their_blocks(prompts):
    """Keystrokes further down one file: the prefix grows, the suffix changes; their
    keys share every block of the common prefix."""
    src = inspect.getsource(prefix_routing)
    first = engine_prompt(prompts, {"prompt": src[:3000], "suffix": src[3000:3400]})
    later = engine_prompt(prompts, {"prompt": src[:3050], "suffix": src[3050:3300]})
    assert first is not None and later is not None
    common = next(i for i, (x, y) in enumerate(zip(first, later, strict=False)) if x != y)
    h1, h2 = block_hashes(first, 128), block_hashes(later, 128)
    shared = common // 128
    assert shared >= 4
    assert h1[:shared] == h2[:shared]


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "sort"},
]


@pytest.fixture(scope="module")
def fake(demo_tokenizer):
    app, engine, _ = make_server(demo_tokenizer)
    with serving(app) as url:
        yield url, engine


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "def add(a, b):\n", "suffix": "    return a + b\n"}),
        ("/v1/completions", {"prompt": "import os\n", "suffix": "x", "suffix_first": True}),
        ("/v1/completions", {"prompt": "def f():"}),
        ("/v1/completions", {"prompt": [3, 4, 5]}),
        ("/v1/chat/completions", {"messages": CHAT}),
    ],
)
def test_key_is_what_the_api_hands_the_engine(fake, prompts, path, body):
    url, engine = fake
    r = httpx.post(url + path, json={**body, "max_tokens": 2}, timeout=10)
    assert r.status_code == 200, r.text
    _, sent, _ = engine.requests[-1]
    assert engine_prompt(prompts, body) == sent
