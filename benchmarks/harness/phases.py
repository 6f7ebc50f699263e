"""Running phases of load: a dispatcher that fires each open-loop request at its absolute
time, closed-loop workers, the server's scrapes at window boundaries, and each window's
summary.

Open loop: the whole schedule is computed first (plans.py); a dispatcher sleeps
until each absolute send time (`start + offset`) and fires the request as its own
task, so a slow request never delays the next one and a late wake-up never
shifts the rest. Closed loop: N workers, each sends back-to-back.
Every scheduled request gets a record that ends up in the report: failures
are counted with their error, never dropped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from benchmarks.harness.client import OpenAIClient
from benchmarks.harness.client_health import LoopLagMonitor
from benchmarks.harness.datasets import RequestItem
from benchmarks.harness.metrics import loop_lag_stats, summarize
from benchmarks.harness.plans import ClosedPlan, OpenPlan, Window
from benchmarks.harness.profile.schema import Profile
from benchmarks.harness.progress import Progress
from benchmarks.harness.records import RequestRecord, now
from benchmarks.harness.results import StepResult
from benchmarks.harness.server_metrics import (
    ServerMetricsRecorder,
    Snapshot,
    deltas,
    gauge_stats,
    gauges_of,
)

SCHEDULE_LEAD_S = 0.005  # the schedule starts a moment after it is built


async def dispatch(
    offsets: Sequence[float],
    start: float,
    fire: Callable[[int], None],
    *,
    clock: Callable[[], float] = now,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
) -> None:
    """Call fire(i) at clock time start + offsets[i], for each i in order.

    Each wait is computed from the absolute target, never from the previous
    send: oversleeping delays one request, not every request after it.
    """
    for i, off in enumerate(offsets):
        delay = start + off - clock()
        if delay > 0:
            await sleep(delay)
        fire(i)


@dataclass
class Phase:
    records: list[RequestRecord]
    base: float  # phase start, s from the run's t0
    windows: list[Window]
    snaps: list[Snapshot | None]  # before, at each window boundary, after
    open_loop: bool
    client_cpu_s: float = 0.0  # the harness's own CPU over the phase
    wall_s: float = 0.0


@dataclass
class PhaseRunner:
    """Runs the phases of one run against its client; keeps every record and phase."""

    profile: Profile
    client: OpenAIClient
    recorder: ServerMetricsRecorder
    monitor: LoopLagMonitor
    progress: Progress
    t0: float  # the run's start: record times are seconds from it
    records: list[RequestRecord] = field(default_factory=list)
    phases: list[Phase] = field(default_factory=list)

    async def run(
        self, plan: OpenPlan | ClosedPlan, items: Iterator[RequestItem], step_base: int
    ) -> list[StepResult]:
        """Run one phase; its windows' results, numbered from step_base."""
        self.progress.phase(plan.label, plan.total)
        if isinstance(plan, OpenPlan):
            phase = await self.open_phase(plan, items, step_base)
        else:
            phase = await self.closed_phase(plan, items, step_base)
        return self.steps_of(phase, step_base)

    def _new_record(self, item: RequestItem, step: int, scheduled: float | None) -> RequestRecord:
        rec = RequestRecord(len(self.records), item.id, step=step, scheduled=scheduled)
        self.records.append(rec)
        return rec

    async def _send(
        self, item: RequestItem, rec: RequestRecord, sem: asyncio.Semaphore | None
    ) -> None:
        if sem is None:
            await self.client.send(item, rec)
        else:
            async with sem:  # waiting here makes the send late: it shows as lag
                await self.client.send(item, rec)
        self.progress.done(rec.ok)

    async def _settled_snapshot(self, settle_s: float = 1.0) -> Snapshot | None:
        """The scrape after a phase, once the server has booked what it finished.

        A server counts a request when its response is done, a moment after the
        client has read [DONE]: scraping at once can miss the last ones. Wait
        (up to settle_s) until its in-flight/running gauge reads 0.
        """
        deadline = now() + settle_s
        snap = await self.recorder.snapshot()
        while snap is not None and now() < deadline:
            g = gauges_of(snap.samples)
            if g.get("http_in_flight", g.get("requests_running", 0.0)) <= 0:
                break
            await asyncio.sleep(0.05)
            snap = await self.recorder.snapshot()
        return snap

    async def _snapshots_at(self, times: list[float]) -> list[Snapshot | None]:
        out: list[Snapshot | None] = []
        for t in times:
            await asyncio.sleep(max(0.0, self.t0 + t - now()))
            out.append(await self.recorder.snapshot())
        return out

    async def open_phase(
        self, plan: OpenPlan, items: Iterator[RequestItem], step_base: int
    ) -> Phase:
        offsets, windows = plan.offsets, plan.windows
        before = await self._settled_snapshot()
        cpu0, wall0 = time.process_time(), now()
        base = now() - self.t0 + SCHEDULE_LEAD_S
        starts = np.array([w.start for w in windows])
        which = np.searchsorted(starts, offsets, side="right") - 1
        sends = []
        for off, w in zip(offsets.tolist(), which.tolist(), strict=True):
            item = next(items)
            sends.append((item, self._new_record(item, step_base + w, base + off)))
        sem = asyncio.Semaphore(plan.max_concurrency) if plan.max_concurrency else None
        tasks: list[asyncio.Task[None]] = []

        def fire(i: int) -> None:
            item, rec = sends[i]
            tasks.append(asyncio.create_task(self._send(item, rec, sem)))

        boundaries = asyncio.create_task(self._snapshots_at([base + s for s in starts[1:]]))
        try:
            await dispatch(offsets.tolist(), self.t0 + base, fire)
            await asyncio.gather(*tasks)
            mid = await boundaries
        finally:
            for t in (*tasks, boundaries):
                t.cancel()
            await asyncio.gather(*tasks, boundaries, return_exceptions=True)
        cpu, wall = time.process_time() - cpu0, now() - wall0
        after = await self._settled_snapshot()
        phase = Phase([r for _, r in sends], base, windows, [before, *mid, after], True, cpu, wall)
        self.phases.append(phase)
        return phase

    async def closed_phase(
        self, plan: ClosedPlan, items: Iterator[RequestItem], step_base: int
    ) -> Phase:
        """Workers send back-to-back; window k runs spec[k] = (duration, concurrency)."""
        spec, windows, num_requests = plan.spec, plan.windows, plan.num_requests
        before = await self._settled_snapshot()
        cpu0, wall0 = time.process_time(), now()
        base = now() - self.t0
        starts = [w.start for w in windows]
        durations = [d for d, _ in spec if d is not None]
        end = self.t0 + base + sum(durations) if len(durations) == len(spec) else None
        state = {"window": 0, "sent": 0}
        changed = asyncio.Event()
        recs: list[RequestRecord] = []

        def over() -> bool:
            if end is not None and now() >= end:
                return True
            return num_requests is not None and state["sent"] >= num_requests

        async def worker(k: int) -> None:
            while not over():
                if k >= spec[state["window"]][1]:
                    # Idle in this window (concurrency went down): wait for a change.
                    changed.clear()
                    await changed.wait()
                    continue
                state["sent"] += 1
                item = next(items)
                rec = self._new_record(item, step_base + state["window"], None)
                recs.append(rec)
                await self._send(item, rec, None)

        async def controller() -> None:
            for k in range(1, len(spec)):
                await asyncio.sleep(max(0.0, self.t0 + base + starts[k] - now()))
                state["window"] = k
                changed.set()
            if end is not None:
                await asyncio.sleep(max(0.0, end - now()))
                changed.set()

        boundaries = asyncio.create_task(self._snapshots_at([base + s for s in starts[1:]]))
        ctl = asyncio.create_task(controller())
        workers = [asyncio.create_task(worker(k)) for k in range(max(c for _, c in spec))]
        try:
            await asyncio.gather(*workers)
            mid = await boundaries
        finally:
            for t in (*workers, ctl, boundaries):
                t.cancel()
            await asyncio.gather(*workers, ctl, boundaries, return_exceptions=True)
        cpu, wall = time.process_time() - cpu0, now() - wall0
        after = await self._settled_snapshot()
        phase = Phase(recs, base, windows, [before, *mid, after], False, cpu, wall)
        self.phases.append(phase)
        return phase

    def steps_of(self, phase: Phase, step_base: int) -> list[StepResult]:
        p = self.profile
        recs, base, windows = phase.records, phase.base, phase.windows
        last_finish = max((r.finished for r in recs if r.finished is not None), default=base)
        out = []
        for k, w in enumerate(windows):
            a = base + w.start
            b = base + windows[k + 1].start if k + 1 < len(windows) else max(last_finish, a)
            mine = [r for r in recs if r.step == step_base + k]
            summary = summarize(
                mine,
                window=(a, b),
                all_records=recs,
                percentiles=p.percentiles,
                slo=p.slo,
                thresholds=p.thresholds,
                open_loop=phase.open_loop,
                offered=w.offered,
            )
            server = deltas(phase.snaps[k], phase.snaps[k + 1])
            server["gauges"] = gauge_stats(self.recorder.samples, a, b)
            # The client's own health in this step: loop lag in the window, CPU
            # over the whole phase (a phase with several windows shares one figure).
            summary["client"] = {
                "loop_lag": loop_lag_stats(
                    self.monitor.between(self.t0 + a, self.t0 + b), p.thresholds
                ),
                "phase_cpu_s": phase.client_cpu_s,
                "phase_cpu_utilization": phase.client_cpu_s / phase.wall_s
                if phase.wall_s
                else None,
            }
            out.append(StepResult(step_base + k, w.label, w.offered, (a, b), summary, server))
        return out
