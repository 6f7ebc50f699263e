"""LoRA adapters on the real engine: the demo model with its demo adapter.

One server for the module (LoRA on, runtime updating on, a keys file with an admin
key and allow-lists; n-gram speculative decoding and compact JSON constraints on too,
as a user would combine them). The adapter changes outputs at temperature 0; the base
model's outputs stay the same while adapter requests share its batch (and equal a
server without LoRA or speculation); unloading frees the adapter (404, gone from
/v1/models, its slot free again); only admin keys load and unload; a key's allow-list
hides the other adapters, from /tokenize too; structured outputs and speculation work
on adapter requests; bad input is a 4xx, never a 500; the official `openai` client
selects an adapter by `model`.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import hypothesis
import jsonschema
import openai
import pytest
import schemathesis
from schemathesis.generation.modes import GenerationMode

from engine.demo_lora import DEMO_LORA_NAME, ensure_demo_lora
from tests.conftest import ServerProcess, serving
from tests.integration.conftest import NGRAM, STRUCTURED

pytestmark = pytest.mark.engine

BASE = "codellama-serve-demo"
ADAPTER = DEMO_LORA_NAME
ADMIN, USER, BASE_ONLY, ANY = "sk-ops-admin", "sk-team-a", "sk-base-only", "sk-any-adapter"
MAX_LORAS, MAX_CPU_LORAS = 2, 3  # the demo adapter + room for two loaded at runtime
PROMPTS = ("def test_parse(self):\n", "import os\n\n\ndef main(", "class Stack:\n    def ")
GREEDY = {"temperature": 0, "max_tokens": 24}


@pytest.fixture(scope="module")
def adapter_dir() -> Path:
    return ensure_demo_lora()


@pytest.fixture(scope="module")
def copies(adapter_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo adapter under other paths, and broken adapters, for runtime loads."""
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for name in ("same-1", "same-2", "same-3", "rank16", "garbage"):
        out[name] = root / name
        shutil.copytree(adapter_dir, out[name])
    config = json.loads((out["rank16"] / "adapter_config.json").read_text())
    (out["rank16"] / "adapter_config.json").write_text(json.dumps({**config, "r": 16}))
    (out["garbage"] / "adapter_model.safetensors").write_bytes(b"not safetensors" * 64)
    return out


