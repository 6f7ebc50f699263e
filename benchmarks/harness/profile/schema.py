"""A profile's schema (pydantic models of the YAML): how load is shaped, what is sent,
what counts as good.

A profile says *how* requests arrive (closed loop at a concurrency, or open
loop on a schedule), *what* is sent (`dataset`, `request`) and what counts as
good (`slo`). A typo in a profile is an error, not a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

from benchmarks.harness.profile.workloads import (
    ChatSessionsSpec,
    EditorSpec,
    QualitySpec,
    SessionsLoad,
    SharedPrefixSpec,
)

Arrival = Literal["constant", "poisson", "gamma"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in a profile is an error, not a default


# ---------------------------------------------------------------- load shapes


class OpenLoopFields(_Model):
    arrival: Arrival = Field("poisson", description="Inter-arrival process of an open loop.")
    burstiness: PositiveFloat = Field(
        1.0,
        description="Gamma shape k for arrival=gamma: the inter-arrival CV² is 1/k "
        "(k<1 burstier than Poisson, k=1 is Poisson, k>1 smoother).",
    )
    max_concurrency: PositiveInt | None = Field(
        None,
        description="Cap on requests in flight. Requests that wait for a slot are sent late: "
        "that shows as schedule lag and can flag the run (coordinated omission).",
    )


class ConcurrentLoad(_Model):
    """Closed loop: N workers, each sends its next request when its last one ends."""

    type: Literal["concurrent"] = "concurrent"
    concurrency: PositiveInt = 1


class RateLoad(OpenLoopFields):
    """Open loop at a constant mean rate (requests/s)."""

    type: Literal["rate"] = "rate"
    rate: PositiveFloat


class Step(_Model):
    duration_s: PositiveFloat
    rate: PositiveFloat | None = None
    concurrency: PositiveInt | None = None

    @model_validator(mode="after")
    def _one_of(self) -> Step:
        if (self.rate is None) == (self.concurrency is None):
            raise ValueError("a step sets exactly one of `rate` or `concurrency`")
        return self


class StepsLoad(OpenLoopFields):
    """Rate or concurrency held for a while, then changed; no drain between steps."""

    type: Literal["steps"] = "steps"
    steps: list[Step] = Field(min_length=1)

    @model_validator(mode="after")
    def _same_kind(self) -> StepsLoad:
        if len({s.rate is None for s in self.steps}) != 1:
            raise ValueError("steps are either all `rate` or all `concurrency`")
        return self

    @property
    def closed(self) -> bool:
        return self.steps[0].concurrency is not None


class RampLoad(OpenLoopFields):
    """Open loop whose rate changes linearly from start_rate to end_rate."""

    type: Literal["ramp"] = "ramp"
    start_rate: PositiveFloat
    end_rate: PositiveFloat
    duration_s: PositiveFloat
    windows: PositiveInt = Field(5, description="Report windows the ramp is cut into.")


class SweepStop(_Model):
    """When a sweep decides the server is saturated (any one is enough)."""

    min_rate_ratio: float = Field(
        0.9, gt=0, le=1, description="Completed req/s below this fraction of the offered rate."
    )
    min_gain: float = Field(
        0.05,
        ge=0,
        description="Completed req/s grew by less than this fraction over the last step.",
    )
    max_error_rate: float = Field(0.05, ge=0, le=1, description="Failed fraction above this.")
    max_latency_factor: float = Field(
        5.0, gt=1, description="Median E2E above this multiple of the first step's."
    )


class SweepLoad(OpenLoopFields):
    """A series of open-loop rates, each run and drained on its own, up to saturation."""

    type: Literal["sweep"] = "sweep"
    rates: list[PositiveFloat] | None = Field(None, description="Explicit rates (ascending).")
    start_rate: PositiveFloat = 1.0
    factor: float = Field(2.0, gt=1, description="Geometric growth when `rates` is not given.")
    max_rate: PositiveFloat = 64.0
    step_duration_s: PositiveFloat | None = 10.0
    step_requests: PositiveInt | None = None
    stop: SweepStop = SweepStop()

    def rate_list(self) -> list[float]:
        if self.rates:
            return sorted(self.rates)
        out, r = [], self.start_rate
        while r <= self.max_rate * (1 + 1e-9):
            out.append(round(r, 6))
            r *= self.factor
        return out


class TraceLoad(_Model):
    """Replay request arrivals (and lengths) from a JSONL trace."""

    type: Literal["trace"] = "trace"
    path: Path
    time_scale: PositiveFloat = Field(
        1.0, description="Multiply trace times (0.5 = twice as fast)."
    )
    max_concurrency: PositiveInt | None = None


Load = Annotated[
    ConcurrentLoad | RateLoad | StepsLoad | RampLoad | SweepLoad | TraceLoad | SessionsLoad,
    Field(discriminator="type"),
]


# ---------------------------------------------------------------- what is sent


class LengthDist(_Model):
    """A token-length distribution; a bare integer in YAML means `fixed`."""

    dist: Literal["fixed", "uniform", "normal", "lognormal"] = "fixed"
    mean: PositiveInt
    std: float = Field(0.0, ge=0, description="normal/lognormal spread (tokens).")
    min: PositiveInt = 1
    max: PositiveInt | None = None
    range_ratio: float = Field(
        0.0, ge=0, lt=1, description="uniform: [mean·(1-r), mean·(1+r)] (vLLM's convention)."
    )

    @model_validator(mode="before")
    @classmethod
    def _bare_int(cls, v: Any) -> Any:
        return {"mean": v} if isinstance(v, int) else v

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        m = float(self.mean)
        if self.dist == "fixed":
            x = np.full(n, m)
        elif self.dist == "uniform":
            x = rng.integers(
                int(m * (1 - self.range_ratio)), int(m * (1 + self.range_ratio)) + 1, n
            )
        elif self.dist == "normal":
            x = rng.normal(m, self.std, n)
        else:  # lognormal with the given mean and std (in tokens), not of the log
            var = self.std**2
            sigma2 = np.log1p(var / m**2)
            x = rng.lognormal(np.log(m) - sigma2 / 2, np.sqrt(sigma2), n)
        hi = self.max if self.max is not None else np.inf
        return np.clip(np.rint(x), self.min, hi).astype(int)


DatasetType = Literal[
    "humaneval",
    "infill",
    "chat",
    "synthetic",
    "jsonl",
    "editor",
    "shared-prefix",
    "chat-sessions",
    "mix",
]
SESSION_DATASETS = ("editor", "chat-sessions")  # run by a `sessions` load
PREFIX_SHARING_DATASETS = ("editor", "shared-prefix", "chat-sessions")


class DatasetSpec(_Model):
    type: DatasetType = "humaneval"
    path: Path | None = Field(None, description="jsonl: the file.")
    input_tokens: LengthDist | None = Field(None, description="synthetic: prompt lengths.")
    output_tokens: LengthDist | None = Field(
        None, description="Per-request max_tokens drawn from this (overrides request.max_tokens)."
    )
    text: Literal["random", "code"] = Field(
        "random",
        description="synthetic: random token ids (as vLLM's random dataset) or windows of code.",
    )
    system: str | None = Field(None, description="chat: an optional system message.")
    limit: PositiveInt | None = Field(None, description="Use only the first N items.")
    shuffle: bool = True
    size: PositiveInt = Field(256, description="synthetic: distinct prompts to build.")
    salt: bool = Field(
        True,
        description="Start each request's prompt with a line of its own (`# <run>-<n>`), so "
        "no two requests of a run, or of two runs, share a prefix-cache block. Datasets "
        "that share prefixes on purpose are never salted; false sends prompts as they are.",
    )
    stop: list[str] | None = Field(None, description="`stop` of every request of this dataset.")
    repeat: PositiveInt = Field(
        1, description="Send each item this many times (n samples per problem, for pass@k)."
    )
    parts: list[DatasetSpec] | None = Field(None, description="mix: the datasets to mix.")
    editor: EditorSpec | None = Field(None, description="editor: the sessions' settings.")
    shared_prefix: SharedPrefixSpec | None = Field(None, description="shared-prefix: groups.")
    chat_sessions: ChatSessionsSpec | None = Field(None, description="chat-sessions: turns.")

    @model_validator(mode="after")
    def _needs(self) -> DatasetSpec:
        if self.type == "jsonl" and self.path is None:
            raise ValueError("dataset type jsonl needs `path`")
        if self.type == "synthetic" and self.input_tokens is None:
            raise ValueError("dataset type synthetic needs `input_tokens`")
        if self.type == "mix" and not self.parts:
            raise ValueError("dataset type mix needs `parts`")
        if self.parts and any(p.type in (*SESSION_DATASETS, "mix") for p in self.parts):
            raise ValueError("a mix holds plain datasets (no sessions, no nested mix)")
        # A section's defaults apply when its dataset type is chosen without it.
        if self.type == "editor" and self.editor is None:
            self.editor = EditorSpec()
        if self.type == "shared-prefix" and self.shared_prefix is None:
            self.shared_prefix = SharedPrefixSpec()
        if self.type == "chat-sessions" and self.chat_sessions is None:
            self.chat_sessions = ChatSessionsSpec()
        return self

    @property
    def shares_prefixes(self) -> bool:
        """Its requests share prefixes on purpose: a per-request salt would defeat it."""
        if self.type == "mix":
            return any(p.shares_prefixes for p in self.parts or ())
        return self.type in PREFIX_SHARING_DATASETS

    @property
    def is_chat(self) -> bool:
        if self.type == "mix":
            return all(p.is_chat for p in self.parts or ())
        return self.type in ("chat", "chat-sessions") or bool(
            self.type == "shared-prefix" and self.shared_prefix and self.shared_prefix.chat
        )


class RequestOptions(_Model):
    endpoint: Literal["completions", "chat"] | None = Field(
        None, description="Default: chat for the chat dataset, completions otherwise."
    )
    stream: bool = True
    max_tokens: PositiveInt | None = 128
    ignore_eos: bool = Field(False, description="Fixed output lengths (vLLM extension).")
    temperature: float | None = Field(None, description="None: the server's default.")
    extra_body: dict[str, Any] = Field(default_factory=dict)
    timeout_s: PositiveFloat = 600.0


class SLO(_Model):
    """Per-request objectives for goodput; unset ones are not checked."""

    ttft_ms: PositiveFloat | None = None
    tpot_ms: PositiveFloat | None = None
    e2e_ms: PositiveFloat | None = None

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.ttft_ms, self.tpot_ms, self.e2e_ms))


class Thresholds(_Model):
    """When a run is flagged as not trustworthy (see docs/benchmarks.md)."""

    max_lag_p99_ms: PositiveFloat = Field(
        10.0,
        description="Open loop: more than 1 % (and at least 2) of the requests sent later than "
        "this (i.e. lag p99 above it) flags coordinated omission.",
    )
    min_rate_ratio: float = Field(
        0.95, gt=0, le=1, description="Open loop: achieved send rate below this × scheduled."
    )
    max_loop_lag_p99_ms: PositiveFloat = Field(
        10.0, description="Client event-loop lag p99 above this flags the client as overloaded."
    )
    max_connection_wait_ms: PositiveFloat = Field(
        1.0,
        description="A request that waited longer than this for a connection in the client's "
        "own pool was queued by the client: it flags the run.",
    )


class Profile(_Model):
    name: str = "custom"
    description: str = ""
    load: Load = ConcurrentLoad()
    num_requests: PositiveInt | None = Field(
        None, description="Requests to send (concurrent/rate); with duration_s, whichever first."
    )
    duration_s: PositiveFloat | None = Field(None, description="Seconds of load (concurrent/rate).")
    warmup_requests: int = Field(1, ge=0, description="Sent one by one first, not measured.")
    dataset: DatasetSpec = DatasetSpec()
    request: RequestOptions = RequestOptions()
    slo: SLO = SLO()
    percentiles: list[float] = Field(default_factory=lambda: [50.0, 90.0, 99.0])
    seed: int = 0
    server_metrics: bool = True
    reset_prefix_cache: bool = Field(
        False,
        description="POST <base>/reset_prefix_cache before the run (vLLM's server in dev mode, "
        "VLLM_SERVER_DEV_MODE=1, has it; codellama-serve has none): a warning if it fails.",
    )
    scrape_interval_s: PositiveFloat = 1.0
    thresholds: Thresholds = Thresholds()
    quality: QualitySpec | None = Field(
        None, description="Score the outputs (FIM exact match, pass@k, equivalence)."
    )

    @field_validator("percentiles")
    @classmethod
    def _pct(cls, v: list[float]) -> list[float]:
        if not all(0 < p < 100 for p in v):
            raise ValueError("percentiles lie strictly between 0 and 100")
        return sorted(set(v))

    @model_validator(mode="after")
    def _bounded(self) -> Profile:
        if isinstance(self.load, ConcurrentLoad | RateLoad) and not (
            self.num_requests or self.duration_s
        ):
            raise ValueError(f"load `{self.load.type}` needs num_requests or duration_s")
        if isinstance(self.load, SweepLoad) and not (
            self.load.step_duration_s or self.load.step_requests
        ):
            raise ValueError("a sweep needs step_duration_s or step_requests")
        sessions = isinstance(self.load, SessionsLoad)
        if sessions != (self.dataset.type in SESSION_DATASETS):
            raise ValueError(
                f"datasets {' and '.join(SESSION_DATASETS)} run with `load: {{type: sessions}}`, "
                "and that load runs nothing else"
            )
        if sessions and not self.duration_s:
            raise ValueError("load `sessions` needs duration_s")
        return self

    @property
    def endpoint(self) -> str:
        if self.request.endpoint:
            return self.request.endpoint
        return "chat" if self.dataset.is_chat else "completions"
