"""Priority classes against the real engine (vLLM's priority scheduler, demo model).

One server for the module: priority scheduling, a batch of two sequences, a small
waiting queue, and a KV cache of 8 blocks of 128 tokens, small enough that two long
sequences cannot both finish without a preemption.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from tests.conftest import ServerProcess, serving

CI, CI_2, EDITOR, PLAIN = "sk-ci-batch", "sk-ci-other", "sk-editor", "sk-plain"
BATCH, WAITING = 2, 16  # bounds: interactive 2 + 16, default 2 + 12, batch 2 + 8
# 9.5 blocks of 128 tokens x 2 KiB (2 layers x K,V x 4 heads x 32 x float32): 9 blocks,
# one of them vLLM's null block.
KV_GIB = 9.5 * 128 * 2048 / (1 << 30)
MAX_MODEL_LEN = 1024
CLASS = "x-codellama-priority-class"


@pytest.fixture(scope="module")
def prio(tmp_path_factory) -> ServerProcess:
    tmp = tmp_path_factory.mktemp("priority")
    keys = tmp / "keys"
    keys.write_text(
        f"{CI} name=ci priority=batch\n{CI_2} name=ci-2 priority=batch\n"
        f"{EDITOR} name=editor priority=interactive\n{PLAIN} name=plain\n"
    )
    with serving(
        tmp,
        "--access-log", "--api-keys-file", str(keys), "--scheduling-policy", "priority",
        "--max-num-seqs", str(BATCH), "--max-waiting-requests", str(WAITING),
        "--cpu-kvcache-space-gib", repr(KV_GIB), "--max-model-len", str(MAX_MODEL_LEN),
        "--no-enable-prefix-caching", "--fim-priority-class", "interactive",
        "--fim-priority-max-tokens", "16",
    ) as srv:  # fmt: skip
        yield srv


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def series(srv: ServerProcess, name: str, **labels: str) -> float:
    """One labelled series' value in the server's /metrics (0 if absent)."""
    wanted = name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    for line in httpx.get(srv.base_url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[1])
    return 0.0


async def wait_for(srv: ServerProcess, name: str, value: float, within: float = 10) -> None:
    """Until the unlabelled series `name` is `value` (the event loop runs meanwhile)."""
    deadline = time.monotonic() + within
    while await asyncio.to_thread(srv.metric, name) != value:
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        await asyncio.sleep(0.01)


class Stream:
    """A streamed completion, timed at the client: when its first token and its end came."""

    def __init__(self, client: httpx.AsyncClient, key: str, max_tokens: int, **extra) -> None:
        self.first_token: float | None = None
        self.done: float | None = None
        self.headers: httpx.Headers | None = None
        body = {"prompt": "def f(x):", "max_tokens": max_tokens, "ignore_eos": True,
                "stream": True, **extra}  # fmt: skip
        self.task = asyncio.create_task(self._run(client, key, body))

    async def _run(self, client: httpx.AsyncClient, key: str, body: dict) -> None:
        async with client.stream("POST", "/v1/completions", json=body, headers=auth(key)) as r:
            assert r.status_code == 200, await r.aread()
            self.headers = r.headers
            async for line in r.aiter_lines():
                new = line.startswith("data: {") and self.first_token is None
                if new and json.loads(line[6:])["choices"][0]["text"]:
                    self.first_token = time.monotonic()
        self.done = time.monotonic()


async def test_a_higher_class_admitted_behind_a_full_batch_starts_first(prio):
    """The batch is full of batch work and four more batch requests wait in the engine:
    an interactive request sent last gets the next free slot, ahead of all four. The same
    request sent with a batch key (the control) waits its turn behind them."""
    order = {}
    for key in (EDITOR, CI):  # the interactive run, then the control
        limits = httpx.Limits(max_connections=16)
        async with httpx.AsyncClient(base_url=prio.base_url, timeout=60, limits=limits) as c:
            # Two running: one frees its slot after ~200 tokens, one after ~370 (3 KV
            # blocks each at most, so nothing is preempted here).
            running = [Stream(c, CI, 200), Stream(c, CI, 370)]
            await wait_for(prio, "codellama_serve_requests_running", 2)
            queued = [Stream(c, CI_2, 32) for _ in range(4)]
            await wait_for(prio, "codellama_serve_requests_waiting", 4)
            late = Stream(c, key, 16)
            await asyncio.gather(*(s.task for s in (*running, *queued, late)))
        assert all(s.first_token for s in queued) and late.first_token
        before = sum(late.first_token < s.first_token for s in queued)
        order[key] = before
        print(f"{key}: first token ahead of {before} of the 4 queued batch requests")
    assert order[EDITOR] == 4, order
    assert order[CI] == 0, order  # same class, first come first served


async def test_the_engine_preempts_the_lower_class_first(prio):
    """Two sequences that cannot both fit the KV cache (8 blocks; each needs 8 by its
    end): the batch one, though it came first, is preempted, and the interactive one
    finishes first."""
    before = {c: series(prio, "codellama_serve_class_preemptions_total", priority_class=c)
              for c in ("batch", "interactive")}  # fmt: skip
    async with httpx.AsyncClient(base_url=prio.base_url, timeout=120) as c:
        batch = Stream(c, CI, MAX_MODEL_LEN - 16)
        await wait_for(prio, "codellama_serve_requests_running", 1)
        interactive = Stream(c, EDITOR, MAX_MODEL_LEN - 16)
        await asyncio.gather(batch.task, interactive.task)
    assert interactive.done < batch.done
    after = {c: series(prio, "codellama_serve_class_preemptions_total", priority_class=c)
             for c in before}  # fmt: skip
    print(f"preemptions by class: {after} (before {before})")
    assert after["batch"] > before["batch"]
    assert after["interactive"] == before["interactive"]


def test_asking_above_the_keys_class_is_clamped_and_said(prio):
    url = prio.base_url + "/v1/completions"

    def ask(key: str, priority, **extra) -> httpx.Response:
        body = {"prompt": "x", "max_tokens": 2, "priority": priority, **extra}
        return httpx.post(url, json=body, headers=auth(key), timeout=30)

    clamped = series(prio, "codellama_serve_class_priority_clamped_total", priority_class="batch")
    for asked in (0, "interactive", -5):
        r = ask(CI, asked)
        assert r.status_code == 200 and r.headers[CLASS] == "batch", r.text
    assert ask(CI, 25).headers[CLASS] == "batch"  # less than its class: granted as asked
    assert ask(EDITOR, "batch").headers[CLASS] == "batch"
    assert ask(EDITOR, 10).headers[CLASS] == "default"
    chat = httpx.post(
        prio.base_url + "/v1/chat/completions", headers=auth(CI), timeout=30,
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "priority": 0},
    )  # fmt: skip
    assert chat.status_code == 200 and chat.headers[CLASS] == "batch"
    bad = ask(CI, "gold")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "unknown_priority_class"
    assert series(prio, "codellama_serve_class_priority_clamped_total",
                  priority_class="batch") == clamped + 4  # fmt: skip
    mine = [json.loads(x) for x in prio.log().splitlines() if x.startswith('{"ts"')]
    assert any(x.get("priority_clamped") and x["priority_class"] == "batch" for x in mine)


def test_small_fim_requests_of_unclassed_keys_count_as_interactive(prio):
    url = prio.base_url + "/v1/completions"
    fim = {"prompt": "def add(a, b):\n    ", "suffix": "\n    return c\n"}

    def cls(key: str, max_tokens: int, **body) -> str:
        r = httpx.post(url, json={"max_tokens": max_tokens, **body}, headers=auth(key))
        assert r.status_code == 200, r.text
        return r.headers[CLASS]

    assert cls(PLAIN, 16, **fim) == "interactive"
    assert cls(PLAIN, 17, **fim) == "default"
    assert cls(PLAIN, 8, prompt="def f():") == "default"  # not FIM
    assert cls(CI, 8, **fim) == "batch"  # a key with a class keeps it


async def test_batch_is_refused_first_and_interactive_keeps_its_headroom(prio):
    bound = BATCH + WAITING // 2  # the batch class's share of the queue
    limits = httpx.Limits(max_connections=32)
    async with httpx.AsyncClient(base_url=prio.base_url, timeout=60, limits=limits) as c:
        streams = [Stream(c, CI, 300) for _ in range(bound)]
        await wait_for(prio, "codellama_serve_admission_in_flight_sequences", bound)
        refused = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2},
                               headers=auth(CI_2))  # fmt: skip
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "queue_full_batch"
        assert int(refused.headers["retry-after"]) >= 1
        ok = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2},
                          headers=auth(EDITOR))  # fmt: skip
        assert ok.status_code == 200 and ok.headers[CLASS] == "interactive"
        for s in streams:
            s.task.cancel()
        await asyncio.gather(*(s.task for s in streams), return_exceptions=True)
    await wait_for(prio, "codellama_serve_admission_in_flight_sequences", 0)
    await wait_for(prio, "codellama_serve_requests_running", 0)
    assert series(prio, "codellama_serve_class_requests_refused_total",
                  priority_class="batch", reason="queue_full") >= 1  # fmt: skip


def test_class_series_are_exported(prio):
    text = httpx.get(prio.base_url + "/metrics").text
    for cls in ("interactive", "default", "batch"):
        labels = f'{{priority_class="{cls}"}}'
        assert "codellama_serve_class_time_to_first_token_seconds_count" + labels in text
    assert series(prio, "codellama_serve_class_time_to_first_token_seconds_count",
                  priority_class="interactive") >= 3  # fmt: skip
    assert series(prio, "codellama_serve_class_waiting_sequences", priority_class="batch") == 0
