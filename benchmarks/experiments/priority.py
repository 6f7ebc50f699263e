"""Priority classes (issue 14): does a batch flood still leave editors their latency?

A batch key floods the server (by default 256 streamed requests of 512 tokens kept in
flight, against an engine batch of 128, so half the flood waits in the engine's queue)
while an interactive key runs the editor workload (8 virtual developers, streamed FIM
requests cancelled by the next keystroke). Three modes, interleaved in a rotating order:

- fifo: the flood and the editors on a server with classes off (--scheduling-policy fcfs);
- priority: the same on a server with classes on (--scheduling-policy priority);
- idle: the editors alone (on the classes-on server).

    python -m benchmarks.experiments.priority                  # make priority-bench
    python -m benchmarks.experiments.priority --trials 3 --editor-seconds 30

The flood runs in a process of its own (its event loop must not delay the editors'
clocks); its throughput is the output tokens of the batch requests that ended while the
editors ran, over that time (in a steady flood, requests end at a steady rate). Writes
results/priority/<time>/summary.json (the medians per mode, the ratios against the
issue's targets, every trial) and summary.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import numpy as np

from benchmarks.experiments.local_servers import free_port, serve_command, start_and_wait
from benchmarks.experiments.trials import (
    ENGINE,
    ROOT,
    ServerTarget,
    fmt,
    results_dir,
    rotations,
    run_meta,
    write_summary,
)
from engine.config import DEMO_MODEL

PROG = "python -m benchmarks.experiments.priority"
MODES = ("fifo", "priority", "idle")
FLOOD_MODES = ("fifo", "priority")
BATCH_KEY, EDITOR_KEY = "sk-priority-bench-batch", "sk-priority-bench-editor"
KEYS_FILE = (
    f"{BATCH_KEY} name=batch priority=batch\n{EDITOR_KEY} name=editor priority=interactive\n"
)
USAGE = re.compile(rb'"usage": ?\{')  # not `"usage":null`, which every other chunk has
POLICY = {"fifo": "fcfs", "priority": "priority"}
# The targets: (ratio, bound, "max" or "min").
TARGETS = {
    "priority_p99_vs_fifo_p99": 0.25,  # at most
    "priority_p99_vs_idle_p99": 3.0,  # at most
    "priority_batch_tok_s_vs_fifo": 0.9,  # at least
}
AT_LEAST = {"priority_batch_tok_s_vs_fifo"}
TRIAL_FIELDS = (
    "interactive_ttft_p50_ms",
    "interactive_ttft_p99_ms",
    "interactive_shown_ratio",
    "interactive_shown_latency_p50_ms",
    "interactive_requests",
    "interactive_no_first_token",
    "interactive_server_ttft_p50_ms",
    "interactive_server_ttft_p99_ms",
    "client_loop_lag_p99_ms",
    "batch_output_tok_s",
    "batch_requests_ended",
    "batch_failed",
    "engine_waiting_at_end",
)


@dataclass(frozen=True)
class BenchConfig:
    batch_streams: int = 256
    batch_max_tokens: int = 512
    max_num_seqs: int = 128
    max_waiting_requests: int = 512  # the batch class's share (0.5) must hold the flood
    sessions: int = 8
    editor_seconds: float = 30.0
    flood_warmup_s: float = 10.0  # the flood runs this long before the editors start


# ---------------------------------------------------------------- the flood (a subprocess)


def flood_prompt(i: int) -> str:
    return f"# batch job {i}: a module of helpers\n\ndef helper_{i}(values):\n"


async def _flood_worker(
    session: aiohttp.ClientSession,
    url: str,
    i: int,
    first_tokens: int,
    max_tokens: int,
    until: float,
    records: list[dict[str, Any]],
) -> None:
    """Streamed requests back to back until `until`; the first one shorter, so that the
    flood's requests end staggered (as in a flood that has run for a while)."""
    tokens = first_tokens
    while time.time() < until:
        rec: dict[str, Any] = {"start": time.time(), "first": None, "end": None, "tokens": None}
        records.append(rec)
        body = {
            "prompt": flood_prompt(i), "max_tokens": tokens, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True},
        }  # fmt: skip
        try:
            async with session.post(url, json=body) as r:
                rec["status"] = r.status
                async for raw in r.content:
                    if not raw.startswith(b"data: {"):
                        continue
                    if USAGE.search(raw):  # the last chunk: no choices, the usage
                        rec["tokens"] = json.loads(raw[6:])["usage"]["completion_tokens"]
                    elif rec["first"] is None:
                        rec["first"] = time.time()
            rec["end"] = time.time()
        except aiohttp.ClientError as e:
            rec["error"] = type(e).__name__
            await asyncio.sleep(0.1)
        tokens = max_tokens


