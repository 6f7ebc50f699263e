"""Issue 12: a harness that cannot fool its user, on synthetic timing and against the
fake server: connection waits, goodput from schedule, unique prompts, confidence
intervals, capacity, many workers, the checks of prompt lengths and descriptions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks.harness import transport as transport_mod
from benchmarks.harness.capacity import Objective, Search, capacity_summary, judge, probe_profile
from benchmarks.harness.client import Target
from benchmarks.harness.datasets import (
    RequestItem,
    build_items,
    count_tokens,
    length_fitter,
    load_tokenizer,
)
from benchmarks.harness.fake_server import FakeOpenAI, FakeServerThread
from benchmarks.harness.metrics import (
    connection_wait_stats,
    meets_slo,
    summarize,
    ttft,
    ttft_from_schedule,
)
from benchmarks.harness.plans import describe_load
from benchmarks.harness.profile.schema import SLO, DatasetSpec, Profile, Thresholds
from benchmarks.harness.records import RequestRecord
from benchmarks.harness.report.as_markdown import run_markdown
from benchmarks.harness.report.capacity import write_capacity
from benchmarks.harness.runner import Runner, unsalted_because
from benchmarks.harness.salt import SaltedStream
from benchmarks.harness.server_metrics import Snapshot, deltas, parse
from benchmarks.harness.stats import bootstrap_ci, paired_ratio
from benchmarks.harness.transport import AiohttpTransport


@pytest.fixture(autouse=True)
def _no_headroom_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's own `bench selftest` figures must not change what these tests see."""
    monkeypatch.setenv("CODELLAMA_SERVE_BENCH_HEADROOM", str(tmp_path / "headroom.json"))


def profile(**kw: Any) -> Profile:
    base: dict[str, Any] = {
        "dataset": {"type": "humaneval"},
        "request": {"max_tokens": 4},
        "warmup_requests": 1,
        "scrape_interval_s": 0.1,
    }
    return Profile.model_validate(base | kw)


def rec(i: int, sent: float, first: float, *, wait: float = 0.0, sched: float | None = None,
        out: int = 4) -> RequestRecord:  # fmt: skip
    r = RequestRecord(i, f"r{i}", scheduled=sched, sent=sent, token_times=[first, first + 0.03])
    r.conn_wait, r.finished, r.output_tokens, r.status = wait, first + 0.05, out, 200
    return r


# ---------------------------------------------------------------- connection waits (synthetic)


def test_the_pool_wait_is_kept_out_of_ttft_and_flags_the_run() -> None:
    # Sent at 0, waited 0.5 s for a pooled connection, first token at 0.55: TTFT is 50 ms.
    waited = rec(0, 0.0, 0.55, wait=0.5, sched=0.0)
    prompt = rec(1, 0.1, 0.15, sched=0.1)
    assert ttft(waited) == pytest.approx(0.05)
    assert ttft_from_schedule(waited) == pytest.approx(0.55)  # what the user saw
    s = summarize([waited, prompt], window=(0.0, 1.0), open_loop=True)
    w = s["load"]["connection_wait_ms"]
    assert w["max"] == pytest.approx(500) and w["over_threshold"] == 1
    assert s["load"]["coordinated_omission"] is True
    assert any("connection wait" in r for r in s["load"]["coordinated_omission_reasons"])
    assert s["p99_ttft_ms"] < 60  # no pool wait in it
    assert s["latency_breakdown"]["pool_wait"]["max_ms"] == pytest.approx(500)


def test_a_wait_under_a_millisecond_is_not_queueing() -> None:
    th = Thresholds()
    w = connection_wait_stats([rec(0, 0.0, 0.1, wait=0.0009)], th)
    assert w["over_threshold"] == 0 and "reason" not in w
    closed = summarize([rec(0, 0.0, 0.1, wait=0.002)], window=(0, 1), open_loop=False)
    assert closed["load"]["coordinated_omission"] is True  # a closed loop can queue too


# ---------------------------------------------------------------- goodput from schedule


def test_open_loop_goodput_counts_from_the_schedule() -> None:
    slo = SLO(ttft_ms=100)
    late = rec(0, 0.5, 0.55, sched=0.0)  # 50 ms after it was sent, 550 ms after its time
    on_time = rec(1, 1.0, 1.05, sched=1.0)
    assert meets_slo(late, slo) and not meets_slo(late, slo, from_schedule=True)
    s = summarize([late, on_time], window=(0.0, 2.0), slo=slo, open_loop=True)
    assert s["good_requests"] == 1 and s["goodput_from"] == "schedule"
    closed = summarize([late, on_time], window=(0.0, 2.0), slo=slo, open_loop=False)
    assert closed["good_requests"] == 2


