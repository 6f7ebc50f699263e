"""Local OpenAI-compatible servers as subprocesses: a free port, the commands of ours and
of vLLM's own server, start, wait until ready, stop. For the experiments and the tests.

A server started in its own session (`own_session`) is stopped with its whole process
group, and whatever of its session is left is killed: its engine process goes with it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from engine.config import DEMO_MAX_MODEL_LEN, DEMO_MODEL_NAME

READY_TIMEOUT_S = 300
LOG_TAIL_CHARS = 4000  # of the server's log, in the error when it does not come up


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(port: int, *args: str) -> list[str]:
    """`codellama-serve serve` on 127.0.0.1:<port> (the demo model unless args say otherwise)."""
    return [sys.executable, "-m", "engine", "serve", "--port", str(port), *args]


def vllm_command(model_path: str, port: int, *args: str) -> list[str]:
    """vLLM's own OpenAI server on a local model, under the demo model's served name."""
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path,
        "--served-model-name", DEMO_MODEL_NAME, "--port", str(port), *args,
    ]  # fmt: skip


def server_command(kind: str, port: int) -> tuple[list[str], dict[str, str], str]:
    """(argv, extra env, readiness path) of a server on the demo model: ours or vLLM's."""
    if kind == "ours":
        return serve_command(port), {}, "/ready"
    from engine.demo_model import ensure_demo_model

    argv = vllm_command(
        str(ensure_demo_model()), port,
        "--enforce-eager", "--max-model-len", str(DEMO_MAX_MODEL_LEN),
    )  # fmt: skip
    return argv, {"VLLM_CPU_KVCACHE_SPACE": "1"}, "/health"


@dataclass
class ServerProcess:
    """A server subprocess listening on 127.0.0.1:<port>, its output in log_path."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    ready_path: str = "/ready"
    ready_timeout: float = READY_TIMEOUT_S
    own_session: bool = False  # started with start_new_session

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return self.base_url + "/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float | None = None, path: str | None = None) -> None:
        """Until GET <path> (default: ready_path) answers 200; raise if it exits or times out."""
        timeout = self.ready_timeout if timeout is None else timeout
        url = self.base_url + (path or self.ready_path)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the server exited with {self.proc.returncode}:\n"
                    f"{self.log()[-LOG_TAIL_CHARS:]}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            time.sleep(0.5)
        raise RuntimeError(
            f"the server was not ready after {timeout} s (log: {self.log_path}):\n"
            f"{self.log()[-LOG_TAIL_CHARS:]}"
        )

    def metric(self, name: str) -> float:
        """The value of an unlabelled series in the server's /metrics."""
        text = httpx.get(self.base_url + "/metrics", timeout=5).text
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, wait, then SIGKILL; its exit code.

        In its own session the signals go to its process group, and whatever of the
        session is left afterwards is killed (Ray puts its workers in process groups
        of their own, and an engine whose parent was killed can outlive it).
        """
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait()
        if self.own_session:
            _kill_session(self.proc.pid)
        return self.proc.returncode

    def _signal(self, sig: signal.Signals) -> None:
        if self.own_session:
            os.killpg(os.getpgid(self.proc.pid), sig)
        else:
            self.proc.send_signal(sig)


def _kill_session(sid: int) -> None:
    for pid in psutil.pids():  # started with start_new_session: its session id is its pid
        with contextlib.suppress(OSError):
            if pid != os.getpid() and os.getsid(pid) == sid:
                os.kill(pid, signal.SIGKILL)


def launch(
    argv: list[str],
    port: int,
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    own_session: bool = False,
    ready_path: str = "/ready",
    ready_timeout: float = READY_TIMEOUT_S,
) -> ServerProcess:
    """Start `argv` (listening on `port`), output to log_path; the caller waits and stops it."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            argv, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})}, start_new_session=own_session,
        )  # fmt: skip
    return ServerProcess(proc, port, log_path, ready_path, ready_timeout, own_session)


def start_and_wait(
    argv: list[str],
    port: int,
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    ready_path: str = "/ready",
    ready_timeout: float = READY_TIMEOUT_S,
) -> ServerProcess:
    """Start `argv` in its own session and wait until `ready_path` answers 200.

    If it does not come up it is stopped, and the error is raised.
    """
    server = launch(
        argv, port, log_path, env=env, own_session=True, ready_path=ready_path,
        ready_timeout=ready_timeout,
    )  # fmt: skip
    print(
        f"[local_servers] waiting for {server.base_url}{ready_path} (log: {log_path})",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def running_server(kind: str, log_path: Path, port: int | None = None) -> Iterator[ServerProcess]:
    """A server on the demo model (ours or vLLM's) for the duration of the block."""
    port = port or free_port()
    argv, env, ready = server_command(kind, port)
    server = start_and_wait(argv, port, log_path, env=env, ready_path=ready)
    try:
        yield server
    finally:
        server.stop()
