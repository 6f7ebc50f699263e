"""Where do the 64-stream tail latencies come from? (issue 12, finding 4)

Against our server and vLLM's own (each on the demo model, started here, one at a time),
three clients, each in a fresh process per trial, rotating every round (and, with
`--sched normal,fifo`, each also run under `chrt -f 10`: a client that gets a CPU the
moment it wakes, as one on a machine of its own would):

- `lean`: a minimal aiohttp client (experiments/lean_client.py), no harness code;
- `vllm-bench`: vLLM's `bench serve` (experiments/vllm_bench.py);
- `harness`: `codellama-serve bench run` with its per-request breakdown.

Every trial gets prompts of its own (no prefix-cache hits across trials), and around
each one the kernel's TCP counters (/proc/net/netstat and /proc/net/snmp: what `nstat`
shows), the loopback's softnet drops and the listen queue (`ss -ltn`) are read, so a
slow trial can be matched with what TCP did in it. Run it under the shared lock:

    flock /tmp/codellama-cpu.lock python -m benchmarks.experiments.tails --trials 4
    python -m benchmarks.experiments.tails --servers ours --clients lean,harness --trials 6
    python -m benchmarks.experiments.tails --servers ours --clients harness --sched normal,fifo
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.cli import harness_command
from benchmarks.experiments.local_servers import ServerProcess, running_server
from benchmarks.experiments.trials import ROOT, fmt, results_dir

PROG = "python -m benchmarks.experiments.tails"
CLIENTS = ("lean", "vllm-bench", "harness")
# How a client process is scheduled: as any other (normal), or SCHED_FIFO at priority 10
# (fifo: it preempts the server's threads whenever it has work; the kernel's RT
# throttling still leaves 5 % of every second to everyone else).
SCHED = {"normal": [], "fifo": ["chrt", "-f", "10"]}
# The kernel counters that tell lost, retransmitted or refused segments and connections.
TCP_COUNTERS = (
    "TcpExt:TCPLossProbes", "TcpExt:TCPLossProbeRecovery", "TcpExt:TCPTimeouts",
    "TcpExt:TCPSynRetrans", "TcpExt:ListenOverflows", "TcpExt:ListenDrops",
    "TcpExt:TCPBacklogDrop", "TcpExt:TCPRcvQDrop", "TcpExt:TCPSpuriousRTOs",
    "TcpExt:TCPDSACKRecv", "TcpExt:TCPDSACKOfoRecv", "TcpExt:TCPAbortOnData",
    "TcpExt:TCPAbortOnTimeout", "TcpExt:TCPOFOQueue", "TcpExt:TCPZeroWindowDrop",
    "TcpExt:TCPToZeroWindowAdv", "TcpExt:TCPWantZeroWindowAdv", "TcpExt:PruneCalled",
    "TcpExt:TCPRcvCollapsed", "TcpExt:TCPMemoryPressures",
    "Tcp:RetransSegs", "Tcp:ActiveOpens", "Tcp:PassiveOpens", "Tcp:AttemptFails",
    "Tcp:EstabResets", "Tcp:OutRsts", "Tcp:InErrs",
)  # fmt: skip


# ---------------------------------------------------------------- what the kernel saw


def tcp_counters() -> dict[str, int]:
    """The counters `nstat` reports, read from /proc (TcpExt and Tcp), and softnet drops."""
    out: dict[str, int] = {}
    for path in ("/proc/net/netstat", "/proc/net/snmp"):
        lines = Path(path).read_text().splitlines()
        for head, vals in zip(lines[::2], lines[1::2], strict=False):
            kind, names = head.split(":", 1)
            for name, v in zip(names.split(), vals.split(":", 1)[1].split(), strict=False):
                out[f"{kind}:{name}"] = int(v)
    # /proc/net/softnet_stat: per CPU, column 2 counts packets dropped because the
    # backlog queue (net.core.netdev_max_backlog) was full; loopback goes through it.
    drops = 0
    for line in Path("/proc/net/softnet_stat").read_text().splitlines():
        drops += int(line.split()[1], 16)
    out["softnet:dropped"] = drops
    return out


def counter_deltas(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    keys = (*TCP_COUNTERS, "softnet:dropped")
    return {k.split(":", 1)[1]: b.get(k, 0) - a.get(k, 0) for k in keys}


def cpu_pressure_s() -> float:
    """/proc/pressure/cpu `some` total: seconds in which some runnable task waited for a CPU."""
    line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    return int(line.rsplit("total=", 1)[1]) / 1e6


def run_delay_s(pid: int) -> float | None:
    """How long the process's main thread was runnable but waiting for a CPU (schedstat)."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


