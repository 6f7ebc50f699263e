"""`codellama-serve serve --ray` as a subprocess on a local Ray instance (CPU, demo model),
for the e2e modules that run one application each.

The process starts in its own session: Ray's processes and the vLLM engines they start
(orphans included) stay in it, so teardown kills exactly those and no other Ray on the
machine (`ray stop` would stop them all).

Behind the HAProxy ingress a stopping replica stays open for Ray's minimum drain period
(RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S, 30 s by default, for load balancers to
deregister it) even when idle; these apps set 5 s, so a scale-down or a teardown does not
wait out the default twice. Their replicas also report autoscaling metrics every second
(RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S, 10 s by default), so the
autoscaler sees a load step within the tests' few-second look-back windows.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from tests.conftest import ROOT, free_port

# Ray's settings for the test apps (the docstring says why); Ray's processes read them
# from the environment they inherit.
RAY_TEST_ENV = {
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
}
REPLICAS = re.compile(r"^(\S+ \S+) INFO engine\.ray: replicas: (.*)$")


class RayApp:
    def __init__(self, tmp: Path, config: dict[str, Any]) -> None:
        """`config` is the settings file's content; the HTTP port is chosen here."""
        self.port = free_port()
        ray = {"ray_http_port": self.port, "ray_metrics_port": None, **config.get("ray", {})}
        cfg = tmp / "ray.yaml"
        cfg.write_text(yaml.safe_dump({**config, "ray": ray}))
        self.log_path = tmp / "ray-serve.log"
        env = {**os.environ, **RAY_TEST_ENV}
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "engine", "serve", "--ray", "--config", str(cfg)],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def running(self) -> int | None:
        """RUNNING replicas per the last 'replicas:' line the CLI logged."""
        last = None
        for line in self.log().splitlines():
            m = REPLICAS.match(line)
            if m:
                states = dict(kv.split("=") for kv in m.group(2).split())
                last = int(states.get("RUNNING", 0))
        return last

    def engine_cores(self) -> int:
        """vLLM engine-core processes in the session of `serve --ray`: under Ray's
        workers, or orphaned by one."""
        # /proc's comm holds 15 characters: "VLLM::EngineCor".
        return sum(
            1 for p in psutil.process_iter()
            if _sid(p.pid) == self.proc.pid and _name(p).startswith("VLLM::EngineCor")
        )  # fmt: skip

    def wait_running(self, n: int, timeout: float) -> float:
        started = time.monotonic()
        while self.running() != n:
            assert self.proc.poll() is None, self.log()[-4000:]
            assert time.monotonic() - started < timeout, (
                f"never reached {n} running replicas:\n{self.log()[-3000:]}"
            )
            time.sleep(0.5)
        return time.monotonic() - started

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(self.url + "/ready", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, self.log()[-3000:]
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                code = self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                code = None
            print(f"`serve --ray` exited with {code}")
        left = [p for p in psutil.process_iter() if _sid(p.pid) == self.proc.pid]
        for p in left:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(left, timeout=30)


@contextlib.contextmanager
def serving(tmp: Path, config: dict[str, Any], replicas: int) -> Iterator[RayApp]:
    """The application, once `replicas` replicas run and it answers /ready."""
    app = RayApp(tmp, config)
    try:
        app.wait_running(replicas, timeout=420)
        app.wait_ready()
        yield app
    finally:
        app.stop()


def _name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.Error:
        return ""


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None