def test_a_missing_metric_fails_its_slo() -> None:
    one_token = rec(0, 0.0, 0.05, out=1)
    assert not meets_slo(one_token, SLO(tpot_ms=1000))  # no TPOT: not "0 ms"
    unstreamed = rec(1, 0.0, 0.05)
    unstreamed.token_times = []
    assert not meets_slo(unstreamed, SLO(ttft_ms=1000))
    assert meets_slo(unstreamed, SLO(e2e_ms=1000))


# ---------------------------------------------------------------- finding 1 on the fake server


async def test_finding_1_is_flagged_and_its_ttft_has_no_pool_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Finding 1, scaled down: each request takes 20 tokens × 20 ms, 60 req/s for 1 s puts
    # ~24 in flight, and a pool of 8 connections (the old cap was too small alike) makes
    # the rest queue inside the client, while the server answers its first token at once.
    app = FakeOpenAI(token_delay_s=0.02)
    p = profile(load={"type": "rate", "rate": 60, "arrival": "constant"}, duration_s=1.0,
                request={"max_tokens": 20})  # fmt: skip
    with FakeServerThread(app) as srv:
        with monkeypatch.context() as m:
            m.setattr(transport_mod, "pool_size", lambda _c: 8)
            capped = AiohttpTransport(8, 60, None)
        try:
            res = await Runner(p, Target(srv.base_url), transport=capped).run()
        finally:
            await capped.aclose()
        free = await Runner(p, Target(srv.base_url)).run()
    load = res.summary["load"]
    assert load["coordinated_omission"] is True
    assert any("connection wait" in r for r in load["coordinated_omission_reasons"])
    assert load["connection_wait_ms"]["max"] > 200  # requests waited for a connection ...
    waits = [r.conn_wait for r in res.records]
    for r in res.records:  # ... and none of it is in their TTFT
        assert r.sent is not None
        assert ttft(r) == pytest.approx(r.token_times[0] - r.sent - r.conn_wait)
    assert res.summary["p99_ttft_ms"] < load["connection_wait_ms"]["max"]
    # ... but in what the user arriving on schedule saw.
    assert max(t for r in res.records if (t := ttft_from_schedule(r)) is not None) >= max(waits)
    assert any("connection wait" in w for w in res.warnings)
    # The default pool of an open loop has no limit: nothing waits, nothing is flagged for it.
    assert free.summary["load"]["connection_wait_ms"]["max"] == 0.0
    assert "no pool limit" in free.client["http"]


# ---------------------------------------------------------------- unique prompts


async def test_prompts_are_unique_by_default_and_the_report_says_how() -> None:
    seen: list[str] = []
    app = FakeOpenAI()
    orig = app.generate

    async def spy(send: Any, req: dict[str, Any], chat: bool, receive: Any = None) -> None:
        seen.append(req.get("prompt") or req["messages"][0]["content"])
        await orig(send, req, chat, receive)

    app.generate = spy  # type: ignore[method-assign]
    five = {"type": "humaneval", "limit": 5}  # 20 requests from 5 prompts: cycled 4 times
    p = profile(load={"type": "concurrent", "concurrency": 2}, num_requests=20, dataset=five,
                warmup_requests=0)  # fmt: skip
    with FakeServerThread(app) as srv:
        salted = await Runner(p, Target(srv.base_url)).run()
        sent = list(seen)
        seen.clear()
        plain = await Runner(p.model_copy(update={"dataset": p.dataset.model_copy(
            update={"salt": False})}), Target(srv.base_url)).run()  # fmt: skip
    assert len(set(sent)) == 20 and all(s.startswith("# ") for s in sent)
    assert salted.prompts["distinct_prompts"] == 20 and salted.prompts["repeated"] == 0
    assert salted.prompts["salt"] and salted.prompts["nonce"] in sent[0]
    assert len(set(seen)) == 5 and plain.prompts["repeated"] == 15
    assert not plain.prompts["salt"]
    md = run_markdown(salted)
    assert "Prompts: 20 distinct of 20 requests" in md and "Load: closed loop, 2 in flight" in md


