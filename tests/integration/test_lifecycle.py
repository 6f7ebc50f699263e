"""Graceful drain on SIGTERM and engine failure, each on its own real server."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import psutil

from tests.conftest import ServerProcess, start_server

LONG = {"prompt": "def run():", "max_tokens": 300, "ignore_eos": True, "stream": True}


async def _stream_all(c: httpx.AsyncClient, started: asyncio.Event, counter: list[int]) -> str:
    async with c.stream("POST", "/v1/completions", json=LONG) as r:
        assert r.status_code == 200
        body = []
        async for line in r.aiter_lines():
            if not body:
                counter.append(1)
                if len(counter) == 12:
                    started.set()
            body.append(line)
        return "\n".join(body)


async def test_sigterm_drains_accepted_requests_then_exits_0(tmp_path):
    srv = start_server(tmp_path, "--drain-timeout-s", "60")
    try:
        srv.wait_ready()
        started, counter = asyncio.Event(), []
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=srv.base_url, timeout=120, limits=limits) as c:
            streams = [asyncio.create_task(_stream_all(c, started, counter)) for _ in range(12)]
            await asyncio.wait_for(started.wait(), 60)
            srv.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            ready = await c.get("/ready")
            assert ready.status_code == 503 and ready.json()["status"] == "draining"
            refused = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "draining"
            assert refused.headers["retry-after"]
            bodies = await asyncio.gather(*streams)
        for body in bodies:  # every accepted request ran to its end
            assert body.rstrip().endswith("data: [DONE]")
            assert '"finish_reason":"length"' in body and 'data: {"error"' not in body
        assert srv.proc.wait(60) == 0, srv.log()[-3000:]
    finally:
        srv.stop()


def _engine_core(srv: ServerProcess) -> psutil.Process:
    for child in psutil.Process(srv.proc.pid).children(recursive=True):
        if "EngineCore" in " ".join(child.cmdline()) or "EngineCore" in child.name():
            return child
    raise AssertionError("no EngineCore process found")


async def test_engine_death_fails_requests_and_exits_non_zero(tmp_path):
    srv = start_server(tmp_path)
    try:
        srv.wait_ready()
        async with httpx.AsyncClient(base_url=srv.base_url, timeout=60) as c:
            body = {**LONG, "max_tokens": 1900}
            async with c.stream("POST", "/v1/completions", json=body) as r:
                lines = r.aiter_lines()
                await anext(lines)
                plain = asyncio.create_task(
                    c.post("/v1/completions", json={**body, "stream": False})
                )
                await asyncio.sleep(0.3)
                _engine_core(srv).kill()
                rest = [line async for line in lines if line]
            assert any('"engine_dead"' in line for line in rest), rest[-3:]
            assert rest[-1] == "data: [DONE]"
            r = await plain
            assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        started = time.monotonic()
        code = srv.proc.wait(30)
        assert code != 0
        print(f"process exited with {code} {time.monotonic() - started:.1f} s after the failure")
    finally:
        srv.stop()
