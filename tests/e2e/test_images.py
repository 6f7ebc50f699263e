"""The container images (deploy/docker/), checked without a Docker engine.

Dockerfiles are parsed with BuildKit's own parser (the `dockerfile` package). The CPU
image installs through the Makefile's install recipe, the one CI runs, and
`make -n` shows that the two differ only in the extras. The CUDA image pins vLLM's
image at the version the `gpu` extra pins, and it pins Ray at the chart's rayVersion.
Both images run as the uid the chart runs them as.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import dockerfile
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
CPU = DOCKER / "Dockerfile.cpu"
CUDA = DOCKER / "Dockerfile.cuda"
CHART_VALUES = ROOT / "helm" / "codellama-serve" / "values.yaml"
IMAGES = [CPU, CUDA]


def parse(path: Path) -> list[dockerfile.Command]:
    return list(dockerfile.parse_file(str(path)))


def instructions(path: Path, cmd: str) -> list[dockerfile.Command]:
    return [c for c in parse(path) if c.cmd == cmd.upper()]


def build_args(path: Path) -> dict[str, str]:
    args = {}
    for c in instructions(path, "ARG"):
        name, _, default = c.value[0].partition("=")
        args[name] = default
    return args


def env(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for c in instructions(path, "ENV"):
        pairs = list(c.value)
        out.update(zip(pairs[::2], pairs[1::2], strict=True))
    return out


def base_image(path: Path) -> str:
    (from_,) = instructions(path, "FROM")
    image = from_.value[0]
    m = re.fullmatch(r"\$\{?(\w+)\}?", image)
    return build_args(path)[m.group(1)] if m else image


def run_commands(path: Path) -> list[str]:
    return [" ".join(c.value) for c in instructions(path, "RUN")]


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


@pytest.mark.parametrize("path", IMAGES, ids=lambda p: p.name)
def test_base_image_is_pinned(path: Path) -> None:
    image = base_image(path)
    assert "@sha256:" in image or re.search(r":v?\d+\.\d+\.\d+", image), image
    assert not image.endswith(":latest")


@pytest.mark.parametrize("path", IMAGES, ids=lambda p: p.name)
def test_runs_as_the_non_root_uid_the_chart_uses(path: Path) -> None:
    users = instructions(path, "USER")
    assert users, "no USER"
    uid = users[-1].value[0]
    assert uid not in ("root", "0")
    chart = yaml.safe_load(CHART_VALUES.read_text())
    assert int(uid) == chart["podSecurityContext"]["runAsUser"]
    # Everything after the last USER runs unprivileged: no package installs there.
    after = parse(path)[parse(path).index(users[-1]) :]
    assert not any("apt-get" in " ".join(c.value) for c in after if c.cmd == "RUN")


@pytest.mark.parametrize("path", IMAGES, ids=lambda p: p.name)
def test_health_check_hits_health(path: Path) -> None:
    (check,) = instructions(path, "HEALTHCHECK")
    assert check.value[0] == "CMD"
    command = " ".join(check.value[1:])
    (port,) = instructions(path, "EXPOSE")[0].value
    assert f"127.0.0.1:{port}/health" in command
    assert any(f.startswith("--start-period=") for f in check.flags)
    cmd = instructions(path, "CMD")[-1]
    assert cmd.json and list(cmd.value) == ["serve", "--host", "0.0.0.0", "--port", port]
    (entrypoint,) = instructions(path, "ENTRYPOINT")
    assert entrypoint.json and list(entrypoint.value) == ["codellama-serve"]


@pytest.mark.parametrize("path", IMAGES, ids=lambda p: p.name)
def test_model_cache_is_a_volume_the_chart_mounts(path: Path) -> None:
    (volume,) = instructions(path, "VOLUME")
    chart = yaml.safe_load(CHART_VALUES.read_text())
    mount = chart["modelCache"]["mountPath"]
    assert list(volume.value) == [mount]
    variables = env(path)
    assert variables["HF_HOME"].startswith(mount + "/")
    assert variables["CODELLAMA_SERVE_CACHE_DIR"].startswith(mount + "/")


@pytest.mark.parametrize("path", IMAGES, ids=lambda p: p.name)
def test_kuberay_probe_tools_are_installed(path: Path) -> None:
    # KubeRay's injected probes run wget (and its pod command runs bash).
    installs = " ".join(c for c in run_commands(path) if "apt-get install" in c)
    assert re.search(r"\bwget\b", installs)


@pytest.mark.parametrize("path", IMAGES, ids=lambda p: p.name)
def test_dockerignore_keeps_the_context_small(path: Path) -> None:
    ignore = path.with_name(path.name + ".dockerignore").read_text().split()
    assert ignore[ignore.index("**")] == "**", "ignore everything, then allow what is copied"
    for c in instructions(path, "COPY"):
        for source in c.value[:-1]:
            assert f"!{source}" in ignore or f"!{source}/**" in ignore, source
            assert (ROOT / source).exists(), source


def _make_dry_run(venv: str, extras: str) -> list[str]:
    """The commands `make $(STAMP)` would run for a venv and extras, without running them."""
    stamp = f"{venv}/.installed"
    variables = [f"VENV={venv}", f"EXTRAS={extras}", "PYTHON=python3", "HAS_GPU="]
    out = subprocess.run(
        ["make", "-n", "-B", stamp, *variables],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return [line for line in out.stdout.splitlines() if line.strip()]


def test_cpu_image_installs_with_the_makefile_recipe_ci_uses() -> None:
    runs = [c for c in run_commands(CPU) if c.startswith("make ")]
    assert len(runs) == 1, "the CPU image installs with one `make` of the install recipe"
    args = shlex.split(runs[0])
    target = args[1]
    variables = dict(a.split("=", 1) for a in args[2:])
    venv, extras = variables["VENV"], variables["EXTRAS"]
    assert target == f"{venv}/.installed", "the target is the Makefile's $(STAMP)"
    assert set(extras.split(",")) == {"cpu", "ray"}
    assert env(CPU)["PATH"].startswith(f"{venv}/bin:")
    image = _make_dry_run(venv, extras)
    ci = _make_dry_run(".venv", "cpu,ray,bench,dev")
    # The same recipe: identical commands once venv and extras are put back.
    normalise = [line.replace(venv, ".venv").replace(extras, "EXTRAS") for line in image]
    assert normalise == [line.replace("cpu,ray,bench,dev", "EXTRAS") for line in ci]
    assert any(f'pip install --quiet -e ".[{extras}]"' in line for line in image)
    assert any(
        "pip uninstall --quiet -y torchvision torchaudio torchcodec" in line for line in image
    )
    copied = [src for c in instructions(CPU, "COPY") for src in c.value[:-1]]
    assert {"pyproject.toml", "Makefile"} <= set(copied)


def test_cpu_image_builds_the_demo_model_into_the_cache() -> None:
    commands = parse(CPU)
    demo = [c for c in commands if c.cmd == "RUN" and "codellama-serve demo-model" in c.value[0]]
    assert demo, "the demo model is built at image build time"
    (volume,) = instructions(CPU, "VOLUME")
    user = instructions(CPU, "USER")[-1]
    # Built as the runtime user, before the cache becomes a volume, so a new named volume
    # starts with it.
    assert commands.index(user) < commands.index(demo[0]) < commands.index(volume)


def test_cuda_image_pins_vllm_and_ray_to_the_project_and_chart() -> None:
    image = base_image(CUDA)
    (vllm_pin,) = [d for d in project()["optional-dependencies"]["gpu"] if d.startswith("vllm")]
    version = vllm_pin.split("==")[1]
    assert re.fullmatch(rf"vllm/vllm-openai:v{re.escape(version)}(@sha256:[0-9a-f]{{64}})?", image)
    ray_version = build_args(CUDA)["RAY_VERSION"]
    chart = yaml.safe_load(CHART_VALUES.read_text())
    assert ray_version == chart["rayVersion"]
    (install,) = [c for c in run_commands(CUDA) if "pip install" in c]
    assert '".[gpu,ray]"' in install
    assert '"ray[serve]==${RAY_VERSION}"' in install
