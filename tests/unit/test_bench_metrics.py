"""The harness's statistics on synthetic timing data (no server)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.harness.metrics import (
    distribution,
    e2e,
    itls,
    loop_lag_stats,
    meets_slo,
    output_tokens_in,
    summarize,
    tpot,
    ttft,
    vllm_keys,
)
from benchmarks.harness.profile.schema import SLO, Thresholds
from benchmarks.harness.records import RequestRecord


def rec(
    i: int = 0,
    *,
    sent: float = 0.0,
    tokens: list[float] | None = None,
    finished: float | None = None,
    out: int | None = None,
    scheduled: float | None = None,
    error: str | None = None,
    prompt: int = 10,
) -> RequestRecord:
    tokens = tokens if tokens is not None else [sent + 0.1, sent + 0.2]
    r = RequestRecord(i, f"item-{i}", scheduled=scheduled, sent=sent, token_times=list(tokens))
    r.finished = finished if finished is not None else (tokens[-1] if tokens else sent) + 0.01
    r.output_tokens = out if out is not None else len(tokens)
    r.prompt_tokens = prompt
    r.error = error
    r.status = 200 if error is None else 500
    return r


def test_per_request_definitions() -> None:
    r = rec(sent=1.0, tokens=[1.25, 1.30, 1.50], out=7, finished=1.6)
    assert ttft(r) == pytest.approx(0.25)
    # (last token - first token) / (output tokens - 1), tokens from usage, not chunks
    assert tpot(r) == pytest.approx((1.50 - 1.25) / 6)
    assert itls(r) == pytest.approx([0.05, 0.20])
    assert e2e(r) == pytest.approx(0.6)


def test_ttft_is_the_first_token_bearing_chunk() -> None:
    # The client only records chunks that carry text; a role-only first chunk
    # (tested in test_bench_client) never becomes a token time.
    r = rec(sent=0.0, tokens=[], out=0, finished=0.5)
    r.chunks = 3  # role, empty content, usage
    assert ttft(r) is None and tpot(r) is None
    s = summarize([r], window=(0.0, 0.5))
    assert s["mean_ttft_ms"] is None and s["completed"] == 1
    assert s["streamed_without_tokens"] == 1


def test_tpot_needs_two_tokens_and_failed_requests_have_no_latency() -> None:
    assert tpot(rec(tokens=[0.1], out=1)) is None
    bad = rec(error="HTTP 500: boom")
    assert ttft(bad) is None and e2e(bad) is None and tpot(bad) is None and len(itls(bad)) == 0


def test_goodput_counts_exactly_the_requests_within_slo() -> None:
    slo = SLO(ttft_ms=100, tpot_ms=10, e2e_ms=1000)
    good = [
        rec(0, tokens=[0.05, 0.10], out=6),  # ttft 50, tpot 10 (== SLO counts), e2e 110
        rec(1, tokens=[0.10, 0.15], out=6),  # ttft exactly 100
        rec(2, tokens=[0.02, 0.52], out=101, finished=0.99),  # tpot 5, e2e 990
    ]
    bad = [
        rec(3, tokens=[0.101, 0.2], out=11),  # ttft 101
        rec(4, tokens=[0.01, 0.12], out=11),  # tpot 11
        rec(5, tokens=[0.01, 0.02], out=2, finished=1.001),  # e2e 1001
        rec(6, error="HTTP 503: overloaded"),  # failed: never good
        # One token has no TPOT: a metric the request lacks fails its SLO (issue 12;
        # it used to count as 0 and pass any TPOT objective).
        rec(7, tokens=[0.05], out=1),
    ]
    for r in good:
        assert meets_slo(r, slo), r
    for r in bad:
        assert not meets_slo(r, slo), r
    s = summarize(good + bad, window=(0.0, 2.0), slo=slo)
    assert s["good_requests"] == 3
    assert s["request_goodput"] == pytest.approx(3 / 2.0)
    assert s["completed"] == 7 and s["failed"] == 1


def test_only_the_slos_that_are_set_are_checked() -> None:
    r = rec(tokens=[0.5, 0.6], out=2)
    assert meets_slo(r, SLO(e2e_ms=700))
    assert not meets_slo(r, SLO(ttft_ms=400))
    s = summarize([r], window=(0, 1))
    assert s["request_goodput"] is None and s["good_requests"] is None
    # An unstreamed request has no TTFT: it cannot meet a TTFT objective.
    r2 = rec(tokens=[], out=5, finished=0.3)
    assert not meets_slo(r2, SLO(ttft_ms=1000)) and meets_slo(r2, SLO(e2e_ms=1000))


def test_summary_keys_match_vllm_and_values_match_numpy() -> None:
    g = np.random.default_rng(0)
    records = []
    for i in range(200):
        s0 = i * 0.05
        first = s0 + g.uniform(0.01, 0.2)
        toks = list(first + np.cumsum(g.uniform(0.001, 0.02, 15)))
        records.append(rec(i, sent=s0, tokens=[first, *toks], out=16))
    s = summarize(records, window=(0.0, 12.0), percentiles=[50, 90, 99, 99.9])
    for k in vllm_keys([50, 90, 99, 99.9]):
        assert k in s, k
    assert "p99.9_itl_ms" in s and "median_e2el_ms" in s
    tt = np.array([r.token_times[0] - r.sent for r in records]) * 1000
    assert s["mean_ttft_ms"] == pytest.approx(tt.mean())
    assert s["p99_ttft_ms"] == pytest.approx(np.percentile(tt, 99))
    assert s["std_ttft_ms"] == pytest.approx(tt.std())
    all_itl = np.concatenate([np.diff(r.token_times) for r in records]) * 1000
    assert s["median_itl_ms"] == pytest.approx(np.median(all_itl))
    assert s["total_output_tokens"] == 200 * 16 and s["total_input_tokens"] == 2000
    assert s["request_throughput"] == pytest.approx(200 / 12.0)
    assert s["output_throughput"] == pytest.approx(3200 / 12.0)
    assert s["total_token_throughput"] == pytest.approx(5200 / 12.0)


def test_failures_are_counted_and_summarised_never_dropped() -> None:
    records = [rec(0)] + [rec(i, error="HTTP 400: suffix is not supported") for i in range(1, 4)]
    records.append(rec(4, error="ReadTimeout"))
    s = summarize(records, window=(0, 1))
    assert s["requests"] == 5 and s["completed"] == 1 and s["failed"] == 4
    assert s["errors"][0] == {"error": "HTTP 400: suffix is not supported", "count": 3}
    assert s["errors"][1] == {"error": "ReadTimeout", "count": 1}


def test_window_throughput_counts_what_finished_inside_it() -> None:
    a = rec(0, sent=0.0, tokens=[0.5, 1.5], out=10, finished=1.6)  # 5 tokens per chunk
    b = rec(1, sent=1.0, tokens=[1.2, 2.5], out=4, finished=2.6)
    assert output_tokens_in([a, b], 0.0, 1.0) == pytest.approx(5)
    assert output_tokens_in([a, b], 1.0, 3.0) == pytest.approx(5 + 4)
    s = summarize([b], window=(1.0, 3.0), all_records=[a, b])
    assert s["request_throughput"] == pytest.approx(2 / 2.0)  # a and b both finished in [1, 3]
    assert s["completed"] == 1  # latencies: only the requests sent in this window


def test_coordinated_omission_is_flagged_not_hidden() -> None:
    th = Thresholds(max_lag_p99_ms=10, min_rate_ratio=0.95)
    on_time = [rec(i, scheduled=i * 0.1, sent=i * 0.1 + 0.001) for i in range(50)]
    s = summarize(on_time, window=(0, 6), open_loop=True, thresholds=th)
    assert s["load"]["coordinated_omission"] is False
    assert s["load"]["median_schedule_lag_ms"] == pytest.approx(1.0)

    # The client fell 20 ms further behind with every request (it could not keep up).
    late = [rec(i, scheduled=i * 0.1, sent=i * 0.12) for i in range(50)]
    s = summarize(late, window=(0, 7), open_loop=True, thresholds=th)
    load = s["load"]
    assert load["coordinated_omission"] is True
    assert any("lag p99" in r for r in load["coordinated_omission_reasons"])
    assert any("achieved send rate" in r for r in load["coordinated_omission_reasons"])
    assert load["achieved_send_rate"] == pytest.approx(1 / 0.12)
    assert load["scheduled_rate"] == pytest.approx(10.0)
    # Latency from the schedule includes the wait the user would have had.
    assert load["max_schedule_lag_ms"] == pytest.approx(49 * 20)
    assert load["p99_e2el_from_schedule_ms"] > s["p99_e2el_ms"] + 500

    closed = summarize(on_time, window=(0, 6), open_loop=False)
    assert closed["load"]["coordinated_omission"] is None


def test_unsent_scheduled_requests_flag_the_run() -> None:
    records = [rec(0, scheduled=0.0, sent=0.0)]
    never = RequestRecord(1, "x", scheduled=0.1)
    never.error = "cancelled (run interrupted)"
    s = summarize([*records, never], window=(0, 1), open_loop=True)
    assert s["load"]["unsent"] == 1 and s["load"]["coordinated_omission"] is True
    assert s["failed"] == 1


def test_token_accounting_reports_usage_and_retokenized_mismatch() -> None:
    a, b, c = rec(0, out=10), rec(1, out=12), rec(2)
    a.retok_output_tokens, b.retok_output_tokens = 10, 11
    c.output_tokens, c.retok_output_tokens = None, 7
    c.max_tokens = 16
    s = summarize([a, b, c], window=(0, 1))
    assert s["output_token_source"] == {"usage": 2, "retokenized": 1, "unknown": 0}
    assert s["token_check"]["checked"] == 2 and s["token_check"]["mismatched"] == 1
    assert s["token_check"]["max_abs_diff"] == 1
    assert s["total_output_tokens"] == 10 + 12 + 7  # usage first, re-tokenized as fallback
    assert s["shorter_than_max_tokens"] == 1


def test_distribution_of_nothing_is_none_not_zero() -> None:
    d = distribution([], "ttft", [50, 99])
    assert d == {
        "mean_ttft_ms": None,
        "median_ttft_ms": None,
        "std_ttft_ms": None,
        "p50_ttft_ms": None,
        "p99_ttft_ms": None,
    }


def test_loop_lag_stats_flag_an_overloaded_client() -> None:
    th = Thresholds(max_loop_lag_p99_ms=5)
    assert loop_lag_stats([0.0005] * 100, th)["overloaded"] is False
    assert loop_lag_stats([0.0005] * 90 + [0.05] * 10, th)["overloaded"] is True
    assert loop_lag_stats([], th)["samples"] == 0


def test_one_late_request_is_reported_but_two_percent_flag_the_step() -> None:
    th = Thresholds(max_lag_p99_ms=10)
    base = [rec(i, scheduled=i * 0.1, sent=i * 0.1 + 0.0005) for i in range(75)]
    base[40].sent = base[40].scheduled + 0.043  # one OS hiccup
    load = summarize(base, window=(0, 8), open_loop=True, thresholds=th)["load"]
    assert load["late_requests"] == 1 and load["coordinated_omission"] is False
    assert load["max_schedule_lag_ms"] == pytest.approx(43.0)
    base[41].sent = base[41].scheduled + 0.020
    load = summarize(base, window=(0, 8), open_loop=True, thresholds=th)["load"]
    assert load["late_requests"] == 2 and load["coordinated_omission"] is True
