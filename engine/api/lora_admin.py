"""vLLM's runtime adapter endpoints: POST /v1/load_lora_adapter and /v1/unload_lora_adapter.

Off unless --allow-runtime-lora-updating (then 404, as in vLLM, where the routes do
not exist); only for API keys marked `admin` in the keys file (403 otherwise, also
when the API is open: with no keys there is no admin). The answers are vLLM's
plain-text success lines; errors are the OpenAI error shape.
"""

from __future__ import annotations

import logging

from fastapi import Depends, FastAPI, Request
from starlette.responses import PlainTextResponse

from engine.adapters import AdapterNotFoundError
from engine.api.errors import APIError
from engine.api.gate import request_key
from engine.api.schemas import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from engine.api.state import ServerState
from engine.api.validation import check_serving

log = logging.getLogger("engine.api")


def lora_admin_routes(app: FastAPI, state: ServerState) -> None:
    def require_admin(request: Request) -> None:
        # A dependency: runs before the body is read, so a refused caller learns
        # nothing from how its body would have been judged.
        if not state.settings.lora.allow_runtime_lora_updating:
            raise APIError(
                404, "Runtime LoRA adapter updating is off (--allow-runtime-lora-updating).",
                code="not_enabled",
            )  # fmt: skip
        if not request_key(request).admin:
            raise APIError(
                403, "Loading and unloading LoRA adapters needs an API key marked 'admin' "
                "in the keys file.", code="permission_denied",
            )  # fmt: skip

    admin = [Depends(require_admin)]

    @app.post("/v1/load_lora_adapter", dependencies=admin, tags=["lora"])
    async def load_lora_adapter(
        request: Request, body: LoadLoRAAdapterRequest
    ) -> PlainTextResponse:
        check_serving(state)
        name = body.lora_name
        adapter = await state.engine.load_adapter(name, body.lora_path, replace=body.load_inplace)
        log.info(
            "key %s loaded LoRA adapter %r from %s", request_key(request).name, name, adapter.path
        )
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", dependencies=admin, tags=["lora"])
    async def unload_lora_adapter(
        request: Request, body: UnloadLoRAAdapterRequest
    ) -> PlainTextResponse:
        check_serving(state)
        name = body.lora_name
        try:
            await state.engine.unload_adapter(name)
        except AdapterNotFoundError:
            raise APIError(
                404, f"The LoRA adapter '{name}' cannot be found.", param="lora_name",
                code="adapter_not_found",
            ) from None  # fmt: skip
        log.info("key %s unloaded LoRA adapter %r", request_key(request).name, name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
