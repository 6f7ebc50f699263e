"""What completions and chat share: checks, sampling options, running prompts
through the engine (one or many, streamed or collected), cancellation, timing."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from starlette.requests import Request

from engine.api.admission import Ticket
from engine.api.auth import ANONYMOUS
from engine.api.errors import APIError, bad_request, draining, engine_dead, model_loading
from engine.api.schemas import SamplingFields
from engine.api.state import ServerState
from engine.llm import (
    EngineDeadError,
    EngineNotReadyError,
    EngineRequestError,
    SamplingOptions,
    StepOutput,
)

T = TypeVar("T")


def new_id() -> str:
    return uuid.uuid4().hex


class ClientDisconnected(Exception):
    """The client went away before its answer was ready."""


# ---------------------------------------------------------------- checks


def check_serving(state: ServerState) -> None:
    if state.engine.dead:
        raise engine_dead()
    if state.draining:
        raise draining(state.settings.admission.retry_after_s)
    if not state.accepting:
        raise model_loading()


def check_model(state: ServerState, requested: str | None) -> None:
    served = state.model.served_name
    if requested is not None and requested != served:
        raise APIError(
            404, f"The model '{requested}' does not exist. This server serves '{served}'.",
            param="model", code="model_not_found",
        )  # fmt: skip


def check_context(state: ServerState, prompt_tokens: int, max_tokens: int, param: str) -> None:
    limit = state.model.max_model_len
    if prompt_tokens + max_tokens > limit:
        raise bad_request(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} "
            "for the completion). Please reduce the prompt or max_tokens.",
            param=param, code="context_length_exceeded",
        )  # fmt: skip


def check_counts(
    state: ServerState, req: SamplingFields, prompts: int, logprobs: int | None
) -> None:
    s = state.settings.server
    if req.n > s.max_n:
        raise bad_request(f"n must be at most {s.max_n}, got {req.n}", param="n")
    if prompts > s.max_prompts_per_request:
        raise bad_request(
            f"at most {s.max_prompts_per_request} prompts per request, got {prompts}",
            param="prompt",
        )
    limit = state.settings.engine.max_logprobs
    if logprobs is not None and logprobs > limit:
        raise bad_request(f"logprobs must be at most {limit}, got {logprobs}", param="logprobs")


def default_max_tokens(state: ServerState, prompt_tokens: int, requested: int | None) -> int:
    if requested is not None:
        return requested
    return max(1, state.model.max_model_len - prompt_tokens)


def sampling_options(
    req: SamplingFields,
    max_tokens: int,
    *,
    stop_token_ids: list[int] | None = None,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
) -> SamplingOptions:
    return SamplingOptions(
        max_tokens=max_tokens,
        n=req.n,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        min_p=req.min_p,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty,
        seed=req.seed,
        stop=req.stop,  # type: ignore[arg-type]  # normalised to a list by the schema
        stop_token_ids=[*(req.stop_token_ids or []), *(stop_token_ids or [])],
        include_stop_str_in_output=req.include_stop_str_in_output,
        ignore_eos=req.ignore_eos,
        min_tokens=req.min_tokens,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        skip_special_tokens=req.skip_special_tokens,
        stream=req.stream,
    )


def finish_reason(reason: str | None) -> str | None:
    # vLLM says "stop" for EOS, stop strings and stop tokens, "length" at
    # max_tokens; "abort" never reaches a client as a finish reason.
    return reason if reason in (None, "stop", "length") else "stop"


def admit(
    state: ServerState,
    request: Request,
    endpoint: str,
    request_id: str,
    prompts: list[list[int]],
    options: SamplingOptions,
) -> Run:
    """Reserve the request's place in the queue (or raise 429) and start its run."""
    key = getattr(request.state, "api_key", ANONYMOUS)
    ticket = state.admission.reserve(key, len(prompts) * options.n, sum(map(len, prompts)))
    run = Run(state, endpoint, request_id, prompts, options, ticket)
    request.state.run = run
    return run


