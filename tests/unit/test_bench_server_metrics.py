"""Prometheus scraping: our server's names, vLLM's, and targets without metrics."""

from __future__ import annotations

import pytest

from benchmarks.harness.server_metrics import Snapshot, deltas, gauge_stats, histogram_bound, parse

VLLM_BEFORE = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 0.0
vllm:num_requests_waiting{engine="0",model_name="m"} 0.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.0
vllm:prompt_tokens_total{engine="0",model_name="m"} 100.0
vllm:generation_tokens_total{engine="0",model_name="m"} 1000.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 10.0
vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 2.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.01",model_name="m"} 5.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="m"} 12.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 12.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 12.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 0.3
vllm:some_other_metric{engine="0"} 7
process_cpu_seconds_total 10.5
"""
VLLM_AFTER = """\
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:prompt_tokens_total{engine="0",model_name="m"} 300.0
vllm:generation_tokens_total{engine="0",model_name="m"} 1640.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 15.0
vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 2.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.01",model_name="m"} 5.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="m"} 16.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 17.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 17.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 1.3
process_cpu_seconds_total 14.0
"""


def test_parse_keeps_only_known_families() -> None:
    s = parse(VLLM_BEFORE)
    assert s[("vllm:num_requests_running", (("engine", "0"), ("model_name", "m")))] == 0.0
    assert not any(name == "vllm:some_other_metric" for name, _ in s)
    assert s[("process_cpu_seconds_total", ())] == 10.5


def test_vllm_deltas() -> None:
    d = deltas(Snapshot(0.0, parse(VLLM_BEFORE)), Snapshot(5.0, parse(VLLM_AFTER)))
    assert d["available"] and d["source"] == "vllm" and d["interval_s"] == 5.0
    c = d["counters"]
    assert c["generation_tokens"] == 640 and c["prompt_tokens"] == 200
    assert c["requests"] == 5 and c["requests_by_label"] == {"finished_reason=length": 5}
    assert c["process_cpu_seconds"] == pytest.approx(3.5)
    h = d["histograms"]["ttft"]
    assert h["count"] == 5 and h["mean_ms"] == pytest.approx(200.0)
    # 4 of the 5 new observations in (0.01, 0.1], one above: p50 lies in that bucket.
    assert h["p50_le_ms"] == pytest.approx(100.0)
    assert h["p99_le_ms"] == pytest.approx(100.0)  # beyond the last finite bound: that bound
    assert d["gauges_at_end"] == {
        "requests_running": 3,
        "requests_waiting": 1,
        "kv_cache_usage": 0.25,
    }


def test_our_server_exposition_is_understood() -> None:
    """Built with the server's own Metrics class, so a renamed metric breaks this test."""
    from engine.metrics import EngineGauges, Metrics

    state = {"running": 0.0}
    metrics = Metrics(
        EngineGauges(
            running=lambda: state["running"],
            waiting=lambda: 2.0,
            kv_cache_usage=lambda: 0.5,
            healthy=lambda: 1.0,
            ready=lambda: 1.0,
        ),
        model_name=lambda: "demo",
    )
    before = Snapshot(0.0, parse(metrics.render()[0].decode()))
    for ttft in (0.03, 0.05, 0.07):
        metrics.ttft.labels(endpoint="completions").observe(ttft)
        metrics.requests.labels(endpoint="completions", status="200").inc()
    metrics.requests.labels(endpoint="chat", status="400").inc()
    metrics.generation_tokens.inc(96)
    metrics.prompt_tokens.inc(30)
    state["running"] = 4.0
    after = Snapshot(1.0, parse(metrics.render()[0].decode()))
    d = deltas(before, after)
    assert d["source"] == "codellama-serve"
    c = d["counters"]
    assert c["requests"] == 4 and c["generation_tokens"] == 96 and c["prompt_tokens"] == 30
    assert c["requests_by_label"] == {"status=200": 3, "status=400": 1}
    assert d["histograms"]["ttft"]["count"] == 3
    assert d["histograms"]["ttft"]["mean_ms"] == pytest.approx(50.0)
    assert d["gauges_at_end"]["requests_running"] == 4.0
    assert d["gauges_at_end"]["requests_waiting"] == 2.0
    assert d["gauges_at_end"]["kv_cache_usage"] == 0.5
    assert "process_cpu_seconds" in c


def test_missing_metrics_are_absent_not_zero() -> None:
    assert deltas(None, None) == {"available": False}
    d = deltas(Snapshot(0, parse("foo 1\n")), Snapshot(1, parse("foo 2\n")))
    assert d["available"] and d["source"] == "other"
    assert d["counters"] == {} and d["histograms"] == {} and d["gauges_at_end"] == {}


def test_histogram_bound() -> None:
    b = [(0.1, 10.0), (0.2, 20.0), (float("inf"), 20.0)]
    assert histogram_bound(0.5, b) == pytest.approx(0.1)
    assert histogram_bound(0.75, b) == pytest.approx(0.2)
    assert histogram_bound(0.5, [(0.1, 0.0), (float("inf"), 0.0)]) is None
    assert histogram_bound(0.99, [(0.1, 1.0), (float("inf"), 2.0)]) == pytest.approx(0.1)


def test_gauge_stats_over_a_window() -> None:
    samples = [
        (0.5, {"requests_waiting": 1.0}),
        (1.5, {"requests_waiting": 5.0}),
        (2.5, {"requests_waiting": 9.0}),
    ]
    g = gauge_stats(samples, 1.0, 3.0)
    assert g["samples"] == 2 and g["requests_waiting"] == {"mean": 7.0, "max": 9.0}
