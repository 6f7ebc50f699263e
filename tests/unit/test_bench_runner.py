"""Runs against a fake OpenAI-compatible server: accounting, loads, sweeps, reports."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.harness.client import Target
from benchmarks.harness.compare import compare, comparison_markdown, write_comparison
from benchmarks.harness.fake_server import FakeOpenAI, FakeServerThread
from benchmarks.harness.metrics import vllm_keys
from benchmarks.harness.profile.schema import Profile
from benchmarks.harness.report.as_markdown import run_markdown
from benchmarks.harness.report.write import write_run_report
from benchmarks.harness.results import WarmupFailed
from benchmarks.harness.runner import Runner


@pytest.fixture
def fake() -> Iterator[FakeServerThread]:
    with FakeServerThread(FakeOpenAI(ttft_s=0.005, token_delay_s=0.001)) as srv:
        yield srv


def profile(**kw: Any) -> Profile:
    base: dict[str, Any] = {
        "dataset": {"type": "humaneval"},
        "request": {"max_tokens": 4},
        "warmup_requests": 1,
        "scrape_interval_s": 0.1,
    }
    return Profile.model_validate(base | kw)


async def run(p: Profile, srv: FakeServerThread, **kw: Any):  # type: ignore[no-untyped-def]
    return await Runner(p, Target(srv.base_url), **kw).run()


def accounted(result: Any) -> None:
    """Every record is finished, and counted once as completed or failed."""
    s = result.summary
    assert s["requests"] == len(result.records) == s["completed"] + s["failed"]
    assert sum(st.summary["requests"] for st in result.steps) == len(result.records)
    assert all(r.finished is not None for r in result.records)
    assert [r.index for r in result.records] == list(range(len(result.records)))


async def test_closed_loop_sends_exactly_n_and_never_exceeds_concurrency(
    fake: FakeServerThread,
) -> None:
    peak = {"n": 0}
    app = fake.app
    orig = app._respond

    async def spy(*a: Any, **k: Any) -> None:
        peak["n"] = max(peak["n"], app.running)
        await orig(*a, **k)

    app._respond = spy  # type: ignore[method-assign]
    res = await run(profile(load={"type": "concurrent", "concurrency": 3}, num_requests=30), fake)
    accounted(res)
    assert res.summary["completed"] == 30 and res.summary["failed"] == 0
    assert peak["n"] == 3
    assert res.summary["load"]["coordinated_omission"] is None
    assert res.summary["total_output_tokens"] == 120
    # The server saw what the client sent (the warm-up came before the first scrape).
    assert res.server["counters"]["requests"] == 30
    assert res.server["counters"]["generation_tokens"] == 120
    # (A busy test machine may add an event-loop-lag warning; nothing else is expected.)
    assert [w for w in res.warnings if "event-loop lag" not in w] == []


async def test_the_last_scrape_waits_for_the_server_to_book_its_requests(
    fake: FakeServerThread,
) -> None:
    fake.app.book_delay_s = 0.2  # the server counts a request 200 ms after its [DONE]
    res = await run(profile(load={"type": "concurrent", "concurrency": 2}, num_requests=6), fake)
    assert res.server["counters"]["requests"] == 6
    assert not any("the server counted" in w for w in res.warnings)


async def test_the_httpx_transport_measures_the_same_way(fake: FakeServerThread) -> None:
    res = await run(
        profile(load={"type": "concurrent", "concurrency": 2}, num_requests=8), fake, http="httpx"
    )
    accounted(res)
    assert res.summary["completed"] == 8 and res.client["http"].startswith("httpx")


async def test_open_loop_accounts_for_every_scheduled_request(fake: FakeServerThread) -> None:
    p = profile(load={"type": "rate", "rate": 40, "arrival": "poisson"}, duration_s=1.0)
    res = await run(p, fake)
    accounted(res)
    assert all(r.scheduled is not None and r.sent is not None for r in res.records)
    load = res.summary["load"]
    assert load["open_loop"] and load["offered_rate"] == 40
    assert load["scheduled_rate"] > 0 and load["achieved_send_rate"] > 0
    # Loose: this fake server shares the test process (and its GIL) with the client.
    assert load["median_schedule_lag_ms"] < 20
    assert res.client["cpu"]["cpu_s"] > 0 and res.client["loop_lag"]["samples"] > 10


async def test_a_concurrency_cap_that_delays_sends_is_flagged(fake: FakeServerThread) -> None:
    fake.app.token_delay_s = 0.02  # each request ~80 ms; 20/s with one slot cannot keep up
    p = profile(
        load={"type": "rate", "rate": 20, "arrival": "constant", "max_concurrency": 1},
        num_requests=12,
    )
    res = await run(p, fake)
    accounted(res)
    load = res.summary["load"]
    assert load["coordinated_omission"] is True
    assert any("coordinated omission" in w for w in res.warnings)
    assert load["p99_e2el_from_schedule_ms"] > res.summary["p99_e2el_ms"]


async def test_failures_are_reported_never_dropped(fake: FakeServerThread) -> None:
    fake.app.fail_every = 3
    fake.app.error_midstream_every = 5
    res = await run(
        profile(load={"type": "concurrent", "concurrency": 2}, num_requests=20, warmup_requests=0),
        fake,
    )
    accounted(res)
    s = res.summary
    assert s["failed"] >= 6
    errors = {e["error"] for e in s["errors"]}
    assert "HTTP 500: injected failure" in errors
    assert any("mid-stream" in e for e in errors)
    assert any("requests failed" in w for w in res.warnings)


async def test_a_server_without_infilling_fails_the_warmup_clearly(fake: FakeServerThread) -> None:
    fake.app.reject_suffix = True
    with pytest.raises(WarmupFailed, match="HTTP 400: suffix is not currently supported"):
        await run(
            profile(dataset={"type": "infill"}, load={"type": "concurrent"}, num_requests=2), fake
        )


async def test_ignored_ignore_eos_is_noticed(fake: FakeServerThread) -> None:
    fake.app.honour_ignore_eos = False
    fake.app.eos_after = 2
    p = profile(
        load={"type": "concurrent", "concurrency": 2},
        num_requests=6,
        request={"max_tokens": 8, "ignore_eos": True},
    )
    res = await run(p, fake)
    assert res.summary["shorter_than_max_tokens"] == 6
    assert any("ignore_eos" in w for w in res.warnings)


async def test_steps_are_reported_per_window(fake: FakeServerThread) -> None:
    p = profile(
        load={
            "type": "steps",
            "steps": [{"duration_s": 0.5, "rate": 10}, {"duration_s": 0.5, "rate": 40}],
        }
    )
    res = await run(p, fake)
    accounted(res)
    assert [st.offered["offered_rate"] for st in res.steps] == [10, 40]
    assert res.steps[0].window[1] == pytest.approx(res.steps[1].window[0])
    assert res.steps[1].summary["requests"] > res.steps[0].summary["requests"]
    fake.app.token_delay_s = 0.01  # sleeping, not CPU: four in flight take no longer than one
    closed = profile(
        load={
            "type": "steps",
            "steps": [{"duration_s": 0.4, "concurrency": 1}, {"duration_s": 0.4, "concurrency": 4}],
        }
    )
    res = await run(closed, fake)
    accounted(res)
    assert res.steps[1].summary["requests"] > 2 * res.steps[0].summary["requests"]


async def test_sweep_stops_at_saturation_and_reports_the_knee() -> None:
    # Capacity 2 × (20 ms per request) ≈ 100 req/s at most.
    app = FakeOpenAI(capacity=2, ttft_s=0.01, token_delay_s=0.003)
    with FakeServerThread(app) as srv:
        p = profile(
            load={
                "type": "sweep",
                "rates": [10, 20, 40, 160, 320],
                "step_duration_s": 0.5,
                "arrival": "constant",
            }
        )
        res = await run(p, srv)
    sw = res.sweep
    assert sw["saturated"] and sw["saturation_reason"]
    assert 160 in sw["rates_run"] and 320 not in sw["rates_run"]
    assert sw["knee_rate"] == 40
    accounted(res)


async def test_trace_replay_follows_the_trace(fake: FakeServerThread, tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        "".join(
            json.dumps({"timestamp": 5 + i * 0.05, "prompt": f"p{i}", "output_tokens": 1 + i % 3})
            + "\n"
            for i in range(10)
        )
    )
    res = await run(profile(load={"type": "trace", "path": str(trace)}), fake)
    accounted(res)
    assert [r.scheduled - res.records[0].scheduled for r in res.records] == pytest.approx(
        [i * 0.05 for i in range(10)]
    )
    assert [r.output_tokens for r in res.records] == [1 + i % 3 for i in range(10)]


async def test_report_files(fake: FakeServerThread, tmp_path: Path) -> None:
    p = profile(
        load={"type": "concurrent", "concurrency": 2}, num_requests=8, slo={"ttft_ms": 1000}
    )
    res = await run(p, fake)
    paths = write_run_report(res, tmp_path, with_requests=True, command=["bench", "run"])
    data = json.loads(paths["json"].read_text())
    for k in vllm_keys(p.percentiles):
        assert k in data, k  # diffable against vLLM's --save-result
    assert data["completed"] == 8 and data["request_goodput"] == pytest.approx(
        data["request_throughput"]
    )
    assert len(data["requests"]) == 8 and "text" not in data["requests"][0]
    assert data["settings"]["load"]["concurrency"] == 2
    for key in ("latency_cdf", "timeline"):
        assert paths[key].stat().st_size > 10_000
    md = paths["markdown"].read_text()
    assert "| TTFT |" in md and "Coordinated omission" in md and "![latency_cdf]" in md
    assert run_markdown(res).startswith("# Benchmark")


async def test_compare_interleaves_targets(tmp_path: Path) -> None:
    with (
        FakeServerThread(FakeOpenAI(token_delay_s=0.001)) as a,
        FakeServerThread(FakeOpenAI(token_delay_s=0.004)) as b,
    ):
        p = profile(
            load={"type": "concurrent", "concurrency": 2}, num_requests=6, warmup_requests=0
        )
        cmp = await compare(
            p, [Target(a.base_url, name="A"), Target(b.base_url, name="B")], trials=2
        )
    assert cmp.order == ["A", "B", "B", "A"]  # rotated every round (issue 12)
    rows = {r["metric"]: r for r in cmp.table()}
    assert rows["request_throughput"]["A"]["ratio_to_baseline"] == 1.0
    assert rows["median_tpot_ms"]["B"]["ratio_to_baseline"] > 1.5  # B is slower per token
    md = comparison_markdown(cmp)
    assert "| Request/s |" in md and "B / A" in md
    paths = write_comparison(cmp, tmp_path)
    assert json.loads(paths["json"].read_text())["order"] == ["A", "B", "B", "A"]
    assert paths["latency_cdf"].is_file()
