"""Request bodies of the OpenAI-compatible endpoints (validated once per request).

Responses are not modelled here: they are built as plain dicts / pre-encoded
bytes on the hot path (see `encoding.py`). Unknown fields are ignored, as
OpenAI clients send fields that have no meaning for a local model.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

from engine.api.constraints import StructuredOutputFields

# Strict numbers: "1" is not a number and true is not 1.
Int = Annotated[int, Field(strict=True)]
Float = Annotated[float, Field(allow_inf_nan=False)]
TokenId = Annotated[int, Field(strict=True, ge=0)]
StopText = Annotated[str, Field(min_length=1, max_length=1024)]
PriorityClassName = Annotated[str, Field(min_length=1, max_length=64)]
EnginePriority = Annotated[int, Field(strict=True, ge=-(2**63), le=2**63 - 1)]  # vLLM's bounds

MAX_STOP_SEQUENCES = 16


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class SamplingFields(StructuredOutputFields):
    """Fields shared by completions and chat completions (structured outputs included)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="Served model name (default: the served model).")
    n: Int = Field(1, ge=1, description="Completions per prompt.")
    temperature: Float = Field(1.0, ge=0.0, le=2.0)
    top_p: Float = Field(1.0, gt=0.0, le=1.0)
    stop: StopText | list[StopText] | None = Field(
        None, description="Up to 16 strings; generation stops before any of them."
    )
    seed: Int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: Float = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = None
    # vLLM's extensions, kept with their names.
    top_k: Int = Field(0, ge=-1, description="Sample from the k most likely tokens (0 or -1: all).")
    min_p: Float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: Float = Field(1.0, gt=0.0, le=2.0)
    ignore_eos: StrictBool = Field(False, description="Keep generating past EOS (benchmarks).")
    min_tokens: Int = Field(0, ge=0)
    stop_token_ids: list[TokenId] | None = Field(None, max_length=64)
    include_stop_str_in_output: StrictBool = False
    skip_special_tokens: StrictBool = True
    priority: EnginePriority | PriorityClassName | None = Field(
        None,
        description="vLLM's request priority (lower is served first) or a priority class "
        "name; never above the API key's class (a request asking for more runs in the "
        "key's class). Default: the key's class.",
    )

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str]:
        if v is None:
            return []
        stops = [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        return stops

    @property
    def stop_list(self) -> list[str]:
        """`stop` as a list (the validator has normalised it to one already)."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


PromptType = (
    str
    | Annotated[list[TokenId], Field(min_length=1)]
    | Annotated[list[str], Field(min_length=1)]
    | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)]
)


class CompletionRequest(SamplingFields):
    prompt: PromptType = Field(
        description="A string, a list of strings, token ids, or a list of token id lists."
    )
    suffix: str | None = Field(
        None, description="Text after the completion: Code Llama fill-in-the-middle."
    )
    suffix_first: StrictBool = Field(
        False, description="Infill in suffix-prefix-middle order (Code Llama's SPM)."
    )
    max_tokens: Int | None = Field(16, ge=1, description="Tokens to generate (default 16).")
    logprobs: Int | None = Field(None, ge=0, description="Top alternatives per token (0-20).")
    echo: StrictBool = False
    best_of: Int | None = Field(None, ge=1)

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompt(s) as a list of strings or a list of token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        # The schema admits a list of ids, of strings, or of id lists; never a mix.
        if isinstance(p[0], int):
            return [p]
        return p


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str = Field(min_length=1, max_length=64)
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessageIn] = Field(description="The conversation so far.")
    max_tokens: Int | None = Field(
        None, ge=1, description="Tokens to generate (default: the rest of the context)."
    )
    max_completion_tokens: Int | None = Field(None, ge=1, description="Alias of max_tokens.")
    logprobs: StrictBool = False
    top_logprobs: Int | None = Field(None, ge=0)
    tools: list[Any] | None = None
    tool_choice: Any = None

    @property
    def requested_max_tokens(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )


class LoadLoRAAdapterRequest(BaseModel):
    """POST /v1/load_lora_adapter (vLLM's body)."""

    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(min_length=1, max_length=128, description="The name to serve it as.")
    lora_path: str = Field(
        min_length=1, max_length=4096, description="Directory of a PEFT LoRA adapter."
    )
    load_inplace: StrictBool = Field(
        False, description="Replace the weights of an adapter loaded under this name."
    )
    # vLLM's, for mixture-of-experts adapters; Code Llama is dense, so it changes nothing.
    is_3d_lora_weight: StrictBool = False


class UnloadLoRAAdapterRequest(BaseModel):
    """POST /v1/unload_lora_adapter (vLLM's body)."""

    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(min_length=1, max_length=128)
    lora_int_id: Int | None = Field(None, description="vLLM's; the name alone decides.")
