"""The vLLM engine: the only module that imports vLLM.

Everything vLLM-version specific lives here, so an upgrade touches one file.
What crosses the boundary are this module's own small types: `SamplingOptions`
in, `StepOutput` out (with `EngineTimings` when asked for), `EngineStats` for metrics
and health, and LoRA adapters by name (`engine.adapters.Adapter`; vLLM's
`LoRARequest` stays in here).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from engine.adapters import Adapter, AdapterError, AdapterRegistry
from engine.config import DEMO_LORA, ResolvedSettings

log = logging.getLogger(__name__)

# How long vLLM's engine core waits for its worker process to exit by itself before
# it sends SIGTERM (vLLM's default: 5 s; the environment can still set it). On CPU the
# worker was still running when those 5 s ran out, and our process waits 5 s for the
# engine core, so every stop took over 5 s and ended in a SIGKILL of both. With 1 s
# the engine core exits by itself, about 3 s after the stop. By then nothing is in
# flight (drained).
WORKER_EXIT_WAIT_S = 1

GIB = 1 << 30


class EngineError(Exception):
    """Base for the errors the API layer maps to HTTP statuses."""


class EngineDeadError(EngineError):
    """The engine process died; nothing more can be served by this process."""


class EngineRequestError(EngineError):
    """The engine refused the request's parameters (a client error)."""


class EngineNotReadyError(EngineError):
    """The engine has not finished loading."""


class EngineSetupError(EngineError):
    """Settings this vLLM install cannot serve (found before the engine starts)."""


# ---------------------------------------------------------------- data types


@dataclass(frozen=True, slots=True)
class OutputConstraint:
    """A structured-output constraint: generation may only produce text that matches it.

    `kind` is what `value` is: "json" (a JSON Schema, a dict), "json_object" (any JSON
    object; value True), "regex" (a pattern), "choice" (a list of strings) or "grammar"
    (EBNF or Lark text).
    """

    kind: Literal["json", "json_object", "regex", "choice", "grammar"]
    value: Any


@dataclass(slots=True)
class SamplingOptions:
    """What to generate, in the engine's terms (already validated by the API)."""

    max_tokens: int
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # top-k alternatives per generated token
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # Streaming gets each step's new tokens; otherwise one final output, with
    # no per-step work in the frontend at all.
    stream: bool = True
    # vLLM's request priority (lower is served first; with --scheduling-policy priority).
    priority: int = 0
    constraint: OutputConstraint | None = None  # structured outputs


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]]  # (token id, text, logprob), best first


@dataclass(slots=True)
class SequenceDelta:
    """New output of one sequence since the previous step."""

    index: int
    text: str
    token_ids: Sequence[int]
    finish_reason: str | None  # "stop" | "length" | "abort" | None
    stop_reason: int | str | None
    logprobs: list[TokenLogprob] | None


@dataclass(frozen=True, slots=True)
class EngineTimings:
    """When the engine reached each phase of a request so far, as `time.monotonic()` of
    this machine (the engine core's clock); 0.0: not reached yet."""

    arrival: float  # the engine's frontend took the request
    queued: float  # the scheduler queued it
    scheduled: float  # first scheduled: prefill starts
    first_token: float
    last_token: float
    preemptions: int = 0

    def merged(self, other: EngineTimings) -> EngineTimings:
        """One request's timings over several engine requests (prompts): earliest start of
        each phase, latest last token."""

        def first(a: float, b: float) -> float:
            return min(a, b) if a and b else a or b

        return EngineTimings(
            arrival=first(self.arrival, other.arrival),
            queued=first(self.queued, other.queued),
            scheduled=first(self.scheduled, other.scheduled),
            first_token=first(self.first_token, other.first_token),
            last_token=max(self.last_token, other.last_token),
            preemptions=self.preemptions + other.preemptions,
        )


@dataclass(slots=True)
class StepOutput:
    sequences: list[SequenceDelta]
    finished: bool
    prompt_logprobs: list[TokenLogprob | None] | None = None
    num_cached_tokens: int = 0
    # On a non-streamed request's final output: seconds from the engine's
    # arrival to its first token, and from first to last token.
    first_token_latency: float | None = None
    decode_time: float | None = None
    # Times the engine has preempted this request so far (its KV cache was needed).
    preemptions: int = 0
    # The request's phases so far, on every step when the engine was built with
    # `timings=True` (tracing); None otherwise.
    timings: EngineTimings | None = None


