"""The engine pods: GPUs and placement, termination grace and probes, secrets by
reference, the model cache volume, images and security context."""

from __future__ import annotations

import pytest
import yaml

from .chart import (
    CASES,
    CHART,
    FULLNAME,
    deployment_cases,
    engine_pod_specs,
    one,
    render,
    settings_of,
    values_of,
)


@pytest.mark.parametrize("case", list(CASES))
def test_gpu_limits_equal_tensor_parallel_size(helm: str, case: str) -> None:
    v = values_of(case)
    gpu = v["gpu"]["resourceName"]
    for spec in engine_pod_specs(render(helm, case)):
        resources = spec["containers"][0]["resources"]
        if v["gpu"]["enabled"]:
            assert resources["limits"][gpu] == v["tensorParallelSize"]
            assert resources["requests"][gpu] == v["tensorParallelSize"]
            assert spec["tolerations"] == v["gpu"]["tolerations"]
        else:
            assert gpu not in resources.get("limits", {})
            assert "tolerations" not in spec and "affinity" not in spec


def test_a100_placement_by_default_and_overridable(helm: str) -> None:
    (spec,) = engine_pod_specs(render(helm))
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    (expr,) = terms["nodeSelectorTerms"][0]["matchExpressions"]
    assert expr["key"] == "nvidia.com/gpu.product"
    assert all("A100" in v for v in expr["values"])
    (spec,) = engine_pod_specs(render(helm, "tp4-autoscaling"))
    assert "affinity" not in spec
    assert spec["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-a100-80gb"}


@pytest.mark.parametrize("case", list(CASES))
def test_termination_grace_covers_prestop_and_drain(helm: str, case: str) -> None:
    v = values_of(case)
    drain = v["drain"]
    docs = render(helm, case)
    assert settings_of(docs).server.drain_timeout_s == drain["timeoutSeconds"]
    grace = drain["preStopSleepSeconds"] + drain["timeoutSeconds"] + drain["marginSeconds"]
    for spec in engine_pod_specs(docs):
        assert spec["terminationGracePeriodSeconds"] == grace
        command = spec["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
        if v["mode"] == "rayservice":
            script = command[-1]
            assert "ray drain-node" in script and f"--deadline-remaining-seconds {grace}" in script
            sleep = int(script.rsplit("sleep", 1)[1])
            assert sleep == drain["preStopSleepSeconds"] + drain["timeoutSeconds"] < grace
        else:
            assert command == ["sleep", str(drain["preStopSleepSeconds"])]


@pytest.mark.parametrize("case", deployment_cases())
def test_deployment_probes_point_at_health_and_ready(helm: str, case: str) -> None:
    docs = render(helm, case)
    deployment = one(docs, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    args = container["args"]
    assert container["command"] == ["codellama-serve"] and args[0] == "serve"
    assert args[args.index("--host") + 1] == "0.0.0.0"
    assert int(args[args.index("--port") + 1]) == ports["http"]
    assert args[args.index("--config") + 1] == "/etc/codellama-serve/settings.yaml"
    for probe, path in (
        ("startupProbe", "/health"),
        ("livenessProbe", "/health"),
        ("readinessProbe", "/ready"),
    ):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/etc/codellama-serve/settings.yaml"]["subPath"] == "settings.yaml"
    if deployment["spec"].get("replicas") is None:
        assert any(d["kind"] == "HorizontalPodAutoscaler" for d in docs)


@pytest.mark.parametrize("case", list(CASES))
def test_secrets_are_referenced_never_embedded(helm: str, case: str) -> None:
    v = values_of(case)
    docs = render(helm, case)
    assert not any(d["kind"] == "Secret" for d in docs)
    s = settings_of(docs)
    for spec in engine_pod_specs(docs):
        (container,) = spec["containers"]
        env = {e["name"]: e for e in container["env"]}
        volumes = {vol["name"]: vol for vol in spec["volumes"]}
        if v["hfToken"]["existingSecret"]:
            ref = env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": v["hfToken"]["existingSecret"], "key": v["hfToken"]["key"]}
        else:
            assert "HF_TOKEN" not in env
        if v["apiKeys"]["existingSecret"]:
            assert volumes["api-keys"]["secret"]["secretName"] == v["apiKeys"]["existingSecret"]
            mount = {m["name"]: m for m in container["volumeMounts"]}["api-keys"]
            assert mount["readOnly"] is True
            assert s.auth.api_keys_file == f"{mount['mountPath']}/{v['apiKeys']['key']}"
        else:
            assert "api-keys" not in volumes and s.auth.api_keys_file is None


@pytest.mark.parametrize("case", list(CASES))
def test_model_cache_volume(helm: str, case: str) -> None:
    v = values_of(case)
    cache_values = v["modelCache"]
    docs = render(helm, case)
    pvcs = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    for spec in engine_pod_specs(docs):
        (container,) = spec["containers"]
        volume = {vol["name"]: vol for vol in spec["volumes"]}["model-cache"]
        mount = {m["name"]: m for m in container["volumeMounts"]}["model-cache"]
        assert mount["mountPath"] == cache_values["mountPath"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["HF_HOME"].startswith(cache_values["mountPath"] + "/")
        assert env["CODELLAMA_SERVE_CACHE_DIR"].startswith(cache_values["mountPath"] + "/")
        kind = cache_values["type"]
        if kind == "pvc":
            claim = cache_values["pvc"]["existingClaim"] or f"{FULLNAME}-model-cache"
            assert volume["persistentVolumeClaim"]["claimName"] == claim
        elif kind == "hostPath":
            assert volume["hostPath"]["path"] == cache_values["hostPath"]["path"]
        else:
            assert "emptyDir" in volume
        shm = {vol["name"]: vol for vol in spec["volumes"]}["dshm"]
        assert shm["emptyDir"]["medium"] == "Memory"
    creates = cache_values["type"] == "pvc" and not cache_values["pvc"]["existingClaim"]
    assert len(pvcs) == int(creates)
    if creates:
        assert pvcs[0]["spec"]["resources"]["requests"]["storage"] == cache_values["pvc"]["size"]


@pytest.mark.parametrize("case", list(CASES))
def test_images_and_security_context(helm: str, case: str) -> None:
    v = values_of(case)
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    flavour = "cuda" if v["gpu"]["enabled"] else "cpu"
    expected = (
        f"{v['image']['repository']}:{v['image']['tag'] or chart['appVersion'] + '-' + flavour}"
    )
    docs = render(helm, case)
    specs = engine_pod_specs(docs) + [
        d["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
        for d in docs
        if d["kind"] == "RayService"
    ]
    for spec in specs:
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == 1000
        for container in spec["containers"]:
            assert container["image"] == expected
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
