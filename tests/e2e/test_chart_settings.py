"""The chart's settings reach the replicas: the serve config is the one Python builds,
both modes get the same settings, values and ports follow engine/config.py, and the
settings schema of values.schema.json is generated from it."""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from typing import Any

import pytest
import yaml

from engine.config import RayConfig
from engine.ray_config import IMPORT_PATH, serve_config

from .chart import (
    CASES,
    CHART,
    FULLNAME,
    ROOT,
    SERVE_CONFIG_FILE,
    deployment_cases,
    engine_pod_specs,
    one,
    ray_cases,
    render,
    rendered_serve_config,
    rendered_settings,
    settings_of,
    values_of,
)


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


# --- the settings schema -----------------------------------------------------------------


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
