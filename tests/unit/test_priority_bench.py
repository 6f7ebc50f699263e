"""The priority benchmark's own logic (no engine): the flood client against the harness's
fake server, batch throughput over the editors' window, the server-side TTFTs from an
access log, and the summary's medians, ratios and targets."""

from __future__ import annotations

import json

from benchmarks.experiments import priority
from benchmarks.harness.fake_server import FakeOpenAI, FakeServerThread


async def test_the_flood_keeps_its_streams_busy_with_staggered_first_requests():
    app = FakeOpenAI(token_delay_s=0.002)  # a fake, standing in for the server
    with FakeServerThread(app) as srv:
        records = await priority.flood(srv.base_url, "sk-x", streams=4, max_tokens=16, seconds=1.0)
    assert app.last_authorization == "Bearer sk-x"
    done = [r for r in records if r["end"] is not None]
    assert len(done) > 8 and all(r["status"] == 200 for r in done)
    assert all(r["start"] <= r["first"] <= r["end"] for r in done)
    # Each worker's first request is shorter (4, 8, 12, 16 tokens), the rest 16.
    firsts = sorted(r["tokens"] for r in sorted(done, key=lambda r: r["start"])[:4])
    assert firsts == [4, 8, 12, 16]
    assert {r["tokens"] for r in done[4:]} == {16}
    assert app.running == 0  # the cut requests were closed


def test_batch_throughput_counts_the_requests_that_ended_in_the_window():
    records = [
        {"end": 9.0, "tokens": 512},  # before
        {"end": 10.5, "tokens": 512},
        {"end": 19.0, "tokens": 100},
        {"end": 20.5, "tokens": 512},  # after
        {"end": None, "tokens": None},  # cut
        {"end": 12.0, "tokens": None},  # refused or broken: no usage
    ]
    assert priority.batch_throughput(records, 10.0, 20.0) == (512 + 100) / 10


def test_server_ttfts_are_the_keys_completions_in_the_window():
    lines = [
        {"ts": 5.0, "key": "editor", "ttft_ms": 1.0},
        {"ts": 11.0, "key": "editor", "ttft_ms": 20.0},
        {"ts": 12.0, "key": "batch", "ttft_ms": 900.0},
        {"ts": 13.0, "key": "editor", "status": 499},  # cancelled before its first token
        {"ts": 14.0, "key": "editor", "ttft_ms": 40.0},
    ]
    log = "server starting\n" + "".join(json.dumps(x) + "\n" for x in lines)
    assert priority.server_ttfts(log, "editor", 10.0, 20.0) == [20.0, 40.0]


def _trial(mode: str, p99: float, tok_s: float | None, rnd: int = 0) -> dict:
    t = {"mode": mode, "round": rnd, "interactive_ttft_p50_ms": p99 / 4,
         "interactive_ttft_p99_ms": p99, "interactive_shown_ratio": 0.1}  # fmt: skip
    if tok_s is not None:
        t["batch_output_tok_s"] = tok_s
    return t


def test_summary_has_the_issues_keys_ratios_and_targets():
    trials = [
        _trial("fifo", 4000, 1000, 0), _trial("fifo", 6000, 1100, 1), _trial("fifo", 5000, 900, 2),
        _trial("priority", 900, 950), _trial("priority", 1100, 1000), _trial("priority", 1000, 900),
        _trial("idle", 200, None), _trial("idle", 400, None), _trial("idle", 300, None),
    ]  # fmt: skip
    s = priority.summarize(trials)
    assert set(s["modes"]) == {"fifo", "priority"}
    for m in s["modes"].values():
        for key in ("interactive_ttft_p50_ms", "interactive_ttft_p99_ms",
                    "interactive_shown_ratio", "batch_output_tok_s"):  # fmt: skip
            assert key in m
    assert s["modes"]["fifo"]["interactive_ttft_p99_ms"] == 5000  # medians of the trials
    assert s["idle"]["interactive_ttft_p99_ms"] == 300
    assert s["ratios"]["priority_p99_vs_fifo_p99"] == 1000 / 5000
    assert s["ratios"]["priority_p99_vs_idle_p99"] == 1000 / 300
    assert s["ratios"]["priority_batch_tok_s_vs_fifo"] == 950 / 1000
    reached = {n: t["reached"] for n, t in s["targets"].items()}
    assert reached == {"priority_p99_vs_fifo_p99": True, "priority_p99_vs_idle_p99": False,
                       "priority_batch_tok_s_vs_fifo": True}  # fmt: skip
    meta = {"date": "d", "command": "c", "rounds": 3, "config": vars(priority.BenchConfig())}
    table = priority.render(s, meta)
    assert "| priority_p99_vs_idle_p99 | 3.333 | ≤ 3.0 | no |" in table
    assert "| fifo | 1,250.0 | 5,000.0 |" in table


def test_summary_without_a_mode_leaves_its_ratios_open():
    s = priority.summarize([_trial("fifo", 100, 10), _trial("priority", 50, 10)])
    assert s["idle"] == {}
    assert s["ratios"]["priority_p99_vs_idle_p99"] is None
    assert s["targets"]["priority_p99_vs_idle_p99"]["reached"] is None


def test_the_make_target_runs_this_module():
    from benchmarks.experiments.trials import ROOT

    make = (ROOT / "Makefile").read_text()
    assert "priority-bench: setup\n\t$(BIN)/python -m benchmarks.experiments.priority" in make
