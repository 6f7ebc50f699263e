"""Interleaved trials of the harness against server targets, as parity and Ray modes run
them: the load configs, one engine setting for every target, a trial (one harness run in a
process of its own, plus the CPU seconds of the target's processes from /proc), the
rotating order of rounds, and the medians and ratios of the report."""

from __future__ import annotations

import datetime as dt
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypedDict

from benchmarks.cli import harness_command
from benchmarks.experiments.local_servers import (
    ServerProcess,
    free_port,
    serve_command,
    start_and_wait,
)
from engine.config import DEMO_MAX_MODEL_LEN, DEMO_MODEL

ROOT = Path(__file__).resolve().parents[2]
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class LoadConfig:
    name: str
    concurrency: int
    stream: bool
    requests: int = 256
    input_tokens: int = 32
    output_tokens: int = 128


class EngineSettings(TypedDict):
    max_model_len: int
    max_num_seqs: int
    seed: int
    kv_cache_gib: int
    dtype: str


# The same engine settings for every target (our defaults on the demo model).
# float32 is what our server picks for the demo model (vLLM's "auto" would be bfloat16).
ENGINE: EngineSettings = {
    "max_model_len": DEMO_MAX_MODEL_LEN, "max_num_seqs": 256, "seed": 0, "kv_cache_gib": 1,
    "dtype": "float32",
}  # fmt: skip


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (its threads included), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


@dataclass
class Trial:
    target: str
    config: str
    round: int
    output_tok_s: float
    median_ttft_ms: float | None
    p99_ttft_ms: float | None
    median_tpot_ms: float | None
    output_tokens: int
    failed: int
    frontend_cpu_s: float
    engine_cpu_s: float
    client_cpu_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    def per_token(self, cpu: float) -> float:
        return cpu / self.output_tokens if self.output_tokens else float("nan")


# ---------------------------------------------------------------- targets


class ServerTarget:
    """An OpenAI-compatible server in its own process group."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], port: int, log: Path):
        self.name, self.argv, self.env, self.port, self.log_path = name, argv, env, port, log
        self.server: ServerProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start it and wait until it serves."""
        self.server = start_and_wait(
            self.argv, self.port, self.log_path, env=self.env, ready_path="/v1/models"
        )

    def cpu(self) -> tuple[float, float]:
        """(frontend, engine) CPU seconds: the server process, and its children."""
        assert self.server is not None
        pid = self.server.pid
        return cpu_seconds(pid), sum(map(cpu_seconds, descendants(pid)))

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


def ours(log_dir: Path, name: str = "ours") -> ServerTarget:
    port = free_port()
    cmd = serve_command(
        port, "--model", DEMO_MODEL,
        "--max-model-len", str(ENGINE["max_model_len"]),
        "--max-num-seqs", str(ENGINE["max_num_seqs"]),
        "--seed", str(ENGINE["seed"]), "--cpu-kvcache-space-gib", str(ENGINE["kv_cache_gib"]),
        # The queue bound must not refuse the 256-stream config's requests.
        "--max-waiting-requests", "256",
    )  # fmt: skip
    return ServerTarget(name, cmd, {}, port, log_dir / f"{name}.log")


# ---------------------------------------------------------------- trials


def export_prompts(cfg: LoadConfig, out: Path) -> Path:
    """The synthetic prompts every target gets (the harness's own generator)."""
    path = out / f"prompts-{cfg.input_tokens}.jsonl"
    if not path.exists():
        subprocess.run(
            harness_command(
                "export-dataset", "default", "--dataset", "synthetic",
                "--input-tokens", str(cfg.input_tokens), "--output-tokens", str(cfg.output_tokens),
                "--count", "1024", "--output", str(path),
            ),
            cwd=ROOT, check=True, capture_output=True,
        )  # fmt: skip
    return path


def load_prompts(path: Path) -> list[str]:
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]


class Measurable(Protocol):
    name: str

    @property
    def url(self) -> str: ...

    def cpu(self) -> tuple[float, float]: ...


