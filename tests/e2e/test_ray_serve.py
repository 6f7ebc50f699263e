"""Cluster mode on a local Ray instance (CPU, demo model), through `codellama-serve serve --ray`.

One application for the module: it starts with 2 replicas (both must answer,
streaming included), scales down to 1 when idle, up to 2 under a load step,
and back to 1 when the load ends. Each transition's time is printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import yaml

from tests.conftest import ROOT, free_port

pytestmark = [pytest.mark.ray, pytest.mark.timeout(1200)]

REPLICAS = re.compile(r"^(\S+ \S+) INFO engine\.ray: replicas: (.*)$")


class RayApp:
    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        config = {
            "engine": {"model": "demo", "max_num_seqs": 8},
            "ray": {
                "ray_http_port": self.port,
                "ray_metrics_port": None,
                "min_replicas": 1,
                "initial_replicas": 2,
                "max_replicas": 2,
                "upscale_delay_s": 2.0,
                # Long enough that the light, sequential routing tests keep both
                # replicas (the load guard needs two); the idle step below waits it out.
                "downscale_delay_s": 30.0,
                "autoscaling_look_back_s": 3.0,
                "target_waiting_per_replica": 2.0,
            },
        }
        cfg = tmp / "ray.yaml"
        cfg.write_text(yaml.safe_dump(config))
        self.log_path = tmp / "ray-serve.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "engine", "serve", "--ray", "--config", str(cfg)],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # its session holds Ray's processes, orphans included
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


@pytest.fixture(scope="module")
def ray_app(tmp_path_factory):
    app = RayApp(tmp_path_factory.mktemp("ray"))
    try:
        app.wait_running(2, timeout=420)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(app.url + "/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, app.log()[-3000:]
            time.sleep(0.5)
        yield app
    finally:
        if app.proc.poll() is None:
            app.proc.terminate()
            try:
                code = app.proc.wait(90)
            except subprocess.TimeoutExpired:
                app.proc.kill()
                code = None
            print(f"`serve --ray` exited with {code}")
        _kill_session(app.proc.pid)


def _kill_session(sid: int) -> None:
    """Kill what is left in `serve --ray`'s session: Ray's processes and engines that
    this test started, and no one else's (`ray stop` would stop every Ray on the machine)."""
    left = [p for p in psutil.process_iter() if _sid(p.pid) == sid]
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(left, timeout=30)


def test_both_replicas_answer_through_the_openai_client(ray_app):
    client = openai.OpenAI(base_url=ray_app.url + "/v1", api_key="unused", max_retries=0)

    def plain(_: int) -> str:
        raw = client.completions.with_raw_response.create(
            model="codellama-serve-demo", prompt="def f():", max_tokens=32, temperature=0
        )
        assert raw.parse().choices[0].text
        return raw.headers["x-codellama-replica"]

    def streamed(_: int) -> str:
        with client.chat.completions.with_streaming_response.create(
            model="codellama-serve-demo", messages=[{"role": "user", "content": "hi"}],
            max_tokens=32, stream=True,
        ) as stream:  # fmt: skip
            chunks = list(stream.parse())
            assert chunks[0].choices[0].delta.role == "assistant"
            return stream.headers["x-codellama-replica"]

    # Concurrent requests: Ray's router spreads load, not a sequence of idle calls.
    seen_plain, seen_stream = set(), set()
    with ThreadPoolExecutor(8) as pool:
        for _ in range(5):
            seen_plain.update(pool.map(plain, range(8)))
            seen_stream.update(pool.map(streamed, range(8)))
            if len(seen_plain) == 2 and len(seen_stream) == 2:
                break
    assert len(seen_plain) == 2 and len(seen_stream) == 2, (seen_plain, seen_stream)


def test_errors_and_metrics_behave_as_standalone(ray_app):
    r = httpx.post(ray_app.url + "/v1/completions", json={"prompt": "x", "max_tokens": 99999})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "codellama_serve_requests_total" in httpx.get(ray_app.url + "/metrics").text


# --- routing (the default: HAProxy ingress, engine.ray_router.CodeLlamaRouter) -------------

SOURCE = Path(__file__).read_text()  # a file to "edit": far longer than one 128-token block


def _replica(url: str, body: dict, headers: dict | None = None) -> str:
    r = httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    return r.headers["x-codellama-replica"]


def test_fim_requests_of_one_file_stay_on_one_replica(ray_app):
    """Keystrokes down one file: each request's prefix extends the last one's, so
    they share their leading blocks and go where those blocks are cached."""

    def keystroke(cursor: int) -> dict:
        return {"prompt": SOURCE[:cursor], "suffix": SOURCE[cursor : cursor + 300], "max_tokens": 4}

    seen = {_replica(ray_app.url, keystroke(cursor)) for cursor in range(2500, 3700, 100)}
    assert len(seen) == 1, seen


