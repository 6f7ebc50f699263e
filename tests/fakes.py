"""Fakes for HTTP-layer tests only (anything involving the engine uses the real one)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from engine.llm import (
    EngineDeadError,
    EngineStats,
    ModelInfo,
    OutputConstraint,
    SamplingOptions,
    SequenceDelta,
    StepOutput,
)


class FakeEngine:
    """Stands in for `engine.llm.Engine`: no model; each step yields one token
    "t<i> " after `step_delay` seconds. Records aborts; can be made to die."""

    def __init__(self, tokenizer: Any, *, step_delay: float = 0.0, load_delay: float = 0.0) -> None:
        self._tokenizer = tokenizer
        self.step_delay = step_delay
        self.load_delay = load_delay
        self.stats = EngineStats()
        self.info: ModelInfo | None = None
        self.aborted: set[str] = set()
        self.running: set[str] = set()
        self.requests: list[tuple[str, list[int], SamplingOptions]] = []
        self._dead = False
        self._loaded = threading.Event()

    # -- lifecycle

    def start(self) -> ModelInfo:
        time.sleep(self.load_delay)
        self.info = ModelInfo(
            name="demo", path="/fake", served_name="fake-model", is_demo=True,
            max_model_len=256, hidden_size=128, vocab_size=2000,
        )  # fmt: skip
        self._loaded.set()
        return self.info

    def shutdown(self) -> None:
        pass

    @property
    def ready(self) -> bool:
        return self._loaded.is_set()

    @property
    def dead(self) -> bool:
        return self._dead

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    def die(self) -> None:
        self._dead = True

    async def check_health(self) -> None:
        if self._dead:
            raise EngineDeadError("fake engine died")

    # -- requests

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        options: SamplingOptions,
        *,
        adapter: str | None = None,  # no LoRA here: the HTTP-layer tests never enable it
    ) -> AsyncIterator[StepOutput]:
        self.requests.append((request_id, prompt_token_ids, options))
        self.running.add(request_id)
        try:
            for i in range(options.max_tokens):
                await asyncio.sleep(self.step_delay)
                if self._dead:
                    raise EngineDeadError("fake engine died")
                if request_id in self.aborted:
                    yield StepOutput([_seq(k, "", [], "abort") for k in range(options.n)], True)
                    return
                last = i == options.max_tokens - 1
                reason = "length" if last else None
                yield StepOutput(
                    [_seq(k, f"t{i} ", [100 + i], reason) for k in range(options.n)], last
                )
        finally:
            self.running.discard(request_id)

    async def abort(self, request_id: str) -> None:
        self.aborted.add(request_id)

    def check_constraint(self, constraint: OutputConstraint) -> None:
        """A fake has no grammar engine: it takes any constraint (and ignores it)."""


def _seq(index: int, text: str, ids: list[int], reason: str | None) -> SequenceDelta:
    return SequenceDelta(index, text, ids, reason, None, None)


@contextmanager
def serve_in_thread(app: Any, port: int) -> Iterator[uvicorn.Server]:
    """Run `app` with uvicorn on a free port in a background thread (lifespan included)."""
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", loop="asyncio")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("fake server did not start")
        time.sleep(0.01)
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(10)
