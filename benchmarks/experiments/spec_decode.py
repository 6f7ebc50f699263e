"""Speculative decoding (issue 15): our server with and without a speculator that needs
no second model (`--speculative-config`), on a code-rewrite workload and on plain
completions, at 1 and 64 concurrent streams: TPOT, output throughput, and how many
proposed tokens the model accepted.

The code-rewrite prompts are built offline from HumanEval's canonical solutions: the
whole function, then the request to write it again with the function renamed, so the
answer a good model gives repeats the prompt with small edits (what the n-gram and
suffix speculators look up). Plain completions are HumanEval's own prompts. Greedy
sampling (temperature 0), 128 output tokens per request (ignore_eos), interleaved
rounds in a rotating order, medians:

    python -m benchmarks.experiments.spec_decode                     # make spec-bench
    python -m benchmarks.experiments.spec_decode --trials 5 --configs rewrite-1,rewrite-64
    python -m benchmarks.experiments.spec_decode --targets off,ngram,suffix
        # suffix needs the arctic-inference package
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from benchmarks.experiments.local_servers import free_port, serve_command
from benchmarks.experiments.trials import (
    LoadConfig,
    ServerTarget,
    Trial,
    fmt,
    ours,
    ratio,
    results_dir,
    rotations,
    run_meta,
    server_trial,
    write_report,
)
from engine.config import DEMO_MODEL

PROG = "python -m benchmarks.experiments.spec_decode"
OUTPUT_TOKENS = 128
SPECULATORS = {
    "ngram": {
        "method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
        "prompt_lookup_min": 2,
    },
    "suffix": {"method": "suffix", "num_speculative_tokens": 8},
}  # fmt: skip
# name -> (workload, load): the workload's prompts file is shared by its loads.
CONFIGS = {
    f"{workload}-{c}": (workload, LoadConfig(f"{workload}-{c}", c, True, requests=n,
                                             output_tokens=OUTPUT_TOKENS))
    for workload in ("rewrite", "plain")
    for c, n in ((1, 24), (64, 256))
}  # fmt: skip


# ---------------------------------------------------------------- workloads


def rewrite_prompt(prompt: str, solution: str, entry_point: str) -> str:
    """The function, then the request to repeat it renamed: the answer is the prompt's code."""
    code = prompt + solution
    renamed = entry_point + "_v2"
    header = re.search(rf"^def {re.escape(entry_point)}\(.*$", code, re.M)
    start = header.group(0).replace(f"def {entry_point}(", f"def {renamed}(", 1) if header else ""
    return (
        f"{code.rstrip()}\n\n\n# The same function again, renamed to {renamed}; "
        f"the body is unchanged.\n{start}\n"
    )


def workload_rows(workload: str) -> list[dict[str, Any]]:
    from benchmarks.harness.datasets import humaneval_problems

    rows = []
    for p in humaneval_problems():
        text = (
            rewrite_prompt(p["prompt"], p["canonical_solution"], p["entry_point"])
            if workload == "rewrite"
            else p["prompt"]
        )
        rows.append({"id": f"{p['task_id']}/{workload}", "prompt": text})
    return rows


def export_workload(workload: str, out: Path) -> Path:
    path = out / f"prompts-{workload}.jsonl"
    if not path.exists():
        path.write_text("".join(json.dumps(r) + "\n" for r in workload_rows(workload)))
    return path


# ---------------------------------------------------------------- targets


def speculative(name: str, log_dir: Path) -> ServerTarget:
    """Our server with the same engine settings as `ours`, plus a speculator."""
    base = ours(log_dir, name)
    port = free_port()
    argv = serve_command(port, *base.argv[base.argv.index("--model") :])
    argv += ["--speculative-config", json.dumps(SPECULATORS[name])]
    return ServerTarget(name, argv, {}, port, log_dir / f"{name}.log")


def spec_counters(url: str) -> dict[str, float]:
    """Our codellama_serve_spec_decode_* counters (empty without speculation)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    found = re.findall(r"^codellama_serve_spec_decode_(\w+?)_total(\{[^}]*\})? (\S+)$", text, re.M)
    return {name + labels: float(value) for name, labels, value in found}


def acceptance(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Acceptance over one trial: rate, mean acceptance length, per position."""
    d = {k: after[k] - before.get(k, 0.0) for k in after}
    drafts, proposed = d.get("num_drafts", 0.0), d.get("num_draft_tokens", 0.0)
    if not drafts or not proposed:
        return {}
    accepted = d["num_accepted_tokens"]
    positions = sorted(
        (int(m.group(1)), v)
        for k, v in d.items()
        if (m := re.fullmatch(r'num_accepted_tokens_per_pos\{position="(\d+)"\}', k))
    )
    return {
        "drafts": drafts,
        "draft_tokens": proposed,
        "accepted_tokens": accepted,
        "acceptance_rate": accepted / proposed,
        "mean_acceptance_length": 1 + accepted / drafts,
        "per_position": [v / drafts for _, v in positions],
    }


def server_tpot(url: str) -> tuple[float, float]:
    """(sum, count) of our server's own per-request TPOT histogram: measured where the
    engine's steps arrive, so a client whose event loop lags (a loaded 2-core box
    reads chunks in bursts) does not shrink it."""
    text = httpx.get(url + "/metrics", timeout=10).text
    series = r'^codellama_serve_time_per_output_token_seconds_(sum|count)\{endpoint="completions"\}'
    found = dict(re.findall(series + r" (\S+)$", text, re.M))
    return float(found.get("sum", 0.0)), float(found.get("count", 0.0))


