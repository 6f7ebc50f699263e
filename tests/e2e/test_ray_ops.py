"""Cluster mode under faults and misbehaving clients: one local Ray instance (CPU, demo
model, 2 replicas), driven from the test process with Ray Serve's own API, for the whole
module, in this order:

1. traces cross Ray's proxy: the caller's `traceparent` reaches the replica's span;
2. 32 streams that stop reading and 2,000 idle keep-alive connections at Ray's proxy;
3. one replica's engine process is killed under load: its in-flight requests end with
   `engine_dead`, Ray replaces it, the other replica keeps serving, requests sent after
   the kill succeed within a bounded retry window;
4. redeploy with a changed setting under load (Ray's rolling update): 0 failed requests;
5. scale down under load (the autoscaler, after that redeploy allows 1 replica): the
   stopping replica drains within the drain timeout, 0 lost accepted requests.

Figures (failed requests, recovery and drain times, memory, TPOT) are printed.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import psutil
import pytest

from tests.conftest import free_port
from tests.e2e.ray_app import RAY_TEST_ENV
from tests.otlp_receiver import OTLPReceiver
from tests.ray_load import Load, Outcome
from tests.slow_clients import (
    STALLED_BODY,
    IdleConnections,
    ensure_fd_limit,
    latencies,
    median_tpot,
    stall,
)

pytestmark = [pytest.mark.ray, pytest.mark.timeout(1500)]

APP = "codellama"
DEPLOYMENT = "CodeLlamaServer"
RETRY_WINDOW_S = 10.0  # a client retrying 503s this long after the kill always gets through
DRAIN_TIMEOUT_S = 20.0
MIB = 1 << 20
OTEL_ENV = {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf", "OTEL_BSP_SCHEDULE_DELAY": "200"}
# With the other Ray e2e apps' settings: replicas report autoscaling metrics every second
# (not Ray's 10 s), so the scale-down acts within its own delay (the look-back is 2 s);
# the direct-ingress drain period does not apply behind Ray's proxy.
RAY_ENV = {**OTEL_ENV, **RAY_TEST_ENV}


def app_settings(receiver: OTLPReceiver, **ray: Any) -> dict[str, Any]:
    return {
        "engine": {"model": "demo", "max_num_seqs": 8},
        "server": {"drain_timeout_s": DRAIN_TIMEOUT_S},
        "tracing": {"otlp_traces_endpoint": receiver.endpoint},
        "ray": {
            "ray_metrics_port": None,  # two replicas on one node: no fixed port
            "min_replicas": 2, "initial_replicas": 2, "max_replicas": 2,
            "health_check_period_s": 1.0, "health_check_timeout_s": 5.0,
            "upscale_delay_s": 2.0, "downscale_delay_s": 4.0, "autoscaling_look_back_s": 2.0,
            **ray,
        },
    }  # fmt: skip


class Cluster:
    """The local Ray instance and our application on it."""

    def __init__(self, receiver: OTLPReceiver) -> None:
        import ray
        from ray import serve

        self.receiver = receiver
        self.port = free_port()
        # Ray's processes (and so the replicas) inherit the environment of this driver.
        self._saved_env = {k: os.environ.get(k) for k in RAY_ENV}
        os.environ.update(RAY_ENV)
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def deploy(self, settings: dict[str, Any]) -> None:
        from ray import serve

        from engine.ray_serve import build_app

        serve.run(build_app({"settings": settings}), name=APP, route_prefix="/", blocking=False)

    def replicas(self) -> list[dict[str, Any]]:
        """Ray Serve's view of the replicas: replica_id, state, pid."""
        from ray.serve.context import _get_global_client

        details = _get_global_client().get_serve_details()
        app = details.get("applications", {}).get(APP)
        if not app or DEPLOYMENT not in app["deployments"]:
            return []
        return app["deployments"][DEPLOYMENT]["replicas"]

    def states(self) -> Counter[str]:
        return Counter(r["state"] for r in self.replicas())

    def wait(self, what: str, ok: Callable[[], bool], timeout: float) -> float:
        started = time.monotonic()
        while not ok():
            assert time.monotonic() - started < timeout, f"{what}: {self.replicas()}"
            time.sleep(0.25)
        return time.monotonic() - started

    def running(self, n: int) -> bool:
        states = self.states()
        return states.get("RUNNING", 0) == n and sum(states.values()) == n

    def engine_core(self, replica_pid: int) -> psutil.Process:
        for child in psutil.Process(replica_pid).children(recursive=True):
            if _name(child).startswith("VLLM::EngineCor"):
                return child
        raise AssertionError(f"no engine core under replica {replica_pid}")

    def proxy_rss_mib(self) -> float:
        return sum(p.memory_info().rss for p in _ray_processes("ProxyActor")) / MIB

    def close(self) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            for k, v in self._saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.Error:
        return ""


