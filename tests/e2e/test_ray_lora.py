"""LoRA in cluster mode: every Ray Serve replica loads the same adapters (CPU, demo model).

Two replicas from one `--lora-modules`: both list the adapter, both answer it, and at
temperature 0 both give the same adapted text, which differs from the base model's.
"""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import ROOT, free_port

from .test_ray_serve import RayApp, _kill_session

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

ADAPTER = "demo-lora"


class RayLoRAApp(RayApp):
    def __init__(self, tmp: Path) -> None:  # RayApp's, with two fixed replicas and LoRA
        self.port = free_port()
        config = {
            "engine": {"model": "demo", "max_num_seqs": 8},
            "lora": {"enable_lora": True, "lora_modules": [f"{ADAPTER}=demo"], "max_loras": 1},
            "ray": {
                "ray_http_port": self.port, "ray_metrics_port": None,
                "min_replicas": 2, "initial_replicas": 2, "max_replicas": 2,
            },
        }  # fmt: skip
        cfg = tmp / "ray-lora.yaml"
        cfg.write_text(yaml.safe_dump(config))
        self.log_path = tmp / "ray-serve-lora.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "engine", "serve", "--ray", "--config", str(cfg)],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip


@pytest.fixture(scope="module")
def ray_lora(tmp_path_factory):
    app = RayLoRAApp(tmp_path_factory.mktemp("ray-lora"))
    try:
        app.wait_running(2, timeout=420)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(app.url + "/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, app.log()[-3000:]
            time.sleep(0.5)
        yield app
    finally:
        if app.proc.poll() is None:
            app.proc.terminate()
            try:
                app.proc.wait(90)
            except subprocess.TimeoutExpired:
                app.proc.kill()
        _kill_session(app.proc.pid)


def test_every_replica_serves_the_same_adapter(ray_lora):
    def ask(model: str) -> tuple[str, str, list[str]]:
        body = {"model": model, "prompt": "def test_add(self):\n", "max_tokens": 24,
                "temperature": 0}  # fmt: skip
        r = httpx.post(ray_lora.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        models = httpx.get(ray_lora.url + "/v1/models", timeout=10).json()["data"]
        return (r.headers["x-codellama-replica"], r.json()["choices"][0]["text"],
                [m["id"] for m in models])  # fmt: skip

    adapted: dict[str, set[str]] = {}
    with ThreadPoolExecutor(8) as pool:
        for _ in range(6):
            for replica, text, models in pool.map(ask, [ADAPTER] * 8):
                assert models == ["codellama-serve-demo", ADAPTER]
                adapted.setdefault(replica, set()).add(text)
            if len(adapted) == 2:
                break
    assert len(adapted) == 2, adapted  # both replicas answered for the adapter
    texts = set().union(*adapted.values())
    assert len(texts) == 1, adapted  # ... with the same weights
    _, base, _ = ask("codellama-serve-demo")
    assert base not in texts
