"""Closed-loop load for the cluster-fault tests: clients sending requests back to back and
recording how each ended (which replica, success, the error code, retries)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class Outcome:
    started: float  # monotonic, the first attempt
    ended: float
    replica: str | None  # of the last attempt
    first_replica: str | None  # of the first attempt
    ok: bool
    stream: bool
    status: int = 0  # HTTP status of the last attempt (0: no response)
    error: str | None = None  # error code (event or body), or the exception's name
    attempts: int = 1
    mid_stream: bool = False  # the error came as an event after the stream had started


@dataclass
class Load:
    """`clients` clients, each sending requests back to back until `stop()`.

    A request first sent after `retry_after` that gets a 503 or no response is sent again
    (0.25 s apart) until `retry_window_s` after its first attempt; others are not retried.
    """

    url: str
    clients: int
    max_tokens: int = 200
    stream_share: float = 0.75  # every 4th client sends non-streamed requests
    retry_window_s: float = 0.0
    retry_after: float = float("inf")  # monotonic time from which requests may be retried
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task] = field(default_factory=list)

    def start(self) -> Load:
        self._client = httpx.AsyncClient(
            base_url=self.url, timeout=httpx.Timeout(120, connect=10),
            limits=httpx.Limits(max_connections=self.clients + 8),
        )  # fmt: skip
        for i in range(self.clients):
            stream = (i % 4) < round(4 * self.stream_share)
            self._tasks.append(asyncio.create_task(self._loop(stream)))
        return self

    async def stop(self) -> list[Outcome]:
        """Stop sending; wait for the requests in flight. Idempotent."""
        if not self._stop.is_set():
            self._stop.set()
            await asyncio.gather(*self._tasks)
            await self._client.aclose()
        return self.outcomes

    def since(self, t: float) -> list[Outcome]:
        return [o for o in self.outcomes if o.started >= t]

    async def _loop(self, stream: bool) -> None:
        while not self._stop.is_set():
            self.outcomes.append(await self._request(stream))

    async def _request(self, stream: bool) -> Outcome:
        started = time.monotonic()
        first_replica = None
        attempts = 0
        while True:
            attempts += 1
            o = await self._attempt(stream)
            first_replica = first_replica or o.replica
            retry = (
                not o.ok and not o.mid_stream and (o.status in (0, 502, 503))
                and started >= self.retry_after
                and time.monotonic() - started < self.retry_window_s
            )  # fmt: skip
            if not retry:
                o.started, o.first_replica, o.attempts = started, first_replica, attempts
                return o
            await asyncio.sleep(0.25)

    async def _attempt(self, stream: bool) -> Outcome:
        body = {"prompt": "def load():", "max_tokens": self.max_tokens, "ignore_eos": True,
                "stream": stream}  # fmt: skip
        started = time.monotonic()
        try:
            async with self._client.stream("POST", "/v1/completions", json=body) as r:
                replica = r.headers.get("x-codellama-replica")
                if r.status_code != 200:
                    raw = await r.aread()
                    return Outcome(started, time.monotonic(), replica, None, False, stream,
                                   r.status_code, _error_code(raw))  # fmt: skip
                if not stream:
                    raw = await r.aread()
                    ok = json.loads(raw)["usage"]["completion_tokens"] == self.max_tokens
                    return Outcome(started, time.monotonic(), replica, None, ok, stream, 200)
                error, done = None, False
                async for line in r.aiter_lines():
                    if line.startswith('data: {"error"'):
                        error = json.loads(line[6:])["error"]["code"]
                    elif line == "data: [DONE]":
                        done = True
                return Outcome(started, time.monotonic(), replica, None, done and error is None,
                               stream, 200, error, mid_stream=error is not None)  # fmt: skip
        except httpx.HTTPError as e:
            return Outcome(started, time.monotonic(), None, None, False, stream, 0,
                           type(e).__name__)  # fmt: skip


def _error_code(raw: bytes) -> str:
    try:
        return str(json.loads(raw)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return raw[:80].decode(errors="replace")
