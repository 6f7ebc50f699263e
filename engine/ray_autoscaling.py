"""The autoscaling policy for Code Llama replicas on Ray Serve.

Ray Serve's default signal, ongoing requests per replica, sees an LLM replica
as a queue of HTTP requests; what saturates it is the engine: its batch is
full and requests wait in its scheduler, or its KV cache is full and it
preempts. Each replica reports those (`record_autoscaling_stats`), and the
policy takes the largest replica count any signal asks for:

- ongoing requests / `target_ongoing_requests` (by default 80% of the
  engine's batch, `max_num_seqs`), the only signal that may scale down;
- engine queue: when replicas average more than `target_waiting_per_replica`
  waiting sequences, add the replicas the waiting work needs at target load;
- KV cache: when replicas average more than `kv_cache_scale_up_threshold`
  usage, add one replica;
- interactive queueing: when replicas average more than
  `target_interactive_waiting_per_replica` waiting sequences of the highest
  priority class (admitted, no first token yet), add one replica. This is the
  signal for editors: with priority scheduling batch work may queue without
  harm, but interactive work that waits means the replicas are too few.

While queue or KV cache say "saturated", the policy never proposes fewer
replicas than are running. Ray applies the delays, factors and min/max bounds.
"""

from __future__ import annotations

import math
from typing import Any


class CodeLlamaAutoscalingPolicy:
    def __init__(
        self,
        target_ongoing_requests: float,
        target_waiting_per_replica: float,
        kv_cache_scale_up_threshold: float,
        target_interactive_waiting_per_replica: float | None = None,
    ) -> None:
        self.target_ongoing = target_ongoing_requests
        self.target_waiting = target_waiting_per_replica
        self.kv_threshold = kv_cache_scale_up_threshold
        self.target_interactive = target_interactive_waiting_per_replica

    def __call__(self, ctx: Any) -> tuple[float, dict[str, Any]]:
        replicas = ctx.current_num_replicas
        if replicas == 0:
            return ctx.target_num_replicas, {}
        metrics = ctx.aggregated_metrics or {}
        waiting = sum((metrics.get("engine_waiting") or {}).values())
        kv_values = list((metrics.get("kv_cache_usage") or {}).values())
        kv_mean = sum(kv_values) / len(kv_values) if kv_values else 0.0
        interactive = sum((metrics.get("interactive_waiting") or {}).values())
        desired, reasons = self.decide(
            replicas, ctx.total_num_requests, waiting, kv_mean, interactive_waiting=interactive
        )
        return desired, {"codellama_reasons": reasons}

    def decide(
        self,
        replicas: int,
        ongoing: float,
        waiting: float,
        kv_mean: float,
        interactive_waiting: float = 0.0,
    ) -> tuple[float, list[str]]:
        """Desired replicas (Ray rounds and bounds it) and the signals that asked."""
        by_requests = ongoing / self.target_ongoing
        desired, reasons = by_requests, ["ongoing_requests"]
        saturated = False
        if waiting / replicas > self.target_waiting:
            saturated = True
            by_queue = replicas + math.ceil(waiting / self.target_ongoing)
            if by_queue > desired:
                desired, reasons = by_queue, ["engine_queue"]
        if kv_mean > self.kv_threshold:
            saturated = True
            if replicas + 1 > desired:
                desired, reasons = replicas + 1, ["kv_cache"]
        target = self.target_interactive
        if target is not None and interactive_waiting / replicas > target:
            saturated = True
            if replicas + 1 > desired:
                desired, reasons = replicas + 1, ["interactive_queue"]
        if saturated and desired < replicas:
            desired, reasons = replicas, ["saturated_hold"]
        return desired, reasons
