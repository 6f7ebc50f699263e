"""What the API layer holds for the lifetime of the app."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from engine.adapters import Adapter, AdapterRegistry
from engine.api.admission import Admission
from engine.api.auth import KeyStore
from engine.api.priority import PriorityClasses
from engine.codellama import Capabilities, CodeLlamaPrompts, capabilities
from engine.config import ResolvedSettings
from engine.llm import EngineStats, ModelInfo, OutputConstraint, SamplingOptions, StepOutput
from engine.lora_metrics import LoRAMetrics
from engine.metrics import EngineGauges, Metrics


class EngineLike(Protocol):
    """What the API needs from `engine.llm.Engine` (HTTP-layer tests use a named fake)."""

    stats: EngineStats
    info: ModelInfo | None
    adapters: AdapterRegistry  # read only with LoRA enabled

    @property
    def ready(self) -> bool: ...
    @property
    def dead(self) -> bool: ...
    @property
    def tokenizer(self) -> Any: ...

    def start(self) -> ModelInfo: ...
    def shutdown(self) -> None: ...
    async def check_health(self) -> None: ...
    def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        options: SamplingOptions,
        *,
        adapter: str | None = None,
    ) -> Any: ...
    async def abort(self, request_id: str) -> None: ...
    # LoRA adapters (called only with LoRA enabled)
    async def load_static_adapters(self) -> None: ...
    async def load_adapter(
        self, name: str, path: str, *, dynamic: bool = True, replace: bool = False
    ) -> Adapter: ...
    async def unload_adapter(self, name: str) -> Adapter: ...
    def check_constraint(self, constraint: OutputConstraint) -> None: ...


@dataclass
class ServerState:
    settings: ResolvedSettings
    engine: EngineLike
    replica_id: str | None = None  # set in cluster mode; sent as a response header
    metrics: Metrics = field(init=False)
    lora_metrics: LoRAMetrics | None = field(init=False)  # with LoRA enabled
    keys: KeyStore = field(init=False)
    priorities: PriorityClasses = field(init=False)
    admission: Admission = field(init=False)
    # Built from the loaded tokenizer once the engine is up (see on_engine_started).
    prompts: CodeLlamaPrompts | None = None
    caps: Capabilities | None = None
    draining: bool = False
    fatal: str | None = None  # why the process must exit non-zero
    started_at: float = field(default_factory=time.time)
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        e = self.engine
        self.metrics = Metrics(
            EngineGauges(
                running=lambda: e.stats.running,
                waiting=lambda: e.stats.waiting,
                kv_cache_usage=lambda: e.stats.kv_cache_usage,
                healthy=lambda: 0.0 if e.dead else 1.0,
                ready=lambda: 1.0 if self.accepting else 0.0,
                prefix_cache_queries=lambda: e.stats.prefix_cache_queries,
                prefix_cache_hits=lambda: e.stats.prefix_cache_hits,
                preemptions=lambda: e.stats.preemptions,
                spec_decode=lambda: e.stats.spec_decode,
            ),
            model_name=lambda: e.info.served_name if e.info else "",
        )
        lora = self.settings.lora
        self.lora_metrics = (
            LoRAMetrics(self.metrics.registry, lora, loaded=lambda: len(e.adapters))
            if lora.enable_lora
            else None
        )
        self.keys = KeyStore.from_config(self.settings.auth)
        self.priorities = PriorityClasses(self.settings.priority)
        self.priorities.check_keys(self.keys)
        self.admission = Admission(self.settings, self.metrics, self.priorities)
        self.idle.set()

    @property
    def code_llama(self) -> CodeLlamaPrompts:
        """Code Llama's prompt formats (requests reach here only once the engine is up)."""
        assert self.prompts is not None
        return self.prompts

    @property
    def capabilities(self) -> Capabilities:
        assert self.caps is not None
        return self.caps

    def on_engine_started(self, info: ModelInfo) -> None:
        """Build what depends on the loaded tokenizer; the API serves from here on."""
        prompts = CodeLlamaPrompts(self.engine.tokenizer)
        f = self.settings.features
        self.caps = capabilities(
            info.name, info.is_demo, info.hidden_size, prompts.ids, f.chat, f.infill
        )
        self.prompts = prompts

    @property
    def accepting(self) -> bool:
        return (
            self.engine.ready
            and self.prompts is not None
            and not self.draining
            and not self.engine.dead
        )

    @property
    def model(self) -> ModelInfo:
        assert self.engine.info is not None
        return self.engine.info

    def request_started(self) -> None:
        self.in_flight += 1
        self.idle.clear()
        self.metrics.in_flight.inc()

    def request_finished(self) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.dec()
        if self.in_flight == 0:
            self.idle.set()


__all__ = ["EngineLike", "ServerState", "StepOutput"]
