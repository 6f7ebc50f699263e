"""Arrival processes: when open-loop requests are sent.

Schedules are computed up front as absolute offsets from the run's start, so
a late wake-up never shifts the requests after it. Renewal processes of unit
rate (constant, Poisson, gamma) are mapped through a piecewise-linear rate
curve for steps and ramps.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from benchmarks.harness.profile.schema import Arrival


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
