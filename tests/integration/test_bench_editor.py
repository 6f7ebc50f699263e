"""Editor sessions and output scoring against the real engine (vLLM on the demo model):
cancelled requests are aborted in the engine (metrics and access log), and the quality
pipeline scores real outputs."""

from __future__ import annotations

import json
from typing import Any

from benchmarks.harness.client import Target
from benchmarks.harness.profile.files import load_profile
from benchmarks.harness.profile.schema import Profile
from benchmarks.harness.runner import Runner


def _aborted_log_lines(server: Any) -> int:
    n = 0
    for line in server.log().splitlines():
        start = line.find('{"ts"')
        if start >= 0 and json.loads(line[start:]).get("aborted") == "client_disconnect":
            n += 1
    return n


async def test_editor_keystrokes_abort_requests_in_the_engine(server: Any) -> None:
    profile = load_profile(
        "editor",
        {
            "duration_s": 8,
            "load": {"type": "sessions", "sessions": 4, "stagger_s": 0.5},
            "dataset": {"editor": {"repos": 2, "files": {"max_files": 8}}},
            "scrape_interval_s": 0.5,
        },
    )
    logged_before = _aborted_log_lines(server)
    result = await Runner(profile, Target(server.openai_base_url)).run()
    e = result.sections["editor"]
    assert e["requests_sent"] == len(result.records) > 10
    assert (
        e["completions_shown"] + e["requests_cancelled"] + e["requests_failed"]
        == e["requests_sent"]
    )
    assert e["requests_failed"] == 0, e["errors"]
    assert e["requests_cancelled"] > 0 and e["completions_shown"] > 0, e
    # The engine aborted what the keystrokes cancelled. Not all of them: a request can
    # finish in the engine just as the client gives up on it, and one cancelled a moment
    # after it was sent may never reach it (a busy machine makes more of both).
    aborted = e["server_aborted_client_disconnect"]
    assert 0.5 * e["requests_cancelled"] <= aborted <= e["requests_cancelled"]
    reached = aborted + (e["server_completed_but_cancelled"] or 0)
    assert reached <= e["requests_cancelled"]
    assert _aborted_log_lines(server) - logged_before == aborted
    assert e["wasted_output_tokens"]["source"] == "server"
    assert e["prefix_cache_hit_rate"] is not None and e["prefix_cache_hit_rate"] > 0.2
    # What the server booked as generated (its 200s) is what the shown completions brought,
    # plus what the requests it finished just as the client gave up on them brought: at
    # least one token each, at most max_tokens.
    booked = result.server["counters"]["generation_tokens"]
    shown_tokens = result.summary["total_output_tokens"]
    finished_unseen = int(e["server_completed_but_cancelled"] or 0)
    max_tokens = max(r.max_tokens or 0 for r in result.records)
    assert shown_tokens + finished_unseen <= booked <= shown_tokens + finished_unseen * max_tokens


async def test_the_quality_section_scores_the_engines_outputs(server: Any) -> None:
    profile = Profile.model_validate(
        {
            "load": {"type": "concurrent", "concurrency": 4},
            "num_requests": 12,
            "warmup_requests": 0,
            "dataset": {
                "type": "mix",
                "parts": [
                    {"type": "humaneval", "limit": 6, "stop": ["\ndef", "\nclass", "\nif"]},
                    {"type": "infill", "limit": 6},
                ],
            },
            "request": {"max_tokens": 48, "temperature": 0},
            "quality": {"pass_at_k": [1], "equivalence_max_prompts": 4},
        }
    )
    result = await Runner(profile, Target(server.openai_base_url)).run()
    q = result.sections["quality"]
    assert q["fim_exact_match"]["scored"] == 6
    he = q["humaneval"]
    assert he["problems"] == 6 and he["samples"] == 6 and he["pass_at_1"] is not None
    assert sum(v["count"] for v in he["verdicts"]) == 6  # every sample ran in the sandbox
    eq = q["equivalence"]
    assert eq["applicable"] and eq["prompts"] == 4 and eq["compared"] >= 4
    assert 0.0 <= eq["fraction"] <= 1.0