@dataclass(slots=True)
class EngineStats:
    """The scheduler's latest figures (gauges) and running totals (counters)."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0  # 0..1
    updated_at: float = 0.0  # time.monotonic() of the last engine step seen
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of them, found there
    preemptions: int = 0  # sequences the scheduler preempted (KV cache full)
    spec_decode: SpecDecodeStats | None = None  # with speculative decoding on

    def add_spec_decode(self, step: Any) -> None:
        """Add one step's speculative decoding counts (vLLM's SpecDecodingStats, or None)."""
        if step is None:
            return
        if self.spec_decode is None:
            self.spec_decode = SpecDecodeStats()
        self.spec_decode.add(step)


@dataclass(slots=True)
class SpecDecodeStats:
    """Speculative decoding's running totals, as vLLM's scheduler counts them.

    A draft is one sequence's proposal in one step; the acceptance rate is
    accepted_tokens / draft_tokens, and a position's rate is
    accepted_per_position[i] / drafts (how often the i-th proposed token survived).
    """

    drafts: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    def add(self, stats: Any) -> None:
        self.drafts += stats.num_drafts
        self.draft_tokens += stats.num_draft_tokens
        self.accepted_tokens += stats.num_accepted_tokens
        per_position = stats.num_accepted_tokens_per_pos
        if len(self.accepted_per_position) < len(per_position):
            self.accepted_per_position += [0] * (
                len(per_position) - len(self.accepted_per_position)
            )
        for i, accepted in enumerate(per_position):
            self.accepted_per_position[i] += accepted


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the API needs to know about the loaded checkpoint."""

    name: str  # what the user asked for (hub name, path or "demo")
    path: str  # what vLLM loaded
    served_name: str
    is_demo: bool
    max_model_len: int
    hidden_size: int
    vocab_size: int
    # The prefix cache's unit: prompts share cached KV in whole blocks of this many
    # tokens; and how many such blocks the KV cache holds (0: not known).
    block_size: int = 16
    kv_cache_blocks: int = 0


# ---------------------------------------------------------------- config -> vLLM


def has_gpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cuda_alike()