def test_runs_that_repeat_on_purpose_are_not_salted_and_say_why() -> None:
    def why(**fields: Any) -> str | None:
        return unsalted_because(Profile.model_validate({"duration_s": 1, **fields}))

    sessions = {"type": "sessions", "sessions": 2}
    for kind in ("editor", "chat-sessions"):
        assert (
            why(dataset={"type": kind}, load=sessions) == "the dataset shares prefixes on purpose"
        )
    assert why(dataset={"type": "shared-prefix"}) == "the dataset shares prefixes on purpose"
    mix = {"type": "mix", "parts": [{"type": "humaneval"}, {"type": "shared-prefix"}]}
    assert why(dataset=mix) == "the dataset shares prefixes on purpose"
    assert "repeat" in str(why(dataset={"type": "humaneval", "repeat": 4}))
    assert "quality" in str(why(quality={"pass_at_k": [1]}))
    assert why(dataset={"salt": False}) == "`dataset.salt: false`"
    assert why() is None and why(dataset={"type": "infill"}) is None


def test_a_salt_changes_the_first_block_and_keeps_exact_lengths() -> None:
    tok = load_tokenizer()
    spec = DatasetSpec.model_validate({"type": "synthetic", "input_tokens": 64, "size": 4})
    items = build_items(spec, 0, lambda: tok)
    stream = SaltedStream(iter(items * 2), True, length_fitter(tok, 0))
    out = [next(stream) for _ in range(8)]
    special = tok.num_special_tokens_to_add()
    for it in out:
        assert it.input_tokens == 64
        assert count_tokens(tok, it.prompt or "") + special == 64
    # A prefix cache hashes whole blocks (16 tokens or more) from the start: every
    # request's first block differs.
    firsts = {tuple(tok(it.prompt, add_special_tokens=False).input_ids[:16]) for it in out}
    assert len(firsts) == 8
    chat = SaltedStream(iter([RequestItem("c", messages=({"role": "user", "content": "hi"},))]),
                        True)  # fmt: skip
    assert next(chat).messages[0]["content"].endswith("\nhi")  # type: ignore[index]


def test_prefix_cache_hit_rate_of_ours_and_of_vllm() -> None:
    for q, h in (
        ("codellama_serve_prefix_cache_queries_total", "codellama_serve_prefix_cache_hits_total"),
        ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"),
    ):
        before = Snapshot(0.0, parse(f"{q} 100\n{h} 10\n"))
        after = Snapshot(1.0, parse(f"{q} 1100\n{h} 260\n"))
        assert deltas(before, after)["prefix_cache"] == {
            "queries": 1000.0,
            "hits": 250.0,
            "hit_rate": 0.25,
        }


async def test_reset_of_the_prefix_cache_where_the_server_has_none() -> None:
    with FakeServerThread(FakeOpenAI()) as srv:
        res = await Runner(
            profile(num_requests=2, reset_prefix_cache=True), Target(srv.base_url)
        ).run()
    assert res.cache_reset is not None and res.cache_reset["status"] == 404
    assert any("prefix cache was not reset" in w for w in res.warnings)


# ---------------------------------------------------------------- checks of what was sent


async def test_prompt_lengths_are_checked_against_usage() -> None:
    # The fake server says every prompt had 8 tokens; these were built with 32.
    p = profile(dataset={"type": "synthetic", "input_tokens": 32, "size": 4}, num_requests=4)
    with FakeServerThread(FakeOpenAI()) as srv:
        res = await Runner(p, Target(srv.base_url)).run()
    pc = res.summary["prompt_check"]
    assert pc["checked"] == 4 and pc["mismatched"] == 4 and pc["server_total"] == 32
    assert any("prompt lengths" in w for w in res.warnings)


def test_the_description_follows_the_effective_load() -> None:
    import argparse

    from benchmarks.cli import add_bench_commands, profile_from_args

    parser = argparse.ArgumentParser()
    add_bench_commands(parser)
    args = parser.parse_args(["run", "default", "--concurrency", "64", "--num-requests", "100"])
    p = profile_from_args(args)
    assert "8 req/s" not in p.description
    assert describe_load(p) == "closed loop, 64 in flight, 100 requests or 10 s (whichever " \
        "ends first)"  # fmt: skip


# ---------------------------------------------------------------- statistics


