"""Liveness and readiness: one answer for the app's probes and a Ray replica's own port."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from engine.api.state import ServerState

ENGINE_HEALTH_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class Probe:
    status: int  # HTTP status: 200 or 503
    body: dict[str, Any]


async def liveness(state: ServerState) -> Probe:
    """The process is up and its engine has not died (loading counts as alive)."""
    if state.engine.dead:
        return Probe(503, {"status": "engine_dead", "detail": state.fatal})
    if state.engine.ready:
        try:
            await asyncio.wait_for(state.engine.check_health(), ENGINE_HEALTH_TIMEOUT_S)
        except Exception as e:
            return Probe(503, {"status": "engine_dead", "detail": str(e)})
    return Probe(200, {"status": "ok" if state.engine.ready else "loading"})


def readiness(state: ServerState) -> Probe:
    """The engine is loaded and this server takes new requests."""
    if state.accepting:
        return Probe(200, {"status": "ready", "model": state.model.served_name})
    reason = (
        "engine_dead" if state.engine.dead
        else "draining" if state.draining
        else "loading"
    )  # fmt: skip
    return Probe(503, {"status": reason})
