"""Runs a profile against one endpoint: warm-up, phases of load, scrapes, summaries.

The load's phases are planned up front (plans.py) and run by phases.py; this
module sets up the client, the server scrapes and the client's own probes
around them, sweeps rate by rate, and puts the result together.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import platform
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from benchmarks import __version__
from benchmarks.harness.caveats import collect_warnings
from benchmarks.harness.client import OpenAIClient, Target, discover_model
from benchmarks.harness.client_health import CPUMeter, GCFreezer, LoopLagMonitor
from benchmarks.harness.datasets import (
    RequestItem,
    build_items,
    count_tokens,
    cycle,
    length_fitter,
    load_tokenizer,
    trace_items,
)
from benchmarks.harness.metrics import loop_lag_stats, summarize
from benchmarks.harness.phases import Phase, PhaseRunner
from benchmarks.harness.plans import peak_concurrency, single_plan, sweep_step
from benchmarks.harness.profile.schema import Profile, SweepLoad, TraceLoad
from benchmarks.harness.profile.traces import TraceEntry, read_trace
from benchmarks.harness.profile.workloads import SessionsLoad
from benchmarks.harness.progress import Progress
from benchmarks.harness.quality.section import quality_section
from benchmarks.harness.records import RequestRecord, now, retokenize
from benchmarks.harness.results import RunResult, StepResult, WarmupFailed
from benchmarks.harness.salt import SaltedStream
from benchmarks.harness.server_metrics import ServerMetricsRecorder, deltas, gauge_stats
from benchmarks.harness.session_phase import SessionWorkload, run_sessions
from benchmarks.harness.sweeps import saturation_reason, sweep_summary
from benchmarks.harness.transport import HttpLibrary, Transport, make_transport
from benchmarks.harness.workers import WorkerPool, WorkerSetup, workers_refused
from benchmarks.harness.workload_sections import build_session_workload, workload_sections


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
        workers: int = 1,
    ) -> None:
        if refused := workers_refused(profile.load, workers):
            raise ValueError(refused)
        self.loop_lag_interval_s = loop_lag_interval_s
        self.workers = workers
        self.profile = profile
        self.http_library = http
        self._transport = transport  # tests hand in their own
        self.target = target
        self.progress_enabled = progress
        self.tokenizer_name = tokenizer
        self.token_check = token_check
        self.log = log or (lambda _msg: None)
        self._tokenizer: Any = None
        self.workload: SessionWorkload | None = None  # a `sessions` load's users

    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self.log(f"loading tokenizer {self.tokenizer_name or '(demo model)'}")
            self._tokenizer = load_tokenizer(self.tokenizer_name)
        return self._tokenizer

    async def run(self) -> RunResult:
        p = self.profile
        started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        conc = peak_concurrency(p)
        pool: WorkerPool | None = None
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
            cache_reset = (
                await reset_prefix_cache(http, self.target) if p.reset_prefix_cache else None
            )
            warmup = await self._warmup(items)
            stream = self._salted(iter(items) if trace is not None else cycle(items), items)
            pool = await self._start_workers(model, conc)
            phases, steps, sweep, client_cpu = await self._measure(stream, trace, pool)
            quality = await self._quality(phases.records, items)
        finally:
            if pool is not None:
                pool.close()
            if self._transport is None:
                await http.aclose()
        self._check_tokens(phases.records)
        result = RunResult(
            profile=p,
            target=self.target,
            model=model,
            started=started,
            steps=steps,
            summary={},
            records=phases.records,
            server={},
            sweep=sweep,
            warmup=warmup,
            client={
                "harness_version": __version__,
                "python": sys.version.split()[0],
                "platform": platform.platform(),
                "event_loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
                "http": http.description,
                "scheduling": scheduling_policy(),
                "loop_lag": loop_lag_stats(phases.monitor.lags, p.thresholds),
                "cpu": client_cpu,
                "workers": pool.report() if pool else {"count": 1},
            },
        )
        if pool is not None:  # the load came from the workers: their CPU is the client's
            client_cpu["parent_cpu_s"] = client_cpu["cpu_s"]
            client_cpu["cpu_s"] += sum(pool.cpu_s)
            client_cpu["cpu_utilization"] = client_cpu["cpu_s"] / max(client_cpu["wall_s"], 1e-9)
        result.prompts = prompts_report(stream, p, len(phases.records), self.workload is not None)
        result.cache_reset = cache_reset
        self._overall(result, phases.phases)
        result.sections = workload_sections(result, self.workload)
        if quality is not None:
            result.sections["quality"] = quality
        result.warnings = collect_warnings(result, metrics_ok, self.recorder.error)
        return result

    async def _start_workers(self, model: str, conc: int | None) -> WorkerPool | None:
        """--workers N: the load-generator processes, started before the clock runs."""
        if self.workers <= 1:
            return None
        p = self.profile
        setup = WorkerSetup(
            http=self.http_library,
            target=self.target,
            model=model,
            request=p.request,
            pool_concurrency=None if conc is None else -(-conc // self.workers),
            loop_lag_interval_s=self.loop_lag_interval_s,
        )
        pool = WorkerPool(self.workers, setup)
        self.log(f"starting {self.workers} load-generator processes")
        await asyncio.to_thread(pool.start)
        return pool

    async def _measure(
        self,
        items: Iterator[RequestItem],
        trace: list[TraceEntry] | None,
        pool: WorkerPool | None = None,
    ) -> tuple[PhaseRunner, list[StepResult], dict[str, Any] | None, dict[str, float]]:
        """The measured phases, with the scrapes and the client's probes running around them."""
        p = self.profile
        monitor = LoopLagMonitor(self.loop_lag_interval_s)
        cpu, freezer = CPUMeter(), GCFreezer()
        progress = Progress(self.progress_enabled)
        t0 = self.client.t0 = self.recorder.t0 = now()
        phases = PhaseRunner(p, self.client, self.recorder, monitor, progress, t0, pool)
        freezer.start()
        self.recorder.start()
        monitor.start()
        cpu.start()
        sweep = None
        try:
            if isinstance(p.load, SweepLoad):
                steps, sweep = await self._sweep(phases, p.load, items)
            elif self.workload is not None:
                steps = await run_sessions(phases, self.workload)
            else:
                steps = await phases.run(single_plan(p, trace), items, 0)
        finally:
            client_cpu = cpu.stop()
            await monitor.stop()
            await self.recorder.stop()
            await freezer.stop()
            progress.close()
        return phases, steps, sweep, client_cpu

    def _overall(self, result: RunResult, phases: list[Phase]) -> None:
        p, recs, steps = self.profile, result.records, result.steps
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
        if phases:
            result.server = deltas(phases[0].snaps[0], phases[-1].snaps[-1])
            result.server["gauges"] = gauge_stats(self.recorder.samples, first, last)
        else:
            result.server = {"available": False}

    def _salted(self, items: Iterator[RequestItem], built: list[RequestItem]) -> SaltedStream:
        """Each request's prompt made unique (salt.py), unless the profile shares on purpose."""
        p = self.profile
        enabled = unsalted_because(p) is None
        exact = any(it.input_tokens is not None for it in built)
        fit = length_fitter(self.tokenizer(), p.seed) if enabled and exact else None
        return SaltedStream(items, enabled, fit)

    def _items(self) -> tuple[list[RequestItem], list[TraceEntry] | None]:
        p = self.profile
        if isinstance(p.load, SessionsLoad):
            self.workload = build_session_workload(p, self.tokenizer(), keep_items=bool(p.quality))
            return self.workload.warmup_items(max(1, p.warmup_requests)), None
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
        # Sessions go on: their report says how their requests fail (e.g. no `suffix`).
        if out and not any(w["ok"] for w in out) and self.workload is None:
            raise WarmupFailed(
                f"every warm-up request to {self.target.api} failed; first error: {out[0]['error']}"
            )
        return out

    async def _quality(
        self, records: list[RequestRecord], items: list[RequestItem]
    ) -> dict[str, Any] | None:
        """Score the outputs, if the profile asks (equivalence resends prompts alone)."""
        if self.profile.quality is None:
            return None
        by_id = {it.id: it for it in items}
        workload = self.workload

        def item_of(rec: RequestRecord) -> RequestItem | None:
            return workload.item_of(rec) if workload is not None else by_id.get(rec.item_id)

        self.log("scoring outputs (quality)")
        return await quality_section(self.client, records, item_of, self.profile, self.log)

    def _check_tokens(self, records: list[RequestRecord]) -> None:
        """Re-tokenize generated text: the fallback count, and a check on `usage`."""
        if self.token_check == "never":
            return
        ok = [r for r in records if r.ok]
        missing = any(r.output_tokens is None for r in ok)
        if self.token_check == "always" or missing or self._tokenizer is not None:
            try:
                tok = self.tokenizer()
            except Exception as e:  # no tokenizer: counts stay as the server gave them
                self.log(f"no tokenizer for the token check: {e}")
                return
            retokenize(ok, lambda text: count_tokens(tok, text))

    async def _sweep(
        self, phases: PhaseRunner, load: SweepLoad, items: Iterator[RequestItem]
    ) -> tuple[list[StepResult], dict[str, Any]]:
        """Rates one by one, each drained before the next, until the server saturates."""
        rng = np.random.default_rng(self.profile.seed)
        rates = load.rate_list()
        steps: list[StepResult] = []
        reason = None
        for k, rate in enumerate(rates):
            step = (await phases.run(sweep_step(load, k, rates, rng), items, k))[0]
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
        return steps, sweep_summary(steps, reason, rates)