def test_bootstrap_interval_on_known_samples() -> None:
    assert bootstrap_ci([2.0] * 5) == (2.0, 2.0)
    rng = np.random.default_rng(1)
    x = rng.normal(10.0, 2.0, 400)
    lo, hi = bootstrap_ci(x.tolist(), np.mean)
    half = 1.96 * 2.0 / np.sqrt(400)  # the normal interval of a mean: ±0.196
    assert lo == pytest.approx(x.mean() - half, abs=0.05)
    assert hi == pytest.approx(x.mean() + half, abs=0.05)
    assert bootstrap_ci([1, 2, 3, 4, 5]) == bootstrap_ci([1, 2, 3, 4, 5])  # seeded
    assert 1 <= bootstrap_ci([1, 2, 3, 4, 5])[0] <= 3 <= bootstrap_ci([1, 2, 3, 4, 5])[1] <= 5


def test_a_ratio_whose_interval_holds_one_is_no_difference() -> None:
    same = paired_ratio([10, 10, 10, 10], [9.5, 10.4, 10.2, 9.8])
    assert same["ci95"][0] <= 1 <= same["ci95"][1] and same["significant"] is False
    faster = paired_ratio([10, 11, 10, 9], [12, 13.5, 12.4, 11])
    assert faster["significant"] is True and faster["median"] == pytest.approx(1.22, abs=0.02)
    assert paired_ratio([None, 1.0], [2.0, None])["median"] is None


# ---------------------------------------------------------------- capacity


async def test_capacity_finds_the_fake_servers_knee(tmp_path: Path) -> None:
    # 4 requests at a time, 100 ms each (20 ms to the first token, 4 × 20 ms more): the
    # fake serves 40 req/s at most. Past that its queue grows by (rate − 40) req/s, so
    # over a 3 s probe the last requests wait (rate/40 − 1) × 3 s more: the 180 ms the
    # objective leaves above the first token (room for a busy test machine's jitter)
    # are gone 6 % above the knee.
    app = FakeOpenAI(capacity=4, ttft_s=0.02, token_delay_s=0.02)
    base = profile(load={"type": "rate", "rate": 1, "arrival": "constant"}, duration_s=1,
                   request={"max_tokens": 5}, server_metrics=False)  # fmt: skip
    objectives = [Objective.parse("ttft:p99<=200ms")]
    with FakeServerThread(app) as srv:

        async def run(rate: float) -> Any:
            p = probe_profile(base, rate, False, 3.0, objectives)
            return judge(rate, await Runner(p, Target(srv.base_url)).run(), objectives)

        # Started near the knee and bisected to 10 %: 5 probes rather than 9.
        search = Search(run, start=30, low=5, high=640, tolerance=0.1)
        capacity = await search.find()
    assert capacity is not None and capacity == pytest.approx(40, rel=0.10), search.probes
    data = capacity_summary(search, capacity, objectives, closed=False)
    assert [p["load"] for p in data["probes"]] == sorted(data["order"])
    paths = write_capacity(data, tmp_path, "fake")
    assert paths["plot"].stat().st_size > 10_000 and "Capacity" in paths["markdown"].read_text()


async def test_closed_loop_capacity_is_the_fake_servers_slots() -> None:
    # 6 slots of 300 ms: up to 6 in flight nothing queues (a TTFT of 20 ms, 180 ms of room
    # for a busy machine's jitter); a 7th always waits a whole request (a TTFT ≥ 320 ms)
    # for one in every 7 requests.
    app = FakeOpenAI(capacity=6, ttft_s=0.02, token_delay_s=0.07)
    base = profile(request={"max_tokens": 5}, num_requests=10, server_metrics=False)
    objectives = [Objective.parse("ttft:p90<=200ms")]
    with FakeServerThread(app) as srv:

        async def run(c: float) -> Any:
            p = probe_profile(base, c, True, 2.0, objectives)
            return judge(c, await Runner(p, Target(srv.base_url)).run(), objectives)

        search = Search(run, start=4, low=1, high=64, integer=True)
        assert await search.find() == 6


def test_slo_objectives_parse() -> None:
    o = Objective.parse("tpot:p90<=0.05s")
    assert (o.metric, o.percentile, o.limit_ms) == ("tpot", 90.0, 50.0)
    assert str(Objective.parse("e2e:p99.9<=2000")) == "e2el:p99.9<=2000ms"
    with pytest.raises(ValueError):
        Objective.parse("ttft<500")


async def test_capacity_search_brackets_and_bisects_an_integer_knee() -> None:
    async def fake(c: float) -> Any:  # meets the objectives up to 13 in flight
        from benchmarks.harness.capacity import Probe

        return Probe(c, c <= 13, {}, "", {"request_throughput": c, "output_throughput": c,
                                          "failed": 0})  # fmt: skip

    search = Search(fake, start=8, low=1, high=1024, integer=True)
    assert await search.find() == 13
    assert [p.load for p in search.probes][:2] == [8, 16]