def engine_args(settings: ResolvedSettings, model_path: str) -> Any:
    """Build vLLM's AsyncEngineArgs from the resolved settings (pure; unit-tested)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    cfg = settings.engine
    kwargs: dict[str, Any] = dict(
        model=model_path,
        tokenizer=cfg.tokenizer,
        revision=cfg.revision,
        download_dir=cfg.download_dir,
        served_model_name=cfg.served_model_name,
        dtype=cfg.dtype,
        tensor_parallel_size=cfg.tensor_parallel_size,
        max_model_len=cfg.max_model_len,
        max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=cfg.max_num_batched_tokens,
        enable_prefix_caching=cfg.enable_prefix_caching,
        enable_chunked_prefill=cfg.enable_chunked_prefill,
        enforce_eager=cfg.enforce_eager,
        seed=cfg.seed,
        max_logprobs=cfg.max_logprobs,
        distributed_executor_backend=cfg.distributed_executor_backend,
        # fcfs, or priority: each request's `priority` orders the queue and the
        # preemptions (docs/design.md, "Priority classes").
        scheduling_policy=settings.priority.scheduling_policy,
        # We log requests ourselves, once, as JSON.
        enable_log_requests=False,
        # vLLM's own stat loggers (its log lines and vllm:* Prometheus
        # series) are off; ours gets the scheduler stats (see _StatsLogger).
        disable_log_stats=True,
    )
    lora = settings.lora
    if lora.enable_lora:
        kwargs.update(
            enable_lora=True,
            max_loras=lora.max_loras,
            max_lora_rank=lora.max_lora_rank,
            # The registry holds at most this many, so vLLM never evicts one (see
            # engine.adapters).
            max_cpu_loras=lora.max_cpu_loras,
        )
    decoding = settings.decoding
    if decoding.speculative_config is not None:
        kwargs["speculative_config"] = decoding.speculative_config.model_dump(exclude_none=True)
    if decoding.structured_outputs_config is not None:
        from vllm.config import StructuredOutputsConfig

        kwargs["structured_outputs_config"] = StructuredOutputsConfig(
            **decoding.structured_outputs_config.model_dump()
        )
    if settings.gpu:
        kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    else:
        # The KV cache is sized in bytes on CPU, not as a share of device memory.
        kwargs["kv_cache_memory_bytes"] = int(cfg.cpu_kvcache_space_gib * GIB)
    return AsyncEngineArgs(**kwargs)


def check_setup(settings: ResolvedSettings) -> None:
    """Raise EngineSetupError, with what to do, for settings this install cannot serve
    (before minutes of model loading, and with a clearer message than vLLM's)."""
    import importlib.util

    spec = settings.decoding.speculative_config
    if (
        spec is not None
        and spec.method == "suffix"
        and not importlib.util.find_spec("arctic_inference")
    ):
        raise EngineSetupError(
            "--speculative-config method 'suffix' needs the arctic-inference package "
            "(pip install 'codellama-serve[suffix]'; see README.md)"
        )


def _stats_logger_factory(sink: EngineStats) -> type[Any]:
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    class _StatsLogger(PrometheusStatLogger):
        """Copies the scheduler's queue and cache figures into `sink` each step.

        It subclasses vLLM's Prometheus logger only so that vLLM does not add
        that logger itself (vLLM adds it unless a custom one is of its class):
        our metrics are ours, and its per-step recording would cost the
        frontend CPU for series nobody exports.
        """

        def __init__(self, vllm_config: Any, engine_indexes: list[int] | None = None) -> None:
            pass  # none of PrometheusStatLogger's metrics

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            if scheduler_stats is not None:
                sink.running = scheduler_stats.num_running_reqs
                sink.waiting = (
                    scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs
                )
                sink.kv_cache_usage = scheduler_stats.kv_cache_usage
                cache = scheduler_stats.prefix_cache_stats
                sink.prefix_cache_queries += cache.queries
                sink.prefix_cache_hits += cache.hits
                sink.add_spec_decode(scheduler_stats.spec_decoding_stats)
                sink.updated_at = time.monotonic()
            if iteration_stats is not None:
                sink.preemptions += iteration_stats.num_preempted_reqs

        def record_admission_rejection(self, reason: str) -> None:
            pass

        def record_sleep_state(self, sleep: int = 0, level: int = 0) -> None:
            pass

        def log_engine_initialized(self) -> None:
            pass

        def log(self) -> None:
            pass

    return _StatsLogger


# ---------------------------------------------------------------- the engine


class Engine:
    """One vLLM AsyncLLM and what the server needs from it."""

    def __init__(self, settings: ResolvedSettings) -> None:
        self.settings = settings
        # Engine timestamps on every step, for the request spans (costs nothing when off).
        self.timings = settings.tracing.otlp_traces_endpoint is not None
        self.stats = EngineStats()
        self.info: ModelInfo | None = None
        self._llm: Any = None
        self._tokenizer: Any = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        lora = settings.lora
        self.adapters = AdapterRegistry(
            parent=settings.served_model_name,
            capacity=(lora.max_cpu_loras or 0) if lora.enable_lora else 0,
        )
        self._static_adapters_loaded = False
        self._removals: set[asyncio.Task[None]] = set()

    # -- lifecycle

    def start(self) -> ModelInfo:
        """Load the model and start the engine process (blocking; ~25 s on the demo model)."""
        try:
            return self._start()
        except BaseException as e:
            self._start_error = e
            raise

    def _start(self) -> ModelInfo:
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        from engine.demo_model import ensure_demo_model

        settings = self.settings
        check_setup(settings)
        name = settings.model
        path = str(ensure_demo_model()) if settings.is_demo else name
        args = engine_args(settings, path)
        log.info("starting vLLM engine for %s (%s)", name, "GPU" if settings.gpu else "CPU")
        # Read by the engine-core process it starts (it inherits the environment).
        os.environ.setdefault("VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS", str(WORKER_EXIT_WAIT_S))
        started = time.monotonic()
        self._llm = AsyncLLM.from_engine_args(
            args,
            usage_context=UsageContext.OPENAI_API_SERVER,
            stat_loggers=[_stats_logger_factory(self.stats)],
        )
        self._tokenizer = self._llm.get_tokenizer()
        speculative = self._llm.vllm_config.speculative_config
        if speculative is not None:
            # Exported from the start, zeros included: one series per proposed position.
            positions = [0] * speculative.num_speculative_tokens
            self.stats.spec_decode = SpecDecodeStats(accepted_per_position=positions)
        model_config = self._llm.vllm_config.model_config
        cache_config = self._llm.vllm_config.cache_config
        hf = model_config.hf_config
        self.info = ModelInfo(
            name=name,
            path=path,
            served_name=settings.served_model_name,
            is_demo=settings.is_demo,
            max_model_len=model_config.max_model_len,
            hidden_size=int(getattr(hf, "hidden_size", 0)),
            vocab_size=int(getattr(hf, "vocab_size", 0)),
            block_size=int(cache_config.block_size),
            kv_cache_blocks=int(cache_config.num_gpu_blocks or 0),
        )
        self._started.set()
        log.info("engine ready in %.1f s", time.monotonic() - started)
        return self.info

    def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None

    @property
    def ready(self) -> bool:
        return self._started.is_set() and self._llm is not None

    @property
    def dead(self) -> bool:
        """True once the engine failed to start or its process died."""
        if self._start_error is not None:
            return True
        return self._llm is not None and self._llm.errored

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    async def check_health(self) -> None:
        """Raise EngineDeadError if the engine process is gone."""
        if self.dead:
            raise EngineDeadError("the engine process has died")
        if self._llm is not None:
            try:
                await self._llm.check_health()
            except Exception as e:
                raise EngineDeadError(str(e)) from e

    # -- requests

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        options: SamplingOptions,
        *,
        adapter: str | None = None,
    ) -> AsyncIterator[StepOutput]:
        """Stream the request's new output step by step; cancelling aborts it in the engine.

        adapter: a loaded LoRA adapter's name (AdapterNotFoundError if it is not), or the
        base model."""
        if not self.ready:
            raise EngineNotReadyError("the engine is still loading")
        params = self._sampling_params(options)
        if adapter is None:
            async for step in self._generate(request_id, prompt_token_ids, params, options, None):
                yield step
            return
        held = self.adapters.acquire(adapter)
        try:
            lora = _lora_request(held)
            async for step in self._generate(request_id, prompt_token_ids, params, options, lora):
                yield step
        finally:
            if self.adapters.release(held):
                self._remove_later(held)

    async def _generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: Any,
        options: SamplingOptions,
        lora: Any,
    ) -> AsyncIterator[StepOutput]:
        from vllm.exceptions import VLLMClientError
        from vllm.inputs.engine import tokens_input
        from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDeadError

        try:
            async for out in self._llm.generate(
                tokens_input(prompt_token_ids),
                params,
                request_id,
                lora_request=lora,
                priority=options.priority,
            ):
                yield StepOutput(
                    sequences=[
                        SequenceDelta(
                            index=c.index,
                            text=c.text,
                            token_ids=c.token_ids,
                            finish_reason=c.finish_reason,
                            stop_reason=c.stop_reason,
                            logprobs=self._logprobs(c.token_ids, c.logprobs, options.logprobs)
                            if options.logprobs is not None
                            else None,
                        )
                        for c in out.outputs
                    ],
                    finished=out.finished,
                    prompt_logprobs=self._prompt_logprobs(
                        prompt_token_ids, out.prompt_logprobs, options.prompt_logprobs
                    )
                    if options.prompt_logprobs is not None and out.prompt_logprobs is not None
                    else None,
                    num_cached_tokens=out.num_cached_tokens or 0,
                    preemptions=_preemptions(out),
                    **({} if options.stream else _timing(out)),
                    timings=_engine_timings(out) if self.timings else None,
                )
        except VllmEngineDeadError as e:
            raise EngineDeadError("the engine process has died") from e
        except (VLLMClientError, ValueError) as e:
            raise EngineRequestError(str(e)) from e

    async def abort(self, request_id: str) -> None:
        if self._llm is not None:
            await self._llm.abort(request_id)

    # -- LoRA adapters

    async def load_static_adapters(self) -> None:
        """Load --lora-modules (once; any failure fails the start, as in vLLM)."""
        from engine.demo_lora import ensure_demo_lora

        if self._static_adapters_loaded:
            return
        for module in self.settings.lora.lora_modules:
            path = module.path
            if path == DEMO_LORA:  # built (~10 s) on first use, then cached
                path = str(await asyncio.to_thread(ensure_demo_lora))
            try:
                await self.load_adapter(module.name, path, dynamic=False)
            except AdapterError as e:
                raise AdapterError(f"--lora-modules {module.name}={module.path}: {e}") from None
        self._static_adapters_loaded = True

    async def load_adapter(
        self, name: str, path: str, *, dynamic: bool = True, replace: bool = False
    ) -> Adapter:
        """Load the PEFT adapter in directory `path` as `name` (AdapterError if it cannot be:
        a bad name or path, not a LoRA for this model, rank above --max-lora-rank, full)."""
        if not self.ready:
            raise EngineNotReadyError("the engine is still loading")
        adapter = self.adapters.begin_load(name, path, dynamic=dynamic, replace=replace)
        try:
            await self._llm.add_lora(_lora_request(adapter, replace=replace))
        except Exception as e:
            self.adapters.abort_load(adapter)
            if self.dead:
                raise EngineDeadError("the engine process has died") from e
            raise AdapterError(
                f"cannot load adapter {name!r} from {path}: {_worker_error(e)}",
                code="adapter_load_failed",
            ) from None
        self.adapters.finish_load(adapter)
        log.info("loaded LoRA adapter %r (id %d) from %s", name, adapter.id, path)
        return adapter

    async def unload_adapter(self, name: str) -> Adapter:
        """Stop serving `name` (AdapterNotFoundError if not loaded); the engine frees it
        now, or when its last running request ends."""
        adapter, idle = self.adapters.retire(name)
        if idle:
            await self._remove(adapter)
        return adapter

    def _remove_later(self, adapter: Adapter) -> None:
        # Called as a request's stream closes, which must not wait on the engine.
        task = asyncio.get_running_loop().create_task(self._remove(adapter))
        self._removals.add(task)
        task.add_done_callback(self._removals.discard)

    async def _remove(self, adapter: Adapter) -> None:
        try:
            if self._llm is not None:
                await self._llm.remove_lora(adapter.id)
            log.info("removed LoRA adapter %r (id %d)", adapter.name, adapter.id)
        except Exception:
            log.exception("removing LoRA adapter %r from the engine failed", adapter.name)
        finally:
            self.adapters.removed(adapter)

    def check_constraint(self, constraint: OutputConstraint) -> None:
        """Raise EngineRequestError, saying what is wrong, if the engine cannot follow
        `constraint`: vLLM's own check (the one its input processor runs), made before
        the request is admitted."""
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import SamplingParams

        if not self.ready:
            raise EngineNotReadyError("the engine is still loading")
        llm = self._llm
        try:
            params = SamplingParams(max_tokens=1, structured_outputs=_structured(constraint))
            params.verify(
                llm.model_config,
                llm.vllm_config.speculative_config,
                llm.vllm_config.structured_outputs_config,
                self._tokenizer,
            )
        except (VLLMClientError, ValueError, TypeError) as e:
            raise EngineRequestError(_with_cause(e)) from e

    def _sampling_params(self, o: SamplingOptions) -> Any:
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        try:
            return SamplingParams(
                n=o.n,
                max_tokens=o.max_tokens,
                temperature=o.temperature,
                top_p=o.top_p,
                top_k=o.top_k,
                min_p=o.min_p,
                presence_penalty=o.presence_penalty,
                frequency_penalty=o.frequency_penalty,
                repetition_penalty=o.repetition_penalty,
                seed=o.seed,
                stop=o.stop or None,
                stop_token_ids=o.stop_token_ids or None,
                include_stop_str_in_output=o.include_stop_str_in_output,
                ignore_eos=o.ignore_eos,
                min_tokens=o.min_tokens,
                logprobs=o.logprobs,
                prompt_logprobs=o.prompt_logprobs,
                skip_special_tokens=o.skip_special_tokens,
                structured_outputs=_structured(o.constraint) if o.constraint else None,
                # Each step yields only what is new (streaming stays O(tokens));
                # a non-streamed request gets its one final output.
                output_kind=RequestOutputKind.DELTA if o.stream else RequestOutputKind.FINAL_ONLY,
            )
        except (VLLMClientError, ValueError) as e:
            raise EngineRequestError(str(e)) from e

    def _token_text(self, token_id: int, decoded: str | None) -> str:
        if decoded is not None:
            return decoded
        return self._tokenizer.convert_ids_to_tokens(token_id) or ""

    def _logprobs(self, token_ids: Sequence[int], positions: Any, k: int) -> list[TokenLogprob]:
        if positions is None:
            return []
        return [
            self._one_logprob(tid, pos, k) for tid, pos in zip(token_ids, positions, strict=False)
        ]

    def _prompt_logprobs(
        self, prompt_token_ids: list[int], positions: Any, k: int
    ) -> list[TokenLogprob | None]:
        return [
            None if pos is None else self._one_logprob(tid, pos, k)
            for tid, pos in zip(prompt_token_ids, positions, strict=False)
        ]

    def _one_logprob(self, token_id: int, position: Any, k: int) -> TokenLogprob:
        chosen = position.get(token_id)
        # The engine adds the chosen token to the top-k when it ranks lower.
        ranked = sorted(position.items(), key=lambda kv: kv[1].rank or 0)[:k]
        top = [(tid, self._token_text(tid, lp.decoded_token), lp.logprob) for tid, lp in ranked]
        return TokenLogprob(
            token_id=token_id,
            token=self._token_text(token_id, chosen.decoded_token if chosen else None),
            logprob=chosen.logprob if chosen else float("-inf"),
            top=top,
        )


