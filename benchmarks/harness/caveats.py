"""What makes a run's numbers less trustworthy, said plainly: the report's warnings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from benchmarks.harness.profile.schema import Thresholds
from benchmarks.harness.results import RunResult, StepResult


def collect_warnings(result: RunResult, metrics_ok: bool, metrics_error: str | None) -> list[str]:
    """What makes these numbers less trustworthy, said plainly."""
    p, s = result.profile, result.summary
    return [
        *_schedule_warnings(result.steps),
        *_client_warnings(result.client, p.thresholds),
        *_failure_warnings(s),
        *_token_warnings(s, p.request.ignore_eos),
        *_server_warnings(result, metrics_ok, metrics_error),
        *_prompt_warnings(s),
        *_cache_warnings(result),
        *_headroom_warnings(result),
    ]


def _schedule_warnings(steps: Sequence[StepResult]) -> list[str]:
    w: list[str] = []
    for st in steps:
        load = st.summary["load"]
        if load.get("coordinated_omission"):
            w.append(
                f"step '{st.label}': the client fell behind its schedule "
                f"(coordinated omission): {'; '.join(load['coordinated_omission_reasons'])}. "
                "Latencies from send time understate what on-schedule users would see; "
                "see *_from_schedule."
            )
    return w


# The client's event-loop thread waiting for a CPU for more than this share of the run,
# and more than this in all (shorter waits show in the event-loop lag already).
MAX_RUN_DELAY_SHARE = 0.05
MIN_RUN_DELAY_S = 0.25


def _client_warnings(client: dict[str, Any], thresholds: Thresholds) -> list[str]:
    w = []
    lag = client["loop_lag"]
    if lag.get("overloaded"):
        w.append(
            f"client event-loop lag p99 {lag['p99_ms']:.1f} ms > "
            f"{thresholds.max_loop_lag_p99_ms:g} ms: the client may be the bottleneck"
        )
    cpu = client.get("cpu") or {}
    delay, wall = cpu.get("run_delay_s"), cpu.get("wall_s")
    if delay is not None and wall and delay > max(MAX_RUN_DELAY_SHARE * wall, MIN_RUN_DELAY_S):
        w.append(
            f"the client's event loop waited {delay:.2f} s for a CPU ({delay / wall:.0%} of the "
            f"run) while it had work (using {cpu.get('cpu_s', 0):.2f} s): the host's CPUs were "
            "busy with other processes (the server, on a shared machine), and its timestamps are "
            "late by as much; give the client cores of its own (taskset) or priority "
            "(--client-priority)"
        )
    return w


def _failure_warnings(s: dict[str, Any]) -> list[str]:
    if s["failed"]:
        top = s["errors"][0]
        return [
            f"{s['failed']} of {s['requests']} requests failed "
            f"(most common: {top['error']!r} ×{top['count']})"
        ]
    return []


def _token_warnings(s: dict[str, Any], ignore_eos: bool) -> list[str]:
    w: list[str] = []
    if ignore_eos and s["shorter_than_max_tokens"]:
        w.append(
            f"{s['shorter_than_max_tokens']} responses are shorter than max_tokens with "
            "ignore_eos: the server may not support ignore_eos"
        )
    tc = s["token_check"]
    if tc and tc["mismatched"]:
        w.append(
            f"re-tokenized output differs from the server's usage in {tc['mismatched']}/"
            f"{tc['checked']} requests (usage {tc['usage_total']}, re-tokenized "
            f"{tc['retokenized_total']} tokens); usage is what is reported"
        )
    src = s["output_token_source"]
    if src["retokenized"] or src["unknown"]:
        w.append(
            f"the server sent no usage for {src['retokenized'] + src['unknown']} requests: "
            f"their output tokens are re-tokenized ({src['retokenized']}) "
            f"or unknown ({src['unknown']})"
        )
    return w


def _server_warnings(result: RunResult, metrics_ok: bool, metrics_error: str | None) -> list[str]:
    w: list[str] = []
    if result.profile.server_metrics and not metrics_ok:
        w.append(f"no server-side metrics: {metrics_error or 'scrape failed'}")
    ctr = result.server.get("counters") if isinstance(result.server, dict) else None
    if ctr and "generation_tokens" in ctr:
        server_out = ctr["generation_tokens"]
        ours = result.summary["total_output_tokens"]
        if ours and abs(server_out - ours) > 0.01 * ours:
            w.append(
                f"the server counted {server_out:.0f} generated tokens during the run, the client "
                f"{ours}: other traffic on the server, or requests the client did not see finish"
            )
    return w


def _prompt_warnings(s: dict[str, Any]) -> list[str]:
    pc = s.get("prompt_check")
    if not pc or not pc["mismatched"]:
        return []
    return [
        f"the server counted other prompt lengths than the client built in {pc['mismatched']}/"
        f"{pc['checked']} requests (client {pc['expected_total']}, server's usage "
        f"{pc['server_total']} prompt tokens; up to {pc['max_abs_diff']} apart): is --tokenizer "
        "the served model's?"
    ]


# A run not built to share prefixes that the cache still answers this much of is suspect.
MAX_UNPLANNED_HIT_RATE = 0.01


def _cache_warnings(result: RunResult) -> list[str]:
    w: list[str] = []
    reset = result.cache_reset
    if reset is not None and not reset.get("ok"):
        w.append(
            f"the prefix cache was not reset: POST {reset['url']} → {reset.get('error')} "
            "(vLLM's server has it with VLLM_SERVER_DEV_MODE=1; codellama-serve has none)"
        )
    cache = result.server.get("prefix_cache") if isinstance(result.server, dict) else None
    prompts = result.prompts or {}
    if cache and cache.get("hit_rate") and not prompts.get("shares_prefixes"):
        rate = cache["hit_rate"]
        if rate > MAX_UNPLANNED_HIT_RATE:
            why = (
                f"{prompts.get('repeated')} repeated prompts"
                if prompts.get("repeated")
                else "other traffic, or prompts that share a head"
            )
            w.append(
                f"the server's prefix cache answered {rate:.1%} of the prompt tokens it looked up "
                f"({cache['hits']:.0f} of {cache['queries']:.0f}) in a run not designed to share "
                f"prefixes ({why}): latencies are better than for fresh prompts"
            )
    return w


def planned_events_per_s(result: RunResult) -> float | None:
    """SSE events per second the run asked of its client: the peak offered rate × events
    per request (open loop), or what it got through (closed loop)."""
    ok = [r for r in result.records if r.ok]
    if not ok:
        return None
    per_request = sum(r.chunks for r in ok) / len(ok)
    rates = [st.offered.get("offered_rate") for st in result.steps]
    peak = max((r for r in rates if r), default=None)
    if peak is not None:
        return float(peak * per_request)
    duration = result.summary.get("duration") or 0.0
    return sum(r.chunks for r in ok) / duration if duration > 0 else None


def _headroom_warnings(result: RunResult) -> list[str]:
    from benchmarks.harness.selftest import headroom_path, read_headroom, sustained_events

    headroom = read_headroom()
    planned = planned_events_per_s(result)
    workers = int(result.client.get("workers", {}).get("count", 1))
    result.client["headroom"] = {"planned_events_per_s": planned, "selftest": None}
    if headroom is None or planned is None:
        return []
    measured = sustained_events(headroom, workers)
    if measured is None:
        return []
    k, sustained = measured
    result.client["headroom"]["selftest"] = {
        "workers": k, "sustained_events_per_s": sustained, "date": headroom.get("date"),
    }  # fmt: skip
    if planned <= sustained:
        return []
    return [
        f"this run asks its client for ≈{planned:,.0f} SSE events/s, above the {sustained:,.0f} "
        f"that `bench selftest` sustained with {k} worker(s) on {headroom.get('host')} "
        f"({headroom.get('date')}; {headroom_path()}): the client may be what limits; "
        "use more --workers"
    ]
