"""The server's own view: Prometheus `/metrics` scraped around each step.

Counters and histograms are reported as deltas between the scrape before and
the scrape after a step; gauges (queue depth, KV-cache use) are sampled during
the step, since after it they are back at idle. Names of ours
(`codellama_serve_*`) and of vLLM's server (`vllm:*`) are both understood;
whatever a target does not export is simply absent from the report.

The text format is parsed here, keeping only the families we report, so a
scrape during a run costs the client little (vLLM exports hundreds of series).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from benchmarks.harness.records import now
from benchmarks.harness.transport import Transport

Labels = tuple[tuple[str, str], ...]
Samples = dict[tuple[str, Labels], float]

GAUGES: dict[str, tuple[str, ...]] = {
    "requests_running": ("codellama_serve_requests_running", "vllm:num_requests_running"),
    "requests_waiting": ("codellama_serve_requests_waiting", "vllm:num_requests_waiting"),
    "kv_cache_usage": (
        "codellama_serve_kv_cache_usage_ratio",
        "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc",
    ),
    "http_in_flight": ("codellama_serve_http_requests_in_flight",),
}
COUNTERS: dict[str, tuple[str, ...]] = {
    "requests": ("codellama_serve_requests_total", "vllm:request_success_total"),
    "prompt_tokens": ("codellama_serve_prompt_tokens_total", "vllm:prompt_tokens_total"),
    "generation_tokens": (
        "codellama_serve_generation_tokens_total",
        "vllm:generation_tokens_total",
    ),
    "aborted": ("codellama_serve_requests_aborted_total",),
    "aborted_generation_tokens": ("codellama_serve_aborted_generation_tokens_total",),
    # Prompt tokens looked up in the prefix cache, and of them found there.
    "prefix_cache_queries": (
        "codellama_serve_prefix_cache_queries_total",
        "vllm:prefix_cache_queries_total",
        "vllm:gpu_prefix_cache_queries_total",
    ),
    "prefix_cache_hits": (
        "codellama_serve_prefix_cache_hits_total",
        "vllm:prefix_cache_hits_total",
        "vllm:gpu_prefix_cache_hits_total",
    ),
    "preemptions": ("codellama_serve_preemptions_total", "vllm:num_preemptions_total"),
    "process_cpu_seconds": ("process_cpu_seconds_total",),
}
# Counters reported by label too: requests by status, aborts by reason.
KEPT_LABELS: dict[str, tuple[str, ...]] = {
    "requests": ("status",),
    "aborted": ("reason",),
    "aborted_generation_tokens": ("reason",),
}
HISTOGRAMS: dict[str, tuple[str, ...]] = {
    "ttft": ("codellama_serve_time_to_first_token_seconds", "vllm:time_to_first_token_seconds"),
    "tpot": (
        "codellama_serve_time_per_output_token_seconds",
        "vllm:request_time_per_output_token_seconds",
        "vllm:time_per_output_token_seconds",
    ),
    "itl": ("vllm:inter_token_latency_seconds",),
    "e2e": ("codellama_serve_e2e_request_latency_seconds", "vllm:e2e_request_latency_seconds"),
    "queue_time": ("vllm:request_queue_time_seconds",),
    "prefill": ("vllm:request_prefill_time_seconds",),
    "decode": ("vllm:request_decode_time_seconds",),
    "inference": ("vllm:request_inference_time_seconds",),
}

_WANTED = tuple(
    {n for names in (*GAUGES.values(), *COUNTERS.values()) for n in names}
    | {n + s for names in HISTOGRAMS.values() for n in names for s in ("_bucket", "_sum", "_count")}
)
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text: str, wanted: tuple[str, ...] = _WANTED) -> Samples:
    """Samples of the wanted metric names: {(name, labels): value}."""
    out: Samples = {}
    for line in text.splitlines():
        if not line or line[0] == "#" or not line.startswith(wanted):
            continue
        brace = line.find("{")
        if brace >= 0:
            end = line.rfind("}")
            name, labels_s, rest = line[:brace], line[brace + 1 : end], line[end + 1 :]
            labels = tuple(sorted(_LABEL.findall(labels_s)))
        else:
            name, _, rest = line.partition(" ")
            labels = ()
        if name not in wanted:
            continue
        try:
            out[(name, labels)] = float(rest.split()[0])
        except (IndexError, ValueError):
            continue
    return out


@dataclass
class Snapshot:
    t: float
    samples: Samples

    def names(self) -> set[str]:
        return {n for n, _ in self.samples}


def _pick(snap: Snapshot, candidates: tuple[str, ...], suffix: str = "") -> str | None:
    names = snap.names()
    return next((c for c in candidates if c + suffix in names), None)


def _sum(snap: Snapshot, name: str, keep: tuple[str, ...] = ()) -> dict[Labels, float]:
    """Values of `name` by the labels in `keep`, summed over all other labels."""
    out: dict[Labels, float] = {}
    for (n, labels), v in snap.samples.items():
        if n == name:
            key = tuple(kv for kv in labels if kv[0] in keep)
            out[key] = out.get(key, 0.0) + v
    return out


def histogram_bound(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """The upper bound of the bucket that holds quantile q of cumulative (le, count) buckets.

    A bound, not an interpolation: interpolating inside a bucket (as Prometheus'
    histogram_quantile does) reads 150 ms for a p50 whose observations are all
    ~0 ms when the first bucket is 0-300 ms. The mean, from _sum/_count, is exact.
    """
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    prev_le = 0.0
    for le, c in buckets:
        if c >= rank:
            return prev_le if math.isinf(le) else le  # +Inf: the last finite bound
        prev_le = le
    return prev_le


def deltas(before: Snapshot | None, after: Snapshot | None) -> dict[str, Any]:
    """Counter and histogram changes between two scrapes, with gauge values at both ends."""
    if before is None or after is None:
        return {"available": False}
    out: dict[str, Any] = {"available": True, "interval_s": after.t - before.t}
    names = after.names()
    out["source"] = (
        "codellama-serve"
        if any(n.startswith("codellama_serve_") for n in names)
        else "vllm"
        if any(n.startswith("vllm:") for n in names)
        else "other"
    )
    counters: dict[str, Any] = {}
    for key, cands in COUNTERS.items():
        name = _pick(after, cands)
        if name is None:
            continue
        keep = KEPT_LABELS.get(key, ())
        keep = ("finished_reason", *keep) if name.startswith("vllm:") else keep
        a, b = _sum(after, name, keep), _sum(before, name, keep)
        by = {k: a[k] - b.get(k, 0.0) for k in a}
        counters[key] = sum(by.values())
        if keep:
            counters[key + "_by_label"] = {
                ",".join(f"{k}={v}" for k, v in lab) or "all": d for lab, d in by.items() if d
            }
    out["counters"] = counters
    out["prefix_cache"] = prefix_cache(counters)
    hists: dict[str, Any] = {}
    for key, cands in HISTOGRAMS.items():
        name = _pick(after, cands, "_count")
        if name is None:
            continue
        count = sum(_sum(after, name + "_count").values()) - sum(
            _sum(before, name + "_count").values()
        )
        total = sum(_sum(after, name + "_sum").values()) - sum(_sum(before, name + "_sum").values())
        ba, bb = _sum(after, name + "_bucket", ("le",)), _sum(before, name + "_bucket", ("le",))
        buckets = [(float(dict(k)["le"]), v - bb.get(k, 0.0)) for k, v in ba.items()]
        h: dict[str, Any] = {"metric": name, "count": count}
        if count > 0:
            h["mean_ms"] = total / count * 1000
            for q in (0.5, 0.9, 0.99):
                v = histogram_bound(q, buckets)
                h[f"p{round(q * 100)}_le_ms"] = None if v is None else v * 1000
        hists[key] = h
    out["histograms"] = hists
    out["gauges_at_end"] = {
        key: sum(_sum(after, name).values())
        for key, cands in GAUGES.items()
        if (name := _pick(after, cands)) is not None
    }
    return out


def prefix_cache(counters: dict[str, Any]) -> dict[str, Any] | None:
    """Prompt tokens the server looked up in its prefix cache and found: the hit rate."""
    if "prefix_cache_queries" not in counters:
        return None
    q, h = counters["prefix_cache_queries"], counters.get("prefix_cache_hits", 0.0)
    return {"queries": q, "hits": h, "hit_rate": h / q if q else None}


def gauge_stats(
    samples: list[tuple[float, dict[str, float]]], a: float, b: float
) -> dict[str, Any]:
    """Mean and max of each sampled gauge over [a, b]."""
    inside = [g for t, g in samples if a <= t <= b]
    out: dict[str, Any] = {"samples": len(inside)}
    for key in GAUGES:
        v = [g[key] for g in inside if key in g]
        if v:
            out[key] = {"mean": float(np.mean(v)), "max": float(np.max(v))}
    return out


def gauges_of(snap: Samples) -> dict[str, float]:
    s = Snapshot(0.0, snap)
    return {
        key: sum(_sum(s, name).values())
        for key, cands in GAUGES.items()
        if (name := _pick(s, cands)) is not None
    }


@dataclass
class ServerMetricsRecorder:
    """Scrapes a target's /metrics: snapshots on demand, gauges every `interval_s`."""

    http: Transport
    url: str
    t0: float = 0.0
    interval_s: float = 1.0
    enabled: bool = True
    error: str | None = None
    samples: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    async def _get(self) -> str | None:
        if not self.enabled:
            return None
        try:
            status, body = await self.http.get(self.url, timeout_s=10)
        except _scrape_errors(self.http) as e:
            self.error = f"{type(e).__name__}: {e}"
            return None
        if status != 200:
            self.error = f"HTTP {status} from {self.url}"
            return None
        return body.decode("utf-8", errors="replace")

    async def snapshot(self) -> Snapshot | None:
        text = await self._get()
        if text is None:
            return None
        snap = Snapshot(now() - self.t0, parse(text))
        if not snap.samples:
            self.error = f"{self.url} has none of the known metrics"
        return snap

    async def probe(self) -> bool:
        """One scrape up front: turn scraping off if the target has no /metrics."""
        snap = await self.snapshot()
        if snap is None or not snap.samples:
            self.enabled = False
            return False
        return True

    async def _sample(self) -> None:
        while True:
            text = await self._get()
            if text is not None:
                self.samples.append((now() - self.t0, gauges_of(parse(text, _GAUGE_NAMES))))
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        if self.enabled:
            self._task = asyncio.get_running_loop().create_task(self._sample())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def _scrape_errors(http: Transport) -> tuple[type[BaseException], ...]:
    """What a failed scrape raises: the transport's errors, or a timeout."""
    return (*http.errors, TimeoutError)


_GAUGE_NAMES = tuple(n for names in GAUGES.values() for n in names)


def prefix_cache_hit_rate(server: dict[str, Any]) -> float | None:
    """Prompt tokens found in the prefix cache / looked up, over a scrape delta (None: unknown)."""
    cache = server.get("prefix_cache") or prefix_cache(server.get("counters") or {})
    rate = cache.get("hit_rate") if cache else None
    return None if rate is None else float(rate)