def _ray_processes(title: str) -> list[psutil.Process]:
    out = []
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if title in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


@pytest.fixture(scope="module")
def receiver() -> Iterator[OTLPReceiver]:
    r = OTLPReceiver()
    try:
        yield r
    finally:
        r.close()


@pytest.fixture(scope="module")
def cluster(receiver: OTLPReceiver) -> Iterator[Cluster]:
    c = Cluster(receiver)
    try:
        started = time.monotonic()
        c.deploy(app_settings(receiver))  # serve.run returns once the app is ready
        c.wait("2 replicas running", lambda: c.running(2), timeout=420)
        print(f"\n2 replicas running {time.monotonic() - started:.0f} s after the deploy began")
        yield c
    finally:
        c.close()


# ---------------------------------------------------------------- 1. tracing


def test_the_callers_trace_crosses_the_proxy(cluster):
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    r = httpx.post(
        cluster.url + "/v1/completions", json={"prompt": "x", "max_tokens": 4},
        headers={"traceparent": f"00-{trace_id}-{parent}-01"}, timeout=60,
    )  # fmt: skip
    assert r.status_code == 200
    spans = cluster.receiver.wait_for(lambda s: s.trace_id == trace_id and s.kind == 2)
    assert len(spans) == 1, spans
    (span,) = spans
    assert span.parent_span_id == parent  # Ray's proxy passed the header through unchanged
    assert span.attributes["codellama_serve.replica"] == r.headers["x-codellama-replica"]
    children = {
        s.name for s in cluster.receiver.trace(trace_id) if s.parent_span_id == span.span_id
    }
    assert children == {"admission", "engine.queue", "engine.prefill", "engine.decode"}


# ---------------------------------------------------------------- 2. slow and idle clients


async def _engines_idle(cluster: Cluster, within: float) -> float:
    """Wait until both replicas report no running sequences (their /metrics through the proxy
    reach one replica at random: ask until each answered idle)."""
    started = time.monotonic()
    idle: set[str] = set()
    async with httpx.AsyncClient(base_url=cluster.url, timeout=10) as c:
        while len(idle) < 2:
            assert time.monotonic() - started < within, "engines still busy"
            r = await c.get("/metrics")
            running = next(
                float(line.split()[1]) for line in r.text.splitlines()
                if line.startswith("codellama_serve_requests_running ")
            )  # fmt: skip
            replica = r.headers["x-codellama-replica"]
            if running == 0:
                idle.add(replica)
            else:
                idle.discard(replica)
            await asyncio.sleep(0.2)
    return time.monotonic() - started


