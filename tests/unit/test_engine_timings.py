"""engine.llm's EngineTimings: vLLM's per-request timestamps in this module's own type."""

from __future__ import annotations

import time
from types import SimpleNamespace

from engine.llm import EngineTimings, _engine_timings


def test_vllm_metrics_become_monotonic_engine_timings():
    now = time.monotonic()
    metrics = SimpleNamespace(
        arrival_time=time.time() - 1.0,  # wall clock, a second ago
        queued_ts=now - 0.9, scheduled_ts=now - 0.8, first_token_ts=now - 0.5,
        last_token_ts=now - 0.1, num_preemptions=2,
    )  # fmt: skip
    t = _engine_timings(SimpleNamespace(metrics=metrics))
    assert t is not None
    assert abs(t.arrival - (now - 1.0)) < 0.05  # on the engine's (monotonic) clock
    assert (t.queued, t.scheduled, t.first_token, t.last_token) == (
        now - 0.9, now - 0.8, now - 0.5, now - 0.1,
    )  # fmt: skip
    assert t.preemptions == 2
    assert _engine_timings(SimpleNamespace(metrics=None)) is None


def test_merged_takes_each_phases_first_start_and_the_last_token():
    a = EngineTimings(arrival=1.0, queued=1.1, scheduled=1.5, first_token=2.0, last_token=3.0)
    b = EngineTimings(arrival=1.2, queued=1.3, scheduled=0.0, first_token=0.0, last_token=0.0,
                      preemptions=1)  # fmt: skip
    m = a.merged(b)
    assert (m.arrival, m.queued, m.scheduled, m.first_token, m.last_token) == (
        1.0, 1.1, 1.5, 2.0, 3.0,
    )  # fmt: skip
    assert m.preemptions == 1
    assert b.merged(a).scheduled == 1.5  # 0.0 means "not yet", never "earliest"
