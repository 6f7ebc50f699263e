"""The Grafana dashboard, the Prometheus alerts and the compose stack (deploy/observability/).

Every PromQL expression the dashboard and the alerts run is parsed, and every series it
reads must be one the server exports: the list comes from `engine.metrics.Metrics`
itself (no engine needed), so renaming a metric without the dashboard fails here.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import promql_parser
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
OBS = ROOT / "deploy" / "observability"
DASHBOARD = OBS / "grafana" / "dashboards" / "codellama-serve.json"
ALERTS = OBS / "prometheus" / "alerts.yaml"
COMPOSE = OBS / "compose.yaml"
PROMETHEUS_CONFIG = OBS / "prometheus" / "prometheus.yml"

# Labels Prometheus adds at scrape time (static configs, Prometheus operator targets).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "container", "endpoint"}
# Grafana's macros, replaced by durations so the expressions parse as PromQL.
GRAFANA_MACROS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


@cache
def exported_series() -> dict[str, frozenset[str]]:
    """Every series name the server's /metrics can show -> its label names."""
    from prometheus_client.metrics import MetricWrapperBase

    from engine.metrics import EngineGauges, Metrics

    gauges = EngineGauges(
        **{f.name: (lambda: 0.0) for f in dataclasses.fields(EngineGauges)},
    )
    # Speculative decoding on, so its series are among those a query may read.
    gauges.spec_decode = lambda: SimpleNamespace(
        drafts=0, draft_tokens=0, accepted_tokens=0, accepted_per_position=[0]
    )
    metrics = Metrics(gauges, model_name=lambda: "model")
    groups = [metrics, *(v for v in vars(metrics).values() if hasattr(v, "__dict__"))]
    for value in (v for group in groups for v in vars(group).values()):
        # A labelled metric shows its series once a child exists (groups of them too).
        if isinstance(value, MetricWrapperBase) and value._labelnames:
            value.labels(*["x"] * len(value._labelnames))
    metrics.render()
    series: dict[str, frozenset[str]] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            labels = set(sample.labels) - {"le", "quantile"}
            series[sample.name] = frozenset(series.get(sample.name, frozenset()) | labels)
    return series


def _grafana_to_promql(expr: str) -> str:
    for macro, value in GRAFANA_MACROS.items():
        expr = expr.replace(macro, value)
    return expr


