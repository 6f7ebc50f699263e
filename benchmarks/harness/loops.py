"""The two load loops, in whatever process runs them (the run's own, or a --workers one).

Open loop: a dispatcher sleeps until each absolute send time (`start + offset`) and
fires the request as its own task, so a slow request never delays the next one and a
late wake-up never shifts the rest. Closed loop: N workers, each sends its next request
the moment its previous one has finished; the concurrency may change at window starts.
Both take a `send` callback: what a request is, and where its record goes, is the
caller's business.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from benchmarks.harness.records import now


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


async def run_open(
    send: Callable[[int], Coroutine[Any, Any, None]], offsets: Sequence[float], start: float
) -> None:
    """send(i) as its own task at clock time start + offsets[i]; return when all are done."""
    tasks: list[asyncio.Task[None]] = []

    def fire(i: int) -> None:
        tasks.append(asyncio.create_task(send(i)))

    try:
        await dispatch(offsets, start, fire)
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class ClosedLoop:
    """Workers that send back-to-back; window k runs spec[k] = (duration, concurrency).

    `send(window)` makes and sends one request of that window. The loop ends at the
    sum of the durations (if all are set) or after `num_requests` sends.
    """

    spec: list[tuple[float | None, int]]
    starts: list[float]  # window starts, s from `begin`
    begin: float  # clock time of the phase start
    num_requests: int | None
    send: Callable[[int], Awaitable[None]]
    _window: int = 0
    _sent: int = 0
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def end(self) -> float | None:
        durations = [d for d, _ in self.spec if d is not None]
        return self.begin + sum(durations) if len(durations) == len(self.spec) else None

    def _over(self) -> bool:
        end = self.end
        if end is not None and now() >= end:
            return True
        return self.num_requests is not None and self._sent >= self.num_requests

    async def _worker(self, k: int) -> None:
        while not self._over():
            if k >= self.spec[self._window][1]:
                # Idle in this window (concurrency went down): wait for a change.
                self._changed.clear()
                await self._changed.wait()
                continue
            self._sent += 1
            await self.send(self._window)

    async def _controller(self) -> None:
        for k in range(1, len(self.spec)):
            await asyncio.sleep(max(0.0, self.begin + self.starts[k] - now()))
            self._window = k
            self._changed.set()
        end = self.end
        if end is not None:
            await asyncio.sleep(max(0.0, end - now()))
            self._changed.set()

    async def run(self) -> None:
        ctl = asyncio.create_task(self._controller())
        workers = [
            asyncio.create_task(self._worker(k)) for k in range(max(c for _, c in self.spec))
        ]
        try:
            await asyncio.gather(*workers)
        finally:
            for t in (*workers, ctl):
                t.cancel()
            await asyncio.gather(*workers, ctl, return_exceptions=True)
