"""POST /tokenize and /detokenize, with vLLM's request and response shapes.

The token ids are the ones /v1/completions and /v1/chat/completions send to the
engine for the same input (engine/codellama.py builds both), so `count` is the
`usage.prompt_tokens` those endpoints report: a client sizes prompts exactly.

- Completions form `{"prompt": "..."}`; with `suffix` (and `suffix_first`), the
  Code Llama infill prompt, as /v1/completions builds it.
- Chat form `{"messages": [...]}`: the Instruct template. Its BOS/EOS are part of
  the template (vLLM's default `add_special_tokens: false`); Code Llama's template
  has no separate generation prompt, so `add_generation_prompt` changes nothing.
"""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Discriminator, Field, StrictBool, Tag
from starlette.responses import Response

from engine.api.auth import ApiKey
from engine.api.errors import bad_request, model_loading
from engine.api.gate import request_key
from engine.api.schemas import ChatMessageIn, TokenId
from engine.api.state import ServerState
from engine.api.validation import check_model
from engine.codellama import ChatMessage, CodeLlamaPrompts


class TokenizeCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str = Field(description="Text, tokenized as /v1/completions tokenizes `prompt`.")
    suffix: str | None = Field(
        None, description="Text after the cursor: the infill prompt of /v1/completions."
    )
    suffix_first: StrictBool = Field(False, description="Suffix-prefix-middle infill order.")
    add_special_tokens: StrictBool = Field(True, description="Start with BOS, as the engine gets.")
    return_token_strs: StrictBool | None = Field(False, description="Also list each token.")


class TokenizeChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[ChatMessageIn] = Field(description="As in /v1/chat/completions.")
    add_generation_prompt: StrictBool = Field(
        True, description="Accepted; Code Llama's template always ends with [/INST]."
    )
    continue_final_message: StrictBool = False
    add_special_tokens: StrictBool = Field(
        False, description="BOS/EOS beyond the template's own (not supported: must stay false)."
    )
    return_token_strs: StrictBool | None = Field(False, description="Also list each token.")
    chat_template: str | None = None
    tools: list[Any] | None = None


def _form(body: Any) -> str:
    return "chat" if isinstance(body, dict) and "messages" in body else "completion"


# The tags are worded so that validation errors name the field alone (errors.py
# drops location parts that look like type names).
TokenizeRequest = Annotated[
    Annotated[TokenizeCompletionRequest, Tag("form[completion]")]
    | Annotated[TokenizeChatRequest, Tag("form[chat]")],
    Discriminator(lambda body: f"form[{_form(body)}]"),
]


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[TokenId] = Field(max_length=1 << 20, description="Token ids to turn into text.")


def _json(obj: Any) -> Response:
    return Response(orjson.dumps(obj), media_type="application/json")


def _prompts(state: ServerState, model: str | None, key: ApiKey) -> CodeLlamaPrompts:
    """The prompt builder; `model` may name a LoRA adapter the key may use (adapters
    share the base model's tokenizer), anything else is the generation endpoints' 404."""
    if state.prompts is None:
        raise model_loading()
    check_model(state, model, key)
    return state.prompts


def completion_ids(state: ServerState, req: TokenizeCompletionRequest, key: ApiKey) -> list[int]:
    prompts = _prompts(state, req.model, key)
    if req.suffix is None:
        ids = prompts.completion(req.prompt)
    else:
        caps = state.capabilities
        if not caps.infill:
            raise bad_request(caps.why_no_infill, param="suffix")
        ids = prompts.infill(req.prompt, req.suffix, req.suffix_first)
    # Every format starts with BOS: without special tokens, the text's own tokens.
    return ids if req.add_special_tokens else ids[1:]


def chat_ids(state: ServerState, req: TokenizeChatRequest, key: ApiKey) -> list[int]:
    prompts = _prompts(state, req.model, key)
    caps = state.capabilities
    if not caps.chat:
        raise bad_request(caps.why_no_chat, param="model", code="chat_not_supported")
    if req.add_special_tokens:
        raise bad_request(
            "add_special_tokens must be false for messages: Code Llama's template places "
            "BOS and EOS itself, and no endpoint sends more",
            param="add_special_tokens",
        )
    if req.continue_final_message:
        raise bad_request(
            "continue_final_message is not supported: /v1/chat/completions answers a "
            "conversation that ends with a 'user' message",
            param="continue_final_message",
        )
    if req.chat_template is not None:
        raise bad_request(
            "chat_template is not supported: this server builds Code Llama's Instruct template",
            param="chat_template",
        )
    if req.tools:
        raise bad_request("tools are not supported by Code Llama Instruct", param="tools")
    return prompts.chat([ChatMessage(m.role, m.text()) for m in req.messages])


def tokenizer_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/tokenize", response_model=None, tags=["tokenizer"])
    async def tokenize(request: Request, body: TokenizeRequest) -> Response:
        """The prompt's token ids, exactly as the generation endpoints send them."""
        key = request_key(request)
        if isinstance(body, TokenizeChatRequest):
            ids = chat_ids(state, body, key)
        else:
            ids = completion_ids(state, body, key)
        prompts = _prompts(state, body.model, key)
        return _json(
            {
                "count": len(ids),
                "max_model_len": state.model.max_model_len,
                "tokens": ids,
                "token_strs": prompts.pieces(ids) if body.return_token_strs else None,
            }
        )

    @app.post("/detokenize", response_model=None, tags=["tokenizer"])
    async def detokenize(request: Request, body: DetokenizeRequest) -> Response:
        """The text of token ids (control tokens such as <s> spelled out)."""
        prompts = _prompts(state, body.model, request_key(request))
        vocab = state.model.vocab_size
        bad = next((t for t in body.tokens if t >= vocab), None)
        if bad is not None:
            raise bad_request(
                f"token id {bad} is out of range (vocabulary size {vocab})", param="tokens"
            )
        try:
            text = prompts.decode(body.tokens)
        except (IndexError, ValueError, TypeError, OverflowError) as e:
            raise bad_request(f"these tokens cannot be decoded: {e}", param="tokens") from None
        return _json({"prompt": text})