async def test_stalled_streams_and_idle_connections_at_the_proxy(cluster):
    alone = await median_tpot(cluster.url, {})
    proxy_before = cluster.proxy_rss_mib()
    body = {**STALLED_BODY, "max_tokens": 400}
    sockets = await asyncio.to_thread(stall, 32, "127.0.0.1", cluster.port, {}, body)
    try:
        during = await median_tpot(cluster.url, {})
        peak = proxy_before
        # Ray's proxy takes the replicas' output whether its client reads or not: the stalled
        # generations run to their end in the engines, their output buffered at the proxy.
        done = asyncio.create_task(_engines_idle(cluster, within=180))
        while not done.done():
            peak = max(peak, cluster.proxy_rss_mib())
            await asyncio.sleep(0.25)
        finished = await done
        after = await median_tpot(cluster.url, {})
        proxy_after = cluster.proxy_rss_mib()
    finally:
        for s in sockets:
            s.close()
    print(
        f"\nRay: 32 stalled streams ran to their end {finished:.0f} s after the measurement; "
        f"proxy RSS {proxy_before:.0f} -> peak {peak:.0f} -> {proxy_after:.0f} MiB; "
        f"other streams' median TPOT alone {alone:.2f} ms, beside them {during:.2f} ms "
        f"({during / alone:.2f}x), after {after:.2f} ms ({after / alone:.2f}x)"
    )
    assert peak - proxy_before < 256  # bounded by the streams' whole output
    assert after < 2 * alone

    ensure_fd_limit(2000 + 512)
    before = await latencies(cluster.url, {})
    idle = IdleConnections()
    try:
        await idle.open("127.0.0.1", cluster.port, 2000)
        held = await latencies(cluster.url, {})
        alive = await idle.still_answer("127.0.0.1", sample=50)
    finally:
        await idle.close()
    print(
        f"Ray: 2000 idle keep-alive connections at the proxy: /health median {before[0]:.1f} -> "
        f"{held[0]:.1f} ms, 16-token completion median {before[1]:.0f} -> {held[1]:.0f} ms; "
        f"{alive[0]} of {alive[1]} sampled still answer"
    )
    assert alive[0] == alive[1] >= 40
    assert held[0] < 500 and held[1] < 5000, held


# ---------------------------------------------------------------- 3. an engine dies


def _summary(outcomes: list[Outcome]) -> Counter[str]:
    return Counter("ok" if o.ok else f"{o.status}:{o.error}" for o in outcomes)


async def test_a_killed_engine_fails_its_requests_and_its_replica_is_replaced(cluster):
    load = Load(cluster.url, clients=8, max_tokens=300, retry_window_s=RETRY_WINDOW_S).start()
    try:
        # Both replicas busy before the kill.
        deadline = time.monotonic() + 60
        while len({o.replica for o in load.outcomes if o.ok}) < 2:
            assert time.monotonic() < deadline, _summary(load.outcomes)
            await asyncio.sleep(0.2)
        victim = cluster.replicas()[0]
        survivor = next(r for r in cluster.replicas() if r["replica_id"] != victim["replica_id"])
        before_ids = {r["replica_id"] for r in cluster.replicas()}
        load.retry_after = killed_at = time.monotonic()
        cluster.engine_core(victim["pid"]).kill()

        def replaced() -> bool:
            ids = {r["replica_id"] for r in cluster.replicas() if r["state"] == "RUNNING"}
            return len(ids) == 2 and ids != before_ids

        replaced_s = await asyncio.to_thread(cluster.wait, "replacement", replaced, 300)
        new_id = next(iter({r["replica_id"] for r in cluster.replicas()} - before_ids))
        deadline = time.monotonic() + 60
        while not any(o.ok and o.replica == new_id for o in load.outcomes):
            assert time.monotonic() < deadline, "the new replica served nothing"
            await asyncio.sleep(0.2)
        served_s = max(o.ended for o in load.outcomes if o.replica == new_id) - killed_at
    finally:
        outcomes = await load.stop()

    in_flight = [o for o in outcomes if o.started < killed_at < o.ended]
    on_victim = [o for o in in_flight if o.first_replica == victim["replica_id"]]
    on_survivor = [o for o in in_flight if o.first_replica == survivor["replica_id"]]
    after = [o for o in outcomes if o.started > killed_at]
    fast_failed = [o for o in after if o.attempts > 1]
    failed = [o for o in outcomes if not o.ok]
    longest_end = max(o.ended - killed_at for o in on_victim) if on_victim else 0.0
    print(
        f"\nkill: {len(on_victim)} requests in flight on the killed replica -> "
        f"{dict(_summary(on_victim))} (all ended within {longest_end:.1f} s of the kill); "
        f"{len(on_survivor)} on the other -> {dict(_summary(on_survivor))}\n"
        f"after the kill: {len(after)} requests, {len(fast_failed)} needed retries "
        f"(max {max((o.attempts for o in after), default=1)} attempts, "
        f"{max((o.ended - o.started for o in fast_failed), default=0):.1f} s), "
        f"final outcomes {dict(_summary(after))}\n"
        f"failed requests: {len(failed)} of {len(outcomes)}; replica replaced (RUNNING) "
        f"{replaced_s:.1f} s after the kill, the new replica served within {served_s:.1f} s"
    )
    assert any(not o.ok for o in on_victim), "no request was in flight on the killed replica"
    # Each ended with engine_dead, unless the engine had finished it just before the kill.
    assert all(o.error == "engine_dead" or (o.ok and o.ended - killed_at < 0.5)
               for o in on_victim), _summary(on_victim)  # fmt: skip
    assert longest_end < 30, "an in-flight request hung after its engine died"
    assert all(o.ok for o in on_survivor), _summary(on_survivor)
    assert all(o.ok for o in after), _summary(after)
    assert {id(o) for o in failed} <= {id(o) for o in on_victim}, _summary(failed)


