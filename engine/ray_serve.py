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
import logging
import os
import signal
import threading
import time
from typing import Any

from ray import serve
from ray.serve import Application

from engine.config import DEMO_MODEL, REAL_MODEL, Settings, build_settings
from engine.ray_config import DEPLOYMENT_NAME, deployment_options, placement, settings_args

log = logging.getLogger("engine.ray")


def use_gpu(settings: Settings) -> bool:
    """Replicas get GPUs unless told otherwise or serving the demo model."""
    if settings.ray.ray_use_gpu is not None:
        return settings.ray.ray_use_gpu
    if settings.engine.model:
        return settings.engine.model != DEMO_MODEL
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def resolve(settings: Settings) -> tuple[Settings, bool]:
    """Fix the model and executor so every replica builds the same engine."""
    gpu = use_gpu(settings)
    engine = settings.engine.model_copy(
        update={
            "model": settings.engine.model or (REAL_MODEL if gpu else DEMO_MODEL),
            "distributed_executor_backend": settings.engine.distributed_executor_backend
            or placement(settings, gpu)["distributed_executor_backend"],
        }
    )
    return settings.model_copy(update={"engine": engine}), gpu


@serve.ingress()
class CodeLlamaServer:
    """One replica: one engine, the standalone app in front of it."""

    async def __init__(self, settings_data: dict[str, Any], gpu: bool) -> None:
        from engine.api.app import create_app
        from engine.llm import Engine, configure_vllm_logging
        from engine.logs import configure_logging

        self.settings = build_settings(file_values=settings_data)
        configure_logging(self.settings.server.log_level)
        configure_vllm_logging(self.settings.server.log_level)
        self.replica_id = _replica_tag()
        self.engine = Engine(self.settings.engine, gpu=gpu)
        # Load before reporting ready, so Ray routes nothing to a loading replica.
        started = time.monotonic()
        await asyncio.to_thread(self.engine.start)
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
        }

    def _serve_own_metrics(self) -> None:
        # Ray's proxy sends /metrics to one replica at random; each replica also
        # serves its own /metrics, /health and /ready on a fixed port, so pods
        # can be scraped and probed per replica.
        port = self.settings.ray.ray_metrics_port
        if port is None:
            return
        try:
            serve_replica_ops(port, self.state)
        except OSError as e:  # another replica on this node took it
            log.warning("replica %s: port %d unavailable (%s)", self.replica_id, port, e)


def serve_replica_ops(port: int, state: Any) -> None:
    """/metrics, /health and /ready of one replica, on a daemon thread."""
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    from prometheus_client import make_wsgi_app

    metrics_app = make_wsgi_app(state.metrics.registry)

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        if path in ("/health", "/ready"):
            ok = not state.engine.dead if path == "/health" else state.accepting
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "text/plain")])  # fmt: skip
            return [b"ok\n" if ok else b"unavailable\n"]
        return metrics_app(environ, start_response)

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
    settings, gpu = resolve(build_settings(file_values=raw))
    deployment = serve.deployment(CodeLlamaServer).options(**deployment_options(settings, gpu))
    return deployment.bind(settings_args(settings), gpu)


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