def server_trial(
    target: Measurable,
    cfg: LoadConfig,
    prompts: Path,
    out: Path,
    rnd: int,
    pin: str | None = None,
    priority: int | None = None,
    extra_args: Sequence[str] = (),
) -> Trial:
    """One harness run against `target`; `extra_args` go to `bench run` (e.g. --temperature)."""
    report_dir = out / f"{cfg.name}-{target.name}-{rnd}"
    cmd = harness_command(
        "run", "--base-url", target.url,
        "--concurrency", str(cfg.concurrency), "--num-requests", str(cfg.requests),
        "--duration", "600", "--dataset", "jsonl", "--dataset-path", str(prompts),
        "--set", "dataset.shuffle=false", "--max-tokens", str(cfg.output_tokens), "--ignore-eos",
        "--stream" if cfg.stream else "--no-stream", "--warmup", "0", "--no-progress",
        "--no-plots", "--no-server-metrics", "--token-check", "never", "--quiet",
        "--out", str(report_dir), *extra_args,
    )  # fmt: skip
    if priority is not None:  # SCHED_FIFO: the client gets a CPU when it has work
        cmd += ["--client-priority", str(priority)]
    if pin:
        cmd = ["taskset", "-c", pin, *cmd]
    fe0, en0 = target.cpu()
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    fe1, en1 = target.cpu()
    r = json.loads((report_dir / "report.json").read_text())
    tokens = r["total_output_tokens"]
    return Trial(
        target=target.name, config=cfg.name, round=rnd,
        output_tok_s=r["output_throughput"], median_ttft_ms=r.get("median_ttft_ms"),
        p99_ttft_ms=r.get("p99_ttft_ms"), median_tpot_ms=r.get("median_tpot_ms"),
        output_tokens=tokens, failed=r["failed"],
        frontend_cpu_s=fe1 - fe0, engine_cpu_s=en1 - en0,
        client_cpu_s=r["client"]["cpu"]["cpu_s"],
    )  # fmt: skip


def rotations(names: Sequence[str], rounds: int) -> Iterator[tuple[int, list[str]]]:
    for rnd in range(rounds):
        k = rnd % len(names)
        yield rnd, [*names[k:], *names[:k]]


# ---------------------------------------------------------------- report


def _median(values: list[float | None]) -> float | None:
    xs = [v for v in values if v is not None]
    return statistics.median(xs) if xs else None


def summarize(trials: list[Trial]) -> dict[str, dict[str, dict[str, float | None]]]:
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for t in trials:
        out.setdefault(t.config, {}).setdefault(t.target, {})
    for cfg, targets in out.items():
        for name in targets:
            mine = [t for t in trials if t.config == cfg and t.target == name]
            targets[name] = {
                "output_tok_s": _median([t.output_tok_s for t in mine]),
                "median_ttft_ms": _median([t.median_ttft_ms for t in mine]),
                "p99_ttft_ms": _median([t.p99_ttft_ms for t in mine]),
                "median_tpot_ms": _median([t.median_tpot_ms for t in mine]),
                "frontend_cpu_ms_per_tok": _median(
                    [t.per_token(t.frontend_cpu_s) * 1e3 for t in mine]
                ),
                "engine_cpu_ms_per_tok": _median([t.per_token(t.engine_cpu_s) * 1e3 for t in mine]),
                "client_cpu_ms_per_tok": _median([t.per_token(t.client_cpu_s) * 1e3 for t in mine]),
                "trials": len(mine),
                "failed": sum(t.failed for t in mine),
            }
    return out


def fmt(v: float | None, spec: str = ",.1f") -> str:
    return "–" if v is None else format(v, spec)


def ratio(a: float | None, b: float | None) -> str:
    return "–" if a is None or not b else f"{a / b:.2f}×"


def results_dir(kind: str) -> Path:
    """results/<kind>/<time> in the repository: where a report goes by default."""
    return ROOT / "results" / kind / dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def run_meta(prog: str, argv: list[str] | None, rounds: int, **extra: Any) -> dict[str, Any]:
    """A report's meta: when, the command, the engine settings, the rounds, then `extra`."""
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": f"{prog} " + " ".join(argv or sys.argv[1:]),
        "engine": ENGINE,
        "rounds": rounds,
        **extra,
    }


def write_report(
    out: Path,
    stem: str,
    trials: list[Trial],
    meta: dict[str, Any],
    render: Callable[[dict[str, Any], dict[str, Any]], str],
) -> None:
    """<stem>.json (settings, medians, every trial) and <stem>.md (the tables), printed."""
    summary = summarize(trials)
    data = {"meta": meta, "summary": summary, "trials": [asdict(t) for t in trials]}
    write_summary(out, stem, data, render(summary, meta))


def write_summary(out: Path, stem: str, data: dict[str, Any], table: str) -> None:
    """<stem>.json (`data`) and <stem>.md (`table`), the table printed."""
    (out / f"{stem}.json").write_text(json.dumps(data, indent=2))
    (out / f"{stem}.md").write_text(table)
    print(table)
    print(f"report: {out / f'{stem}.md'}")
