"""Statistics over trials: a bootstrap confidence interval, and the paired ratio of two
targets that compare mode reports (median, 95 % interval, whether it is a difference)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000


def bootstrap_ci(
    samples: Sequence[float],
    stat: Callable[[np.ndarray], Any] = np.median,
    *,
    level: float = 0.95,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """The percentile bootstrap interval of `stat` over `samples` (seeded: reproducible).

    Resample the samples with replacement, take the statistic of each resample, and
    read the (1 − level)/2 and (1 + level)/2 quantiles of those statistics.
    """
    x = np.asarray(samples, dtype=float)
    if x.size == 0:
        raise ValueError("no samples")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(resamples, x.size))
    stats = np.apply_along_axis(stat, 1, x[idx])
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def paired_ratio(base: Sequence[float | None], other: Sequence[float | None]) -> dict[str, Any]:
    """other / base, trial by trial (same round): median ratio, 95 % bootstrap interval.

    "Significant" only when the interval excludes 1: otherwise the difference is within
    what the trials' own spread allows.
    """
    ratios = [o / b for b, o in zip(base, other, strict=False) if b and o is not None]
    if not ratios:
        return {"median": None, "ci95": None, "significant": None, "ratios": []}
    lo, hi = bootstrap_ci(ratios)
    return {
        "median": float(np.median(ratios)),
        "ci95": [lo, hi],
        "significant": not (lo <= 1.0 <= hi),
        "ratios": ratios,
    }