# ---------------------------------------------------------------- one request's run


@dataclass(slots=True)
class Run:
    """One HTTP request's generation: its engine requests, timing and token counts."""

    state: ServerState
    endpoint: str
    request_id: str
    prompts: list[list[int]]
    options: SamplingOptions
    ticket: Ticket
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_token_at: float = 0.0
    completion_tokens: int = 0
    tokens_per_choice: list[int] = field(default_factory=list)
    finished: bool = False
    timed_out: bool = False
    _timeout_task: asyncio.Task[None] | None = None
    _stream: AsyncIterator[tuple[int, StepOutput]] | None = None
    _recorded: bool = False

    def __post_init__(self) -> None:
        self.tokens_per_choice = [0] * (len(self.prompts) * self.options.n)
        self.state.request_started()

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
        }
        if self.first_token_at is not None:
            fields["ttft_ms"] = round((self.first_token_at - self.arrival) * 1000, 2)
        tpot = self.tpot()
        if tpot is not None:
            fields["tpot_ms"] = round(tpot * 1000, 3)
        if self.timed_out:
            fields["timed_out"] = True
        return fields

    def engine_request_id(self, prompt_index: int) -> str:
        return self.request_id if len(self.prompts) == 1 else f"{self.request_id}-{prompt_index}"

    def steps(self) -> AsyncIterator[tuple[int, StepOutput]]:
        """(prompt index, step) until every prompt's sequences finish."""
        self._stream = self._steps()
        return self._stream

    async def close(self, status: int) -> None:
        """End the run: abort what is unfinished in the engine, then record it."""
        if self._stream is not None:
            with contextlib.suppress(Exception):
                await self._stream.aclose()  # type: ignore[attr-defined]
        self.record(status)

    async def _steps(self) -> AsyncIterator[tuple[int, StepOutput]]:
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
                async for step in engine.generate(self.request_id, self.prompts[0], self.options):
                    self._count(0, n, step)
                    yield 0, step
            else:
                streams = [
                    engine.generate(self.engine_request_id(i), p, self.options)
                    for i, p in enumerate(self.prompts)
                ]
                async for i, step in _merge(streams):
                    self._count(i, n, step)
                    yield i, step
            if self.timed_out:
                self.state.metrics.aborted.labels(reason="timeout").inc()
                raise APIError(
                    504, f"The request did not finish within {timeout:g} s and was aborted.",
                    code="request_timeout",
                )  # fmt: skip
            self.finished = True
        except EngineDeadError:
            raise engine_dead() from None
        except EngineNotReadyError:
            raise model_loading() from None
        except EngineRequestError as e:
            raise bad_request(str(e)) from None
        finally:
            timer.cancel()
            if not self.finished:
                await self._abort()

    def _on_timeout(self) -> None:
        self.timed_out = True
        # Aborting ends the engine streams with a final "abort" step.
        self._timeout_task = asyncio.get_running_loop().create_task(self._abort())

    def _count(self, prompt_index: int, n: int, step: StepOutput) -> None:
        now = time.monotonic()
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
        self.ticket.release(self.completion_tokens)
        self.state.request_finished()
        m = self.state.metrics
        now = time.monotonic()
        m.requests.labels(endpoint=self.endpoint, status=str(status)).inc()
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


async def _merge(streams: list[AsyncIterator[StepOutput]]) -> AsyncIterator[tuple[int, StepOutput]]:
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


# ---------------------------------------------------------------- disconnects


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and so aborting its engine requests) if the client leaves."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise ClientDisconnected()


async def first_and_rest(it: AsyncIterator[T]) -> tuple[T | None, AsyncIterator[T]]:
    """Pull the first item now (so errors become HTTP statuses), keep the rest lazy."""
    try:
        first = await anext(it)
    except StopAsyncIteration:
        return None, it
    return first, it


ErrorHandler = Callable[[APIError], bytes]
