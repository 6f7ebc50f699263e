"""How results are shown: one JSON per run (vLLM-compatible summary keys at the
top), a Markdown summary, and PNG plots (latency CDFs, a timeline, and
throughput/latency against offered load for multi-step runs)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and in CI

import matplotlib.pyplot as plt
import numpy as np

from benchmarks.harness import metrics as m
from benchmarks.harness.results import RunResult

LATENCY_NAMES = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2E"}


# ---------------------------------------------------------------- JSON


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN/inf become null, numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def run_to_json(
    result: RunResult,
    *,
    with_requests: bool = False,
    with_text: bool = False,
    command: Sequence[str] | None = None,
) -> dict[str, Any]:
    p = result.profile
    s = result.summary
    out: dict[str, Any] = {
        "date": result.started,
        "backend": "openai-chat" if p.endpoint == "chat" else "openai",
        "base_url": result.target.root,
        "label": result.target.label,
        "model_id": result.model,
        "endpoint": f"/v1/{'chat/completions' if p.endpoint == 'chat' else 'completions'}",
        "profile": p.name,
        "command": list(command) if command else None,
    }
    # The vLLM `bench serve --save-result` summary, same keys, at the top level.
    for k in m.vllm_keys(p.percentiles):
        out[k] = s.get(k)
    out["max_concurrency"] = s["load"].get("concurrency") or s["load"].get("max_concurrency")
    out["request_rate"] = s["load"].get("offered_rate")
    out["burstiness"] = s["load"].get("burstiness")
    out["summary"] = s
    out["steps"] = [
        {
            "index": st.index,
            "label": st.label,
            "offered": st.offered,
            "window": st.window,
            **st.summary,
            "server": st.server,
        }
        for st in result.steps
    ]
    out["sweep"] = result.sweep
    out["server"] = result.server
    out["client"] = result.client
    out["warmup"] = result.warmup
    out["warnings"] = result.warnings
    out["settings"] = p.model_dump(mode="json")
    if with_requests:
        out["requests"] = [r.to_dict(with_text=with_text) for r in result.records]
    return _clean(out)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- Markdown


def f(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, bool):
        return "**yes**" if v else "no"
    if isinstance(v, int):
        return str(v)
    return f"{v:,.{digits}f}"


def _g(v: float | None) -> str:
    return "–" if v is None else f"{v:.4g}"


def _offered_text(offered: dict[str, Any]) -> str:
    if "concurrency" in offered:
        return f"closed loop, concurrency {offered['concurrency']}"
    if offered.get("offered_rate") is None:
        return "–"
    text = f"{offered['offered_rate']:.4g} req/s"
    if offered.get("arrival"):
        text += f" {offered['arrival']}"
    if offered.get("burstiness"):
        text += f" (burstiness {offered['burstiness']:g})"
    if offered.get("max_concurrency"):
        text += f", max {offered['max_concurrency']} in flight"
    return text


def latency_table(s: dict[str, Any], percentiles: Sequence[float]) -> list[str]:
    pk = [m.pct_key(p) for p in percentiles if p != 50]  # P50 is the median column
    head = "| Latency (ms) | Mean | Median | " + " | ".join(f"P{k}" for k in pk) + " |"
    rows = [head, "|" + "---|" * (3 + len(pk))]
    for key, name in LATENCY_NAMES.items():
        vals = [s.get(f"mean_{key}_ms"), s.get(f"median_{key}_ms")]
        vals += [s.get(f"p{k}_{key}_ms") for k in pk]
        rows.append(f"| {name} | " + " | ".join(f(v) for v in vals) + " |")
    load = s["load"]
    if load.get("open_loop") and load.get("median_e2el_from_schedule_ms") is not None:
        for key, name in (
            ("ttft_from_schedule", "TTFT from schedule"),
            ("e2el_from_schedule", "E2E from schedule"),
        ):
            vals = [load.get(f"mean_{key}_ms"), load.get(f"median_{key}_ms")]
            vals += [load.get(f"p{k}_{key}_ms") for k in pk]
            rows.append(f"| {name} | " + " | ".join(f(v) for v in vals) + " |")
    return rows


def throughput_table(s: dict[str, Any]) -> list[str]:
    load = s["load"]
    rows = [
        "| Requests (ok / failed) | Duration (s) | Request/s | Output tok/s | Total tok/s "
        "| Goodput req/s |",
        "|---|---|---|---|---|---|",
        f"| {s['requests']} ({s['completed']} / {s['failed']}) | {f(s['duration'], 2)} "
        f"| {f(s['request_throughput'], 2)} | {f(s['output_throughput'])} "
        f"| {f(s['total_token_throughput'])} | {f(s['request_goodput'], 2)} |",
        "",
        "| Offered load | Achieved send rate | Schedule lag P50 / P99 / max (ms) "
        "| Coordinated omission |",
        "|---|---|---|---|",
        f"| {_offered_text(load)} | {f(load.get('achieved_send_rate'), 2)} req/s "
        f"| {lag_text(load)} | {co_text(load)} |",
    ]
    return rows


def lag_text(load: dict[str, Any]) -> str:
    if not load.get("open_loop"):
        return "– (closed loop)"
    return (
        f"{f(load.get('median_schedule_lag_ms'), 2)} / {f(load.get('p99_schedule_lag_ms'), 2)}"
        f" / {f(load.get('max_schedule_lag_ms'), 2)}"
    )


def co_text(load: dict[str, Any]) -> str:
    co = load.get("coordinated_omission")
    if co is None:
        return "n/a (closed loop)"
    return "**FLAGGED**: " + "; ".join(load["coordinated_omission_reasons"]) if co else "no"


def steps_table(result: RunResult) -> list[str]:
    rows = [
        "| Step | Offered | Sent/s | Lag P99 (ms) | CO | ok / failed | Req/s | Out tok/s "
        "| TTFT P50 / P99 (ms) | TPOT P50 (ms) | ITL P50 (ms) | E2E P50 / P99 (ms) | Goodput "
        "| Client CPU / loop lag P99 |",
        "|" + "---|" * 14,
    ]
    for st in result.steps:
        s, load = st.summary, st.summary["load"]
        co = load.get("coordinated_omission")
        co_cell = "–" if co is None else ("**yes**" if co else "no")
        rows.append(
            f"| {st.index} | {_offered_text(st.offered)} | {f(load.get('achieved_send_rate'), 2)} "
            f"| {f(load.get('p99_schedule_lag_ms'), 2)} | {co_cell} "
            f"| {s['completed']} / {s['failed']} | {f(s['request_throughput'], 2)} "
            f"| {f(s['output_throughput'])} | {f(s['median_ttft_ms'])} / {f(s['p99_ttft_ms'])} "
            f"| {f(s['median_tpot_ms'], 2)} | {f(s['median_itl_ms'], 2)} "
            f"| {f(s['median_e2el_ms'])} / {f(s['p99_e2el_ms'])} | {f(s['request_goodput'], 2)} "
            f"| {_client_cell(s.get('client'))} |"
        )
    return rows


def _client_cell(c: dict[str, Any] | None) -> str:
    if not c:
        return "–"
    util = c.get("phase_cpu_utilization")
    lag = c["loop_lag"].get("p99_ms")
    return f"{f(None if util is None else 100 * util, 0)}% / {f(lag)} ms"


def server_table(server: dict[str, Any]) -> list[str]:
    if not server.get("available"):
        return ["Server-side metrics: not available."]
    rows = [
        f"Server-side (`/metrics`, {server.get('source')}; deltas over the run):",
        "",
        "| Server metric | Value |",
        "|---|---|",
    ]
    c = server.get("counters", {})
    for key, label in (
        ("requests", "requests finished"),
        ("generation_tokens", "generated tokens"),
        ("prompt_tokens", "prompt tokens"),
        ("aborted", "requests aborted"),
        ("preemptions", "preemptions"),
        ("process_cpu_seconds", "server process CPU (s)"),
    ):
        if key in c:
            rows.append(f"| {label} | {f(c[key], 1 if key == 'process_cpu_seconds' else 0)} |")
    for key, label in (
        ("ttft", "TTFT"),
        ("tpot", "TPOT"),
        ("itl", "ITL"),
        ("e2e", "E2E"),
        ("queue_time", "queue time"),
    ):
        h = server.get("histograms", {}).get(key)
        if h and h.get("count"):
            rows.append(
                f"| server {label} mean / P50 ≤ / P99 ≤ (ms) | {f(h.get('mean_ms'))} / "
                f"{f(h.get('p50_le_ms'))} / {f(h.get('p99_le_ms'))} |"
            )
    g = server.get("gauges", {})
    for key, label in (
        ("requests_running", "running (mean / max)"),
        ("requests_waiting", "waiting (mean / max)"),
        ("kv_cache_usage", "KV-cache usage (mean / max)"),
    ):
        if key in g:
            digits = 3 if key == "kv_cache_usage" else 1
            rows.append(f"| {label} | {f(g[key]['mean'], digits)} / {f(g[key]['max'], digits)} |")
    return rows


def client_table(client: dict[str, Any]) -> list[str]:
    cpu, lag = client["cpu"], client["loop_lag"]
    return [
        "| Client | Value |",
        "|---|---|",
        f"| CPU time (user + sys) | {f(cpu['cpu_s'], 2)} s "
        f"({f(100 * cpu['cpu_utilization'])}% of one core) |",
        f"| event-loop lag P50 / P99 / max (ms) | {f(lag.get('p50_ms'), 2)} / "
        f"{f(lag.get('p99_ms'), 2)} / {f(lag.get('max_ms'), 2)} |",
        f"| overloaded | {f(lag.get('overloaded'))} |",
        f"| HTTP | {client['http']} · event loop {client['event_loop']} |",
    ]


def run_markdown(result: RunResult, plots: Sequence[str] = ()) -> str:
    p, s = result.profile, result.summary
    req = p.request
    path = "chat/completions" if p.endpoint == "chat" else "completions"
    lines = [
        f"# Benchmark `{p.name}` against {result.target.label}",
        "",
        f"{result.started} · model `{result.model}` · `/v1/{path}`"
        f" · {'streamed' if req.stream else 'not streamed'} · dataset `{p.dataset.type}`"
        f" · max_tokens {req.max_tokens}{' · ignore_eos' if req.ignore_eos else ''}"
        f" · seed {p.seed}",
        "",
    ]
    if p.description:
        lines += [p.description.strip(), ""]
    if result.warnings:
        lines += ["**Warnings**", "", *(f"- {w}" for w in result.warnings), ""]
    if len(result.steps) > 1:
        lines += ["## Steps", "", *steps_table(result), ""]
        if result.sweep:
            sw = result.sweep
            lines += [
                f"Sweep: knee at **{_g(sw['knee_rate'])} req/s** offered "
                f"({f(sw['knee_request_throughput'], 2)} req/s, {f(sw['knee_output_throughput'])} "
                f"output tok/s completed); max {f(sw['max_request_throughput'], 2)} req/s. "
                + (
                    f"Stopped: {sw['saturation_reason']}."
                    if sw["saturated"]
                    else "Did not saturate."
                ),
                "",
            ]
        lines += ["## Whole run", ""]
    else:
        lines += ["## Result", ""]
    lines += [*throughput_table(s), "", *latency_table(s, p.percentiles), ""]
    if s.get("slo"):
        lines += [
            f"Goodput SLOs: {s['slo']} → {s['good_requests']} of {s['completed']} "
            "requests within SLO.",
            "",
        ]
    lines += ["## Server", "", *server_table(result.server), ""]
    lines += ["## Client", "", *client_table(result.client), ""]
    src, tc = s["output_token_source"], s["token_check"]
    lines.append(
        f"Output tokens from the server's `usage` for {src['usage']} requests"
        + (f", re-tokenized for {src['retokenized']}" if src["retokenized"] else "")
        + (
            "; re-tokenizing agrees with usage for "
            f"{tc['checked'] - tc['mismatched']}/{tc['checked']}"
            if tc
            else ""
        )
        + "."
    )
    if s["errors"]:
        lines += ["", "| Error | Count |", "|---|---|"] + [
            f"| {e['error']} | {e['count']} |" for e in s["errors"]
        ]
    if plots:
        lines += [""] + [f"![{Path(pl).stem}]({Path(pl).name})" for pl in plots]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plots


def _latency_values(records: Sequence[Any]) -> dict[str, list[float]]:
    ok = [r for r in records if r.ok]
    return {
        "ttft": [x * 1000 for r in ok if (x := m.ttft(r)) is not None],
        "tpot": [x * 1000 for r in ok if (x := m.tpot(r)) is not None],
        "itl": (np.concatenate([m.itls(r) for r in ok]) * 1000).tolist() if ok else [],
        "e2el": [x * 1000 for r in ok if (x := m.e2e(r)) is not None],
    }


def plot_cdfs(groups: dict[str, Sequence[Any]], path: Path, title: str) -> Path:
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
    bad = [r for r in recs if not r.ok and r.sent is not None]
    open_loop = any(r.scheduled is not None for r in recs)
    n = 3 if open_loop else 2
    fig, axes = plt.subplots(n, 1, figsize=(11, 2.8 * n), sharex=True)
    ax = axes[0]
    ax.scatter([r.sent for r in ok], [m.e2e(r) * 1000 for r in ok], s=6, label="E2E")  # type: ignore[operator]
    tt = [(r.sent, m.ttft(r)) for r in ok if m.ttft(r) is not None]
    if tt:
        ax.scatter([a for a, _ in tt], [b * 1000 for _, b in tt], s=6, label="TTFT")
    if bad:
        ax.scatter([r.sent for r in bad], [0] * len(bad), marker="x", color="red", label="failed")
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


def write_run_report(
    result: RunResult,
    out_dir: Path,
    *,
    with_requests: bool = False,
    with_text: bool = False,
    command: Sequence[str] | None = None,
    plots: bool = True,
) -> dict[str, Path]:
    """report.json, report.md and the PNGs in `out_dir`; their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    if plots and result.records:
        groups = (
            {st.label: [r for r in result.records if r.step == st.index] for st in result.steps}
            if 1 < len(result.steps) <= 10
            else {result.target.label: result.records}
        )
        paths["latency_cdf"] = plot_cdfs(
            groups, out_dir / "latency_cdf.png", f"{result.profile.name} · {result.target.label}"
        )
        paths["timeline"] = plot_timeline(result, out_dir / "timeline.png")
        if len(result.steps) > 1:
            paths["load_curve"] = plot_load_curve(result, out_dir / "load_curve.png")
    data = run_to_json(result, with_requests=with_requests, with_text=with_text, command=command)
    paths["json"] = out_dir / "report.json"
    write_json(paths["json"], data)
    paths["markdown"] = out_dir / "report.md"
    pngs = [str(v) for k, v in paths.items() if v.suffix == ".png"]
    paths["markdown"].write_text(run_markdown(result, pngs), encoding="utf-8")
    return paths
