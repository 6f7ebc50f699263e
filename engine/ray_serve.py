"""Cluster mode: the same FastAPI app as a Ray Serve deployment.

Each replica owns one vLLM engine (tensor-parallel over the GPUs of its
placement group) and serves the standalone app unchanged: every endpoint,
error and metric behaves the same. This module only wraps: it builds the
deployment from the settings, loads the engine before the replica reports
ready, reports the engine's queue and KV cache to the autoscaler, and tells
Ray when its engine has died.

    serve run engine.ray_serve:build_app settings='{"engine": {"model": "demo"}}'
    serve deploy deploy/ray/serve-config.yaml
    codellama-serve serve --ray
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from http import HTTPStatus
from typing import Any, Literal

from ray import serve
from ray.serve import Application

from engine.api.health import ENGINE_HEALTH_TIMEOUT_S, liveness, readiness
from engine.api.state import ServerState
from engine.config import DEMO_MODEL, ConfigError, Settings, build_settings, resolve
from engine.llm import EngineStats
from engine.ray_config import (
    DEPLOYMENT_NAME,
    deployment_options,
    ingress_env,
    ingress_router_options,
    request_router_config,
    settings_args,
)

log = logging.getLogger("engine.ray")


def use_gpu(settings: Settings) -> bool:
    """Replicas get GPUs unless told otherwise or serving the demo model (or, with
    no model set, if the cluster has GPUs)."""
    if settings.ray.ray_use_gpu is not None:
        return settings.ray.ray_use_gpu
    if settings.engine.model:
        return settings.engine.model != DEMO_MODEL
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


@serve.ingress()
class CodeLlamaServer:
    """One replica: one engine, the standalone app in front of it."""

    # Ray Serve awaits an async constructor; mypy wants __init__ to return None.
    async def __init__(self, settings_data: dict[str, Any], gpu: bool) -> None:  # type: ignore[misc]
        from engine.api.app import create_app
        from engine.llm import Engine, configure_vllm_logging
        from engine.logs import configure_logging

        # The driver resolved the same settings with the same `gpu` (see build_app).
        self.settings = resolve(build_settings(file_values=settings_data), gpu=gpu, mode="ray")
        configure_logging(self.settings.server.log_level)
        configure_vllm_logging(self.settings.server.log_level)
        self.replica_id = _replica_tag()
        self.engine = Engine(self.settings)
        # Load before reporting ready, so Ray routes nothing to a loading replica.
        started = time.monotonic()
        await asyncio.to_thread(self.engine.start)
        if self.settings.lora.enable_lora:  # every replica: the same --lora-modules
            await self.engine.load_static_adapters()
        self.engine_started_at = time.time()
        self.prefix_cache = PrefixCacheWindow()
        log.info(
            "replica %s loaded its engine in %.1f s", self.replica_id, time.monotonic() - started
        )
        self.fastapi_app = create_app(
            self.settings, self.engine, on_fatal=self._on_fatal, replica_id=self.replica_id
        )
        self.state = self.fastapi_app.state.server
        self._serve_own_metrics()

    def __del__(self) -> None:
        # Ray Serve calls this when it stops a replica (scale-down, redeploy,
        # shutdown): the engine's processes go with it instead of outliving it.
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()

    def __serve_build_asgi_app__(self) -> Any:
        return self.fastapi_app

    def _on_fatal(self) -> None:
        # Ray replaces the replica once check_health raises; the process stays.
        log.error("replica %s: %s", self.replica_id, self.state.fatal)

    async def check_health(self) -> None:
        """Ray calls this periodically; raising makes Ray replace the replica."""
        if self.state.fatal:
            raise RuntimeError(self.state.fatal)
        await self.engine.check_health()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """The engine-side load signals for CodeLlamaAutoscalingPolicy."""
        stats = self.engine.stats
        return {
            "engine_waiting": float(stats.waiting),
            "engine_running": float(stats.running),
            "kv_cache_usage": float(stats.kv_cache_usage),
            "admitted_sequences": float(self.state.admission.sequences),
            "interactive_waiting": float(self.state.admission.top_class_waiting),
            **self.prefix_cache.stats(stats),
        }

    def record_routing_stats(self) -> dict[str, Any]:
        """What the request router weighs (engine.ray_router): the prefix cache's block
        size and capacity, the engine's queue and KV cache, and when the engine started
        (a new start means an empty cache)."""
        info, stats = self.engine.info, self.engine.stats
        return {
            "block_size": info.block_size if info else 0,
            "kv_cache_blocks": info.kv_cache_blocks if info else 0,
            "engine_started_at": self.engine_started_at,
            "engine_waiting": stats.waiting,
            "kv_cache_usage": round(stats.kv_cache_usage, 2),
        }

    def _serve_own_metrics(self) -> None:
        # Ray's proxy sends /metrics to one replica at random; each replica also
        # serves its own /metrics, /health and /ready on a fixed port, so pods
        # can be scraped and probed per replica.
        port = self.settings.ray.ray_metrics_port
        if port is None:
            return
        try:
            serve_replica_ops(port, self.state, asyncio.get_running_loop())
        except OSError as e:  # another replica on this node took it
            log.warning("replica %s: port %d unavailable (%s)", self.replica_id, port, e)


class PrefixCacheWindow:
    """The engine's prefix-cache counters for the autoscaler: the totals, and the hit
    rate since the previous report (the last one seen while no prompt was looked up)."""

    def __init__(self) -> None:
        self._queries = self._hits = 0
        self.hit_rate = 0.0

    def stats(self, stats: EngineStats) -> dict[str, float]:
        queries = stats.prefix_cache_queries - self._queries
        if queries > 0:
            self.hit_rate = (stats.prefix_cache_hits - self._hits) / queries
        self._queries, self._hits = stats.prefix_cache_queries, stats.prefix_cache_hits
        return {
            "prefix_cache_queries": float(stats.prefix_cache_queries),
            "prefix_cache_hits": float(stats.prefix_cache_hits),
            "prefix_cache_hit_rate": self.hit_rate,
        }


def serve_replica_ops(port: int, state: ServerState, loop: asyncio.AbstractEventLoop) -> None:
    """/metrics, /health and /ready of one replica, on a daemon thread; the answers are the
    app's own (`engine.api.health`), the engine's health checked on the replica's `loop`."""
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            body, content_type = state.metrics.render()
            start_response("200 OK", [("Content-Type", content_type)])
            return [body]
        if path == "/health":
            probe = asyncio.run_coroutine_threadsafe(liveness(state), loop).result(
                ENGINE_HEALTH_TIMEOUT_S + 1
            )
        elif path == "/ready":
            probe = readiness(state)
        else:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]
        start_response(
            f"{probe.status} {HTTPStatus(probe.status).phrase}",
            [("Content-Type", "application/json")],
        )
        return [json.dumps(probe.body).encode()]

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    httpd = make_server("", port, app, server_class=Server, handler_class=QuietHandler)
    threading.Thread(target=httpd.serve_forever, name="replica-ops", daemon=True).start()