def test_sessions_stay_on_one_replica(ray_app):
    body = {"prompt": "def f():", "max_tokens": 4}
    for session in ("s1", "s2", "s3"):
        header = {_replica(ray_app.url, body, {"X-Session-Id": session}) for _ in range(6)}
        assert len(header) == 1, (session, header)
    for user in ("u1", "u2"):
        assert len({_replica(ray_app.url, {**body, "user": user}) for _ in range(6)}) == 1


async def _hold_stream(url: str, session: str, seen: list[str], all_seen: asyncio.Event,
                       stop: asyncio.Event) -> None:  # fmt: skip
    # The demo model writes 400 tokens in well under a second on this CPU: streams that
    # short never overlap enough to make a replica busy. 1,500 (of its 2,048) do.
    body = {"prompt": "def busy():", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    async with (
        httpx.AsyncClient(base_url=url, timeout=120) as c,
        c.stream("POST", "/v1/completions", json=body, headers={"X-Session-Id": session}) as r,
    ):
        seen.append(r.headers["x-codellama-replica"])
        if len(seen) == 12:
            all_seen.set()
        async for _ in r.aiter_lines():
            if stop.is_set():
                break


async def test_a_busy_replica_stops_receiving_the_sessions_traffic(ray_app):
    """One session opening many long streams: affinity keeps it on its replica only
    until that replica is routing_max_imbalance (4) requests ahead of the other."""
    seen: list[str] = []
    all_seen, stop = asyncio.Event(), asyncio.Event()
    streams = []
    try:
        for _ in range(12):
            streams.append(
                asyncio.create_task(_hold_stream(ray_app.url, "hot", seen, all_seen, stop))
            )
            await asyncio.sleep(0.3)  # each one in flight before the next is routed
        await asyncio.wait_for(all_seen.wait(), 60)
    finally:
        stop.set()
        await asyncio.gather(*streams, return_exceptions=True)
    assert len(set(seen)) == 2, seen
    assert seen[:5] == [seen[0]] * 5, seen  # affinity first, within the bound


def _ray_metrics() -> str:
    """Ray's metrics endpoint of this machine's node (the fixture's Ray: the lock holds
    off any other)."""
    (port_file,) = Path("/tmp/ray/session_latest").glob("metrics_export_port_*")
    return httpx.get(f"http://127.0.0.1:{port_file.read_text().strip()}/metrics", timeout=10).text


def test_router_decisions_are_ray_metrics(ray_app):
    """The router runs in Ray's ingress router replica: its decisions are exported by
    Ray's metrics agent (with Ray's `ray_` prefix), by reason and load-guard override."""
    deadline = time.monotonic() + 60
    while True:
        text = _ray_metrics()
        series = [
            line for line in text.splitlines()
            if line.startswith("ray_codellama_serve_router_decisions_total{")
        ]  # fmt: skip
        reasons = {
            r for r in ("prefix", "session", "balance") if any(f'reason="{r}"' in s for s in series)
        }
        guarded = any('guard="session"' in s for s in series)
        # Ray's metrics agent exports every few seconds: the busy test's override
        # (just before) may not be out yet.
        if (len(reasons) == 3 and guarded) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert reasons == {"prefix", "session", "balance"}, series
    assert guarded, series  # the busy replica's override


async def _load(url: str, stop: asyncio.Event) -> None:
    body = {"prompt": "def busy():", "max_tokens": 400, "ignore_eos": True, "stream": True}
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        while not stop.is_set():
            async with c.stream("POST", "/v1/completions", json=body) as r:
                async for _ in r.aiter_lines():
                    if stop.is_set():
                        break


async def test_autoscaling_follows_a_load_step(ray_app):
    idle_down = ray_app.wait_running(1, timeout=120)
    print(f"\nidle: 2 -> 1 replicas in {idle_down:.1f} s")
    stop = asyncio.Event()
    load = [asyncio.create_task(_load(ray_app.url, stop)) for _ in range(24)]
    try:
        up = await asyncio.to_thread(ray_app.wait_running, 2, 420)
        print(f"load step (24 streams): 1 -> 2 replicas in {up:.1f} s")
    finally:
        stop.set()
        await asyncio.gather(*load, return_exceptions=True)
    down = ray_app.wait_running(1, timeout=180)
    print(f"load ended: 2 -> 1 replicas in {down:.1f} s")
    # A stopped replica takes its vLLM engine with it.
    deadline = time.monotonic() + 60
    while (engines := ray_app.engine_cores()) != 1:
        assert time.monotonic() < deadline, f"{engines} engine-core processes for 1 replica"
        await asyncio.sleep(1)
