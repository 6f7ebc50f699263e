"""Cluster mode with two fixed replicas on a local Ray instance (CPU, demo model), through
`codellama-serve serve --ray` with its defaults (HAProxy ingress, engine.ray_router's
CodeLlamaRouter), one application for the module:

- both replicas answer, streaming included; errors and metrics behave as standalone;
- routing: FIM requests of one file and a session's requests stay on one replica, a busy
  replica stops receiving the session's traffic, and the router's decisions are Ray metrics;
- LoRA: every replica loads the same adapter from one `lora_modules`.

The replica count is fixed: the routing tests need both replicas whatever the machine's
pace. Autoscaling has its own application (test_ray_autoscaling.py).
"""

from __future__ import annotations

import asyncio
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from .ray_app import serving

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

ADAPTER = "demo-lora"


@pytest.fixture(scope="module")
def ray_app(tmp_path_factory):
    config = {
        "engine": {"model": "demo", "max_num_seqs": 8},
        "lora": {"enable_lora": True, "lora_modules": [f"{ADAPTER}=demo"], "max_loras": 1},
        "ray": {"min_replicas": 2, "initial_replicas": 2, "max_replicas": 2},
    }
    with serving(tmp_path_factory.mktemp("ray"), config, replicas=2) as app:
        yield app


def test_both_replicas_answer_through_the_openai_client(ray_app):
    client = openai.OpenAI(base_url=ray_app.url + "/v1", api_key="unused", max_retries=0)

    def plain(_: int) -> str:
        raw = client.completions.with_raw_response.create(
            model="codellama-serve-demo", prompt="def f():", max_tokens=32, temperature=0
        )
        assert raw.parse().choices[0].text
        return raw.headers["x-codellama-replica"]

    def streamed(_: int) -> str:
        with client.chat.completions.with_streaming_response.create(
            model="codellama-serve-demo", messages=[{"role": "user", "content": "hi"}],
            max_tokens=32, stream=True,
        ) as stream:  # fmt: skip
            chunks = list(stream.parse())
            assert chunks[0].choices[0].delta.role == "assistant"
            return stream.headers["x-codellama-replica"]

    # Concurrent requests: Ray's router spreads load, not a sequence of idle calls.
    seen_plain, seen_stream = set(), set()
    with ThreadPoolExecutor(8) as pool:
        for _ in range(5):
            seen_plain.update(pool.map(plain, range(8)))
            seen_stream.update(pool.map(streamed, range(8)))
            if len(seen_plain) == 2 and len(seen_stream) == 2:
                break
    assert len(seen_plain) == 2 and len(seen_stream) == 2, (seen_plain, seen_stream)


def test_errors_and_metrics_behave_as_standalone(ray_app):
    r = httpx.post(ray_app.url + "/v1/completions", json={"prompt": "x", "max_tokens": 99999})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "codellama_serve_requests_total" in httpx.get(ray_app.url + "/metrics").text


# --- routing (the default: HAProxy ingress, engine.ray_router.CodeLlamaRouter) -------------

SOURCE = Path(__file__).read_text()  # a file to "edit": far longer than one 128-token block


def _replica(url: str, body: dict, headers: dict | None = None) -> str:
    r = httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    return r.headers["x-codellama-replica"]


def test_fim_requests_of_one_file_stay_on_one_replica(ray_app):
    """Keystrokes down one file: each request's prefix extends the last one's, so
    they share their leading blocks and go where those blocks are cached."""

    def keystroke(cursor: int) -> dict:
        return {"prompt": SOURCE[:cursor], "suffix": SOURCE[cursor : cursor + 300], "max_tokens": 4}

    seen = {_replica(ray_app.url, keystroke(cursor)) for cursor in range(2500, 3700, 100)}
    assert len(seen) == 1, seen


def test_sessions_stay_on_one_replica(ray_app):
    body = {"prompt": "def f():", "max_tokens": 4}
    for session in ("s1", "s2", "s3"):
        header = {_replica(ray_app.url, body, {"X-Session-Id": session}) for _ in range(6)}
        assert len(header) == 1, (session, header)
    for user in ("u1", "u2"):
        assert len({_replica(ray_app.url, {**body, "user": user}) for _ in range(6)}) == 1


