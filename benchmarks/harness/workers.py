"""`--workers N`: the load from N processes on this host, each with its own event loop.

One asyncio process handles ~12k SSE events/s here (docs/benchmarks.md); past that the
client, not the server, sets the numbers. With N workers the run's own process plans
the load, warms up, scrapes the server and writes the report, and the requests go out
from N spawned processes:

- open loop: request i of the schedule goes to worker i mod N, so every worker's share
  spans the whole schedule; all of them fire at the same absolute times, since
  `time.perf_counter` is CLOCK_MONOTONIC, one clock for every process of the host;
- closed loop: each worker runs its share of the concurrency (and of `num_requests`),
  asking the run's process for more (salted) requests as it goes.

Each worker sends back its raw per-request records, which are merged exactly: every
statistic of the report is computed once, over all of them (no merging of histograms
or of percentiles).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import multiprocessing
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from benchmarks.harness.client import OpenAIClient, Target
from benchmarks.harness.client_health import CPUMeter, GCFreezer, LoopLagMonitor
from benchmarks.harness.datasets import RequestItem
from benchmarks.harness.loops import ClosedLoop, run_open
from benchmarks.harness.profile.schema import RequestOptions
from benchmarks.harness.profile.workloads import SessionsLoad
from benchmarks.harness.records import RequestRecord
from benchmarks.harness.transport import HttpLibrary, make_transport

START_TIMEOUT_S = 60.0


def workers_refused(load: object, workers: int) -> str | None:
    """Why `--workers N` cannot run this load (None: it can)."""
    if workers > 1 and isinstance(load, SessionsLoad):
        return (
            f"--workers {workers} does not apply to a `sessions` load (editor, chat sessions): "
            "each user's next request depends on the clock and on its earlier answers, so the "
            "sessions run in the run's own process; run it without --workers (one process "
            "sustains the measured `bench selftest` rate, and the report warns above it)"
        )
    return None


@dataclass(frozen=True)
class WorkerSetup:
    """What every worker needs to send requests like the run's own client."""

    http: HttpLibrary
    target: Target
    model: str
    request: RequestOptions
    pool_concurrency: int | None  # per worker; None: no pool limit
    loop_lag_interval_s: float


@dataclass
class JobResult:
    worker: int
    records: list[RequestRecord]
    lags: list[float]
    lag_times: list[float]
    cpu_s: float
    wall_s: float