def _replica_tag() -> str:
    try:
        return serve.get_replica_context().replica_tag
    except Exception:  # outside a replica (unit tests)
        return f"pid-{os.getpid()}"


def build_app(args: dict[str, Any]) -> Application:
    """Ray Serve application builder: `args["settings"]` holds the settings sections."""
    raw = args.get("settings", {}) if isinstance(args, dict) else {}
    if isinstance(raw, str):  # `serve run ... settings='{"engine": ...}'`
        import json

        raw = json.loads(raw)
    settings = _with_cluster_ingress(build_settings(file_values=raw))
    resolved = resolve(settings, gpu=use_gpu(settings), mode="ray")
    with _own_logging():  # ray_prefix's router class is ray.serve.llm's
        deployment = serve.deployment(CodeLlamaServer).options(**deployment_options(resolved))
    # Replicas get what was set, not the resolved values: they resolve it again with the
    # same function and `gpu` (their env supplies the API keys, never sent as args).
    app = deployment.bind(settings_args(settings), resolved.gpu)
    if resolved.routing.ray_ingress != "haproxy" or request_router_config(resolved) is None:
        return app
    # HAProxy asks this deployment where each POST goes; it hands the parsed body to our
    # deployment's request router (`pending_request.args`), then HAProxy forwards the
    # request to the chosen replica's own HTTP server.
    with _own_logging():
        from ray.llm._internal.serve.core.ingress.router import LLMRouter

    router = serve.deployment(LLMRouter).options(**ingress_router_options())
    return app._with_ingress_request_router(router.bind(server=app))


