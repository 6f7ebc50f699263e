"""Finding 1 of issue 12 at full scale: client-side queueing for a pooled connection.

The fake server (a process of its own) answers at 1 s per token, 20 tokens per
request; the harness sends Poisson arrivals at 60 req/s for 25 s, so ~1,200
requests are in flight. Run once with the harness's default pool (an open loop's
has no limit) and once with the pool forced to the old cap of 960 connections
(max(256, 2 × a guessed peak)): the second must be flagged for its connection
wait, with TTFT still the server's and the wait in the from-schedule latencies.

    flock /tmp/codellama-cpu.lock python -m benchmarks.experiments.pool_wait
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from benchmarks.experiments.trials import results_dir, run_meta
from benchmarks.harness.client import Target
from benchmarks.harness.profile.files import load_profile
from benchmarks.harness.results import RunResult
from benchmarks.harness.runner import Runner
from benchmarks.harness.selftest import free_port, start_fake_servers, stop
from benchmarks.harness.transport import AiohttpTransport

PROG = "python -m benchmarks.experiments.pool_wait"
OLD_CAP = 960


def figures(label: str, res: RunResult) -> dict[str, Any]:
    s, load = res.summary, res.summary["load"]
    return {
        "run": label,
        "http": res.client["http"],
        "completed": s["completed"],
        "failed": s["failed"],
        "mean_ttft_ms": s["mean_ttft_ms"],
        "p99_ttft_ms": s["p99_ttft_ms"],
        "p99_ttft_from_schedule_ms": load.get("p99_ttft_from_schedule_ms"),
        "connection_wait_ms": load["connection_wait_ms"],
        "coordinated_omission": load["coordinated_omission"],
        "reasons": load["coordinated_omission_reasons"],
    }


async def both_runs(url: str, rate: float, duration_s: float) -> list[dict[str, Any]]:
    p = load_profile(
        "poisson",
        {
            "load": {"type": "rate", "rate": rate, "arrival": "poisson"},
            "duration_s": duration_s,
            "request": {"max_tokens": 20, "ignore_eos": True},
            "warmup_requests": 1,
        },
    )
    target = Target(url)
    out = [figures("default pool", await Runner(p, target).run())]
    capped = AiohttpTransport(None, 600.0, None, fixed_pool=OLD_CAP)
    try:
        res = await Runner(p, target, transport=capped).run()
    finally:
        await capped.aclose()
    out.append(figures(f"pool capped at {OLD_CAP} (the old cap)", res))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__)
    ap.add_argument("--rate", type=float, default=60.0)
    ap.add_argument("--duration", type=float, default=25.0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    out = args.out or results_dir("pool-wait")
    port = free_port()
    procs = start_fake_servers(port, 1, out, "--token-delay-ms", "1000")
    try:
        runs = asyncio.run(both_runs(f"http://127.0.0.1:{port}", args.rate, args.duration))
    finally:
        stop(procs)
    data = {"meta": run_meta(PROG, argv, 1), "runs": runs}
    (out / "pool_wait.json").write_text(json.dumps(data, indent=1))
    print(json.dumps(runs, indent=1))
    print(f"report: {out / 'pool_wait.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
