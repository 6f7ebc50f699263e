"""One request's generation: its engine requests, timeout, aborts, token counts and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from engine.api.admission import Ticket
from engine.api.errors import MAPPED_ERRORS, APIError, api_error
from engine.api.state import ServerState
from engine.api.streaming import CLIENT_CLOSED
from engine.llm import EngineTimings, SamplingOptions, StepOutput

Steps = AsyncIterator[tuple[int, StepOutput]]  # (prompt index, engine step)
_StepStream = AsyncGenerator[tuple[int, StepOutput], None]


@dataclass(slots=True)
class Run:
    """One HTTP request's generation: its engine requests, timing and token counts."""

    state: ServerState
    endpoint: str
    request_id: str
    prompts: list[list[int]]
    options: SamplingOptions
    ticket: Ticket
    adapter: str | None = None  # the LoRA adapter it generates with (None: the base model)
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_token_at: float = 0.0
    completion_tokens: int = 0
    tokens_per_choice: list[int] = field(default_factory=list)
    finished: bool = False
    timed_out: bool = False
    _timeout_task: asyncio.Task[None] | None = None
    _stream: _StepStream | None = None
    _recorded: bool = False
    abort_reason: str | None = None  # why the engine stopped it early, once recorded
    priority_clamped: bool = False  # it asked for more than its key's class
    preemptions: list[int] = field(default_factory=list)  # per prompt, as the engine counts
    status: int | None = None  # the outcome recorded in the metrics (499: the client left)
    # The engine's phases per prompt, when the engine reports them (tracing).
    _timings: dict[int, EngineTimings] | None = None

    def __post_init__(self) -> None:
        self.tokens_per_choice = [0] * (len(self.prompts) * self.options.n)
        self.preemptions = [0] * len(self.prompts)
        self.state.request_started()

    @property
    def priority_class(self) -> str:
        return self.ticket.priority_class

    @property
    def model_name(self) -> str:
        """The `model` its response names: the adapter, or the served base model."""
        return self.adapter or self.state.model.served_name

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def tpot(self) -> float | None:
        """(last token - first token) / (tokens - 1) of the longest choice."""
        longest = max(self.tokens_per_choice, default=0)
        if self.first_token_at is None or longest < 2:
            return None
        return (self.last_token_at - self.first_token_at) / (longest - 1)

    @property
    def timings(self) -> EngineTimings | None:
        """When the engine reached each phase (over all prompts), if it reported it."""
        if not self._timings:
            return None
        merged = None
        for t in self._timings.values():
            merged = t if merged is None else merged.merged(t)
        return merged

    def log_fields(self) -> dict[str, Any]:
        """What the request's JSON log line says about its generation."""
        fields: dict[str, Any] = {
            "completion_id": self.request_id,
            "endpoint": self.endpoint,
            "key": self.ticket.key.name,
            "n": self.options.n,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "max_tokens": self.options.max_tokens,
            "priority_class": self.priority_class,
        }
        if self.priority_clamped:
            fields["priority_clamped"] = True
        if self.first_token_at is not None:
            fields["ttft_ms"] = round((self.first_token_at - self.arrival) * 1000, 2)
        tpot = self.tpot()
        if tpot is not None:
            fields["tpot_ms"] = round(tpot * 1000, 3)
        if self.timed_out:
            fields["timed_out"] = True
        if self.abort_reason is not None:
            fields["aborted"] = self.abort_reason
        if self.adapter is not None:
            fields["adapter"] = self.adapter
        return fields

    def engine_request_id(self, prompt_index: int) -> str:
        return self.request_id if len(self.prompts) == 1 else f"{self.request_id}-{prompt_index}"

    def steps(self) -> Steps:
        """(prompt index, step) until every prompt's sequences finish."""
        self._stream = self._steps()
        return self._stream

    @contextlib.asynccontextmanager
    async def closes_on_error(self) -> AsyncIterator[None]:
        """Close the run with the status its failure answers (499: the client left)."""
        try:
            yield
        except APIError as e:
            await self.close(e.status)
            raise
        except BaseException:
            await self.close(CLIENT_CLOSED)
            raise

    async def close(self, status: int) -> None:
        """End the run: abort what is unfinished in the engine, then record it."""
        if self._stream is not None:
            with contextlib.suppress(Exception):
                await self._stream.aclose()
        self.record(status)

    async def _steps(self) -> _StepStream:
        engine = self.state.engine
        n = self.options.n
        timeout = self.state.settings.server.request_timeout_s
        # A timer, not asyncio.timeout: this generator may be advanced from
        # more than one task (primed by the handler, drained by the response).
        timer = asyncio.get_running_loop().call_later(
            max(0.0, timeout - (time.monotonic() - self.arrival)), self._on_timeout
        )
        try:
            if len(self.prompts) == 1:
                async for step in engine.generate(
                    self.request_id, self.prompts[0], self.options, adapter=self.adapter
                ):
                    self._count(0, n, step)
                    yield 0, step
            else:
                streams = [
                    engine.generate(
                        self.engine_request_id(i), p, self.options, adapter=self.adapter
                    )
                    for i, p in enumerate(self.prompts)
                ]
                async for i, step in merge_streams(streams):
                    self._count(i, n, step)
                    yield i, step
            if self.timed_out:
                raise APIError(
                    504, f"The request did not finish within {timeout:g} s and was aborted.",
                    code="request_timeout",
                )  # fmt: skip
            self.finished = True
        except MAPPED_ERRORS as e:
            raise api_error(e) from None
        finally:
            timer.cancel()
            if not self.finished:
                await self._abort()

    def stalled(self) -> None:
        """The client stopped reading the stream (the write timeout): stopping the run now
        counts as that, not as a disconnect."""
        if not self.finished and not self.timed_out:
            self.abort_reason = "write_timeout"

    def _on_timeout(self) -> None:
        self.timed_out = True
        # Aborting ends the engine streams with a final "abort" step.
        self._timeout_task = asyncio.get_running_loop().create_task(self._abort())

    def _count(self, prompt_index: int, n: int, step: StepOutput) -> None:
        now = time.monotonic()
        self.preemptions[prompt_index] = max(self.preemptions[prompt_index], step.preemptions)
        if step.timings is not None:  # tracing: each prompt's latest figures
            if self._timings is None:
                self._timings = {}
            self._timings[prompt_index] = step.timings
        if step.first_token_latency is not None and self.first_token_at is None:
            # A non-streamed request arrives whole: the engine timed its tokens.
            self.first_token_at = self.arrival + step.first_token_latency
            self.last_token_at = self.first_token_at + (step.decode_time or 0.0)
            self.ticket.first_token()
        for seq in step.sequences:
            k = len(seq.token_ids)
            if k:
                if self.first_token_at is None:
                    self.first_token_at = now
                    self.ticket.first_token()
                if self.options.stream:
                    self.last_token_at = now
                self.completion_tokens += k
                self.tokens_per_choice[prompt_index * n + seq.index] += k

    async def _abort(self) -> None:
        # Cancelling the engine stream aborts too; this is the explicit,
        # immediate path (also for streams that were never iterated).
        engine = self.state.engine
        with contextlib.suppress(Exception):
            for i in range(len(self.prompts)):
                await engine.abort(self.engine_request_id(i))

    def record(self, status: int) -> None:
        """Observe this request in the metrics (once, when its response is done)."""
        if self._recorded:
            return
        self._recorded = True
        self.status = status
        self.ticket.release(self.completion_tokens)
        self.state.request_finished()
        m = self.state.metrics
        now = time.monotonic()
        m.requests.labels(endpoint=self.endpoint, status=str(status)).inc()
        self._record_class(status, now)
        if self.timed_out:
            self.abort_reason = "timeout"
        elif status == CLIENT_CLOSED and not self.finished and self.abort_reason is None:
            self.abort_reason = "client_disconnect"
        if self.abort_reason is not None:
            m.aborted.labels(reason=self.abort_reason).inc()
            m.aborted_tokens.labels(reason=self.abort_reason).inc(self.completion_tokens)
        self._record_adapter(status)
        if status != 200:
            return
        m.e2e.labels(endpoint=self.endpoint).observe(now - self.arrival)
        m.prompt_tokens.inc(self.prompt_tokens)
        m.generation_tokens.inc(self.completion_tokens)
        for p in self.prompts:
            m.prompt_length.observe(len(p))
        for k in self.tokens_per_choice:
            m.generation_length.observe(k)
        if self.first_token_at is not None:
            m.ttft.labels(endpoint=self.endpoint).observe(self.first_token_at - self.arrival)
        tpot = self.tpot()
        if tpot is not None:
            m.tpot.labels(endpoint=self.endpoint).observe(tpot)

    def _record_class(self, status: int, now: float) -> None:
        """The request in its priority class's series."""
        c, cls = self.state.metrics.classes, self.priority_class
        c.requests.labels(cls, str(status)).inc()
        if self.priority_clamped:
            c.clamped.labels(cls).inc()
        if sum(self.preemptions):
            c.preemptions.labels(cls).inc(sum(self.preemptions))
        if status != 200:
            return
        c.e2e.labels(cls).observe(now - self.arrival)
        if self.first_token_at is not None:
            c.ttft.labels(cls).observe(self.first_token_at - self.arrival)
        tpot = self.tpot()
        if tpot is not None:
            c.tpot.labels(cls).observe(tpot)

    def _record_adapter(self, status: int) -> None:
        lora = self.state.lora_metrics
        if lora is None:
            return
        ttft = None if self.first_token_at is None else self.first_token_at - self.arrival
        lora.observe(
            self.adapter, status, self.prompt_tokens, self.completion_tokens, ttft, self.tpot()
        )


async def merge_streams(
    streams: list[AsyncIterator[StepOutput]],
) -> AsyncIterator[tuple[int, StepOutput]]:
    """Interleave several engine streams as their steps arrive."""
    queue: asyncio.Queue[tuple[int, StepOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[StepOutput]) -> None:
        try:
            async for step in stream:
                await queue.put((i, step))
            await queue.put((i, None))
        except BaseException as e:
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
