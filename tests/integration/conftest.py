"""Real servers (vLLM on the demo model) shared by several integration modules:

- the operations server, for the tracing, slow-client, idle-connection and per-key-limit
  tests, with the settings they exercise: API keys with limits, OTLP traces to a receiver
  in the test process, a short stream write timeout and a small socket send buffer;
- the engine-features server, for test_speculative and test_structured_outputs: n-gram
  speculation and xgrammar structured outputs on one engine (a combination users run;
  neither changes an unconstrained request's greedy output), one engine start for both.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.conftest import ServerProcess, serving
from tests.otlp_receiver import OTLPReceiver

OPS_KEY = "sk-ops-unlimited-0123456789"
BURST_KEY = "sk-burst-rpm-10"  # rpm=10
TPM_KEY = "sk-tokens-tpm-1000"  # tpm=1000
TPM = 1000
WRITE_TIMEOUT_S = 2.0
SEND_BUFFER_BYTES = 16384
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
         "prompt_lookup_min": 2}  # fmt: skip
# Compact JSON: otherwise the demo model fills the space between JSON tokens with
# whitespace until max_tokens.
STRUCTURED = {"backend": "xgrammar", "disable_any_whitespace": True}


@dataclass
class OpsServer:
    server: ServerProcess
    receiver: OTLPReceiver

    @property
    def base_url(self) -> str:
        return self.server.base_url


def auth(key: str = OPS_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="session")
def otlp_receiver() -> Iterator[OTLPReceiver]:
    receiver = OTLPReceiver()
    try:
        yield receiver
    finally:
        receiver.close()


@pytest.fixture(scope="session")
def ops(
    tmp_path_factory: pytest.TempPathFactory, otlp_receiver: OTLPReceiver
) -> Iterator[OpsServer]:
    tmp = tmp_path_factory.mktemp("ops")
    keys = tmp / "keys"
    keys.write_text(
        f"{OPS_KEY} name=ops\n{BURST_KEY} name=burst rpm=10\n{TPM_KEY} name=tokens tpm={TPM}\n"
    )
    with serving(
        tmp,
        "--api-keys-file", str(keys), "--access-log",
        "--otlp-traces-endpoint", otlp_receiver.endpoint,
        "--stream-write-timeout-s", str(WRITE_TIMEOUT_S),
        "--socket-send-buffer-bytes", str(SEND_BUFFER_BYTES),
        env={
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
            "OTEL_BSP_SCHEDULE_DELAY": "200",  # ms: spans reach the receiver quickly
        },
    ) as srv:  # fmt: skip
        yield OpsServer(srv, otlp_receiver)


@pytest.fixture(scope="session")
def engine_features(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with serving(
        tmp_path_factory.mktemp("engine-features"),
        "--speculative-config", json.dumps(NGRAM),
        "--structured-outputs-config", json.dumps(STRUCTURED),
    ) as srv:  # fmt: skip
        yield srv
