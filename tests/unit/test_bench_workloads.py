"""Shared-prefix groups, chat sessions, mixed datasets, and the profiles that run them."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from benchmarks.harness.client import Target
from benchmarks.harness.datasets import build_items
from benchmarks.harness.fake_server import FakeOpenAI, FakeServerThread
from benchmarks.harness.profile.files import load_profile
from benchmarks.harness.profile.schema import DatasetSpec, Profile
from benchmarks.harness.profile.workloads import SharedPrefixSpec
from benchmarks.harness.runner import Runner
from benchmarks.harness.shared_prefix import group_of, shared_prefix_items


def ids(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False).input_ids)


@pytest.mark.parametrize("text", ["code", "random"])
def test_shared_prefix_groups_have_the_stated_prefix_length_in_tokens(
    demo_tokenizer: Any, text: str
) -> None:
    spec = SharedPrefixSpec(
        groups=3, prefix_tokens=200, tail_tokens=30, requests_per_group=5, text=text
    )
    items = shared_prefix_items(spec, demo_tokenizer, np.random.default_rng(0))
    assert len(items) == 15
    groups: dict[str, list[list[int]]] = {}
    for it in items:
        groups.setdefault(group_of(it.id) or "", []).append(ids(demo_tokenizer, it.prompt or ""))
    assert len(groups) == 3
    heads = set()
    for prompts in groups.values():
        head = prompts[0][:200]
        heads.add(tuple(head))
        for p in prompts:
            assert p[:200] == head  # the same 200 tokens open every prompt of the group
            assert len(p) == 230  # + a 30-token tail of its own
        assert len({tuple(p[200:]) for p in prompts}) == 5  # the tails are distinct
        assert len({tuple(p[:201]) for p in prompts}) > 1  # and start right after the prefix
    assert len(heads) == 3  # groups do not share their prefix
    assert all(it.input_tokens == 231 for it in items)  # + BOS, as the server counts


def test_shared_prefix_chats_put_the_prefix_in_the_system_prompt(demo_tokenizer: Any) -> None:
    spec = SharedPrefixSpec(
        groups=2, prefix_tokens=100, tail_tokens=20, requests_per_group=3, chat=True
    )
    items = shared_prefix_items(spec, demo_tokenizer, np.random.default_rng(0))
    systems = {it.messages[0]["content"] for it in items if it.messages}
    assert len(systems) == 2 and all(len(ids(demo_tokenizer, s)) == 100 for s in systems)
    assert all(
        len(ids(demo_tokenizer, it.messages[1]["content"])) == 20 for it in items if it.messages
    )
    p = Profile.model_validate(
        {"dataset": {"type": "shared-prefix", "shared_prefix": {"chat": True}}, "num_requests": 1}
    )
    assert p.endpoint == "chat" and p.dataset.shares_prefixes


def test_datasets_that_share_prefixes_say_so() -> None:
    assert DatasetSpec(type="shared-prefix").shares_prefixes
    assert DatasetSpec(type="editor").shares_prefixes
    assert DatasetSpec(type="chat-sessions").shares_prefixes
    assert not DatasetSpec(type="humaneval").shares_prefixes
    mix = DatasetSpec(
        type="mix", parts=[DatasetSpec(type="humaneval"), DatasetSpec(type="shared-prefix")]
    )
    assert mix.shares_prefixes


def test_a_mix_repeats_and_stops_its_parts() -> None:
    spec = DatasetSpec.model_validate(
        {
            "type": "mix",
            "parts": [
                {"type": "humaneval", "limit": 3, "repeat": 2, "stop": ["\ndef"]},
                {"type": "infill", "limit": 4},
            ],
        }
    )
    items = build_items(spec, 0, lambda: None)
    assert len(items) == 10
    he = [it for it in items if it.task and not it.reference]
    assert len(he) == 6 and all(it.stop == ("\ndef",) for it in he)
    assert {it.id.split("#")[1] for it in he} == {"0", "1"}
    assert sum(1 for it in items if it.reference) == 4


def test_session_datasets_need_a_sessions_load_and_a_duration() -> None:
    with pytest.raises(ValidationError, match=r"run with `load: \{type: sessions\}`"):
        Profile.model_validate({"dataset": {"type": "editor"}, "num_requests": 3})
    with pytest.raises(ValidationError, match=r"run with `load: \{type: sessions\}`"):
        Profile.model_validate({"load": {"type": "sessions"}, "duration_s": 3})
    with pytest.raises(ValidationError, match="needs duration_s"):
        Profile.model_validate({"load": {"type": "sessions"}, "dataset": {"type": "editor"}})
    p = load_profile("editor")
    assert p.dataset.editor is not None and p.dataset.editor.debounce_ms == 75
    assert p.dataset.editor.max_tokens == 32 and p.dataset.editor.stop == ["\n\n"]


async def test_chat_sessions_resend_the_history_with_the_servers_own_answers(
    demo_tokenizer: Any,
) -> None:
    p = Profile.model_validate(
        {
            "load": {"type": "sessions", "sessions": 2, "stagger_s": 0},
            "duration_s": 1.5,
            "warmup_requests": 0,
            "dataset": {
                "type": "chat-sessions",
                "chat_sessions": {
                    "turns": {"mean": 3, "cv": 0},
                    "think_time_s": {"mean": 0.05, "cv": 0},
                },
            },
            "request": {"max_tokens": 5},
        }
    )
    seen: list[dict[str, Any]] = []
    app = FakeOpenAI(token_delay_s=0.002)
    orig = app.generate

    async def spy(send: Any, req: dict[str, Any], chat: bool, receive: Any = None) -> None:
        seen.append(req)
        await orig(send, req, chat, receive)

    app.generate = spy  # type: ignore[method-assign]
    with FakeServerThread(app) as srv:
        res = await Runner(p, Target(srv.base_url)).run()
    cs = res.sections["chat_sessions"]
    assert cs["turns_sent"] == len(res.records) == len(seen) > 6
    assert cs["conversations_completed"] >= 2 and set(cs["by_turn"]) >= {"1", "2", "3"}
    turns = [r for r in seen if len(r["messages"]) == 6]  # system, user, asst, user, asst, user
    assert turns
    roles = [m["role"] for m in turns[0]["messages"]]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user"]
    # The assistant turns are what the fake server answered.
    assert turns[0]["messages"][2]["content"] == " w0 w1 w2 w3 w4"
    assert res.summary["failed"] == 0


@pytest.mark.parametrize(
    ("queries", "hits", "aborts"),
    [
        (
            "codellama_serve_prefix_cache_queries_total",
            "codellama_serve_prefix_cache_hits_total",
            True,
        ),
        ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", False),
    ],
)
def test_prefix_cache_and_abort_counters_are_read_from_ours_and_vllms(
    queries: str, hits: str, aborts: bool
) -> None:
    from benchmarks.harness.server_metrics import Snapshot, deltas, parse, prefix_cache_hit_rate

    def scrape(t: float, q: float, h: float, aborted: float, tokens: float) -> Snapshot:
        lines = [
            f'{queries}{{engine="0",model_name="m"}} {q}',
            f'{hits}{{engine="0",model_name="m"}} {h}',
        ]
        if aborts:
            lines += [
                f'codellama_serve_requests_aborted_total{{reason="client_disconnect"}} {aborted}',
                'codellama_serve_requests_aborted_total{reason="timeout"} 1',
                "codellama_serve_aborted_generation_tokens_total"
                f'{{reason="client_disconnect"}} {tokens}',
            ]
        return Snapshot(t, parse("\n".join(lines) + "\n"))

    d = deltas(scrape(0, 1000, 100, 2, 10), scrape(1, 3000, 1600, 7, 60))
    assert prefix_cache_hit_rate(d) == pytest.approx(0.75)
    c = d["counters"]
    if aborts:
        assert c["aborted_by_label"] == {"reason=client_disconnect": 5}
        assert c["aborted_generation_tokens_by_label"] == {"reason=client_disconnect": 50}
    else:
        assert "aborted" not in c


def test_the_python_entry_point_takes_a_profile_a_dict_or_a_name() -> None:
    from benchmarks.harness.api import as_profile, split

    by_name = as_profile("editor", {"load": {"type": "sessions", "sessions": 3}})
    assert by_name.load.type == "sessions" and by_name.load.sessions == 3  # type: ignore[union-attr]
    by_dict = as_profile({"dataset": {"type": "shared-prefix"}, "num_requests": 5})
    assert by_dict.dataset.shared_prefix is not None and by_dict.num_requests == 5
    again = as_profile(by_dict, {"num_requests": 7})
    assert again.num_requests == 7 and by_dict.num_requests == 5
    with pytest.raises(ValueError, match="split by one of"):
        split([], by="password")
