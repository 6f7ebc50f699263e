"""The checks every generation request passes before it is admitted."""

from __future__ import annotations

from engine.api.errors import APIError, bad_request, draining, engine_dead, model_loading
from engine.api.schemas import SamplingFields
from engine.api.state import ServerState


def check_serving(state: ServerState) -> None:
    """The server takes new work: its engine is alive and loaded, and it is not draining."""
    if state.engine.dead:
        raise engine_dead()
    if state.draining:
        raise draining(state.settings.admission.retry_after_s)
    if not state.accepting:
        raise model_loading()


def check_model(state: ServerState, requested: str | None) -> None:
    served = state.model.served_name
    if requested is not None and requested != served:
        raise APIError(
            404, f"The model '{requested}' does not exist. This server serves '{served}'.",
            param="model", code="model_not_found",
        )  # fmt: skip


def check_counts(
    state: ServerState, req: SamplingFields, prompts: int, logprobs: int | None
) -> None:
    """n, prompts per request and logprobs within the server's bounds."""
    s = state.settings.server
    if req.n > s.max_n:
        raise bad_request(f"n must be at most {s.max_n}, got {req.n}", param="n")
    if prompts > s.max_prompts_per_request:
        raise bad_request(
            f"at most {s.max_prompts_per_request} prompts per request, got {prompts}",
            param="prompt",
        )
    limit = state.settings.engine.max_logprobs
    if logprobs is not None and logprobs > limit:
        raise bad_request(f"logprobs must be at most {limit}, got {logprobs}", param="logprobs")


def check_context(state: ServerState, prompt_tokens: int, max_tokens: int, param: str) -> None:
    limit = state.model.max_model_len
    if prompt_tokens + max_tokens > limit:
        raise bad_request(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} "
            "for the completion). Please reduce the prompt or max_tokens.",
            param=param, code="context_length_exceeded",
        )  # fmt: skip
