"""How load is shaped: profile schema (YAML), arrival processes, absolute schedules.

A profile says *how* requests arrive (closed loop at a concurrency, or open
loop on a schedule), *what* is sent (`dataset`, `request`) and what counts as
good (`slo`). Open-loop schedules are computed up front as absolute offsets
from the run's start, so a late wake-up never shifts the requests after it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
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
    ConcurrentLoad | RateLoad | StepsLoad | RampLoad | SweepLoad | TraceLoad,
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


class DatasetSpec(_Model):
    type: Literal["humaneval", "infill", "chat", "synthetic", "jsonl"] = "humaneval"
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

    @model_validator(mode="after")
    def _needs(self) -> DatasetSpec:
        if self.type == "jsonl" and self.path is None:
            raise ValueError("dataset type jsonl needs `path`")
        if self.type == "synthetic" and self.input_tokens is None:
            raise ValueError("dataset type synthetic needs `input_tokens`")
        return self


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
    scrape_interval_s: PositiveFloat = 1.0
    thresholds: Thresholds = Thresholds()

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
        return self

    @property
    def endpoint(self) -> str:
        if self.request.endpoint:
            return self.request.endpoint
        return "chat" if self.dataset.type == "chat" else "completions"


# ---------------------------------------------------------------- loading


def bundled_profiles_dir() -> Path:
    return Path(str(resources.files("benchmarks") / "profiles"))


def bundled_profiles() -> dict[str, Path]:
    return {p.stem: p for p in sorted(bundled_profiles_dir().glob("*.yaml"))}


def resolve_profile_path(name_or_path: str) -> Path:
    """A file path, or the name of a bundled profile (`default`, `sweep`, ...)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    bundled = bundled_profiles()
    if name_or_path in bundled:
        return bundled[name_or_path]
    raise FileNotFoundError(
        f"no profile file {name_or_path!r} and no bundled profile of that name "
        f"(bundled: {', '.join(bundled)})"
    )


def read_profile_dict(name_or_path: str) -> tuple[dict[str, Any], Path]:
    path = resolve_profile_path(name_or_path)
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a profile is a YAML mapping")
    _resolve_paths(data, path.parent)
    return data, path


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    # Paths inside a profile are relative to the profile file, so bundled
    # profiles find their bundled trace wherever the package is installed.
    for section, key in (("load", "path"), ("dataset", "path")):
        sec = data.get(section)
        if isinstance(sec, dict) and isinstance(sec.get(key), str):
            p = Path(sec[key])
            if not p.is_absolute() and not p.exists() and (base / p).exists():
                sec[key] = str(base / p)


def load_profile(name_or_path: str, overrides: dict[str, Any] | None = None) -> Profile:
    data, _ = read_profile_dict(name_or_path)
    return Profile.model_validate(deep_merge(data, overrides or {}))


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            # A new load type replaces the old load block instead of mixing fields.
            if k == "load" and "type" in v and v["type"] != out[k].get("type"):
                out[k] = dict(v)
            else:
                out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


# ---------------------------------------------------------------- arrival processes


def unit_renewal_points(
    arrival: Arrival,
    burstiness: float,
    rng: np.random.Generator,
    *,
    count: int | None = None,
    horizon: float | None = None,
) -> np.ndarray:
    """Arrival points of a unit-rate renewal process, the first at 0.

    Stop after `count` points or before `horizon`. Poisson: exponential gaps;
    gamma: Gamma(k, 1/k) gaps (mean 1, CV² 1/k); constant: gaps of exactly 1.
    """
    if count is None and horizon is None:
        raise ValueError("give count or horizon")

    def gaps(n: int) -> np.ndarray:
        if arrival == "constant":
            return np.ones(n)
        if arrival == "poisson":
            return rng.exponential(1.0, n)
        return rng.gamma(burstiness, 1.0 / burstiness, n)

    if count is not None and horizon is None:
        return np.concatenate(([0.0], np.cumsum(gaps(count - 1)))) if count > 0 else np.empty(0)
    assert horizon is not None
    pts = [np.zeros(1)]
    last = 0.0
    while last < horizon:
        chunk = last + np.cumsum(gaps(max(64, int((horizon - last) * 1.1) + 16)))
        pts.append(chunk)
        last = float(chunk[-1])
    out = np.concatenate(pts)
    out = out[out < horizon]
    return out[:count] if count is not None else out


