"""Editor sessions on a clock: each session sleeps until its next keystroke or debounce
expiry, sends what it fires as its own task, and cancels it on the next keystroke.

The clock and the sleep are injected (the real ones by default), so the same
driver runs on synthetic time in the tests. Cancelling the request's task
closes its connection: the server sees the client go, as with an editor.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from benchmarks.harness.editor.session import Cancel, EditorSession, FimRequest
from benchmarks.harness.records import RequestRecord, now

NewRecord = Callable[[FimRequest], RequestRecord]
SendFn = Callable[[FimRequest, RequestRecord], Awaitable[Any]]


@dataclass
class Budget:
    """A cap on requests over all sessions (the profile's num_requests), or none."""

    limit: int | None
    sent: int = 0

    @property
    def exhausted(self) -> bool:
        return self.limit is not None and self.sent >= self.limit

    def take(self) -> bool:
        """Count one request; False once the cap is reached."""
        self.sent += 1
        return not self.exhausted


@dataclass
class EditorDriver:
    sessions: Sequence[EditorSession]
    new_record: NewRecord
    send: SendFn
    start: float  # clock time of the sessions' time 0
    budget: Budget = field(default_factory=lambda: Budget(None))
    clock: Callable[[], float] = now
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep
    _cancelled: list[asyncio.Task[None]] = field(default_factory=list)

    async def run(self) -> None:
        """Every session until it stops typing, then until its last request ends."""
        try:
            await asyncio.gather(*(self._session(s) for s in self.sessions))
        finally:
            # Cancelled requests are closing their connections: let them finish doing so.
            await asyncio.gather(*self._cancelled, return_exceptions=True)

    async def _session(self, s: EditorSession) -> None:
        flying: dict[int, tuple[asyncio.Task[None], RequestRecord]] = {}
        try:
            while (t := s.next_wakeup()) is not None:
                delay = self.start + t - self.clock()
                if delay > 0:
                    await self.sleep(delay)
                sent = False
                for action in s.advance(t):
                    if isinstance(action, Cancel):
                        self._cancel(flying.pop(action.seq, None))
                    else:
                        sent |= self._start(s, action.request, flying)
                if sent:
                    # Let the request go out before the next event is handled: a late
                    # client may find the next keystroke already due.
                    await asyncio.sleep(0)
            await asyncio.gather(*(task for task, _ in list(flying.values())))
        finally:
            for task, _ in list(flying.values()):
                task.cancel()

    def _start(
        self,
        s: EditorSession,
        req: FimRequest,
        flying: dict[int, tuple[asyncio.Task[None], RequestRecord]],
    ) -> bool:
        if self.budget.exhausted:  # a timer that expired after the budget ran out
            s.finished(req.seq)
            return False
        rec = self.new_record(req)
        task = asyncio.create_task(self._send(s, req, rec))
        flying[req.seq] = (task, rec)
        task.add_done_callback(_forget(flying, req.seq))
        if not self.budget.take():
            for other in self.sessions:
                other.stop_typing()
        return True

    def _cancel(self, entry: tuple[asyncio.Task[None], RequestRecord] | None) -> None:
        if entry is None:
            return
        task, rec = entry
        if not task.done():
            rec.cancelled = True  # before cancel(): the client books it as cancelled, not failed
            task.cancel()
            self._cancelled.append(task)

    async def _send(self, s: EditorSession, req: FimRequest, rec: RequestRecord) -> None:
        try:
            await self.send(req, rec)
        except asyncio.CancelledError:
            if not rec.cancelled:
                raise  # the run itself is being stopped
        finally:
            if rec.cancelled and rec.finished is None:  # cancelled before it was even sent
                rec.finished = rec.sent if rec.sent is not None else rec.scheduled
            if not rec.cancelled:
                s.finished(req.seq)


def _forget(
    flying: dict[int, tuple[asyncio.Task[None], RequestRecord]], seq: int
) -> Callable[[asyncio.Task[None]], None]:
    """A done-callback: the request is no longer in flight."""

    def done(_task: asyncio.Task[None]) -> None:
        flying.pop(seq, None)

    return done
