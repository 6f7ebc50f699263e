"""Cluster-mode configuration: placement, autoscaling, the serve config (no Ray cluster)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from engine.config import build_settings, resolve
from engine.ray_autoscaling import CodeLlamaAutoscalingPolicy
from engine.ray_config import IMPORT_PATH, serve_config, settings_args
from engine.ray_config import autoscaling_config as _autoscaling_config
from engine.ray_config import deployment_options as _deployment_options
from engine.ray_config import placement as _placement

ROOT = Path(__file__).resolve().parents[2]


def settings(**sections):
    return build_settings(file_values=sections, env={})


def ray_settings(s, gpu=False):
    return resolve(s, gpu=gpu, mode="ray")


def placement(s, gpu):
    """The Ray options of a replica, with the executor its engine runs tensor-parallel with."""
    r = ray_settings(s, gpu)
    return {**_placement(r), "distributed_executor_backend": r.engine.distributed_executor_backend}


def target_ongoing_requests(s):
    return ray_settings(s).ray.target_ongoing_requests


def max_ongoing_requests(s):
    return ray_settings(s).ray.max_ongoing_requests


def autoscaling_config(s):
    return _autoscaling_config(ray_settings(s))


def deployment_options(s, gpu):
    return _deployment_options(ray_settings(s, gpu))


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_gpu_placement_reserves_tp_gpus_packed_on_one_node(tp):
    p = placement(settings(engine={"tensor_parallel_size": tp}), gpu=True)
    bundles = p["placement_group_bundles"]
    assert len(bundles) == tp
    assert sum(b.get("GPU", 0) for b in bundles) == tp
    assert all(b["accelerator_type:A100"] > 0 for b in bundles)
    assert bundles[0]["CPU"] == 1.0  # the replica itself lives in bundle 0
    assert p["placement_group_strategy"] == "STRICT_PACK"
    assert p["distributed_executor_backend"] == "ray"
    assert p["ray_actor_options"] == {"num_cpus": 1.0}


def test_accelerator_type_is_configurable():
    p = placement(settings(ray={"accelerator_type": "H100"}), gpu=True)
    assert "accelerator_type:H100" in p["placement_group_bundles"][0]
    p = placement(settings(ray={"accelerator_type": None}), gpu=True)
    assert p["placement_group_bundles"] == [{"CPU": 1.0, "GPU": 1}]


def test_cpu_placement_runs_the_same_path_with_one_bundle():
    p = placement(settings(engine={"tensor_parallel_size": 1}), gpu=False)
    assert p["placement_group_bundles"] == [{"CPU": 1.0}]
    assert p["distributed_executor_backend"] == "mp"


def test_autoscaling_targets_follow_the_engine_batch():
    s = settings(engine={"max_num_seqs": 256}, admission={"max_waiting_requests": 128})
    assert target_ongoing_requests(s) == 204.8  # 80% of the batch, not Ray's default of 2
    assert max_ongoing_requests(s) == 384
    a = autoscaling_config(settings(ray={"min_replicas": 2, "max_replicas": 8}))
    assert (a["min_replicas"], a["max_replicas"]) == (2, 8)
    assert a["policy"]["policy_function"] == "engine.ray_autoscaling:CodeLlamaAutoscalingPolicy"
    CodeLlamaAutoscalingPolicy(**a["policy"]["policy_kwargs"])  # the kwargs fit the policy


def test_explicit_targets_win():
    s = settings(ray={"target_ongoing_requests": 32, "max_ongoing_requests": 64})
    assert target_ongoing_requests(s) == 32 and max_ongoing_requests(s) == 64


def test_deployment_options_carry_drain_and_health():
    o = deployment_options(settings(server={"drain_timeout_s": 45}), gpu=True)
    assert o["graceful_shutdown_timeout_s"] == 45
    assert o["health_check_period_s"] > 0 and o["max_ongoing_requests"] == 512


def test_replica_bounds_are_validated():
    from engine.config import ConfigError

    with pytest.raises(ConfigError, match="max_replicas"):
        settings(ray={"min_replicas": 3, "max_replicas": 2})


def test_serve_config_file_is_what_python_builds():
    data = yaml.safe_load((ROOT / "deploy/ray/serve-config.yaml").read_text())
    app = data["applications"][0]
    assert app["import_path"] == IMPORT_PATH
    assert serve_config(settings(**app["args"]["settings"])) == data


def test_settings_args_keep_only_what_was_set_and_never_keys():
    s = settings(engine={"model": "m", "tensor_parallel_size": 1}, auth={"api_keys": "secret"})
    assert settings_args(s) == {"engine": {"model": "m", "tensor_parallel_size": 1}}


@pytest.fixture
def policy():
    return CodeLlamaAutoscalingPolicy(
        target_ongoing_requests=8, target_waiting_per_replica=2, kv_cache_scale_up_threshold=0.9
    )


def test_policy_ongoing_requests(policy):
    assert policy.decide(1, ongoing=16, waiting=0, kv_mean=0.1) == (2.0, ["ongoing_requests"])
    assert policy.decide(2, ongoing=4, waiting=0, kv_mean=0.1)[0] == 0.5  # may scale down


def test_policy_scales_up_on_the_engine_queue(policy):
    desired, reasons = policy.decide(1, ongoing=8, waiting=10, kv_mean=0.2)
    assert desired == 1 + 2 and reasons == ["engine_queue"]


def test_policy_scales_up_on_kv_cache(policy):
    assert policy.decide(2, ongoing=8, waiting=0, kv_mean=0.95) == (3, ["kv_cache"])


def test_policy_holds_while_saturated(policy):
    # Few requests but a full KV cache (long contexts): never scale down now.
    assert policy.decide(3, ongoing=2, waiting=0, kv_mean=0.97) == (4, ["kv_cache"])
    assert policy.decide(3, ongoing=2, waiting=7, kv_mean=0.5) == (4, ["engine_queue"])


class _Ctx:
    def __init__(self, replicas, ongoing, metrics):
        self.current_num_replicas = replicas
        self.target_num_replicas = replicas
        self.total_num_requests = ongoing
        self.aggregated_metrics = metrics


def test_policy_reads_replica_metrics(policy):
    metrics = {"engine_waiting": {"r1": 6.0, "r2": 4.0}, "kv_cache_usage": {"r1": 0.5, "r2": 0.6}}
    desired, state = policy(_Ctx(2, 16, metrics))
    assert desired == 2 + 2 and state["codellama_reasons"] == ["engine_queue"]
    assert policy(_Ctx(0, 5, {}))[0] == 0


def test_replica_ops_port_serves_metrics_health_and_ready(demo_tokenizer):
    import asyncio
    import threading

    import httpx

    from engine.api.state import ServerState
    from engine.ray_serve import serve_replica_ops
    from tests.conftest import free_port
    from tests.fakes import FakeEngine

    engine = FakeEngine(demo_tokenizer)
    state = ServerState(ray_settings(settings()), engine)
    loop = asyncio.new_event_loop()  # the replica's loop, where the engine is checked
    threading.Thread(target=loop.run_forever, daemon=True).start()
    port = free_port()
    serve_replica_ops(port, state, loop)
    url = f"http://127.0.0.1:{port}"
    assert "codellama_serve_requests_running" in httpx.get(url + "/metrics").text
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/ready").status_code == 503
    state.on_engine_started(engine.start())
    assert httpx.get(url + "/ready").status_code == 200
    loop.call_soon_threadsafe(loop.stop)


def test_policy_scales_up_on_interactive_queueing():
    policy = CodeLlamaAutoscalingPolicy(
        target_ongoing_requests=8, target_waiting_per_replica=100,
        kv_cache_scale_up_threshold=0.9, target_interactive_waiting_per_replica=2,
    )  # fmt: skip
    # A batch flood queued behind priority scheduling is no reason by itself...
    assert policy.decide(2, ongoing=10, waiting=60, kv_mean=0.5, interactive_waiting=3) == (
        1.25, ["ongoing_requests"],
    )  # fmt: skip
    # ...interactive work waiting is: one more replica, and no scaling down meanwhile.
    assert policy.decide(2, ongoing=10, waiting=60, kv_mean=0.5, interactive_waiting=5) == (
        3, ["interactive_queue"],
    )  # fmt: skip
    metrics = {"interactive_waiting": {"r1": 4.0, "r2": 1.0}, "engine_waiting": {"r1": 9.0}}
    desired, state = policy(_Ctx(2, 2, metrics))
    assert desired == 3 and state["codellama_reasons"] == ["interactive_queue"]
    off = CodeLlamaAutoscalingPolicy(8, 100, 0.9)  # none: the signal is off
    assert off.decide(1, ongoing=1, waiting=0, kv_mean=0, interactive_waiting=50)[1] == [
        "ongoing_requests"
    ]


def test_autoscaling_config_carries_the_interactive_target():
    name = "target_interactive_waiting_per_replica"
    told = autoscaling_config(settings(ray={name: 3.0}))
    assert told["policy"]["policy_kwargs"][name] == 3.0
    assert autoscaling_config(settings())["policy"]["policy_kwargs"][name] == 2.0
