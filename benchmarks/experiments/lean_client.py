"""A minimal aiohttp load client, independent of the harness: N streams back-to-back.

The third opinion in experiments/tails.py: if it sees the same tails as the harness and
as vLLM's `bench serve`, they are not any one client's doing. It records per request the
time to open its connection (aiohttp's create hooks), TTFT from the send, and errors:

    python -m benchmarks.experiments.lean_client --url http://127.0.0.1:8000 \\
        --prompts prompts.jsonl --concurrency 64 --requests 256 --out lean.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any


async def _one(session: Any, url: str, body: dict[str, Any], t0: float) -> dict[str, Any]:
    rec: dict[str, Any] = {"sent": time.perf_counter() - t0, "connect_s": None, "ttft_s": None}
    try:
        async with session.post(url, json=body, trace_request_ctx=rec) as resp:
            rec["status"] = resp.status
            buf = b""
            async for chunk in resp.content.iter_any():
                if rec["ttft_s"] is not None:
                    continue
                buf += chunk
                *events, buf = buf.split(b"\n\n")
                if any(_has_text(e) for e in events):
                    rec["ttft_s"] = time.perf_counter() - t0 - rec["sent"]
            rec["e2e_s"] = time.perf_counter() - t0 - rec["sent"]
            if resp.status != 200:
                rec["error"] = f"HTTP {resp.status}"
    except Exception as e:  # a failed request is a result here, not a crash
        rec["error"] = f"{type(e).__name__}: {e}"
    return rec


def _has_text(event: bytes) -> bool:
    """Whether an SSE event carries generated text (not [DONE], usage or an empty chunk)."""
    data = event.partition(b"data:")[2].strip()
    if not data or data == b"[DONE]":
        return False
    try:
        obj = json.loads(data)
    except ValueError:
        return False
    return any(c.get("text") for c in obj.get("choices") or ())


def _trace() -> Any:
    import aiohttp

    async def start(_s: Any, ctx: Any, _p: Any) -> None:
        ctx.trace_request_ctx["_c0"] = time.perf_counter()

    async def end(_s: Any, ctx: Any, _p: Any) -> None:
        r = ctx.trace_request_ctx
        r["connect_s"] = time.perf_counter() - r.pop("_c0")

    tc = aiohttp.TraceConfig()
    tc.on_connection_create_start.append(start)
    tc.on_connection_create_end.append(end)
    return tc


async def run(args: argparse.Namespace, rows: list[dict[str, Any]]) -> dict[str, Any]:
    import aiohttp

    url = args.url.rstrip("/") + "/v1/completions"
    todo = iter(rows)
    out: list[dict[str, Any]] = []
    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(
        connector=conn, timeout=timeout, trace_configs=[_trace()]
    ) as session:
        t0 = time.perf_counter()

        async def worker() -> None:
            for row in todo:
                body = {
                    "model": args.model, "prompt": row["prompt"], "max_tokens": args.max_tokens,
                    "stream": True, "ignore_eos": True,
                }  # fmt: skip
                out.append(await _one(session, url, body, t0))

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "requests": out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", required=True)
    p.add_argument("--model", default="codellama-serve-demo")
    p.add_argument("--prompts", required=True)
    p.add_argument("--offset", type=int, default=0, help="first row of the prompts file")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    rows = [json.loads(line) for line in Path(args.prompts).read_text().splitlines() if line]
    rows = rows[args.offset : args.offset + args.requests]
    Path(args.out).write_text(json.dumps(asyncio.run(run(args, rows))))


if __name__ == "__main__":
    main()
