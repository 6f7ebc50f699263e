"""Pure-ASGI middleware: request ids, body size limit, one JSON log line per request.

Pure ASGI (not Starlette's BaseHTTPMiddleware) so streamed responses pass
through untouched and cost one extra function call per frame.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import TYPE_CHECKING, Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.api.errors import APIError

if TYPE_CHECKING:
    from engine.api.state import ServerState

access_log = logging.getLogger("engine.access")

# The `endpoint` label of a generation path's metrics (the orchestrator's Endpoint.name).
GENERATION_ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}
REQUEST_ID_HEADER = b"x-request-id"
REPLICA_HEADER = b"x-codellama-replica"
_SAFE_ID = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")


class BodyTooLarge(Exception):
    pass


class HTTPMiddleware:
    """Pure-ASGI middleware for HTTP requests; lifespan (and anything else) passes through."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.handle(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError


class RequestContextMiddleware(HTTPMiddleware):
    """Request ids, the body size limit, and one JSON log line per request."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.monotonic()
        request_id = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        extra = [(REQUEST_ID_HEADER, request_id.encode())]
        if self.state.replica_id:
            extra.append((REPLICA_HEADER, self.state.replica_id.encode()))
        response = _HeadersAdded(send, extra)
        await self._within_body_limit(scope, receive, response)
        self._count_unadmitted(scope, response.status)
        if self.state.settings.server.access_log:
            _log_request(scope, request_id, response.status, started)

    def _count_unadmitted(self, scope: Scope, status: int) -> None:
        """Count a generation request that never became a run (refused by the gate or at
        admission, invalid, too large): a run counts itself when it is recorded."""
        endpoint = GENERATION_ENDPOINTS.get(scope["path"])
        if endpoint is None or scope.get("method") != "POST" or "run" in scope["state"]:
            return
        status = status or 499  # the client left before any answer
        self.state.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()

    async def _within_body_limit(self, scope: Scope, receive: Receive, send: _HeadersAdded) -> None:
        """Run the app, answering 413 for a body over the limit (declared or as read)."""
        limit = self.state.settings.server.max_body_bytes
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _too_large(limit, send)
            return
        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge()
            return message

        try:
            await self.app(scope, receive_limited, send)
        except BodyTooLarge:
            if send.status == 0:
                await _too_large(limit, send)


class _HeadersAdded:
    """`send` that adds headers to the response and remembers its status."""

    def __init__(self, send: Send, extra: list[tuple[bytes, bytes]]) -> None:
        self.send, self.extra = send, extra
        self.status = 0

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            headers = message.get("headers", [])
            # Ray's proxy adds its own x-request-id (the same id, read from the request).
            message["headers"] = [*headers, *(h for h in self.extra if h not in headers)]
        await self.send(message)


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == REQUEST_ID_HEADER and _SAFE_ID.match(value):
            return value.decode()
    return uuid.uuid4().hex


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _too_large(limit: int, send: Send) -> None:
    error = APIError(
        413, f"The request body exceeds the limit of {limit} bytes.", code="body_too_large"
    )
    body = orjson.dumps(error.body())
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _log_request(scope: Scope, request_id: str, status: int, started: float) -> None:
    record: dict[str, Any] = {
        "ts": round(time.time(), 3),
        "request_id": request_id,
        "method": scope.get("method"),
        "path": scope.get("path"),
        "status": status,
        "duration_ms": round((time.monotonic() - started) * 1000, 2),
    }
    state = scope.get("state", {})
    key = state.get("api_key")
    if key is not None:
        record["key"] = key.name  # the key's label; never the key
    run = state.get("run")
    if run is not None:
        record.update(run.log_fields())
    access_log.info(orjson.dumps(record).decode())
