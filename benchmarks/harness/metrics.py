"""What is measured: per-request TTFT / TPOT / ITL / E2E, their distributions,
throughputs, goodput, schedule lag, and the coordinated-omission check.

Definitions (docs/benchmarks.md has the long form):
  start when the request could have been written: sent + its wait for a pooled connection
  TTFT  first chunk carrying generated text - start (role-only/empty chunks do not count)
  TPOT  (last token chunk - first token chunk) / (output tokens - 1), per request
  ITL   every gap between consecutive token-bearing chunks, pooled over requests
  E2E   end of the response ([DONE] / body read) - start
Summary keys follow vLLM's `bench serve --save-result` (`mean_ttft_ms`, ...).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from benchmarks.harness.profile.schema import SLO, Thresholds
from benchmarks.harness.records import RequestRecord

MS = 1000.0
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")


# ---------------------------------------------------------------- per request


def ttft(r: RequestRecord) -> float | None:
    """First token - start: the client's wait for a pooled connection is not in it."""
    start = r.start
    if not r.ok or not r.token_times or start is None:
        return None
    return r.token_times[0] - start


def tpot(r: RequestRecord) -> float | None:
    """(last token - first token) / (output tokens - 1); None below 2 tokens or unstreamed."""
    n = r.out_tokens
    if not r.ok or not r.token_times or n is None or n < 2:
        return None
    return (r.token_times[-1] - r.token_times[0]) / (n - 1)


def itls(r: RequestRecord) -> np.ndarray:
    if not r.ok or len(r.token_times) < 2:
        return np.empty(0)
    return np.diff(np.asarray(r.token_times))


def e2e(r: RequestRecord) -> float | None:
    start = r.start
    if not r.ok or start is None or r.finished is None:
        return None
    return r.finished - start


def ttft_from_schedule(r: RequestRecord) -> float | None:
    """What a user arriving on schedule waited for the first token (open loop)."""
    if not r.ok or not r.token_times or r.scheduled is None:
        return None
    return r.token_times[0] - r.scheduled


def e2e_from_schedule(r: RequestRecord) -> float | None:
    if not r.ok or r.finished is None or r.scheduled is None:
        return None
    return r.finished - r.scheduled


def lag(r: RequestRecord) -> float | None:
    """Actual send - scheduled send (open loop only)."""
    if r.scheduled is None or r.sent is None:
        return None
    return r.sent - r.scheduled


def meets_slo(r: RequestRecord, slo: SLO, from_schedule: bool = False) -> bool:
    """A finished request within every SLO that is set.

    A metric the request does not have fails its SLO: an unstreamed request has
    no TTFT, a 0/1-token output no TPOT. With `from_schedule` (open loop) TTFT
    and E2E count from the scheduled send, as the user arriving then saw them,
    so a client that falls behind cannot make goodput look better.
    """
    if not r.ok:
        return False
    first, end = (ttft_from_schedule, e2e_from_schedule) if from_schedule else (ttft, e2e)
    return all(
        limit is None or ((t := metric(r)) is not None and t * MS <= limit)
        for limit, metric in ((slo.ttft_ms, first), (slo.tpot_ms, tpot), (slo.e2e_ms, end))
    )


# ---------------------------------------------------------------- distributions


def pct_key(p: float) -> str:
    return str(int(p)) if float(p).is_integer() else str(p)


def distribution(
    values_s: Iterable[float | None], name: str, percentiles: Sequence[float]
) -> dict[str, Any]:
    """mean/median/std/pN of seconds, as `<stat>_<name>_ms` (None when there is no value)."""
    v = np.fromiter((x for x in values_s if x is not None), dtype=float)
    out: dict[str, Any] = {}
    empty = v.size == 0
    out[f"mean_{name}_ms"] = None if empty else float(np.mean(v) * MS)
    out[f"median_{name}_ms"] = None if empty else float(np.median(v) * MS)
    out[f"std_{name}_ms"] = None if empty else float(np.std(v) * MS)
    for p in percentiles:
        out[f"p{pct_key(p)}_{name}_ms"] = None if empty else float(np.percentile(v, p) * MS)
    return out