# ---------------------------------------------------------------- 4, 5. redeploy, scale down


def _drain_watch(cluster: Cluster, stopping_since: dict[str, float], drained: dict[str, float]):
    now = time.monotonic()
    replicas = {r["replica_id"]: r["state"] for r in cluster.replicas()}
    for rid, state in replicas.items():
        if state == "STOPPING":
            stopping_since.setdefault(rid, now)
    for rid, since in stopping_since.items():
        if rid not in replicas and rid not in drained:
            drained[rid] = now - since


async def test_a_rolling_update_then_a_scale_down_under_load_fail_nothing(cluster):
    """One load throughout: 3 clients, and 5 more during the update (8 clients want
    8 / 6.4 = 2 replicas at 80% of max_num_seqs, 3 want 1)."""
    before_ids = {r["replica_id"] for r in cluster.replicas()}
    steady = Load(cluster.url, clients=3, max_tokens=300).start()
    extra = Load(cluster.url, clients=5, max_tokens=200).start()
    try:
        await asyncio.sleep(2)
        updating = time.monotonic()
        # A changed setting, and replica bounds that let the autoscaler scale down after.
        changed = app_settings(cluster.receiver, min_replicas=1)
        changed["server"]["request_timeout_s"] = 300.0
        # serve.run returns once the new version is ready: sometimes before the wait below.
        await asyncio.to_thread(cluster.deploy, changed)

        def updated() -> bool:
            ids = {r["replica_id"] for r in cluster.replicas()}
            return cluster.running(2) and not ids & before_ids

        await asyncio.to_thread(cluster.wait, "rolling update", updated, 600)
        update_s = time.monotonic() - updating
        await extra.stop()
        during_update = [o for o in steady.outcomes + extra.outcomes if o.ended >= updating]
        print(f"\nrolling update of 2 replicas under load in {update_s:.0f} s: "
              f"{len(during_update)} requests during it -> "
              f"{dict(_summary(during_update))}")  # fmt: skip

        config = _deployment(cluster)["deployment_config"]
        assert config["graceful_shutdown_timeout_s"] == DRAIN_TIMEOUT_S  # ours, derived
        scaling = time.monotonic()
        stopping_since: dict[str, float] = {}
        drained: dict[str, float] = {}
        deadline = time.monotonic() + 120
        while not drained:
            assert time.monotonic() < deadline, cluster.replicas()
            await asyncio.to_thread(_drain_watch, cluster, stopping_since, drained)
            await asyncio.sleep(0.1)
        await asyncio.sleep(2)
    finally:
        outcomes = await steady.stop() + await extra.stop()
    ((rid, drain_s),) = drained.items()
    during_scale = [o for o in outcomes if o.ended >= scaling]
    print(f"scale down 2 -> 1 under load: the stopping replica drained in {drain_s:.1f} s "
          f"(drain timeout {DRAIN_TIMEOUT_S:g} s); {len(during_scale)} requests during it "
          f"({sum(o.replica == rid for o in during_scale)} on that replica) -> "
          f"{dict(_summary(during_scale))}")  # fmt: skip
    assert all(o.ok for o in outcomes), _summary(outcomes)
    assert any(o.replica == rid and o.ended >= stopping_since[rid] for o in outcomes), (
        "no request was in flight on the stopping replica"
    )
    assert drain_s < DRAIN_TIMEOUT_S + 2
    assert cluster.running(1)


def _deployment(cluster: Cluster) -> dict[str, Any]:
    from ray.serve.context import _get_global_client

    return _get_global_client().get_serve_details()["applications"][APP]["deployments"][DEPLOYMENT]
