"""The harness against the real server (vLLM on the demo model): every request accounted for."""

from __future__ import annotations

from typing import Any

from benchmarks.harness.client import Target
from benchmarks.harness.profile.schema import Profile
from benchmarks.harness.runner import Runner


def _counter(server: Any, name: str) -> float:
    """Sum of every series of a counter in the server's /metrics."""
    import httpx

    text = httpx.get(server.base_url + "/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


async def test_a_short_profile_accounts_for_every_request(server: Any) -> None:
    profile = Profile.model_validate(
        {
            "name": "integration",
            # Open loop, 8 req/s for 2.5 s, 32 tokens each: a few seconds of load.
            "load": {"type": "rate", "rate": 8, "arrival": "poisson"},
            "duration_s": 2.5,
            "warmup_requests": 1,
            "dataset": {"type": "humaneval"},
            "request": {"max_tokens": 32, "ignore_eos": True, "temperature": 0},
            "slo": {"ttft_ms": 60_000},
            "scrape_interval_s": 0.5,
            "seed": 3,
        }
    )
    requests_before = _counter(server, "codellama_serve_requests_total")
    tokens_before = server.metric("codellama_serve_generation_tokens_total")
    result = await Runner(profile, Target(server.openai_base_url)).run()
    s = result.summary
    records = result.records

    # Every scheduled request was sent, finished, and counted exactly once.
    assert len(records) == s["requests"] > 5
    assert all(r.scheduled is not None and r.sent is not None for r in records)
    assert all(r.finished is not None for r in records)
    assert s["completed"] + s["failed"] == s["requests"]
    assert s["failed"] == 0, s["errors"]
    assert sorted(r.index for r in records) == list(range(len(records)))

    # Output counts come from the server's usage: ignore_eos gives exactly max_tokens.
    assert all(r.output_tokens == 32 for r in records)
    assert s["total_output_tokens"] == 32 * len(records)
    assert s["output_token_source"]["usage"] == len(records)
    assert all(r.prompt_tokens and r.prompt_tokens > 1 for r in records)

    # Timings are ordered per request; TTFT is a real first token.
    for r in records:
        assert r.sent <= r.first_byte <= r.token_times[0] <= r.token_times[-1] <= r.finished
    assert 0 < s["median_ttft_ms"] < s["median_e2el_ms"]
    assert s["good_requests"] == len(records)

    # The server agrees: one finished request and 32 tokens per request we sent
    # (plus the warm-up request, which was sent before our own first scrape).
    server_side = result.server["counters"]
    assert server_side["requests"] == len(records)
    assert server_side["generation_tokens"] == 32 * len(records)
    assert _counter(server, "codellama_serve_requests_total") - requests_before == len(records) + 1
    assert server.metric("codellama_serve_generation_tokens_total") - tokens_before == 32 * (
        len(records) + 1
    )
    assert result.server["histograms"]["ttft"]["count"] == len(records)

    # Issue 12: every prompt unique (salted), so the server's prefix cache answered none
    # of them; the breakdown has the client's own timestamps for every request.
    assert result.prompts["salt"] and result.prompts["repeated"] == 0
    cache = result.server["prefix_cache"]
    assert cache is not None and cache["queries"] > 0 and cache["hit_rate"] < 0.01, cache
    assert not any("prefix cache" in w for w in result.warnings)
    assert s["latency_breakdown"]["decode"]["count"] == len(records)
    assert s["load"]["connection_wait_ms"]["max"] == 0.0
    for r in records:
        assert r.sent <= r.conn_acquired <= r.written <= r.first_byte  # type: ignore[operator]
