"""Clients that misbehave on purpose, for the slow- and idle-client tests (standalone and
Ray): streams that stop reading, keep-alive connections that sit idle, and the streaming
clients whose time per output token is measured beside them."""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

STALLED_BODY = {"prompt": "def stalled():", "max_tokens": 1900, "ignore_eos": True, "stream": True}


def stalled_stream(host: str, port: int, headers: dict[str, str], body: dict) -> socket.socket:
    """Start a stream and stop reading once its first event arrived; the socket stays open.
    Its receive buffer is small, so the server's writes back up soon."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(60)
    s.connect((host, port))
    payload = json.dumps(body).encode()
    head = [
        "POST /v1/completions HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
        f"Content-Length: {len(payload)}", *(f"{k}: {v}" for k, v in headers.items()),
    ]  # fmt: skip
    s.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
    got = b""
    while b"data: " not in got:
        chunk = s.recv(4096)
        assert chunk, f"connection closed before the first event: {got[:300]!r}"
        got += chunk
    assert got.startswith(b"HTTP/1.1 200"), got[:300]
    return s


def stall(n: int, host: str, port: int, headers: dict[str, str], body: dict | None = None) -> list:
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: stalled_stream(host, port, headers, body or STALLED_BODY),
                             range(n)))  # fmt: skip


def closed_by_server(s: socket.socket, timeout: float = 10) -> bool:
    """Read what the socket still holds; True once the server closed the connection."""
    s.settimeout(timeout)
    try:
        while s.recv(1 << 16):
            pass
        return True
    except (TimeoutError, OSError):
        return False


async def stream_tpot(
    c: httpx.AsyncClient, path: str, body: dict, headers: dict[str, str]
) -> float:
    """One stream's time per output token: (last token event - first) / (events - 1)."""
    times = []
    async with c.stream("POST", path, json=body, headers=headers) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith('data: {"id"') and '"text":"' in line:
                times.append(time.monotonic())
    assert len(times) >= 2, times
    return (times[-1] - times[0]) / (len(times) - 1)


async def median_tpot(
    base_url: str, headers: dict[str, str], clients: int = 4, max_tokens: int = 128
) -> float:
    """Median TPOT of `clients` concurrent streams of `max_tokens` tokens (ms)."""
    body = {"prompt": "def measured():", "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True}  # fmt: skip
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as c:
        tpots = await asyncio.gather(
            *(stream_tpot(c, "/v1/completions", body, headers) for _ in range(clients))
        )
    return statistics.median(tpots) * 1000


def ensure_fd_limit(needed: int) -> int:
    """Raise this process's soft open-file limit to `needed` if the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    assert soft >= needed, f"open-file limit {soft} (hard {hard}) < {needed}"
    return soft


class IdleConnections:
    """`n` keep-alive connections, each after one `GET /health`, then idle."""

    def __init__(self) -> None:
        self.streams: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def open(self, host: str, port: int, n: int, parallel: int = 200) -> None:
        gate = asyncio.Semaphore(parallel)

        async def one() -> None:
            async with gate:
                reader, writer = await asyncio.open_connection(host, port)
                await health_on(reader, writer, host)
                self.streams.append((reader, writer))

        await asyncio.gather(*(one() for _ in range(n)))

    async def still_answer(self, host: str, sample: int) -> tuple[int, int]:
        """(answered, asked): a sample of the idle connections, asked again on their socket."""
        ok = 0
        chosen = self.streams[:: max(1, len(self.streams) // sample)]
        for reader, writer in chosen:
            try:
                await asyncio.wait_for(health_on(reader, writer, host), 10)
                ok += 1
            except (OSError, asyncio.IncompleteReadError, TimeoutError, AssertionError):
                pass
        return ok, len(chosen)

    async def close(self) -> None:
        for _, writer in self.streams:
            writer.close()
        await asyncio.gather(*(w.wait_closed() for _, w in self.streams), return_exceptions=True)
        self.streams.clear()


async def health_on(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
    writer.write(f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )  # fmt: skip
    await reader.readexactly(length)


async def latencies(base_url: str, headers: dict[str, str], n: int = 10) -> tuple[float, float]:
    """(median /health latency, median 16-token completion latency), in ms, one at a time."""
    health, completion = [], []
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as c:
        for _ in range(n):
            started = time.monotonic()
            assert (await c.get("/health")).status_code == 200
            health.append(time.monotonic() - started)
        for _ in range(max(2, n // 3)):
            started = time.monotonic()
            r = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 16},
                             headers=headers)  # fmt: skip
            assert r.status_code == 200, r.text
            completion.append(time.monotonic() - started)
    return statistics.median(health) * 1000, statistics.median(completion) * 1000
