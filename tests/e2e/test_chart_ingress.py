"""The RayService's ingress (rayService.ingress): every Ray pod gets the environment
Ray reads for it, the same engine.ray_config.ingress_env builds from the settings;
HAProxy keeps the serve port, Service and KubeRay's probes of the Python proxy."""

from __future__ import annotations

import pytest

from engine.ray_config import ingress_env

from .chart import one, ray_cases, render, settings_of

INGRESS_VARS = {"RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY"}


def ray_containers(docs: list[dict]) -> list[dict]:
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    specs = [cluster["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in cluster["workerGroupSpecs"]
    ]
    return [c for spec in specs for c in spec["containers"]]


def ingress_vars(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if e["name"] in INGRESS_VARS}


@pytest.mark.parametrize("case", ray_cases())
@pytest.mark.parametrize(
    "sets",
    [
        (),
        ("rayService.ingress=proxy",),
        ("settings.routing.ray_router=default",),
        ("settings.routing.ray_router=ray_prefix",),
    ],
)
def test_every_ray_pod_gets_the_ingress_env_of_its_settings(helm, case, sets):
    docs = render(helm, case, *sets)
    expected = ingress_env(settings_of(docs))
    containers = ray_containers(docs)
    assert len(containers) >= 2  # head and workers alike: the controller reads it too
    for container in containers:
        assert ingress_vars(container) == expected, container["name"]


def test_haproxy_is_the_default_and_owns_its_setting(helm):
    docs = render(helm)
    s = settings_of(docs)
    assert s.routing.ray_ingress == "haproxy" and s.routing.ray_router == "codellama"
    for container in ray_containers(docs):
        assert ingress_vars(container) == {
            "RAY_SERVE_ENABLE_HA_PROXY": "1",
            "RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY": "1",
        }
    assert settings_of(render(helm, "default", "rayService.ingress=proxy")).routing.ray_ingress == (
        "proxy"
    )


@pytest.mark.parametrize("ingress", ["haproxy", "proxy"])
def test_either_ingress_serves_on_the_serve_port_with_kuberays_probes(helm, ingress):
    """HAProxy binds the port the Python proxy did and answers its /-/healthz, so the
    serve Service, its target port and KubeRay's injected probes stay as they are."""
    docs = render(helm, "default", f"rayService.ingress={ingress}")
    service = one(docs, "RayService")["spec"]["serveService"]["spec"]
    (port,) = service["ports"]
    assert port["port"] == port["targetPort"] == 8000
    for container in ray_containers(docs):
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["serve"] == 8000
        assert not {"livenessProbe", "readinessProbe"} & set(container)


def test_unknown_ingress_is_refused(helm):
    from .chart import CHART, run_helm

    out = run_helm(helm, "template", "x", CHART, "--set", "rayService.ingress=nginx")
    assert out.returncode != 0 and "ingress" in out.stderr
