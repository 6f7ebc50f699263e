"""Per-key limits under concurrency, against the real server: a burst of 100 concurrent
requests from a key with rpm=10 admits exactly 10; the tokens-per-minute budget is charged
the completion tokens of a stream the client left early."""

from __future__ import annotations

import asyncio
import json
import time

import httpx

from tests.integration.conftest import BURST_KEY, TPM, TPM_KEY, auth


async def test_a_burst_from_a_key_with_rpm_10_admits_exactly_10(ops):
    refused = 'codellama_serve_requests_refused_total{reason="rate_limit_rpm"}'
    before = _labelled(ops.base_url, refused)
    body = {"prompt": "def f():", "max_tokens": 8}
    limits = httpx.Limits(max_connections=100)
    async with httpx.AsyncClient(base_url=ops.base_url, timeout=60, limits=limits) as c:
        started = time.monotonic()
        rs = await asyncio.gather(
            *(c.post("/v1/completions", json=body, headers=auth(BURST_KEY)) for _ in range(100))
        )
        took = time.monotonic() - started
    codes = [r.status_code for r in rs]
    print(f"\n100 concurrent requests from an rpm=10 key in {took:.2f} s: "
          f"{codes.count(200)} admitted, {codes.count(429)} refused")  # fmt: skip
    assert took < 6, "the burst took longer than one request's refill (60 s / 10)"
    assert codes.count(200) == 10 and codes.count(429) == 90, codes
    for r in rs:
        if r.status_code == 429:
            assert (
                r.json()["error"]["code"] == "rate_limit_rpm" and int(r.headers["retry-after"]) >= 1
            )
    assert _labelled(ops.base_url, refused) - before == 90


async def test_tokens_per_minute_counts_the_tokens_of_a_stream_left_early(ops):
    # The stream: a short prompt, then the client leaves after ~600 tokens.
    body = {"prompt": "x", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    received = 0
    async with httpx.AsyncClient(base_url=ops.base_url, timeout=60) as c:
        async with c.stream("POST", "/v1/completions", json=body, headers=auth(TPM_KEY)) as r:
            assert r.status_code == 200
            request_id = r.headers["x-request-id"]
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    received += 1
                    if received >= 600:
                        break
        line = await _log_line(ops, request_id)
        assert line["aborted"] == "client_disconnect" and line["status"] == 200
        charged = line["prompt_tokens"] + line["completion_tokens"]
        assert line["completion_tokens"] >= received
        # Without the completion tokens the budget would hold ~TPM - 1 tokens; with them
        # it holds at most TPM - charged (+ refill at TPM/60 per second).
        prompt = [100] * 500
        r = await c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1},
                         headers=auth(TPM_KEY))  # fmt: skip
    print(f"\nstream left after {received} events: {line['completion_tokens']} completion "
          f"tokens charged; then a 500-token prompt: {r.status_code} "
          f"(Retry-After {r.headers.get('retry-after')} s)")  # fmt: skip
    assert TPM - charged < len(prompt)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_tpm", r.text
    # Retry-After: the time to refill what is missing, at TPM per minute.
    missing = len(prompt) - (TPM - charged)
    assert int(r.headers["retry-after"]) <= missing * 60 / TPM + 1


async def _log_line(ops, request_id: str) -> dict:
    """The server's JSON log line for `request_id` (written when the response ended)."""
    deadline = time.monotonic() + 10
    while True:
        for text in ops.server.log().splitlines():
            if text.startswith('{"ts"') and f'"request_id":"{request_id}"' in text:
                return json.loads(text)
        assert time.monotonic() < deadline, f"no log line for {request_id}"
        await asyncio.sleep(0.1)


def _labelled(base_url: str, series: str) -> float:
    for line in httpx.get(base_url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[1])
    return 0.0
