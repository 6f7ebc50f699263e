"""Start a fresh server on the demo model, benchmark it with a profile, stop it.

    python -m benchmarks.experiments.serve_and_bench [PROFILE] [--out DIR]
        [--server ours|vllm] [BENCH FLAGS]

What `make bench` runs. The server gets a free port and its own process
group (so its engine process is stopped with it), its log goes next to the
report, and it is stopped however the benchmark ends.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

READY_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(kind: str, port: int) -> tuple[list[str], dict[str, str], str]:
    """(argv, extra env, readiness path) of a server on the demo model."""
    if kind == "ours":
        return [sys.executable, "-m", "engine", "serve", "--port", str(port)], {}, "/ready"
    from engine.demo_model import ensure_demo_model

    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(ensure_demo_model()), "--served-model-name", "codellama-serve-demo",
        "--port", str(port), "--enforce-eager", "--max-model-len", "2048",
    ]  # fmt: skip
    return argv, {"VLLM_CPU_KVCACHE_SPACE": "1"}, "/health"


@dataclass
class ServerProcess:
    """A server started in its own process group (so its engine goes with it)."""

    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, path: str, timeout: float = READY_TIMEOUT_S) -> None:
        _wait_ready(self.proc, self.url + path, self.log_path, timeout)

    def stop(self, timeout: float = 60) -> None:
        _stop(self.proc, timeout)


def start_server(
    argv: list[str],
    env: dict[str, str],
    ready_path: str,
    log_path: Path,
    port: int,
    ready_timeout: float = READY_TIMEOUT_S,
) -> ServerProcess:
    """Start `argv` (listening on `port`) and wait until `ready_path` answers 200."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env},
            start_new_session=True,  # its own process group: the engine core goes with it
        )  # fmt: skip
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", log_path)
    try:
        server.wait_ready(ready_path, ready_timeout)
    except BaseException:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def running_server(kind: str, log_path: Path, port: int | None = None) -> Iterator[ServerProcess]:
    """A server on the demo model for the duration of the block."""
    port = port or free_port()
    argv, env, ready = server_command(kind, port)
    server = start_server(argv, env, ready, log_path, port)
    try:
        yield server
    finally:
        server.stop()


def _wait_ready(
    proc: subprocess.Popen[bytes], url: str, log_path: Path, timeout: float = READY_TIMEOUT_S
) -> None:
    deadline = time.monotonic() + timeout
    print(f"[serve_and_bench] waiting for {url} (log: {log_path})", file=sys.stderr, flush=True)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{tail}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"the server was not ready after {timeout} s (log: {log_path})")


def _stop(proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """SIGTERM its process group, wait, then SIGKILL whatever of its session is left
    (Ray puts its workers in process groups of their own, and an engine whose
    parent was killed can outlive it)."""
    if proc.poll() is None:
        pgid = os.getpgid(proc.pid)
        os.killpg(pgid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            proc.wait()
    for pid in psutil.pids():  # started with start_new_session: its session id is its pid
        with contextlib.suppress(OSError):
            if pid != os.getpid() and os.getsid(pid) == proc.pid:
                os.kill(pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
        epilog="Any other flag goes to `codellama-serve bench run` (e.g. --rate 4 --duration 20).",
    )
    p.add_argument("profile", nargs="?", default="default")
    p.add_argument("--out", type=Path, help="report directory (default results/bench/<time>)")
    p.add_argument("--server", choices=["ours", "vllm"], default="ours")
    p.add_argument("--port", type=int, default=None)
    args, extra = p.parse_known_args(argv)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or Path("results") / "bench" / stamp
    from engine.cli import main as cli_main

    with running_server(args.server, out / "server.log", args.port) as server:
        code = cli_main(
            ["bench", "run", args.profile, "--base-url", server.url, "--out", str(out), *extra]
        )
    print(f"[serve_and_bench] report in {out}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
