"""How requests are sent and timed: one pooled HTTP session (transport.py), an
OpenAI-compatible target, the request body, and a client that fills each request's record."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from typing import Any

import orjson

from benchmarks.harness.datasets import RequestItem
from benchmarks.harness.profile.schema import RequestOptions
from benchmarks.harness.records import RequestRecord, now
from benchmarks.harness.sse import SSEParser, chunk_text, error_message, finish_reason
from benchmarks.harness.transport import ConnectionTrace, Transport, TransportResponse


def fail(rec: RequestRecord, message: str, t0: float) -> None:
    """Record the failure; a request that had not finished finishes now."""
    rec.error = message
    if rec.finished is None:
        rec.finished = now() - t0


@dataclass(frozen=True)
class Target:
    """An OpenAI-compatible server: base URL (with or without /v1) and credentials."""

    base_url: str
    api_key: str | None = None
    model: str | None = None
    metrics_url: str | None = None
    name: str = ""
    api_key_label: str | None = None  # how reports name the key (default: a short hash)

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

    @property
    def key_label(self) -> str | None:
        """The API key as reports name it: its label, or a hash prefix (never the key)."""
        if self.api_key_label or not self.api_key:
            return self.api_key_label
        return "key-" + hashlib.sha256(self.api_key.encode()).hexdigest()[:8]


REPLICA_HEADER = "x-codellama-replica"


async def discover_model(http: Transport, target: Target) -> str:
    """The first model id from GET /v1/models."""
    status, body = await http.get(target.api + "/models", timeout_s=30)
    if status != 200:
        raise RuntimeError(f"GET {target.api}/models: HTTP {status}: {error_message(body)}")
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
    if item.stop is not None:
        body["stop"] = list(item.stop)
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
        rec.target, rec.api_key = self.target.label, self.target.key_label
        if rec.expected_prompt_tokens is None:
            rec.expected_prompt_tokens = item.input_tokens
        content = orjson.dumps(body)
        url = self.target.api + path
        t0 = self.t0
        trace = ConnectionTrace(rec, t0)
        rec.sent = now() - t0
        try:
            async with asyncio.timeout(self.opts.timeout_s):
                async with self.http.post(url, content, trace) as resp:
                    rec.first_byte = now() - t0
                    rec.status = resp.status
                    rec.replica = resp.header(REPLICA_HEADER)
                    if resp.status != 200:
                        msg = error_message(await resp.read())
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
            if rec.cancelled:  # the caller gave up on it (an editor's keystroke): not a failure
                rec.finished = now() - t0
            else:
                fail(rec, "cancelled (run interrupted)", t0)
            raise
        except Exception as e:  # a bad frame must fail the request, not the run
            fail(rec, f"{type(e).__name__}: {e}", t0)
        return rec

    async def _read_stream(self, resp: TransportResponse, rec: RequestRecord) -> None:
        texts: list[str] = []
        try:
            await self._read_events(resp, rec, texts)
        finally:  # a stream cut short (cancelled) keeps the text it had
            if not rec.text:
                rec.text = "".join(texts)

    async def _read_events(
        self, resp: TransportResponse, rec: RequestRecord, texts: list[str]
    ) -> None:
        t0 = self.t0
        parser = SSEParser()
        done = False
        async for raw in resp.chunks():
            t = now() - t0  # every event in this network read arrived now
            if rec.first_body is None:
                rec.first_body = t
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
                _take_chunk(obj, rec, t, texts)
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
        rec.finished = rec.first_body = now() - self.t0
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


def _take_chunk(obj: dict[str, Any], rec: RequestRecord, t: float, texts: list[str]) -> None:
    """One streamed chunk's text (a token arrived at t), finish reason and usage."""
    text = chunk_text(obj)
    if text:
        rec.token_times.append(t)
        texts.append(text)
    reason = finish_reason(obj)
    if reason:
        rec.finish_reason = reason
    usage = obj.get("usage")
    if usage:
        rec.prompt_tokens = usage.get("prompt_tokens")
        rec.output_tokens = usage.get("completion_tokens")