BURST = 12  # one session's streams, 0.3 s apart


async def _hold_stream(client: httpx.AsyncClient, n: int, seen: dict[int, str],
                       all_seen: asyncio.Event, stop: asyncio.Event) -> None:  # fmt: skip
    # Never read, so each stays ongoing on its replica until the test closes it: its
    # events (1,500 tokens with 5 logprobs each, about 1 MB) outgrow what the client's
    # small receive buffer, HAProxy and the replica's socket hold, and the replica's
    # writes wait. (Streams read to their end overlapped only by luck: on this 2-core
    # machine a client reading them, or building an SSL context per stream, starved
    # its own event loop for seconds, and the burst went out one request per stream.)
    body = {"prompt": "def busy():", "max_tokens": 1500, "ignore_eos": True, "stream": True,
            "logprobs": 5}  # fmt: skip
    headers = {"X-Session-Id": "hot"}
    async with client.stream("POST", "/v1/completions", json=body, headers=headers) as r:
        seen[n] = r.headers["x-codellama-replica"]
        if len(seen) == BURST:
            all_seen.set()
        await stop.wait()


async def test_a_busy_replica_stops_receiving_the_sessions_traffic(ray_app):
    """One session opening many long streams: affinity keeps it on its replica only
    while that replica is at most routing_max_imbalance (4) requests ahead of the other."""
    seen: dict[int, str] = {}  # by the order sent
    all_seen, stop = asyncio.Event(), asyncio.Event()
    streams = []
    small_buffer = [(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)]
    transport = httpx.AsyncHTTPTransport(socket_options=small_buffer)
    async with httpx.AsyncClient(base_url=ray_app.url, timeout=120, transport=transport) as client:
        try:
            for n in range(BURST):
                streams.append(asyncio.create_task(_hold_stream(client, n, seen, all_seen, stop)))
                await asyncio.sleep(0.3)  # each one in flight before the next is routed
            await asyncio.wait_for(all_seen.wait(), 60)
        finally:
            stop.set()
            await asyncio.gather(*streams, return_exceptions=True)
    replicas = [seen[n] for n in range(BURST)]
    assert len(set(replicas)) == 2, replicas
    assert replicas[:5] == [replicas[0]] * 5, replicas  # affinity first, within the bound


def _ray_metrics() -> str:
    """Ray's metrics endpoint of this machine's node (the fixture's Ray: the lock holds
    off any other)."""
    (port_file,) = Path("/tmp/ray/session_latest").glob("metrics_export_port_*")
    return httpx.get(f"http://127.0.0.1:{port_file.read_text().strip()}/metrics", timeout=10).text


def test_router_decisions_are_ray_metrics(ray_app):
    """The router runs in Ray's ingress router replica: its decisions are exported by
    Ray's metrics agent (with Ray's `ray_` prefix), by reason and load-guard override."""
    deadline = time.monotonic() + 60
    while True:
        text = _ray_metrics()
        series = [
            line for line in text.splitlines()
            if line.startswith("ray_codellama_serve_router_decisions_total{")
        ]  # fmt: skip
        reasons = {
            r for r in ("prefix", "session", "balance") if any(f'reason="{r}"' in s for s in series)
        }
        guarded = any('guard="session"' in s for s in series)
        # Ray's metrics agent exports every few seconds: the busy test's override
        # (just before) may not be out yet.
        if (len(reasons) == 3 and guarded) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert reasons == {"prefix", "session", "balance"}, series
    assert guarded, series  # the busy replica's override


def test_every_replica_serves_the_same_adapter(ray_app):
    def ask(model: str) -> tuple[str, str, list[str]]:
        body = {"model": model, "prompt": "def test_add(self):\n", "max_tokens": 24,
                "temperature": 0}  # fmt: skip
        r = httpx.post(ray_app.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        models = httpx.get(ray_app.url + "/v1/models", timeout=10).json()["data"]
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
