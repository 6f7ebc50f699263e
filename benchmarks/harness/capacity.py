"""`bench capacity`: the highest load at which chosen SLO percentiles still hold.

The number clusters are sized with is not where a server saturates (sweeps.py) but the
highest rate (open loop) or concurrency (closed loop) that still meets the objectives,
e.g. TTFT p99 ≤ 500 ms and TPOT p90 ≤ 50 ms. It is found by bracketing (doubling or
halving from a start until one probe meets them and one does not) and then bisecting
the bracket until it is narrower than `tolerance`. Each probe is a full run of the
profile at that load: a request that failed counts against it, and an open-loop probe
judges TTFT and E2E from the schedule (what a user arriving then saw); a probe whose
client fell behind its schedule cannot tell, and ends the search.
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from benchmarks.harness.metrics import pct_key
from benchmarks.harness.profile.schema import ConcurrentLoad, Profile, RateLoad
from benchmarks.harness.results import RunResult

_SLO = re.compile(
    r"^\s*(ttft|tpot|itl|e2el|e2e)\s*:\s*p(\d+(?:\.\d+)?)\s*<=\s*([\d.]+)\s*(ms|s)?\s*$"
)
MAX_ERROR_RATE = 0.01  # a probe with more failed requests than this misses its SLOs


@dataclass(frozen=True)
class Objective:
    """`metric:pN<=limit`, e.g. `ttft:p99<=500ms` (units ms or s; ms if none)."""

    metric: str  # ttft | tpot | itl | e2el
    percentile: float
    limit_ms: float

    @classmethod
    def parse(cls, text: str) -> Objective:
        m = _SLO.match(text)
        if not m:
            raise ValueError(
                f"bad SLO {text!r}: write metric:pN<=limit, e.g. ttft:p99<=500ms "
                "(metrics ttft, tpot, itl, e2el)"
            )
        metric, pct, limit, unit = m.groups()
        scale = 1000.0 if unit == "s" else 1.0
        pct_f = float(pct)
        if not 0 < pct_f < 100:
            raise ValueError(f"bad SLO {text!r}: the percentile lies between 0 and 100")
        return cls("e2el" if metric == "e2e" else metric, pct_f, float(limit) * scale)

    def __str__(self) -> str:
        return f"{self.metric}:p{pct_key(self.percentile)}<={self.limit_ms:g}ms"

    def value(self, summary: dict[str, Any]) -> float | None:
        """This objective's percentile in a run (from schedule in an open loop)."""
        k = pct_key(self.percentile)
        load = summary["load"]
        if load.get("open_loop") and self.metric in ("ttft", "e2el"):
            return load.get(f"p{k}_{self.metric}_from_schedule_ms")
        value: float | None = summary.get(f"p{k}_{self.metric}_ms")
        return value


@dataclass
class Probe:
    load: float
    meets: bool
    values: dict[str, float | None]  # per objective
    reason: str
    summary: dict[str, Any] = field(repr=False)
    client_fell_behind: bool = False


def judge(load: float, result: RunResult, objectives: list[Objective]) -> Probe:
    s = result.summary
    values = {str(o): o.value(s) for o in objectives}
    missed = [
        f"{o} (got {'none' if v is None else f'{v:.1f} ms'})"
        for o in objectives
        if (v := values[str(o)]) is None or v > o.limit_ms
    ]
    failed = s["failed"] / max(1, s["requests"])
    if failed > MAX_ERROR_RATE:
        missed.append(f"{s['failed']}/{s['requests']} requests failed")
    behind = bool(s["load"].get("coordinated_omission")) or bool(
        result.client["loop_lag"].get("overloaded")
    )
    reason = "; ".join(missed) if missed else "all objectives met"
    return Probe(load, not missed, values, reason, s, behind)


def probe_profile(
    base: Profile, load: float, closed: bool, duration_s: float, objectives: list[Objective]
) -> Profile:
    """The base profile at one load, for `duration_s`, with the objectives' percentiles."""
    data = base.model_dump(mode="json")
    data["percentiles"] = sorted({*base.percentiles, *(o.percentile for o in objectives)})
    if closed:
        data["load"] = ConcurrentLoad(concurrency=int(load)).model_dump(mode="json")
    else:
        keep = {k: data["load"].get(k) for k in ("arrival", "burstiness") if k in data["load"]}
        data["load"] = RateLoad(rate=load, **keep).model_dump(mode="json")
    data["duration_s"], data["num_requests"] = duration_s, None
    return Profile.model_validate(data)


@dataclass
class Search:
    """Bracketing then bisection over a load (rate, or an integer concurrency)."""

    run: Callable[[float], Awaitable[Probe]]
    start: float
    low: float
    high: float
    tolerance: float = 0.05
    max_probes: int = 16
    integer: bool = False
    probes: list[Probe] = field(default_factory=list)
    stopped: str | None = None

    def _round(self, x: float) -> float:
        return float(max(1, round(x))) if self.integer else x

    async def _probe(self, x: float) -> Probe:
        p = await self.run(x)
        self.probes.append(p)
        if p.client_fell_behind:
            self.stopped = f"the client could not keep the load at {x:g}: the probe cannot tell"
        return p

    def _done(self) -> bool:
        return self.stopped is not None or len(self.probes) >= self.max_probes

    async def _bracket(self) -> tuple[float | None, float | None]:
        """(highest load that met the objectives, lowest that did not)."""
        x = self._round(min(max(self.start, self.low), self.high))
        p = await self._probe(x)
        good, bad = (x, None) if p.meets else (None, x)
        while not self._done():
            if good is not None and bad is None:
                if x >= self.high:
                    break
                x = self._round(min(self.high, x * 2))
            elif bad is not None and good is None:
                if x <= self.low:
                    break
                x = self._round(max(self.low, x / 2))
            else:
                break
            p = await self._probe(x)
            if p.meets:
                good = x
            else:
                bad = x
        return good, bad

    def _narrow_enough(self, good: float, bad: float) -> bool:
        if self.integer:
            return bad - good <= 1
        return (bad - good) / good <= self.tolerance

    async def find(self) -> float | None:
        good, bad = await self._bracket()
        while good is not None and bad is not None and not self._done():
            if self._narrow_enough(good, bad):
                break
            mid = math.floor((good + bad) / 2) if self.integer else (good + bad) / 2
            if (await self._probe(mid)).meets:
                good = mid
            else:
                bad = mid
        if self.stopped is None and good is not None and bad is None:
            self.stopped = f"met the objectives up to the search's maximum ({self.high:g})"
        if self.stopped is None and good is None:
            self.stopped = f"missed the objectives down to the search's minimum ({self.low:g})"
        return good


def capacity_summary(search: Search, capacity: float | None, objectives: list[Objective],
                     closed: bool) -> dict[str, Any]:  # fmt: skip
    probes = sorted(search.probes, key=lambda p: p.load)
    return {
        "capacity": capacity,
        "unit": "concurrency" if closed else "req/s",
        "objectives": [str(o) for o in objectives],
        "note": search.stopped,
        "probes": [
            {
                "load": p.load,
                "meets": p.meets,
                "reason": p.reason,
                "values": p.values,
                "request_throughput": p.summary["request_throughput"],
                "output_throughput": p.summary["output_throughput"],
                "failed": p.summary["failed"],
                "client_fell_behind": p.client_fell_behind,
            }
            for p in probes
        ],
        "order": [p.load for p in search.probes],
    }