def dashboard_queries() -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and query variable."""
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} {target['refId']}", _grafana_to_promql(target["expr"])
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
        assert m, f"variable {var['name']}: unexpected query {query!r}"
        yield f"variable {var['name']}", _grafana_to_promql(m.group(1))


def alert_rules() -> list[dict]:
    return [
        rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]
    ]


def alert_queries() -> Iterator[tuple[str, str]]:
    for rule in alert_rules():
        yield f"alert {rule['alert']}", rule["expr"]


def selectors(expr: str) -> tuple[list[tuple[str, set[str]]], set[str]]:
    """([(metric name, label names matched)], grouping labels) of a PromQL expression."""
    found: list[tuple[str, set[str]]] = []
    grouping: set[str] = set()

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            found.append((node.name, {m.name for m in node.matchers.matchers}))
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            grouping.update(node.modifier.labels)
        elif isinstance(node, promql_parser.BinaryExpr) and node.modifier is not None:
            matching = node.modifier.matching
            if matching is not None:
                grouping.update(matching.labels)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found, grouping


ALL_QUERIES = list(dashboard_queries()) + list(alert_queries())


def test_exported_series_are_known() -> None:
    series = exported_series()
    for name in (
        "codellama_serve_requests_total",
        "codellama_serve_time_to_first_token_seconds_bucket",
        "codellama_serve_admission_waiting_sequences",
        "codellama_serve_kv_cache_usage_ratio",
        "codellama_serve_ready",
        "process_resident_memory_bytes",
    ):
        assert name in series
    assert series["codellama_serve_requests_total"] >= {"endpoint", "status"}


@pytest.mark.parametrize("where,expr", ALL_QUERIES, ids=[w for w, _ in ALL_QUERIES])
def test_every_query_reads_exported_series(where: str, expr: str) -> None:
    series = exported_series()
    found, grouping = selectors(expr)
    assert found, f"{where}: reads no series"
    labels_seen: set[str] = set()
    for name, matched in found:
        assert name in series, f"{where}: {name} is not exported by the server"
        allowed = series[name] | TARGET_LABELS
        assert matched <= allowed, f"{where}: {name} has no label(s) {matched - allowed}"
        labels_seen |= allowed
    unknown = grouping - labels_seen - {"le"}
    assert not unknown, f"{where}: groups by label(s) {unknown} no selected series has"


def test_dashboard_shows_what_operators_need() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    by_title = {
        p["title"]: " ".join(t["expr"] for t in p.get("targets", [])) for p in dashboard["panels"]
    }
    wanted = {
        "Request rate by status": ["codellama_serve_requests_total", "by (status)"],
        "Time to first token": ["codellama_serve_time_to_first_token_seconds_bucket", "0.99"],
        "Time per output token": ["codellama_serve_time_per_output_token_seconds_bucket"],
        "End-to-end latency": ["codellama_serve_e2e_request_latency_seconds_bucket"],
        "Tokens per second": ["codellama_serve_generation_tokens_total"],
        "Queue depth": ["codellama_serve_admission_waiting_sequences"],
        "Running requests": ["codellama_serve_requests_running"],
        "KV-cache usage": ["codellama_serve_kv_cache_usage_ratio"],
        "Replicas": ["codellama_serve_ready"],
        "Refusals (429 / 503)": ["codellama_serve_requests_refused_total", '"429|503"'],
    }
    for title, needles in wanted.items():
        assert title in by_title, f"dashboard has no {title!r} panel"
        for needle in needles:
            assert needle in by_title[title], f"{title!r} does not query {needle}"


def test_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "codellama-serve"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace", "job"} <= variables
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, panel["title"]
        for target in panel["targets"]:
            # Every query filters on the dashboard's namespace and job selection.
            assert 'namespace=~"$namespace"' in target["expr"], panel["title"]
            assert 'job=~"$job"' in target["expr"], panel["title"]


def test_alerts_cover_the_failure_modes() -> None:
    rules = {r["alert"]: r for r in alert_rules()}
    wanted = {
        "CodeLlamaServeHighTimeToFirstToken": "codellama_serve_time_to_first_token_seconds_bucket",
        "CodeLlamaServeQueueGrowing": "codellama_serve_admission_waiting_sequences",
        "CodeLlamaServeKVCacheNearlyFull": "codellama_serve_kv_cache_usage_ratio",
        "CodeLlamaServeHighErrorRate": 'status=~"5.."',
        "CodeLlamaServeNoReadyReplicas": "codellama_serve_ready",
    }
    for name, needle in wanted.items():
        assert name in rules, f"missing alert {name}"
        assert needle in rules[name]["expr"], name
    for name, rule in rules.items():
        assert re.fullmatch(r"\d+[smh]", rule["for"]), name
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        # Templates in annotations only use what Prometheus offers.
        for text in rule["annotations"].values():
            for ref in re.findall(r"\{\{(.*?)\}\}", text):
                assert re.fullmatch(r"\s*\$(labels\.\w+|value)(\s*\|\s*\w+)?\s*", ref), (name, ref)


def test_prometheus_config_loads_the_alerts_and_scrapes_the_server() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    compose = yaml.safe_load(COMPOSE.read_text())
    prometheus = compose["services"]["prometheus"]
    mounts = dict(v.split(":")[:2] for v in prometheus["volumes"] if v.startswith("./"))
    assert mounts["./prometheus/alerts.yaml"] in config["rule_files"]
    assert "--config.file=" + mounts["./prometheus/prometheus.yml"] in prometheus["command"]
    (job,) = config["scrape_configs"]
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host in compose["services"], "scrape target is not a compose service"
    server = compose["services"][host]
    assert "--port" in server["command"] and port in server["command"]
    assert job.get("metrics_path", "/metrics") == "/metrics"


def test_compose_stack() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"server", "prometheus", "grafana"}
    server = services["server"]
    dockerfile = ROOT / server["build"]["dockerfile"]
    assert (COMPOSE.parent / server["build"]["context"]).resolve() == ROOT
    assert dockerfile.is_file()
    assert any(v.endswith(":/models") for v in server["volumes"]), "model cache volume"
    for name in ("prometheus", "grafana"):
        image = services[name]["image"]
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", image), f"{name}: pin a version ({image})"
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (COMPOSE.parent / source).exists(), f"{source} is missing"
            else:
                assert source in compose["volumes"], f"volume {source} is not declared"
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"publish on loopback only: {port}"
    grafana = services["grafana"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("./"))
    assert home == mounts["./grafana/dashboards"] + "/" + DASHBOARD.name
    datasources = yaml.safe_load(
        (OBS / "grafana/provisioning/datasources/prometheus.yaml").read_text()
    )
    (ds,) = datasources["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    providers = yaml.safe_load(
        (OBS / "grafana/provisioning/dashboards/codellama-serve.yaml").read_text()
    )
    assert providers["providers"][0]["options"]["path"] == mounts["./grafana/dashboards"]


def test_dashboard_has_a_row_for_priority_classes() -> None:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    (row,) = [p for p in panels if p["type"] == "row" and p["title"] == "Priority classes"]
    below = [p for p in panels if p["gridPos"]["y"] > row["gridPos"]["y"]]
    exprs = " ".join(t["expr"] for p in below for t in p["targets"])
    for series in (
        "codellama_serve_class_time_to_first_token_seconds_bucket",
        "codellama_serve_class_time_per_output_token_seconds_bucket",
        "codellama_serve_class_e2e_request_latency_seconds_bucket",
        "codellama_serve_class_waiting_sequences",
        "codellama_serve_class_requests_refused_total",
        "codellama_serve_class_preemptions_total",
    ):
        assert series in exprs, f"the priority-class row does not show {series}"
    assert all("by (le, priority_class)" in t["expr"] for p in below for t in p["targets"]
               if "histogram_quantile" in t["expr"])  # fmt: skip
