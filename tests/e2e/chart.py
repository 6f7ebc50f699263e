"""The Helm chart (helm/codellama-serve) as its tests see it: paths, the cases (the
default values and every `ci/*-values.yaml`), `helm template` rendered and cached, and
the settings, serve config and pod specs read back out of the objects.

The tests (tests/e2e/test_chart_*.py) run offline: lint, render, validate, assert.
- `helm lint --strict` and `helm template` over the default values and every
  `ci/*-values.yaml` (TP=2 on A100, TP=4 autoscaling, plain Deployment, CPU demo);
  values that must be refused are refused.
- Built-in kinds validate against Kubernetes' schemas (kubernetes-validate), the
  RayService and its cluster against KubeRay v1.7.0's CRDs (../shared/kuberay), strictly:
  a field the CRD does not know fails here instead of being pruned by the API server.
- The serve config inside the RayService is the one engine.ray_config builds from the
  same settings, and with default values it is deploy/ray/serve-config.yaml.

helm is `make helm` (.tools/helm, from a PyPI wheel), $HELM, or helm on PATH (conftest.py).
"""

from __future__ import annotations

import copy
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

from engine.config import Settings, build_settings

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


def run_helm(helm: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [helm, *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )


def template_args(
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
    out = run_helm(helm, *template_args(values, sets, api_versions))
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
