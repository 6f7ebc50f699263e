"""What ships with the chart: its version, the packaged chart, the README's table of
every value, and NOTES.txt."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

import yaml

from .chart import CHART, FULLNAME, MONITORING_API, NAMESPACE, RELEASE, ROOT, render, run_helm


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
