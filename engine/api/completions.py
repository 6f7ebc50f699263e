"""POST /v1/completions, with Code Llama fill-in-the-middle through `suffix`."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from typing import Any

from engine.api.encoding import CompletionFrames
from engine.api.errors import bad_request
from engine.api.logprobs import completion_logprobs, merge_completion_logprobs
from engine.api.orchestrator import PreparedPrompts
from engine.api.run import Run, Steps
from engine.api.sampling import finish_reason
from engine.api.schemas import CompletionRequest
from engine.api.state import ServerState
from engine.api.validation import check_counts

DEFAULT_MAX_TOKENS = 16  # OpenAI's


class Completions:
    name = "completions"
    id_prefix = "cmpl-"

    def prepare(self, state: ServerState, req: CompletionRequest) -> PreparedPrompts:
        given = req.prompts()
        check_counts(state, req, len(given), req.logprobs)
        if req.best_of is not None and req.best_of != req.n:
            raise bad_request("best_of is not supported unless it equals n", param="best_of")
        max_tokens = req.max_tokens if req.max_tokens is not None else DEFAULT_MAX_TOKENS

        def prepared(
            ids: list[list[int]], echo: list[str] | None = None, stops: list[int] | None = None
        ) -> PreparedPrompts:
            return PreparedPrompts(
                ids, max_tokens, "max_tokens", echo_texts=echo or [], stop_token_ids=stops or [],
                logprobs=req.logprobs,
                prompt_logprobs=req.logprobs if req.echo else None,
                infill=req.suffix is not None,
            )  # fmt: skip

        texts = [p for p in given if isinstance(p, str)]
        if req.suffix is not None:
            ids, eot = _infill(state, req, texts, len(given))
            return prepared(ids, stops=[eot])
        prompts = state.code_llama
        if texts:
            return prepared([prompts.completion(t) for t in texts], texts if req.echo else None)
        ids = [p for p in given if isinstance(p, list)]
        _check_token_ids(state, ids)
        echo = [state.engine.tokenizer.decode(p) for p in ids] if req.echo else None
        return prepared([list(p) for p in ids], echo)

    def renderer(
        self, run: Run, req: CompletionRequest, prompts: PreparedPrompts
    ) -> CompletionRenderer:
        return CompletionRenderer(run, req, prompts)


def _infill(
    state: ServerState, req: CompletionRequest, texts: list[str], given: int
) -> tuple[list[list[int]], int]:
    """Fill-in-the-middle prompts (PSM, or SPM with suffix_first) and their stop token."""
    caps, prompts = state.capabilities, state.code_llama
    assert req.suffix is not None
    if not caps.infill:
        raise bad_request(caps.why_no_infill, param="suffix")
    if req.echo:
        raise bad_request("`echo` cannot be combined with `suffix`", param="echo")
    if len(texts) != given:
        raise bad_request("`suffix` needs text prompts, not token ids", param="prompt")
    ids = [prompts.infill(p, req.suffix, req.suffix_first) for p in texts]
    eot = prompts.ids.eot
    assert eot is not None  # caps.infill implies the infill tokens exist
    return ids, eot


def _check_token_ids(state: ServerState, prompts: list[list[int]]) -> None:
    vocab = state.model.vocab_size
    for p in prompts:
        bad = next((t for t in p if t >= vocab), None)
        if bad is not None:
            raise bad_request(
                f"token id {bad} is out of range (vocabulary size {vocab})", param="prompt"
            )


class CompletionRenderer:
    """The text_completion body, or its stream of chunks."""

    def __init__(self, run: Run, req: CompletionRequest, prompts: PreparedPrompts) -> None:
        self.run, self.req = run, req
        self.created = int(time.time())
        self.model = run.model_name
        self.n = req.n
        self.echo = prompts.echo_texts
        # Our own BOS is not in the echoed text, so its (empty) logprob entry goes.
        self.drop_bos = 1 if self.echo and isinstance(req.prompts()[0], str) else 0
        self.count = len(prompts.token_ids) * req.n

    def _echo_logprobs(self, prompt_logprobs: Any) -> dict[str, Any] | None:
        if prompt_logprobs is None:
            return None
        return completion_logprobs(prompt_logprobs[self.drop_bos :], 0)[0]

    def _echoed(self, i: int) -> str:
        return self.echo[i // self.n] if self.echo else ""

    async def body(self, steps: Steps) -> dict[str, Any]:
        count = self.count
        texts: list[list[str]] = [[self._echoed(i)] for i in range(count)]
        reasons: list[str | None] = [None] * count
        logprobs: list[dict[str, Any] | None] = [None] * count
        offsets = [len(self._echoed(i)) for i in range(count)]
        echoed = [False] * count
        async for p, step in steps:
            for seq in step.sequences:
                i = p * self.n + seq.index
                if step.prompt_logprobs is not None and not echoed[i]:
                    echoed[i] = True
                    logprobs[i] = self._echo_logprobs(step.prompt_logprobs)
                texts[i].append(seq.text)
                if seq.logprobs is not None:
                    lp, offsets[i] = completion_logprobs(seq.logprobs, offsets[i])
                    logprobs[i] = merge_completion_logprobs(logprobs[i], lp)
                if seq.finish_reason is not None:
                    reasons[i] = finish_reason(seq.finish_reason)
        return {
            "id": self.run.request_id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": i,
                    "text": "".join(texts[i]),
                    "logprobs": logprobs[i],
                    "finish_reason": reasons[i],
                }
                for i in range(count)
            ],
            "usage": self.run.usage(),
        }

    async def frames(self, steps: Steps) -> AsyncGenerator[bytes, None]:
        frames = CompletionFrames(
            self.run.request_id, self.created, self.model, self.req.include_usage
        )
        offsets = [len(self._echoed(i)) for i in range(self.count)]
        sent_echo = [False] * self.count
        async for p, step in steps:
            for seq in step.sequences:
                i = p * self.n + seq.index
                if self.echo and not sent_echo[i]:
                    sent_echo[i] = True
                    yield frames.text(
                        i, self.echo[p], None, self._echo_logprobs(step.prompt_logprobs)
                    )
                lp = None
                if seq.logprobs is not None:
                    lp, offsets[i] = completion_logprobs(seq.logprobs, offsets[i])
                yield frames.text(i, seq.text, finish_reason(seq.finish_reason), lp)
        if self.req.include_usage:
            yield frames.usage(self.run.usage())
