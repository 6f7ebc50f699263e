"""Prometheus series per LoRA adapter, with bounded cardinality.

The `adapter` label is "base" for the base model, an adapter's name for the first
--max-loras adapters (those of --lora-modules first, then in the order they are
first used), and "other" for every adapter after them: however many adapters come
and go, a family has at most --max-loras + 2 series per status. A name keeps its
label for the life of the process (series do not move between names).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from engine.adapters import BASE_LABEL, OTHER_LABEL
from engine.config import LoRAConfig
from engine.metrics import PREFIX, TPOT_BUCKETS, TTFT_BUCKETS


class LoRAMetrics:
    def __init__(
        self, registry: CollectorRegistry, lora: LoRAConfig, loaded: Callable[[], float]
    ) -> None:
        self._most = lora.max_loras
        self._labels = {m.name for m in lora.lora_modules[: self._most]}
        p, r = f"{PREFIX}_lora", registry
        self.requests = Counter(
            f"{p}_requests", "Finished generation requests by adapter ('base': none) and status.",
            ["adapter", "status"], registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            f"{p}_prompt_tokens", "Prompt tokens of finished requests, by adapter.",
            ["adapter"], registry=r,
        )  # fmt: skip
        self.generation_tokens = Counter(
            f"{p}_generation_tokens", "Generated tokens of finished requests, by adapter.",
            ["adapter"], registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            f"{p}_time_to_first_token_seconds", "Time to the first token, by adapter.",
            ["adapter"], buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.tpot = Histogram(
            f"{p}_time_per_output_token_seconds", "Time per output token, by adapter.",
            ["adapter"], buckets=TPOT_BUCKETS, registry=r,
        )  # fmt: skip
        Gauge(
            f"{p}_adapters_loaded",
            "LoRA adapters the engine holds (loaded, or unloaded with requests still running).",
            registry=r,
        ).set_function(loaded)

    def label(self, adapter: str | None) -> str:
        if adapter is None:
            return BASE_LABEL
        if adapter in self._labels:
            return adapter
        if len(self._labels) < self._most:
            self._labels.add(adapter)
            return adapter
        return OTHER_LABEL

    def observe(
        self,
        adapter: str | None,
        status: int,
        prompt_tokens: int,
        completion_tokens: int,
        ttft: float | None,
        tpot: float | None,
    ) -> None:
        label = self.label(adapter)
        self.requests.labels(adapter=label, status=str(status)).inc()
        if status != 200:
            return
        self.prompt_tokens.labels(adapter=label).inc(prompt_tokens)
        self.generation_tokens.labels(adapter=label).inc(completion_tokens)
        if ttft is not None:
            self.ttft.labels(adapter=label).observe(ttft)
        if tpot is not None:
            self.tpot.labels(adapter=label).observe(tpot)
