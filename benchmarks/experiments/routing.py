"""Which replica serves a request: our router against Ray's routers on two replicas, with
the editor and the shared-prefix workloads, interleaved (issue 13).

    python -m benchmarks.experiments.routing                 # make routing-bench
    python -m benchmarks.experiments.routing --trials 2 --editor-s 90

Routers (--routers), each a fresh local Ray instance behind Ray's HAProxy ingress (serve
--ray's default) with two replicas of our app on the demo model:

  ours        routing.ray_router codellama: prefix-cache and session affinity on the
              engine's prompt (engine.ray_router), bounded by load.
  default     routing.ray_router default: Ray's own balancing for this ingress, prefix-blind
              (HAProxy's leastconn; through Ray's Python proxy it would be power of two
              choices on queue length, also prefix-blind).
  ray_prefix  routing.ray_router ray_prefix: ray.serve.llm's PrefixCacheAffinityRouter.

Each round starts every router's instance in an order that rotates every round, runs the
editor workload (16 sessions over 4 repos, FIM, cancel on keystroke) and then the
shared-prefix workload (groups of requests sharing a prefix of >= 1,500 tokens), and
stops the instance. Each replica's KV cache is sized (--kv-cache-gib) so that one replica
cannot hold either workload's prefixes but two can: the regime where routing decides the
hit rate, as on a GPU fleet serving many repos. The prefix-cache hit rate sums both
replicas' own counters (each replica's /metrics on its direct-ingress port); the replica
share comes from each response's X-Codellama-Replica header.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.experiments.local_servers import ServerProcess, free_port, start_and_wait
from benchmarks.experiments.trials import (
    ENGINE,
    fmt,
    results_dir,
    rotations,
    run_meta,
    write_summary,
)
from benchmarks.harness.api import Target, report, run_workload, shares
from engine.config import DEMO_MODEL

PROG = "python -m benchmarks.experiments.routing"
ROUTERS = {"ours": "codellama", "default": "default", "ray_prefix": "ray_prefix"}
REPLICAS = 2
RAY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY": "1"}
COUNTERS = ("codellama_serve_prefix_cache_queries", "codellama_serve_prefix_cache_hits")
# The issue's targets for our router.
GOAL_HIT_RATE_X, GOAL_MAX_SHARE, GOAL_TTFT_P50_X = 2.0, 0.65, 0.8
METRICS = (
    "prefix_cache_hit_rate", "ttft_p50_ms", "ttft_p99_ms", "shown_latency_p90_ms",
    "output_tok_s", "failed", "max_replica_share",
)  # fmt: skip


def profiles(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The two workloads, as overrides of the bundled profiles."""
    editor = {"duration_s": args.editor_s}
    shared = {
        "num_requests": args.groups * args.per_group,
        "load": {"type": "rate", "rate": args.rate, "arrival": "poisson"},
        "dataset": {
            "shared_prefix": {
                "groups": args.groups, "prefix_tokens": args.prefix_tokens,
                "tail_tokens": 64, "requests_per_group": args.per_group,
            }
        },
        "percentiles": [50, 90, 99],
    }  # fmt: skip
    return {"editor": {"name": "editor", "over": editor},
            "shared_prefix": {"name": "shared-prefix", "over": shared}}  # fmt: skip


# ---------------------------------------------------------------- Ray driver


