"""Slow and idle clients against the real server (standalone): 32 streams that stop
reading mid-generation are aborted in the engine after the write timeout and their
connections closed, with the server's memory bounded and other streams' time per output
token back to normal; 2,000 idle keep-alive connections leave /health and completions
prompt. Figures are printed; only what cannot be noise is asserted."""

from __future__ import annotations

import asyncio
import time

import psutil
import pytest

from tests.integration.conftest import SEND_BUFFER_BYTES, WRITE_TIMEOUT_S, OpsServer, auth
from tests.slow_clients import (
    IdleConnections,
    closed_by_server,
    ensure_fd_limit,
    latencies,
    median_tpot,
    stall,
)

pytestmark = pytest.mark.timeout(300)

STALLED = 32
IDLE = 2000
WRITE_TIMEOUTS = 'codellama_serve_requests_aborted_total{reason="write_timeout"}'
MIB = 1 << 20


def _labelled(ops: OpsServer, series: str) -> float:
    import httpx

    for line in httpx.get(ops.base_url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[1])
    return 0.0


def _rss(ops: OpsServer) -> tuple[float, float]:
    """(server process, engine core and other children) resident memory, MiB."""
    proc = psutil.Process(ops.server.proc.pid)
    children = sum(c.memory_info().rss for c in proc.children(recursive=True))
    return proc.memory_info().rss / MIB, children / MIB


async def test_stalled_streams_are_aborted_after_the_write_timeout(ops):
    port = ops.server.port
    alone = await median_tpot(ops.base_url, auth())
    rss_before = _rss(ops)
    aborted_before = _labelled(ops, WRITE_TIMEOUTS)

    started = time.monotonic()
    sockets = await asyncio.to_thread(stall, STALLED, "127.0.0.1", port, auth())
    try:
        during = await median_tpot(ops.base_url, auth())  # beside 32 stalled generations
        peak = rss_before
        deadline = time.monotonic() + 120
        while _labelled(ops, WRITE_TIMEOUTS) - aborted_before < STALLED:
            assert time.monotonic() < deadline, "stalled streams were not aborted"
            peak = max(peak, _rss(ops), key=lambda r: r[0])
            await asyncio.sleep(0.2)
        aborted_after = time.monotonic() - started
        assert _labelled(ops, WRITE_TIMEOUTS) - aborted_before == STALLED
        # Aborted in the engine while their clients still hold the sockets open.
        assert ops.server.metric("codellama_serve_requests_running") == 0
        after = await median_tpot(ops.base_url, auth())
        rss_after = _rss(ops)
        closed = sum(
            await asyncio.gather(*(asyncio.to_thread(closed_by_server, s) for s in sockets))
        )
    finally:
        for s in sockets:
            s.close()
    print(
        f"\n{STALLED} stalled streams (write timeout {WRITE_TIMEOUT_S:g} s, send buffer "
        f"{SEND_BUFFER_BYTES} B): all aborted {aborted_after:.1f} s after they started; "
        f"{closed} connections closed by the server\n"
        f"server RSS MiB (frontend, engine): before {rss_before[0]:.0f}, {rss_before[1]:.0f}; "
        f"peak {peak[0]:.0f}, {peak[1]:.0f}; after {rss_after[0]:.0f}, {rss_after[1]:.0f}\n"
        f"other streams' median TPOT: alone {alone:.2f} ms, beside the stalled ones "
        f"{during:.2f} ms ({during / alone:.2f}x), after their abort {after:.2f} ms "
        f"({after / alone:.2f}x)"
    )
    assert closed == STALLED
    # Bounded: the frontend holds nothing per stalled stream beyond its socket buffers.
    assert peak[0] - rss_before[0] < 256, (rss_before, peak)
    # With the stalled generations gone the engine runs only the measured streams again.
    assert after < 2 * alone, (alone, after)


async def test_idle_keep_alive_connections_leave_the_server_prompt(ops):
    ensure_fd_limit(IDLE + 512)
    before = await latencies(ops.base_url, auth())
    idle = IdleConnections()
    try:
        opened = time.monotonic()
        await idle.open("127.0.0.1", ops.server.port, IDLE)
        opened = time.monotonic() - opened
        held = await latencies(ops.base_url, auth())
        alive = await idle.still_answer("127.0.0.1", sample=50)
    finally:
        await idle.close()
    print(
        f"\n{IDLE} idle keep-alive connections (opened in {opened:.1f} s): /health median "
        f"{before[0]:.1f} -> {held[0]:.1f} ms, 16-token completion median {before[1]:.0f} -> "
        f"{held[1]:.0f} ms; {alive[0]} of {alive[1]} sampled still answer on their own socket"
    )
    assert alive[0] == alive[1] >= 40, alive  # the server kept them open
    assert held[0] < 500 and held[1] < 5000, held  # promptly, on any machine
