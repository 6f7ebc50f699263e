"""The agreement check: this harness and vLLM's `bench serve` against one server (ours,
demo model), the same prompts, closed loop at 16, 200 requests of 256 prompt tokens and
exactly 128 output tokens, interleaved and rotated (A B, B A, …). Every run gets prompts
no other run sent: the same generator, lengths and count for both tools, but never the
same text, since our server cannot reset its prefix cache and whichever tool ran second
would be served half of each prompt from it (the first version of this experiment did
exactly that; the harness's prefix-cache warning caught it).

    flock /tmp/codellama-cpu.lock python -m benchmarks.experiments.agreement --rounds 6
    ... --client-priority 10   # both clients under chrt -f 10 (no waits for a CPU)

It reports, per metric, each tool's median and the harness / vLLM ratio, round by
round: its median with a bootstrap 95 % interval (benchmarks/harness/stats.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.cli import harness_command
from benchmarks.experiments.local_servers import running_server
from benchmarks.experiments.tails import trial_prompts
from benchmarks.experiments.trials import ROOT, results_dir, run_meta
from benchmarks.harness.stats import paired_ratio

PROG = "python -m benchmarks.experiments.agreement"
METRICS = ("request_throughput", "output_throughput", "median_ttft_ms", "mean_ttft_ms",
           "median_tpot_ms", "median_itl_ms")  # fmt: skip


def export(out: Path, count: int) -> Path:
    path = out / "prompts-all.jsonl"
    subprocess.run(
        harness_command("export-dataset", "agreement", "--set", f"dataset.size={count}",
                        "--count", str(count), "--output", str(path)),
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    return path


def _sched(priority: int | None) -> list[str]:
    return [] if priority is None else ["chrt", "-f", str(priority)]


def ours_run(
    url: str, prompts: Path, out: Path, n: int, priority: int | None, scrape: bool = True
) -> dict[str, Any]:
    subprocess.run(
        _sched(priority)
        + harness_command(
            "run", "agreement", "--base-url", url, "--num-requests", str(n), "--dataset", "jsonl",
            "--dataset-path", str(prompts), "--set", "dataset.shuffle=false", "--no-salt",
            "--no-progress", "--no-plots", "--quiet", "--out", str(out),
            *(() if scrape else ("--no-server-metrics",)),
        ),
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    data: dict[str, Any] = json.loads((out / "report.json").read_text())
    return data


def vllm_run(url: str, prompts: Path, out: Path, n: int, priority: int | None) -> dict[str, Any]:
    from engine.config import DEMO_MODEL_NAME
    from engine.demo_model import ensure_demo_model

    out.mkdir(parents=True, exist_ok=True)
    argv = [
            sys.executable, "-m", "benchmarks.experiments.vllm_bench", "--backend", "openai",
            "--base-url", url, "--endpoint", "/v1/completions", "--model", DEMO_MODEL_NAME,
            "--tokenizer", str(ensure_demo_model()), "--dataset-name", "custom",
            "--dataset-path", str(prompts), "--custom-output-len", "128", "--skip-chat-template",
            "--ignore-eos", "--max-concurrency", "16", "--num-prompts", str(n), "--seed", "0",
            "--num-warmups", "1", "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--metric-percentiles", "50,90,99", "--save-result", "--result-dir", str(out),
            "--result-filename", "vllm.json", "--disable-tqdm",
    ]  # fmt: skip
    subprocess.run([*_sched(priority), *argv], cwd=ROOT, check=True, capture_output=True)
    data: dict[str, Any] = json.loads((out / "vllm.json").read_text())
    return data


def render(runs: dict[str, list[dict[str, Any]]], meta: dict[str, Any]) -> str:
    lines = [
        f"# Agreement with `vllm bench serve`: {meta['command']}",
        "",
        f"{meta['date']} · {meta['rounds']} rounds, order {', '.join(meta['order'])}",
        "",
        "| Metric | harness (median) | vLLM (median) | harness / vLLM: median [95 % CI] |",
        "|---|---|---|---|",
    ]
    for m in METRICS:
        a = [r.get(m) for r in runs["harness"]]
        b = [r.get(m) for r in runs["vllm"]]
        ratio = paired_ratio(b, a)
        ci = ratio["ci95"] or [float("nan")] * 2
        lines.append(
            f"| {m} | {statistics.median(x for x in a if x is not None):.2f} "
            f"| {statistics.median(x for x in b if x is not None):.2f} "
            f"| {ratio['median']:.3f} [{ci[0]:.3f}–{ci[1]:.3f}] |"
        )
    fails = {k: sum(r.get("failed", 0) for r in v) for k, v in runs.items()}
    tokens = {k: sorted({(r["total_input_tokens"], r["total_output_tokens"]) for r in v})
              for k, v in runs.items()}  # fmt: skip
    lines += ["", f"Failed requests: {fails}. (prompt, output) tokens per run: {tokens}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--out", type=Path)
    p.add_argument("--client-priority", type=int, metavar="N", help="both clients at SCHED_FIFO N")
    p.add_argument(
        "--no-server-metrics",
        action="store_true",
        help="the harness does not scrape the server's /metrics (vLLM's client never does)",
    )
    args = p.parse_args(argv)
    out = args.out or results_dir("agreement")
    out.mkdir(parents=True, exist_ok=True)
    all_prompts = export(out, 2 * args.rounds * args.requests)
    runs: dict[str, list[dict[str, Any]]] = {"harness": [], "vllm": []}
    order: list[str] = []
    with running_server("ours", out / "ours.log") as server:
        for rnd in range(args.rounds):
            for tool in ("harness", "vllm") if rnd % 2 == 0 else ("vllm", "harness"):
                # Prompts of this run's own: the server keeps what earlier runs sent.
                prompts = trial_prompts(all_prompts, out, len(order), args.requests)
                d = out / f"{tool}-{rnd}"
                if tool == "harness":
                    run = ours_run(server.base_url, prompts, d, args.requests,
                                   args.client_priority, not args.no_server_metrics)  # fmt: skip
                else:
                    run = vllm_run(server.base_url, prompts, d, args.requests, args.client_priority)
                runs[tool].append(run)
                order.append(tool)
                r = runs[tool][-1]
                print(
                    f"[agreement] round {rnd} {tool}: {r['request_throughput']:.2f} req/s, "
                    f"median TTFT {r['median_ttft_ms']:.1f} ms",
                    file=sys.stderr,
                    flush=True,
                )
    meta = run_meta(PROG, argv, args.rounds, order=order, client_priority=args.client_priority,
                    server_metrics=not args.no_server_metrics)  # fmt: skip
    table = render(runs, meta)
    (out / "agreement.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=2))
    (out / "agreement.md").write_text(table)
    print(table)
    print(f"report: {out / 'agreement.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