@contextlib.contextmanager
def _own_logging() -> Iterator[None]:
    """Importing ray.serve.llm replaces the root logger's handlers with Ray's JSON one (its
    `setup_observability`): this process keeps the logging it had."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def _with_cluster_ingress(settings: Settings) -> Settings:
    """The settings with the ingress this Ray cluster really runs (Ray reads it from the
    environment its processes started with), so that replicas resolve for it."""
    actual: Literal["haproxy", "proxy"] = (
        "haproxy" if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" else "proxy"
    )
    wanted = settings.routing.ray_ingress
    if wanted is not None and wanted != actual:
        log.warning(
            "ray_ingress is %s but this Ray cluster runs the %s ingress (set %s on its nodes)",
            wanted, actual, " ".join(f"{k}={v}" for k, v in ingress_env(settings).items()) or
            "RAY_SERVE_ENABLE_HA_PROXY=0",
        )  # fmt: skip
    if settings.routing.ray_router == "ray_prefix" and actual != "haproxy":
        raise ConfigError(
            "ray_router ray_prefix needs the haproxy ingress (RAY_SERVE_ENABLE_HA_PROXY=1): "
            "only it hands the request body to a router"
        )
    if settings.routing.ray_router == "codellama" and actual != "haproxy":
        log.info("Ray's proxy gives routers no request body: routing by session and load only")
    settings.routing.ray_ingress = actual
    return settings


# ---------------------------------------------------------------- `serve --ray`


def serve_with_ray(settings: Settings) -> int:
    """Start or join a Ray cluster, run the application, log replica changes,
    and shut it down gracefully on SIGTERM/SIGINT."""
    import ray

    r = settings.ray
    ray.init(address=r.ray_address, ignore_reinit_error=True, log_to_driver=True)
    serve.start(http_options={"host": r.ray_http_host, "port": r.ray_http_port})
    serve.run(
        build_app({"settings": settings_args(settings)}),
        name=r.ray_app_name,
        route_prefix=r.ray_route_prefix,
        blocking=False,
    )
    log.info(
        "Ray Serve app %r on http://%s:%d%s", r.ray_app_name, r.ray_http_host, r.ray_http_port,
        r.ray_route_prefix,
    )  # fmt: skip
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    last: dict[str, int] | None = None
    while not stop.wait(1.0):
        replicas = replica_states(r.ray_app_name)
        if replicas != last:
            log.info("replicas: %s", " ".join(f"{k}={v}" for k, v in sorted(replicas.items())))
            last = replicas
    log.info("shutting down Ray Serve (in-flight requests get the drain timeout)")
    serve.shutdown()
    ray.shutdown()
    return 0


def replica_states(app_name: str) -> dict[str, int]:
    """Replica counts by state (RUNNING, STARTING, STOPPING, ...)."""
    try:
        app = serve.status().applications.get(app_name)
    except Exception:
        return {}
    if app is None or DEPLOYMENT_NAME not in app.deployments:
        return {}
    return {str(k): v for k, v in app.deployments[DEPLOYMENT_NAME].replica_states.items()}
