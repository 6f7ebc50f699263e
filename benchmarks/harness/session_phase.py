"""The phase of a `sessions` load: N stateful virtual users (editor developers, chat users)
whose requests depend on the clock or on earlier answers, so nothing is planned up front.

A session workload builds its requests as it runs; this module gives it what
every phase has — records numbered in the run, the server's scrapes before and
after, the client's CPU, one window's summary — and runs it for the profile's
duration. Each request's `scheduled` time is when its user acted (an editor's
debounce expiring, a chat user's next turn), so lateness shows as schedule lag.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from benchmarks.harness.datasets import RequestItem
from benchmarks.harness.phases import SCHEDULE_LEAD_S, Phase, PhaseRunner
from benchmarks.harness.plans import Window
from benchmarks.harness.records import RequestRecord, now
from benchmarks.harness.results import RunResult, StepResult


@dataclass
class SessionContext:
    """What a session workload runs with: its clock origin, records, and the client."""

    start: float  # clock time of the sessions' time 0
    new_record: Callable[[str, str, float], RequestRecord]  # (item id, session, due at)
    send: Callable[[RequestItem, RequestRecord], Awaitable[RequestRecord]]
    num_requests: int | None
    clock: Callable[[], float] = now  # injectable: the tests run sessions on synthetic time
    sleep: Callable[[float], Awaitable[Any]] = field(default=asyncio.sleep)

    def elapsed(self) -> float:
        """Seconds of session time now."""
        return self.clock() - self.start

    async def sleep_until(self, t: float) -> None:
        delay = self.start + t - self.clock()
        if delay > 0:
            await self.sleep(delay)


class SessionWorkload(Protocol):
    @property
    def label(self) -> str: ...
    @property
    def offered(self) -> dict[str, Any]: ...

    def warmup_items(self, n: int) -> list[RequestItem]: ...
    async def run(self, ctx: SessionContext) -> None: ...
    def item_of(self, rec: RequestRecord) -> RequestItem | None: ...
    def sections(self, result: RunResult) -> dict[str, Any]: ...


async def run_sessions(
    runner: PhaseRunner, workload: SessionWorkload, step_base: int = 0
) -> list[StepResult]:
    """Run the workload as one phase with one window; its result."""
    runner.progress.phase(workload.label, None)
    before = await runner._settled_snapshot()
    cpu0, wall0 = time.process_time(), now()
    base = now() - runner.t0 + SCHEDULE_LEAD_S
    recs: list[RequestRecord] = []

    def new_record(item_id: str, session: str, due: float) -> RequestRecord:
        rec = RequestRecord(len(runner.records), item_id, step=step_base, scheduled=base + due)
        rec.session = session
        runner.records.append(rec)
        recs.append(rec)
        return rec

    async def send(item: RequestItem, rec: RequestRecord) -> RequestRecord:
        try:
            return await runner.client.send(item, rec)
        finally:
            runner.progress.done(rec.error is None)

    ctx = SessionContext(runner.t0 + base, new_record, send, runner.profile.num_requests)
    await workload.run(ctx)
    cpu, wall = time.process_time() - cpu0, now() - wall0
    after = await runner._settled_snapshot()
    window = Window(workload.label, 0.0, workload.offered)
    phase = Phase(recs, base, [window], [before, after], True, cpu, wall)
    runner.phases.append(phase)
    return runner.steps_of(phase, step_base)
