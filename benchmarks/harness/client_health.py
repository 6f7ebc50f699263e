"""The load client's own health: how late its event loop wakes, its CPU time, and keeping
the cyclic GC from pausing it. If the client is the bottleneck, the numbers are its own."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness.records import now


class LoopLagMonitor:
    """How late the event loop wakes a sleeper: the client's own scheduling delay.

    If this grows, every timestamp the client takes is late by as much, and
    the client (not the server) is the bottleneck.
    """

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval = interval_s
        self.lags: list[float] = []
        self.times: list[float] = []  # when each lag was seen (perf_counter)
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        loop_time = time.perf_counter
        while True:
            t = loop_time()
            await asyncio.sleep(self.interval)
            woke = loop_time()
            self.lags.append(woke - t - self.interval)
            self.times.append(woke)

    def add(self, times: list[float], lags: list[float]) -> None:
        """Lags another process's monitor saw (--workers): one clock, so they merge."""
        self.times += times
        self.lags += lags

    def between(self, a: float, b: float) -> list[float]:
        """Lags seen in [a, b] (perf_counter times)."""
        return [lag for t, lag in zip(self.times, self.lags, strict=True) if a <= t <= b]

    def start(self) -> None:
        if self.interval > 0:  # 0 turns the monitor off
            self._task = asyncio.get_running_loop().create_task(self._tick())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class GCFreezer:
    """Keep the cyclic GC from pausing the client for long during a run.

    Records and their lists are long-lived, so they reach the oldest GC
    generation, and each full collection then walks all of them: measured
    here, pauses grew to ~190 ms at 1,000 req/s, stalling every request
    in flight. `gc.freeze()` every second moves what exists to the permanent
    generation, so a collection only walks the last second's objects; young
    garbage is still collected, and everything is unfrozen and collected at
    the end.
    """

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval = interval_s
        self._task: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            gc.freeze()

    def start(self) -> None:
        gc.collect()
        gc.freeze()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        gc.unfreeze()


def run_delay_s() -> float | None:
    """Seconds this process's threads spent runnable but waiting for a CPU (Linux).

    /proc/self/schedstat's second field, for the main thread: the time the
    scheduler kept it off-CPU while it had work. When the client's clock stops
    for long stretches but its CPU time does not grow, this says whether it was
    starved of CPU (this grows) or blocked in a call (it does not).
    """
    try:
        return int(Path("/proc/thread-self/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


@dataclass
class CPUMeter:
    """The client process's own CPU time over a span (user + system), and its wait for one."""

    wall0: float = 0.0
    cpu0: float = 0.0
    ru0: Any = None
    delay0: float | None = None

    def start(self) -> None:
        self.wall0, self.cpu0 = now(), time.process_time()
        self.ru0 = resource.getrusage(resource.RUSAGE_SELF)
        self.delay0 = run_delay_s()

    def stop(self) -> dict[str, float]:
        delay = run_delay_s() if self.delay0 is not None else None
        wall = now() - self.wall0
        cpu = time.process_time() - self.cpu0
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "wall_s": wall,
            "cpu_s": cpu,
            "user_s": ru.ru_utime - self.ru0.ru_utime,
            "system_s": ru.ru_stime - self.ru0.ru_stime,
            "cpu_utilization": cpu / wall if wall > 0 else math.nan,
            "voluntary_ctx_switches": ru.ru_nvcsw - self.ru0.ru_nvcsw,
            "involuntary_ctx_switches": ru.ru_nivcsw - self.ru0.ru_nivcsw,
            "major_page_faults": ru.ru_majflt - self.ru0.ru_majflt,
            **(
                {"run_delay_s": delay - self.delay0}
                if delay is not None and self.delay0 is not None
                else {}
            ),
        }
