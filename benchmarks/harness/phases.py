"""Running phases of load: the requests and their records, the load loops (loops.py) in
this process or in --workers processes (workers.py), the server's scrapes at window
boundaries, and each window's summary.

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
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from benchmarks.harness.client import OpenAIClient
from benchmarks.harness.client_health import LoopLagMonitor
from benchmarks.harness.datasets import RequestItem
from benchmarks.harness.loops import ClosedLoop, dispatch, run_open
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
from benchmarks.harness.workers import JobResult, WorkerPool

__all__ = ["Phase", "PhaseRunner", "dispatch"]

SCHEDULE_LEAD_S = 0.005  # the schedule starts a moment after it is built
# With --workers the schedule goes to other processes first (pickled items and records):
# it starts later, so that every worker has it before its first send.
WORKERS_LEAD_S = 0.25


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
    pool: WorkerPool | None = None  # --workers: load from other processes
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
        lead = WORKERS_LEAD_S if self.pool else SCHEDULE_LEAD_S
        base = now() - self.t0 + lead
        starts = np.array([w.start for w in windows])
        which = np.searchsorted(starts, offsets, side="right") - 1
        sends = []
        for off, w in zip(offsets.tolist(), which.tolist(), strict=True):
            item = next(items)
            sends.append((item, self._new_record(item, step_base + w, base + off)))
        boundaries = asyncio.create_task(self._snapshots_at([base + s for s in starts[1:]]))
        worker_cpu = 0.0
        try:
            if self.pool is None:
                sem = asyncio.Semaphore(plan.max_concurrency) if plan.max_concurrency else None

                async def send(i: int) -> None:
                    await self._send(*sends[i], sem)

                await run_open(send, offsets.tolist(), self.t0 + base)
            else:
                results = await self.pool.run_open(
                    self.t0, self.t0 + base, sends, offsets.tolist(), plan.max_concurrency
                )
                worker_cpu = self._merge(results)
            mid = await boundaries
        finally:
            boundaries.cancel()
            await asyncio.gather(boundaries, return_exceptions=True)
        cpu, wall = time.process_time() - cpu0 + worker_cpu, now() - wall0
        after = await self._settled_snapshot()
        recs = [self.records[r.index] for _, r in sends]
        phase = Phase(recs, base, windows, [before, *mid, after], True, cpu, wall)
        self.phases.append(phase)
        return phase

    def _merge(self, results: list[JobResult]) -> float:
        """Worker processes' records into the run (in place of the ones sent); their CPU."""
        new: list[RequestRecord] = []
        for res in results:
            for r in res.records:
                if r.index < 0:  # a closed loop's: numbered below, in order of sending
                    new.append(r)
                else:
                    self.records[r.index] = r
                self.progress.done(r.ok)
            self.monitor.add(res.lag_times, res.lags)
        for r in sorted(new, key=lambda r: (r.sent is None, r.sent or 0.0)):
            r.index = len(self.records)
            self.records.append(r)
        return sum(res.cpu_s for res in results)

    async def closed_phase(
        self, plan: ClosedPlan, items: Iterator[RequestItem], step_base: int
    ) -> Phase:
        """Workers send back-to-back; window k runs spec[k] = (duration, concurrency)."""
        before = await self._settled_snapshot()
        cpu0, wall0 = time.process_time(), now()
        base = now() - self.t0
        starts = [w.start for w in plan.windows]
        boundaries = asyncio.create_task(self._snapshots_at([base + s for s in starts[1:]]))
        first = len(self.records)
        worker_cpu = 0.0
        try:
            if self.pool is None:

                async def send(window: int) -> None:
                    item = next(items)
                    await self._send(item, self._new_record(item, step_base + window, None), None)

                loop = ClosedLoop(plan.spec, starts, self.t0 + base, plan.num_requests, send)
                await loop.run()
            else:
                results = await self.pool.run_closed(
                    self.t0, self.t0 + base, plan.spec, starts, plan.num_requests, step_base, items
                )
                worker_cpu = self._merge(results)
            mid = await boundaries
        finally:
            boundaries.cancel()
            await asyncio.gather(boundaries, return_exceptions=True)
        cpu, wall = time.process_time() - cpu0 + worker_cpu, now() - wall0
        after = await self._settled_snapshot()
        recs = self.records[first:]
        phase = Phase(recs, base, plan.windows, [before, *mid, after], False, cpu, wall)
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
