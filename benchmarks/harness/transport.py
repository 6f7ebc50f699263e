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

from benchmarks.harness.records import RequestRecord, now

HttpLibrary = Literal["aiohttp", "httpx"]


@dataclass(slots=True)
class ConnectionTrace:
    """Fills a record's connection timestamps from the HTTP library's tracing hooks.

    Times are seconds from t0, as every time in a record. The pool wait is the
    time queued for a free slot in the client's own pool: the client's queueing,
    not the server's, so it is reported apart and kept out of TTFT.
    """

    rec: RequestRecord
    t0: float
    _queued: float | None = None

    def queued(self) -> None:
        self._queued = now() - self.t0

    def dequeued(self) -> None:
        if self._queued is not None:
            self.rec.conn_wait = max(0.0, now() - self.t0 - self._queued)

    def connecting(self) -> None:
        t = self.rec.connect_start = now() - self.t0
        if self.rec.conn_acquired is None:
            self.rec.conn_acquired = t

    def connected(self) -> None:
        self.rec.connected = now() - self.t0

    def reused(self) -> None:
        if self.rec.conn_acquired is None:
            self.rec.conn_acquired = now() - self.t0

    def written(self) -> None:
        self.rec.written = now() - self.t0


class TransportResponse(Protocol):
    status: int

    def header(self, name: str) -> str | None: ...
    async def read(self) -> bytes: ...
    def chunks(self) -> AsyncIterator[bytes]: ...


class Transport(Protocol):
    """POST a body and stream the answer; GET small documents. Pooled connections."""

    errors: tuple[type[BaseException], ...]  # what a failed request raises
    description: str

    def post(
        self, url: str, body: bytes, trace: ConnectionTrace | None = None
    ) -> contextlib.AbstractAsyncContextManager[Any]: ...
    async def get(self, url: str, timeout_s: float = 30) -> tuple[int, bytes]: ...
    async def aclose(self) -> None: ...


def pool_size(concurrency: int | None) -> int | None:
    """Connections the client's pool allows; None: no limit.

    Default pools (httpx: 100 connections, 20 kept alive) queue requests inside
    the client and reconnect under load. A closed loop never has more than its
    concurrency in flight (plus the scrapes): twice that is room enough. An
    open loop's schedule decides how many are in flight, not the client: its
    pool is unlimited (concurrency None), so no request ever waits for a slot.
    """
    if concurrency is None:
        return None
    return max(256, 2 * concurrency)


def _limit_text(n: int | None) -> str:
    return "no pool limit" if n is None else f"pool limit {n} connections"


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


def _aiohttp_tracing() -> Any:
    """A TraceConfig whose hooks forward to the request's ConnectionTrace."""
    import aiohttp

    def hook(method: str) -> Any:
        async def call(_session: Any, ctx: Any, _params: Any) -> None:
            trace = ctx.trace_request_ctx
            if isinstance(trace, ConnectionTrace):
                getattr(trace, method)()

        return call

    tc = aiohttp.TraceConfig()
    tc.on_connection_queued_start.append(hook("queued"))
    tc.on_connection_queued_end.append(hook("dequeued"))
    tc.on_connection_create_start.append(hook("connecting"))
    tc.on_connection_create_end.append(hook("connected"))
    tc.on_connection_reuseconn.append(hook("reused"))
    tc.on_request_headers_sent.append(hook("written"))
    tc.on_request_chunk_sent.append(hook("written"))  # the body, after the headers
    return tc