def shares(total: int, n: int) -> list[int]:
    """total split over n as evenly as integers allow (the first ones get the rest)."""
    return [total // n + (1 if k < total % n else 0) for k in range(n)]


# ---------------------------------------------------------------- in the worker process


class _Inbox:
    """Messages from the run's process: jobs to a queue, item batches to a deque.

    A thread blocks on the pipe, so the event loop never does.
    """

    def __init__(self, conn: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.conn, self.loop = conn, loop
        self.jobs: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.items: collections.deque[RequestItem] = collections.deque()
        self.more = asyncio.Event()
        self.asked = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except EOFError:
                msg = ("stop", None)
            self.loop.call_soon_threadsafe(self._deliver, msg)
            if msg[0] == "stop":
                return

    def _deliver(self, msg: tuple[str, Any]) -> None:
        if msg[0] == "items":
            self.items.extend(msg[1])
            self.asked = False
            self.more.set()
        else:
            self.jobs.put_nowait(msg)

    async def next_item(self, low_water: int, batch: int) -> RequestItem:
        if len(self.items) < low_water and not self.asked:
            self.asked = True
            self.conn.send(("more", batch))
        while not self.items:
            self.more.clear()
            await self.more.wait()
        return self.items.popleft()


async def _open_job(client: OpenAIClient, job: dict[str, Any], me: int) -> list[RequestRecord]:
    sends: list[tuple[RequestItem, RequestRecord]] = job["sends"]
    cap = job["max_concurrency"]
    sem = asyncio.Semaphore(cap) if cap else None

    async def send(i: int) -> None:
        item, rec = sends[i]
        rec.worker = me
        async with sem or contextlib.nullcontext():
            await client.send(item, rec)

    await run_open(send, job["offsets"], job["start"])
    return [r for _, r in sends]


async def _closed_job(
    client: OpenAIClient, job: dict[str, Any], me: int, inbox: _Inbox
) -> list[RequestRecord]:
    inbox.items.extend(job["items"])
    width = max(c for _, c in job["spec"])
    # A worker with a count of requests got them all; one bounded by time asks for more.
    low_water = 2 * width + 8 if job["num_requests"] is None else 0
    recs: list[RequestRecord] = []

    async def send(window: int) -> None:
        item = await inbox.next_item(low_water=low_water, batch=4 * width + 32)
        rec = RequestRecord(-1, item.id, step=job["step_base"] + window, worker=me)
        recs.append(rec)
        await client.send(item, rec)

    await ClosedLoop(job["spec"], job["starts"], job["begin"], job["num_requests"], send).run()
    inbox.items.clear()
    return recs


async def _serve(conn: Any, setup: WorkerSetup, me: int) -> None:
    http = make_transport(
        setup.http, setup.pool_concurrency, setup.request.timeout_s, setup.target.api_key
    )
    client = OpenAIClient(http, setup.target, setup.model, setup.request)
    inbox = _Inbox(conn, asyncio.get_running_loop())
    conn.send(("ready", me))
    try:
        while True:
            kind, job = await inbox.jobs.get()
            if kind == "stop":
                return
            client.t0 = job["t0"]
            monitor, cpu, freezer = (
                LoopLagMonitor(setup.loop_lag_interval_s),
                CPUMeter(),
                GCFreezer(),
            )
            freezer.start()
            monitor.start()
            cpu.start()
            try:
                if kind == "open":
                    recs = await _open_job(client, job, me)
                else:
                    recs = await _closed_job(client, job, me, inbox)
            finally:
                used = cpu.stop()
                await monitor.stop()
                await freezer.stop()
            conn.send(
                ("result", JobResult(me, recs, monitor.lags, monitor.times, used["cpu_s"],
                                     used["wall_s"]))
            )  # fmt: skip
    finally:
        await http.aclose()


def worker_main(conn: Any, setup: WorkerSetup, me: int) -> None:
    """A worker process: its own event loop (uvloop where installed), jobs until stopped."""
    factory = None
    with contextlib.suppress(ImportError):
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_serve(conn, setup, me))


# ---------------------------------------------------------------- in the run's process


@dataclass
class WorkerPool:
    """N spawned load-generator processes, kept for the whole run (every phase)."""

    n: int
    setup: WorkerSetup
    _procs: list[Any] = field(default_factory=list)
    _conns: list[Any] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    lags: list[list[float]] = field(default_factory=list)

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # no fork of a process with a loop running
        for k in range(self.n):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=worker_main, args=(child, self.setup, k), daemon=True)
            p.start()
            self._procs.append(p)
            self._conns.append(parent)
        self.cpu_s, self.lags = [0.0] * self.n, [[] for _ in range(self.n)]
        deadline = time.monotonic() + START_TIMEOUT_S
        for k, conn in enumerate(self._conns):
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                self.close()
                raise RuntimeError(f"load worker {k} did not start in {START_TIMEOUT_S:g} s")
            conn.recv()

    def close(self) -> None:
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.send(("stop", None))
        for p in self._procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
        self._procs, self._conns = [], []

    async def _result(self, k: int, items: Iterator[RequestItem] | None) -> JobResult:
        conn = self._conns[k]
        while True:
            try:
                kind, payload = await asyncio.to_thread(conn.recv)
            except EOFError:
                code = self._procs[k].exitcode
                raise RuntimeError(f"load worker {k} died (exit code {code})") from None
            if kind == "more" and items is not None:
                conn.send(("items", [next(items) for _ in range(payload)]))
            elif kind == "result":
                self.cpu_s[k] += payload.cpu_s
                self.lags[k] += payload.lags
                return payload

    async def _run(
        self, jobs: list[tuple[int, str, dict[str, Any]]], items: Iterator[RequestItem] | None
    ) -> list[JobResult]:
        for k, kind, job in jobs:
            self._conns[k].send((kind, job))
        return list(await asyncio.gather(*(self._result(k, items) for k, _, _ in jobs)))

    async def run_open(
        self,
        t0: float,
        start: float,
        sends: list[tuple[RequestItem, RequestRecord]],
        offsets: Sequence[float],
        max_concurrency: int | None,
    ) -> list[JobResult]:
        """Request i to worker i mod N; all fire on the one schedule (clock time start + offset)."""
        # The cap on requests in flight is split too (at least one each: a worker with
        # requests and a cap of 0 would never send them).
        caps: list[int | None] = [None] * self.n
        if max_concurrency:
            caps = [max(1, c) for c in shares(max_concurrency, self.n)]
        jobs = [
            (k, "open", {"t0": t0, "start": start, "sends": sends[k :: self.n],
                         "offsets": list(offsets[k :: self.n]), "max_concurrency": caps[k]})
            for k in range(self.n)
            if sends[k :: self.n]
        ]  # fmt: skip
        return await self._run(jobs, None)

    async def run_closed(
        self,
        t0: float,
        begin: float,
        spec: list[tuple[float | None, int]],
        starts: list[float],
        num_requests: int | None,
        step_base: int,
        items: Iterator[RequestItem],
    ) -> list[JobResult]:
        """Each worker runs its share of every window's concurrency (and of num_requests)."""
        per_window = [shares(c, self.n) for _, c in spec]
        counts: list[int | None] = (
            list(shares(num_requests, self.n)) if num_requests is not None else [None] * self.n
        )
        jobs = []
        for k in range(self.n):
            mine = [(d, per_window[w][k]) for w, (d, _) in enumerate(spec)]
            width = max(c for _, c in mine)
            if width == 0 or counts[k] == 0:
                continue
            count = counts[k]
            first = count if count is not None else 4 * width + 32
            jobs.append((k, "closed", {
                "t0": t0, "begin": begin, "spec": mine, "starts": starts,
                "num_requests": counts[k], "step_base": step_base,
                "items": [next(items) for _ in range(first)],
            }))  # fmt: skip
        return await self._run(jobs, items)

    def report(self) -> dict[str, Any]:
        import numpy as np

        return {
            "count": self.n,
            "cpu_s": self.cpu_s,
            "loop_lag_p99_ms": [
                float(np.percentile(lag, 99) * 1000) if lag else None for lag in self.lags
            ],
        }
