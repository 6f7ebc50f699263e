"""POST /v1/chat/completions with the Code Llama Instruct template."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from typing import Any

from engine.api.encoding import ChatFrames
from engine.api.errors import bad_request
from engine.api.logprobs import chat_logprobs
from engine.api.orchestrator import PreparedPrompts
from engine.api.run import Run, Steps
from engine.api.sampling import finish_reason
from engine.api.schemas import ChatCompletionRequest
from engine.api.state import ServerState
from engine.api.validation import check_counts
from engine.codellama import ChatMessage


class Chat:
    name = "chat"
    id_prefix = "chatcmpl-"

    def prepare(self, state: ServerState, req: ChatCompletionRequest) -> PreparedPrompts:
        caps = state.capabilities
        if not caps.chat:
            raise bad_request(caps.why_no_chat, param="model", code="chat_not_supported")
        _check_unsupported(req)
        top_k = _top_k(req)
        check_counts(state, req, 1, top_k)
        prompt = state.code_llama.chat([ChatMessage(m.role, m.text()) for m in req.messages])
        requested = req.requested_max_tokens
        # By default a chat answer may fill the rest of the context window.
        max_tokens = (
            requested if requested is not None else max(1, state.model.max_model_len - len(prompt))
        )
        return PreparedPrompts([prompt], max_tokens, "messages", logprobs=top_k)

    def renderer(
        self, run: Run, req: ChatCompletionRequest, prompts: PreparedPrompts
    ) -> ChatRenderer:
        return ChatRenderer(run, req, _top_k(req))


def _top_k(req: ChatCompletionRequest) -> int | None:
    """Alternatives per token the answer lists (None: no logprobs)."""
    return (req.top_logprobs or 0) if req.logprobs else None


def _check_unsupported(req: ChatCompletionRequest) -> None:
    if req.tools:
        raise bad_request("tools are not supported by Code Llama Instruct", param="tools")
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", param="top_logprobs")


class ChatRenderer:
    """The chat.completion body, or its stream of chunks (the role first)."""

    def __init__(self, run: Run, req: ChatCompletionRequest, top_k: int | None) -> None:
        self.run, self.req, self.top_k = run, req, top_k
        self.created = int(time.time())
        self.model = run.model_name

    async def body(self, steps: Steps) -> dict[str, Any]:
        n, top_k = self.req.n, self.top_k
        texts: list[list[str]] = [[] for _ in range(n)]
        reasons: list[str | None] = [None] * n
        logprobs: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        async for _, step in steps:
            for seq in step.sequences:
                texts[seq.index].append(seq.text)
                if top_k is not None and seq.logprobs:
                    logprobs[seq.index] += chat_logprobs(seq.logprobs, top_k)
                if seq.finish_reason is not None:
                    reasons[seq.index] = finish_reason(seq.finish_reason)
        return {
            "id": self.run.request_id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": "".join(texts[i])},
                    "logprobs": {"content": logprobs[i]} if top_k is not None else None,
                    "finish_reason": reasons[i],
                }
                for i in range(n)
            ],
            "usage": self.run.usage(),
        }

    async def frames(self, steps: Steps) -> AsyncGenerator[bytes, None]:
        req, top_k = self.req, self.top_k
        frames = ChatFrames(self.run.request_id, self.created, self.model, req.include_usage)
        for i in range(req.n):
            yield frames.role(i)
        async for _, step in steps:
            for seq in step.sequences:
                lp = None
                if top_k is not None and seq.logprobs:
                    lp = {"content": chat_logprobs(seq.logprobs, top_k)}
                yield frames.content(seq.index, seq.text, finish_reason(seq.finish_reason), lp)
        if req.include_usage:
            yield frames.usage(self.run.usage())
