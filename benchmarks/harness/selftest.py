"""`bench selftest`: how much load this host's harness can generate, with 1 and N workers.

Against the trivial endpoint (fake_server.py, in processes of its own sharing one port),
open loop at constant rates rising until the client no longer keeps its schedule: a
rate is *sustained* when the run is not flagged (schedule lag, send rate, connection
wait) and the client's event loop is not overloaded. The result is reported in
requests/s and SSE events/s (each streamed request is its token chunks + usage +
[DONE]), and kept in `headroom_path()`, which every later run reads: its report warns
when it plans more events per second than the selftest sustained with its worker count.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from benchmarks.harness.client import Target
from benchmarks.harness.profile.schema import Profile
from benchmarks.harness.results import RunResult
from benchmarks.harness.runner import Runner

DEFAULT_RATES = (250, 500, 1000, 1500, 2000, 3000, 4000, 6000)


def headroom_path() -> Path:
    """Where the last selftest's figures are kept ($CODELLAMA_SERVE_BENCH_HEADROOM)."""
    env = os.environ.get("CODELLAMA_SERVE_BENCH_HEADROOM")
    if env:
        return Path(env)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "codellama-serve" / "bench-headroom.json"


def read_headroom() -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(headroom_path().read_text())
    except (OSError, ValueError):
        return None
    return data


def sustained_events(headroom: dict[str, Any], workers: int) -> tuple[int, float] | None:
    """(worker count measured, events/s it sustained) for the nearest count ≤ workers."""
    measured = {int(k): v for k, v in (headroom.get("results") or {}).items()}
    fits = [k for k in measured if k <= workers and measured[k].get("sustained_events_per_s")]
    if not fits:
        return None
    k = max(fits)
    return k, float(measured[k]["sustained_events_per_s"])


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_fake_servers(
    port: int, processes: int, log_dir: Path, *fake_args: str
) -> list[subprocess.Popen[bytes]]:
    """`bench fake-server` × processes on one port (SO_REUSEPORT); wait until it answers."""
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    argv = [sys.executable, "-m", "benchmarks", "fake-server", "--port", str(port), "--reuse-port"]
    argv += fake_args
    for k in range(processes):
        with (log_dir / f"fake-{k}.log").open("wb") as log:
            procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                time.sleep(0.5)  # the other processes come up alike
                return procs
        except httpx.HTTPError:
            time.sleep(0.2)
    stop(procs)
    raise RuntimeError("the fake server did not start")


def stop(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def probe_profile(rate: float, duration_s: float, max_tokens: int) -> Profile:
    return Profile.model_validate(
        {
            "name": "selftest",
            "load": {"type": "rate", "rate": rate, "arrival": "constant"},
            "duration_s": duration_s,
            "warmup_requests": 20,
            "dataset": {"type": "humaneval"},
            "request": {"max_tokens": max_tokens},
            "server_metrics": False,
        }
    )


def verdict(res: RunResult) -> tuple[bool, str]:
    load = res.summary["load"]
    if load.get("coordinated_omission"):
        return False, "; ".join(load["coordinated_omission_reasons"])
    if res.client["loop_lag"].get("overloaded"):
        return False, f"event-loop lag p99 {res.client['loop_lag']['p99_ms']:.1f} ms"
    if res.summary["failed"]:
        return False, f"{res.summary['failed']} failed"
    return True, "kept its schedule"


def step_row(rate: float, res: RunResult) -> dict[str, Any]:
    ok, why = verdict(res)
    recs = [r for r in res.records if r.ok]
    events = sum(r.chunks for r in recs) / max(1, len(recs))
    load = res.summary["load"]
    return {
        "rate": rate,
        "sustained": ok,
        "why": why,
        "achieved_send_rate": load.get("achieved_send_rate"),
        "p99_schedule_lag_ms": load.get("p99_schedule_lag_ms"),
        "events_per_request": events,
        "events_per_s": rate * events,
        "client_cpu_s": res.client["cpu"]["cpu_s"],
        "client_cpu_utilization": res.client["cpu"]["cpu_utilization"],
        "loop_lag_p99_ms": res.client["loop_lag"].get("p99_ms"),
    }


async def selftest(
    base_url: str,
    workers: Sequence[int],
    rates: Sequence[float],
    duration_s: float,
    max_tokens: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Rates in ascending order for each worker count, up to the first not sustained."""
    results: dict[str, Any] = {}
    for w in workers:
        rows = []
        for rate in sorted(rates):
            res = await Runner(
                probe_profile(rate, duration_s, max_tokens), Target(base_url), workers=w
            ).run()
            row = step_row(rate, res)
            rows.append(row)
            log(f"{w} worker(s), {rate:g} req/s: {row['why']}")
            if not row["sustained"]:
                break
        best = max((r for r in rows if r["sustained"]), key=lambda r: r["rate"], default=None)
        results[str(w)] = {
            "sustained_rate": best["rate"] if best else None,
            "sustained_events_per_s": best["events_per_s"] if best else None,
            "steps": rows,
        }
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "duration_s": duration_s,
        "max_tokens": max_tokens,
        "results": results,
    }


def selftest_markdown(data: dict[str, Any]) -> str:
    lines = [
        f"# Harness headroom on {data['host']} ({data['cpus']} CPUs), {data['date']}",
        "",
        f"Fake server, {data['max_tokens']} tokens per request, {data['duration_s']:g} s per "
        "rate, constant arrivals.",
        "",
        "| Workers | Rate (req/s) | Events/s | Sent/s | Lag P99 (ms) | Loop lag P99 (ms) "
        "| Client CPU | Verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for w, res in data["results"].items():
        for r in res["steps"]:
            lines.append(
                f"| {w} | {r['rate']:g} | {r['events_per_s']:,.0f} "
                f"| {r['achieved_send_rate'] or 0:,.0f} | {r['p99_schedule_lag_ms'] or 0:.1f} "
                f"| {r['loop_lag_p99_ms'] or 0:.1f} | {100 * r['client_cpu_utilization']:.0f}% "
                f"| {'sustained' if r['sustained'] else 'not: ' + r['why']} |"
            )
    lines.append("")
    for w, res in data["results"].items():
        ev = res["sustained_events_per_s"]
        lines.append(
            f"- **{w} worker(s)**: {res['sustained_rate'] or 0:g} req/s sustained "
            f"(≈ {ev or 0:,.0f} SSE events/s)"
        )
    return "\n".join(lines) + "\n"


def save(data: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "selftest.json").write_text(json.dumps(data, indent=2))
    (out_dir / "selftest.md").write_text(selftest_markdown(data))
    path = headroom_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path