def trial(target: ServerTarget, cfg: LoadConfig, prompts: Path, out: Path, rnd: int) -> Trial:
    before, tpot0 = spec_counters(target.url), server_tpot(target.url)
    t = server_trial(target, cfg, prompts, out, rnd, extra_args=("--temperature", "0"))
    t.extra = acceptance(before, spec_counters(target.url))
    tpot1 = server_tpot(target.url)
    if tpot1[1] > tpot0[1]:
        t.extra["server_tpot_ms"] = (tpot1[0] - tpot0[0]) / (tpot1[1] - tpot0[1]) * 1000
    return t


# ---------------------------------------------------------------- report


def _acceptance_medians(trials: list[Trial]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (config, target): medians of the server-side TPOT and of the acceptance."""
    import statistics

    out: dict[tuple[str, str], dict[str, Any]] = {}
    for key in {(t.config, t.target) for t in trials}:
        extras = [t.extra for t in trials if (t.config, t.target) == key]
        medians: dict[str, Any] = {}
        tpots = [e["server_tpot_ms"] for e in extras if "server_tpot_ms" in e]
        if tpots:
            medians["server_tpot_ms"] = statistics.median(tpots)
        mine = [e for e in extras if "drafts" in e]
        if mine:
            medians["acceptance_rate"] = statistics.median(m["acceptance_rate"] for m in mine)
            medians["mean_acceptance_length"] = statistics.median(
                m["mean_acceptance_length"] for m in mine
            )
            medians["per_position"] = [
                statistics.median(p) for p in zip(*(m["per_position"] for m in mine), strict=True)
            ]
        out[key] = medians
    return out


def markdown_renderer(trials: list[Trial]) -> Callable[[dict[str, Any], dict[str, Any]], str]:
    """write_report's render: the tables, with the trials' acceptance next to the medians."""
    accepted = _acceptance_medians(trials)

    def render(summary: dict[str, Any], meta: dict[str, Any]) -> str:
        lines = [
            f"Speculative decoding {meta['date']} · {meta['command']}",
            "",
            f"Demo model, engine settings {meta['engine']}, speculators {meta['speculators']}, "
            f"{meta['rounds']} interleaved rounds, medians; temperature 0, {OUTPUT_TOKENS} "
            "output tokens (ignore_eos), streamed.",
            "",
            "| Workload | Concurrency | Target | Output tok/s | TPOT server mean (ms) "
            "| TPOT client median (ms) | TTFT median (ms) | Acceptance rate "
            "| Mean acceptance length | Per position |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for cfg, targets in summary.items():
            workload, load = CONFIGS[cfg]
            for name, s in targets.items():
                a = accepted.get((cfg, name), {})
                per = " ".join(f"{p:.2f}" for p in a.get("per_position", [])) or "–"
                lines.append(
                    f"| {workload} | {load.concurrency} | {name} | {fmt(s['output_tok_s'])} | "
                    f"{fmt(a.get('server_tpot_ms'), '.2f')} | "
                    f"{fmt(s['median_tpot_ms'], '.2f')} | {fmt(s['median_ttft_ms'])} | "
                    f"{fmt(a.get('acceptance_rate'), '.2f')} | "
                    f"{fmt(a.get('mean_acceptance_length'), '.2f')} | {per} |"
                )
        lines += ["", "| Workload | Concurrency | Target | tok/s vs off | server TPOT vs off |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for cfg, targets in summary.items():
            workload, load = CONFIGS[cfg]
            off = targets.get("off", {})
            off_tpot = accepted.get((cfg, "off"), {}).get("server_tpot_ms")
            for name, s in targets.items():
                if name != "off":
                    tpot = accepted.get((cfg, name), {}).get("server_tpot_ms")
                    lines.append(
                        f"| {workload} | {load.concurrency} | {name} | "
                        f"{ratio(s['output_tok_s'], off.get('output_tok_s'))} | "
                        f"{ratio(tpot, off_tpot)} |"
                    )
        return "\n".join(lines) + "\n"

    return render


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--targets", default="off,ngram", help="comma-separated: off, ngram, suffix")
    p.add_argument(
        "--configs", default=",".join(CONFIGS), help=f"comma-separated: {', '.join(CONFIGS)}"
    )
    p.add_argument("--trials", type=int, default=3, help="interleaved rounds per config")
    p.add_argument("--out", type=Path, help="report directory (default results/spec/<time>)")
    args = p.parse_args(argv)

    out = args.out or results_dir("spec")
    out.mkdir(parents=True, exist_ok=True)
    names = args.targets.split(",")
    targets = {n: ours(out, "off") if n == "off" else speculative(n, out) for n in names}
    configs = [CONFIGS[c] for c in args.configs.split(",")]
    trials: list[Trial] = []
    try:
        for t in targets.values():  # one at a time: two engines loading at once on 2 cores
            t.start()
        for workload, cfg in configs:
            prompts = export_workload(workload, out)
            for t in targets.values():  # warm-up, not reported
                trial(t, cfg, prompts, out, -1)
            for rnd, order in rotations(names, args.trials):
                for name in order:
                    result = trial(targets[name], cfg, prompts, out, rnd)
                    trials.append(result)
                    rate = result.extra.get("acceptance_rate")
                    tpot = fmt(result.median_tpot_ms, ".2f")
                    print(
                        f"{cfg.name} round {rnd} {name}: {result.output_tok_s:,.0f} tok/s, "
                        f"TPOT {tpot} ms, acceptance {fmt(rate, '.2f')}",
                        flush=True,
                    )
    finally:
        for t in targets.values():
            t.stop()
    speculators = {n: SPECULATORS[n] for n in names if n != "off"}
    meta = run_meta(PROG, argv, args.trials, speculators=speculators, model=DEMO_MODEL)
    write_report(out, "spec_decode", trials, meta, markdown_renderer(trials))
    return 0


if __name__ == "__main__":
    sys.exit(main())
