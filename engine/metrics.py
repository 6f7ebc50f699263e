"""Prometheus metrics: what every request and the engine's scheduler report.

One `Metrics` per app, each with its own registry, so several apps (tests, Ray
replicas in one process) never collide. Engine gauges are read when scraped,
not pushed on every engine step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

PREFIX = "codellama_serve"

# The *_created series double the exposition for no use on dashboards.
disable_created_metrics()

# LLM latencies span milliseconds (a cached short prompt) to minutes (a long
# generation queued behind a full batch); the buckets cover both ends.
TTFT_BUCKETS = (
    0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
TPOT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip
E2E_BUCKETS = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0,
    45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0,
)  # fmt: skip
TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class SpecDecodeTotals(Protocol):
    """Speculative decoding's running totals (engine.llm.SpecDecodeStats)."""

    @property
    def drafts(self) -> int: ...
    @property
    def draft_tokens(self) -> int: ...
    @property
    def accepted_tokens(self) -> int: ...
    @property
    def accepted_per_position(self) -> Sequence[int]: ...


@dataclass(slots=True)
class EngineGauges:
    """Where the scrape-time series read from (callables, so nothing is pushed)."""

    running: Callable[[], float]
    waiting: Callable[[], float]
    kv_cache_usage: Callable[[], float]
    healthy: Callable[[], float]
    ready: Callable[[], float]
    # Running totals kept by the engine's stats logger (counters, read when scraped).
    prefix_cache_queries: Callable[[], float] = lambda: 0.0
    prefix_cache_hits: Callable[[], float] = lambda: 0.0
    preemptions: Callable[[], float] = lambda: 0.0
    # None while speculative decoding is off (then no spec_decode series exist).
    spec_decode: Callable[[], SpecDecodeTotals | None] = lambda: None


class _EngineCounters(Collector):
    """Counters whose totals the engine keeps: exposed as counters, read when scraped."""

    def __init__(self, engine: EngineGauges) -> None:
        self.engine = engine

    def collect(self) -> Iterator[CounterMetricFamily]:
        e = self.engine
        for name, doc, read in (
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
             e.prefix_cache_queries),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", e.prefix_cache_hits),
            ("preemptions", "Sequences the engine preempted (KV cache full).", e.preemptions),
        ):  # fmt: skip
            yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=read())


class _SpecDecodeCounters(Collector):
    """Speculative decoding's acceptance, with vLLM's names under our prefix.

    Acceptance rate = accepted_tokens / draft_tokens; mean acceptance length =
    1 + accepted_tokens / drafts; position i's acceptance rate =
    accepted_tokens_per_pos{position="i"} / drafts.
    """

    def __init__(self, engine: EngineGauges) -> None:
        self.engine = engine

    def collect(self) -> Iterator[CounterMetricFamily]:
        totals = self.engine.spec_decode()
        if totals is None:
            return
        p = f"{PREFIX}_spec_decode"
        for name, doc, value in (
            ("num_drafts", "Speculative proposals (one per sequence and step).", totals.drafts),
            ("num_draft_tokens", "Tokens proposed by the speculator.", totals.draft_tokens),
            ("num_accepted_tokens", "Proposed tokens the model accepted.", totals.accepted_tokens),
        ):  # fmt: skip
            yield CounterMetricFamily(f"{p}_{name}", doc, value=value)
        per_position = CounterMetricFamily(
            f"{p}_num_accepted_tokens_per_pos",
            "Proposed tokens accepted, by position in the proposal (0: the first).",
            labels=["position"],
        )
        for position, accepted in enumerate(totals.accepted_per_position):
            per_position.add_metric([str(position)], accepted)
        yield per_position