def run_client(cmd: list[str]) -> tuple[subprocess.CompletedProcess[str], float | None]:
    """Run the client; also its main thread's wait for a CPU, read just before it exits."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    delay = None
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read() if proc.stdout else ""))
    reader.start()
    while proc.poll() is None:
        delay = run_delay_s(proc.pid) or delay
        time.sleep(0.1)
    reader.join()
    return subprocess.CompletedProcess(cmd, proc.returncode, "".join(out), ""), delay


def listen_queue(port: int) -> str:
    """`ss -ltn` of the server's listening socket: Recv-Q (accept queue) and Send-Q (backlog)."""
    r = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=False
    )
    return " ".join(r.stdout.split())


# ---------------------------------------------------------------- the clients


def client_command(
    client: str, url: str, prompts: Path, out: Path, args: argparse.Namespace
) -> list[str]:
    c, n, m = str(args.concurrency), str(args.requests), str(args.max_tokens)
    if client == "lean":
        return [
            sys.executable, "-m", "benchmarks.experiments.lean_client", "--url", url,
            "--prompts", str(prompts), "--concurrency", c, "--requests", n, "--max-tokens", m,
            "--out", str(out / "lean.json"),
        ]  # fmt: skip
    if client == "vllm-bench":
        from engine.config import DEMO_MODEL_NAME
        from engine.demo_model import ensure_demo_model

        return [
            sys.executable, "-m", "benchmarks.experiments.vllm_bench", "--backend", "openai",
            "--base-url", url, "--endpoint", "/v1/completions", "--model", DEMO_MODEL_NAME,
            "--tokenizer", str(ensure_demo_model()), "--dataset-name", "custom",
            "--dataset-path", str(prompts), "--custom-output-len", m, "--skip-chat-template",
            "--ignore-eos", "--max-concurrency", c, "--num-prompts", n, "--seed", "0",
            "--num-warmups", "0", "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--metric-percentiles", "50,90,99", "--save-result", "--save-detailed",
            "--result-dir", str(out), "--result-filename", "vllm.json", "--disable-tqdm",
        ]  # fmt: skip
    return harness_command(
        "run", "--base-url", url, "--concurrency", c, "--num-requests", n, "--duration", "600",
        "--dataset", "jsonl", "--dataset-path", str(prompts), "--set", "dataset.shuffle=false",
        "--set", "dataset.salt=false", "--max-tokens", m, "--ignore-eos", "--warmup", "0",
        "--no-progress", "--no-plots", "--token-check", "never", "--quiet", "--save-requests",
        "--out", str(out / "harness"),
    )  # fmt: skip


def _pcts(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "max": None}
    xs = sorted(values)
    import numpy as np

    return {
        "p50": float(np.percentile(xs, 50)) * 1000,
        "p99": float(np.percentile(xs, 99)) * 1000,
        "max": xs[-1] * 1000,
    }


def read_result(client: str, out: Path) -> dict[str, Any]:
    """TTFTs (s), failures and the client's own extra evidence, whatever the client."""
    if client == "lean":
        data = json.loads((out / "lean.json").read_text())
        reqs = data["requests"]
        ok = [r for r in reqs if not r.get("error") and r.get("ttft_s") is not None]
        connects = [r["connect_s"] for r in reqs if r.get("connect_s") is not None]
        return {
            "ttft": [r["ttft_s"] for r in ok],
            "failed": len(reqs) - len(ok),
            "errors": sorted({r["error"] for r in reqs if r.get("error")})[:3],
            "connect_ms": _pcts(connects),
        }
    if client == "vllm-bench":
        data = json.loads((out / "vllm.json").read_text())
        ttfts = [t for t in data.get("ttfts", []) if t]
        return {
            "ttft": ttfts,
            "failed": data.get("failed", 0),
            "errors": sorted({e for e in data.get("errors", []) if e})[:3],
        }
    data = json.loads((out / "harness" / "report.json").read_text())
    reqs = data.get("requests", [])
    ttfts = [r["token_times"][0] - r["sent"] - r["conn_wait"] for r in reqs if r["token_times"]]
    return {
        "ttft": ttfts,
        "failed": data["failed"],
        "errors": [e["error"] for e in data["summary"]["errors"]][:3],
        "breakdown": {
            k: {"median_ms": v.get("median_ms"), "p99_ms": v.get("p99_ms"), "max_ms": v["max_ms"]}
            for k, v in data["summary"]["latency_breakdown"].items()
            if isinstance(v, dict)
        },
        "server_histograms": data["server"].get("histograms"),
        "client_cpu": data["client"]["cpu"],
        "client_loop_lag": data["client"]["loop_lag"],
    }