def cdf(values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x = np.sort(np.asarray(values, dtype=float))
    return x, np.arange(1, x.size + 1) / max(1, x.size)


# ---------------------------------------------------------------- throughput in a window


def output_tokens_in(records: Sequence[RequestRecord], a: float, b: float) -> float:
    """Output tokens that arrived in [a, b]: each request's count spread over its token chunks."""
    total = 0.0
    for r in records:
        n = r.out_tokens
        if not r.ok or not n:
            continue
        times: Sequence[float | None] = r.token_times or [r.finished]
        inside = sum(1 for t in times if t is not None and a <= t <= b)
        total += n * inside / len(times)
    return total


def _span_rate(times: list[float]) -> float | None:
    """Events per second over their own span: (n - 1) / (last - first)."""
    if len(times) < 2:
        return None
    span = max(times) - min(times)
    return (len(times) - 1) / span if span > 0 else None


# ---------------------------------------------------------------- the summary


def summarize(
    records: Sequence[RequestRecord],
    *,
    window: tuple[float, float],
    all_records: Sequence[RequestRecord] | None = None,
    percentiles: Sequence[float] = (50, 90, 99),
    slo: SLO | None = None,
    thresholds: Thresholds | None = None,
    open_loop: bool = False,
    offered: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The summary of `records` (the requests sent in this window).

    Latencies come from `records`; throughputs count what *finished* in
    `window` = (start, end) among `all_records` (default: `records`), so the
    windows of a run that changes load add up. For a single-window run the
    window ends at the last finish and both views are the same requests.
    """
    slo = slo or SLO()
    th = thresholds or Thresholds()
    everything = all_records if all_records is not None else records
    # Requests the client cancelled on purpose (editor keystrokes) are neither
    # completions nor failures: counted apart, out of the latency figures.
    sent = records
    records = [r for r in sent if not r.cancelled]
    a, b = window
    duration = max(b - a, 1e-9)
    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    finished_ok = [
        r for r in everything if r.ok and r.finished is not None and a <= r.finished <= b
    ]
    total_in = sum(r.prompt_tokens or 0 for r in ok)
    total_out = sum(r.out_tokens or 0 for r in ok)
    out_in_window = output_tokens_in(everything, a, b)
    in_in_window = sum(r.prompt_tokens or 0 for r in finished_ok)
    good = sum(1 for r in ok if meets_slo(r, slo, from_schedule=open_loop)) if slo.any else None

    s: dict[str, Any] = {
        # vLLM `bench serve --save-result` keys first, same names and units.
        "duration": duration,
        "completed": len(ok),
        "failed": len(failed),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(finished_ok) / duration,
        "request_goodput": (good / duration) if good is not None else None,
        "output_throughput": out_in_window / duration,
        "total_token_throughput": (in_in_window + out_in_window) / duration,
    }
    ttfts = [ttft(r) for r in ok]
    s |= distribution(ttfts, "ttft", percentiles)
    s |= distribution((tpot(r) for r in ok), "tpot", percentiles)
    all_itl = np.concatenate([itls(r) for r in ok]) if ok else np.empty(0)
    s |= distribution(all_itl.tolist(), "itl", percentiles)
    s |= distribution((e2e(r) for r in ok), "e2el", percentiles)

    # Ours: accounting, the load actually applied, and whether to trust it.
    s["requests"] = len(records)
    s["cancelled"] = len(sent) - len(records)
    s["good_requests"] = good
    s["slo"] = slo.model_dump(exclude_none=True) or None
    s["goodput_from"] = ("schedule" if open_loop else "start") if slo.any else None
    s["errors"] = error_summary(failed)
    s["streamed_without_tokens"] = sum(1 for r in ok if not r.token_times and r.chunks > 1)
    s |= token_accounting(ok)
    s["prompt_check"] = prompt_check(ok)
    # The load applied counts every request sent, cancelled ones too: their
    # connection waits and schedule lag are the client's all the same.
    s["load"] = load_stats(sent, open_loop, th, percentiles, offered)
    s["latency_breakdown"] = latency_breakdown(records, percentiles)
    return s


def prompt_check(ok: Sequence[RequestRecord]) -> dict[str, Any] | None:
    """The prompt lengths the client meant against what the server counted (`usage`)."""
    both = [
        (r.expected_prompt_tokens, r.prompt_tokens)
        for r in ok
        if r.expected_prompt_tokens is not None and r.prompt_tokens is not None
    ]
    if not both:
        return None
    diffs = [got - meant for meant, got in both]
    return {
        "checked": len(both),
        "mismatched": sum(1 for d in diffs if d),
        "expected_total": sum(meant for meant, _ in both),
        "server_total": sum(got for _, got in both),
        "max_abs_diff": max(abs(d) for d in diffs),
    }


# (key, label, from, to) of each part of a request's life, as the client saw it.
BREAKDOWN: tuple[tuple[str, str, str, str], ...] = (
    ("pool_wait", "wait for a pooled connection (client)", "sent", "conn_acquired"),
    ("connect", "TCP connect (new connections)", "connect_start", "connected"),
    ("write", "request written", "start", "written"),
    ("to_headers", "written → response headers", "written", "first_byte"),
    ("to_first_token", "headers → first token (server queue + prefill)", "first_byte", "first"),
    ("decode", "first → last token (decode)", "first", "last"),
    ("tail", "last token → end of response", "last", "finished"),
)


def _stamp(r: RequestRecord, name: str) -> float | None:
    if name == "first":
        return r.token_times[0] if r.token_times else None
    if name == "last":
        return r.token_times[-1] if r.token_times else None
    if name == "conn_acquired" and r.conn_acquired is None and r.sent is not None:
        return r.sent + r.conn_wait  # (a transport without hooks: what is known)
    value: float | None = getattr(r, name)
    return value


def latency_breakdown(records: Sequence[RequestRecord], percentiles: Sequence[float]) -> dict:
    """Each part of the successful requests' life, from the client's own timestamps."""
    ok = [r for r in records if r.ok]
    out: dict[str, Any] = {"new_connections": sum(1 for r in ok if r.new_connection)}
    for key, label, a, b in BREAKDOWN:
        spans = []
        for r in ok:
            ta, tb = _stamp(r, a), _stamp(r, b)
            if ta is not None and tb is not None:
                spans.append(max(0.0, tb - ta))
        d = distribution(spans, key, percentiles)
        out[key] = {
            "label": label,
            "count": len(spans),
            "mean_ms": d[f"mean_{key}_ms"],
            "median_ms": d[f"median_{key}_ms"],
            **{f"p{pct_key(p)}_ms": d[f"p{pct_key(p)}_{key}_ms"] for p in percentiles},
            "max_ms": max(spans) * MS if spans else None,
        }
    return out


def error_summary(failed: Sequence[RequestRecord], top: int = 10) -> list[dict[str, Any]]:
    counts = Counter(r.error or "unfinished" for r in failed)
    return [{"error": e, "count": n} for e, n in counts.most_common(top)]


def token_accounting(ok: Sequence[RequestRecord]) -> dict[str, Any]:
    """Where output counts came from, and how usage and re-tokenizing disagree."""
    usage = sum(1 for r in ok if r.output_tokens is not None)
    retok_only = sum(1 for r in ok if r.output_tokens is None and r.retok_output_tokens is not None)
    # (usage, re-tokenized) of the requests that have both
    both = [
        (r.output_tokens, r.retok_output_tokens)
        for r in ok
        if r.output_tokens is not None and r.retok_output_tokens is not None
    ]
    diffs = [retok - used for used, retok in both]
    short = [
        r
        for r in ok
        if r.max_tokens is not None and r.out_tokens is not None and r.out_tokens < r.max_tokens
    ]
    return {
        "output_token_source": {
            "usage": usage,
            "retokenized": retok_only,
            "unknown": len(ok) - usage - retok_only,
        },
        "token_check": {
            "checked": len(both),
            "mismatched": sum(1 for d in diffs if d != 0),
            "usage_total": sum(used for used, _ in both),
            "retokenized_total": sum(retok for _, retok in both),
            "max_abs_diff": max((abs(d) for d in diffs), default=0),
        }
        if both
        else None,
        "shorter_than_max_tokens": len(short),
    }


def load_stats(
    records: Sequence[RequestRecord],
    open_loop: bool,
    th: Thresholds,
    percentiles: Sequence[float],
    offered: dict[str, Any] | None,
) -> dict[str, Any]:
    sent = [r.sent for r in records if r.sent is not None]
    out: dict[str, Any] = {"open_loop": open_loop, **(offered or {})}
    out["achieved_send_rate"] = _span_rate(sent)
    # Finishes per second over their own span: unlike request_throughput it is
    # not diluted by the drain at the end, so it compares with the send rate.
    out["completion_rate"] = _span_rate([r.finished for r in records if r.ok and r.finished])
    waits = connection_wait_stats(records, th)
    out["connection_wait_ms"] = waits
    if not open_loop:
        # Closed loop: each worker waits for its own answer, so there is no
        # schedule to fall behind; what the client adds is its turnaround —
        # unless its requests queued for a connection inside the client.
        reasons = [waits["reason"]] if waits.get("reason") else []
        out["coordinated_omission"] = True if reasons else None
        out["coordinated_omission_reasons"] = reasons
        return out
    scheduled = [r.scheduled for r in records if r.scheduled is not None]
    lags = [x for x in (lag(r) for r in records) if x is not None]
    out["scheduled_rate"] = _span_rate(scheduled)
    out["unsent"] = sum(1 for r in records if r.sent is None)
    out |= distribution(lags, "schedule_lag", percentiles)
    out["max_schedule_lag_ms"] = max(lags) * MS if lags else None
    # Latency measured from when the request *should* have left: what a user
    # arriving on schedule would have seen (the coordinated-omission correction).
    out |= distribution((ttft_from_schedule(r) for r in records), "ttft_from_schedule", percentiles)
    out |= distribution((e2e_from_schedule(r) for r in records), "e2el_from_schedule", percentiles)
    reasons = []
    # More than 1 % of the requests sent later than the threshold (the lag p99
    # is above it) — and at least two, so that in a short run one hiccup of
    # the OS scheduler does not condemn the whole step on its own.
    late = sum(1 for x in lags if x * MS > th.max_lag_p99_ms)
    out["late_requests"] = late
    if late > 0.01 * len(lags) and late >= 2:
        lag_p99 = float(np.percentile(lags, 99)) * MS
        reasons.append(
            f"schedule lag p99 {lag_p99:.1f} ms > {th.max_lag_p99_ms:g} ms "
            f"({late} of {len(lags)} requests sent late)"
        )
    achieved, sched = out["achieved_send_rate"], out["scheduled_rate"]
    if achieved and sched and achieved < th.min_rate_ratio * sched:
        reasons.append(
            f"achieved send rate {achieved:.2f}/s < {th.min_rate_ratio:g} × scheduled {sched:.2f}/s"
        )
    if out["unsent"]:
        reasons.append(f"{out['unsent']} scheduled requests were never sent")
    if waits.get("reason"):
        reasons.append(waits["reason"])
    out["coordinated_omission"] = bool(reasons)
    out["coordinated_omission_reasons"] = reasons
    return out


def connection_wait_stats(records: Sequence[RequestRecord], th: Thresholds) -> dict[str, Any]:
    """How long requests queued for a connection in the client's own pool.

    A wait over `max_connection_wait_ms` is client-side queueing: the server
    never saw that request while it waited, so the run is flagged.
    """
    waits = np.fromiter((r.conn_wait for r in records if r.sent is not None), dtype=float)
    if waits.size == 0:
        return {"p50": None, "p99": None, "max": None, "mean": None, "over_threshold": 0}
    over = int(np.sum(waits * MS > th.max_connection_wait_ms))
    out: dict[str, Any] = {
        "p50": float(np.percentile(waits, 50) * MS),
        "p99": float(np.percentile(waits, 99) * MS),
        "max": float(waits.max() * MS),
        "mean": float(waits.mean() * MS),
        "over_threshold": over,
    }
    if over:
        out["reason"] = (
            f"connection wait: {over} of {waits.size} requests waited more than "
            f"{th.max_connection_wait_ms:g} ms for a connection in the client's pool "
            f"(max {out['max']:.1f} ms): client-side queueing"
        )
    return out


def loop_lag_stats(lags_s: Sequence[float], th: Thresholds) -> dict[str, Any]:
    v = np.asarray(lags_s, dtype=float)
    if v.size == 0:
        return {"samples": 0, "overloaded": None}
    p99 = float(np.percentile(v, 99) * MS)
    return {
        "samples": int(v.size),
        "mean_ms": float(v.mean() * MS),
        "p50_ms": float(np.percentile(v, 50) * MS),
        "p99_ms": p99,
        "max_ms": float(v.max() * MS),
        "overloaded": p99 > th.max_loop_lag_p99_ms,
    }


# The keys vLLM writes with --save-result (for diffing and the agreement check).
VLLM_KEYS = (
    "duration",
    "completed",
    "failed",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput",
    "request_goodput",
    "output_throughput",
    "total_token_throughput",
)


def vllm_keys(percentiles: Sequence[float]) -> list[str]:
    keys = list(VLLM_KEYS)
    for m in LATENCY_METRICS:
        keys += [f"mean_{m}_ms", f"median_{m}_ms", f"std_{m}_ms"]
        keys += [f"p{pct_key(p)}_{m}_ms" for p in percentiles]
    return keys
