"""make routing-bench's bookkeeping (no Ray here): the counters it sums, the replica
share, and the summary's keys and targets as the issue names them."""

from __future__ import annotations

from benchmarks.experiments import routing
from benchmarks.harness.records import RequestRecord

METRICS_PAGE = """\
# HELP codellama_serve_prefix_cache_queries_total Prompt tokens looked up.
# TYPE codellama_serve_prefix_cache_queries_total counter
codellama_serve_prefix_cache_queries_total 1000.0
# HELP codellama_serve_prefix_cache_hits_total Prompt tokens found.
# TYPE codellama_serve_prefix_cache_hits_total counter
codellama_serve_prefix_cache_hits_total 640.0
codellama_serve_prefix_cache_hits_created 1.7e9
"""


def test_counters_and_hit_rate() -> None:
    c = routing.counters_of(METRICS_PAGE)
    assert c == {
        "codellama_serve_prefix_cache_queries": 1000.0,
        "codellama_serve_prefix_cache_hits": 640.0,
    }
    zero = dict.fromkeys(routing.COUNTERS, 0.0)
    assert routing.hit_rate(zero, c) == 0.64
    assert routing.hit_rate(c, c) is None  # nothing looked up


def test_max_replica_share_counts_answered_requests() -> None:
    recs = [RequestRecord(i, f"r{i}", replica=rep) for i, rep in enumerate([*"aaab", None])]
    assert routing.max_replica_share(recs) == 0.75


def trial(router: str, workload: str, hit: float, ttft: float, share: float) -> dict:
    return {
        "router": router, "workload": workload, "prefix_cache_hit_rate": hit,
        "ttft_p50_ms": ttft, "ttft_p99_ms": 2 * ttft, "shown_latency_p90_ms": None,
        "output_tok_s": 100.0, "failed": 0, "max_replica_share": share,
    }  # fmt: skip


def test_summary_keys_and_targets() -> None:
    trials = [
        trial("ours", "shared_prefix", 0.8, 70, 0.55),
        trial("default", "shared_prefix", 0.3, 100, 0.5),
        trial("ray_prefix", "shared_prefix", 0.6, 90, 0.9),
        trial("ours", "editor", 0.5, 50, 0.7),
        trial("default", "editor", 0.4, 50, 0.5),
    ]
    s = routing.summarize(trials)
    routers = s["workloads"]["shared_prefix"]["routers"]
    assert set(routers) == {"ours", "default", "ray_prefix"}
    assert set(routing.METRICS) <= set(routers["ours"])
    sp, ed = s["targets"]["shared_prefix"], s["targets"]["editor"]
    assert sp["hit_rate_vs_default"]["met"] is True
    assert sp["ttft_p50_vs_default"] == {"value": 0.7, "target": "<= 0.8", "met": True}
    assert ed["hit_rate_vs_default"]["met"] is False  # 1.25x
    assert ed["max_replica_share"]["met"] is False  # 0.7 > 0.65
    assert ed["ttft_p50_vs_default"]["met"] is None  # reported, not a target
    table = routing.markdown(s, {"date": "d", "command": "c", "setup": "two replicas"})
    assert "| ours | 80.0% | 70 / 140 |" in table
    assert "| hit_rate_vs_default | editor | 1.25 | >= 2.0 | ✗ |" in table
