"""Schedules and profiles of the benchmark harness, on synthetic timing data."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from benchmarks.harness.phases import dispatch
from benchmarks.harness.profile.arrivals import RateCurve, rate_schedule, unit_renewal_points
from benchmarks.harness.profile.files import bundled_profiles, deep_merge, load_profile
from benchmarks.harness.profile.schema import LengthDist, Profile
from benchmarks.harness.profile.traces import read_trace, trace_schedule


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---------------------------------------------------------------- arrival processes


def test_poisson_schedule_has_the_right_mean_rate_and_variance() -> None:
    rate, duration = 20.0, 500.0
    t = rate_schedule(rate, "poisson", 1.0, rng(1), duration=duration)
    n = len(t)
    # Count in [0, T) is Poisson(rate·T): within 4 standard deviations.
    assert abs(n - rate * duration) < 4 * np.sqrt(rate * duration)
    gaps = np.diff(t)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    # Exponential gaps: variance 1/rate², so CV² = 1.
    assert gaps.var() == pytest.approx(1 / rate**2, rel=0.08)
    # Counts per second: variance equals mean (index of dispersion 1).
    counts = np.bincount(t.astype(int), minlength=int(duration))[: int(duration)]
    assert counts.var() / counts.mean() == pytest.approx(1.0, abs=0.15)
    assert t[0] == 0.0 and np.all(gaps > 0) and t[-1] < duration


def test_gamma_burstiness_sets_the_gap_variance_not_the_mean() -> None:
    rate = 10.0
    for k in (0.25, 4.0):
        t = rate_schedule(rate, "gamma", k, rng(2), count=40_000)
        gaps = np.diff(t)
        assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
        cv2 = gaps.var() / gaps.mean() ** 2
        assert cv2 == pytest.approx(1 / k, rel=0.1)


def test_constant_schedule_is_exact() -> None:
    t = rate_schedule(4.0, "constant", 1.0, rng(), count=9)
    assert np.allclose(t, np.arange(9) / 4.0)
    t = rate_schedule(4.0, "constant", 1.0, rng(), duration=2.0)
    assert np.allclose(t, np.arange(8) / 4.0)


def test_count_and_duration_both_bound_a_schedule() -> None:
    assert len(rate_schedule(100.0, "poisson", 1.0, rng(), count=50, duration=100.0)) == 50
    t = rate_schedule(1.0, "poisson", 1.0, rng(), count=10_000, duration=30.0)
    assert len(t) < 100 and t[-1] < 30.0


def test_schedules_are_seeded() -> None:
    a = rate_schedule(5.0, "poisson", 1.0, rng(7), duration=20.0)
    b = rate_schedule(5.0, "poisson", 1.0, rng(7), duration=20.0)
    c = rate_schedule(5.0, "poisson", 1.0, rng(8), duration=20.0)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_ramp_schedule_follows_the_rate_curve() -> None:
    curve = RateCurve.ramp(2.0, 38.0, 100.0)  # expected count: (2 + 38) / 2 · 100 = 2000
    assert curve.expected_count() == pytest.approx(2000)
    t = curve.schedule("poisson", 1.0, rng(3))
    counts, _ = np.histogram(t, bins=np.arange(0, 101, 10))
    expected = [(2 + 0.36 * (a + 5)) * 10 for a in range(0, 100, 10)]  # rate at mid-window
    for got, want in zip(counts, expected, strict=True):
        assert abs(got - want) < 4.5 * np.sqrt(want)
    assert np.all(np.diff(t) >= 0) and t[-1] < 100.0


def test_step_schedule_changes_rate_at_each_step() -> None:
    curve = RateCurve.steps([(50.0, 4.0), (50.0, 40.0)])
    t = curve.schedule("poisson", 1.0, rng(4))
    first, second = np.sum(t < 50), np.sum((t >= 50) & (t < 100))
    assert abs(first - 200) < 4 * np.sqrt(200)
    assert abs(second - 2000) < 4 * np.sqrt(2000)


def test_rate_curve_inverse_is_exact_for_constant_and_linear_rates() -> None:
    curve = RateCurve.ramp(0.0, 10.0, 10.0)  # Λ(t) = t²/2
    y = np.array([0.5, 2.0, 12.5, 49.9])
    assert np.allclose(curve.inverse(y), np.sqrt(2 * y))
    assert np.isinf(curve.inverse(np.array([50.1])))[0]


def test_unit_renewal_points_start_at_zero() -> None:
    pts = unit_renewal_points("poisson", 1.0, rng(), horizon=100.0)
    assert pts[0] == 0.0 and pts[-1] < 100.0 and np.all(np.diff(pts) > 0)


# ---------------------------------------------------------------- absolute schedule


class LateClock:
    """A fake clock whose every sleep oversleeps by `late` seconds."""

    def __init__(self, late: float) -> None:
        self.t = 100.0
        self.late = late

    def __call__(self) -> float:
        return self.t

    async def sleep(self, d: float) -> None:
        self.t += d + self.late


async def test_an_absolute_schedule_does_not_drift() -> None:
    clock = LateClock(late=0.003)
    offsets = np.arange(500) * 0.01  # 100 req/s for 5 s
    sent: list[float] = []
    await dispatch(offsets, clock.t, lambda i: sent.append(clock()), clock=clock, sleep=clock.sleep)
    lag = np.array(sent) - (100.0 + offsets)
    # Each send is late by one oversleep at most, however many came before it.
    assert lag[0] == 0.0 and np.allclose(lag[1:], 0.003)

    # What sleeping relative intervals would do with the same clock: drift.
    clock = LateClock(late=0.003)
    naive: list[float] = []
    start = clock.t
    for gap in np.diff(offsets, prepend=0.0):
        if gap:
            await clock.sleep(gap)
        naive.append(clock())
    assert np.array(naive)[-1] - (start + offsets[-1]) == pytest.approx(0.003 * 499)


async def test_dispatch_on_the_real_loop_keeps_to_the_schedule() -> None:
    loop = asyncio.get_running_loop()
    offsets = np.arange(60) * 0.005 + 0.01  # 200/s
    sent: list[float] = []
    start = loop.time()
    await dispatch(offsets, start, lambda i: sent.append(loop.time()), clock=loop.time)
    lag = np.array(sent) - (start + offsets)
    assert lag.min() >= -1e-3  # never early (beyond timer granularity)
    slope = np.polyfit(offsets, lag, 1)[0]
    assert abs(slope) < 0.05  # no accumulating drift (< 5 ms per 100 ms)


async def test_dispatch_sends_overdue_requests_at_once() -> None:
    clock = LateClock(late=0.0)
    clock.t = 110.0  # 10 s behind a schedule that started at 100
    calls: list[float] = []

    async def no_sleep(_d: float) -> None:
        raise AssertionError("should not sleep for overdue sends")

    await dispatch(
        [0.0, 1.0, 2.0], 100.0, lambda i: calls.append(clock()), clock=clock, sleep=no_sleep
    )
    assert calls == [110.0] * 3


# ---------------------------------------------------------------- traces


def test_trace_is_sorted_and_relative(tmp_path: Path) -> None:
    p = tmp_path / "t.jsonl"
    p.write_text(
        '{"timestamp": 12.5, "prompt": "b", "output_tokens": 4}\n\n'
        '{"timestamp": 10.0, "input_tokens": 32, "output_tokens": 8}\n'
    )
    entries = read_trace(p)
    assert [e.timestamp for e in entries] == [10.0, 12.5]
    assert entries[0].input_tokens == 32 and entries[1].prompt == "b"
    assert np.allclose(trace_schedule(entries, 0.5), [0.0, 1.25])


def test_trace_rows_must_have_a_time_and_a_prompt(tmp_path: Path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="timestamp"):
        read_trace(p)
    p.write_text('{"timestamp": 1}\n')
    with pytest.raises(ValueError, match="input_tokens"):
        read_trace(p)


# ---------------------------------------------------------------- profiles


def test_every_bundled_profile_validates() -> None:
    names = bundled_profiles()
    for required in (
        "default",
        "closed-loop",
        "poisson",
        "bursty",
        "steps",
        "ramp",
        "sweep",
        "trace",
    ):
        assert required in names
    for name in names:
        prof = load_profile(name)
        assert prof.name == name
    trace = load_profile("trace")
    assert Path(trace.load.path).is_file()  # resolved next to the profile


def test_profile_validation_rejects_what_cannot_run() -> None:
    with pytest.raises(ValidationError, match="num_requests or duration_s"):
        Profile.model_validate({"load": {"type": "rate", "rate": 1}})
    with pytest.raises(ValidationError, match="exactly one"):
        Profile.model_validate(
            {"load": {"type": "steps", "steps": [{"duration_s": 1, "rate": 1, "concurrency": 2}]}}
        )
    with pytest.raises(ValidationError, match="all `rate` or all `concurrency`"):
        Profile.model_validate(
            {
                "load": {
                    "type": "steps",
                    "steps": [{"duration_s": 1, "rate": 1}, {"duration_s": 1, "concurrency": 2}],
                }
            }
        )
    with pytest.raises(ValidationError, match="Extra inputs"):
        Profile.model_validate({"num_requests": 1, "lode": {}})
    with pytest.raises(ValidationError):
        Profile.model_validate({"num_requests": 1, "percentiles": [0, 50]})


def test_overrides_replace_the_load_shape() -> None:
    base = {"load": {"type": "rate", "rate": 4, "arrival": "gamma"}, "duration_s": 5}
    merged = deep_merge(base, {"load": {"type": "concurrent", "concurrency": 3}})
    assert merged["load"] == {"type": "concurrent", "concurrency": 3}
    merged = deep_merge(base, {"load": {"burstiness": 0.5}})
    assert merged["load"] == {"type": "rate", "rate": 4, "arrival": "gamma", "burstiness": 0.5}


def test_sweep_rates_are_geometric_up_to_max() -> None:
    prof = Profile.model_validate(
        {"load": {"type": "sweep", "start_rate": 1, "factor": 2, "max_rate": 16}}
    )
    assert prof.load.rate_list() == [1, 2, 4, 8, 16]


def test_length_distributions() -> None:
    r = rng(5)
    assert LengthDist.model_validate(64).sample(r, 3).tolist() == [64, 64, 64]
    u = LengthDist(dist="uniform", mean=100, range_ratio=0.5).sample(r, 5000)
    assert u.min() >= 50 and u.max() <= 150 and abs(u.mean() - 100) < 2
    ln = LengthDist(dist="lognormal", mean=200, std=100, max=2000).sample(r, 20000)
    assert ln.mean() == pytest.approx(200, rel=0.05) and ln.std() == pytest.approx(100, rel=0.1)
