"""Soak: a bounded run at ~80% of saturation, checking that nothing fails and
nothing leaks.

    python -m benchmarks.experiments.soak                     # make soak: 5 minutes at 80%
    python -m benchmarks.experiments.soak --duration 60 --load 0.5

It starts our server on the demo model, measures its saturation throughput
with the soak's own request mix (closed loop at `--probe-concurrency`, which
also warms it up), then offers `--load` x that rate as open-loop Poisson
arrivals for `--duration` seconds with the benchmark harness. It samples the
resident memory of the frontend process and of the engine processes all
along, and at the end checks that the engine is idle again (0 running,
0 waiting) and the server still healthy. It writes soak.json and soak.md and
exits 1 if any request failed, the engine did not go idle, or the client fell
behind its schedule (the offered load would then be a lie).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from benchmarks.cli import harness_command
from benchmarks.experiments.local_servers import ServerProcess, running_server
from benchmarks.harness.server_metrics import gauges_of, parse

MIB = 1 << 20
IDLE_TIMEOUT_S = 10.0
IDLE_POLL_S = 0.1
LATENCY_KEYS = (
    "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "median_e2el_ms",
    "p99_e2el_ms",
)  # fmt: skip


@dataclass
class Memory:
    """Resident memory (MiB) of the server: its own process and its engine's."""

    frontend_mib: float
    engine_mib: float

    @classmethod
    def of(cls, pid: int) -> Memory:
        proc = psutil.Process(pid)
        engine = 0
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):  # it may just have exited
                engine += child.memory_info().rss
        return cls(proc.memory_info().rss / MIB, engine / MIB)


@dataclass
class MemorySampler:
    """Samples Memory.of(pid) every `interval_s` on a thread."""

    pid: int
    interval_s: float = 5.0
    samples: list[tuple[float, Memory]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> MemorySampler:
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic() - self._t0, Memory.of(self.pid)))
            self._stop.wait(self.interval_s)

    def peak(self) -> Memory:
        return Memory(
            max((m.frontend_mib for _, m in self.samples), default=0.0),
            max((m.engine_mib for _, m in self.samples), default=0.0),
        )


