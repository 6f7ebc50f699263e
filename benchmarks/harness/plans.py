"""How a profile's load becomes phases: the send offsets of an open loop or the
(duration, concurrency) of a closed one, and the windows each is reported in.

Pure: no clock and no I/O, so every schedule is known before the first request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from benchmarks.harness.profile.arrivals import RateCurve, rate_schedule
from benchmarks.harness.profile.schema import (
    ConcurrentLoad,
    OpenLoopFields,
    Profile,
    RampLoad,
    RateLoad,
    StepsLoad,
    SweepLoad,
    TraceLoad,
)
from benchmarks.harness.profile.traces import TraceEntry, trace_schedule
from benchmarks.harness.profile.workloads import SessionsLoad


@dataclass
class Window:
    """A stretch of a phase reported on its own (a step, a ramp slice, a sweep rate)."""

    label: str
    start: float  # offset from the phase start
    offered: dict[str, Any]


@dataclass(frozen=True)
class OpenPlan:
    """Requests sent at these offsets (s from the phase start), whatever the server does."""

    offsets: np.ndarray
    windows: list[Window]
    max_concurrency: int | None
    label: str  # of the progress bar

    @property
    def total(self) -> int:
        return len(self.offsets)


@dataclass(frozen=True)
class ClosedPlan:
    """Workers that send back-to-back; window k runs spec[k] = (duration, concurrency)."""

    spec: list[tuple[float | None, int]]
    windows: list[Window]
    num_requests: int | None
    label: str  # of the progress bar
    total: int | None


def offered_rate(load: OpenLoopFields, rate: float) -> dict[str, Any]:
    return {
        "offered_rate": rate,
        "arrival": load.arrival,
        "burstiness": load.burstiness if load.arrival == "gamma" else None,
        "max_concurrency": load.max_concurrency,
    }


def peak_concurrency(p: Profile) -> int | None:
    """Requests the load can have in flight at once; None: whatever the schedule brings.

    The client's connection pool is sized from this: an open loop's pool must never
    cap below what its schedule needs (a request waiting for a connection is queued
    by the client, not the server), and that is not known before the server has
    answered, so it gets no limit (unless the profile caps requests in flight).
    """
    load = p.load
    if isinstance(load, ConcurrentLoad):
        return load.concurrency
    if isinstance(load, StepsLoad) and load.closed:
        return max(s.concurrency or 1 for s in load.steps)
    if isinstance(load, SessionsLoad):  # at most one request in flight per session
        return load.sessions
    cap: int | None = getattr(load, "max_concurrency", None)
    return cap


def peak_rate(load: RateLoad | StepsLoad | RampLoad | SweepLoad | TraceLoad) -> float | None:
    """The highest rate an open loop plans (req/s); None for a trace."""
    if isinstance(load, RateLoad):
        return load.rate
    if isinstance(load, StepsLoad):
        return max(s.rate or 0 for s in load.steps)
    if isinstance(load, RampLoad):
        return max(load.start_rate, load.end_rate)
    if isinstance(load, SweepLoad):
        return max(load.rate_list())
    return None


def describe_load(p: Profile) -> str:
    """The load a profile applies, in words: what the report prints (flags included)."""
    load = p.load
    if isinstance(load, ConcurrentLoad):
        text = f"closed loop, {load.concurrency} in flight"
    elif isinstance(load, RateLoad):
        text = f"open loop, {load.arrival} arrivals at {load.rate:g} req/s"
    elif isinstance(load, StepsLoad):
        values = [s.concurrency if load.closed else s.rate for s in load.steps]
        kind = "closed-loop concurrency" if load.closed else "open-loop rate (req/s)"
        text = f"{kind} steps {' → '.join(f'{v:g}' for v in values if v is not None)}"
    elif isinstance(load, RampLoad):
        text = f"open loop, rate ramping {load.start_rate:g} → {load.end_rate:g} req/s"
        text += f" over {load.duration_s:g} s"
    elif isinstance(load, SweepLoad):
        text = f"sweep of open-loop rates {', '.join(f'{r:g}' for r in load.rate_list())} req/s"
    elif isinstance(load, SessionsLoad):
        text = f"{load.sessions} {p.dataset.type} sessions, started over {load.stagger_s:g} s"
    else:
        text = f"trace {load.path.name} replayed (time × {load.time_scale:g})"
    if isinstance(load, OpenLoopFields) and load.arrival == "gamma":
        text += f" (burstiness {load.burstiness:g})"
    cap = getattr(load, "max_concurrency", None)
    if cap:
        text += f", at most {cap} in flight"
    bounds = [f"{p.num_requests} requests"] if p.num_requests else []
    bounds += [f"{p.duration_s:g} s"] if p.duration_s else []
    if bounds and isinstance(load, ConcurrentLoad | RateLoad | SessionsLoad):
        text += (
            f", {' or '.join(bounds)} (whichever ends first)"
            if len(bounds) > 1
            else (f", {bounds[0]}")
        )
    return text


def single_plan(p: Profile, trace: list[TraceEntry] | None) -> OpenPlan | ClosedPlan:
    """The one phase of every load but a sweep."""
    load = p.load
    if isinstance(load, ConcurrentLoad):
        c = load.concurrency
        windows = [Window(f"concurrency {c}", 0.0, {"concurrency": c})]
        return ClosedPlan(
            [(p.duration_s, c)], windows, p.num_requests, windows[0].label, p.num_requests
        )
    if isinstance(load, StepsLoad) and load.closed:
        return _closed_steps(p, load)
    rng = np.random.default_rng(p.seed)
    if isinstance(load, RateLoad):
        offsets = rate_schedule(
            load.rate,
            load.arrival,
            load.burstiness,
            rng,
            count=p.num_requests,
            duration=p.duration_s,
        )
        label = f"{load.rate:g} req/s {load.arrival}"
        windows = [Window(label, 0.0, offered_rate(load, load.rate))]
    elif isinstance(load, StepsLoad):
        offsets, windows = _open_steps(load, rng)
    elif isinstance(load, RampLoad):
        offsets, windows = _ramp(load, rng)
    else:
        assert isinstance(load, TraceLoad) and trace is not None
        offsets, windows = _trace(load, trace)
    label = windows[0].label if len(windows) == 1 else p.name
    return OpenPlan(offsets, windows, getattr(load, "max_concurrency", None), label)


def sweep_step(load: SweepLoad, k: int, rates: list[float], rng: np.random.Generator) -> OpenPlan:
    """Step k of a sweep: rates[k] for a step's duration or count."""
    rate = rates[k]
    offsets = rate_schedule(
        rate,
        load.arrival,
        load.burstiness,
        rng,
        count=load.step_requests,
        duration=load.step_duration_s,
    )
    window = Window(f"{rate:g} req/s", 0.0, offered_rate(load, rate))
    label = f"sweep {k + 1}/{len(rates)}: {window.label}"
    return OpenPlan(offsets, [window], load.max_concurrency, label)


