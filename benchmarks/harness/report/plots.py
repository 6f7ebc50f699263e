"""A run as PNG plots: latency CDFs, a timeline, throughput and latency against offered load."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and in CI

import matplotlib.pyplot as plt
import numpy as np

from benchmarks.harness import metrics as m
from benchmarks.harness.records import RequestRecord
from benchmarks.harness.report.as_markdown import LATENCY_NAMES
from benchmarks.harness.results import RunResult


def _latency_values(records: Sequence[RequestRecord]) -> dict[str, list[float]]:
    ok = [r for r in records if r.ok]
    return {
        "ttft": [x * 1000 for r in ok if (x := m.ttft(r)) is not None],
        "tpot": [x * 1000 for r in ok if (x := m.tpot(r)) is not None],
        "itl": (np.concatenate([m.itls(r) for r in ok]) * 1000).tolist() if ok else [],
        "e2el": [x * 1000 for r in ok if (x := m.e2e(r)) is not None],
    }


def plot_cdfs(groups: Mapping[str, Sequence[RequestRecord]], path: Path, title: str) -> Path:
    """Latency CDFs (TTFT, TPOT, ITL, E2E), one line per group of records."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for ax, (key, name) in zip(axes.flat, LATENCY_NAMES.items(), strict=True):
        for label, records in groups.items():
            vals = _latency_values(records)[key]
            if vals:
                x, y = m.cdf(vals)
                ax.plot(x, y, label=f"{label} (n={len(vals)})", drawstyle="steps-post")
        ax.set_title(f"{name} CDF")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction ≤ x")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
            if key == "itl" and any(v > 0 for line in ax.lines for v in line.get_xdata()):
                ax.set_xscale("log")  # gaps of 0 (same network read) fall off the left
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_timeline(result: RunResult, path: Path) -> Path:
    """Per request over time: TTFT and E2E; output tok/s per second; schedule lag."""
    recs = result.records
    ok = [r for r in recs if r.ok and r.sent is not None]
    bad = [r for r in recs if not r.ok and not r.cancelled and r.sent is not None]
    open_loop = any(r.scheduled is not None for r in recs)
    n = 3 if open_loop else 2
    fig, axes = plt.subplots(n, 1, figsize=(11, 2.8 * n), sharex=True)
    ax = axes[0]
    e2 = [(r.sent, x) for r in ok if (x := m.e2e(r)) is not None]  # every ok request has one
    ax.scatter([a for a, _ in e2], [b * 1000 for _, b in e2], s=6, label="E2E")
    tt = [(r.sent, x) for r in ok if (x := m.ttft(r)) is not None]
    if tt:
        ax.scatter([a for a, _ in tt], [b * 1000 for _, b in tt], s=6, label="TTFT")
    if bad:
        ax.scatter([r.sent for r in bad], [0] * len(bad), marker="x", color="red", label="failed")
    cut = [
        (r.sent, (r.finished - r.sent) * 1000)
        for r in recs
        if r.cancelled and r.sent is not None and r.finished is not None
    ]
    if cut:  # editor requests closed by a keystroke: how long they had run
        ax.scatter(
            [a for a, _ in cut], [b for _, b in cut],
            s=4, marker=".", color="gray", alpha=0.5, label="cancelled (time to cancel)",
        )  # fmt: skip
    ax.set_ylabel("ms")
    ax.set_title("latency by send time")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax = axes[1]
    end = max((r.finished or 0.0) for r in recs) if recs else 0.0
    bins = np.arange(0.0, math.ceil(end) + 1.0, 1.0)
    if len(bins) > 1:
        per_sec = [m.output_tokens_in(ok, a, a + 1.0 - 1e-9) for a in bins[:-1]]
        ax.bar(bins[:-1], per_sec, width=1.0, align="edge", alpha=0.7)
    for st in result.steps[1:]:
        ax.axvline(st.window[0], color="gray", ls="--", lw=0.8)
    ax.set_ylabel("output tok/s")
    ax.set_title("output tokens per second (client-side)")
    ax.grid(alpha=0.3)
    if open_loop:
        ax = axes[2]
        lags = [
            (r.scheduled, (r.sent - r.scheduled) * 1000)
            for r in recs
            if r.scheduled is not None and r.sent is not None
        ]
        ax.scatter([a for a, _ in lags], [b for _, b in lags], s=5, color="purple")
        ax.axhline(
            result.profile.thresholds.max_lag_p99_ms,
            color="red",
            ls=":",
            lw=1,
            label="CO threshold (p99)",
        )
        ax.set_ylabel("ms")
        ax.set_title("schedule lag (actual send − scheduled send)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("seconds since start")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_load_curve(result: RunResult, path: Path) -> Path:
    """Throughput and latency against offered load (sweeps and steps)."""
    steps = result.steps
    closed = "concurrency" in steps[0].offered
    x = [st.offered.get("concurrency" if closed else "offered_rate") or 0 for st in steps]
    xlabel = "concurrency" if closed else "offered rate (req/s)"
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 4.5))
    a1.plot(x, [st.summary["request_throughput"] for st in steps], "o-", label="completed req/s")
    rates = [st.summary["load"].get("completion_rate") for st in steps]
    a1.plot(x, [r or 0 for r in rates], "s--", label="completion rate (no drain)")
    if not closed:
        a1.plot(x, x, ":", color="gray", label="= offered")
    a1.set_ylabel("req/s")
    a1.set_title("requests/s vs offered load")
    a2.plot(x, [st.summary["output_throughput"] for st in steps], "o-", color="tab:orange")
    a2.set_ylabel("output tok/s")
    a2.set_title("output tokens/s vs offered load")
    for key, name in (("ttft", "TTFT"), ("e2el", "E2E")):
        a3.plot(x, [st.summary[f"median_{key}_ms"] for st in steps], "o-", label=f"{name} median")
        a3.plot(x, [st.summary[f"p99_{key}_ms"] for st in steps], "^--", label=f"{name} p99")
    a3.set_ylabel("ms")
    a3.set_yscale("log")
    a3.set_title("latency vs offered load")
    knee = (result.sweep or {}).get("knee_rate")
    for ax in (a1, a2, a3):
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if knee:
            ax.axvline(knee, color="red", ls=":", lw=1, label="knee")
        if ax is not a2:
            ax.legend(fontsize=7)
    fig.suptitle(f"{result.profile.name} · {result.target.label}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
