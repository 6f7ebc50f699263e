"""Shared fixtures. One real server (vLLM on the demo model) per test session."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.experiments.local_servers import ServerProcess, free_port, launch, serve_command

ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 240


def start_server(tmp_dir: Path, *args: str, env: dict[str, str] | None = None) -> ServerProcess:
    """Start `codellama-serve serve` on the demo model; the caller waits and stops it."""
    port = free_port()
    return launch(
        serve_command(port, *args),
        port,
        tmp_dir / f"server-{port}.log",
        env={"PYTHONUNBUFFERED": "1", **(env or {})},
        cwd=ROOT,
        ready_timeout=STARTUP_TIMEOUT_S,
    )


@contextlib.contextmanager
def serving(
    tmp_dir: Path, *args: str, env: dict[str, str] | None = None
) -> Iterator[ServerProcess]:
    """`start_server`'s server once it is ready; stopped on the way out (ready or not)."""
    srv = start_server(tmp_dir, *args, env=env)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The session's real server: vLLM on the demo model, access log on."""
    with serving(tmp_path_factory.mktemp("server"), "--access-log") as srv:
        yield srv


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """The embedded demo model (built by `make test`'s set-up; cached)."""
    from engine.demo_model import ensure_demo_model

    return ensure_demo_model()


@pytest.fixture(scope="session")
def demo_tokenizer(demo_model_dir: Path):
    """The Hugging Face tokenizer vLLM loads for the demo model."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model_dir)


@pytest.fixture(scope="session")
def demo_sp(demo_model_dir: Path):
    """The demo model's SentencePiece model: what Meta's reference encodes with."""
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(demo_model_dir / "tokenizer.model"))


@pytest.fixture(scope="session")
def openapi_schema(server: ServerProcess):
    import schemathesis

    return schemathesis.openapi.from_url(server.base_url + "/openapi.json")