async def flood(
    base_url: str, key: str, streams: int, max_tokens: int, seconds: float
) -> list[dict[str, Any]]:
    """`streams` workers until `seconds` have passed or SIGTERM; every request's times."""
    until = time.time() + seconds
    records: list[dict[str, Any]] = []
    firsts = [max(1, max_tokens * (k + 1) // streams) for k in range(streams)]
    random.Random(0).shuffle(firsts)
    headers = {"Authorization": f"Bearer {key}"}
    connector = aiohttp.TCPConnector(limit=streams + 8)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(
        base_url, headers=headers, connector=connector, timeout=timeout
    ) as session:
        workers = [
            _flood_worker(session, "/v1/completions", i, firsts[i], max_tokens, until, records)
            for i in range(streams)
        ]
        tasks = [asyncio.create_task(w) for w in workers]
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        with contextlib.suppress(TimeoutError):  # SIGTERM: the editors are done
            await asyncio.wait_for(stop.wait(), timeout=seconds)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return records


def flood_command(url: str, cfg: BenchConfig, seconds: float, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "benchmarks.experiments.priority", "flood", "--url", url,
        "--key", BATCH_KEY, "--streams", str(cfg.batch_streams),
        "--max-tokens", str(cfg.batch_max_tokens), "--seconds", str(seconds),
        "--out", str(out),
    ]  # fmt: skip


# ---------------------------------------------------------------- summary logic (pure)


def batch_throughput(records: Sequence[Mapping[str, Any]], t0: float, t1: float) -> float:
    """Output tokens of the batch requests that ended in [t0, t1], per second."""
    ended = [r for r in records if r.get("end") and t0 <= r["end"] <= t1 and r.get("tokens")]
    return sum(r["tokens"] for r in ended) / (t1 - t0) if t1 > t0 else 0.0


def editor_figures(editor: Mapping[str, Any]) -> dict[str, Any]:
    """The interactive figures of one editor run, from its report's `editor` section."""
    ttft, shown = editor["ttft_ms"], editor["shown_latency_ms"]
    return {
        "interactive_ttft_p50_ms": ttft["p50"],
        "interactive_ttft_p99_ms": ttft["p99"],
        "interactive_shown_ratio": editor["shown_ratio"],
        "interactive_shown_latency_p50_ms": shown["p50"],
        "interactive_requests": editor["requests_sent"],
        # Cancelled by the next keystroke before any token: their TTFT is unknown (and
        # longer than their life), so the TTFT percentiles leave them out.
        "interactive_no_first_token": editor["cancelled_before_first_token"],
    }


def _median(values: Sequence[float | None]) -> float | None:
    xs = [v for v in values if v is not None]
    return statistics.median(xs) if xs else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def summarize(trials: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Medians per mode over the trials, the ratios the issue sets targets for, and
    whether each target was reached."""
    modes: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        mine = [t for t in trials if t["mode"] == mode]
        if mine:
            modes[mode] = {f: _median([t.get(f) for t in mine]) for f in TRIAL_FIELDS}
            modes[mode]["trials"] = len(mine)
    fifo, prio, idle = (modes.get(m, {}) for m in MODES)
    ratios = {
        "priority_p99_vs_fifo_p99": _ratio(
            prio.get("interactive_ttft_p99_ms"), fifo.get("interactive_ttft_p99_ms")
        ),
        "priority_p99_vs_idle_p99": _ratio(
            prio.get("interactive_ttft_p99_ms"), idle.get("interactive_ttft_p99_ms")
        ),
        "priority_batch_tok_s_vs_fifo": _ratio(
            prio.get("batch_output_tok_s"), fifo.get("batch_output_tok_s")
        ),
        "fifo_p99_vs_idle_p99": _ratio(
            fifo.get("interactive_ttft_p99_ms"), idle.get("interactive_ttft_p99_ms")
        ),
        # The same at the server (the engine's first token, without the client's lag).
        "server_priority_p99_vs_fifo_p99": _ratio(
            prio.get("interactive_server_ttft_p99_ms"), fifo.get("interactive_server_ttft_p99_ms")
        ),
        "server_priority_p99_vs_idle_p99": _ratio(
            prio.get("interactive_server_ttft_p99_ms"), idle.get("interactive_server_ttft_p99_ms")
        ),
    }
    reached: dict[str, bool | None] = {}
    for name, bound in TARGETS.items():
        value = ratios[name]
        reached[name] = (
            None if value is None else (value >= bound if name in AT_LEAST else value <= bound)
        )
    return {
        "modes": {m: modes[m] for m in FLOOD_MODES if m in modes},
        "idle": modes.get("idle", {}),
        "ratios": ratios,
        "targets": {
            n: {"bound": b, "at_least" if n in AT_LEAST else "at_most": True, "reached": reached[n]}
            for n, b in TARGETS.items()
        },
    }


def render(summary: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    modes = summary["modes"]
    rows = [("fifo", modes.get("fifo", {})), ("priority", modes.get("priority", {}))]
    rows.append(("idle", summary["idle"]))
    lines = [
        f"Priority classes {meta['date']} · {meta['command']}",
        "",
        f"Demo model; {meta['config']['batch_streams']} batch streams of "
        f"{meta['config']['batch_max_tokens']} tokens in flight, max_num_seqs "
        f"{meta['config']['max_num_seqs']}, editor {meta['config']['sessions']} sessions for "
        f"{meta['config']['editor_seconds']} s; {meta['rounds']} interleaved rounds, medians.",
        "",
        "| Mode | TTFT p50 (ms) | TTFT p99 (ms) | Server TTFT p50 / p99 (ms) | Shown ratio "
        "| Shown latency p50 (ms) | Editor requests | No first token | Client lag p99 (ms) "
        "| Batch tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in rows:
        lines.append(
            f"| {name} | {fmt(m.get('interactive_ttft_p50_ms'))} | "
            f"{fmt(m.get('interactive_ttft_p99_ms'))} | "
            f"{fmt(m.get('interactive_server_ttft_p50_ms'))} / "
            f"{fmt(m.get('interactive_server_ttft_p99_ms'))} | "
            f"{fmt(m.get('interactive_shown_ratio'), '.3f')} | "
            f"{fmt(m.get('interactive_shown_latency_p50_ms'))} | "
            f"{fmt(m.get('interactive_requests'), ',.0f')} | "
            f"{fmt(m.get('interactive_no_first_token'), ',.0f')} | "
            f"{fmt(m.get('client_loop_lag_p99_ms'))} | "
            f"{fmt(m.get('batch_output_tok_s'))} |"
        )
    lines += ["", "| Ratio | Value | Target | Reached |", "|---|---|---|---|"]
    for name, value in summary["ratios"].items():
        t = summary["targets"].get(name)
        bound = "–" if t is None else ("≥ " if "at_least" in t else "≤ ") + f"{t['bound']}"
        reached = "–" if t is None or t["reached"] is None else ("yes" if t["reached"] else "no")
        lines.append(f"| {name} | {fmt(value, '.3f')} | {bound} | {reached} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- servers and trials


class KeyedServer(ServerTarget):
    """A server behind API keys: ready when /ready (open to probes) says so."""

    def start(self) -> None:
        self.server = start_and_wait(self.argv, self.port, self.log_path, ready_path="/ready")


def server(mode: str, cfg: BenchConfig, keys: Path, log_dir: Path) -> ServerTarget:
    port = free_port()
    argv = serve_command(
        port, "--model", DEMO_MODEL, "--max-model-len", str(ENGINE["max_model_len"]),
        "--max-num-seqs", str(cfg.max_num_seqs), "--seed", str(ENGINE["seed"]),
        "--cpu-kvcache-space-gib", str(ENGINE["kv_cache_gib"]),
        "--max-waiting-requests", str(cfg.max_waiting_requests),
        "--api-keys-file", str(keys), "--scheduling-policy", POLICY[mode],
    )  # fmt: skip
    return KeyedServer(mode, argv, {}, port, log_dir / f"{mode}.log")


def editor_profile(cfg: BenchConfig) -> dict[str, Any]:
    return {"duration_s": cfg.editor_seconds, "load": {"sessions": cfg.sessions}}


async def run_editor(url: str, cfg: BenchConfig) -> dict[str, Any]:
    from benchmarks.harness.api import Target, as_profile, report, run_workload

    profile = as_profile("editor", editor_profile(cfg))
    target = Target(url, api_key=EDITOR_KEY, api_key_label="interactive")
    return report(await run_workload(profile, target), with_requests=False)


def wait_saturated(url: str, cfg: BenchConfig, within: float = 120) -> None:
    """Until the engine's batch is full and part of the flood waits behind it."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        text = httpx.get(url + "/metrics", timeout=5).text
        values = dict(
            line.split()[:2]
            for line in text.splitlines()
            if line.startswith("codellama_serve_requests_")
        )
        running = float(values.get("codellama_serve_requests_running", 0))
        if running >= cfg.max_num_seqs:
            return
        time.sleep(0.5)
    raise RuntimeError(f"the flood did not fill the batch of {cfg.max_num_seqs} in {within} s")


def server_ttfts(log: str, key: str, t0: float, t1: float) -> list[float]:
    """The server's own TTFT (ms) of `key`'s completions that ended in [t0, t1], from its
    access log: where the engine's first token arrived, whatever the client's lag."""
    out = []
    for line in log.splitlines():
        if not line.startswith('{"ts"'):
            continue
        rec = json.loads(line)
        if rec.get("key") == key and rec.get("ttft_ms") is not None and t0 <= rec["ts"] <= t1:
            out.append(rec["ttft_ms"])
    return out


def percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def trial(mode: str, target: ServerTarget, cfg: BenchConfig, out: Path, rnd: int) -> dict:
    """One mode's run: the flood (unless idle) in steady state, then the editors."""
    flood_out = out / f"flood-{mode}-{rnd}.json"
    proc = None
    if mode in FLOOD_MODES:
        seconds = cfg.flood_warmup_s + cfg.editor_seconds + 300  # SIGTERM ends it sooner
        proc = subprocess.Popen(flood_command(target.url, cfg, seconds, flood_out), cwd=ROOT)
        wait_saturated(target.url, cfg)
        time.sleep(cfg.flood_warmup_s)
    try:
        rep = asyncio.run(run_editor(target.url, cfg))
        # The editors' own run (after their corpus and tokenizer are loaded).
        t1 = time.time()
        t0 = t1 - rep["duration"]
        assert target.server is not None
        # The flood still queued in the engine when the editors stopped (0 when idle).
        engine_waiting = target.server.metric("codellama_serve_requests_waiting")
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
    (out / f"editor-{mode}-{rnd}.json").write_text(json.dumps(rep, indent=2))
    assert target.server is not None
    ttfts = server_ttfts(target.server.log(), "editor", t0, t1)
    lag = rep["client"]["loop_lag"]
    result: dict[str, Any] = {
        "mode": mode, "round": rnd, "t0": t0, "t1": t1, **editor_figures(rep["editor"]),
        "interactive_server_ttft_p50_ms": percentile(ttfts, 50),
        "interactive_server_ttft_p99_ms": percentile(ttfts, 99),
        "client_loop_lag_p99_ms": lag.get("p99_ms"),
        "engine_waiting_at_end": engine_waiting,
    }  # fmt: skip
    if proc is not None:
        records = json.loads(flood_out.read_text())
        ended = [r for r in records if r.get("end") and t0 <= r["end"] <= t1]
        result["batch_output_tok_s"] = batch_throughput(records, t0, t1)
        result["batch_requests_ended"] = len(ended)
        result["batch_failed"] = sum(
            1 for r in records if r.get("error") or r.get("status", 200) != 200
        )
    return result


def wait_idle(target: ServerTarget, within: float = 60) -> None:
    """Until the last trial's flood is gone from the engine (its aborts are asynchronous)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        assert target.server is not None
        if target.server.metric("codellama_serve_requests_running") == 0:
            return
        time.sleep(0.5)


# ---------------------------------------------------------------- main


def _flood_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=f"{PROG} flood", description="The batch flood alone.")
    p.add_argument("--url", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    records = asyncio.run(flood(a.url, a.key, a.streams, a.max_tokens, a.seconds))
    a.out.write_text(json.dumps(records))
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    d = BenchConfig()
    p.add_argument("--trials", type=int, default=2, help="interleaved rounds of the 3 modes")
    p.add_argument("--batch-streams", type=int, default=d.batch_streams)
    p.add_argument("--batch-max-tokens", type=int, default=d.batch_max_tokens)
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    p.add_argument("--max-waiting-requests", type=int, default=d.max_waiting_requests)
    p.add_argument("--sessions", type=int, default=d.sessions)
    p.add_argument("--editor-seconds", type=float, default=d.editor_seconds)
    p.add_argument("--flood-warmup-s", type=float, default=d.flood_warmup_s)
    p.add_argument("--out", type=Path, help="report directory (default results/priority/<time>)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["flood"]:
        return _flood_main(args[1:])
    a = parse_args(args)
    # A SIGTERM (a timeout around the run) stops the servers on the way out too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cfg = BenchConfig(
        a.batch_streams, a.batch_max_tokens, a.max_num_seqs, a.max_waiting_requests,
        a.sessions, a.editor_seconds, a.flood_warmup_s,
    )  # fmt: skip
    out = a.out or results_dir("priority")
    out.mkdir(parents=True, exist_ok=True)
    keys = out / "keys"
    keys.write_text(KEYS_FILE)
    servers = {m: server(m, cfg, keys, out) for m in FLOOD_MODES}
    target_of = {
        "fifo": servers["fifo"],
        "priority": servers["priority"],
        "idle": servers["priority"],
    }
    trials: list[dict[str, Any]] = []
    try:
        for s in servers.values():  # one at a time: two engines loading at once on 2 cores
            s.start()
        # Once, not reported: loads the editors' corpus and tokenizer (slow the first time).
        asyncio.run(run_editor(servers["priority"].url, replace(cfg, editor_seconds=3.0)))
        for rnd, order in rotations(MODES, a.trials):
            for mode in order:
                wait_idle(target_of[mode])
                t = trial(mode, target_of[mode], cfg, out, rnd)
                trials.append(t)
                print(
                    f"round {rnd} {mode}: TTFT p50 {fmt(t['interactive_ttft_p50_ms'])} ms, "
                    f"p99 {fmt(t['interactive_ttft_p99_ms'])} ms, shown "
                    f"{fmt(t['interactive_shown_ratio'], '.3f')}, batch "
                    f"{fmt(t.get('batch_output_tok_s'))} tok/s",
                    flush=True,
                )
    finally:
        for s in servers.values():
            s.stop()
    meta = run_meta(PROG, args, a.trials, config=asdict(cfg), model=DEMO_MODEL)
    summary = {"meta": meta, **summarize(trials), "trials": trials}
    write_summary(out, "summary", summary, render(summary, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
