"""Server-sent events and the OpenAI wire format of a response: `data` payloads out of a
byte stream, the generated text and finish reason of a chunk, an error body's message."""

from __future__ import annotations

from typing import Any

import orjson


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


def finish_reason(obj: dict[str, Any]) -> str | None:
    for choice in obj.get("choices") or ():
        if choice.get("finish_reason"):
            return str(choice["finish_reason"])
    return None


def error_message(body: bytes) -> str:
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:300].decode(errors="replace").strip()
    err = obj.get("error", obj) if isinstance(obj, dict) else obj
    if isinstance(err, dict):
        return str(err.get("message") or err.get("detail") or err)[:300]
    return str(err)[:300]
