"""`make setup`'s prometheus step fails, with a message, where Prometheus is missing and
cannot be installed, so the Prometheus tests never go missing silently. Run with a PATH
that holds only fakes: nothing is installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAKE = shutil.which("make")

pytestmark = pytest.mark.skipif(MAKE is None, reason="no make (the set-up itself needs it)")


def _make_prometheus(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(MAKE), "--no-print-directory", "-C", str(ROOT), "prometheus"],
        env={"PATH": str(path)}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def _fake(directory: Path, name: str, script: str) -> None:
    exe = directory / name
    exe.write_text(f"#!/bin/sh\n{script}\n")
    exe.chmod(0o755)


def test_no_prometheus_and_no_apt_get_fails_setup(tmp_path: Path) -> None:
    r = _make_prometheus(tmp_path)
    assert r.returncode != 0
    assert "no apt-get here; install Prometheus" in r.stderr, r.stderr


def test_a_prometheus_that_does_not_run_fails_setup(tmp_path: Path) -> None:
    for name in ("prometheus", "promtool"):
        _fake(tmp_path, name, "exit 1")
    r = _make_prometheus(tmp_path)
    assert r.returncode != 0
    assert "prometheus/promtool are on PATH but do not run" in r.stderr, r.stderr


def test_a_working_prometheus_passes_without_installing(tmp_path: Path) -> None:
    for name in ("prometheus", "promtool"):
        _fake(tmp_path, name, "exit 0")
    _fake(tmp_path, "apt-get", "echo apt-get must not run >&2; exit 1")
    r = _make_prometheus(tmp_path)
    assert r.returncode == 0, r.stderr
    assert "installing" not in r.stdout
