"""The request's sampling fields as the engine's `SamplingOptions`, and finish reasons back."""

from __future__ import annotations

from engine.api.schemas import SamplingFields
from engine.llm import OutputConstraint, SamplingOptions


def sampling_options(
    req: SamplingFields,
    max_tokens: int,
    *,
    stop_token_ids: list[int],
    logprobs: int | None,
    prompt_logprobs: int | None,
    constraint: OutputConstraint | None = None,
) -> SamplingOptions:
    return SamplingOptions(
        max_tokens=max_tokens,
        n=req.n,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        min_p=req.min_p,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty,
        seed=req.seed,
        stop=req.stop_list,
        stop_token_ids=[*(req.stop_token_ids or []), *stop_token_ids],
        include_stop_str_in_output=req.include_stop_str_in_output,
        ignore_eos=req.ignore_eos,
        min_tokens=req.min_tokens,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        skip_special_tokens=req.skip_special_tokens,
        stream=req.stream,
        constraint=constraint,
    )


def finish_reason(reason: str | None) -> str | None:
    # vLLM says "stop" for EOS, stop strings and stop tokens, "length" at
    # max_tokens; "abort" never reaches a client as a finish reason.
    return reason if reason in (None, "stop", "length") else "stop"
