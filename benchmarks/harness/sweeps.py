"""Sweeps: when a series of rising rates has saturated the server, and the knee."""

from __future__ import annotations

from typing import Any

from benchmarks.harness.profile.schema import SweepStop
from benchmarks.harness.results import StepResult


def saturation_reason(steps: list[StepResult], stop: SweepStop) -> str | None:
    """Why the last sweep step shows a saturated server, or None."""
    s = steps[-1].summary
    # The rate this step's random schedule really offered (a short Poisson
    # step can offer noticeably less than its nominal rate).
    nominal = steps[-1].offered.get("offered_rate") or 0.0
    offered = min(nominal, s["load"].get("scheduled_rate") or nominal)
    done = s["load"].get("completion_rate") or s["request_throughput"]
    n = max(1, s["requests"])
    if s["failed"] / n > stop.max_error_rate:
        return f"{s['failed']}/{n} requests failed"
    behind = [
        r
        for r in s["load"].get("coordinated_omission_reasons") or []
        if "send rate" in r or "never sent" in r
    ]
    if behind:
        # Past this rate the client, not the server, sets the numbers. (A few
        # late sends only flag the step: on a shared machine the OS causes those.)
        return "the client could not keep to its schedule: " + "; ".join(behind)
    if offered and done < stop.min_rate_ratio * offered:
        return f"completion rate {done:.2f} req/s < {stop.min_rate_ratio:g} × offered {offered:.2f}"
    if len(steps) > 1:
        prev_s = steps[-2].summary
        prev = prev_s["load"].get("completion_rate") or prev_s["request_throughput"]
        if prev and done < (1 + stop.min_gain) * prev:
            return f"throughput gain {done / prev - 1:+.1%} < {stop.min_gain:.0%}"
        base = steps[0].summary["median_e2el_ms"]
        med = s["median_e2el_ms"]
        if base and med and med > stop.max_latency_factor * base:
            return f"median E2E {med:.0f} ms > {stop.max_latency_factor:g} × {base:.0f} ms"
    return None


def sweep_summary(
    steps: list[StepResult], reason: str | None, rates: list[float]
) -> dict[str, Any]:
    """The knee: the highest offered rate before the step that saturated."""
    unsaturated = steps[:-1] if reason else steps
    knee = unsaturated[-1] if unsaturated else None
    best = max(steps, key=lambda st: st.summary["request_throughput"]) if steps else None
    return {
        "rates_planned": rates,
        "rates_run": [st.offered.get("offered_rate") for st in steps],
        "saturated": reason is not None,
        "saturation_reason": reason,
        "knee_rate": knee.offered.get("offered_rate") if knee else None,
        "knee_request_throughput": knee.summary["request_throughput"] if knee else None,
        "knee_output_throughput": knee.summary["output_throughput"] if knee else None,
        "knee_median_e2el_ms": knee.summary["median_e2el_ms"] if knee else None,
        "max_request_throughput": best.summary["request_throughput"] if best else None,
        "max_output_throughput": best.summary["output_throughput"] if best else None,
    }
