"""The chart's LoRA values: adapters on the model volume reach every replica's settings.

`lora.enabled` and `lora.adapters` own settings lora.enable_lora and lora.lora_modules;
relative adapter paths lie under modelCache.mountPath; the settings the chart renders
are valid server settings that resolve for Ray; what the server would refuse at start
(runtime loads in Ray, adapters on an emptyDir, ...) is refused at install time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from engine.config import resolve
from engine.ray_config import serve_config

from .chart import (
    render,
    rendered_serve_config,
    rendered_settings,
    run_helm,
    settings_of,
    template_args,
)

ADAPTERS = ("lora.enabled=true", "modelCache.type=pvc")


def test_lora_is_off_by_default(helm: str) -> None:
    for case in ("default", "cpu-demo"):
        assert "lora" not in rendered_settings(render(helm, case))


def test_adapters_on_the_model_volume_reach_the_settings(helm: str) -> None:
    docs = render(
        helm, "default", *ADAPTERS,
        "lora.adapters[0].name=sql", "lora.adapters[0].path=adapters/sql-lora",
        "lora.adapters[1].name=docs", "lora.adapters[1].path=/opt/adapters/docs",
        "modelCache.mountPath=/weights/",
        "settings.lora.max_loras=2", "settings.lora.max_lora_rank=64",
    )  # fmt: skip
    lora = rendered_settings(docs)["lora"]
    assert lora == {
        "enable_lora": True,
        "lora_modules": [
            {"name": "sql", "path": "/weights/adapters/sql-lora"},  # on the model volume
            {"name": "docs", "path": "/opt/adapters/docs"},  # absolute: as given
        ],
        "max_loras": 2,
        "max_lora_rank": 64,
    }
    # The serve config is the one Python builds, and each replica resolves the same.
    settings = settings_of(docs)
    assert serve_config(settings) == rendered_serve_config(docs)
    replica = resolve(settings, gpu=True, mode="ray")
    assert [m.name for m in replica.lora.lora_modules] == ["sql", "docs"]
    assert replica.lora.max_cpu_loras == 2


def test_the_worked_example_serves_two_teams(helm: str) -> None:
    docs = render(helm, "tp2-a100")
    lora = settings_of(docs).lora
    assert lora.enable_lora and lora.max_loras == 2
    assert [m.path for m in lora.lora_modules] == [
        "/models/adapters/team-a-sql", "/models/adapters/team-b-tests",
    ]  # fmt: skip


def test_the_demo_adapter_on_cpu(helm: str) -> None:
    docs = render(
        helm, "cpu-demo", "lora.enabled=true",
        "lora.adapters[0].name=demo-lora", "lora.adapters[0].path=demo",
    )  # fmt: skip
    settings = settings_of(docs)
    assert [(m.name, m.path) for m in settings.lora.lora_modules] == [("demo-lora", "demo")]
    resolve(settings, gpu=False)  # valid on the demo model


def test_runtime_updating_in_deployment_mode(helm: str) -> None:
    docs = render(
        helm, "cpu-demo", "lora.enabled=true", "settings.lora.allow_runtime_lora_updating=true"
    )
    settings = settings_of(docs)
    assert resolve(settings, gpu=False).lora.allow_runtime_lora_updating


REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    "adapters-without-enabled": (
        {"lora": {"adapters": [{"name": "a", "path": "/a"}]}},
        "lora.adapters needs lora.enabled=true",
    ),
    "runtime-updating-without-enabled": (
        {"settings": {"lora": {"allow_runtime_lora_updating": True}}},
        "needs lora.enabled=true",
    ),
    "runtime-updating-in-ray": (
        {"lora": {"enabled": True}, "settings": {"lora": {"allow_runtime_lora_updating": True}}},
        "works in mode=deployment only",
    ),
    "relative-path-on-emptydir": (
        {"lora": {"enabled": True, "adapters": [{"name": "a", "path": "adapters/a"}]}},
        "needs modelCache.type pvc or hostPath",
    ),
    "duplicate-names": (
        {
            "lora": {"enabled": True, "adapters": [{"name": "a", "path": "/a"}] * 2},
        },
        "adapter names must be unique",
    ),
    "reserved-name": (
        {"lora": {"enabled": True, "adapters": [{"name": "base", "path": "/a"}]}},
        "/lora/adapters/0/name'",
    ),
    "bad-name": (
        {"lora": {"enabled": True, "adapters": [{"name": "a b", "path": "/a"}]}},
        "/lora/adapters/0/name'",
    ),
    "no-path": (
        {"lora": {"enabled": True, "adapters": [{"name": "a"}]}},
        "missing property 'path'",
    ),
    "setting-the-chart-owns": (
        {"settings": {"lora": {"lora_modules": ["a=/a"]}}},
        "additional properties 'lora_modules'",
    ),
    "rank-not-vllms": (
        {"lora": {"enabled": True}, "settings": {"lora": {"max_lora_rank": 12}}},
        "/settings/lora/max_lora_rank'",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_invalid_lora_values_fail(helm: str, case: str, tmp_path: Path) -> None:
    values, message = REFUSED[case]
    file = tmp_path / f"{case}-values.yaml"
    file.write_text(yaml.safe_dump(values))
    out = run_helm(helm, *template_args(file, (), ()))
    assert out.returncode != 0, f"{case}: rendered:\n{out.stdout[:500]}"
    assert message in out.stderr, out.stderr
