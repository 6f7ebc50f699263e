"""Logprobs in the two OpenAI shapes: legacy completions and chat."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from engine.llm import TokenLogprob


def _num(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no -inf


def completion_logprobs(
    entries: Sequence[TokenLogprob | None], text_offset: int
) -> tuple[dict[str, Any], int]:
    """{tokens, token_logprobs, top_logprobs, text_offset} and the offset after them."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float | None] | None] = []
    offsets: list[int] = []
    for e in entries:
        offsets.append(text_offset)
        if e is None:  # the first prompt token has no logprob
            tokens.append("")
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        tokens.append(e.token)
        token_logprobs.append(_num(e.logprob))
        # OpenAI: the sampled token is always listed, so up to k+1 entries.
        top = {text: _num(lp) for _, text, lp in e.top}
        top.setdefault(e.token, _num(e.logprob))
        top_logprobs.append(top)
        text_offset += len(e.token)
    return (
        {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": offsets,
        },
        text_offset,
    )


def merge_completion_logprobs(into: dict[str, Any] | None, more: dict[str, Any]) -> dict[str, Any]:
    if into is None:
        return more
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        into[key].extend(more[key])
    return into


def _chat_token(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": _num(logprob), "bytes": list(token.encode("utf-8"))}


def chat_logprobs(entries: list[TokenLogprob], top_k: int) -> list[dict[str, Any]]:
    """The `content` list of a chat choice's logprobs."""
    out = []
    for e in entries:
        item = _chat_token(e.token, e.logprob)
        item["top_logprobs"] = [_chat_token(text, lp) for _, text, lp in e.top[:top_k]]
        out.append(item)
    return out
