"""Runs a profile against one endpoint: warm-up, phases of load, scrapes, summaries.

Open loop: the whole schedule is computed first; a dispatcher sleeps until
each absolute send time (`start + offset`) and fires the request as its own
task, so a slow request never delays the next one and a late wake-up never
shifts the rest. Closed loop: N workers, each sends back-to-back.
Every scheduled request gets a record that ends up in the report: failures
are counted with their error, never dropped.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import platform
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from benchmarks import __version__
from benchmarks.harness.client import OpenAIClient, Target, discover_model
from benchmarks.harness.client_health import CPUMeter, GCFreezer, LoopLagMonitor
from benchmarks.harness.datasets import (
    RequestItem,
    build_items,
    count_tokens,
    cycle,
    load_tokenizer,
    trace_items,
)
from benchmarks.harness.metrics import loop_lag_stats, summarize
from benchmarks.harness.profile.arrivals import RateCurve, rate_schedule
from benchmarks.harness.profile.schema import (
    ConcurrentLoad,
    OpenLoopFields,
    Profile,
    RampLoad,
    RateLoad,
    StepsLoad,
    SweepLoad,
    SweepStop,
    TraceLoad,
)
from benchmarks.harness.profile.traces import read_trace, trace_schedule
from benchmarks.harness.records import RequestRecord, now, retokenize
from benchmarks.harness.server_metrics import (
    ServerMetricsRecorder,
    Snapshot,
    deltas,
    gauge_stats,
    gauges_of,
)
from benchmarks.harness.transport import HttpLibrary, Transport, make_transport

SCHEDULE_LEAD_S = 0.005  # the schedule starts a moment after it is built


class WarmupFailed(RuntimeError):
    """Every warm-up request failed: the target cannot serve this profile."""


# ---------------------------------------------------------------- results


@dataclass
class Window:
    """A stretch of a phase reported on its own (a step, a ramp slice, a sweep rate)."""

    label: str
    start: float  # offset from the phase start
    offered: dict[str, Any]


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
class StepResult:
    index: int
    label: str
    offered: dict[str, Any]
    window: tuple[float, float]
    summary: dict[str, Any]
    server: dict[str, Any]


@dataclass
class RunResult:
    profile: Profile
    target: Target
    model: str
    started: str
    steps: list[StepResult]
    summary: dict[str, Any]
    records: list[RequestRecord]
    client: dict[str, Any]
    server: dict[str, Any]
    sweep: dict[str, Any] | None = None
    warmup: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- schedules


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


class Progress:
    """A rich progress bar (or nothing): requests done, ok and failed."""

    def __init__(self, enabled: bool) -> None:
        self._p: Any = None
        self._task: Any = None
        self.ok = self.failed = 0
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._p = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("ok {task.fields[ok]} · failed {task.fields[failed]}"),
                TimeElapsedColumn(),
                refresh_per_second=4,
            )
            self._p.start()

    def phase(self, label: str, total: int | None) -> None:
        self.ok = self.failed = 0
        if self._p is not None:
            self._task = self._p.add_task(label, total=total, ok=0, failed=0)

    def done(self, ok: bool) -> None:
        if ok:
            self.ok += 1
        else:
            self.failed += 1
        if self._p is not None and self._task is not None:
            self._p.update(self._task, advance=1, ok=self.ok, failed=self.failed)

    def close(self) -> None:
        if self._p is not None:
            self._p.stop()


def _offered_rate(load: OpenLoopFields, rate: float) -> dict[str, Any]:
    return {
        "offered_rate": rate,
        "arrival": load.arrival,
        "burstiness": load.burstiness if load.arrival == "gamma" else None,
        "max_concurrency": load.max_concurrency,
    }


def peak_concurrency(p: Profile) -> int:
    """Connections the pool must allow (a guess for open loops: rate × 8 s)."""
    load = p.load
    if isinstance(load, ConcurrentLoad):
        return load.concurrency
    if isinstance(load, StepsLoad) and load.closed:
        return max(s.concurrency or 1 for s in load.steps)
    cap = getattr(load, "max_concurrency", None)
    if cap:
        return cap
    rate = {
        RateLoad: lambda: load.rate,
        StepsLoad: lambda: max(s.rate or 0 for s in load.steps),
        RampLoad: lambda: max(load.start_rate, load.end_rate),
        SweepLoad: lambda: max(load.rate_list()),
    }.get(type(load), lambda: 64.0)()
    return int(min(4096, max(64, rate * 8)))


# ---------------------------------------------------------------- the runner


class Runner:
    def __init__(
        self,
        profile: Profile,
        target: Target,
        *,
        progress: bool = False,
        tokenizer: str | None = None,
        token_check: str = "auto",
        http: HttpLibrary = "aiohttp",
        transport: Transport | None = None,
        loop_lag_interval_s: float = 0.005,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.loop_lag_interval_s = loop_lag_interval_s
        self.profile = profile
        self.http_library = http
        self._transport = transport  # tests hand in their own
        self.target = target
        self.progress = Progress(False)
        self.progress_enabled = progress
        self.tokenizer_name = tokenizer
        self.token_check = token_check
        self.log = log or (lambda _msg: None)
        self._tokenizer: Any = None
        self.records: list[RequestRecord] = []
        self.phases: list[Phase] = []
        self.monitor = LoopLagMonitor(0)
        self.t0 = 0.0

    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self.log(f"loading tokenizer {self.tokenizer_name or '(demo model)'}")
            self._tokenizer = load_tokenizer(self.tokenizer_name)
        return self._tokenizer

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

    # -- phases

    async def open_phase(
        self,
        offsets: np.ndarray,
        windows: list[Window],
        items: Iterator[RequestItem],
        step_base: int,
        max_concurrency: int | None,
    ) -> Phase:
        before = await self._settled_snapshot()
        cpu0, wall0 = time.process_time(), now()
        base = now() - self.t0 + SCHEDULE_LEAD_S
        starts = np.array([w.start for w in windows])
        which = np.searchsorted(starts, offsets, side="right") - 1
        plan = []
        for off, w in zip(offsets.tolist(), which.tolist(), strict=True):
            item = next(items)
            plan.append((item, self._new_record(item, step_base + w, base + off)))
        sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        tasks: list[asyncio.Task[None]] = []

        def fire(i: int) -> None:
            item, rec = plan[i]
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
        phase = Phase([r for _, r in plan], base, windows, [before, *mid, after], True, cpu, wall)
        self.phases.append(phase)
        return phase

    async def closed_phase(
        self,
        spec: list[tuple[float | None, int]],
        windows: list[Window],
        items: Iterator[RequestItem],
        step_base: int,
        num_requests: int | None,
    ) -> Phase:
        """Workers send back-to-back; window k runs spec[k] = (duration, concurrency)."""
        before = await self._settled_snapshot()
        cpu0, wall0 = time.process_time(), now()
        base = now() - self.t0
        starts = [w.start for w in windows]
        durations = [d for d, _ in spec]
        end = None if None in durations else self.t0 + base + sum(durations)  # type: ignore[arg-type]
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

    # -- the run

    async def run(self) -> RunResult:
        p = self.profile
        started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        conc = peak_concurrency(p)
        http = self._transport or make_transport(
            self.http_library, conc, p.request.timeout_s, self.target.api_key
        )
        try:
            model = self.target.model or await discover_model(http, self.target)
            self.log(f"target {self.target.api} · model {model} · /v1/{p.endpoint}")
            items, trace = self._items()
            self.client = OpenAIClient(http, self.target, model, p.request)
            self.recorder = ServerMetricsRecorder(
                http,
                self.target.prometheus_url,
                interval_s=p.scrape_interval_s,
                enabled=p.server_metrics,
            )
            metrics_ok = await self.recorder.probe() if p.server_metrics else False
            warmup = await self._warmup(items)
            stream = iter(items) if trace is not None else cycle(items)
            self.monitor = monitor = LoopLagMonitor(self.loop_lag_interval_s)
            cpu, freezer = CPUMeter(), GCFreezer()
            self.progress = Progress(self.progress_enabled)
            self.t0 = self.client.t0 = self.recorder.t0 = now()
            freezer.start()
            self.recorder.start()
            monitor.start()
            cpu.start()
            steps: list[StepResult] = []
            sweep = None
            try:
                if isinstance(p.load, SweepLoad):
                    sweep = await self._sweep(p.load, stream, steps)
                else:
                    steps = await self._single(stream, trace)
            finally:
                client_cpu = cpu.stop()
                await monitor.stop()
                await self.recorder.stop()
                await freezer.stop()
                self.progress.close()
        finally:
            if self._transport is None:
                await http.aclose()
        self._check_tokens()
        result = RunResult(
            profile=p,
            target=self.target,
            model=model,
            started=started,
            steps=steps,
            summary={},
            records=self.records,
            server={},
            sweep=sweep,
            warmup=warmup,
            client={
                "harness_version": __version__,
                "python": sys.version.split()[0],
                "platform": platform.platform(),
                "event_loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
                "http": http.description,
                "loop_lag": loop_lag_stats(monitor.lags, p.thresholds),
                "cpu": client_cpu,
            },
        )
        self._overall(result)
        result.warnings = collect_warnings(result, metrics_ok, self.recorder.error)
        return result

    def _overall(self, result: RunResult) -> None:
        p, recs, steps = self.profile, self.records, result.steps
        starts = [r.scheduled if r.scheduled is not None else r.sent for r in recs]
        first = min((s for s in starts if s is not None), default=0.0)
        last = max((r.finished for r in recs if r.finished is not None), default=first)
        offered = steps[0].offered if len(steps) == 1 else {"steps": len(steps)}
        result.summary = summarize(
            recs,
            window=(first, last),
            percentiles=p.percentiles,
            slo=p.slo,
            thresholds=p.thresholds,
            open_loop=bool(steps) and "concurrency" not in steps[0].offered,
            offered=offered,
        )
        if self.phases:
            result.server = deltas(self.phases[0].snaps[0], self.phases[-1].snaps[-1])
            result.server["gauges"] = gauge_stats(self.recorder.samples, first, last)
        else:
            result.server = {"available": False}

    def _items(self) -> tuple[list[RequestItem], list[Any] | None]:
        p = self.profile
        if isinstance(p.load, TraceLoad):
            entries = read_trace(p.load.path)
            return trace_items(entries, self.tokenizer, np.random.default_rng(p.seed)), entries
        return build_items(p.dataset, p.seed, self.tokenizer), None

    async def _warmup(self, items: list[RequestItem]) -> list[dict[str, Any]]:
        out = []
        for i in range(self.profile.warmup_requests):
            item = items[i % len(items)]
            rec = RequestRecord(-1 - i, item.id)
            self.client.t0 = now()
            await self.client.send(item, rec)
            out.append({"item": item.id, "ok": rec.ok, "status": rec.status, "error": rec.error})
        if out and not any(w["ok"] for w in out):
            raise WarmupFailed(
                f"every warm-up request to {self.target.api} failed; first error: {out[0]['error']}"
            )
        return out

    def _check_tokens(self) -> None:
        """Re-tokenize generated text: the fallback count, and a check on `usage`."""
        if self.token_check == "never":
            return
        ok = [r for r in self.records if r.ok]
        missing = any(r.output_tokens is None for r in ok)
        if self.token_check == "always" or missing or self._tokenizer is not None:
            try:
                tok = self.tokenizer()
            except Exception as e:  # no tokenizer: counts stay as the server gave them
                self.log(f"no tokenizer for the token check: {e}")
                return
            retokenize(ok, lambda text: count_tokens(tok, text))

    async def _single(
        self, items: Iterator[RequestItem], trace: list[Any] | None
    ) -> list[StepResult]:
        p = self.profile
        load = p.load
        rng = np.random.default_rng(p.seed)
        if isinstance(load, ConcurrentLoad):
            c = load.concurrency
            windows = [Window(f"concurrency {c}", 0.0, {"concurrency": c})]
            self.progress.phase(windows[0].label, p.num_requests)
            phase = await self.closed_phase([(p.duration_s, c)], windows, items, 0, p.num_requests)
            return self.steps_of(phase, 0)
        if isinstance(load, StepsLoad) and load.closed:
            t, windows = 0.0, []
            for s in load.steps:
                windows.append(
                    Window(f"concurrency {s.concurrency}", t, {"concurrency": s.concurrency})
                )
                t += s.duration_s
            spec = [(s.duration_s, s.concurrency or 1) for s in load.steps]
            self.progress.phase(p.name, None)
            return self.steps_of(await self.closed_phase(spec, windows, items, 0, None), 0)
        if isinstance(load, RateLoad):
            offsets = rate_schedule(
                load.rate,
                load.arrival,
                load.burstiness,
                rng,
                count=p.num_requests,
                duration=p.duration_s,
            )
            label = f"{load.rate:g} req/s {load.arrival}"
            windows = [Window(label, 0.0, _offered_rate(load, load.rate))]
        elif isinstance(load, StepsLoad):
            curve = RateCurve.steps([(s.duration_s, s.rate or 0.0) for s in load.steps])
            offsets = curve.schedule(load.arrival, load.burstiness, rng)
            t, windows = 0.0, []
            for s in load.steps:
                windows.append(Window(f"{s.rate:g} req/s", t, _offered_rate(load, s.rate or 0.0)))
                t += s.duration_s
        elif isinstance(load, RampLoad):
            curve = RateCurve.ramp(load.start_rate, load.end_rate, load.duration_s)
            offsets = curve.schedule(load.arrival, load.burstiness, rng)
            width = load.duration_s / load.windows
            windows = []
            for k in range(load.windows):
                frac = (k + 0.5) / load.windows
                mid = load.start_rate + (load.end_rate - load.start_rate) * frac
                windows.append(
                    Window(f"ramp ~{mid:.3g} req/s", k * width, _offered_rate(load, mid))
                )
        else:
            assert isinstance(load, TraceLoad) and trace is not None
            offsets = trace_schedule(trace, load.time_scale)
            span = float(offsets[-1]) if len(offsets) > 1 else 0.0
            offered = {
                "offered_rate": (len(offsets) - 1) / span if span > 0 else None,
                "trace": str(load.path),
                "time_scale": load.time_scale,
                "max_concurrency": load.max_concurrency,
            }
            windows = [Window(f"trace {load.path.name}", 0.0, offered)]
        self.progress.phase(windows[0].label if len(windows) == 1 else p.name, len(offsets))
        cap = getattr(load, "max_concurrency", None)
        phase = await self.open_phase(offsets, windows, items, 0, cap)
        return self.steps_of(phase, 0)

    async def _sweep(
        self, load: SweepLoad, items: Iterator[RequestItem], steps: list[StepResult]
    ) -> dict[str, Any]:
        p = self.profile
        rng = np.random.default_rng(p.seed)
        rates = load.rate_list()
        reason = None
        for k, rate in enumerate(rates):
            offsets = rate_schedule(
                rate,
                load.arrival,
                load.burstiness,
                rng,
                count=load.step_requests,
                duration=load.step_duration_s,
            )
            window = Window(f"{rate:g} req/s", 0.0, _offered_rate(load, rate))
            self.progress.phase(f"sweep {k + 1}/{len(rates)}: {window.label}", len(offsets))
            phase = await self.open_phase(offsets, [window], items, k, load.max_concurrency)
            step = self.steps_of(phase, k)[0]
            steps.append(step)
            reason = saturation_reason(steps, load.stop)
            s = step.summary
            self.log(
                f"sweep {rate:g} req/s: {s['request_throughput']:.2f} req/s completed, "
                f"median E2E {_fmt(s['median_e2el_ms'])} ms"
                + (f" → saturated: {reason}" if reason else "")
            )
            if reason:
                break
        return sweep_summary(steps, reason, rates)


# ---------------------------------------------------------------- sweeps


def saturation_reason(steps: list[StepResult], stop: SweepStop) -> str | None:
    """Why the last sweep step shows a saturated server, or None."""
    s = steps[-1].summary
    # The rate this step's random schedule really offered (a short Poisson
    # step can offer noticeably less than its nominal rate).
    nominal = steps[-1].offered.get("offered_rate") or 0.0
    offered = min(nominal, s["load"].get("scheduled_rate") or nominal)
    done = s["load"].get("completion_rate") or s["request_throughput"]
    n = max(1, s["requests"])
    if s["failed"] / n > stop.max_error_rate:
        return f"{s['failed']}/{n} requests failed"
    behind = [
        r
        for r in s["load"].get("coordinated_omission_reasons") or []
        if "send rate" in r or "never sent" in r
    ]
    if behind:
        # Past this rate the client, not the server, sets the numbers. (A few
        # late sends only flag the step: on a shared machine the OS causes those.)
        return "the client could not keep to its schedule: " + "; ".join(behind)
    if offered and done < stop.min_rate_ratio * offered:
        return f"completion rate {done:.2f} req/s < {stop.min_rate_ratio:g} × offered {offered:.2f}"
    if len(steps) > 1:
        prev_s = steps[-2].summary
        prev = prev_s["load"].get("completion_rate") or prev_s["request_throughput"]
        if prev and done < (1 + stop.min_gain) * prev:
            return f"throughput gain {done / prev - 1:+.1%} < {stop.min_gain:.0%}"
        base = steps[0].summary["median_e2el_ms"]
        med = s["median_e2el_ms"]
        if base and med and med > stop.max_latency_factor * base:
            return f"median E2E {med:.0f} ms > {stop.max_latency_factor:g} × {base:.0f} ms"
    return None


def sweep_summary(
    steps: list[StepResult], reason: str | None, rates: list[float]
) -> dict[str, Any]:
    """The knee: the highest offered rate before the step that saturated."""
    unsaturated = steps[:-1] if reason else steps
    knee = unsaturated[-1] if unsaturated else None
    best = max(steps, key=lambda st: st.summary["request_throughput"]) if steps else None
    return {
        "rates_planned": rates,
        "rates_run": [st.offered.get("offered_rate") for st in steps],
        "saturated": reason is not None,
        "saturation_reason": reason,
        "knee_rate": knee.offered.get("offered_rate") if knee else None,
        "knee_request_throughput": knee.summary["request_throughput"] if knee else None,
        "knee_output_throughput": knee.summary["output_throughput"] if knee else None,
        "knee_median_e2el_ms": knee.summary["median_e2el_ms"] if knee else None,
        "max_request_throughput": best.summary["request_throughput"] if best else None,
        "max_output_throughput": best.summary["output_throughput"] if best else None,
    }


# ---------------------------------------------------------------- warnings


def collect_warnings(result: RunResult, metrics_ok: bool, metrics_error: str | None) -> list[str]:
    """What makes these numbers less trustworthy, said plainly."""
    w: list[str] = []
    p = result.profile
    for st in result.steps:
        load = st.summary["load"]
        if load.get("coordinated_omission"):
            w.append(
                f"step '{st.label}': the client fell behind its schedule "
                f"(coordinated omission): {'; '.join(load['coordinated_omission_reasons'])}. "
                "Latencies from send time understate what on-schedule users would see; "
                "see *_from_schedule."
            )
    lag = result.client["loop_lag"]
    if lag.get("overloaded"):
        w.append(
            f"client event-loop lag p99 {lag['p99_ms']:.1f} ms > "
            f"{p.thresholds.max_loop_lag_p99_ms:g} ms: the client may be the bottleneck"
        )
    s = result.summary
    if s["failed"]:
        top = s["errors"][0]
        w.append(
            f"{s['failed']} of {s['requests']} requests failed "
            f"(most common: {top['error']!r} ×{top['count']})"
        )
    if p.request.ignore_eos and s["shorter_than_max_tokens"]:
        w.append(
            f"{s['shorter_than_max_tokens']} responses are shorter than max_tokens with "
            "ignore_eos: the server may not support ignore_eos"
        )
    tc = s["token_check"]
    if tc and tc["mismatched"]:
        w.append(
            f"re-tokenized output differs from the server's usage in {tc['mismatched']}/"
            f"{tc['checked']} requests (usage {tc['usage_total']}, re-tokenized "
            f"{tc['retokenized_total']} tokens); usage is what is reported"
        )
    src = s["output_token_source"]
    if src["retokenized"] or src["unknown"]:
        w.append(
            f"the server sent no usage for {src['retokenized'] + src['unknown']} requests: "
            f"their output tokens are re-tokenized ({src['retokenized']}) "
            f"or unknown ({src['unknown']})"
        )
    if p.server_metrics and not metrics_ok:
        w.append(f"no server-side metrics: {metrics_error or 'scrape failed'}")
    ctr = result.server.get("counters") if isinstance(result.server, dict) else None
    if ctr and "generation_tokens" in ctr:
        server_out = ctr["generation_tokens"]
        ours = s["total_output_tokens"]
        if ours and abs(server_out - ours) > 0.01 * ours:
            w.append(
                f"the server counted {server_out:.0f} generated tokens during the run, the client "
                f"{ours}: other traffic on the server, or requests the client did not see finish"
            )
    return w


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}"


async def run_profile(profile: Profile, target: Target, **kwargs: Any) -> RunResult:
    return await Runner(profile, target, **kwargs).run()
