"""The checks every generation request passes before it is admitted."""

from __future__ import annotations

from engine.api.auth import ApiKey
from engine.api.errors import bad_request, draining, engine_dead, model_loading, model_not_found
from engine.api.lora import visible_adapter
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


def check_model(state: ServerState, requested: str | None, key: ApiKey) -> str | None:
    """The LoRA adapter `requested` selects (None: the base model), or 404; an adapter
    the key may not use is answered exactly as one that does not exist."""
    served = state.model.served_name
    if requested is None or requested == served:
        return None
    adapter = visible_adapter(state, key, requested)
    if adapter is None:
        raise model_not_found(
            f"The model '{requested}' does not exist. This server serves '{served}'."
        )
    return adapter.name


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
