"""LoRA adapters as the API shows them: which ones a key may see, and their model cards.

To a key whose `adapters=` list leaves an adapter out, that adapter does not exist:
it is not in /v1/models and asking for it is the 404 of an unknown model.
"""

from __future__ import annotations

from typing import Any

from engine.adapters import Adapter
from engine.api.auth import ApiKey
from engine.api.state import ServerState


def visible_adapters(state: ServerState, key: ApiKey) -> list[Adapter]:
    if not state.settings.lora.enable_lora:
        return []
    return [a for a in state.engine.adapters.all() if key.may_use(a.name)]


def visible_adapter(state: ServerState, key: ApiKey, name: str) -> Adapter | None:
    if not state.settings.lora.enable_lora:
        return None
    adapter = state.engine.adapters.get(name)
    return adapter if adapter is not None and key.may_use(adapter.name) else None


def adapter_card(state: ServerState, adapter: Adapter) -> dict[str, Any]:
    """vLLM's model card of an adapter: `root` its path, `parent` the base model."""
    return {
        "id": adapter.name,
        "object": "model",
        "created": int(state.started_at),
        "owned_by": "codellama-serve",
        "root": adapter.path,
        "parent": adapter.parent,
        "max_model_len": state.model.max_model_len,
    }
