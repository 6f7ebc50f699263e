"""The wire format on the hot path: SSE frames and response bodies as bytes.

A streamed token costs one `orjson.dumps` of its text and one bytes join: the
parts of each frame that never change within a request (id, model, created,
index) are encoded once, when the request starts.
"""

from __future__ import annotations

from typing import Any

import orjson

DONE = b"data: [DONE]\n\n"
_dumps = orjson.dumps


def sse(obj: Any) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


def finish_json(reason: str | None) -> bytes:
    return b"null" if reason is None else b'"' + reason.encode() + b'"'


class _Frames:
    """What the frames of one stream share: a head encoded once, the closing usage chunk."""

    __slots__ = ("_head", "_usage_null")

    _head: bytes  # `data: {...,"choices":[{"index":` up to the choice's index
    _usage_null: bytes

    def usage(self, usage: dict[str, int]) -> bytes:
        return (
            self._head[: self._head.rindex(b'[{"index":')]
            + b'[],"usage":'
            + _dumps(usage)
            + b"}\n\n"
        )


class CompletionFrames(_Frames):
    """SSE frames of one /v1/completions stream."""

    __slots__ = ()

    def __init__(self, request_id: str, created: int, model: str, include_usage: bool) -> None:
        self._head = (
            b'data: {"id":' + _dumps(request_id) + b',"object":"text_completion","created":'
            + str(created).encode() + b',"model":' + _dumps(model) + b',"choices":[{"index":'
        )  # fmt: skip
        # With include_usage, OpenAI sends "usage": null on every chunk but the last.
        self._usage_null = b',"usage":null' if include_usage else b""

    def text(self, index: int, text: str, finish_reason: str | None, logprobs: Any = None) -> bytes:
        return b"".join((
            self._head, str(index).encode(), b',"text":', _dumps(text),
            b',"logprobs":', b"null" if logprobs is None else _dumps(logprobs),
            b',"finish_reason":', finish_json(finish_reason), b"}]", self._usage_null, b"}\n\n",
        ))  # fmt: skip


class ChatFrames(_Frames):
    """SSE frames of one /v1/chat/completions stream."""

    __slots__ = ()

    def __init__(self, request_id: str, created: int, model: str, include_usage: bool) -> None:
        self._head = (
            b'data: {"id":' + _dumps(request_id) + b',"object":"chat.completion.chunk","created":'
            + str(created).encode() + b',"model":' + _dumps(model)
            + b',"system_fingerprint":null,"choices":[{"index":'
        )  # fmt: skip
        self._usage_null = b',"usage":null' if include_usage else b""

    def role(self, index: int) -> bytes:
        return b"".join((
            self._head, str(index).encode(),
            b',"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]',
            self._usage_null, b"}\n\n",
        ))  # fmt: skip

    def content(
        self, index: int, text: str, finish_reason: str | None, logprobs: Any = None
    ) -> bytes:
        delta = b'{"content":' + _dumps(text) + b"}" if text or finish_reason is None else b"{}"
        return b"".join((
            self._head, str(index).encode(), b',"delta":', delta,
            b',"logprobs":', b"null" if logprobs is None else _dumps(logprobs),
            b',"finish_reason":', finish_json(finish_reason), b"}]", self._usage_null, b"}\n\n",
        ))  # fmt: skip


def error_frame(error_body: dict[str, Any]) -> bytes:
    return sse(error_body)
