"""A fake OpenAI-compatible server: a trivial endpoint for the harness's own tests
and for measuring how fast one harness process can go.

It generates nothing: each request streams `max_tokens` chunks of one word,
after an optional first-token delay and per-token delay, with a role-only and
an empty chunk first on chat (as real servers do), then usage and [DONE].
`capacity` emulates a server that runs at most that many requests at once and
queues the rest, so a sweep against it saturates at a known rate.
A raw ASGI app (no framework) so that the server, not the client, is cheap.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

Scope = dict[str, Any]


@dataclass
class FakeOpenAI:
    model: str = "fake-model"
    ttft_s: float = 0.0
    token_delay_s: float = 0.0
    capacity: int | None = None
    reject_suffix: bool = False  # as vLLM's own server does for Llama
    honour_ignore_eos: bool = True
    eos_after: int | None = None  # stop early unless ignore_eos
    send_usage: bool = True
    fail_every: int = 0  # every Nth request answers 500
    error_midstream_every: int = 0  # every Nth stream ends with an error event
    book_delay_s: float = 0.0  # count a request this long after its last byte (as servers do)
    finished: int = 0
    served: int = 0
    running: int = 0
    waiting: int = 0
    generated: int = 0
    last_authorization: str | None = None
    _sem: asyncio.Semaphore | None = field(default=None, repr=False)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                kind = (await receive())["type"]
                await send({"type": kind + ".complete"})
                if kind == "lifespan.shutdown":
                    return
        path, method = scope["path"], scope["method"]
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                self.last_authorization = value.decode()
        if method == "GET" and path == "/v1/models":
            await _json(
                send, 200, {"object": "list", "data": [{"id": self.model, "object": "model"}]}
            )
        elif method == "GET" and path == "/metrics":
            await _text(send, self.metrics())
        elif method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
            body = await _body(receive)
            await self.generate(send, orjson.loads(body), chat=path.endswith("chat/completions"))
        else:
            await _json(send, 404, {"error": {"message": f"no route {method} {path}"}})

    def metrics(self) -> str:
        return (
            f"codellama_serve_requests_running {self.running}\n"
            f"codellama_serve_requests_waiting {self.waiting}\n"
            'codellama_serve_requests_total{endpoint="completions",status="200"} '
            f"{self.finished}\n"
            f"codellama_serve_generation_tokens_total {self.generated}\n"
            f"process_cpu_seconds_total {time.process_time()}\n"
        )

    async def generate(self, send: Any, req: dict[str, Any], chat: bool) -> None:
        self.served += 1
        n_req = self.served
        if self.fail_every and n_req % self.fail_every == 0:
            await _json(send, 500, {"error": {"message": "injected failure"}})
            return
        if req.get("suffix") is not None and self.reject_suffix:
            await _json(send, 400, {"error": {"message": "suffix is not currently supported"}})
            return
        if self.capacity and self._sem is None:
            self._sem = asyncio.Semaphore(self.capacity)
        n = int(req.get("max_tokens") or 16)
        if self.eos_after is not None and not (req.get("ignore_eos") and self.honour_ignore_eos):
            n = min(n, self.eos_after)
        self.waiting += 1
        async with self._sem or contextlib.nullcontext():
            self.waiting -= 1
            self.running += 1
            try:
                await self._respond(send, req, chat, n, n_req)
            finally:
                if self.book_delay_s:
                    await asyncio.sleep(self.book_delay_s)
                self.finished += 1
                self.running -= 1

    async def _respond(
        self, send: Any, req: dict[str, Any], chat: bool, n: int, n_req: int
    ) -> None:
        usage = {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": 8 + n}
        self.generated += n
        if not req.get("stream"):
            await asyncio.sleep(self.ttft_s + self.token_delay_s * max(0, n - 1))
            text = "".join(_words(n))
            choice = (
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "length",
                }
                if chat
                else {"index": 0, "text": text, "finish_reason": "length"}
            )
            await _json(
                send,
                200,
                {"id": "x", "choices": [choice], "usage": usage if self.send_usage else None},
            )
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream"),
                    (b"cache-control", b"no-cache"),
                ],
            }
        )
        want_usage = (req.get("stream_options") or {}).get("include_usage") and self.send_usage

        async def event(obj: Any) -> None:
            await send(
                {
                    "type": "http.response.body",
                    "body": b"data: " + orjson.dumps(obj) + b"\n\n",
                    "more_body": True,
                }
            )

        if chat:  # role-only, then empty content: neither carries a token
            await event({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
            await event({"choices": [{"index": 0, "delta": {"content": ""}}]})
        if self.ttft_s:
            await asyncio.sleep(self.ttft_s)
        for i, word in enumerate(_words(n)):
            if i and self.token_delay_s:
                await asyncio.sleep(self.token_delay_s)
            last = i == n - 1
            if self.error_midstream_every and n_req % self.error_midstream_every == 0 and last:
                await event({"error": {"message": "injected mid-stream error", "code": 500}})
                break
            reason = "length" if last else None
            choice = (
                {"index": 0, "delta": {"content": word}, "finish_reason": reason}
                if chat
                else {"index": 0, "text": word, "finish_reason": reason}
            )
            await event({"choices": [choice]})
        if want_usage:
            await event({"choices": [], "usage": usage})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


def _words(n: int) -> Iterator[str]:
    for i in range(n):
        yield f" w{i}"


async def _body(receive: Any) -> bytes:
    chunks = []
    while True:
        msg = await receive()
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body"):
            return b"".join(chunks)


async def _json(send: Any, status: int, obj: Any) -> None:
    body = orjson.dumps(obj)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _text(send: Any, text: str) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain; version=0.0.4")],
        }
    )
    await send({"type": "http.response.body", "body": text.encode()})


class FakeServerThread:
    """Serve a FakeOpenAI app on 127.0.0.1:<free port> in a background thread (tests)."""

    def __init__(self, app: FakeOpenAI) -> None:
        import uvicorn

        self.app = app
        self.config = uvicorn.Config(
            app, host="127.0.0.1", port=0, log_level="warning", access_log=False, lifespan="off"
        )
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FakeServerThread:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--ttft-ms", type=float, default=0.0, help="delay before the first token")
    p.add_argument("--token-delay-ms", type=float, default=0.0, help="delay between tokens")
    p.add_argument("--capacity", type=int, default=None, help="max requests served at once")
    p.add_argument("--model", default="fake-model")
    p.add_argument(
        "--reuse-port",
        action="store_true",
        help="bind with SO_REUSEPORT, so several fake-server processes share one port "
        "(the kernel spreads connections over them; `bench selftest` uses it)",
    )


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    app = FakeOpenAI(
        model=args.model,
        ttft_s=args.ttft_ms / 1000,
        token_delay_s=args.token_delay_ms / 1000,
        capacity=args.capacity,
    )
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    where: dict[str, Any] = {"host": args.host, "port": args.port}
    if getattr(args, "reuse_port", False):
        import socket

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((args.host, args.port))
        where = {"fd": sock.fileno()}
    uvicorn.run(
        app,
        **where,
        log_level="warning",
        access_log=False,
        loop=loop,
        http="httptools",
        lifespan="off",
    )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    raise SystemExit(serve(parser.parse_args()))
