"""A run as Markdown: the summary tables (throughput, latency, steps, server, client)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.harness import metrics as m
from benchmarks.harness.plans import describe_load
from benchmarks.harness.results import RunResult

LATENCY_NAMES = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2E"}


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
    if "sessions" in offered:
        return f"{offered['sessions']} sessions"
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
        f"| {s['requests']} ({s['completed']} / {s['failed']})"
        + (f" + {s['cancelled']} cancelled" if s.get("cancelled") else "")
        + f" | {f(s['duration'], 2)} "
        f"| {f(s['request_throughput'], 2)} | {f(s['output_throughput'])} "
        f"| {f(s['total_token_throughput'])} | {f(s['request_goodput'], 2)} |",
        "",
        "| Offered load | Achieved send rate | Schedule lag P50 / P99 / max (ms) "
        "| Connection wait P50 / P99 / max (ms) | Coordinated omission |",
        "|---|---|---|---|---|",
        f"| {_offered_text(load)} | {f(load.get('achieved_send_rate'), 2)} req/s "
        f"| {lag_text(load)} | {wait_text(load)} | {co_text(load)} |",
    ]
    return rows


def wait_text(load: dict[str, Any]) -> str:
    w = load.get("connection_wait_ms") or {}
    return f"{f(w.get('p50'), 2)} / {f(w.get('p99'), 2)} / {f(w.get('max'), 2)}"


# The server's own histograms that split a request's life: (key, label).
SERVER_PARTS = (
    ("queue_time", "queue (waiting to be scheduled)"),
    ("prefill", "prefill"),
    ("decode", "decode"),
    ("ttft", "TTFT (arrival → first token)"),
    ("e2e", "E2E (arrival → last byte)"),
)


def breakdown_table(s: dict[str, Any], server: dict[str, Any]) -> list[str]:
    """Where a request's time went: the client's timestamps, then the server's histograms."""
    b = s.get("latency_breakdown")
    if not b:
        return []
    rows = [
        f"Latency breakdown ({b['new_connections']} new connections; client timestamps of "
        "successful requests):",
        "",
        "| Part (ms) | n | Mean | Median | P99 | Max |",
        "|---|---|---|---|---|---|",
    ]
    for part in b.values():
        if isinstance(part, dict) and part.get("count"):
            rows.append(
                f"| {part['label']} | {part['count']} | {f(part['mean_ms'], 2)} "
                f"| {f(part['median_ms'], 2)} | {f(part.get('p99_ms'), 2)} "
                f"| {f(part['max_ms'], 2)} |"
            )
    hists = server.get("histograms", {}) if server.get("available") else {}
    shown = [(k, label) for k, label in SERVER_PARTS if (hists.get(k) or {}).get("count")]
    if shown:
        rows += [
            "",
            "| Server's own view (ms) | n | Mean | P50 ≤ | P99 ≤ |",
            "|---|---|---|---|---|",
        ]
        for key, label in shown:
            h = hists[key]
            rows.append(
                f"| {label} | {f(h['count'], 0)} | {f(h.get('mean_ms'), 2)} "
                f"| {f(h.get('p50_le_ms'))} | {f(h.get('p99_le_ms'))} |"
            )
    missing = [label for k, label in SERVER_PARTS[:3] if (k, label) not in shown]
    if missing:
        rows += ["", f"(The server exports no histogram of: {', '.join(missing)}.)"]
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
    cache = server.get("prefix_cache")
    if cache:
        rows.append(
            f"| prefix-cache hit rate (prompt tokens) | {f(_pct(cache.get('hit_rate')))} % "
            f"({f(cache['hits'], 0)} of {f(cache['queries'], 0)}) |"
        )
    for key, label in (
        ("requests", "requests finished"),
        ("generation_tokens", "generated tokens"),
        ("prompt_tokens", "prompt tokens"),
        ("aborted", "requests aborted"),
        ("aborted_generation_tokens", "tokens generated for aborted requests"),
        ("prefix_cache_hits", "prefix-cache hits (tokens)"),
        ("prefix_cache_queries", "prefix-cache queries (tokens)"),
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


def _pct(v: float | None) -> float | None:
    return None if v is None else 100 * v


def prompts_line(result: RunResult) -> str:
    pr = result.prompts or {}
    if not pr:
        return ""
    if pr.get("salt"):
        how = f"salted: {pr['salt_format']} (run nonce `{pr['nonce']}`)"
    else:
        how = f"not salted: {pr.get('unsalted_because') or 'the profile asks so'}"
    if pr.get("distinct_prompts") is None:
        return f"Prompts: {pr.get('requests')} requests; {how}."
    return (
        f"Prompts: {pr.get('distinct_prompts')} distinct of {pr.get('requests')} requests "
        f"({pr.get('repeated')} repeated); {how}."
    )


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
        f"| waited for a CPU while it had work (run delay) | {f(cpu.get('run_delay_s'), 2)} s |",
        f"| HTTP | {client['http']} · event loop {client['event_loop']} "
        f"· scheduling {client.get('scheduling', 'normal')} "
        f"· {client.get('workers', {}).get('count', 1)} process(es) |",
    ]


def run_markdown(result: RunResult, plots: Sequence[str] = ()) -> str:
    p, s = result.profile, result.summary
    req = p.request
    path = "chat/completions" if p.endpoint == "chat" else "completions"
    editor = p.dataset.editor if p.dataset.type == "editor" else None
    max_tokens = editor.max_tokens if editor is not None else req.max_tokens
    lines = [
        f"# Benchmark `{p.name}` against {result.target.label}",
        "",
        f"{result.started} · model `{result.model}` · `/v1/{path}`"
        f" · {'streamed' if req.stream else 'not streamed'} · dataset `{p.dataset.type}`"
        f" · max_tokens {max_tokens}{' · ignore_eos' if req.ignore_eos else ''}"
        f" · seed {p.seed}",
        "",
    ]
    lines += [f"Load: {describe_load(p)}.", ""]
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
    lines += ["## Where the time went", "", *breakdown_table(s, result.server), ""]
    from benchmarks.harness.report.sections import sections_markdown

    lines += sections_markdown(result)
    lines += ["## Server", "", *server_table(result.server), ""]
    lines += ["## Client", "", *client_table(result.client), ""]
    if line := prompts_line(result):
        lines += [line, ""]
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
