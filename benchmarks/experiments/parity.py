"""Throughput parity: our server against vLLM's own OpenAI server and against
`vllm.LLM.generate` offline, on the same model, engine settings and prompts.

It starts every target itself, runs the trials interleaved (the order rotates
each round so machine drift hits every target alike), measures each trial with
the harness (`codellama-serve bench run`) plus the CPU seconds of the target's
processes from /proc (frontend and engine separately) and of the load client,
and writes a table of medians and ratios (trials.py has what Ray modes shares):

    python -m benchmarks.experiments.parity                       # make parity
    python -m benchmarks.experiments.parity --trials 5 --configs stream-64
    python -m benchmarks.experiments.parity --targets ours,offline --configs stream-64
        # issue 2's ratio
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.experiments.local_servers import free_port, vllm_command
from benchmarks.experiments.trials import (
    ENGINE,
    ROOT,
    LoadConfig,
    ServerTarget,
    Trial,
    cpu_seconds,
    descendants,
    export_prompts,
    fmt,
    load_prompts,
    ours,
    ratio,
    results_dir,
    rotations,
    run_meta,
    server_trial,
    write_report,
)

PROG = "python -m benchmarks.experiments.parity"
CONFIGS = {
    "stream-64": LoadConfig("stream-64", 64, True),
    "stream-256": LoadConfig("stream-256", 256, True),
    "nostream-256": LoadConfig("nostream-256", 256, False),
}


# ---------------------------------------------------------------- targets


def vllm_server(model_path: str, log_dir: Path) -> ServerTarget:
    port = free_port()
    cmd = vllm_command(
        model_path, port,
        "--max-model-len", str(ENGINE["max_model_len"]),
        "--max-num-seqs", str(ENGINE["max_num_seqs"]),
        "--seed", str(ENGINE["seed"]), "--enforce-eager", "--dtype", ENGINE["dtype"],
    )  # fmt: skip
    env = {"VLLM_CPU_KVCACHE_SPACE": str(ENGINE["kv_cache_gib"])}
    return ServerTarget("vllm", cmd, env, port, log_dir / "vllm.log")


class OfflineTarget:
    """`vllm.LLM.generate` in a worker process that stays up between trials."""

    name = "offline"

    def __init__(self, model_path: str, log: Path) -> None:
        self.model_path, self.log_path = model_path, log
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        """Start the worker and wait until its engine is up."""
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.experiments.parity",
             "--offline-worker", self.model_path],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
            text=True, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(ENGINE["kv_cache_gib"])},
            start_new_session=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if json.loads(line or "{}").get("ready") is not True:
            raise RuntimeError(f"offline worker failed; see {self.log_path}")

    def run(self, prompts: list[str], output_tokens: int) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps({"prompts": prompts, "max_tokens": output_tokens}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(60)


def offline_worker(model_path: str) -> int:
    """Child process: build `vllm.LLM`, then run generate() per JSON line on stdin."""
    # Answers go to the original stdout; everything else written to fd 1 (vLLM's
    # logs, its child processes) goes to stderr, so the parent reads only JSON.
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=model_path, max_model_len=ENGINE["max_model_len"],
        max_num_seqs=ENGINE["max_num_seqs"], seed=ENGINE["seed"], enforce_eager=True,
        dtype=ENGINE["dtype"],
        disable_log_stats=True,
    )  # fmt: skip
    print(json.dumps({"ready": True}), file=answers, flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        params = SamplingParams(max_tokens=job["max_tokens"], ignore_eos=True, temperature=1.0)
        me = os.getpid()
        kids = descendants(me)
        cpu0 = cpu_seconds(me), sum(map(cpu_seconds, kids))
        t0 = time.perf_counter()
        outs = llm.generate(job["prompts"], params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        cpu1 = cpu_seconds(me), sum(map(cpu_seconds, kids))
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        print(json.dumps({
            "seconds": elapsed, "output_tokens": tokens,
            "frontend_cpu_s": cpu1[0] - cpu0[0], "engine_cpu_s": cpu1[1] - cpu0[1],
        }), file=answers, flush=True)  # fmt: skip
    return 0


# ---------------------------------------------------------------- trials


def offline_trial(target: OfflineTarget, cfg: LoadConfig, prompts: list[str], rnd: int) -> Trial:
    # Offline gets the batch the server keeps in flight: `concurrency` prompts at once.
    batch = prompts[: cfg.concurrency]
    r = target.run(batch, cfg.output_tokens)
    return Trial(
        target="offline", config=cfg.name, round=rnd,
        output_tok_s=r["output_tokens"] / r["seconds"], median_ttft_ms=None,
        p99_ttft_ms=None, median_tpot_ms=None, output_tokens=r["output_tokens"], failed=0,
        frontend_cpu_s=r["frontend_cpu_s"], engine_cpu_s=r["engine_cpu_s"], client_cpu_s=0.0,
    )  # fmt: skip


# ---------------------------------------------------------------- report


def markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        f"Parity run {meta['date']} · {meta['command']}",
        "",
        f"Demo model, engine settings {meta['engine']}, {meta['rounds']} interleaved rounds, "
        "medians; prompts of 32 tokens, 128 output tokens with ignore_eos, 256 requests.",
        "",
        "| Load | Target | Output tok/s | TTFT median / p99 (ms) | TPOT median (ms) "
        "| Frontend CPU ms/tok | Engine CPU ms/tok | Client CPU ms/tok |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cfg, targets in summary.items():
        for name, s in targets.items():
            lines.append(
                f"| {cfg} | {name} | {fmt(s['output_tok_s'])} | {fmt(s['median_ttft_ms'])} / "
                f"{fmt(s['p99_ttft_ms'])} | {fmt(s['median_tpot_ms'], '.2f')} | "
                f"{fmt(s['frontend_cpu_ms_per_tok'], '.3f')} | "
                f"{fmt(s['engine_cpu_ms_per_tok'], '.3f')} | "
                f"{fmt(s['client_cpu_ms_per_tok'], '.3f')} |"
            )
    lines += ["", "| Load | ours / vllm tok/s | ours / offline tok/s | TTFT median ours / vllm "
              "| TTFT p99 ours / vllm | TPOT ours / vllm | Frontend CPU/tok ours / vllm |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for cfg, t in summary.items():
        o, v, off = t.get("ours", {}), t.get("vllm", {}), t.get("offline", {})
        lines.append(
            f"| {cfg} | {ratio(o.get('output_tok_s'), v.get('output_tok_s'))} | "
            f"{ratio(o.get('output_tok_s'), off.get('output_tok_s'))} | "
            f"{ratio(o.get('median_ttft_ms'), v.get('median_ttft_ms'))} | "
            f"{ratio(o.get('p99_ttft_ms'), v.get('p99_ttft_ms'))} | "
            f"{ratio(o.get('median_tpot_ms'), v.get('median_tpot_ms'))} | "
            f"{ratio(o.get('frontend_cpu_ms_per_tok'), v.get('frontend_cpu_ms_per_tok'))} |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--targets", default="ours,vllm,offline", help="comma-separated: ours, vllm, offline"
    )
    p.add_argument(
        "--configs", default=",".join(CONFIGS), help=f"comma-separated: {', '.join(CONFIGS)}"
    )
    p.add_argument("--trials", type=int, default=3, help="interleaved rounds per config")
    p.add_argument("--pin-client", metavar="CPUS", help="taskset CPU list for the load client")
    p.add_argument(
        "--client-priority",
        type=int,
        metavar="N",
        help="the load client at SCHED_FIFO priority N (its tails are then the server's, not "
        "its own waits for a CPU: docs/benchmarks.md, the 64-stream tails)",
    )
    p.add_argument("--out", type=Path, help="report directory (default results/parity/<time>)")
    p.add_argument("--offline-worker", metavar="MODEL", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.offline_worker:
        return offline_worker(args.offline_worker)

    from engine.demo_model import ensure_demo_model

    model_path = str(ensure_demo_model())
    out = args.out or results_dir("parity")
    out.mkdir(parents=True, exist_ok=True)
    configs = [CONFIGS[c] for c in args.configs.split(",")]
    names = args.targets.split(",")
    factories = {
        "ours": lambda: ours(out),
        "vllm": lambda: vllm_server(model_path, out),
        "offline": lambda: OfflineTarget(model_path, out / "offline.log"),
    }
    targets: dict[str, Any] = {n: factories[n]() for n in names}
    trials: list[Trial] = []
    try:
        for t in targets.values():  # one at a time: two engines loading at once on 2 cores
            t.start()
        for cfg in configs:
            prompts_path = export_prompts(cfg, out)
            prompts = load_prompts(prompts_path)
            for name, t in targets.items():  # warm-up, not reported
                if name == "offline":
                    offline_trial(t, cfg, prompts, -1)
                else:
                    server_trial(
                        t, cfg, prompts_path, out, -1, args.pin_client, args.client_priority
                    )
            for rnd, order in rotations(names, args.trials):
                for name in order:
                    t = targets[name]
                    trial = (
                        offline_trial(t, cfg, prompts, rnd) if name == "offline"
                        else server_trial(
                            t, cfg, prompts_path, out, rnd, args.pin_client, args.client_priority
                        )
                    )  # fmt: skip
                    trials.append(trial)
                    print(
                        f"{cfg.name} round {rnd} {name}: {trial.output_tok_s:,.0f} tok/s",
                        flush=True,
                    )
    finally:
        for t in targets.values():
            t.stop()
    meta = run_meta(PROG, argv, args.trials, pin_client=args.pin_client)
    write_report(out, "parity", trials, meta, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
