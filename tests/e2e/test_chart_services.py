"""Traffic, scaling and monitoring objects: the HPA, Services, Ingress and PDB, the
metrics Service and ServiceMonitor, the PrometheusRule and the Grafana dashboard."""

from __future__ import annotations

import json

import pytest
import yaml

from .chart import (
    CASES,
    CHART,
    FULLNAME,
    OBS,
    deployment_cases,
    engine_pod_specs,
    kinds,
    one,
    render,
    settings_of,
    values_of,
)
from .test_observability import exported_series


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
