"""How requests are sent and timed: one pooled HTTP session (transport.py),
SSE parsing, a per-request record of monotonic timestamps, and the client's
own health (event-loop lag, CPU time)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

from benchmarks.harness.datasets import RequestItem
from benchmarks.harness.profile.schema import RequestOptions
from benchmarks.harness.transport import Transport, TransportResponse

now = time.perf_counter  # monotonic, sub-microsecond: every timestamp comes from here


# ---------------------------------------------------------------- the record


@dataclass(slots=True)
class RequestRecord:
    """Everything measured about one request. Times are seconds from the run's t0."""

    index: int
    item_id: str
    step: int = 0
    scheduled: float | None = None  # open loop: when it should have been sent
    sent: float | None = None  # when it was handed to the HTTP client
    first_byte: float | None = None  # response headers received
    token_times: list[float] = field(default_factory=list)  # chunks carrying generated text
    chunks: int = 0  # all data events (role-only, empty, usage included)
    finished: float | None = None  # stream ended ([DONE] / body read) or failed
    status: int | None = None
    error: str | None = None
    prompt_tokens: int | None = None  # from the server's usage
    output_tokens: int | None = None  # from the server's usage
    retok_output_tokens: int | None = None  # re-tokenized generated text
    max_tokens: int | None = None
    finish_reason: str | None = None
    text: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None and self.finished is not None

    @property
    def out_tokens(self) -> int | None:
        """Output tokens: the server's usage, else the re-tokenized count."""
        return self.output_tokens if self.output_tokens is not None else self.retok_output_tokens

    def to_dict(self, with_text: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_text:
            d.pop("text")
        return d


def fail(rec: RequestRecord, message: str, t0: float) -> None:
    rec.error = message
    if rec.finished is None:
        rec.finished = now() - t0


# ---------------------------------------------------------------- SSE


class SSEParser:
    """Incremental `text/event-stream` parser: bytes in, `data` payloads out."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        """The `data` of every event completed by this chunk (eager: the buffer is updated now)."""
        buf = self._buf + chunk
        held = b""
        if b"\r" in buf:
            if buf.endswith(b"\r"):  # maybe half of a CRLF: decide with the next chunk
                buf, held = buf[:-1], b"\r"
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *events, rest = buf.split(b"\n\n")
        self._buf = rest + held
        out = []
        for event in events:
            data = [
                line[5:].removeprefix(b" ")
                for line in event.split(b"\n")
                if line.startswith(b"data:")
            ]
            if data:
                out.append(b"\n".join(data))
        return out

    def tail(self) -> bytes:
        """Bytes left after the last complete event (a truncated stream)."""
        return self._buf


def chunk_text(obj: dict[str, Any]) -> str:
    """The generated text of one streamed chunk (completions or chat), '' if none.

    A chat stream's first chunk usually carries only `role`; some servers send
    empty `content` chunks: neither carries a token.
    """
    parts = []
    for choice in obj.get("choices") or ():
        text = choice.get("text")
        if text is None:
            delta = choice.get("delta") or {}
            text = delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning")
        if text:
            parts.append(text)
    return "".join(parts)


def _finish_reason(obj: dict[str, Any]) -> str | None:
    for choice in obj.get("choices") or ():
        if choice.get("finish_reason"):
            return str(choice["finish_reason"])
    return None


def _error_message(body: bytes) -> str:
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:300].decode(errors="replace").strip()
    err = obj.get("error", obj) if isinstance(obj, dict) else obj
    if isinstance(err, dict):
        return str(err.get("message") or err.get("detail") or err)[:300]
    return str(err)[:300]


# ---------------------------------------------------------------- the client


@dataclass(frozen=True)
class Target:
    """An OpenAI-compatible server: base URL (with or without /v1) and credentials."""

    base_url: str
    api_key: str | None = None
    model: str | None = None
    metrics_url: str | None = None
    name: str = ""

    @property
    def root(self) -> str:
        u = self.base_url.rstrip("/")
        return u.removesuffix("/v1")

    @property
    def api(self) -> str:
        return self.root + "/v1"

    @property
    def label(self) -> str:
        return self.name or self.root

    @property
    def prometheus_url(self) -> str:
        return self.metrics_url or self.root + "/metrics"


async def discover_model(http: Transport, target: Target) -> str:
    """The first model id from GET /v1/models."""
    status, body = await http.get(target.api + "/models", timeout_s=30)
    if status != 200:
        raise RuntimeError(f"GET {target.api}/models: HTTP {status}: {_error_message(body)}")
    data = orjson.loads(body).get("data") or []
    if not data:
        raise RuntimeError(f"GET {target.api}/models lists no models")
    return str(data[0]["id"])


def build_payload(
    item: RequestItem, model: str, opts: RequestOptions
) -> tuple[str, dict[str, Any]]:
    """(path, JSON body) of one request."""
    max_tokens = item.max_tokens if item.max_tokens is not None else opts.max_tokens
    body: dict[str, Any] = {"model": model, "stream": opts.stream}
    if item.is_chat:
        path = "/chat/completions"
        body["messages"] = list(item.messages or ())
    else:
        path = "/completions"
        body["prompt"] = item.prompt or ""
        if item.suffix is not None:
            body["suffix"] = item.suffix
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if opts.stream:
        body["stream_options"] = {"include_usage": True}
    if opts.ignore_eos:
        body["ignore_eos"] = True
    if opts.temperature is not None:
        body["temperature"] = opts.temperature
    body.update(opts.extra_body)
    return path, body


class OpenAIClient:
    """Sends one request and fills its record; never raises for a failed request."""

    def __init__(
        self,
        http: Transport,
        target: Target,
        model: str,
        opts: RequestOptions,
        t0: float = 0.0,
    ) -> None:
        self.http = http
        self.target = target
        self.model = model
        self.opts = opts
        self.t0 = t0

    async def send(self, item: RequestItem, rec: RequestRecord) -> RequestRecord:
        path, body = build_payload(item, self.model, self.opts)
        rec.max_tokens = body.get("max_tokens")
        content = orjson.dumps(body)
        url = self.target.api + path
        t0 = self.t0
        rec.sent = now() - t0
        try:
            async with asyncio.timeout(self.opts.timeout_s):
                async with self.http.post(url, content) as resp:
                    rec.first_byte = now() - t0
                    rec.status = resp.status
                    if resp.status != 200:
                        msg = _error_message(await resp.read())
                        fail(rec, f"HTTP {resp.status}: {msg}", t0)
                        return rec
                    if self.opts.stream:
                        await self._read_stream(resp, rec)
                    else:
                        await self._read_body(resp, rec)
        except TimeoutError:
            fail(rec, f"timeout after {self.opts.timeout_s:g} s", t0)
        except self.http.errors as e:
            fail(rec, f"{type(e).__name__}: {e}".rstrip(": "), t0)
        except asyncio.CancelledError:
            fail(rec, "cancelled (run interrupted)", t0)
            raise
        except Exception as e:  # a bad frame must fail the request, not the run
            fail(rec, f"{type(e).__name__}: {e}", t0)
        return rec

    async def _read_stream(self, resp: TransportResponse, rec: RequestRecord) -> None:
        t0 = self.t0
        parser = SSEParser()
        texts: list[str] = []
        done = False
        async for raw in resp.chunks():
            t = now() - t0  # every event in this network read arrived now
            for data in parser.feed(raw):
                rec.chunks += 1
                if data == b"[DONE]":
                    done = True
                    continue
                obj = orjson.loads(data)
                if not isinstance(obj, dict):
                    continue
                if obj.get("error"):
                    err = obj["error"]
                    msg = err.get("message", err) if isinstance(err, dict) else err
                    fail(rec, f"error event in stream: {msg}", t0)
                    rec.text = "".join(texts)
                    return
                text = chunk_text(obj)
                if text:
                    rec.token_times.append(t)
                    texts.append(text)
                reason = _finish_reason(obj)
                if reason:
                    rec.finish_reason = reason
                usage = obj.get("usage")
                if usage:
                    rec.prompt_tokens = usage.get("prompt_tokens")
                    rec.output_tokens = usage.get("completion_tokens")
        rec.finished = now() - t0
        rec.text = "".join(texts)
        if not done:
            tail = parser.tail().strip()
            fail(
                rec,
                "stream ended without [DONE]" + (f" (trailing {tail[:80]!r})" if tail else ""),
                t0,
            )

    async def _read_body(self, resp: TransportResponse, rec: RequestRecord) -> None:
        body = await resp.read()
        rec.finished = now() - self.t0
        rec.chunks = 1
        obj = orjson.loads(body)
        choices = obj.get("choices") or []
        texts = []
        for c in choices:
            msg = c.get("message") or {}
            texts.append(c.get("text") or msg.get("content") or "")
            if c.get("finish_reason"):
                rec.finish_reason = c["finish_reason"]
        rec.text = "".join(texts)
        usage = obj.get("usage") or {}
        rec.prompt_tokens = usage.get("prompt_tokens")
        rec.output_tokens = usage.get("completion_tokens")


# ---------------------------------------------------------------- client health


class LoopLagMonitor:
    """How late the event loop wakes a sleeper: the client's own scheduling delay.

    If this grows, every timestamp the client takes is late by as much, and
    the client (not the server) is the bottleneck.
    """

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval = interval_s
        self.lags: list[float] = []
        self.times: list[float] = []  # when each lag was seen (perf_counter)
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        loop_time = time.perf_counter
        while True:
            t = loop_time()
            await asyncio.sleep(self.interval)
            woke = loop_time()
            self.lags.append(woke - t - self.interval)
            self.times.append(woke)

    def between(self, a: float, b: float) -> list[float]:
        """Lags seen in [a, b] (perf_counter times)."""
        return [lag for t, lag in zip(self.times, self.lags, strict=True) if a <= t <= b]

    def start(self) -> None:
        if self.interval > 0:  # 0 turns the monitor off
            self._task = asyncio.get_running_loop().create_task(self._tick())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class GCFreezer:
    """Keep the cyclic GC from pausing the client for long during a run.

    Records and their lists are long-lived, so they reach the oldest GC
    generation, and each full collection then walks all of them: measured
    here, pauses grew to ~190 ms at 1,000 req/s, stalling every request
    in flight. `gc.freeze()` every second moves what exists to the permanent
    generation, so a collection only walks the last second's objects; young
    garbage is still collected, and everything is unfrozen and collected at
    the end.
    """

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval = interval_s
        self._task: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            gc.freeze()

    def start(self) -> None:
        gc.collect()
        gc.freeze()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        gc.unfreeze()


@dataclass
class CPUMeter:
    """The client process's own CPU time over a span (user + system)."""

    wall0: float = 0.0
    cpu0: float = 0.0
    ru0: Any = None

    def start(self) -> None:
        self.wall0, self.cpu0 = now(), time.process_time()
        self.ru0 = resource.getrusage(resource.RUSAGE_SELF)

    def stop(self) -> dict[str, float]:
        wall = now() - self.wall0
        cpu = time.process_time() - self.cpu0
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "wall_s": wall,
            "cpu_s": cpu,
            "user_s": ru.ru_utime - self.ru0.ru_utime,
            "system_s": ru.ru_stime - self.ru0.ru_stime,
            "cpu_utilization": cpu / wall if wall > 0 else math.nan,
            "voluntary_ctx_switches": ru.ru_nvcsw - self.ru0.ru_nvcsw,
            "involuntary_ctx_switches": ru.ru_nivcsw - self.ru0.ru_nivcsw,
        }


def retokenize(records: list[RequestRecord], counter: Callable[[str], int]) -> None:
    for r in records:
        if r.ok:
            r.retok_output_tokens = counter(r.text)
