"""The alert rules through Prometheus's own tool: `promtool check rules` and the unit tests
of deploy/observability/prometheus/alerts.test.yaml (each alert firing, and not firing, on
synthetic series). promtool is Debian's `prometheus` package, installed by `make setup`.

    promtool check rules deploy/observability/prometheus/alerts.yaml
    promtool test rules deploy/observability/prometheus/alerts.test.yaml
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "observability" / "prometheus"
ALERTS = RULES / "alerts.yaml"
ALERT_TESTS = RULES / "alerts.test.yaml"
CHART_ALERTS = ROOT / "helm" / "codellama-serve" / "files" / "alerts.yaml"
PROMETHEUS_CONFIG = RULES / "prometheus.yml"


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    assert found, "no `promtool` on PATH: `make setup` installs Debian's prometheus package"
    return found


def _run(*args: str | Path, cwd: Path = RULES) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True)


@pytest.mark.parametrize("path", [ALERTS, CHART_ALERTS], ids=["deploy", "chart"])
def test_promtool_checks_the_rules(promtool: str, path: Path) -> None:
    r = _run(promtool, "check", "rules", path)
    assert r.returncode == 0, r.stdout + r.stderr
    n = sum(len(g["rules"]) for g in yaml.safe_load(path.read_text())["groups"])
    assert f"SUCCESS: {n} rules found" in r.stdout


def test_promtool_unit_tests_pass(promtool: str) -> None:
    r = _run(promtool, "test", "rules", ALERT_TESTS.name)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    alerts = {r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    suite = yaml.safe_load(ALERT_TESTS.read_text())
    assert suite["rule_files"] == [ALERTS.name]
    fires: set[str] = set()
    quiet: set[str] = set()
    for test in suite["tests"]:
        for case in test.get("alert_rule_test", []):
            (fires if case["exp_alerts"] else quiet).add(case["alertname"])
    assert alerts - fires == set(), f"no test makes these alerts fire: {alerts - fires}"
    assert alerts - quiet == set(), f"no test shows these alerts quiet: {alerts - quiet}"
    assert fires | quiet <= alerts, f"tests for unknown alerts: {(fires | quiet) - alerts}"


def test_unit_tests_fail_when_a_rule_changes(promtool: str, tmp_path: Path) -> None:
    """The suite can fail: with every threshold raised tenfold, the firing cases fail."""
    text = ALERTS.read_text()
    raised = text.replace("> 5\n", "> 50\n").replace("> 0.95", "> 9.5").replace("> 0.05", "> 0.5")
    assert raised != text
    (tmp_path / ALERTS.name).write_text(raised)
    shutil.copy(ALERT_TESTS, tmp_path / ALERT_TESTS.name)
    r = _run(promtool, "test", "rules", ALERT_TESTS.name, cwd=tmp_path)
    assert r.returncode != 0
    for name in ("HighTimeToFirstToken", "KVCacheNearlyFull", "HighErrorRate"):
        assert f"alertname: CodeLlamaServe{name}" in r.stdout + r.stderr, name


def test_promtool_checks_the_compose_prometheus_config(promtool: str, tmp_path: Path) -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    # In compose the rules are mounted at /etc/prometheus/alerts.yaml.
    assert config["rule_files"] == ["/etc/prometheus/alerts.yaml"]
    config["rule_files"] = [str(ALERTS)]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    r = _run(promtool, "check", "config", tmp_path / "prometheus.yml", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
