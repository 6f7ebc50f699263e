"""Cluster-mode configuration derived from the settings: the Ray Serve
deployment options (placement, autoscaling, health) and the serve config file
that `serve deploy` and KubeRay's `serveConfigV2` take.

Pure functions, no Ray import: the Helm chart tests and `codellama-serve serve
--print-serve-config` use them without a cluster.
"""

from __future__ import annotations

from typing import Any

from engine.config import ResolvedSettings, Settings

IMPORT_PATH = "engine.ray_serve:build_app"
AUTOSCALING_POLICY = "engine.ray_autoscaling:CodeLlamaAutoscalingPolicy"
DEPLOYMENT_NAME = "CodeLlamaServer"
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


def deployment_options(settings: ResolvedSettings) -> dict[str, Any]:
    """Keyword arguments for `serve.deployment(...).options(...)`."""
    r = settings.ray
    return {
        "name": DEPLOYMENT_NAME,
        "autoscaling_config": autoscaling_config(settings),
        "max_ongoing_requests": r.max_ongoing_requests,
        **placement(settings),
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
