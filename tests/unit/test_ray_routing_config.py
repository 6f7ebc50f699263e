"""Cluster routing settings -> Ray: the ingress environment, the deployment's request
router, and the application `build_app` wires (no Ray cluster: built, not run)."""

from __future__ import annotations

import inspect

import pytest
from ray.serve.request_router import RequestRouter

from engine.config import ConfigError, build_settings, resolve
from engine.ray_config import (
    INGRESS_ROUTER_NAME,
    REQUEST_ROUTERS,
    deployment_options,
    ingress_env,
    request_router_config,
)

HAPROXY_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY": "1",
}


def settings(**routing):
    return build_settings(env={}, file_values={"engine": {"model": "demo"}, "routing": routing})


def test_the_ingress_environment_follows_the_settings():
    assert ingress_env(settings()) == HAPROXY_ENV  # the default: HAProxy, our router
    assert ingress_env(settings(ray_router="default")) == {"RAY_SERVE_ENABLE_HA_PROXY": "1"}
    assert ingress_env(settings(ray_router="ray_prefix")) == HAPROXY_ENV
    assert ingress_env(settings(ray_ingress="proxy")) == {}


def test_ray_prefix_needs_the_haproxy_ingress():
    with pytest.raises(ConfigError, match="ray_prefix"):
        settings(ray_ingress="proxy", ray_router="ray_prefix")


def test_the_deployment_gets_the_chosen_router():
    ours = request_router_config(resolve(settings(routing_max_imbalance=6), gpu=False, mode="ray"))
    assert ours is not None
    assert ours["request_router_class"] == "engine.ray_router.CodeLlamaRouter"
    kwargs = ours["request_router_kwargs"]
    assert kwargs["model"] == "demo" and kwargs["max_imbalance"] == 6
    # The load guard's saturation thresholds are the autoscaler's.
    assert (kwargs["target_waiting_per_replica"], kwargs["kv_cache_threshold"]) == (8.0, 0.9)
    assert kwargs["log_level"] == "info"  # the server's: "debug" logs each decision
    # Every keyword is one the router takes.
    from engine.ray_router import CodeLlamaRouter

    assert set(kwargs) <= set(inspect.signature(CodeLlamaRouter.initialize_state).parameters)
    assert "request_router_config" not in deployment_options(
        resolve(settings(ray_router="default"), gpu=False, mode="ray")
    )
    ray_prefix = deployment_options(
        resolve(settings(ray_router="ray_prefix"), gpu=False, mode="ray")
    )
    assert ray_prefix["request_router_config"]["request_router_class"].endswith(
        "PrefixCacheAffinityRouter"
    )


@pytest.mark.parametrize("name", sorted(REQUEST_ROUTERS))
def test_router_classes_import_and_are_ray_request_routers(name):
    import importlib

    module, _, cls = REQUEST_ROUTERS[name].rpartition(".")
    assert issubclass(getattr(importlib.import_module(module), cls), RequestRouter)


def test_ray_ingress_router_hands_routers_the_body():
    """What our router relies on in Ray's ingress request router (LLMRouter, a Ray
    internal): the parsed body as the first routing argument, its fields as attributes."""
    from ray.llm._internal.serve.core.ingress.router import _parse_routing_payload

    payload = _parse_routing_payload(b'{"prompt": "def f():", "suffix": "x", "user": "u"}')
    assert (payload.prompt, payload.suffix, payload.user) == ("def f():", "x", "u")
    assert _parse_routing_payload(b"{not json") is None


def test_build_app_wires_the_ingress_router_behind_haproxy(monkeypatch):
    from engine import ray_serve

    for k, v in HAPROXY_ENV.items():
        monkeypatch.setenv(k, v)
    app = ray_serve.build_app({"settings": {"engine": {"model": "demo"}}})
    router = app._ingress_request_router
    assert router is not None and router._bound_deployment.name == INGRESS_ROUTER_NAME
    server = app._bound_deployment
    assert server._deployment_config.request_router_config.request_router_class.endswith(
        "CodeLlamaRouter"
    )
    # Replicas resolve their settings for the ingress the cluster runs.
    settings_arg = server.init_args[0]
    assert settings_arg["routing"]["ray_ingress"] == "haproxy"


def test_build_app_keeps_this_processs_logging():
    """Importing ray.serve.llm makes the root logger Ray's JSON one; `serve --ray` logs
    plain lines (and its e2e test reads them). A fresh process: the import happens once."""
    import subprocess
    import sys

    code = (
        "import logging, os; from engine.logs import configure_logging; configure_logging('info');"
        "os.environ.update(RAY_SERVE_ENABLE_HA_PROXY='1');"
        "from engine.ray_serve import build_app;"
        "build_app({'settings': {'engine': {'model': 'demo'},"
        " 'routing': {'ray_router': 'ray_prefix'}}});"
        "logging.getLogger('engine.ray').info('replicas: RUNNING=2')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert " INFO engine.ray: replicas: RUNNING=2" in out.stderr, out.stderr[-2000:]


def test_build_app_behind_ray_proxy_routes_on_the_deployment_handle(monkeypatch):
    from engine import ray_serve

    monkeypatch.delenv("RAY_SERVE_ENABLE_HA_PROXY", raising=False)
    app = ray_serve.build_app({"settings": {"engine": {"model": "demo"}}})
    assert app._ingress_request_router is None
    assert app._bound_deployment.init_args[0]["routing"]["ray_ingress"] == "proxy"
    with pytest.raises(ConfigError, match="haproxy"):
        ray_serve.build_app({"settings": {"engine": {"model": "demo"},
                                          "routing": {"ray_router": "ray_prefix"}}})  # fmt: skip


def test_the_app_shares_the_replicas_loop_unless_asked_for_a_thread():
    def actor_options(**routing):
        return deployment_options(resolve(settings(**routing), gpu=False, mode="ray"))[
            "ray_actor_options"
        ]

    env = actor_options()["runtime_env"]["env_vars"]
    assert env == {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}
    assert actor_options()["num_cpus"] == 1.0  # placement's options kept
    assert "runtime_env" not in actor_options(ray_app_thread=True)