def _closed_steps(p: Profile, load: StepsLoad) -> ClosedPlan:
    t, windows = 0.0, []
    for s in load.steps:
        windows.append(Window(f"concurrency {s.concurrency}", t, {"concurrency": s.concurrency}))
        t += s.duration_s
    spec: list[tuple[float | None, int]] = [(s.duration_s, s.concurrency or 1) for s in load.steps]
    return ClosedPlan(spec, windows, None, p.name, None)


def _open_steps(load: StepsLoad, rng: np.random.Generator) -> tuple[np.ndarray, list[Window]]:
    curve = RateCurve.steps([(s.duration_s, s.rate or 0.0) for s in load.steps])
    offsets = curve.schedule(load.arrival, load.burstiness, rng)
    t, windows = 0.0, []
    for s in load.steps:
        windows.append(Window(f"{s.rate:g} req/s", t, offered_rate(load, s.rate or 0.0)))
        t += s.duration_s
    return offsets, windows


def _ramp(load: RampLoad, rng: np.random.Generator) -> tuple[np.ndarray, list[Window]]:
    curve = RateCurve.ramp(load.start_rate, load.end_rate, load.duration_s)
    offsets = curve.schedule(load.arrival, load.burstiness, rng)
    width = load.duration_s / load.windows
    windows = []
    for k in range(load.windows):
        frac = (k + 0.5) / load.windows
        mid = load.start_rate + (load.end_rate - load.start_rate) * frac
        windows.append(Window(f"ramp ~{mid:.3g} req/s", k * width, offered_rate(load, mid)))
    return offsets, windows


def _trace(load: TraceLoad, trace: list[TraceEntry]) -> tuple[np.ndarray, list[Window]]:
    offsets = trace_schedule(trace, load.time_scale)
    span = float(offsets[-1]) if len(offsets) > 1 else 0.0
    offered = {
        "offered_rate": (len(offsets) - 1) / span if span > 0 else None,
        "trace": str(load.path),
        "time_scale": load.time_scale,
        "max_concurrency": load.max_concurrency,
    }
    return offsets, [Window(f"trace {load.path.name}", 0.0, offered)]
