"""The routing key of a request: the prompt as the engine will see it.

vLLM's prefix cache matches token ids, block by block from the first token, so
a router that wants requests to find the replica holding their cached blocks
must key on exactly the token sequence our API hands the engine, not on the
HTTP text: for an infill request that is `BOS ▁<PRE>` + the prefix first (so
keystroke requests of one file share their blocks), for chat the system
message and earlier turns first, for a plain completion BOS + the text.

The body is read with the API's own request models and turned into ids by the
same `CodeLlamaPrompts` calls the endpoints make; anything that would be a 4xx
there has no key here (the router then balances load, and the replica answers
with the error).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from engine.api.schemas import ChatCompletionRequest, CompletionRequest
from engine.codellama import ChatMessage, CodeLlamaPrompts, PromptError


def engine_prompt(
    prompts: CodeLlamaPrompts, body: Mapping[str, Any], max_chars: int | None = None
) -> list[int] | None:
    """The token ids of the (first) engine request `body` makes, or None if it makes none
    (or if its text is longer than `max_chars`: a prompt far beyond the context window is
    refused by the replica anyway, and tokenizing it would stall the router)."""
    if max_chars is not None and _text_size(body) > max_chars:
        return None
    try:
        if "messages" in body:
            chat = ChatCompletionRequest.model_validate(body)
            return prompts.chat([ChatMessage(m.role, m.text()) for m in chat.messages])
        if "prompt" not in body:
            return None
        req = CompletionRequest.model_validate(body)
    except (ValidationError, PromptError):
        return None
    first = req.prompts()[0]
    if isinstance(first, list):  # token ids are the engine's prompt as they are
        return list(first) if req.suffix is None else None
    if req.suffix is not None:
        try:
            return prompts.infill(first, req.suffix, req.suffix_first)
        except PromptError:
            return None
    return prompts.completion(first)


def _text_size(body: Mapping[str, Any]) -> int:
    """Characters of prompt text in a body, counted before anything is parsed."""

    def size(value: Any) -> int:
        if isinstance(value, str):
            return len(value)
        if isinstance(value, list):
            return sum(size(v) for v in value)
        if isinstance(value, dict):
            return size(value.get("content")) + size(value.get("text"))
        return 0

    return size(body.get("prompt")) + size(body.get("suffix")) + size(body.get("messages"))


def session_key(body: Mapping[str, Any]) -> str | None:
    """The OpenAI `user` field: a client's own session key when it sends no header."""
    user = body.get("user")
    return user if isinstance(user, str) and user else None


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """A chain of hashes, one per full block of `block_size` tokens, each covering
    every token before it: two prompts share the first k hashes exactly when they
    share their first k blocks, as in vLLM's prefix cache (a partial last block
    is never cached, so it has no hash). Hashes of int tuples are the same in every
    process (no hash randomisation for ints), so routers agree on them."""
    return list(_chain(token_ids, block_size))


def _chain(token_ids: Sequence[int], block_size: int) -> Iterator[int]:
    parent = 0
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash((parent, tuple(token_ids[start : start + block_size])))
        yield parent