def bench(url: str, out: Path, load: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """One harness run (its own process, like any client); its report.json."""
    cmd = harness_command(
        "run", "--base-url", url,
        "--dataset", args.dataset, "--max-tokens", str(args.max_tokens), "--ignore-eos",
        "--stream", "--seed", str(args.seed), "--warmup", "0", "--no-plots", "--quiet",
        "--out", str(out), *load,
    )  # fmt: skip
    subprocess.run(cmd, check=True)
    return json.loads((out / "report.json").read_text())


def engine_gauges(url: str) -> dict[str, float]:
    return gauges_of(parse(httpx.get(url + "/metrics", timeout=5).text))


def wait_idle(url: str) -> tuple[dict[str, float], float]:
    """Gauges once the engine has no running or waiting request (or at the timeout)."""
    t0 = time.monotonic()
    while True:
        g = engine_gauges(url)
        idle = not g.get("requests_running") and not g.get("requests_waiting")
        if idle or time.monotonic() - t0 > IDLE_TIMEOUT_S:
            return g, time.monotonic() - t0
        time.sleep(IDLE_POLL_S)  # not a busy loop against the server being measured


def soak(server: ServerProcess, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    cold = Memory.of(server.pid)
    print(f"[soak] probing saturation at concurrency {args.probe_concurrency}", flush=True)
    probe = bench(
        server.base_url, out / "probe",
        ["--concurrency", str(args.probe_concurrency), "--num-requests", str(args.probe_requests),
         "--duration", "600"],
        args,
    )  # fmt: skip
    saturation = probe["request_throughput"]
    rate = args.load * saturation
    warm = Memory.of(server.pid)
    print(
        f"[soak] saturation {saturation:.2f} req/s; offering {rate:.2f} req/s "
        f"for {args.duration:.0f} s",
        flush=True,
    )
    with MemorySampler(server.pid) as sampler:
        run = bench(
            server.base_url, out / "soak",
            ["--rate", f"{rate:.4f}", "--arrival", "poisson", "--duration", str(args.duration)],
            args,
        )  # fmt: skip
    gauges, idle_after_s = wait_idle(server.base_url)
    after = Memory.of(server.pid)
    health = httpx.get(server.base_url + "/health", timeout=5).status_code
    load = run["summary"]["load"]
    checks = {
        "no_failed_requests": run["failed"] == 0,
        "engine_idle_after": not gauges.get("requests_running")
        and not gauges.get("requests_waiting"),
        "healthy_after": health == 200,
        "client_kept_schedule": not load.get("coordinated_omission"),
    }
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.experiments.soak " + " ".join(sys.argv[1:]),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "saturation_req_s": saturation,
        "saturation_output_tok_s": probe["output_throughput"],
        "offered_req_s": rate,
        "achieved_send_rate": load.get("achieved_send_rate"),
        "completed": run["completed"],
        "failed": run["failed"],
        "errors": run["summary"]["errors"],
        "output_tok_s": run["output_throughput"],
        "latency_ms": {k: run.get(k) for k in LATENCY_KEYS},
        "memory_mib": {
            "cold": asdict(cold),
            "before": asdict(warm),
            "peak": asdict(sampler.peak()),
            "after": asdict(after),
            "samples": [(round(t, 1), asdict(m)) for t, m in sampler.samples],
        },
        "engine_after": gauges,
        "idle_after_s": idle_after_s,
        "health_after": health,
        "checks": checks,
        "passed": all(checks.values()),
    }


def markdown(r: dict[str, Any]) -> str:
    mem = r["memory_mib"]

    def row(name: str, key: str) -> str:
        b, a = mem["before"][key], mem["after"][key]
        return (
            f"| {name} | {mem['cold'][key]:.0f} | {b:.0f} | {mem['peak'][key]:.0f} | {a:.0f} "
            f"| {a - b:+.1f} |"
        )

    lat = r["latency_ms"]
    lines = [
        f"# Soak, {r['date']}",
        "",
        f"`{r['command']}`",
        "",
        f"- Saturation (closed loop at {r['settings']['probe_concurrency']}): "
        f"{r['saturation_req_s']:.2f} req/s, {r['saturation_output_tok_s']:,.0f} output tok/s",
        f"- Offered: {r['offered_req_s']:.2f} req/s Poisson ({r['settings']['load']:.0%}) "
        f"for {r['settings']['duration']:.0f} s; sent at {r['achieved_send_rate']:.2f} req/s",
        f"- Completed {r['completed']}, failed **{r['failed']}**; "
        f"{r['output_tok_s']:,.0f} output tok/s",
        f"- TTFT median {lat['median_ttft_ms']:.0f} ms, p99 {lat['p99_ttft_ms']:.0f} ms; "
        f"TPOT median {lat['median_tpot_ms']:.1f} ms, p99 {lat['p99_tpot_ms']:.1f} ms",
        f"- After: engine running {r['engine_after'].get('requests_running', 0):.0f}, "
        f"waiting {r['engine_after'].get('requests_waiting', 0):.0f} "
        f"({r['idle_after_s']:.1f} s after the last request); /health {r['health_after']}",
        "",
        "| RSS (MiB) | cold | before | peak | after | after - before |",
        "|---|---:|---:|---:|---:|---:|",
        row("frontend", "frontend_mib"),
        row("engine", "engine_mib"),
        "",
        "Checks: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in r["checks"].items()),
    ]
    if r["errors"]:
        lines += ["", "| error | count |", "|---|---:|"]
        lines += [f"| {e['error']} | {e['count']} |" for e in r["errors"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=float, default=300.0, help="seconds of soak load")
    p.add_argument("--load", type=float, default=0.8, help="share of saturation to offer")
    p.add_argument("--probe-concurrency", type=int, default=64)
    p.add_argument("--probe-requests", type=int, default=256)
    p.add_argument("--dataset", default="humaneval", help="a harness dataset")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="report directory (default results/soak/<time>)")
    args = p.parse_args(argv)
    out = args.out or Path("results") / "soak" / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    with running_server("ours", out / "server.log") as server:
        result = soak(server, out, args)
    (out / "soak.json").write_text(json.dumps(result, indent=2))
    text = markdown(result)
    (out / "soak.md").write_text(text)
    print(text)
    print(f"report: {out / 'soak.md'}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
