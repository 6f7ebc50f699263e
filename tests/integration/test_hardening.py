"""Production hardening against the real engine: keys, limits, queue, cancellation."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from tests.conftest import ServerProcess, serving

ALICE = "sk-alice-0123456789"
BOB = "sk-bob-limited"
BATCH, WAITING = 4, 4  # the queue bound: BATCH + WAITING sequences admitted


@pytest.fixture(scope="module")
def hardened(tmp_path_factory) -> ServerProcess:
    tmp = tmp_path_factory.mktemp("hardened")
    with serving(
        tmp,
        "--api-keys", f"{ALICE} name=alice, {BOB} name=bob rpm=3",
        "--max-num-seqs", str(BATCH), "--max-waiting-requests", str(WAITING),
        "--request-timeout-s", "4",
    ) as srv:  # fmt: skip
        yield srv


def auth(key: str = ALICE) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def wait_idle(srv: ServerProcess, within: float) -> None:
    deadline = time.monotonic() + within
    while True:
        running = srv.metric("codellama_serve_requests_running")
        waiting = srv.metric("codellama_serve_requests_waiting")
        if running == 0 and waiting == 0:
            return
        assert time.monotonic() < deadline, f"engine still busy: {running=} {waiting=}"
        time.sleep(0.05)


def test_keys(hardened):
    url = hardened.base_url + "/v1/completions"
    body = {"prompt": "x", "max_tokens": 2}
    assert httpx.post(url, json=body).status_code == 401
    assert httpx.post(url, json=body, headers=auth("sk-wrong")).status_code == 401
    r = httpx.post(url, json=body, headers=auth())
    assert r.status_code == 200, r.text
    assert httpx.get(hardened.base_url + "/health").status_code == 200  # probes stay open
    log = hardened.log()
    assert ALICE not in log and "sk-wrong" not in log
    # One JSON line per request, with the key's name and the request id we returned.
    lines = [json.loads(x) for x in log.splitlines() if x.startswith('{"ts"')]
    mine = [x for x in lines if x["request_id"] == r.headers["x-request-id"]]
    assert mine and mine[0]["key"] == "alice" and mine[0]["status"] == 200
    assert mine[0]["completion_tokens"] == 2 and "ttft_ms" in mine[0]


def test_tokenizer_endpoints_need_a_key(hardened):
    for path, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1, 2]})):
        r = httpx.post(hardened.base_url + path, json=body)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.post(hardened.base_url + path, json=body, headers=auth()).status_code == 200


def test_requests_per_minute(hardened):
    url = hardened.base_url + "/v1/completions"
    codes = [
        httpx.post(url, json={"prompt": "x", "max_tokens": 1}, headers=auth(BOB)) for _ in range(5)
    ]
    assert [r.status_code for r in codes] == [200, 200, 200, 429, 429]
    assert int(codes[3].headers["retry-after"]) >= 1
    assert codes[3].json()["error"]["code"] == "rate_limit_rpm"


async def test_burst_of_four_times_the_bound_admits_exactly_the_bound(hardened):
    bound = BATCH + WAITING
    body = {"prompt": "def f():", "max_tokens": 128, "ignore_eos": True}
    limits = httpx.Limits(max_connections=4 * bound)
    async with httpx.AsyncClient(base_url=hardened.base_url, timeout=60, limits=limits) as c:
        rs = await asyncio.gather(
            *(c.post("/v1/completions", json=body, headers=auth()) for _ in range(4 * bound))
        )
    codes = [r.status_code for r in rs]
    assert codes.count(429) == 3 * bound, codes
    admitted = [r for r in rs if r.status_code != 429]
    assert len(admitted) == bound
    assert all(r.status_code == 200 for r in admitted), [r.text for r in admitted]
    assert all(r.json()["usage"]["completion_tokens"] == 128 for r in admitted)
    assert all(r.headers["retry-after"] for r in rs if r.status_code == 429)
    wait_idle(hardened, 2)


async def test_timeout_aborts_in_the_engine(hardened):
    # A full batch of long requests: the queued half cannot even start in 4 s.
    body = {"prompt": "x", "max_tokens": 1900, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=hardened.base_url, timeout=30) as c:
        *plain, streamed = await asyncio.gather(
            *(c.post("/v1/completions", json=body, headers=auth()) for _ in range(BATCH + 3)),
            c.post("/v1/completions", json={**body, "stream": True}, headers=auth()),
        )
    timed_out = [r for r in plain if r.status_code == 504]
    assert len(timed_out) >= WAITING - 1, [r.status_code for r in plain]
    assert all(r.json()["error"]["code"] == "request_timeout" for r in timed_out)
    assert '"request_timeout"' in streamed.text and streamed.text.endswith("data: [DONE]\n\n")
    wait_idle(hardened, 2)


def test_refusals_are_counted(hardened):
    text = httpx.get(hardened.base_url + "/metrics").text
    assert 'codellama_serve_requests_refused_total{reason="queue_full"}' in text
    assert 'codellama_serve_requests_refused_total{reason="unauthorized"}' in text
    assert 'codellama_serve_requests_refused_total{reason="rate_limit_rpm"}' in text


async def test_fifty_streams_that_disconnect_leave_the_engine_idle(server):
    body = {"prompt": "def g():", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    limits = httpx.Limits(max_connections=64)

    async def read_a_little(c: httpx.AsyncClient) -> None:
        async with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            n = 0
            async for _ in r.aiter_lines():
                n += 1
                if n >= 4:
                    break  # leaving the block closes the connection mid-stream

    aborted = 'codellama_serve_requests_aborted_total{reason="client_disconnect"}'
    wasted = 'codellama_serve_aborted_generation_tokens_total{reason="client_disconnect"}'
    before = _labelled(server, aborted), _labelled(server, wasted)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=60, limits=limits) as c:
        await asyncio.gather(*(read_a_little(c) for _ in range(50)))
    started = time.monotonic()
    wait_idle(server, 2)
    print(f"engine idle {time.monotonic() - started:.2f} s after 50 disconnects")
    # Each disconnect is counted as an abort, with the tokens generated for it (each
    # client read at least one token-bearing event before it left).
    assert _labelled(server, aborted) - before[0] == 50
    assert _labelled(server, wasted) - before[1] >= 50


def _labelled(server, series: str) -> float:
    """The value of one labelled series in the server's /metrics (0 if absent)."""
    for line in httpx.get(server.base_url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[1])
    return 0.0
