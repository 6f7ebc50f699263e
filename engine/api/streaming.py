"""Server-sent event responses that end their engine work the moment they end."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, Awaitable, Callable

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from engine.api.encoding import DONE, error_frame
from engine.api.errors import APIError

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

CLIENT_CLOSED = 499  # nginx's status for a client that went away


class SSEResponse(StreamingResponse):
    """Frames as `data:` events, then `[DONE]`; an error mid-stream becomes an error event.

    `finish(status)` is awaited exactly once, however the response ends: 200,
    the error's status, or 499 when the client went away, even if it left
    before the first frame was written (when a generator's own `finally`
    would never run). That is where engine requests get aborted.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        frames: AsyncGenerator[bytes, None],
        finish: Callable[[int], Awaitable[None]],
        headers: dict[str, str] | None = None,
        coalesce_s: float = 0.0,
    ) -> None:
        self._frames = frames
        self._finish = finish
        self._status = CLIENT_CLOSED
        events = self._events()
        if coalesce_s > 0:
            events = coalesce(events, coalesce_s)
        self._body = events
        super().__init__(events, headers={**SSE_HEADERS, **(headers or {})})

    async def _events(self) -> AsyncGenerator[bytes, None]:
        try:
            async for frame in self._frames:
                yield frame
            self._status = 200
        except APIError as e:
            self._status = e.status
            yield error_frame(e.body())
        yield DONE

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for it in (self._body, self._frames):
                with contextlib.suppress(Exception):
                    await it.aclose()
            await self._finish(self._status)


async def coalesce(
    chunks: AsyncGenerator[bytes, None], interval_s: float
) -> AsyncGenerator[bytes, None]:
    """Join chunks that arrive within `interval_s` of the last write into one.

    The first chunk goes at once (TTFT is untouched) and whatever is held
    goes with the end of the stream. It needs no timer task: a held chunk
    waits at most for the next one, which a running generation sends within
    a decode step.
    """
    held: list[bytes] = []
    last = -interval_s
    try:
        async for chunk in chunks:
            held.append(chunk)
            now = time.monotonic()
            if now - last >= interval_s:
                yield b"".join(held)
                held.clear()
                last = now
        if held:
            yield b"".join(held)
    finally:
        await chunks.aclose()