@pytest.fixture(scope="module")
def lora_server(
    adapter_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("lora")
    keys = tmp / "api-keys"
    keys.write_text(
        f"{ADMIN} name=ops admin\n"
        f"{USER} name=team-a adapters={ADAPTER}\n"
        f"{BASE_ONLY} name=base-only adapters=\n"
        f"{ANY} name=any\n"
    )
    started = time.monotonic()
    with serving(
        tmp, "--access-log", "--api-keys-file", str(keys),
        "--enable-lora", "--lora-modules", f"{ADAPTER}={adapter_dir}",
        "--max-loras", str(MAX_LORAS), "--max-lora-rank", "8",
        "--max-cpu-loras", str(MAX_CPU_LORAS), "--allow-runtime-lora-updating",
        "--speculative-config", json.dumps(NGRAM),
        "--structured-outputs-config", json.dumps(STRUCTURED),
    ) as srv:  # fmt: skip
        print(f"LoRA server ready in {time.monotonic() - started:.1f} s")
        yield srv


def auth(key: str = ANY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def complete(srv: ServerProcess, model: str | None, prompt: str, key: str = ANY, **kw) -> str:
    body = {"prompt": prompt, **GREEDY, **kw} | ({"model": model} if model else {})
    r = httpx.post(srv.base_url + "/v1/completions", json=body, headers=auth(key), timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == (model or BASE)
    return r.json()["choices"][0]["text"]


def load(srv: ServerProcess, name: str, path: Path | str, key: str = ADMIN, **kw) -> httpx.Response:
    body = {"lora_name": name, "lora_path": str(path), **kw}
    return httpx.post(srv.base_url + "/v1/load_lora_adapter", json=body, headers=auth(key))


def unload(srv: ServerProcess, name: str, key: str = ADMIN) -> httpx.Response:
    return httpx.post(
        srv.base_url + "/v1/unload_lora_adapter", json={"lora_name": name}, headers=auth(key)
    )


def model_ids(srv: ServerProcess, key: str = ANY) -> list[str]:
    r = httpx.get(srv.base_url + "/v1/models", headers=auth(key))
    assert r.status_code == 200, r.text
    return [m["id"] for m in r.json()["data"]]


def series(srv: ServerProcess, prefix: str) -> dict[str, float]:
    """Series of /metrics whose line starts with `prefix`, by their full name and labels."""
    text = httpx.get(srv.base_url + "/metrics", timeout=5).text
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(prefix)
    }


def loaded(srv: ServerProcess) -> float:
    """The adapters the engine holds (codellama_serve_lora_adapters_loaded)."""
    name = "codellama_serve_lora_adapters_loaded"
    return series(srv, name)[name]


def wait_loaded(srv: ServerProcess, count: float, within: float = 5) -> None:
    deadline = time.monotonic() + within
    while loaded(srv) != count:
        assert time.monotonic() < deadline, f"adapters loaded: {loaded(srv)}, expected {count}"
        time.sleep(0.05)


# --- serving ----------------------------------------------------------------------------


def test_models_list_the_adapter_with_its_parent(lora_server, adapter_dir):
    r = httpx.get(lora_server.base_url + "/v1/models", headers=auth())
    base, card = r.json()["data"]
    assert base["id"] == BASE and base.get("parent") is None
    assert card == {
        "id": ADAPTER, "object": "model", "created": card["created"],
        "owned_by": "codellama-serve", "root": str(adapter_dir), "parent": BASE,
        "max_model_len": base["max_model_len"],
    }  # fmt: skip
    one = httpx.get(f"{lora_server.base_url}/v1/models/{ADAPTER}", headers=auth())
    assert one.status_code == 200 and one.json() == card


def test_the_adapter_changes_outputs(lora_server):
    base = [complete(lora_server, None, p) for p in PROMPTS]
    adapted = [complete(lora_server, ADAPTER, p) for p in PROMPTS]
    assert all(a != b for a, b in zip(adapted, base, strict=True)), (base, adapted)
    # Deterministic at temperature 0: the same again, and the base name means the base.
    assert [complete(lora_server, ADAPTER, p) for p in PROMPTS] == adapted
    assert [complete(lora_server, BASE, p) for p in PROMPTS] == base


async def test_base_outputs_unchanged_while_adapter_requests_share_the_batch(lora_server):
    alone_base = {p: complete(lora_server, None, p) for p in PROMPTS}
    long = {"prompt": PROMPTS[0], "model": ADAPTER, "temperature": 0, "max_tokens": 400,
            "ignore_eos": True, "stream": True}  # fmt: skip
    alone_long = complete(lora_server, ADAPTER, PROMPTS[0], max_tokens=400, ignore_eos=True)
    limits = httpx.Limits(max_connections=32)
    async with httpx.AsyncClient(
        base_url=lora_server.base_url, headers=auth(), timeout=120, limits=limits
    ) as c:
        started = [asyncio.Event() for _ in range(4)]
        done_at: list[float] = []

        async def adapter_stream(i: int) -> str:
            texts = []
            async with c.stream("POST", "/v1/completions", json=long) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        texts.append(json.loads(line[6:])["choices"][0]["text"])
                        started[i].set()
            done_at.append(time.monotonic())
            return "".join(texts)

        streams = [asyncio.create_task(adapter_stream(i)) for i in range(4)]
        await asyncio.gather(*(e.wait() for e in started))  # all four are generating
        body = {**GREEDY}
        base = await asyncio.gather(
            *(c.post("/v1/completions", json={**body, "prompt": p}) for p in PROMPTS * 3)
        )
        base_done = time.monotonic()
        adapted = await asyncio.gather(*streams)
    assert all(r.status_code == 200 for r in base), [r.text for r in base]
    assert [r.json()["choices"][0]["text"] for r in base] == [alone_base[p] for p in PROMPTS * 3]
    # The adapter streams were still generating when the base requests finished:
    # they ran in the same engine batches.
    assert min(done_at) > base_done
    assert adapted == [alone_long] * 4


def test_streaming_and_chat_with_the_adapter(lora_server):
    whole = complete(lora_server, ADAPTER, PROMPTS[1])
    body = {"model": ADAPTER, "prompt": PROMPTS[1], "stream": True, **GREEDY}
    r = httpx.post(lora_server.base_url + "/v1/completions", json=body, headers=auth())
    chunks = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
    assert {c["model"] for c in chunks} == {ADAPTER}
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole
    messages = [{"role": "user", "content": "Write a test for a stack."}]
    chat = {"messages": messages, **GREEDY}
    url = lora_server.base_url + "/v1/chat/completions"
    base = httpx.post(url, json=chat, headers=auth()).json()
    adapted = httpx.post(url, json={**chat, "model": ADAPTER}, headers=auth()).json()
    assert adapted["model"] == ADAPTER
    assert adapted["choices"][0]["message"]["content"] != base["choices"][0]["message"]["content"]


def test_openai_client_selects_the_adapter(lora_server):
    client = openai.OpenAI(base_url=lora_server.openai_base_url, api_key=ANY, max_retries=0)
    models = {m.id: m for m in client.models.list().data}
    assert models[ADAPTER].parent == BASE
    r = client.completions.create(model=ADAPTER, prompt=PROMPTS[2], **GREEDY)
    assert r.model == ADAPTER
    assert r.choices[0].text == complete(lora_server, ADAPTER, PROMPTS[2])
    chat = client.chat.completions.create(
        model=ADAPTER, messages=[{"role": "user", "content": "Hi"}], **GREEDY
    )
    assert chat.model == ADAPTER and chat.choices[0].message.content
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-adapter", prompt="x", max_tokens=1)


def test_access_log_and_metrics_name_the_adapter(lora_server):
    body = {"model": ADAPTER, "prompt": "x", "max_tokens": 3}
    r = httpx.post(lora_server.base_url + "/v1/completions", json=body, headers=auth())
    rid = r.headers["x-request-id"]
    lines = [json.loads(x) for x in lora_server.log().splitlines() if x.startswith('{"ts"')]
    mine = [x for x in lines if x["request_id"] == rid]
    assert mine and mine[0]["adapter"] == ADAPTER and mine[0]["key"] == "any"
    m = series(lora_server, "codellama_serve_lora_")
    assert m[f'codellama_serve_lora_requests_total{{adapter="{ADAPTER}",status="200"}}'] >= 1
    assert m['codellama_serve_lora_requests_total{adapter="base",status="200"}'] >= 1
    assert m[f'codellama_serve_lora_generation_tokens_total{{adapter="{ADAPTER}"}}'] >= 3


# --- with the other engine features -----------------------------------------------------


def test_base_outputs_equal_a_server_without_lora_or_speculation(lora_server, server):
    assert [complete(lora_server, None, p) for p in PROMPTS] == [
        complete(server, None, p) for p in PROMPTS
    ]


def test_speculation_drafts_for_adapter_requests(lora_server):
    def counters() -> dict[str, float]:
        s = series(lora_server, "codellama_serve_spec_decode_num_")
        return {
            k: s[f"codellama_serve_spec_decode_num_{k}_total"]
            for k in ("drafts", "accepted_tokens")
        }

    before = counters()
    # The demo adapter repeats itself ("the the the"), so n-grams match its own output.
    text = complete(lora_server, ADAPTER, PROMPTS[0], max_tokens=64, ignore_eos=True)
    after = counters()
    assert after["drafts"] > before["drafts"]
    assert after["accepted_tokens"] > before["accepted_tokens"]
    # Greedy under speculation is the adapter's own greedy output, streamed or not.
    body = {"model": ADAPTER, "prompt": PROMPTS[0], "stream": True, "temperature": 0,
            "max_tokens": 64, "ignore_eos": True}  # fmt: skip
    r = httpx.post(lora_server.base_url + "/v1/completions", json=body, headers=auth(), timeout=60)
    chunks = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == text


SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "line": {"type": "integer"}},
    "required": ["name", "line"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("stream", [False, True])
def test_structured_outputs_on_the_adapter(lora_server, stream):
    client = openai.OpenAI(base_url=lora_server.openai_base_url, api_key=ANY, max_retries=0)
    response_format = {"type": "json_schema", "json_schema": {"name": "sym", "schema": SCHEMA}}
    kw = {"model": ADAPTER, "temperature": 0, "max_tokens": 120, "stream": stream}
    chat = client.chat.completions.create(
        messages=[{"role": "user", "content": "Name a function."}],
        response_format=response_format, **kw,
    )  # fmt: skip
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in chat if c.choices)
    else:
        assert chat.model == ADAPTER
        text = chat.choices[0].message.content
    jsonschema.validate(json.loads(text), SCHEMA)
    # vLLM's extension fields too: a regex and a choice, on completions.
    for constraint, check in (
        ({"regex": r"[a-z_]{2,10}\(\)"}, lambda s: re.fullmatch(r"[a-z_]{2,10}\(\)", s)),
        ({"choice": ["alpha", "beta"]}, lambda s: s in ("alpha", "beta")),
    ):
        out = client.completions.create(
            model=ADAPTER, prompt=PROMPTS[1], temperature=0, max_tokens=20,
            extra_body={"structured_outputs": constraint},
        )  # fmt: skip
        assert check(out.choices[0].text), (constraint, out.choices[0].text)
    # The constraints made them so: left free, the adapter writes code-shaped noise.
    free = complete(lora_server, ADAPTER, PROMPTS[1], max_tokens=20)
    assert not re.fullmatch(r"[a-z_]{2,10}\(\)", free)


def test_tokenize_takes_an_adapter_name(lora_server):
    url = lora_server.base_url
    body = {"prompt": PROMPTS[2]}
    base = httpx.post(url + "/tokenize", json=body, headers=auth())
    assert base.status_code == 200, base.text
    adapted = httpx.post(url + "/tokenize", json={**body, "model": ADAPTER}, headers=auth())
    assert adapted.status_code == 200, adapted.text
    assert adapted.json() == base.json()  # adapters share the base model's tokenizer
    chat = {"model": ADAPTER, "messages": [{"role": "user", "content": "Hi"}]}
    assert httpx.post(url + "/tokenize", json=chat, headers=auth()).status_code == 200
    ids = {"model": ADAPTER, "tokens": base.json()["tokens"]}
    text = httpx.post(url + "/detokenize", json=ids, headers=auth()).json()["prompt"]
    assert text.endswith(PROMPTS[2])
    # A key whose allow-list leaves the adapter out gets the 404 of an unknown model.
    for path, payload in (("/tokenize", {**body, "model": ADAPTER}), ("/detokenize", ids)):
        hidden = httpx.post(url + path, json=payload, headers=auth(BASE_ONLY))
        unknown = httpx.post(url + path, json={**payload, "model": "nope"}, headers=auth(BASE_ONLY))
        assert hidden.status_code == unknown.status_code == 404, hidden.text
        assert hidden.json()["error"]["code"] == "model_not_found"
        assert hidden.json()["error"]["message"] == unknown.json()["error"]["message"].replace(
            "nope", ADAPTER
        )


# --- runtime loading and unloading ------------------------------------------------------


def test_only_admin_keys_load_and_unload(lora_server, copies):
    for key in (USER, ANY, BASE_ONLY):
        for r in (load(lora_server, "x", copies["same-1"], key), unload(lora_server, ADAPTER, key)):
            assert r.status_code == 403, r.text
            assert r.json()["error"]["type"] == "permission_error"
    # Refused before the body is judged: a bad body tells a non-admin nothing more.
    r = httpx.post(lora_server.base_url + "/v1/load_lora_adapter", content=b"{", headers=auth())
    assert r.status_code == 403
    assert httpx.post(lora_server.base_url + "/v1/load_lora_adapter", json={}).status_code == 401
    assert model_ids(lora_server) == [BASE, ADAPTER]


def test_load_serve_unload(lora_server, copies):
    r = load(lora_server, "runtime", copies["same-1"])
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'runtime' added successfully."
    try:
        assert model_ids(lora_server) == [BASE, ADAPTER, "runtime"]
        assert loaded(lora_server) == 2
        # The same weights under another name and path: the same greedy output.
        assert complete(lora_server, "runtime", PROMPTS[0]) == complete(
            lora_server, ADAPTER, PROMPTS[0]
        )
    finally:
        r = unload(lora_server, "runtime")
    assert r.status_code == 200
    assert r.text == "Success: LoRA adapter 'runtime' removed successfully."
    body = {"model": "runtime", "prompt": "x", "max_tokens": 2}
    gone = httpx.post(lora_server.base_url + "/v1/completions", json=body, headers=auth())
    never = httpx.post(
        lora_server.base_url + "/v1/completions", json={**body, "model": "never"}, headers=auth()
    )
    assert gone.status_code == never.status_code == 404
    assert gone.json()["error"]["message"] == never.json()["error"]["message"].replace(
        "never", "runtime"
    )
    assert "runtime" not in model_ids(lora_server)
    assert httpx.get(lora_server.base_url + "/v1/models/runtime", headers=auth()).status_code == 404
    wait_loaded(lora_server, 1)
    assert unload(lora_server, "runtime").status_code == 404


def test_unload_frees_the_slot(lora_server, copies):
    # --max-cpu-loras 3: the demo adapter and two more; a fourth is refused until one goes.
    assert load(lora_server, "slot-1", copies["same-1"]).status_code == 200
    assert load(lora_server, "slot-2", copies["same-2"]).status_code == 200
    try:
        full = load(lora_server, "slot-3", copies["same-3"])
        assert full.status_code == 400 and full.json()["error"]["code"] == "adapter_limit"
        assert unload(lora_server, "slot-1").status_code == 200
        wait_loaded(lora_server, 2)
        assert load(lora_server, "slot-3", copies["same-3"]).status_code == 200
        assert complete(lora_server, "slot-3", PROMPTS[1]) == complete(
            lora_server, ADAPTER, PROMPTS[1]
        )
    finally:
        for name in ("slot-1", "slot-2", "slot-3"):
            unload(lora_server, name)
    wait_loaded(lora_server, 1)


async def test_unload_during_a_request_lets_it_finish(lora_server, copies):
    assert load(lora_server, "busy", copies["same-1"]).status_code == 200
    # Long enough (~5 s here) to be still generating while the test unloads its adapter.
    body = {"model": "busy", "prompt": "x", "max_tokens": 1000, "ignore_eos": True,
            "stream": True, "temperature": 0}  # fmt: skip
    async with (
        httpx.AsyncClient(base_url=lora_server.base_url, headers=auth(), timeout=120) as c,
        c.stream("POST", "/v1/completions", json=body) as r,
    ):
        lines = r.aiter_lines()
        async for line in lines:
            if line.startswith("data: {"):
                break  # generating
        unload_body = {"lora_name": "busy"}
        gone = await c.post("/v1/unload_lora_adapter", json=unload_body, headers=auth(ADMIN))
        assert gone.status_code == 200
        assert loaded(lora_server) == 2  # still held: its request runs on
        refused = await c.post("/v1/completions", json={**body, "stream": False})
        assert refused.status_code == 404
        rest = [line async for line in lines if line]
    chunks = [json.loads(x[6:]) for x in rest if x.startswith("data: {")]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert rest[-1] == "data: [DONE]"
    wait_loaded(lora_server, 1)  # freed once its last request ended


def test_load_inplace_replaces_the_weights(lora_server, copies):
    assert load(lora_server, "inplace", copies["same-1"]).status_code == 200
    try:
        again = load(lora_server, "inplace", copies["same-2"])
        assert again.status_code == 400 and again.json()["error"]["code"] == "adapter_exists"
        replaced = load(lora_server, "inplace", copies["same-2"], load_inplace=True)
        assert replaced.status_code == 200, replaced.text
        card = httpx.get(f"{lora_server.base_url}/v1/models/inplace", headers=auth()).json()
        assert card["root"] == str(copies["same-2"])
        assert loaded(lora_server) == 2  # one slot: replaced, not added
    finally:
        unload(lora_server, "inplace")
    wait_loaded(lora_server, 1)


def test_runtime_updating_is_off_by_default(server):
    body = {"lora_name": "x", "lora_path": "/tmp"}
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        r = httpx.post(server.base_url + path, json=body)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_enabled"
    # Without --enable-lora an adapter name is just an unknown model.
    r = httpx.post(server.base_url + "/v1/completions", json={"model": ADAPTER, "prompt": "x"})
    assert r.status_code == 404


# --- allow-lists ------------------------------------------------------------------------


def test_allow_lists_hide_other_adapters(lora_server, copies):
    assert load(lora_server, "team-b", copies["same-1"]).status_code == 200
    try:
        assert model_ids(lora_server, ADMIN) == [BASE, ADAPTER, "team-b"]  # no list: all
        assert model_ids(lora_server, USER) == [BASE, ADAPTER]
        assert model_ids(lora_server, BASE_ONLY) == [BASE]
        assert complete(lora_server, ADAPTER, "x", key=USER)
        assert complete(lora_server, None, "x", key=BASE_ONLY)
        url = lora_server.base_url

        def refused(key: str, model: str) -> tuple[int, dict]:
            body = {"model": model, "prompt": "x", "max_tokens": 1}
            r = httpx.post(url + "/v1/completions", json=body, headers=auth(key))
            card = httpx.get(f"{url}/v1/models/{model}", headers=auth(key))
            assert card.status_code == 404
            return r.status_code, r.json()["error"]

        # Someone else's adapter is answered exactly as one that does not exist.
        for key, model in ((USER, "team-b"), (BASE_ONLY, ADAPTER), (BASE_ONLY, "team-b")):
            status, error = refused(key, model)
            nothing_status, nothing = refused(key, "no-such-adapter")
            assert status == nothing_status == 404
            assert error == {**nothing, "message": nothing["message"].replace(
                "no-such-adapter", model)}  # fmt: skip
        chat = {"model": "team-b", "messages": [{"role": "user", "content": "x"}]}
        r = httpx.post(url + "/v1/chat/completions", json=chat, headers=auth(USER))
        assert r.status_code == 404
    finally:
        unload(lora_server, "team-b")


# --- bad input --------------------------------------------------------------------------


def test_bad_adapter_loads_are_4xx_and_harm_nothing(lora_server, copies, adapter_dir):
    url = lora_server.base_url + "/v1/load_lora_adapter"
    cases = {
        "not json": b"{",
        "a list": b"[]",
        "no fields": {},
        "no path": {"lora_name": "x"},
        "no name": {"lora_path": str(adapter_dir)},
        "name not a string": {"lora_name": 5, "lora_path": str(adapter_dir)},
        "empty name": {"lora_name": "", "lora_path": str(adapter_dir)},
        "name with spaces": {"lora_name": "a b", "lora_path": str(adapter_dir)},
        "reserved name": {"lora_name": "base", "lora_path": str(adapter_dir)},
        "the base model's name": {"lora_name": BASE, "lora_path": str(adapter_dir)},
        "already loaded": {"lora_name": ADAPTER, "lora_path": str(adapter_dir)},
        "empty path": {"lora_name": "x", "lora_path": ""},
        "no such path": {"lora_name": "x", "lora_path": "/no/such/adapter"},
        "a file": {"lora_name": "x", "lora_path": str(adapter_dir / "adapter_config.json")},
        "not an adapter": {"lora_name": "x", "lora_path": str(copies["garbage"].parent)},
        "rank above --max-lora-rank": {"lora_name": "x", "lora_path": str(copies["rank16"])},
        "corrupt weights": {"lora_name": "x", "lora_path": str(copies["garbage"])},
        "load_inplace not a bool": {"lora_name": "x", "lora_path": "/x", "load_inplace": "yes"},
    }
    for case, body in cases.items():
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = httpx.post(url, headers=auth(ADMIN), timeout=30, **kw)
        assert r.status_code == 400, (case, r.status_code, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}, case
    rank = load(lora_server, "x", copies["rank16"]).json()["error"]
    assert rank["code"] == "adapter_load_failed" and "max_lora_rank 8" in rank["message"]
    assert model_ids(lora_server) == [BASE, ADAPTER]
    assert loaded(lora_server) == 1  # failed loads hold no slot
    assert complete(lora_server, ADAPTER, "x") and complete(lora_server, None, "x")


def test_bad_unloads_and_models_are_4xx(lora_server):
    url = lora_server.base_url
    for body, status in (({}, 400), ({"lora_name": 7}, 400), ({"lora_name": "nope"}, 404)):
        r = httpx.post(url + "/v1/unload_lora_adapter", json=body, headers=auth(ADMIN))
        assert r.status_code == status, (body, r.text)
    for model, status in ((5, 400), (["x"], 400), ("", 404), ("other", 404), ("base", 404)):
        body = {"model": model, "prompt": "x", "max_tokens": 1}
        r = httpx.post(url + "/v1/completions", json=body, headers=auth())
        assert r.status_code == status, (model, r.text)
    assert httpx.get(url + "/health").status_code == 200


def test_fuzzed_admin_requests_never_5xx(lora_server):
    schema = schemathesis.openapi.from_url(
        lora_server.base_url + "/openapi.json", headers=auth(ADMIN)
    )
    wanted = {"/v1/load_lora_adapter", "/v1/unload_lora_adapter"}
    ops = [r.ok() for r in schema.get_all_operations() if r.ok().path in wanted]
    assert len(ops) == 2
    seen: dict[int, int] = {}
    for op in ops:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @hypothesis.given(case=op.as_strategy(generation_mode=mode))
            @hypothesis.settings(
                max_examples=25, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(hypothesis.HealthCheck),
            )  # fmt: skip
            def check(case):
                r = case.call(base_url=lora_server.base_url, headers=auth(ADMIN), timeout=30)
                seen[r.status_code] = seen.get(r.status_code, 0) + 1
                assert r.status_code < 500, (case.body, r.text)

            check()
    print("fuzzed admin status codes:", dict(sorted(seen.items())))
    assert lora_server.proc.poll() is None
    assert model_ids(lora_server) == [BASE, ADAPTER]  # nothing random got loaded