def _lora_request(adapter: Adapter, replace: bool = False) -> Any:
    from vllm.lora.request import LoRARequest

    return LoRARequest(
        lora_name=adapter.name,
        lora_int_id=adapter.id,
        lora_path=adapter.path,
        base_model_name=adapter.parent,
        load_inplace=replace,
    )


# vLLM wraps a worker's exception: "Call to add_lora method failed: Worker failed with
# error '<the cause>', please check the stack trace above for the root cause".
_WORKER_ERROR = re.compile(r"failed with error '(.*)', please check", re.DOTALL)


def _worker_error(exc: BaseException) -> str:
    text = str(exc)
    m = _WORKER_ERROR.search(text)
    return m.group(1) if m else text or type(exc).__name__


def _structured(constraint: OutputConstraint) -> Any:
    from vllm.sampling_params import StructuredOutputsParams

    return StructuredOutputsParams(**{constraint.kind: constraint.value})


# xgrammar prefixes its errors with a time and its C++ source location:
# "[09:46:02] /project/cpp/regex_converter.cc:83: Regex parsing error at ...".
_NATIVE_PREFIX = re.compile(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ")


def _with_cause(error: BaseException) -> str:
    """vLLM's message, with the grammar library's own reason where vLLM hides it
    ("Invalid grammar specification." says nothing of which rule is wrong), and
    without the library's time stamps and source paths."""
    message = str(error)
    cause = error.__cause__
    if cause is not None and str(cause) and str(cause) not in message:
        message = f"{message.rstrip('.')}: {cause}"
    return " ".join(_NATIVE_PREFIX.sub("", message).split())


def _timing(out: Any) -> dict[str, float]:
    m = getattr(out, "metrics", None)
    if not out.finished or m is None or not m.first_token_ts:
        return {}
    return {
        "first_token_latency": m.first_token_latency,
        "decode_time": max(0.0, m.last_token_ts - m.first_token_ts),
    }


def _preemptions(out: Any) -> int:
    # The request's running count (vLLM's RequestStateStats, kept while stats are logged).
    m = getattr(out, "metrics", None)
    return int(getattr(m, "num_preemptions", 0) or 0)


def _engine_timings(out: Any) -> EngineTimings | None:
    m = getattr(out, "metrics", None)  # vLLM's RequestStateStats (kept when stats are on)
    if m is None:
        return None
    # The arrival is wall-clock time; the rest the engine core's monotonic clock.
    arrival = m.arrival_time - (time.time() - time.monotonic()) if m.arrival_time else 0.0
    return EngineTimings(
        arrival=arrival,
        queued=m.queued_ts,
        scheduled=m.scheduled_ts,
        first_token=m.first_token_ts,
        last_token=m.last_token_ts,
        preemptions=m.num_preemptions,
    )


def configure_vllm_logging(level: str) -> None:
    """vLLM logs at INFO by default; keep it quieter unless debugging."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "DEBUG" if level == "debug" else "WARNING")
