"""Cluster-mode cost: our app through each of Ray Serve's ingress modes, with SSE frame
coalescing off and on, against the same app standalone and Ray's own LLM app
(`ray.serve.llm`), interleaved.

    python -m benchmarks.experiments.ray_modes                   # make ray-bench
    python -m benchmarks.experiments.ray_modes --trials 5 --modes proxy,haproxy

Ingress modes (--modes), each a Ray instance started with Ray's own flags:

  proxy              Ray's Python HTTP proxy actors (Serve's classic ingress); every
                     streamed frame is a message from the replica to the proxy. Ray's
                     LLM app runs here too (its own ingress deployment behind the proxy).
  haproxy            RAY_SERVE_ENABLE_HA_PROXY: HAProxy forwards to the replica's own HTTP
                     server; before each POST it asks the app's ingress request router,
                     which runs our router (engine.ray_router). `serve --ray`'s default.
  haproxy-leastconn  HAProxy without the ingress request router (ray_router default):
                     HAProxy's leastconn; what the routing hop costs.
  direct             RAY_SERVE_ENABLE_DIRECT_INGRESS: the client connects to the replica's
                     own port, nothing in between (the floor; no routing at all).
  optimized          haproxy plus RAY_SERVE_THROUGHPUT_OPTIMIZED (user code on the
                     replica's main loop, gRPC between deployments, GC frozen, ...).

Each round runs a standalone trial, then, in an order that rotates every round, each
mode: a fresh local Ray instance with our app twice (coalescing 0 and 100 ms, one
replica each, the same engine settings as standalone), one trial per app, then the
instance is stopped. The load is issue 6's: streaming /v1/completions, 64 concurrent,
32-token prompts, 128 output tokens with ignore_eos, measured with the harness.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.experiments.local_servers import ServerProcess, free_port, start_and_wait
from benchmarks.experiments.trials import (
    ENGINE,
    LoadConfig,
    Trial,
    export_prompts,
    fmt,
    ours,
    ratio,
    results_dir,
    rotations,
    run_meta,
    server_trial,
    write_report,
)
from engine.config import DEMO_MODEL, DEMO_MODEL_NAME

PROG = "python -m benchmarks.experiments.ray_modes"
LOAD = LoadConfig("stream-64", concurrency=64, stream=True)
WARMUP = LoadConfig("warmup", concurrency=64, stream=True, requests=64)
COALESCE_MS = (0, 100)
HAPROXY = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}
FORWARD_BODY = {"RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY": "1"}
# Targets the issue's goals apply to: through Ray >= 0.9x standalone's output tok/s with
# coalescing off, median TTFT added <= 50 ms, TTFT p99 <= 2x standalone's.
GOAL_TOK_S, GOAL_ADDED_TTFT_MS, GOAL_P99 = 0.9, 50.0, 2.0


@dataclass(frozen=True)
class Mode:
    what: str
    env: dict[str, str] = field(default_factory=dict)
    router: str = "default"  # settings routing.ray_router
    direct: bool = False  # the client talks to the replica's own port


MODES = {
    "proxy": Mode("Ray's Python proxy"),
    "haproxy": Mode("HAProxy + our ingress router", {**HAPROXY, **FORWARD_BODY}, "codellama"),
    "haproxy-leastconn": Mode("HAProxy, leastconn", HAPROXY),
    "direct": Mode(
        "client to the replica's port", {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}, direct=True
    ),
    "optimized": Mode(
        "haproxy + RAY_SERVE_THROUGHPUT_OPTIMIZED",
        {**HAPROXY, **FORWARD_BODY, "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
        "codellama",
    ),
}
# serve --ray's defaults: what the issue's ratios (and issue 6's) are about.
DEFAULT_TARGET = "ray-ours"


def target_name(mode: str, coalesce_ms: int) -> str:
    return DEFAULT_TARGET if (mode, coalesce_ms) == ("haproxy", 0) else f"ray-{mode}-c{coalesce_ms}"


# ---------------------------------------------------------------- Ray driver


def ray_driver(port: int, mode: str, stream_batching_ms: float | None) -> int:
    """Child process (started with the mode's env): our app per coalescing value, and in
    proxy mode Ray's LLM app, on one local Ray instance until SIGTERM."""
    import ray
    from ray import serve

    from engine.ray_serve import build_app

    # Logical CPUs beyond the 2 cores: each app needs a replica, Ray's an
    # ingress too; the engines' own threads are what really uses the cores.
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    host = "127.0.0.1" if MODES[mode].env.get("RAY_SERVE_ENABLE_HA_PROXY") != "1" else "0.0.0.0"
    serve.start(http_options={"host": host, "port": port})
    for ms in COALESCE_MS:
        serve.run(
            build_app({"settings": _our_settings(ms, MODES[mode].router)}),
            name=f"c{ms}", route_prefix=f"/c{ms}", blocking=False,
        )  # fmt: skip
    if mode == "proxy":
        _run_ray_llm_app(stream_batching_ms)
    if MODES[mode].direct:
        print("TARGETS " + json.dumps(_replica_ports()), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("ready", flush=True)  # start_and_wait polls the routes; this is for the log
    stop.wait()
    serve.shutdown()
    ray.shutdown()
    return 0


def _our_settings(coalesce_ms: int, router: str) -> dict[str, Any]:
    return {
        "engine": {
            "model": DEMO_MODEL, "max_model_len": ENGINE["max_model_len"],
            "max_num_seqs": ENGINE["max_num_seqs"], "seed": ENGINE["seed"],
            "cpu_kvcache_space_gib": ENGINE["kv_cache_gib"],
        },
        "admission": {"max_waiting_requests": 256},
        "server": {"stream_coalesce_ms": coalesce_ms},
        "ray": {"min_replicas": 1, "initial_replicas": 1, "max_replicas": 1,
                "ray_metrics_port": None},
        "routing": {"ray_router": router},
    }  # fmt: skip


def _run_ray_llm_app(stream_batching_ms: float | None) -> None:
    from ray import serve
    from ray.serve.llm import LLMConfig, build_openai_app

    from engine.demo_model import ensure_demo_model

    experimental = {"stream_batching_interval_ms": stream_batching_ms} if stream_batching_ms else {}
    llm_config = LLMConfig(
        model_loading_config={
            "model_id": DEMO_MODEL_NAME, "model_source": str(ensure_demo_model()),
        },
        accelerator_config={"kind": "cpu"},
        deployment_config={"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}},
        engine_kwargs={
            "max_model_len": ENGINE["max_model_len"], "max_num_seqs": ENGINE["max_num_seqs"],
            "seed": ENGINE["seed"], "dtype": ENGINE["dtype"], "enforce_eager": True,
        },
        runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": str(ENGINE["kv_cache_gib"])}},
        experimental_configs=experimental,
    )  # fmt: skip
    serve.run(
        build_openai_app({"llm_configs": [llm_config]}), name="rayllm", route_prefix="/rayllm",
        blocking=False,
    )  # fmt: skip


def _replica_ports(timeout_s: float = 300) -> dict[str, int]:
    """route prefix -> the HTTP port its ingress replica listens on (direct ingress)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    deadline = time.monotonic() + timeout_s
    while True:
        ports = {
            g.route_prefix: t.port
            for g in ray.get(controller.get_target_groups.remote())
            for t in g.targets
            if t.name.startswith("SERVE_REPLICA")
        }
        if all(f"/c{ms}" in ports for ms in COALESCE_MS) or time.monotonic() > deadline:
            return ports
        time.sleep(1)


# ---------------------------------------------------------------- targets


class RayTarget:
    """One application of a Ray driver, as a target for `server_trial`."""

    def __init__(self, name: str, url: str, session: int) -> None:
        self.name, self.url, self.session = name, url, session

    def cpu(self) -> tuple[float, float]:
        """(outside the engines, the engines) CPU seconds of the driver's session: Ray's
        processes, HAProxy, the replicas' HTTP and app; then vLLM's processes. The
        apps of one instance share them: per app it is the instance's, while this app
        alone has load."""
        by_kind = cpu_by_kind(self.session)
        return sum(v for k, v in by_kind.items() if k != "engine"), by_kind.get("engine", 0.0)


# Process titles (Ray's actors set theirs to `ray::<actor>`) by what they do, first
# match wins.
KINDS = (
    ("engine", "VLLM::"),  # EngineCore and its Worker (the model runs there on CPU)
    ("haproxy", "haproxy"),
    ("ingress router", "IngressRouter"),
    ("replica", "ray::ServeReplica"),
    ("proxy", "ray::ProxyActor"),
    ("controller", "ray::ServeController"),
    ("raylet", "raylet"),
    ("gcs", "gcs_server"),
)


def cpu_by_kind(session: int) -> dict[str, float]:
    """CPU seconds so far of every process in `session`, by kind (KINDS; the rest is
    "ray system": Ray's agents, monitors and idle workers)."""
    import psutil

    out: dict[str, float] = {}
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) != session:
                continue
            argv = proc.cmdline() or [proc.name()]
            t = proc.cpu_times()
        except (psutil.Error, OSError):
            continue
        if "--ray-driver" in argv:  # this script's Ray driver: serve.run, then it waits
            kind = "driver"
        else:
            kind = next((k for k, part in KINDS if part in argv[0]), "ray system")
        out[kind] = out.get(kind, 0.0) + t.user + t.system
    return out


def start_mode(mode: str, out: Path, stream_batching_ms: float | None) -> ServerProcess:
    port = free_port()
    argv = [sys.executable, "-m", "benchmarks.experiments.ray_modes", "--ray-driver", str(port),
            "--driver-mode", mode]  # fmt: skip
    if stream_batching_ms:
        argv += ["--stream-batching-ms", str(stream_batching_ms)]
    return start_and_wait(
        argv, port, out / f"ray-{mode}.log", env=MODES[mode].env,
        ready_path=f"/c{COALESCE_MS[-1]}/ready", ready_timeout=600,
    )  # fmt: skip


def mode_targets(mode: str, server: ServerProcess) -> list[RayTarget]:
    """Our app per coalescing value (through the mode's ingress), and Ray's LLM app."""
    if MODES[mode].direct:
        deadline = time.monotonic() + 300
        while "TARGETS " not in server.log():
            if time.monotonic() > deadline:
                raise RuntimeError(f"no replica ports in {server.log_path}")
            time.sleep(1)
        line = next(x for x in server.log().splitlines() if x.startswith("TARGETS "))
        ports = json.loads(line.removeprefix("TARGETS "))
        bases = {ms: f"http://127.0.0.1:{ports[f'/c{ms}']}/c{ms}" for ms in COALESCE_MS}
    else:
        bases = {ms: f"{server.base_url}/c{ms}" for ms in COALESCE_MS}
    targets = [RayTarget(target_name(mode, ms), url, server.pid) for ms, url in bases.items()]
    if mode == "proxy":
        server.wait_ready(600, path="/rayllm/v1/models")  # once Ray's engine is up
        targets.append(RayTarget("ray-llm", server.base_url + "/rayllm", server.pid))
    return targets


def run_mode(
    mode: str, out: Path, prompts: Path, rnd: int, stream_batching_ms: float | None
) -> list[Trial]:
    server = start_mode(mode, out, stream_batching_ms)
    trials = []
    try:
        targets = mode_targets(mode, server)
        if rnd % 2:  # which app goes first alternates too
            targets.reverse()
        for t in targets:  # each fresh instance warms up, not reported
            server_trial(t, WARMUP, prompts, out, rnd)
        for t in targets:
            before = cpu_by_kind(server.pid)
            trials.append(server_trial(t, LOAD, prompts, out, rnd))
            _record_cpu(out, trials[-1], before, cpu_by_kind(server.pid))
            print(f"round {rnd} {t.name}: {_line(trials[-1])}", flush=True)
    finally:
        # The driver's session holds its Ray (raylet, workers, HAProxy): all of it goes.
        server.stop(timeout=120)
    return trials


def _record_cpu(out: Path, t: Trial, before: dict[str, float], after: dict[str, float]) -> None:
    """The trial's CPU by process kind, in µs per output token, to cpu_by_kind.jsonl."""
    tokens = t.output_tokens or 1
    us = {k: (after[k] - before.get(k, 0.0)) / tokens * 1e6 for k in after}
    with (out / "cpu_by_kind.jsonl").open("a") as f:
        f.write(json.dumps({"target": t.target, "round": t.round, "us_per_token": us}) + "\n")


def _line(t: Trial) -> str:
    return (
        f"{t.output_tok_s:,.0f} tok/s, TTFT {fmt(t.median_ttft_ms, '.0f')} / "
        f"{fmt(t.p99_ttft_ms, '.0f')} ms, failed {t.failed}"
    )


# ---------------------------------------------------------------- report


def _describe(name: str) -> tuple[str, str]:
    """(ingress, coalescing) of a target, for the table."""
    if name == "standalone":
        return "–", "0 ms"
    if name == "ray-llm":
        return "Ray's LLM app, Python proxy", "its own"
    if name == DEFAULT_TARGET:
        return f"haproxy: {MODES['haproxy'].what} (serve --ray's default)", "0 ms"
    mode, _, coalesce = name.removeprefix("ray-").rpartition("-c")
    return f"{mode}: {MODES[mode].what}" if mode in MODES else mode, f"{coalesce} ms"


def markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    s = summary[LOAD.name]
    std = s.get("standalone", {})
    lines = [
        f"Ray modes {meta['date']} · `{meta['command']}`",
        "",
        f"Demo model, engine settings {meta['engine']}, {meta['rounds']} interleaved rounds, "
        "medians; streaming /v1/completions, 64 concurrent, 32-token prompts, 128 output "
        "tokens with ignore_eos, 256 requests per trial.",
        "",
        "| Target | Ingress | Coalescing | Output tok/s | / standalone | TTFT median (added) "
        "ms | TTFT p99 ms (/ standalone) | TPOT median ms | failed |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, t in s.items():
        ingress, coalesce = _describe(name)
        added = _added(t, std) if name != "standalone" else "–"
        lines.append(
            f"| {name} | {ingress} | {coalesce} | {t['output_tok_s']:,.0f} | "
            f"{ratio(t['output_tok_s'], std.get('output_tok_s'))} | "
            f"{fmt(t['median_ttft_ms'], '.0f')} ({added}) | {fmt(t['p99_ttft_ms'], '.0f')} "
            f"({ratio(t['p99_ttft_ms'], std.get('p99_ttft_ms'))}) | "
            f"{fmt(t['median_tpot_ms'], '.2f')} | {t['failed']} |"
        )
    lines += ["", *_goals(s, std), "", *_issue6_ratios(s, std)]
    lines += ["", *_cpu_table(s, meta.get("cpu_us_per_token") or {})]
    return "\n".join(lines) + "\n"


def cpu_profile(path: Path) -> dict[str, dict[str, float]]:
    """target -> process kind -> median CPU µs per output token over the rounds."""
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    by: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        for kind, us in row["us_per_token"].items():
            by.setdefault(row["target"], {}).setdefault(kind, []).append(us)
    return {t: {k: statistics.median(v) for k, v in kinds.items()} for t, kinds in by.items()}


def _cpu_table(s: dict[str, Any], profile: dict[str, dict[str, float]]) -> list[str]:
    """Where the CPU went, per output token: the profile of each target's trials."""
    kinds = [k for k, _ in KINDS if k != "engine"] + ["driver", "ray system"]
    lines = [
        "CPU µs per output token (medians; Ray's are the whole instance's while the target "
        "alone had load; standalone's frontend is its one process):",
        "",
        "| Target | engine | outside the engine | " + " | ".join(kinds) + " |",
        "|---|" + "---:|" * (len(kinds) + 2),
    ]
    for name, t in s.items():
        per_kind = profile.get(name, {})
        cells = [fmt(per_kind.get(k), ",.0f") if per_kind else "–" for k in kinds]
        lines.append(
            f"| {name} | {fmt(_us(t.get('engine_cpu_ms_per_tok')), ',.0f')} | "
            f"{fmt(_us(t.get('frontend_cpu_ms_per_tok')), ',.0f')} | " + " | ".join(cells) + " |"
        )
    return lines


def _us(ms: float | None) -> float | None:
    return None if ms is None else ms * 1e3


def _added(t: dict[str, Any], std: dict[str, Any]) -> str:
    if t.get("median_ttft_ms") is None or std.get("median_ttft_ms") is None:
        return "–"
    return f"{t['median_ttft_ms'] - std['median_ttft_ms']:+.0f}"


def _goals(s: dict[str, Any], std: dict[str, Any]) -> list[str]:
    """Each of our Ray targets without coalescing against the issue's goals."""
    lines = [
        f"| Coalescing off | tok/s ≥ {GOAL_TOK_S}× standalone | TTFT added ≤ "
        f"{GOAL_ADDED_TTFT_MS:.0f} ms | TTFT p99 ≤ {GOAL_P99:.0f}× standalone |",
        "|---|---|---|---|",
    ]
    if not std:
        return lines
    for name, t in s.items():
        if name in ("standalone", "ray-llm") or _describe(name)[1] != "0 ms":
            continue
        tok = t["output_tok_s"] / std["output_tok_s"]
        added = (t["median_ttft_ms"] or 0) - (std["median_ttft_ms"] or 0)
        p99 = (t["p99_ttft_ms"] or 0) / (std["p99_ttft_ms"] or float("inf"))
        lines.append(
            f"| {name} | {_mark(tok >= GOAL_TOK_S)} {tok:.2f}× | "
            f"{_mark(added <= GOAL_ADDED_TTFT_MS)} {added:+.0f} ms | "
            f"{_mark(p99 <= GOAL_P99)} {p99:.2f}× |"
        )
    return lines


def _mark(ok: bool) -> str:
    return "✓" if ok else "✗"


def _issue6_ratios(s: dict[str, Any], std: dict[str, Any]) -> list[str]:
    ray_ours, ray_llm = s.get(DEFAULT_TARGET, {}), s.get("ray-llm", {})
    added = (
        f"{ray_ours['median_ttft_ms'] - std['median_ttft_ms']:+.0f} ms" if ray_ours and std else "–"
    )
    return [
        "| Ratio | Value | Target |",
        "|---|---:|---|",
        f"| ours in Ray / Ray LLM app, tok/s | "
        f"{ratio(ray_ours.get('output_tok_s'), ray_llm.get('output_tok_s'))} | ≥ 2× |",
        f"| ours in Ray / standalone, tok/s | "
        f"{ratio(ray_ours.get('output_tok_s'), std.get('output_tok_s'))} | ≥ 0.8× |",
        f"| ours in Ray / standalone, TPOT median | "
        f"{ratio(ray_ours.get('median_tpot_ms'), std.get('median_tpot_ms'))} | ≤ 1.5× |",
        f"| median TTFT added by Ray (ours) | {added} | |",
        f"| Ray LLM app / standalone, tok/s | "
        f"{ratio(ray_llm.get('output_tok_s'), std.get('output_tok_s'))} | |",
    ]


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--trials", type=int, default=3, help="interleaved rounds")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated: {', '.join(MODES)}")
    p.add_argument(
        "--stream-batching-ms", type=float, default=None,
        help="Ray LLM app's stream_batching_interval_ms (default: its own)",
    )  # fmt: skip
    p.add_argument("--out", type=Path, help="report directory (default results/ray/<time>)")
    p.add_argument("--ray-driver", type=int, metavar="PORT", help=argparse.SUPPRESS)
    p.add_argument("--driver-mode", choices=list(MODES), default="proxy", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.ray_driver:
        return ray_driver(args.ray_driver, args.driver_mode, args.stream_batching_ms)
    modes = args.modes.split(",")
    unknown = set(modes) - set(MODES)
    if unknown:
        p.error(f"unknown modes: {', '.join(sorted(unknown))}")

    out = args.out or results_dir("ray")
    out.mkdir(parents=True, exist_ok=True)
    standalone = ours(out, "standalone")
    trials: list[Trial] = []
    try:
        standalone.start()
        prompts = export_prompts(LOAD, out)
        server_trial(standalone, WARMUP, prompts, out, -1)  # warm-up, not reported
        for rnd, order in rotations(modes, args.trials):
            trials.append(server_trial(standalone, LOAD, prompts, out, rnd))
            print(f"round {rnd} standalone: {_line(trials[-1])}", flush=True)
            for mode in order:
                trials += run_mode(mode, out, prompts, rnd, args.stream_batching_ms)
    finally:
        standalone.stop()
    meta = run_meta(
        PROG, argv, args.trials, modes=modes, stream_batching_ms=args.stream_batching_ms,
        cpu_us_per_token=cpu_profile(out / "cpu_by_kind.jsonl"),
    )  # fmt: skip
    write_report(out, "ray_modes", trials, meta, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