def trial(
    server: ServerProcess, kind: str, client: str, rnd: int, prompts: Path, out: Path,
    args: argparse.Namespace, sched: str = "normal",
) -> dict[str, Any]:  # fmt: skip
    d = out / f"{kind}-{client}-{sched}-{rnd}"
    d.mkdir(parents=True, exist_ok=True)
    cmd = SCHED[sched] + client_command(client, server.base_url, prompts, d, args)
    queue = listen_queue(server.port)
    before, t0, psi0 = tcp_counters(), time.perf_counter(), cpu_pressure_s()
    r, delay = run_client(cmd)
    wall, after, psi = time.perf_counter() - t0, tcp_counters(), cpu_pressure_s() - psi0
    (d / "client.log").write_text(r.stdout + r.stderr)
    row: dict[str, Any] = {
        "server": kind, "client": client, "sched": sched, "round": rnd, "exit": r.returncode,
        "wall_s": wall,
        "listen_queue": queue, "tcp": counter_deltas(before, after),
        # The client's main thread runnable but off-CPU (s), and the machine's CPU pressure:
        # seconds of the trial in which some runnable task waited for a CPU.
        "client_run_delay_s": delay, "cpu_pressure_s": psi,
    }  # fmt: skip
    try:
        res = read_result(client, d)
    except (OSError, ValueError, KeyError) as e:
        row["error"] = f"no result: {type(e).__name__}: {e}"
        return row
    row |= {k: v for k, v in res.items() if k != "ttft"}
    row["ttft_ms"] = _pcts(res["ttft"])
    row["slow_requests"] = sum(1 for t in res["ttft"] if t > 1.0)
    return row


# ---------------------------------------------------------------- the run


def trial_prompts(all_prompts: Path, out: Path, index: int, n: int) -> Path:
    """Rows [index·n, (index+1)·n) of the export: prompts no other trial sent."""
    rows = all_prompts.read_text().splitlines()
    if (index + 1) * n > len(rows):
        raise ValueError(f"{all_prompts} has {len(rows)} rows; trial {index} needs more")
    path = out / "prompts" / f"trial-{index}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows[index * n : (index + 1) * n]) + "\n")
    return path