def scheduling_policy() -> str:
    """How the OS schedules the client: `normal`, or `fifo:<priority>` (--client-priority)."""
    import os

    try:
        policy = os.sched_getscheduler(0)
    except (OSError, AttributeError):
        return "unknown"
    if policy == getattr(os, "SCHED_FIFO", -1):
        return f"fifo:{os.sched_getparam(0).sched_priority}"
    return "normal"


def unsalted_because(p: Profile) -> str | None:
    """Why this run's prompts go unsalted (None: each request is salted)."""
    spec = p.dataset
    if spec.shares_prefixes:
        return "the dataset shares prefixes on purpose"
    if any(d.repeat > 1 for d in (spec, *(spec.parts or ()))):
        return "the dataset repeats each item on purpose (`repeat`)"
    if p.quality is not None:
        return "the profile scores quality: prompts go as the benchmark wrote them"
    if not spec.salt:
        return "`dataset.salt: false`"
    return None


def prompts_report(stream: SaltedStream, p: Profile, sent: int, sessions: bool) -> dict[str, Any]:
    """Salting and distinct prompts, over the requests the run sent (workers may have
    been handed a few they never sent)."""
    why = unsalted_because(p)
    # Planned sharing: the cache answering part of these prompts is what the run measures.
    planned = why is not None and why != "`dataset.salt: false`"
    out = stream.report(planned, why)
    out["requests"] = sent
    if sessions:  # built as the sessions ran, not drawn from the stream: not counted
        out["distinct_prompts"] = out["repeated"] = None
        return out
    out["distinct_prompts"] = min(out["distinct_prompts"], sent)
    out["repeated"] = sent - out["distinct_prompts"]
    return out


async def reset_prefix_cache(http: Transport, target: Target) -> dict[str, Any]:
    """POST <root>/reset_prefix_cache: vLLM's server has it in dev mode; ours has none."""
    url = target.root + "/reset_prefix_cache"
    errors: tuple[type[BaseException], ...] = (*http.errors, TimeoutError)
    try:
        async with http.post(url, b"") as resp:
            status = resp.status
            body = await resp.read()
    except errors as e:
        return {"url": url, "ok": False, "error": f"{type(e).__name__}: {e}"}
    out: dict[str, Any] = {"url": url, "ok": status == 200, "status": status}
    if status != 200:
        out["error"] = f"HTTP {status}: {body[:200].decode(errors='replace').strip()}"
    return out


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}"