@dataclass(frozen=True)
class RateCurve:
    """A piecewise-linear request rate r(t); steps are knots that share a time."""

    knots: tuple[tuple[float, float], ...]  # (t, rate), t non-decreasing, starts at 0

    @classmethod
    def constant(cls, rate: float, duration: float) -> RateCurve:
        return cls(((0.0, rate), (duration, rate)))

    @classmethod
    def ramp(cls, start: float, end: float, duration: float) -> RateCurve:
        return cls(((0.0, start), (duration, end)))

    @classmethod
    def steps(cls, steps: list[tuple[float, float]]) -> RateCurve:
        knots, t = [], 0.0
        for duration, rate in steps:
            knots += [(t, rate), (t + duration, rate)]
            t += duration
        return cls(tuple(knots))

    @property
    def duration(self) -> float:
        return self.knots[-1][0]

    def _segments(self) -> Iterator[tuple[float, float, float, float, float]]:
        """(t_a, t_b, r_a, r_b, cumulative count at t_a) per non-empty segment."""
        cum = 0.0
        for (a, ra), (b, rb) in zip(self.knots, self.knots[1:], strict=False):
            if b > a:
                yield a, b, ra, rb, cum
                cum += (ra + rb) / 2 * (b - a)

    def expected_count(self) -> float:
        return sum((ra + rb) / 2 * (b - a) for a, b, ra, rb, _ in self._segments())

    def inverse(self, y: np.ndarray) -> np.ndarray:
        """t with Λ(t) = y, where Λ is the integral of the rate (time rescaling)."""
        out = np.full(len(y), np.inf)
        for a, b, ra, rb, cum in self._segments():
            hi = cum + (ra + rb) / 2 * (b - a)
            sel = (y >= cum) & (y < hi)
            d = y[sel] - cum
            s = (rb - ra) / (b - a)
            # x solves s/2·x² + ra·x = d; this form is stable for s → 0 and ra → 0.
            out[sel] = a + 2 * d / (ra + np.sqrt(ra * ra + 2 * s * d))
        return out

    def schedule(
        self,
        arrival: Arrival,
        burstiness: float,
        rng: np.random.Generator,
        count: int | None = None,
    ) -> np.ndarray:
        """Absolute send offsets (s from the start) of a renewal process with this rate.

        A unit-rate process mapped through Λ⁻¹ has intensity r(t): the standard
        way to make a non-homogeneous Poisson (or gamma) process.
        """
        units = unit_renewal_points(
            arrival, burstiness, rng, count=count, horizon=self.expected_count()
        )
        t = self.inverse(units)
        return t[np.isfinite(t)]


def rate_schedule(
    rate: float,
    arrival: Arrival,
    burstiness: float,
    rng: np.random.Generator,
    *,
    count: int | None = None,
    duration: float | None = None,
) -> np.ndarray:
    """Send offsets for a constant mean rate, limited by count and/or duration."""
    if duration is None:
        if count is None:
            raise ValueError("give count or duration")
        return unit_renewal_points(arrival, burstiness, rng, count=count) / rate
    return RateCurve.constant(rate, duration).schedule(arrival, burstiness, rng, count=count)


# ---------------------------------------------------------------- traces


@dataclass(frozen=True, slots=True)
class TraceEntry:
    timestamp: float
    prompt: str | None
    input_tokens: int | None
    output_tokens: int | None


def read_trace(path: Path) -> list[TraceEntry]:
    """A JSONL of {timestamp, prompt | input_tokens, output_tokens}; times in seconds."""
    out = []
    with Path(path).open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                ts = float(row["timestamp"])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: needs a numeric `timestamp` ({e})") from None
            if row.get("prompt") is None and row.get("input_tokens") is None:
                raise ValueError(f"{path}:{n}: needs `prompt` or `input_tokens`")
            out.append(
                TraceEntry(
                    ts,
                    row.get("prompt"),
                    _opt_int(row.get("input_tokens")),
                    _opt_int(row.get("output_tokens")),
                )
            )
    if not out:
        raise ValueError(f"{path}: empty trace")
    out.sort(key=lambda e: e.timestamp)
    return out


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


def trace_schedule(entries: list[TraceEntry], time_scale: float) -> np.ndarray:
    t = np.array([e.timestamp for e in entries], dtype=float)
    return (t - t[0]) * time_scale
