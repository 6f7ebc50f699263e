"""What a run produces: a summary per step (window of load), the whole run's summary,
every request's record, the client's health and the server's own metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from benchmarks.harness.client import Target
from benchmarks.harness.profile.schema import Profile
from benchmarks.harness.records import RequestRecord


class WarmupFailed(RuntimeError):
    """Every warm-up request failed: the target cannot serve this profile."""


@dataclass
class StepResult:
    index: int
    label: str
    offered: dict[str, Any]
    window: tuple[float, float]
    summary: dict[str, Any]
    server: dict[str, Any]


@dataclass
class RunResult:
    profile: Profile
    target: Target
    model: str
    started: str
    steps: list[StepResult]
    summary: dict[str, Any]
    records: list[RequestRecord]
    client: dict[str, Any]
    server: dict[str, Any]
    sweep: dict[str, Any] | None = None
    warmup: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    prompts: dict[str, Any] = field(default_factory=dict)  # salting, distinct prompts
    cache_reset: dict[str, Any] | None = None  # POST /reset_prefix_cache, if asked
    # Sections of the workload and of scoring (`editor`, `chat_sessions`, `shared_prefix`,
    # `quality`): written as top-level keys of the JSON report.
    sections: dict[str, Any] = field(default_factory=dict)
