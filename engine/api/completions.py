"""POST /v1/completions, with Code Llama fill-in-the-middle through `suffix`."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from engine.api.encoding import CompletionFrames
from engine.api.errors import APIError, bad_request
from engine.api.generation import (
    Run,
    admit,
    check_context,
    check_counts,
    check_model,
    check_serving,
    finish_reason,
    first_and_rest,
    new_id,
    sampling_options,
    unless_disconnected,
)
from engine.api.logprobs import completion_logprobs, merge_completion_logprobs
from engine.api.schemas import CompletionRequest
from engine.api.state import ServerState
from engine.api.streaming import CLIENT_CLOSED, SSEResponse
from engine.codellama import PromptError

ENDPOINT = "completions"


def _prompt_ids(
    state: ServerState, req: CompletionRequest
) -> tuple[list[list[int]], list[str], list[int]]:
    """Token ids per prompt, the text each echoes, and extra stop token ids."""
    prompts = state.prompts
    assert prompts is not None and state.caps is not None
    given = req.prompts()
    try:
        if req.suffix is not None:
            if not state.caps.infill:
                raise bad_request(state.caps.why_no_infill, param="suffix")
            if req.echo:
                raise bad_request("`echo` cannot be combined with `suffix`", param="echo")
            if not all(isinstance(p, str) for p in given):
                raise bad_request("`suffix` needs text prompts, not token ids", param="prompt")
            ids = [prompts.infill(p, req.suffix, req.suffix_first) for p in given]  # type: ignore[arg-type]
            return ids, [], [prompts.ids.eot]  # type: ignore[list-item]
        if isinstance(given[0], str):
            texts = list(given) if req.echo else []
            return [prompts.completion(p) for p in given], texts, []  # type: ignore[arg-type]
    except PromptError as e:
        raise bad_request(str(e), param=e.param or "prompt") from None
    vocab = state.model.vocab_size
    for p in given:
        bad = next((t for t in p if t >= vocab), None)  # type: ignore[operator,union-attr]
        if bad is not None:
            raise bad_request(
                f"token id {bad} is out of range (vocabulary size {vocab})", param="prompt"
            )
    texts = [state.engine.tokenizer.decode(p) for p in given] if req.echo else []
    return [list(p) for p in given], texts, []  # type: ignore[arg-type]


async def create_completion(
    request: Request, req: CompletionRequest, state: ServerState
) -> Response:
    check_serving(state)
    check_model(state, req.model)
    check_counts(state, req, len(req.prompts()), req.logprobs)
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of is not supported unless it equals n", param="best_of")
    prompt_ids, echo_texts, stop_ids = _prompt_ids(state, req)
    max_tokens = req.max_tokens if req.max_tokens is not None else 16
    for ids in prompt_ids:
        check_context(state, len(ids), max_tokens, "max_tokens")
    want_prompt_logprobs = req.echo and req.logprobs is not None
    options = sampling_options(
        req, max_tokens, stop_token_ids=stop_ids, logprobs=req.logprobs,
        prompt_logprobs=req.logprobs if want_prompt_logprobs else None,
    )  # fmt: skip
    run = admit(state, request, ENDPOINT, "cmpl-" + new_id(), prompt_ids, options)
    created = int(time.time())
    model = state.model.served_name
    # Our own BOS is not in the echoed text, so its (empty) logprob entry goes.
    drop_bos = 1 if echo_texts and isinstance(req.prompts()[0], str) else 0
    if req.stream:
        return await _stream(request, req, state, run, created, model, echo_texts, drop_bos)
    body = await unless_disconnected(
        request, _collect(req, run, created, model, echo_texts, drop_bos)
    )
    return Response(orjson.dumps(body), media_type="application/json")


def _echo_logprobs(step_prompt_logprobs: Any, drop_bos: int) -> tuple[dict[str, Any] | None, int]:
    if step_prompt_logprobs is None:
        return None, 0
    return completion_logprobs(step_prompt_logprobs[drop_bos:], 0)


async def _collect(
    req: CompletionRequest, run: Run, created: int, model: str, echo: list[str], drop_bos: int
) -> dict[str, Any]:
    n = req.n
    count = len(run.prompts) * n
    texts: list[list[str]] = [[echo[i // n]] if echo else [] for i in range(count)]
    reasons: list[str | None] = [None] * count
    logprobs: list[dict[str, Any] | None] = [None] * count
    offsets = [len(t[0]) if t else 0 for t in texts]
    echoed = [False] * count
    try:
        async for p, step in run.steps():
            for seq in step.sequences:
                i = p * n + seq.index
                if step.prompt_logprobs is not None and not echoed[i]:
                    echoed[i] = True
                    logprobs[i], _ = _echo_logprobs(step.prompt_logprobs, drop_bos)
                texts[i].append(seq.text)
                if seq.logprobs is not None:
                    lp, offsets[i] = completion_logprobs(seq.logprobs, offsets[i])  # type: ignore[arg-type]
                    logprobs[i] = merge_completion_logprobs(logprobs[i], lp)
                if seq.finish_reason is not None:
                    reasons[i] = finish_reason(seq.finish_reason)
    except APIError as e:
        await run.close(e.status)
        raise
    except BaseException:
        await run.close(CLIENT_CLOSED)
        raise
    await run.close(200)
    return {
        "id": run.request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": i,
                "text": "".join(texts[i]),
                "logprobs": logprobs[i],
                "finish_reason": reasons[i],
            }
            for i in range(count)
        ],
        "usage": run.usage(),
    }


async def _stream(
    request: Request,
    req: CompletionRequest,
    state: ServerState,
    run: Run,
    created: int,
    model: str,
    echo: list[str],
    drop_bos: int,
) -> Response:
    frames = CompletionFrames(run.request_id, created, model, req.include_usage)
    try:
        first, rest = await unless_disconnected(request, first_and_rest(run.steps()))
    except APIError as e:
        await run.close(e.status)
        raise
    except BaseException:
        await run.close(CLIENT_CLOSED)
        raise
    n = req.n
    offsets = [len(echo[i // n]) if echo else 0 for i in range(len(run.prompts) * n)]
    sent_echo = [False] * len(offsets)

    async def produce() -> AsyncIterator[bytes]:
        step_item: tuple[int, Any] | None = first
        while step_item is not None:
            p, step = step_item
            for seq in step.sequences:
                i = p * n + seq.index
                if echo and not sent_echo[i]:
                    sent_echo[i] = True
                    lp, _ = _echo_logprobs(step.prompt_logprobs, drop_bos)
                    yield frames.text(i, echo[p], None, lp)
                lp = None
                if seq.logprobs is not None:
                    lp, offsets[i] = completion_logprobs(seq.logprobs, offsets[i])  # type: ignore[arg-type]
                yield frames.text(i, seq.text, finish_reason(seq.finish_reason), lp)
            step_item = await anext(rest, None)
        if req.include_usage:
            yield frames.usage(run.usage())

    return SSEResponse(produce(), run.close, coalesce_s=state.stream_coalesce_s)
