"""Autoscaling in cluster mode on a local Ray instance (CPU, demo model), through
`codellama-serve serve --ray` and engine.ray_autoscaling's policy: one replica at rest,
two under a load step, one again when the load ends, and the stopped replica's vLLM
engine goes with it. Each transition's time is printed.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from .ray_app import serving

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def ray_app(tmp_path_factory):
    config = {
        "engine": {"model": "demo", "max_num_seqs": 8},
        "ray": {
            "min_replicas": 1,
            "initial_replicas": 1,
            "max_replicas": 2,
            "upscale_delay_s": 2.0,
            "downscale_delay_s": 6.0,
            "autoscaling_look_back_s": 3.0,
            "target_waiting_per_replica": 2.0,
        },
    }
    with serving(tmp_path_factory.mktemp("ray-autoscaling"), config, replicas=1) as app:
        yield app


async def _load(c: httpx.AsyncClient, stop: asyncio.Event) -> None:
    # Not streamed: on 2 cores a client reading 24 streams takes CPU from the replica
    # starting up beside the busy one.
    body = {"prompt": "def busy():", "max_tokens": 400, "ignore_eos": True}
    while not stop.is_set():
        r = await c.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text


async def test_autoscaling_follows_a_load_step(ray_app):
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=32)
    async with httpx.AsyncClient(base_url=ray_app.url, timeout=120, limits=limits) as c:
        load = [asyncio.create_task(_load(c, stop)) for _ in range(24)]
        try:
            up = await asyncio.to_thread(ray_app.wait_running, 2, 420)
            print(f"\nload step (24 clients): 1 -> 2 replicas in {up:.1f} s")
        finally:
            stop.set()
            for task in load:  # the requests in flight go too (the engines abort them)
                task.cancel()
            outcomes = await asyncio.gather(*load, return_exceptions=True)
    failed = [o for o in outcomes if o is not None and not isinstance(o, asyncio.CancelledError)]
    assert not failed, failed  # every request before the load ended succeeded
    down = ray_app.wait_running(1, timeout=180)
    print(f"load ended: 2 -> 1 replicas in {down:.1f} s")
    # A stopped replica takes its vLLM engine with it.
    deadline = time.monotonic() + 60
    while (engines := ray_app.engine_cores()) != 1:
        assert time.monotonic() < deadline, f"{engines} engine-core processes for 1 replica"
        await asyncio.sleep(1)
