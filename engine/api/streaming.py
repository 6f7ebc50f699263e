"""Server-sent event responses that end their engine work the moment they end."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable

from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from engine.api.encoding import DONE, error_frame
from engine.api.errors import APIError

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

CLIENT_CLOSED = 499  # nginx's status for a client that went away

log = logging.getLogger("engine.api")


class WriteTimeout(Exception):
    """The client took none of the stream's data for the write timeout: it stopped reading."""


class SSEResponse(StreamingResponse):
    """Frames as `data:` events, then `[DONE]`; an error mid-stream becomes an error event.

    `finish(status)` is awaited exactly once, however the response ends: 200,
    the error's status, or 499 when the client went away, even if it left
    before the first frame was written (when a generator's own `finally`
    would never run). That is where engine requests get aborted.

    With `write_timeout_s`, a write the client does not take within it (the socket's
    buffers are full: the client stopped reading) ends the response: `on_write_timeout()`
    is called, then `finish(499)`, and the connection is closed.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        frames: AsyncGenerator[bytes, None],
        finish: Callable[[int], Awaitable[None]],
        headers: dict[str, str] | None = None,
        coalesce_s: float = 0.0,
        write_timeout_s: float | None = None,
        on_write_timeout: Callable[[], None] = lambda: None,
    ) -> None:
        self._frames = frames
        self._finish = finish
        self._status = CLIENT_CLOSED
        self._write_timeout_s = write_timeout_s
        self._on_write_timeout = on_write_timeout
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
        if self._write_timeout_s is not None:
            send = _timed(send, self._write_timeout_s)
        try:
            await super().__call__(scope, receive, send)
        except WriteTimeout:
            # Returning with the response unfinished makes the server close the connection
            # (uvicorn logs "ASGI callable returned without completing response").
            log.warning(
                "a stream's client took no data for %g s: aborted, closing its connection",
                self._write_timeout_s,
            )
            self._on_write_timeout()
        finally:
            for it in (self._body, self._frames):
                with contextlib.suppress(Exception):
                    await it.aclose()
            await self._finish(self._status)


def _timed(send: Send, timeout_s: float) -> Send:
    """`send` that raises WriteTimeout when a write is not taken within `timeout_s`
    (the server blocks a write while the connection's buffers are full)."""

    async def timed_send(message: Message) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                await send(message)
        except TimeoutError:
            raise WriteTimeout() from None

    return timed_send


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