class AiohttpTransport:
    def __init__(
        self,
        concurrency: int | None,
        timeout_s: float,
        api_key: str | None,
        *,
        fixed_pool: int | None = None,  # exactly this many connections (experiments)
    ) -> None:
        import aiohttp

        n = fixed_pool or pool_size(concurrency)
        self._aiohttp = aiohttp
        self.pool_limit = n
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(  # limit 0: no limit
                limit=n or 0, limit_per_host=n or 0, keepalive_timeout=60
            ),
            trace_configs=[_aiohttp_tracing()],
            # No total timeout: long generations are legitimate; a read timeout
            # per socket read guards hangs. Connection waits show as schedule lag.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=timeout_s),
            headers=default_headers(api_key),
            trust_env=False,
        )
        self.errors: tuple[type[BaseException], ...] = (aiohttp.ClientError,)
        self.description = f"aiohttp {aiohttp.__version__}, HTTP/1.1, {_limit_text(n)}"

    @contextlib.asynccontextmanager
    async def post(
        self, url: str, body: bytes, trace: ConnectionTrace | None = None
    ) -> AsyncIterator[_AiohttpResponse]:
        async with self.session.post(url, data=body, trace_request_ctx=trace) as resp:
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
        concurrency: int | None = 1,
        timeout_s: float = 600,
        api_key: str | None = None,
        client: Any = None,
    ) -> None:
        import httpx

        n = pool_size(concurrency)
        self.pool_limit = n
        self._in_flight = 0
        self.client = client or httpx.AsyncClient(
            limits=httpx.Limits(
                max_connections=n, max_keepalive_connections=n, keepalive_expiry=60
            ),
            timeout=httpx.Timeout(connect=30.0, read=timeout_s, write=30.0, pool=None),
            headers=default_headers(api_key),
            trust_env=False,
        )
        self.errors: tuple[type[BaseException], ...] = (httpx.HTTPError,)
        self.description = f"httpx {httpx.__version__}, HTTP/1.1, {_limit_text(n)}"

    @contextlib.asynccontextmanager
    async def post(
        self, url: str, body: bytes, trace: ConnectionTrace | None = None
    ) -> AsyncIterator[_HttpxResponse]:
        # Only a full pool makes a request wait for a slot; otherwise the time to the
        # first event on the connection is httpx's own overhead, not queueing.
        full = self.pool_limit is not None and self._in_flight >= self.pool_limit
        ext = {"trace": _httpcore_trace(trace, full)} if trace is not None else None
        self._in_flight += 1
        try:
            async with self.client.stream("POST", url, content=body, extensions=ext) as resp:
                yield _HttpxResponse(resp)
        finally:
            self._in_flight -= 1

    async def get(self, url: str, timeout_s: float = 30) -> tuple[int, bytes]:
        r = await self.client.get(url, timeout=timeout_s)
        return r.status_code, r.content

    async def aclose(self) -> None:
        await self.client.aclose()


def _httpcore_trace(trace: ConnectionTrace, pool_full: bool) -> Any:
    """httpcore's trace callback: what httpx can tell.

    httpcore has no event for a wait in its pool: a request holds its slot from
    the first event on its connection (a TCP connect, or the headers it writes
    on a kept-alive one), so when the pool was full as it was sent, the wait is
    the time from `sent` to then.
    """
    rec = trace.rec

    async def on_event(name: str, _info: dict[str, Any]) -> None:
        if rec.conn_acquired is None and name in (
            "connection.connect_tcp.started",
            "http11.send_request_headers.started",
        ):
            t = rec.conn_acquired = now() - trace.t0
            if pool_full and rec.sent is not None:
                rec.conn_wait = max(0.0, t - rec.sent)
        if name == "connection.connect_tcp.started":
            trace.connecting()
        elif name == "connection.connect_tcp.complete":
            trace.connected()
        elif name in ("http11.send_request_headers.complete", "http11.send_request_body.complete"):
            trace.written()

    return on_event


def make_transport(
    library: HttpLibrary, concurrency: int | None, timeout_s: float, api_key: str | None
) -> Transport:
    """A pooled transport (concurrency None: no pool limit); create it inside the running
    event loop."""
    if library == "httpx":
        return HttpxTransport(concurrency, timeout_s, api_key)
    return AiohttpTransport(concurrency, timeout_s, api_key)
