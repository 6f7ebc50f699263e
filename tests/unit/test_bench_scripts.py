"""The comparison scripts (parity, Ray modes, soak): one trial against a fake
server (named so: no engine here), and their tables and verdicts."""

from __future__ import annotations

import json
import os
from pathlib import Path

from benchmarks.experiments import parity, ray_modes, soak
from benchmarks.experiments.trials import (
    LoadConfig,
    Trial,
    cpu_seconds,
    rotations,
    server_trial,
    summarize,
)
from benchmarks.harness.fake_server import FakeOpenAI, FakeServerThread


class FakeTarget:
    """A target for `server_trial`: the fake server, our own process's CPU."""

    def __init__(self, url: str) -> None:
        self.name, self.url = "fake", url

    def cpu(self) -> tuple[float, float]:
        return cpu_seconds(os.getpid()), 0.0


def test_a_trial_measures_the_harness_report(tmp_path: Path) -> None:
    cfg = LoadConfig("tiny", concurrency=4, stream=True, requests=12, output_tokens=8)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "def f(x):"}\n' * 12)
    with FakeServerThread(FakeOpenAI()) as srv:
        trial = server_trial(FakeTarget(srv.base_url), cfg, prompts, tmp_path, 0)
    assert trial.failed == 0
    assert trial.output_tokens == 12 * 8
    assert trial.output_tok_s > 0 and trial.median_ttft_ms is not None
    assert trial.client_cpu_s > 0
    assert trial.frontend_cpu_s >= 0  # the fake runs in this process, on a thread


def trial(target: str, config: str, tok_s: float, rnd: int = 0) -> Trial:
    return Trial(
        target=target, config=config, round=rnd, output_tok_s=tok_s, median_ttft_ms=100.0,
        p99_ttft_ms=200.0, median_tpot_ms=10.0, output_tokens=1000, failed=0,
        frontend_cpu_s=0.1, engine_cpu_s=0.2, client_cpu_s=0.05,
    )  # fmt: skip


def test_parity_takes_medians_over_rounds_and_reports_ratios() -> None:
    trials = [trial("ours", "stream-64", v, i) for i, v in enumerate([900, 1200, 1000])]
    trials += [trial("vllm", "stream-64", v, i) for i, v in enumerate([800, 700, 750])]
    summary = summarize(trials)
    assert summary["stream-64"]["ours"]["output_tok_s"] == 1000
    assert summary["stream-64"]["vllm"]["output_tok_s"] == 750
    assert summary["stream-64"]["ours"]["frontend_cpu_ms_per_tok"] == 0.1
    table = parity.markdown(summary, {"date": "d", "command": "c", "engine": {}, "rounds": 3})
    assert "| stream-64 | 1.33× |" in table


def test_rounds_rotate_the_order() -> None:
    orders = [order for _, order in rotations(["a", "b", "c"], 3)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]


def test_ray_modes_table_has_the_issue_ratios() -> None:
    trials = [
        trial("standalone", "stream-64", 1000),
        trial("ray-ours", "stream-64", 900),
        trial("ray-llm", "stream-64", 300),
    ]
    table = ray_modes.markdown(
        summarize(trials), {"date": "d", "command": "c", "engine": {}, "rounds": 1}
    )
    assert "| ours in Ray / Ray LLM app, tok/s | 3.00× |" in table
    assert "| ours in Ray / standalone, tok/s | 0.90× |" in table


def test_ray_modes_table_checks_each_ingress_against_the_goals() -> None:
    def at(target: str, tok_s: float, ttft: float, p99: float) -> Trial:
        t = trial(target, "stream-64", tok_s)
        t.median_ttft_ms, t.p99_ttft_ms = ttft, p99
        return t

    trials = [
        at("standalone", 1000, 100, 400),
        at("ray-ours", 950, 140, 700),  # haproxy, coalescing off: every goal met
        at("ray-proxy-c0", 500, 400, 2000),  # proxy, coalescing off: none met
        at("ray-proxy-c100", 900, 300, 900),  # coalescing on: not a goal row
    ]
    table = ray_modes.markdown(
        summarize(trials), {"date": "d", "command": "c", "engine": {}, "rounds": 1}
    )
    assert "| ray-ours | ✓ 0.95× | ✓ +40 ms | ✓ 1.75× |" in table
    assert "| ray-proxy-c0 | ✗ 0.50× | ✗ +300 ms | ✗ 5.00× |" in table
    assert "| ray-proxy-c100 | ✓" not in table
    assert "| ray-proxy-c100 | proxy: Ray's Python proxy | 100 ms | 900 | 0.90× |" in table
    assert "serve --ray's default" in table


def test_ray_modes_profile_is_the_median_cpu_per_token_by_process_kind(tmp_path) -> None:
    rows = [
        {"target": "ray-ours", "round": r, "us_per_token": {"haproxy": us, "replica": 2 * us}}
        for r, us in enumerate((10.0, 30.0, 20.0))
    ]
    path = tmp_path / "cpu_by_kind.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    profile = ray_modes.cpu_profile(path)
    assert profile == {"ray-ours": {"haproxy": 20.0, "replica": 40.0}}
    table = ray_modes.markdown(
        summarize([trial("standalone", "stream-64", 1000), trial("ray-ours", "stream-64", 900)]),
        {"date": "d", "command": "c", "engine": {}, "rounds": 3, "cpu_us_per_token": profile},
    )
    # haproxy, ingress router, replica, proxy, controller, raylet, gcs, driver, ray system
    assert "| 20 | – | 40 | – | – | – | – | – | – |" in table
    assert ray_modes.cpu_profile(tmp_path / "none.jsonl") == {}


def test_ray_modes_names_every_mode_and_target() -> None:
    assert ray_modes.target_name("haproxy", 0) == ray_modes.DEFAULT_TARGET
    assert ray_modes.target_name("direct", 100) == "ray-direct-c100"
    # The default mode's env is what `serve --ray` sets for its defaults.
    from engine.config import build_settings
    from engine.ray_config import ingress_env

    assert ray_modes.MODES["haproxy"].env == ingress_env(build_settings(env={}))


def test_soak_memory_of_this_process() -> None:
    m = soak.Memory.of(os.getpid())
    assert m.frontend_mib > 10 and m.engine_mib >= 0


def test_soak_report_says_what_failed() -> None:
    mem = {"frontend_mib": 100.0, "engine_mib": 500.0}
    result = {
        "date": "d", "command": "c",
        "settings": {"probe_concurrency": 64, "load": 0.8, "duration": 300.0},
        "saturation_req_s": 10.0, "saturation_output_tok_s": 1280.0, "offered_req_s": 8.0,
        "achieved_send_rate": 7.9, "completed": 2400, "failed": 2,
        "errors": [{"error": "HTTP 503", "count": 2}], "output_tok_s": 1000.0,
        "latency_ms": dict.fromkeys(soak.LATENCY_KEYS, 1.0),
        "memory_mib": {"cold": mem, "before": mem, "peak": mem, "after": mem},
        "engine_after": {"requests_running": 0.0, "requests_waiting": 0.0},
        "idle_after_s": 0.0, "health_after": 200,
        "checks": {"no_failed_requests": False, "engine_idle_after": True},
    }  # fmt: skip
    text = soak.markdown(result)
    assert "failed **2**" in text and "no_failed_requests FAILED" in text
    assert "| HTTP 503 | 2 |" in text
