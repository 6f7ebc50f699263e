"""Cluster-mode configuration derived from the settings: the Ray Serve
deployment options (placement, autoscaling, health) and the serve config file
that `serve deploy` and KubeRay's `serveConfigV2` take.

Pure functions, no Ray import: the Helm chart tests and `codellama-serve serve
--print-serve-config` use them without a cluster.
"""

from __future__ import annotations

from typing import Any

from engine.config import DEFAULT_RAY_INGRESS, ResolvedSettings, Settings

IMPORT_PATH = "engine.ray_serve:build_app"
AUTOSCALING_POLICY = "engine.ray_autoscaling:CodeLlamaAutoscalingPolicy"
DEPLOYMENT_NAME = "CodeLlamaServer"
# The application's ingress request router (HAProxy asks it where each POST goes): Ray's
# own, from ray.serve.llm's direct-streaming stack; it calls our deployment's router.
INGRESS_ROUTER_NAME = "CodeLlamaIngressRouter"
REQUEST_ROUTERS = {
    "codellama": "engine.ray_router.CodeLlamaRouter",
    "ray_prefix": "ray.serve.llm.request_router.PrefixCacheAffinityRouter",
}
# Prompts with more characters per context token than this get no routing key.
MAX_CHARS_PER_TOKEN = 16
# How often each replica reports its routing stats (engine.ray_serve.record_routing_stats).
ROUTING_STATS_PERIOD_S = 1.0
# Ray's resource name for a GPU type; a tiny amount only pins the node type.
ACCELERATOR_RESOURCE = "accelerator_type:{}"
ACCELERATOR_FRACTION = 0.001


def placement(settings: ResolvedSettings) -> dict[str, Any]:
    """One replica's resources: a placement group holding the replica and its
    tensor-parallel workers, packed on one node.

    GPU: bundle 0 holds the replica's CPUs and the first GPU, then one bundle
    per further GPU; vLLM's Ray executor places its workers in these bundles.
    CPU: one CPU bundle; vLLM runs its engine in child processes of the replica.
    """
    e, r = settings.engine, settings.ray
    actor = {"num_cpus": r.replica_num_cpus}
    if not settings.gpu:
        bundles: list[dict[str, float]] = [{"CPU": r.replica_num_cpus}]
    else:
        gpu_bundle: dict[str, float] = {"GPU": 1}
        if r.accelerator_type:
            gpu_bundle[ACCELERATOR_RESOURCE.format(r.accelerator_type)] = ACCELERATOR_FRACTION
        bundles = [{"CPU": r.replica_num_cpus, **gpu_bundle}] + [
            dict(gpu_bundle) for _ in range(e.tensor_parallel_size - 1)
        ]
    return {
        "ray_actor_options": actor,
        "placement_group_bundles": bundles,
        "placement_group_strategy": "STRICT_PACK",
    }


def autoscaling_config(settings: ResolvedSettings) -> dict[str, Any]:
    r = settings.ray
    return {
        "min_replicas": r.min_replicas,
        "initial_replicas": r.initial_replicas,
        "max_replicas": r.max_replicas,
        "target_ongoing_requests": r.target_ongoing_requests,
        "upscale_delay_s": r.upscale_delay_s,
        "downscale_delay_s": r.downscale_delay_s,
        "look_back_period_s": r.autoscaling_look_back_s,
        "policy": {
            "policy_function": AUTOSCALING_POLICY,
            "policy_kwargs": {
                "target_ongoing_requests": r.target_ongoing_requests,
                "target_waiting_per_replica": r.target_waiting_per_replica,
                "kv_cache_scale_up_threshold": r.kv_cache_scale_up_threshold,
                "target_interactive_waiting_per_replica": r.target_interactive_waiting_per_replica,
            },
        },
    }


