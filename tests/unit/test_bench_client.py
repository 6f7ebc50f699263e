"""The harness's HTTP client: SSE parsing, timing, failures (fake servers only)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import httpx
import orjson
import pytest

import benchmarks.harness.client as client_mod
from benchmarks.harness.client import OpenAIClient, Target, build_payload, discover_model
from benchmarks.harness.datasets import RequestItem
from benchmarks.harness.fake_server import FakeOpenAI, FakeServerThread
from benchmarks.harness.metrics import tpot, ttft
from benchmarks.harness.profile.schema import RequestOptions
from benchmarks.harness.records import RequestRecord
from benchmarks.harness.sse import SSEParser, chunk_text
from benchmarks.harness.transport import HttpxTransport, make_transport

# ---------------------------------------------------------------- SSE


def test_sse_parser_handles_split_events_crlf_comments_and_multiline_data() -> None:
    p = SSEParser()
    stream = (
        b': ping\n\ndata: {"a":1}\n\ndata: {"b"'
        + b":2}\r\n\r\ndata: x\ndata: y\n\ndata: [DONE]\n\n"
    )
    out = []
    for i in range(0, len(stream), 7):  # arbitrary network splits
        out += list(p.feed(stream[i : i + 7]))
    assert out == [b'{"a":1}', b'{"b":2}', b"x\ny", b"[DONE]"]
    assert p.tail() == b""
    # A CRLF split between two reads is one line end, not a blank line.
    p = SSEParser()
    assert p.feed(b"data: a\r") == [] and p.feed(b"\ndata: b\r") == []
    assert p.feed(b"\n\r\n") == [b"a\nb"]
    p.feed(b"data: {partial")
    assert list(p.feed(b"")) == [] and p.tail() == b"data: {partial"


def test_chunk_text_ignores_role_only_and_empty_chunks() -> None:
    assert chunk_text({"choices": [{"index": 0, "delta": {"role": "assistant"}}]}) == ""
    assert (
        chunk_text({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}) == ""
    )
    assert chunk_text({"choices": [{"delta": {"content": "def"}}]}) == "def"
    assert chunk_text({"choices": [{"text": " x"}]}) == " x"
    assert chunk_text({"choices": [{"text": ""}]}) == ""
    assert chunk_text({"choices": [], "usage": {"completion_tokens": 3}}) == ""
    assert chunk_text({"choices": [{"delta": {"reasoning_content": "hm"}}]}) == "hm"


def test_payloads() -> None:
    opts = RequestOptions(max_tokens=32, ignore_eos=True, temperature=0.0, extra_body={"top_k": 5})
    path, body = build_payload(RequestItem("a", prompt="def f(", suffix="\n"), "m", opts)
    assert path == "/completions"
    assert body == {
        "model": "m",
        "stream": True,
        "prompt": "def f(",
        "suffix": "\n",
        "max_tokens": 32,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "temperature": 0.0,
        "top_k": 5,
    }
    msgs = ({"role": "user", "content": "hi"},)
    path, body = build_payload(
        RequestItem("b", messages=msgs, max_tokens=7), "m", RequestOptions(stream=False)
    )
    assert path == "/chat/completions" and body["messages"] == list(msgs)
    assert body["max_tokens"] == 7 and "stream_options" not in body and "ignore_eos" not in body


def test_target_urls() -> None:
    t = Target("http://h:1/v1/")
    assert (t.root, t.api, t.prometheus_url) == (
        "http://h:1",
        "http://h:1/v1",
        "http://h:1/metrics",
    )
    assert Target("http://h:1", metrics_url="http://m/x").prometheus_url == "http://m/x"


# ---------------------------------------------------------------- timing with a fake clock


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def sse(obj: object) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else orjson.dumps(obj)) + b"\n\n"


def scripted(
    clock: FakeClock, status: int, parts: list[tuple[float, bytes]], headers_at: float = 0.0
) -> Callable[[httpx.Request], httpx.Response]:
    """A MockTransport handler: headers at `headers_at`, then each body part at its time."""
    seen: list[httpx.Request] = []

    class Body(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            for t, b in parts:
                clock.t = t
                yield b

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        clock.t = headers_at
        return httpx.Response(status, stream=Body())

    handler.seen = seen  # type: ignore[attr-defined]
    return handler


async def send_with(
    handler: Callable[[httpx.Request], httpx.Response],
    monkeypatch: pytest.MonkeyPatch,
    clock: FakeClock,
    item: RequestItem,
    opts: RequestOptions | None = None,
    api_key: str | None = None,
) -> RequestRecord:
    monkeypatch.setattr(client_mod, "now", clock)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    mock = httpx.AsyncClient(transport=httpx.MockTransport(handler), headers=headers)
    async with mock:
        http = HttpxTransport(client=mock)
        c = OpenAIClient(http, Target("http://fake"), "m", opts or RequestOptions())
        clock.t = 1.0
        return await c.send(item, RequestRecord(0, item.id))


CHAT = RequestItem("c", messages=({"role": "user", "content": "hi"},))


async def test_ttft_ignores_a_role_only_first_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    role = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    empty = {"choices": [{"index": 0, "delta": {"content": ""}}]}

    def tok(s: str, reason: str | None = None) -> dict:
        return {"choices": [{"index": 0, "delta": {"content": s}, "finish_reason": reason}]}

    usage = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 4}}
    handler = scripted(
        clock,
        200,
        [
            (1.010, sse(role)),
            (1.020, sse(empty)),
            (1.300, sse(tok("a"))),
            (1.350, sse(tok("b")) + sse(tok("c"))),  # two events in one network read
            (1.500, sse(tok("d", "length"))),
            (1.510, sse(usage)),
            (1.520, sse(b"[DONE]")),
        ],
        headers_at=1.005,
    )
    r = await send_with(handler, monkeypatch, clock, CHAT)
    assert r.ok, r.error
    assert r.first_byte == pytest.approx(1.005)
    assert r.token_times == pytest.approx([1.3, 1.35, 1.35, 1.5])
    assert ttft(r) == pytest.approx(0.3)  # not 0.01: the role chunk carries no token
    assert r.output_tokens == 4 and r.prompt_tokens == 5 and r.text == "abcd"
    assert tpot(r) == pytest.approx((1.5 - 1.3) / 3)
    assert r.finished == pytest.approx(1.52) and r.finish_reason == "length"
    assert r.chunks == 8  # every data event, [DONE] included
    body = orjson.loads(handler.seen[0].content)  # type: ignore[attr-defined]
    assert body["stream_options"] == {"include_usage": True}


async def test_http_errors_are_recorded_with_the_server_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = FakeClock()
    body = orjson.dumps(
        {"error": {"message": "suffix is not supported", "type": "BadRequestError"}}
    )
    r = await send_with(
        scripted(clock, 400, [(1.1, body)]),
        monkeypatch,
        clock,
        RequestItem("x", prompt="p", suffix="s"),
    )
    assert not r.ok and r.status == 400
    assert r.error == "HTTP 400: suffix is not supported"
    assert r.finished is not None


async def test_an_error_event_mid_stream_fails_the_request(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    parts = [
        (1.1, sse({"choices": [{"text": "x"}]})),
        (1.2, sse({"error": {"message": "engine died"}})),
        (1.3, sse(b"[DONE]")),
    ]
    r = await send_with(
        scripted(clock, 200, parts), monkeypatch, clock, RequestItem("x", prompt="p")
    )
    assert not r.ok and "engine died" in (r.error or "")


async def test_a_stream_cut_short_fails_the_request(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    parts = [(1.1, sse({"choices": [{"text": "x"}]})), (1.2, b'data: {"choi')]
    r = await send_with(
        scripted(clock, 200, parts), monkeypatch, clock, RequestItem("x", prompt="p")
    )
    assert not r.ok and r.error is not None and r.error.startswith("stream ended without [DONE]")
    assert r.token_times == [1.1]  # what did arrive is kept


async def test_unstreamed_responses_use_usage_and_have_no_ttft(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = FakeClock()
    body = orjson.dumps(
        {
            "choices": [{"text": "abc", "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 9},
        }
    )
    r = await send_with(
        scripted(clock, 200, [(1.4, body)]),
        monkeypatch,
        clock,
        RequestItem("x", prompt="p"),
        RequestOptions(stream=False),
        api_key="sekrit",
    )
    assert r.ok and r.output_tokens == 9 and r.text == "abc" and ttft(r) is None
    assert r.finished == pytest.approx(1.4)


@pytest.mark.parametrize("library", ["aiohttp", "httpx"])
async def test_connection_refused_is_a_failed_request_not_a_crash(library: str) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = Target(f"http://127.0.0.1:{port}")
    http = make_transport(library, 1, 5, None)  # type: ignore[arg-type]
    try:
        r = await OpenAIClient(http, t, "m", RequestOptions()).send(
            RequestItem("x", prompt="p"), RequestRecord(0, "x")
        )
    finally:
        await http.aclose()
    assert not r.ok and r.error is not None and "Connect" in r.error


# ---------------------------------------------------------------- a real (fake) server


@pytest.mark.parametrize("library", ["aiohttp", "httpx"])
async def test_against_a_fake_server_over_http(library: str) -> None:
    app = FakeOpenAI(ttft_s=0.05, token_delay_s=0.005)
    with FakeServerThread(app) as srv:
        t = Target(srv.base_url, api_key="k1")
        http = make_transport(library, 4, 10, t.api_key)  # type: ignore[arg-type]
        try:
            assert await discover_model(http, t) == "fake-model"
            c = OpenAIClient(http, t, "fake-model", RequestOptions(max_tokens=5))
            c.t0 = client_mod.now()
            r = await c.send(CHAT, RequestRecord(0, "c"))
        finally:
            await http.aclose()
    assert app.last_authorization == "Bearer k1"
    assert r.ok, r.error
    assert len(r.token_times) == 5 and r.output_tokens == 5
    # The role and empty chunks came at once; the first token 50 ms later.
    assert ttft(r) >= 0.05
    assert r.chunks == 5 + 2 + 2  # tokens, role + empty, usage + [DONE]
