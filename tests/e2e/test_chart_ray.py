"""The RayService's cluster: the head runs no replica, the worker group follows Serve's
autoscaling, Ray's KubeRay autoscaler fits one replica per worker pod, and the pods
keep the probes KubeRay injects."""

from __future__ import annotations

import pytest

from engine.config import resolve
from engine.ray_config import placement

from .chart import NAMESPACE, one, ray_cases, render, settings_of, values_of


@pytest.mark.parametrize("case", ray_cases())
def test_head_runs_no_replica(helm: str, case: str) -> None:
    head = one(render(helm, case), "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert head["rayStartParams"]["num-cpus"] == "0"
    for container in head["template"]["spec"]["containers"]:
        for key in ("limits", "requests"):
            assert not any("gpu" in r for r in container["resources"].get(key, {}))


@pytest.mark.parametrize("case", ray_cases())
def test_worker_group_follows_serve_autoscaling(helm: str, case: str) -> None:
    docs = render(helm, case)
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    s = settings_of(docs)
    (group,) = cluster["workerGroupSpecs"]
    assert group["minReplicas"] == s.ray.min_replicas
    assert group["maxReplicas"] == s.ray.max_replicas
    initial = s.ray.initial_replicas if s.ray.initial_replicas is not None else s.ray.min_replicas
    assert group["replicas"] == initial
    assert cluster["enableInTreeAutoscaling"] is True


@pytest.mark.parametrize("case", ray_cases())
def test_ray_autoscaler_fits_one_replica_per_worker_pod(helm: str, case: str) -> None:
    """Ray's own KubeRay autoscaler code reads the cluster: each worker pod offers exactly
    one replica's placement group (engine.ray_config.placement), the head none."""
    derive = pytest.importorskip("ray.autoscaler._private.kuberay.autoscaling_config")
    docs = render(helm, case)
    service = one(docs, "RayService")
    cr = {
        "metadata": {"name": service["metadata"]["name"], "namespace": NAMESPACE},
        "spec": service["spec"]["rayClusterConfig"],
    }
    config = derive._derive_autoscaling_config_from_ray_cr(cr)
    types = config["available_node_types"]
    s = settings_of(docs)
    (group,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    worker = types[group["groupName"]]
    assert (worker["min_workers"], worker["max_workers"]) == (
        s.ray.min_replicas,
        s.ray.max_replicas,
    )
    gpu = values_of(case)["gpu"]["enabled"]
    bundles = placement(resolve(s, gpu=gpu, mode="ray"))["placement_group_bundles"]
    need: dict[str, float] = {}
    for bundle in bundles:
        for k, v in bundle.items():
            need[k] = need.get(k, 0) + v
    offer = worker["resources"]
    for k, v in need.items():
        assert offer.get(k, 0) >= v, f"a worker pod lacks {k}: offers {offer.get(k)}, needs {v}"
    if gpu:  # exactly one replica's GPUs: never two replicas on one pod
        assert offer["GPU"] == need["GPU"] == s.engine.tensor_parallel_size
        if s.ray.accelerator_type:
            assert offer[f"accelerator_type:{s.ray.accelerator_type}"] == 1
    else:
        assert not offer.get("GPU")
    head = types["headgroup"]["resources"]
    assert head.get("CPU", 0) == 0 and head.get("GPU", 0) == 0


@pytest.mark.parametrize("case", ray_cases())
def test_ray_pods_keep_kuberay_probes(helm: str, case: str) -> None:
    """In Ray mode traffic enters through each pod's Ray proxy, so the pods keep the
    probes KubeRay injects (raylet and proxy health); replica health is Ray Serve's
    (/health and /ready through the proxy reach a replica at random)."""
    cluster = one(render(helm, case), "RayService")["spec"]["rayClusterConfig"]
    specs = [cluster["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in cluster["workerGroupSpecs"]
    ]
    for spec in specs:
        for container in spec["containers"]:
            assert not {"livenessProbe", "readinessProbe"} & set(container)
            ports = {p["name"] for p in container["ports"]}
            assert "serve" in ports
