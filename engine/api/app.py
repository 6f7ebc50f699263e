"""The FastAPI app: routes, middleware, and the engine's lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from fastapi import FastAPI, Request
from starlette.responses import Response

from engine.api.chat import Chat
from engine.api.completions import Completions
from engine.api.disconnect import ClientDisconnected
from engine.api.errors import install_error_handlers, model_loading, model_not_found
from engine.api.gate import GateMiddleware, request_key
from engine.api.health import liveness, readiness
from engine.api.lora import adapter_card, visible_adapter, visible_adapters
from engine.api.lora_admin import lora_admin_routes
from engine.api.middleware import RequestContextMiddleware
from engine.api.orchestrator import serve_generation
from engine.api.schemas import ChatCompletionRequest, CompletionRequest
from engine.api.state import EngineLike, ServerState
from engine.api.streaming import CLIENT_CLOSED
from engine.api.tokenize import tokenizer_routes
from engine.config import ResolvedSettings

log = logging.getLogger("engine.api")

WATCHDOG_INTERVAL_S = 1.0


def _json(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type="application/json")


def _exit_process() -> None:
    # Through SIGTERM so the server shuts down the way an orchestrator would.
    os.kill(os.getpid(), signal.SIGTERM)


def create_app(
    settings: ResolvedSettings,
    engine: EngineLike | None = None,
    on_fatal: Callable[[], None] = _exit_process,
    replica_id: str | None = None,
) -> FastAPI:
    """Build the app. The engine starts (in a thread) when the app starts, unless
    it was started already (Ray replicas load it before they report ready)."""
    if engine is None:
        from engine.llm import Engine

        engine = Engine(settings)
    state = ServerState(settings, engine, replica_id=replica_id)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tasks = [
            asyncio.create_task(_load_engine(state, on_fatal), name="engine-loader"),
            asyncio.create_task(_watch_engine(state, on_fatal), name="engine-watchdog"),
        ]
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.to_thread(state.engine.shutdown)
            gc.unfreeze()  # let interpreter exit free it all, as usual

    app = FastAPI(
        title="codellama-serve",
        summary="OpenAI-compatible API for Code Llama on vLLM",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.server = state
    install_error_handlers(app)
    # Added last = outermost: every response, refusals included, gets its request id.
    app.add_middleware(GateMiddleware, state=state)
    app.add_middleware(RequestContextMiddleware, state=state)
    if settings.tracing.otlp_traces_endpoint is not None:
        from engine.tracing import install_tracing  # the OpenTelemetry SDK only when on

        install_tracing(app, state)

    _openai_routes(app, state)
    lora_admin_routes(app, state)
    tokenizer_routes(app, state)
    _ops_routes(app, state)
    return app


COMPLETIONS, CHAT = Completions(), Chat()


def _openai_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/completions", response_model=None, tags=["openai"])
    async def completions(request: Request, body: CompletionRequest) -> Response:
        return await _guard(serve_generation(request, state, body, COMPLETIONS))

    @app.post("/v1/chat/completions", response_model=None, tags=["openai"])
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
        return await _guard(serve_generation(request, state, body, CHAT))

    @app.get("/v1/models", tags=["openai"])
    async def models(request: Request) -> Response:
        if state.engine.info is None:
            raise model_loading()
        adapters = [adapter_card(state, a) for a in visible_adapters(state, request_key(request))]
        return _json({"object": "list", "data": [_model_card(state), *adapters]})

    @app.get("/v1/models/{model_id:path}", tags=["openai"])
    async def model(request: Request, model_id: str) -> Response:
        if state.engine.info is None:
            raise model_loading()
        if model_id == state.model.served_name:
            return _json(_model_card(state))
        adapter = visible_adapter(state, request_key(request), model_id)
        if adapter is None:
            raise model_not_found(f"The model '{model_id}' does not exist.")
        return _json(adapter_card(state, adapter))


def _ops_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health", tags=["ops"])
    async def health() -> Response:
        """Liveness: the process is up and its engine has not died (loading is alive)."""
        probe = await liveness(state)
        return _json(probe.body, probe.status)

    @app.get("/ready", tags=["ops"])
    async def ready() -> Response:
        """Readiness: the engine is loaded and this server takes new requests."""
        probe = readiness(state)
        return _json(probe.body, probe.status)

    @app.get("/metrics", tags=["ops"])
    async def metrics() -> Response:
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)


async def _guard(handler: Awaitable[Response]) -> Response:
    try:
        return await handler
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED)


def _model_card(state: ServerState) -> dict[str, Any]:
    info = state.model
    return {
        "id": info.served_name,
        "object": "model",
        "created": int(state.started_at),
        "owned_by": "codellama-serve",
        "root": info.name,
        "max_model_len": info.max_model_len,
        "capabilities": {
            "chat": bool(state.caps and state.caps.chat),
            "infill": bool(state.caps and state.caps.infill),
        },
    }


def freeze_startup_heap() -> None:
    """Put what start-up allocated (torch, transformers, vLLM, the tokenizer:
    hundreds of thousands of objects) out of the garbage collector's reach.
    Otherwise every full collection walks all of it, and a burst of requests
    triggers such collections: they stalled the event loop for a large share
    of the frontend's time (vLLM's own server freezes its heap the same way)."""
    gc.collect()
    gc.freeze()


async def _load_engine(state: ServerState, on_fatal: Callable[[], None]) -> None:
    try:
        info = state.engine.info if state.engine.ready else None
        if info is None:
            info = await asyncio.to_thread(state.engine.start)
        if state.settings.lora.enable_lora:
            await state.engine.load_static_adapters()
        freeze_startup_heap()
        state.on_engine_started(info)
        log.info("serving %s (context %d tokens)", info.served_name, info.max_model_len)
    except asyncio.CancelledError:
        raise
    except BaseException as e:
        log.exception("the engine failed to start")
        state.fatal = f"the engine failed to start: {e}"
        on_fatal()


async def _watch_engine(state: ServerState, on_fatal: Callable[[], None]) -> None:
    """Notice a dead engine within a second: fail health, then have the process exit non-zero."""
    while True:
        await asyncio.sleep(WATCHDOG_INTERVAL_S)
        if state.engine.dead and state.fatal is None:
            state.fatal = "the engine process died"
            log.error("the engine process died; exiting so the orchestrator restarts us")
            on_fatal()
            return
