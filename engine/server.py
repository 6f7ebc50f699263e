"""Standalone mode: uvicorn in front of the app, with a graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import resource
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


# File descriptors kept beyond client connections: the engine's sockets and pipes, model
# files, logs.
FD_RESERVE = 1024


def raise_fd_limit(connections: int | None) -> int:
    """Raise the soft limit on open files towards the hard one, so that `connections`
    (uvicorn's --limit-concurrency) can be accepted; the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    unlimited = resource.RLIM_INFINITY
    wanted = hard if connections is None else connections + FD_RESERVE
    target = wanted if hard == unlimited else min(wanted, hard)
    if soft != unlimited and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if connections is not None and soft != unlimited and soft < connections + FD_RESERVE:
        log.warning(
            "open-file limit %d (hard limit %s) is below --limit-concurrency %d + %d: "
            "connections past it fail to be accepted", soft, hard, connections, FD_RESERVE,
        )  # fmt: skip
    return soft


def uvicorn_config(app: object, settings: ResolvedSettings) -> uvicorn.Config:
    s, c = settings.server, settings.connections
    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=s.host,
        port=s.port,
        log_level=s.log_level,
        access_log=False,  # ours is one JSON line per request (--access-log)
        loop="uvloop",
        http="httptools",
        limit_concurrency=c.limit_concurrency,
        timeout_keep_alive=int(max(1, round(c.timeout_keep_alive_s))),
        backlog=c.backlog,
        timeout_graceful_shutdown=5,
    )


def listening_socket(config: uvicorn.Config, send_buffer_bytes: int | None) -> list[socket.socket]:
    """The listening socket, with SO_SNDBUF set when asked (accepted connections inherit
    it); none: uvicorn binds its own."""
    if send_buffer_bytes is None:
        return []
    sock = config.bind_socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer_bytes)
    return [sock]


def serve(settings: ResolvedSettings) -> int:
    """Run the server until it is stopped; the process exit status."""
    holder: dict[str, DrainingServer] = {}
    app = create_app(settings, on_fatal=lambda: holder["server"].request_exit())
    state: ServerState = app.state.server
    raise_fd_limit(settings.connections.limit_concurrency)
    config = uvicorn_config(app, settings)
    sockets = listening_socket(config, settings.connections.socket_send_buffer_bytes)
    server = holder["server"] = DrainingServer(config, state)
    server.run(sockets=sockets or None)
    if state.fatal:
        log.error("exiting: %s", state.fatal)
        return 1
    return 0