def ray_driver(port: int, router: str, kv_cache_gib: float) -> int:
    """Child process (started with RAY_ENV): our app with two replicas and `router` on
    one local Ray instance until SIGTERM; prints the replicas' own ports."""
    import ray
    from ray import serve

    from engine.ray_serve import build_app

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "0.0.0.0", "port": port})
    app = build_app({"settings": app_settings(router, kv_cache_gib)})
    serve.run(app, name="codellama", route_prefix="/", blocking=False)
    print("REPLICA_PORTS " + json.dumps(_replica_ports()), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
    return 0


def app_settings(router: str, kv_cache_gib: float) -> dict[str, Any]:
    return {
        "engine": {
            "model": DEMO_MODEL, "max_model_len": ENGINE["max_model_len"],
            "max_num_seqs": 64, "seed": ENGINE["seed"], "cpu_kvcache_space_gib": kv_cache_gib,
        },
        "admission": {"max_waiting_requests": 256},
        "ray": {"min_replicas": REPLICAS, "initial_replicas": REPLICAS,
                "max_replicas": REPLICAS, "ray_metrics_port": None},
        "routing": {"ray_router": router},
    }  # fmt: skip


def _replica_ports(timeout_s: float = 600) -> list[int]:
    """The HTTP ports the app's replicas listen on themselves (behind HAProxy, Ray lists
    them to its proxy manager only)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    deadline = time.monotonic() + timeout_s
    while True:
        ports = sorted(
            t.port
            for g in ray.get(controller.get_target_groups.remote(from_proxy_manager=True))
            if g.route_prefix == "/"
            for t in g.targets
            if t.name.startswith("SERVE_REPLICA")
        )
        if len(ports) >= REPLICAS or time.monotonic() > deadline:
            return ports
        time.sleep(1)


# ---------------------------------------------------------------- one router


def start_router(router: str, out: Path, kv_cache_gib: float) -> tuple[ServerProcess, list[int]]:
    port = free_port()
    argv = [sys.executable, "-m", "benchmarks.experiments.routing", "--ray-driver", str(port),
            "--driver-router", ROUTERS[router], "--kv-cache-gib", str(kv_cache_gib)]  # fmt: skip
    server = start_and_wait(
        argv, port, out / f"ray-{router}.log", env=RAY_ENV, ready_path="/ready",
        ready_timeout=900,
    )  # fmt: skip
    try:
        ports = _wait_ports(server)
        for p in ports:
            _wait_replica(p, server)
    except BaseException:
        server.stop(timeout=120)
        raise
    return server, ports


def _wait_ports(server: ServerProcess, timeout_s: float = 600) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while True:
        for line in server.log().splitlines():
            if line.startswith("REPLICA_PORTS "):
                ports: list[int] = json.loads(line.removeprefix("REPLICA_PORTS "))
                if len(ports) < REPLICAS:
                    raise RuntimeError(f"{len(ports)} replicas came up: {server.log_path}")
                return ports
        if time.monotonic() > deadline:
            raise RuntimeError(f"no replica ports in {server.log_path}")
        time.sleep(1)


def _wait_replica(port: int, server: ServerProcess, timeout_s: float = 600) -> None:
    """Until the replica's own /ready answers 200."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"replica on port {port} never ready: {server.log_path}")


def cache_counters(ports: list[int]) -> dict[str, float]:
    """Prefix-cache queries and hits summed over the replicas' own /metrics."""
    total = dict.fromkeys(COUNTERS, 0.0)
    for p in ports:
        for name, value in counters_of(httpx.get(f"http://127.0.0.1:{p}/metrics").text).items():
            total[name] += value
    return total


def counters_of(text: str) -> dict[str, float]:
    """The prefix-cache counters of one /metrics page (0 where absent)."""
    out = dict.fromkeys(COUNTERS, 0.0)
    for family in text_string_to_metric_families(text):
        if family.name in out:
            out[family.name] += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return out


def hit_rate(before: dict[str, float], after: dict[str, float]) -> float | None:
    queries = after[COUNTERS[0]] - before[COUNTERS[0]]
    return (after[COUNTERS[1]] - before[COUNTERS[1]]) / queries if queries > 0 else None


def max_replica_share(records: list[Any]) -> float | None:
    """The busiest replica's share of the requests a replica answered."""
    answered = [r for r in records if r.replica]
    groups = shares(answered, by="replica")
    return max((g["share"] for g in groups.values()), default=None)


def measure(workload: str, spec: dict[str, Any], base_url: str, ports: list[int]) -> dict:
    before = cache_counters(ports)
    result = asyncio.run(run_workload(spec["name"], Target(base_url), overrides=spec["over"]))
    after = cache_counters(ports)
    rep = report(result, with_requests=False)
    shown = (rep.get("editor") or {}).get("shown_latency_ms") or {}
    return {
        "prefix_cache_hit_rate": hit_rate(before, after),
        "ttft_p50_ms": rep.get("median_ttft_ms"),
        "ttft_p99_ms": rep.get("p99_ttft_ms"),
        "shown_latency_p90_ms": shown.get("p90") if workload == "editor" else None,
        "output_tok_s": rep.get("output_throughput"),
        "failed": rep.get("failed"),
        "max_replica_share": max_replica_share(result.records),
        "requests": len(result.records),
    }


def run_router(router: str, args: argparse.Namespace, out: Path) -> dict[str, dict]:
    server, ports = start_router(router, out, args.kv_cache_gib)
    try:
        return {
            w: measure(w, spec, server.base_url, ports)
            for w, spec in profiles(args).items()
            if w in args.workloads.split(",")
        }
    finally:
        # The driver's session holds its Ray (raylet, workers, HAProxy): all of it goes.
        server.stop(timeout=120)


# ---------------------------------------------------------------- summary


def _median(values: list[Any]) -> Any:
    xs = [v for v in values if v is not None]
    return statistics.median(xs) if xs else None


def summarize(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """trials: {router, workload, **metrics} -> workloads.<w>.routers.<r>: medians, + targets."""
    workloads: dict[str, Any] = {}
    for w in sorted({t["workload"] for t in trials}):
        routers = {}
        for r in ROUTERS:
            mine = [t for t in trials if t["workload"] == w and t["router"] == r]
            if mine:
                routers[r] = {m: _median([t[m] for t in mine]) for m in METRICS}
                routers[r]["failed"] = sum(t["failed"] or 0 for t in mine)
                routers[r]["trials"] = len(mine)
        workloads[w] = {"routers": routers}
    return {"workloads": workloads, "targets": targets(workloads)}


def _x(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def targets(workloads: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets for our router, each with its value and whether it is met."""
    out: dict[str, Any] = {}
    for w, data in workloads.items():
        ours, default = data["routers"].get("ours"), data["routers"].get("default")
        if not ours:
            continue
        rate_x = _x(ours["prefix_cache_hit_rate"], (default or {}).get("prefix_cache_hit_rate"))
        ttft_x = _x(ours["ttft_p50_ms"], (default or {}).get("ttft_p50_ms"))
        share = ours["max_replica_share"]
        out[w] = {
            "hit_rate_vs_default": _goal(rate_x, f">= {GOAL_HIT_RATE_X}", rate_x is not None
                                         and rate_x >= GOAL_HIT_RATE_X),
            "max_replica_share": _goal(share, f"<= {GOAL_MAX_SHARE}", share is not None
                                       and share <= GOAL_MAX_SHARE),
            "failed": _goal(ours["failed"], "0", ours["failed"] == 0),
            # A target on the shared-prefix workload; on the editor's reported as measured.
            "ttft_p50_vs_default": _goal(
                ttft_x, f"<= {GOAL_TTFT_P50_X}" if w == "shared_prefix" else "reported",
                None if w != "shared_prefix" else ttft_x is not None and ttft_x <= GOAL_TTFT_P50_X,
            ),
        }  # fmt: skip
    return out


def _goal(value: Any, target: str, met: bool | None) -> dict[str, Any]:
    return {"value": value, "target": target, "met": met}


def markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [f"Routing {meta['date']} · `{meta['command']}`", "", meta["setup"], ""]
    for w, data in summary["workloads"].items():
        lines += [
            f"**{w}**", "",
            "| Router | hit rate | TTFT p50 / p99 ms | shown p90 ms | output tok/s | "
            "failed | max replica share |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]  # fmt: skip
        for r, m in data["routers"].items():
            lines.append(
                f"| {r} | {fmt(m['prefix_cache_hit_rate'], '.1%')} | "
                f"{fmt(m['ttft_p50_ms'], '.0f')} / {fmt(m['ttft_p99_ms'], '.0f')} | "
                f"{fmt(m['shown_latency_p90_ms'], '.0f')} | {fmt(m['output_tok_s'], ',.0f')} | "
                f"{m['failed']} | {fmt(m['max_replica_share'], '.2f')} |"
            )
        lines.append("")
    lines += ["| Target (ours) | Workload | Value | Target | Met |", "|---|---|---:|---|---|"]
    for w, goals in summary["targets"].items():
        for name, g in goals.items():
            met = {True: "✓", False: "✗", None: "–"}[g["met"]]
            v = g["value"]
            shown = fmt(v, ".2f") if isinstance(v, float) else str(v)
            lines.append(f"| {name} | {w} | {shown} | {g['target']} | {met} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=1, help="rounds (each router once per round)")
    p.add_argument("--routers", default=",".join(ROUTERS), help="comma-separated")
    p.add_argument("--workloads", default="editor,shared_prefix", help="comma-separated")
    p.add_argument("--editor-s", type=float, default=60.0, help="editor workload duration")
    p.add_argument(
        "--groups", type=int, default=40,
        help="shared-prefix groups (40 x 1,600 tokens: far more than one replica's KV cache "
        "holds, while half of them nearly fit)",
    )  # fmt: skip
    p.add_argument("--per-group", type=int, default=6, help="shared-prefix requests per group")
    p.add_argument("--prefix-tokens", type=int, default=1536, help="shared-prefix length")
    p.add_argument("--rate", type=float, default=4.0, help="shared-prefix requests per second")
    p.add_argument(
        "--kv-cache-gib", type=float, default=0.05,
        help="each replica's KV cache (0.05: ~26k tokens of the demo model)",
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--ray-driver", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--driver-router", default="codellama", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.ray_driver is not None:
        return ray_driver(args.ray_driver, args.driver_router, args.kv_cache_gib)
    routers = [r for r in args.routers.split(",") if r]
    unknown = set(routers) - set(ROUTERS)
    if unknown:
        raise SystemExit(f"unknown routers: {', '.join(sorted(unknown))}")
    out = args.out or results_dir("routing")
    out.mkdir(parents=True, exist_ok=True)
    trials: list[dict[str, Any]] = []
    for rnd, order in rotations(routers, args.trials):
        for r in order:
            for w, m in run_router(r, args, out).items():
                trials.append({"round": rnd, "router": r, "workload": w, **m})
                print(f"round {rnd} {r} {w}: {json.dumps(m)}", flush=True)
            (out / "trials.json").write_text(json.dumps(trials, indent=2))
    setup = (
        f"{REPLICAS} replicas (demo model, KV cache {args.kv_cache_gib} GiB each) behind "
        f"Ray's HAProxy ingress; editor: 16 sessions, {args.editor_s:.0f} s; shared prefix: "
        f"{args.groups} groups x {args.per_group} requests, {args.prefix_tokens}-token "
        f"prefixes, {args.rate} req/s; {args.trials} interleaved round(s), medians."
    )
    meta = run_meta(PROG, argv, args.trials, setup=setup)
    summary = {"meta": meta, **summarize(trials), "trials": trials}
    write_summary(out, "summary", summary, markdown(summary, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