# ---------------------------------------------------------------- --workers


async def test_workers_share_the_schedule_and_records_merge_exactly() -> None:
    with FakeServerThread(FakeOpenAI(token_delay_s=0.002)) as srv:
        t = Target(srv.base_url)
        opened = await Runner(profile(load={"type": "rate", "rate": 100, "arrival": "constant"},
                                      duration_s=1.0), t, workers=2).run()  # fmt: skip
        closed = await Runner(profile(load={"type": "concurrent", "concurrency": 3},
                                      num_requests=25), t, workers=2).run()  # fmt: skip
    for res in (opened, closed):
        assert [r.index for r in res.records] == list(range(len(res.records)))
        assert {r.worker for r in res.records} == {0, 1}
        assert res.summary["completed"] == len(res.records) and res.client["workers"]["count"] == 2
    assert len(opened.records) == 100
    assert [r.worker for r in opened.records[:4]] == [0, 1, 0, 1]  # request i to worker i mod 2
    assert len(closed.records) == 25 and closed.prompts["distinct_prompts"] == 25


def test_a_client_starved_of_cpu_is_told() -> None:
    from benchmarks.harness.caveats import _client_warnings

    lag = {"overloaded": False}
    starved = {"loop_lag": lag, "cpu": {"run_delay_s": 3.9, "wall_s": 7.6, "cpu_s": 0.47}}
    (w,) = _client_warnings(starved, Thresholds())
    assert "waited 3.90 s for a CPU (51% of the run)" in w
    fine = {"loop_lag": lag, "cpu": {"run_delay_s": 0.1, "wall_s": 7.6, "cpu_s": 0.47}}
    assert _client_warnings(fine, Thresholds()) == []


def test_client_priority_is_refused_plainly(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.cli import _set_priority

    assert _set_priority(None)
    assert not _set_priority(0)  # SCHED_FIFO priorities are 1-99: an error, not a crash
    assert "--client-priority 0" in capsys.readouterr().err


# ---------------------------------------------------------------- editor sessions


def editor_sessions(**kw: Any) -> Profile:
    from benchmarks.harness.profile.files import load_profile

    over = {
        "duration_s": 3.0,
        "load": {"type": "sessions", "sessions": 3, "stagger_s": 0.3},
        "dataset": {"editor": {"repos": 2, "files": {"max_files": 6}}},
        "scrape_interval_s": 0.2,
    }
    return load_profile("editor", over | kw)


def test_sessions_refuse_workers_plainly(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.cli import main

    with pytest.raises(ValueError, match="--workers 2 does not apply to a `sessions` load"):
        Runner(editor_sessions(), Target("http://127.0.0.1:9"), workers=2)
    argv = ["run", "editor", "--base-url", "http://127.0.0.1:9", "--workers", "2"]
    assert main(argv) == 2
    assert "does not apply to a `sessions` load" in capsys.readouterr().err


async def test_editor_sessions_get_connection_stamps_goodput_from_schedule_and_no_salt() -> None:
    app = FakeOpenAI(ttft_s=0.03, token_delay_s=0.01)
    with FakeServerThread(app) as srv:
        res = await Runner(editor_sessions(slo={"ttft_ms": 5000}), Target(srv.base_url)).run()
    s = res.summary
    # Cancelled requests (keystrokes) are neither completions nor failures.
    assert s["cancelled"] > 0 and s["failed"] == 0 and s["completed"] > 0
    assert s["goodput_from"] == "schedule" and s["good_requests"] == s["completed"]
    # The connection's timestamps on editor requests too, cancelled ones included.
    answered = [r for r in res.records if r.first_byte is not None]
    assert answered and all(r.conn_acquired is not None and r.written for r in answered)
    assert any(r.cancelled for r in answered)
    waits = s["load"]["connection_wait_ms"]
    assert waits["p50"] is not None and not waits["over_threshold"]
    assert s["latency_breakdown"]["to_first_token"]["count"] == s["completed"]
    # Shared prefixes are the point of the workload: no salt, no warning about cache hits.
    assert not res.prompts["salt"] and res.prompts["distinct_prompts"] is None
    assert res.prompts["unsalted_because"] == "the dataset shares prefixes on purpose"
    assert res.server["prefix_cache"]["hit_rate"] > 0.3
    assert not any("prefix cache" in w for w in res.warnings)
    assert "not salted: the dataset shares prefixes on purpose" in run_markdown(res)
