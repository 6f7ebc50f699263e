"""The chart validates: `helm lint --strict`, Kubernetes' schemas for the built-in kinds,
KubeRay's CRDs (strict: no field the API server would prune) for the RayService and its
cluster, and values the schema must refuse are refused."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from .chart import (
    CASES,
    CHART,
    K8S_VERSIONS,
    KUBERAY,
    NAMESPACE,
    one,
    ray_cases,
    render,
    run_helm,
    template_args,
)


@pytest.mark.parametrize("case", list(CASES))
def test_helm_lint_strict(helm: str, case: str) -> None:
    args: list[str | Path] = ["lint", "--strict", CHART]
    if CASES[case] is not None:
        args += ["-f", CASES[case]]
    out = run_helm(helm, *args)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("case", list(CASES))
def test_builtin_kinds_validate_against_kubernetes(helm: str, case: str, version: str) -> None:
    docs = render(helm, case)
    checked = 0
    for doc in docs:
        if doc["apiVersion"].split("/")[0] in ("ray.io", "monitoring.coreos.com"):
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(map(str, e.path))
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} at {path}: {e.message}")
        checked += 1
    assert checked >= 3


# --- KubeRay's CRDs --------------------------------------------------------------------


def _crd_schema(file: str, version: str = "v1") -> dict[str, Any]:
    path = KUBERAY / file
    if not path.is_file():
        pytest.skip(f"KubeRay CRDs not found at {KUBERAY} (the shared/ dir beside the repo)")
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (schema,) = [
        v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v["name"] == version
    ]
    return _strict(schema)


def _strict(node: Any) -> Any:
    """The API server prunes fields a structural schema does not name: reject them here."""
    if isinstance(node, dict):
        out = {k: _strict(v) for k, v in node.items()}
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


@cache
def _validator(file: str) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(_crd_schema(file))


def _crd_errors(file: str, doc: dict[str, Any]) -> list[str]:
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in _validator(file).iter_errors(doc)
    ]


@pytest.mark.parametrize("case", ray_cases())
def test_rayservice_validates_against_kuberay_crd(helm: str, case: str) -> None:
    service = one(render(helm, case), "RayService")
    assert service["apiVersion"] == "ray.io/v1"
    assert _crd_errors("ray.io_rayservices.yaml", service) == []


@pytest.mark.parametrize("case", ray_cases())
def test_ray_cluster_validates_against_kuberay_raycluster_crd(helm: str, case: str) -> None:
    service = one(render(helm, case), "RayService")
    cluster = {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": service["metadata"]["name"], "namespace": NAMESPACE},
        "spec": service["spec"]["rayClusterConfig"],
    }
    assert _crd_errors("ray.io_rayclusters.yaml", cluster) == []


def test_crd_validation_is_strict(helm: str) -> None:
    service = one(render(helm), "RayService")
    service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplica"] = 1
    service["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    errors = _crd_errors("ray.io_rayservices.yaml", service)
    assert any("'minReplica' was unexpected" in e for e in errors), errors
    assert any("rayStartParams.num-cpus" in e for e in errors), errors


# --- values that must be refused ---------------------------------------------------------

# Values files that must not render: (values, what helm's error must say).
INVALID: dict[str, tuple[dict[str, Any], str]] = {
    "unknown-top-level-key": (
        {"tensorParalelSize": 2},
        "additional properties 'tensorParalelSize'",
    ),
    "unknown-nested-key": ({"gpu": {"enabld": False}}, "additional properties 'enabld'"),
    "wrong-type": ({"tensorParallelSize": "2"}, "/tensorParallelSize': got string, want integer"),
    "tp-zero": ({"tensorParallelSize": 0}, "/tensorParallelSize': minimum"),
    "mode-enum": ({"mode": "statefulset"}, "/mode'"),
    "cache-type-enum": ({"modelCache": {"type": "nfs"}}, "/modelCache/type'"),
    "unknown-setting": (
        {"settings": {"engine": {"max_num_sqs": 8}}},
        "additional properties 'max_num_sqs'",
    ),
    "unknown-settings-section": ({"settings": {"vllm": {"x": 1}}}, "additional properties 'vllm'"),
    "setting-wrong-type": (
        {"settings": {"engine": {"max_num_seqs": "lots"}}},
        "/settings/engine/max_num_seqs'",
    ),
    "setting-out-of-range": (
        {"settings": {"engine": {"gpu_memory_utilization": 1.5}}},
        "/settings/engine/gpu_memory_utilization': maximum",
    ),
    "setting-enum": ({"settings": {"engine": {"dtype": "fp8"}}}, "/settings/engine/dtype'"),
    "setting-the-chart-owns": (
        {"settings": {"engine": {"tensor_parallel_size": 2}}},
        "additional properties 'tensor_parallel_size'",
    ),
    "api-keys-in-values": (
        {"settings": {"auth": {"api_keys": "secret"}}},
        "additional properties 'api_keys'",
    ),
    "min-above-max": (
        {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}},
        "minReplicas (5) > ",
    ),
    "deployment-scale-to-zero": (
        {"mode": "deployment", "autoscaling": {"minReplicas": 0}},
        "cannot scale to zero",
    ),
    "initial-out-of-bounds": (
        {"settings": {"ray": {"initial_replicas": 9}}},
        "initial_replicas (9)",
    ),
    "monitoring-enum": (
        {"metrics": {"serviceMonitor": {"enabled": "maybe"}}},
        "/metrics/serviceMonitor/enabled'",
    ),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_values_fail(helm: str, case: str, tmp_path: Path) -> None:
    values, message = INVALID[case]
    file = tmp_path / f"{case}-values.yaml"
    file.write_text(yaml.safe_dump(values))
    out = run_helm(helm, *template_args(file, (), ()))
    assert out.returncode != 0, f"{case}: rendered:\n{out.stdout[:500]}"
    assert message in out.stderr, out.stderr


def test_invalid_values_file_fails_lint(helm: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad-values.yaml"
    bad.write_text("tensorParallelSize: '2'\nautoscaling:\n  maxReplicas: -1\n")
    out = run_helm(helm, "lint", "--strict", CHART, "-f", bad)
    assert out.returncode != 0
    assert "/tensorParallelSize" in out.stdout + out.stderr
