"""The Markdown of a run's workload and scoring sections: editor, chat sessions,
shared prefix, quality (each only when the run has it)."""

from __future__ import annotations

from typing import Any

from benchmarks.harness.report.as_markdown import f
from benchmarks.harness.results import RunResult


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def _dist(d: dict[str, Any]) -> str:
    return f"{f(d.get('p50'))} / {f(d.get('p90'))} / {f(d.get('p99'))} (n={d.get('count', 0)})"


def editor_markdown(e: dict[str, Any]) -> list[str]:
    w = e["wasted_output_tokens"]
    wasted = f"{f(w['value'], 0)} ({w['source']}"
    wasted += (
        f"; client saw {f(w['client_partial_streams'], 0)})" if w["source"] == "server" else ")"
    )
    rows = [
        "## Editor sessions",
        "",
        "| Editor | Value |",
        "|---|---|",
        f"| sessions · keystrokes | {e['sessions']} · {f(e.get('keystrokes'))} |",
        f"| requests sent | {e['requests_sent']} |",
        f"| shown / cancelled / failed | {e['completions_shown']} / {e['requests_cancelled']}"
        f" / {e['requests_failed']} |",
        f"| shown ratio | {_pct(e['shown_ratio'])} |",
        f"| shown latency P50 / P90 / P99 (ms) | {_dist(e['shown_latency_ms'])} |",
        f"| TTFT P50 / P90 / P99 (ms) | {_dist(e['ttft_ms'])} |",
        f"| wasted output tokens | {wasted} |",
        f"| server: aborted on disconnect | {f(e['server_aborted_client_disconnect'], 0)} |",
        f"| prefix-cache hit rate | {_pct(e['prefix_cache_hit_rate'])} |",
    ]
    wt = e.get("window_tokens") or {}
    if wt:
        rows.append(
            "| window tokens mean: context / prefix / suffix | "
            + " / ".join(
                f(wt[k]["mean"], 0) for k in ("header_tokens", "prefix_tokens", "suffix_tokens")
            )
            + " |"
        )
    if e["errors"]:
        rows += ["", "| Editor request error | Count |", "|---|---|"]
        rows += [f"| {x['error']} | {x['count']} |" for x in e["errors"]]
    return rows


def chat_sessions_markdown(c: dict[str, Any]) -> list[str]:
    rows = [
        "## Chat sessions",
        "",
        f"{c['sessions']} users, {c['conversations']} conversations "
        f"({c['conversations_completed']} completed, {c['ended_by_failure']} ended by a failed "
        f"turn, {c['ended_by_context']} by the context, the rest by the run's end), "
        f"{c['turns_sent']} turns.",
        "",
        "| Turn | Sent | Failed | Prompt tokens (mean) | TTFT median (ms) |",
        "|---|---|---|---|---|",
    ]
    for k, t in c["by_turn"].items():
        rows.append(
            f"| {k} | {t['sent']} | {t['failed']} | {f(t['prompt_tokens_mean'], 0)} "
            f"| {f(t['median_ttft_ms'])} |"
        )
    return rows


def shared_prefix_markdown(s: dict[str, Any]) -> list[str]:
    return [
        "## Shared prefix",
        "",
        f"{s['groups']} groups × a {s['prefix_tokens']}-token prefix + {s['tail_tokens']}-token "
        f"tails{' (chat: system prompt)' if s['chat'] else ''}: prefix-cache hit rate "
        f"{_pct(s['prefix_cache_hit_rate'])} (a cache missing only each group's first request: "
        f"{_pct(s['shareable_prompt_fraction'])}).",
    ]


def quality_markdown(q: dict[str, Any]) -> list[str]:
    rows = ["## Quality", "", "| Score | Value | Of |", "|---|---|---|"]
    fim = q.get("fim_exact_match")
    if fim:
        rows.append(f"| FIM exact match | {_pct(fim['exact_match'])} | {fim['scored']} infills |")
        rows.append(
            f"| FIM match, whitespace-normalised | {_pct(fim['normalized_match'])} "
            f"| {fim['scored']} infills |"
        )
    he = q.get("humaneval")
    if he:
        for k, v in he["pass_at_k"].items():
            rows.append(
                f"| HumanEval pass@{k} | {_pct(v)} | {he['problems']} problems, "
                f"{he['samples']} samples |"
            )
    eq = q.get("equivalence")
    if eq and eq.get("applicable"):
        rows.append(
            f"| temperature-0 equivalence (loaded = alone) | {_pct(eq['fraction'])} "
            f"| {eq['compared']} outputs of {eq['prompts']} prompts |"
        )
    elif eq:
        rows.append(f"| temperature-0 equivalence | n/a: {eq['reason']} | |")
    if he:
        box = he["sandbox"]
        rows += [
            "",
            f"Tests ran in: {box['network']}; {box['timeout_s']:g} s, "
            f"{box['memory_mb']} MB per test.",
        ]
    return rows


def sections_markdown(result: RunResult) -> list[str]:
    s = result.sections
    out: list[str] = []
    for key, render in (
        ("editor", editor_markdown),
        ("chat_sessions", chat_sessions_markdown),
        ("shared_prefix", shared_prefix_markdown),
        ("quality", quality_markdown),
    ):
        if s.get(key):
            out += [*render(s[key]), ""]
    return out
