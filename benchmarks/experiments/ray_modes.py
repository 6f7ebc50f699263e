"""Cluster-mode cost: the same load against our standalone server, our Ray Serve
application with one replica, and Ray's own LLM app (`ray.serve.llm`), in one
run, interleaved.

    python -m benchmarks.experiments.ray_modes                   # make ray-bench
    python -m benchmarks.experiments.ray_modes --trials 5 --stream-batching-ms 100

Both Ray applications run in one local Ray instance behind the same Serve HTTP
proxy (ours under /ours, Ray's under /rayllm), each with one replica owning
one vLLM engine with the same settings as the standalone server; so the
comparison is of the serving layers, not of engines or proxies. The load is
issue 6's: streaming /v1/completions, 64 concurrent, 32-token prompts,
128 output tokens with ignore_eos, measured with the harness.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from benchmarks.experiments.local_servers import ServerProcess, free_port, start_and_wait
from benchmarks.experiments.trials import (
    ENGINE,
    LoadConfig,
    ServerTarget,
    Trial,
    export_prompts,
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


# ---------------------------------------------------------------- Ray driver


def ray_driver(port: int, stream_batching_ms: float | None) -> int:
    """Child process: both Ray applications on one local Ray instance, until SIGTERM."""
    import ray
    from ray import serve
    from ray.serve.llm import LLMConfig, build_openai_app

    from engine.demo_model import ensure_demo_model
    from engine.ray_serve import build_app

    # Logical CPUs beyond the 2 cores: each app needs a replica, Ray's an
    # ingress too; the engines' own threads are what really uses the cores.
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    ours_settings = {
        "engine": {
            "model": DEMO_MODEL, "max_model_len": ENGINE["max_model_len"],
            "max_num_seqs": ENGINE["max_num_seqs"], "seed": ENGINE["seed"],
            "cpu_kvcache_space_gib": ENGINE["kv_cache_gib"],
        },
        "admission": {"max_waiting_requests": 256},
        "ray": {"min_replicas": 1, "initial_replicas": 1, "max_replicas": 1,
                "ray_metrics_port": None},
    }  # fmt: skip
    serve.run(
        build_app({"settings": ours_settings}), name="ours", route_prefix="/ours", blocking=False
    )
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
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("ready", flush=True)  # start_and_wait polls the routes; this is for the log
    stop.wait()
    serve.shutdown()
    ray.shutdown()
    return 0


class RayTarget:
    """One application of the Ray driver, as a target for `server_trial`."""

    def __init__(self, name: str, server: ServerProcess, prefix: str) -> None:
        self.name, self.url = name, server.base_url + prefix

    def cpu(self) -> tuple[float, float]:
        # Both apps share the Ray processes: per-target CPU is not separable.
        return 0.0, 0.0


def start_ray_apps(out: Path, stream_batching_ms: float | None) -> ServerProcess:
    port = free_port()
    argv = [sys.executable, "-m", "benchmarks.experiments.ray_modes", "--ray-driver", str(port)]
    if stream_batching_ms:
        argv += ["--stream-batching-ms", str(stream_batching_ms)]
    server = start_and_wait(
        argv, port, out / "ray.log", ready_path="/ours/ready", ready_timeout=600
    )
    # Ray's app answers /v1/models once its engine is up.
    server.wait_ready(600, path="/rayllm/v1/models")
    return server


# ---------------------------------------------------------------- report


def markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    s = summary[LOAD.name]
    lines = [
        f"Ray modes {meta['date']} · `{meta['command']}`",
        "",
        f"Demo model, engine settings {meta['engine']}, {meta['rounds']} interleaved rounds, "
        "medians; streaming /v1/completions, 64 concurrent, 32-token prompts, 128 output "
        "tokens with ignore_eos, 256 requests per trial.",
        "",
        "| Target | Output tok/s | TTFT median / p99 (ms) | TPOT median (ms) | failed |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, t in s.items():
        lines.append(
            f"| {name} | {t['output_tok_s']:,.0f} | {t['median_ttft_ms']:.0f} / "
            f"{t['p99_ttft_ms']:.0f} | {t['median_tpot_ms']:.2f} | {t['failed']} |"
        )
    std, ray_ours, ray_llm = s.get("standalone", {}), s.get("ray-ours", {}), s.get("ray-llm", {})
    added = (
        f"{ray_ours['median_ttft_ms'] - std['median_ttft_ms']:+.0f} ms" if ray_ours and std else "–"
    )
    lines += [
        "",
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
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--trials", type=int, default=3, help="interleaved rounds")
    p.add_argument(
        "--stream-batching-ms", type=float, default=None,
        help="Ray LLM app's stream_batching_interval_ms (default: its own)",
    )  # fmt: skip
    p.add_argument("--out", type=Path, help="report directory (default results/ray/<time>)")
    p.add_argument("--ray-driver", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.ray_driver:
        return ray_driver(args.ray_driver, args.stream_batching_ms)

    out = args.out or results_dir("ray")
    out.mkdir(parents=True, exist_ok=True)
    standalone = ours(out, "standalone")
    ray_apps: ServerProcess | None = None
    trials: list[Trial] = []
    try:
        standalone.start()
        ray_apps = start_ray_apps(out, args.stream_batching_ms)
        targets: dict[str, ServerTarget | RayTarget] = {
            "standalone": standalone,
            "ray-ours": RayTarget("ray-ours", ray_apps, "/ours"),
            "ray-llm": RayTarget("ray-llm", ray_apps, "/rayllm"),
        }
        prompts = export_prompts(LOAD, out)
        for t in targets.values():  # warm-up, not reported
            server_trial(t, LOAD, prompts, out, -1)
        for rnd, order in rotations(list(targets), args.trials):
            for name in order:
                trial = server_trial(targets[name], LOAD, prompts, out, rnd)
                trials.append(trial)
                print(f"round {rnd} {name}: {trial.output_tok_s:,.0f} tok/s", flush=True)
    finally:
        standalone.stop()
        if ray_apps is not None:
            ray_apps.stop(timeout=120)
    meta = run_meta(PROG, argv, args.trials, stream_batching_ms=args.stream_batching_ms)
    write_report(out, "ray_modes", trials, meta, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
