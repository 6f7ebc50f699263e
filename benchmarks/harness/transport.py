"""The HTTP layer under the client: one pooled session, two interchangeable libraries.

Measured here against a trivial streaming endpoint (docs/benchmarks.md), httpx
spent 45-78 µs of CPU per streamed network read and aiohttp 7-13 µs, and one
harness process kept to its schedule up to ~300 req/s with httpx against
~1,200 req/s with aiohttp. Where the client shares cores with the server,
its CPU also comes out of the server's share. So aiohttp (C HTTP parser; also
what vLLM's `bench serve` uses) is the default, and httpx stays available
(`--http httpx`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

HttpLibrary = Literal["aiohttp", "httpx"]


class TransportResponse(Protocol):
    status: int

    def header(self, name: str) -> str | None: ...
    async def read(self) -> bytes: ...
    def chunks(self) -> AsyncIterator[bytes]: ...


class Transport(Protocol):
    """POST a body and stream the answer; GET small documents. Pooled connections."""

    errors: tuple[type[BaseException], ...]  # what a failed request raises
    description: str

    def post(self, url: str, body: bytes) -> contextlib.AbstractAsyncContextManager[Any]: ...
    async def get(self, url: str, timeout_s: float = 30) -> tuple[int, bytes]: ...
    async def aclose(self) -> None: ...


def pool_size(concurrency: int) -> int:
    # Default pools (httpx: 100 connections, 20 kept alive) would queue
    # requests inside the client and reconnect under load: raise both.
    return max(256, 2 * concurrency)


def default_headers(api_key: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream, application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


# ---------------------------------------------------------------- aiohttp


@dataclass
class _AiohttpResponse:
    raw: Any

    @property
    def status(self) -> int:
        return int(self.raw.status)

    def header(self, name: str) -> str | None:
        value = self.raw.headers.get(name)
        return None if value is None else str(value)

    async def read(self) -> bytes:
        return bytes(await self.raw.read())

    def chunks(self) -> AsyncIterator[bytes]:
        return self.raw.content.iter_any()  # whatever the socket has: no line splitting


class AiohttpTransport:
    def __init__(self, concurrency: int, timeout_s: float, api_key: str | None) -> None:
        import aiohttp

        n = pool_size(concurrency)
        self._aiohttp = aiohttp
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=n, limit_per_host=n, keepalive_timeout=60),
            # No total timeout: long generations are legitimate; a read timeout
            # per socket read guards hangs. Connection waits show as schedule lag.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=timeout_s),
            headers=default_headers(api_key),
            trust_env=False,
        )
        self.errors: tuple[type[BaseException], ...] = (aiohttp.ClientError,)
        self.description = f"aiohttp {aiohttp.__version__}, HTTP/1.1, pool limit {n} connections"

    @contextlib.asynccontextmanager
    async def post(self, url: str, body: bytes) -> AsyncIterator[_AiohttpResponse]:
        async with self.session.post(url, data=body) as resp:
            yield _AiohttpResponse(resp)

    async def get(self, url: str, timeout_s: float = 30) -> tuple[int, bytes]:
        t = self._aiohttp.ClientTimeout(total=timeout_s)
        async with self.session.get(url, timeout=t) as resp:
            return resp.status, await resp.read()

    async def aclose(self) -> None:
        await self.session.close()


# ---------------------------------------------------------------- httpx


@dataclass
class _HttpxResponse:
    raw: Any

    @property
    def status(self) -> int:
        return int(self.raw.status_code)

    def header(self, name: str) -> str | None:
        value = self.raw.headers.get(name)
        return None if value is None else str(value)

    async def read(self) -> bytes:
        return bytes(await self.raw.aread())

    def chunks(self) -> AsyncIterator[bytes]:
        return self.raw.aiter_raw()


class HttpxTransport:
    def __init__(
        self,
        concurrency: int = 1,
        timeout_s: float = 600,
        api_key: str | None = None,
        client: Any = None,
    ) -> None:
        import httpx

        n = pool_size(concurrency)
        self.client = client or httpx.AsyncClient(
            limits=httpx.Limits(
                max_connections=n, max_keepalive_connections=n, keepalive_expiry=60
            ),
            timeout=httpx.Timeout(connect=30.0, read=timeout_s, write=30.0, pool=None),
            headers=default_headers(api_key),
            trust_env=False,
        )
        self.errors: tuple[type[BaseException], ...] = (httpx.HTTPError,)
        self.description = f"httpx {httpx.__version__}, HTTP/1.1, pool limit {n} connections"

    @contextlib.asynccontextmanager
    async def post(self, url: str, body: bytes) -> AsyncIterator[_HttpxResponse]:
        async with self.client.stream("POST", url, content=body) as resp:
            yield _HttpxResponse(resp)

    async def get(self, url: str, timeout_s: float = 30) -> tuple[int, bytes]:
        r = await self.client.get(url, timeout=timeout_s)
        return r.status_code, r.content

    async def aclose(self) -> None:
        await self.client.aclose()


def make_transport(
    library: HttpLibrary, concurrency: int, timeout_s: float, api_key: str | None
) -> Transport:
    """A pooled transport; create it inside the running event loop."""
    if library == "httpx":
        return HttpxTransport(concurrency, timeout_s, api_key)
    return AiohttpTransport(concurrency, timeout_s, api_key)