class Metrics:
    def __init__(self, engine: EngineGauges, model_name: Callable[[], str]) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        p = PREFIX
        self.requests = Counter(
            f"{p}_requests", "Finished HTTP requests by endpoint and status code.",
            ["endpoint", "status"], registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            f"{p}_time_to_first_token_seconds",
            "Time from request arrival to the first generated token.",
            ["endpoint"], buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.tpot = Histogram(
            f"{p}_time_per_output_token_seconds",
            "Per request: (last token time - first token time) / (output tokens - 1).",
            ["endpoint"], buckets=TPOT_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            f"{p}_e2e_request_latency_seconds",
            "Time from request arrival to its last byte.",
            ["endpoint"], buckets=E2E_BUCKETS, registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            f"{p}_prompt_tokens", "Prompt tokens of admitted requests.", registry=r
        )
        self.generation_tokens = Counter(f"{p}_generation_tokens", "Generated tokens.", registry=r)
        self.prompt_length = Histogram(
            f"{p}_request_prompt_tokens", "Prompt tokens per request.",
            buckets=TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.generation_length = Histogram(
            f"{p}_request_generation_tokens", "Generated tokens per request.",
            buckets=TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.aborted = Counter(
            f"{p}_requests_aborted",
            "Requests aborted in the engine before they finished, by reason "
            "(client_disconnect, timeout).",
            ["reason"], registry=r,
        )  # fmt: skip
        self.aborted_tokens = Counter(
            f"{p}_aborted_generation_tokens",
            "Tokens generated for requests that were then aborted (work thrown away), by reason.",
            ["reason"], registry=r,
        )  # fmt: skip
        self.in_flight = Gauge(
            f"{p}_http_requests_in_flight", "Generation requests being served now.", registry=r
        )
        self.admitted_sequences = Gauge(
            f"{p}_admission_in_flight_sequences",
            "Admitted, unfinished sequences (a request with n=4 counts 4).", registry=r,
        )  # fmt: skip
        self.queued_sequences = Gauge(
            f"{p}_admission_waiting_sequences",
            "Admitted sequences beyond the engine's batch (--max-num-seqs): the waiting queue.",
            registry=r,
        )  # fmt: skip
        self.queued_prompt_tokens = Gauge(
            f"{p}_admission_waiting_prompt_tokens",
            "Prompt tokens of admitted requests still waiting for their first token.", registry=r,
        )  # fmt: skip
        self.refused = Counter(
            f"{p}_requests_refused",
            "Requests refused before any work: queue_full, queue_tokens, rate_limit_rpm, "
            "rate_limit_tpm, draining, unauthorized.",
            ["reason"], registry=r,
        )  # fmt: skip
        self._gauge(f"{p}_requests_running", "Sequences the engine is running.", engine.running)
        self._gauge(f"{p}_requests_waiting", "Sequences waiting in the engine.", engine.waiting)
        self._gauge(
            f"{p}_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use (0-1).",
            engine.kv_cache_usage,
        )  # fmt: skip
        self._gauge(f"{p}_engine_healthy", "1 while the engine process is alive.", engine.healthy)
        self._gauge(f"{p}_ready", "1 while the server accepts requests.", engine.ready)
        r.register(_EngineCounters(engine))
        self.classes = PriorityClassMetrics(r)
        r.register(_SpecDecodeCounters(engine))
        self.info = Gauge(f"{p}_model_info", "The served model.", ["model"], registry=r)
        self._model_name = model_name

    def _gauge(self, name: str, doc: str, read: Callable[[], float]) -> None:
        Gauge(name, doc, registry=self.registry).set_function(read)

    def render(self) -> tuple[bytes, str]:
        name = self._model_name()
        if name:
            self.info.labels(model=name).set(1)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class PriorityClassMetrics:
    """The per-class series (label `priority_class`: one of the configured classes, at most
    eight; never a key). Separate series, so the unlabelled-by-class ones and every
    dashboard and alert built on them stay as they are."""

    def __init__(self, registry: CollectorRegistry) -> None:
        p, r, by = f"{PREFIX}_class", registry, ["priority_class"]
        self.requests = Counter(
            f"{p}_requests", "Finished generation requests by priority class and status code.",
            [*by, "status"], registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            f"{p}_time_to_first_token_seconds",
            "Time from request arrival to the first generated token, by priority class.",
            by, buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.tpot = Histogram(
            f"{p}_time_per_output_token_seconds",
            "Per request: (last token time - first token time) / (output tokens - 1), by class.",
            by, buckets=TPOT_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            f"{p}_e2e_request_latency_seconds",
            "Time from request arrival to its last byte, by priority class.",
            by, buckets=E2E_BUCKETS, registry=r,
        )  # fmt: skip
        self.admitted = Gauge(
            f"{p}_admitted_sequences", "Admitted, unfinished sequences of the class.", by,
            registry=r,
        )  # fmt: skip
        self.waiting = Gauge(
            f"{p}_waiting_sequences",
            "Admitted sequences of the class with no token yet (queued in the engine or in "
            "prefill; a non-streamed request counts until it finishes).", by, registry=r,
        )  # fmt: skip
        self.refused = Counter(
            f"{p}_requests_refused",
            "Requests of the class refused with 429: queue_full (the class's bound), "
            "fair_share (the key holds its share of the class), queue_tokens, rate_limit_*.",
            [*by, "reason"], registry=r,
        )  # fmt: skip
        self.preemptions = Counter(
            f"{p}_preemptions",
            "Times the engine preempted the class's requests (counted when a request ends).",
            by, registry=r,
        )  # fmt: skip
        self.clamped = Counter(
            f"{p}_priority_clamped",
            "Requests that asked for a priority above their key's class and ran in the key's "
            "class instead.", by, registry=r,
        )  # fmt: skip

    def declare(self, classes: list[str]) -> None:
        """Show every class's series from the start (at zero), not once it is first used."""
        per_class = (self.ttft, self.tpot, self.e2e, self.admitted, self.waiting,
                     self.preemptions, self.clamped)  # fmt: skip
        for name in classes:
            for metric in per_class:
                metric.labels(name)