def export_all(out: Path, count: int, args: argparse.Namespace) -> Path:
    path = out / "prompts-all.jsonl"
    subprocess.run(
        harness_command(
            "export-dataset", "default", "--dataset", "synthetic", "--input-tokens",
            str(args.input_tokens), "--output-tokens", str(args.max_tokens),
            "--set", f"dataset.size={count}", "--count", str(count), "--output", str(path),
        ),
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    return path


def render(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"# 64-stream tails: {meta['command']}",
        "",
        f"{meta['date']} · {meta['concurrency']} streams · {meta['requests']} requests of "
        f"{meta['input_tokens']} prompt / {meta['max_tokens']} output tokens per trial",
        "",
        "| server | client | sched | round | TTFT P50 / P99 / max (ms) | >1 s | failed "
        "| loss probes | RTO timeouts | retrans segs | SYN retrans | listen overflows "
        "| softnet drops | connect P99 (ms) | client waited for CPU (s) | CPU pressure (s) "
        "| wall (s) |",
        "|" + "---|" * 17,
    ]
    for r in rows:
        if "ttft_ms" not in r:
            lines.append(
                f"| {r['server']} | {r['client']} | {r.get('sched')} | {r['round']} "
                f"| {r.get('error')} |"
            )
            continue
        t, tcp = r["ttft_ms"], r["tcp"]
        conn = (r.get("connect_ms") or {}).get("p99")
        if conn is None:
            conn = (r.get("breakdown") or {}).get("connect", {}).get("p99_ms")
        lines.append(
            f"| {r['server']} | {r['client']} | {r.get('sched', 'normal')} | {r['round']} "
            f"| {fmt(t['p50'])} / "
            f"{fmt(t['p99'])} / {fmt(t['max'])} | {r['slow_requests']} | {r['failed']} "
            f"| {tcp['TCPLossProbes']} | {tcp['TCPTimeouts']} | {tcp['RetransSegs']} "
            f"| {tcp['TCPSynRetrans']} | {tcp['ListenOverflows']} | {tcp['dropped']} "
            f"| {fmt(conn)} | {fmt(r.get('client_run_delay_s'), '.2f')} "
            f"| {fmt(r.get('cpu_pressure_s'), '.1f')} | {fmt(r['wall_s'])} |"
        )
    for sched in sorted({r.get("sched", "normal") for r in rows}):
        mine = [r for r in rows if r.get("sched", "normal") == sched and r.get("ttft_ms")]
        if mine:
            p99 = sorted(r["ttft_ms"]["p99"] for r in mine)
            lines += ["", f"Clients scheduled `{sched}`: {len(mine)} trials, TTFT P99 "
                      f"median {statistics.median(p99):,.0f} ms, range {p99[0]:,.0f}–"
                      f"{p99[-1]:,.0f} ms; {sum(r['failed'] for r in mine)} failed."]  # fmt: skip
    slow = [r for r in rows if r.get("ttft_ms", {}).get("p99") and r["ttft_ms"]["p99"] > 1000]
    fast = [r for r in rows if r.get("ttft_ms", {}).get("p99") and r["ttft_ms"]["p99"] <= 1000]
    for name, group in (("P99 > 1 s", slow), ("P99 ≤ 1 s", fast)):
        if group:
            med = {
                k: statistics.median(r["tcp"][k] for r in group)
                for k in ("TCPLossProbes", "TCPTimeouts", "RetransSegs", "dropped")
            }
            delays = [r["client_run_delay_s"] for r in group if r.get("client_run_delay_s")]
            if delays:
                med["client_run_delay_s"] = round(statistics.median(delays), 2)
            lines += ["", f"Trials with {name}: {len(group)}; median counters {med}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__)
    p.add_argument("--servers", default="ours,vllm")
    p.add_argument("--clients", default=",".join(CLIENTS))
    p.add_argument("--sched", default="normal", help="client scheduling: normal, fifo or both")
    p.add_argument("--trials", type=int, default=4, help="rounds per server (clients rotate)")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--input-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    servers, scheds = args.servers.split(","), args.sched.split(",")
    clients = [(c, sc) for c in args.clients.split(",") for sc in scheds]
    out = args.out or results_dir("tails")
    out.mkdir(parents=True, exist_ok=True)
    n_trials = len(servers) * len(clients) * args.trials
    all_prompts = export_all(out, n_trials * args.requests, args)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": f"{PROG} " + " ".join(argv or sys.argv[1:]),
        "concurrency": args.concurrency, "requests": args.requests,
        "input_tokens": args.input_tokens, "max_tokens": args.max_tokens,
    }  # fmt: skip
    rows: list[dict[str, Any]] = []
    index = 0
    for kind in servers:
        with running_server(kind, out / f"{kind}.log") as server:
            for rnd in range(args.trials):
                k = rnd % len(clients)
                for client, sched in [*clients[k:], *clients[:k]]:
                    prompts = trial_prompts(all_prompts, out, index, args.requests)
                    index += 1
                    row = trial(server, kind, client, rnd, prompts, out, args, sched)
                    rows.append(row)
                    print(json.dumps({k: row.get(k) for k in ("server", "client", "sched",
                          "round", "ttft_ms", "failed", "client_run_delay_s")}), file=sys.stderr,
                          flush=True)  # fmt: skip
                    (out / "tails.json").write_text(json.dumps({"meta": meta, "trials": rows}))
    table = render(rows, meta)
    (out / "tails.md").write_text(table)
    print(table)
    print(f"report: {out / 'tails.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
