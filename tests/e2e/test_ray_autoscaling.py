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


async def _load(url: str, stop: asyncio.Event) -> None:
    body = {"prompt": "def busy():", "max_tokens": 400, "ignore_eos": True, "stream": True}
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        while not stop.is_set():
            async with c.stream("POST", "/v1/completions", json=body) as r:
                async for _ in r.aiter_lines():
                    if stop.is_set():
                        break


async def test_autoscaling_follows_a_load_step(ray_app):
    stop = asyncio.Event()
    load = [asyncio.create_task(_load(ray_app.url, stop)) for _ in range(24)]
    try:
        up = await asyncio.to_thread(ray_app.wait_running, 2, 420)
        print(f"\nload step (24 streams): 1 -> 2 replicas in {up:.1f} s")
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
