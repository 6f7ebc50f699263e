"""POST /v1/chat/completions with the Code Llama Instruct template."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from engine.api.encoding import ChatFrames
from engine.api.errors import APIError, bad_request
from engine.api.generation import (
    Run,
    admit,
    check_context,
    check_counts,
    check_model,
    check_serving,
    default_max_tokens,
    finish_reason,
    first_and_rest,
    new_id,
    sampling_options,
    unless_disconnected,
)
from engine.api.logprobs import chat_logprobs
from engine.api.schemas import ChatCompletionRequest
from engine.api.state import ServerState
from engine.api.streaming import CLIENT_CLOSED, SSEResponse
from engine.codellama import ChatMessage, PromptError

ENDPOINT = "chat"


def _check_unsupported(req: ChatCompletionRequest) -> None:
    if req.tools:
        raise bad_request("tools are not supported by Code Llama Instruct", param="tools")
    fmt = (req.response_format or {}).get("type", "text")
    if fmt != "text":
        raise bad_request(f"response_format '{fmt}' is not supported", param="response_format")
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", param="top_logprobs")


async def create_chat_completion(
    request: Request, req: ChatCompletionRequest, state: ServerState
) -> Response:
    check_serving(state)
    check_model(state, req.model)
    assert state.prompts is not None and state.caps is not None
    if not state.caps.chat:
        raise bad_request(state.caps.why_no_chat, param="model", code="chat_not_supported")
    _check_unsupported(req)
    top_k = (req.top_logprobs or 0) if req.logprobs else None
    check_counts(state, req, 1, top_k)
    try:
        prompt = state.prompts.chat([ChatMessage(m.role, m.text()) for m in req.messages])
    except PromptError as e:
        raise bad_request(str(e), param=e.param) from None
    max_tokens = default_max_tokens(state, len(prompt), req.requested_max_tokens)
    check_context(state, len(prompt), max_tokens, "messages")
    options = sampling_options(req, max_tokens, logprobs=top_k)
    run = admit(state, request, ENDPOINT, "chatcmpl-" + new_id(), [prompt], options)
    created = int(time.time())
    model = state.model.served_name
    if req.stream:
        return await _stream(request, req, run, created, model, top_k)
    body = await unless_disconnected(request, _collect(req, run, created, model, top_k))
    return Response(orjson.dumps(body), media_type="application/json")


async def _collect(
    req: ChatCompletionRequest, run: Run, created: int, model: str, top_k: int | None
) -> dict[str, Any]:
    texts: list[list[str]] = [[] for _ in range(req.n)]
    reasons: list[str | None] = [None] * req.n
    logprobs: list[list[dict[str, Any]]] = [[] for _ in range(req.n)]
    try:
        async for _, step in run.steps():
            for seq in step.sequences:
                texts[seq.index].append(seq.text)
                if top_k is not None and seq.logprobs:
                    logprobs[seq.index] += chat_logprobs(seq.logprobs, top_k)
                if seq.finish_reason is not None:
                    reasons[seq.index] = finish_reason(seq.finish_reason)
    except APIError as e:
        await run.close(e.status)
        raise
    except BaseException:
        await run.close(CLIENT_CLOSED)
        raise
    await run.close(200)
    return {
        "id": run.request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": "".join(texts[i])},
                "logprobs": {"content": logprobs[i]} if top_k is not None else None,
                "finish_reason": reasons[i],
            }
            for i in range(req.n)
        ],
        "usage": run.usage(),
    }


async def _stream(
    request: Request,
    req: ChatCompletionRequest,
    run: Run,
    created: int,
    model: str,
    top_k: int | None,
) -> Response:
    frames = ChatFrames(run.request_id, created, model, req.include_usage)
    try:
        first, rest = await unless_disconnected(request, first_and_rest(run.steps()))
    except APIError as e:
        await run.close(e.status)
        raise
    except BaseException:
        await run.close(CLIENT_CLOSED)
        raise

    async def produce() -> AsyncIterator[bytes]:
        for i in range(req.n):
            yield frames.role(i)
        step_item: tuple[int, Any] | None = first
        while step_item is not None:
            step = step_item[1]
            for seq in step.sequences:
                lp = None
                if top_k is not None and seq.logprobs:
                    lp = {"content": chat_logprobs(seq.logprobs, top_k)}
                yield frames.content(seq.index, seq.text, finish_reason(seq.finish_reason), lp)
            step_item = await anext(rest, None)
        if req.include_usage:
            yield frames.usage(run.usage())

    return SSEResponse(produce(), run.close, coalesce_s=run.state.stream_coalesce_s)


__all__ = ["APIError", "create_chat_completion"]
