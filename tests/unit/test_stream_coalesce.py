"""SSE frame coalescing (pure async-iterator logic; no server)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from engine.api.streaming import coalesce


async def frames(*gaps_s: float) -> AsyncIterator[bytes]:
    """One frame per gap: frame i comes gaps_s[i] seconds after frame i-1."""
    for i, gap in enumerate(gaps_s):
        await asyncio.sleep(gap)
        yield b"%d;" % i


def collect(it: AsyncIterator[bytes]) -> list[bytes]:
    async def run() -> list[bytes]:
        return [chunk async for chunk in it]

    return asyncio.run(run())


def test_first_frame_goes_at_once_and_the_rest_with_the_end() -> None:
    assert collect(coalesce(frames(0, 0, 0, 0), interval_s=60)) == [b"0;", b"1;2;3;"]


def test_frames_further_apart_than_the_interval_go_alone() -> None:
    out = collect(coalesce(frames(0, 0.05, 0.05), interval_s=0.01))
    assert out == [b"0;", b"1;", b"2;"]


def test_nothing_is_lost_or_reordered() -> None:
    out = collect(coalesce(frames(*[0.0, 0.002] * 20), interval_s=0.01))
    assert b"".join(out) == b"".join(b"%d;" % i for i in range(40))
    assert 1 < len(out) < 40
