"""Standalone mode: uvicorn in front of the app, with a graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from types import FrameType

import uvicorn

from engine.api.app import create_app
from engine.api.state import ServerState
from engine.config import ResolvedSettings

log = logging.getLogger("engine.server")


class DrainingServer(uvicorn.Server):
    """On the first SIGTERM/SIGINT: refuse new work (503, /ready 503), let
    in-flight requests finish within the drain timeout, then exit 0.
    A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self._drain_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Unlike uvicorn's, this does not re-raise the signal after shutdown:
        # a drained server exits with status 0.
        if self.state.draining or self._loop is None:
            self.force_exit = self.should_exit
            self.should_exit = True
            return
        self.state.draining = True
        log.info(
            "%s received: draining (%d in flight)", signal.Signals(sig).name, self.state.in_flight
        )
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        timeout = self.state.settings.server.drain_timeout_s
        try:
            await asyncio.wait_for(self.state.idle.wait(), timeout)
            log.info("drained; exiting")
        except TimeoutError:
            log.warning(
                "drain timeout (%.0f s) with %d requests in flight", timeout, self.state.in_flight
            )
        self.should_exit = True

    def request_exit(self) -> None:
        """The engine died: stop now (in-flight requests already got their errors)."""
        self.should_exit = True


def serve(settings: ResolvedSettings) -> int:
    """Run the server until it is stopped; the process exit status."""
    holder: dict[str, DrainingServer] = {}
    app = create_app(settings, on_fatal=lambda: holder["server"].request_exit())
    state: ServerState = app.state.server
    s = settings.server
    config = uvicorn.Config(
        app,
        host=s.host,
        port=s.port,
        log_level=s.log_level,
        access_log=False,  # ours is one JSON line per request (--access-log)
        loop="uvloop",
        http="httptools",
        timeout_keep_alive=30,
        timeout_graceful_shutdown=5,
    )
    server = holder["server"] = DrainingServer(config, state)
    server.run()
    if state.fatal:
        log.error("exiting: %s", state.fatal)
        return 1
    return 0
