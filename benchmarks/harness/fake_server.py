"""A fake OpenAI-compatible server: a trivial endpoint for the harness's own tests
and for measuring how fast one harness process can go.

It generates nothing: each request streams `max_tokens` chunks of one word,
after an optional first-token delay and per-token delay, with a role-only and
an empty chunk first on chat (as real servers do), then usage and [DONE].
`capacity` emulates a server that runs at most that many requests at once and
queues the rest, so a sweep against it saturates at a known rate.
What an editor needs of a server is there too: `suffix` accepted (or refused,
as vLLM's server does), `stop` honoured, a client that closes the connection
noticed at once and counted as an abort with the tokens it had been sent, a
prefix cache counted over 64-character blocks, and a replica header. With
`answers: oracle` it returns HumanEval's canonical solutions and infill middles
(fake_answers.py), with `wrong` wrong code: the quality scores' own test.
A raw ASGI app (no framework) so that the server, not the client, is cheap.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from benchmarks.harness.fake_answers import Answers, answer_pieces, apply_stop, prompt_text

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
    answers: Answers = "words"
    load_dependent: bool = False  # outputs change with other requests running (a batching bug)
    replica_id: str | None = None  # sent as X-Codellama-Replica
    prefix_block_chars: int = 64  # the prefix cache's block (16 "tokens" of 4 characters)
    finished: int = 0
    served: int = 0
    running: int = 0
    waiting: int = 0
    generated: int = 0
    last_authorization: str | None = None
    aborted: int = 0  # client went away before the end
    aborted_tokens: int = 0  # tokens it had been sent by then
    prefix_queries: int = 0  # prompt "tokens" (4 characters) looked up
    prefix_hits: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    _blocks: set[int] = field(default_factory=set, repr=False)
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
            chat = path.endswith("chat/completions")
            await self.generate(send, orjson.loads(body), chat=chat, receive=receive)
        else:
            await _json(send, 404, {"error": {"message": f"no route {method} {path}"}})

    def metrics(self) -> str:
        p = "codellama_serve"
        statuses = self.statuses or Counter({"200": 0})
        lines = [
            f"{p}_requests_running {self.running}",
            f"{p}_requests_waiting {self.waiting}",
            *(
                f'{p}_requests_total{{endpoint="completions",status="{k}"}} {v}'
                for k, v in sorted(statuses.items())
            ),
            f"{p}_generation_tokens_total {self.generated}",
            f'{p}_requests_aborted_total{{reason="client_disconnect"}} {self.aborted}',
            f'{p}_aborted_generation_tokens_total{{reason="client_disconnect"}} '
            f"{self.aborted_tokens}",
            f"{p}_prefix_cache_queries_total {self.prefix_queries}",
            f"{p}_prefix_cache_hits_total {self.prefix_hits}",
            f"process_cpu_seconds_total {time.process_time()}",
        ]
        return "\n".join(lines) + "\n"

    def _prefix_cache(self, req: dict[str, Any]) -> None:
        """Count the prompt's full blocks, and the leading run of them seen before (as vLLM)."""
        text, size = prompt_text(req), self.prefix_block_chars
        h, hitting = 0, True
        for i in range(len(text) // size):
            h = hash((h, text[i * size : (i + 1) * size]))
            self.prefix_queries += size // 4
            if hitting and h in self._blocks:
                self.prefix_hits += size // 4
            else:
                hitting = False
                self._blocks.add(h)

    async def generate(
        self, send: Any, req: dict[str, Any], chat: bool, receive: Any = None
    ) -> None:
        self.served += 1
        n_req = self.served
        if self.fail_every and n_req % self.fail_every == 0:
            self.statuses["500"] += 1
            await _json(send, 500, {"error": {"message": "injected failure"}})
            return
        if req.get("suffix") is not None and self.reject_suffix:
            self.statuses["400"] += 1
            await _json(send, 400, {"error": {"message": "suffix is not currently supported"}})
            return
        self._prefix_cache(req)
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
                await self._respond(send, req, chat, n, n_req, receive)
            finally:
                if self.book_delay_s:
                    await asyncio.sleep(self.book_delay_s)
                self.finished += 1
                self.running -= 1

    async def _respond(
        self, send: Any, req: dict[str, Any], chat: bool, n: int, n_req: int, receive: Any = None
    ) -> None:
        variant = "x" if self.load_dependent and self.running > 1 else ""
        pieces = answer_pieces(req, self.answers, n, variant)
        stop = req.get("stop") or []
        pieces, stopped = apply_stop(pieces, [stop] if isinstance(stop, str) else list(stop))
        reason = "stop" if stopped or len(pieces) < n else "length"
        if not req.get("stream"):
            await asyncio.sleep(self.ttft_s + self.token_delay_s * max(0, len(pieces) - 1))
            await self._whole(send, chat, "".join(pieces), reason)
            return
        gone = asyncio.Event()
        watcher = asyncio.create_task(_watch_disconnect(receive, gone)) if receive else None
        try:
            sent = await self._stream(send, req, chat, pieces, reason, n_req, gone)
        finally:
            if watcher is not None:
                watcher.cancel()
        if sent is None:
            self.statuses["200"] += 1
            self.generated += len(pieces)
        else:  # the client closed the connection: what it had been sent is thrown away
            self.statuses["499"] += 1
            self.aborted += 1
            self.aborted_tokens += sent

    def _usage(self, k: int) -> dict[str, int] | None:
        return {"prompt_tokens": 8, "completion_tokens": k, "total_tokens": 8 + k}

    async def _whole(self, send: Any, chat: bool, text: str, reason: str) -> None:
        choice = (
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
            if chat
            else {"index": 0, "text": text, "finish_reason": reason}
        )
        k = max(1, len(text) // 4) if text else 0
        self.statuses["200"] += 1
        self.generated += k
        usage = self._usage(k) if self.send_usage else None
        await _json(send, 200, {"id": "x", "choices": [choice], "usage": usage})

    async def _stream(
        self,
        send: Any,
        req: dict[str, Any],
        chat: bool,
        pieces: list[str],
        reason: str,
        n_req: int,
        gone: asyncio.Event,
    ) -> int | None:
        """Stream the pieces; None when done, else how many the client got before it left."""
        event = await self._start_stream(send, chat)
        want_usage = (req.get("stream_options") or {}).get("include_usage") and self.send_usage
        # Plain sleeps (cheap: this server is also the harness's speed test); a client
        # that left is noticed at the next token.
        if self.ttft_s:
            await asyncio.sleep(self.ttft_s)
        for i, piece in enumerate(pieces):
            if i and self.token_delay_s:
                await asyncio.sleep(self.token_delay_s)
            if gone.is_set():
                return i
            last = i == len(pieces) - 1
            if self.error_midstream_every and n_req % self.error_midstream_every == 0 and last:
                await event({"error": {"message": "injected mid-stream error", "code": 500}})
                break
            await event({"choices": [_choice(chat, piece, reason if last else None)]})
        if gone.is_set():
            return len(pieces)
        if want_usage:
            await event({"choices": [], "usage": self._usage(len(pieces))})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        return None

    async def _start_stream(self, send: Any, chat: bool) -> Callable[[Any], Awaitable[None]]:
        """Headers (and a chat's first chunks); the function that sends one event."""
        headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        if self.replica_id:
            headers.append((b"x-codellama-replica", self.replica_id.encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})

        async def event(obj: Any) -> None:
            body = b"data: " + orjson.dumps(obj) + b"\n\n"
            await send({"type": "http.response.body", "body": body, "more_body": True})

        if chat:  # role-only, then empty content: neither carries a token
            await event({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
            await event({"choices": [{"index": 0, "delta": {"content": ""}}]})
        return event


def _choice(chat: bool, piece: str, reason: str | None) -> dict[str, Any]:
    if chat:
        return {"index": 0, "delta": {"content": piece}, "finish_reason": reason}
    return {"index": 0, "text": piece, "finish_reason": reason}


async def _watch_disconnect(receive: Any, gone: asyncio.Event) -> None:
    """Set `gone` when the client closes the connection (uvicorn then drops what we send)."""
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            gone.set()
            return


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
    p.add_argument("--reject-suffix", action="store_true", help="answer 400 to `suffix` (as vLLM)")
    p.add_argument(
        "--answers", choices=["words", "oracle", "wrong"], default="words",
        help="oracle: HumanEval's canonical solutions and infill middles; wrong: wrong code",
    )  # fmt: skip
    p.add_argument("--replica-id", help="sent as the X-Codellama-Replica header")


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    app = FakeOpenAI(
        model=args.model,
        ttft_s=args.ttft_ms / 1000,
        token_delay_s=args.token_delay_ms / 1000,
        capacity=args.capacity,
        reject_suffix=args.reject_suffix,
        answers=args.answers,
        replica_id=args.replica_id,
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