def ingress_env(settings: Settings | ResolvedSettings) -> dict[str, str]:
    """The environment a Ray cluster needs for the settings' ingress (Ray reads it when
    its processes import Serve: `serve --ray` sets it before starting Ray, the chart on
    every pod)."""
    routing = settings.routing
    if (routing.ray_ingress or DEFAULT_RAY_INGRESS) != "haproxy":
        return {}
    env = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}
    if routing.ray_router in REQUEST_ROUTERS:
        # HAProxy hands the ingress request router the body only when asked to.
        env["RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY"] = "1"
    return env


def request_router_config(settings: ResolvedSettings) -> dict[str, Any] | None:
    """The deployment's `request_router_config` (None: Ray's default router)."""
    routing, r = settings.routing, settings.ray
    cls = REQUEST_ROUTERS.get(routing.ray_router)
    if cls is None:
        return None
    kwargs: dict[str, Any] = {}
    if routing.ray_router == "codellama":
        e = settings.engine
        kwargs = {
            "model": settings.model, "tokenizer": e.tokenizer, "revision": e.revision,
            "download_dir": e.download_dir,
            "max_imbalance": routing.routing_max_imbalance,
            "max_imbalance_ratio": routing.routing_max_imbalance_ratio,
            "session_affinity": routing.routing_session_affinity,
            "target_waiting_per_replica": r.target_waiting_per_replica,
            "kv_cache_threshold": r.kv_cache_scale_up_threshold,
            # Far more text than the context holds (a token is ~4 characters of code).
            "max_prompt_chars": MAX_CHARS_PER_TOKEN * (e.max_model_len or 0) or None,
            "log_level": settings.server.log_level,
        }  # fmt: skip
    return {
        "request_router_class": cls,
        "request_router_kwargs": kwargs,
        "request_routing_stats_period_s": ROUTING_STATS_PERIOD_S,
    }


def ingress_router_options() -> dict[str, Any]:
    """The ingress request router deployment: no CPU reserved (it runs beside HAProxy on
    any node, the head included), and no limit that would throttle the ingress."""
    return {
        "name": INGRESS_ROUTER_NAME,
        "max_ongoing_requests": 1000,
        "ray_actor_options": {"num_cpus": 0},
    }


def deployment_options(settings: ResolvedSettings) -> dict[str, Any]:
    """Keyword arguments for `serve.deployment(...).options(...)`."""
    r = settings.ray
    router = request_router_config(settings)
    where = placement(settings)
    if not settings.routing.ray_app_thread:
        # Ray reads it when the replica's process starts: set for this deployment only.
        env = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}
        where["ray_actor_options"] = {
            **where["ray_actor_options"],
            "runtime_env": {"env_vars": env},
        }
    return {
        "name": DEPLOYMENT_NAME,
        **({"request_router_config": router} if router is not None else {}),
        "autoscaling_config": autoscaling_config(settings),
        "max_ongoing_requests": r.max_ongoing_requests,
        **where,
        "health_check_period_s": r.health_check_period_s,
        "health_check_timeout_s": r.health_check_timeout_s,
        # In-flight requests get the drain timeout to finish on scale-down.
        "graceful_shutdown_timeout_s": settings.server.drain_timeout_s,
        "graceful_shutdown_wait_loop_s": 1.0,
    }


def settings_args(settings: Settings) -> dict[str, Any]:
    """The settings as the application's `args`: what was set, never the API keys
    themselves (replicas read those from their file or env var)."""
    dumped = settings.model_dump(mode="json", exclude_unset=True, exclude={"auth": {"api_keys"}})
    return {section: values for section, values in dumped.items() if values}


def serve_config(settings: Settings) -> dict[str, Any]:
    """The Ray Serve config file (`serve deploy`, KubeRay `serveConfigV2`)."""
    r = settings.ray
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": r.ray_http_host, "port": r.ray_http_port},
        "applications": [
            {
                "name": r.ray_app_name,
                "route_prefix": r.ray_route_prefix,
                "import_path": IMPORT_PATH,
                "args": {"settings": settings_args(settings)},
            }
        ],
    }
