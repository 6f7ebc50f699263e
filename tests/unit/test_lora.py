"""LoRA without the engine: settings, keys-file options, the adapter registry, metric
labels, and the demo adapter's recipe (its effect on outputs is tests/integration/test_lora.py)."""

from __future__ import annotations

import hashlib
import json

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from engine.adapters import AdapterError, AdapterNotFoundError, AdapterRegistry
from engine.api.auth import KeyFileError, KeyStore
from engine.cli import build_parser, settings_from_args
from engine.config import AuthConfig, ConfigError, LoRAConfig, build_settings, resolve
from engine.demo_lora import DemoLoraSpec, build_demo_lora, lora_cache_key, lora_corpus_text
from engine.lora_metrics import LoRAMetrics

# --- settings ---------------------------------------------------------------------------


def serve_args(*argv: str):
    return settings_from_args(build_parser().parse_args(["serve", *argv]))


def test_vllm_flags():
    s = serve_args(
        "--enable-lora", "--lora-modules", "sql=/m/sql",
        '{"name": "docs", "path": "/m/docs", "base_model_name": "codellama-serve-demo"}',
        "--max-loras", "2", "--max-lora-rank", "32", "--max-cpu-loras", "4",
    )  # fmt: skip
    lora = s.lora
    assert lora.enable_lora and lora.max_loras == 2 and lora.max_lora_rank == 32
    assert [(m.name, m.path) for m in lora.lora_modules] == [("sql", "/m/sql"), ("docs", "/m/docs")]
    assert lora.lora_modules[1].base_model_name == "codellama-serve-demo"
    assert lora.max_cpu_loras == 4


def test_env_var_and_file_forms():
    env = {"CODELLAMA_SERVE_ENABLE_LORA": "true", "CODELLAMA_SERVE_LORA_MODULES": "a=/x b=/y"}
    assert [m.name for m in build_settings(env=env).lora.lora_modules] == ["a", "b"]
    env["CODELLAMA_SERVE_LORA_MODULES"] = '[{"name": "c", "path": "/z"}]'
    assert [m.path for m in build_settings(env=env).lora.lora_modules] == ["/z"]
    file = {"lora": {"enable_lora": True, "lora_modules": [{"name": "d", "path": "/d"}, "e=/e"]}}
    assert [m.name for m in build_settings(file, env={}).lora.lora_modules] == ["d", "e"]


@pytest.mark.parametrize(
    ("values", "says"),
    [
        ({"lora_modules": ["a=/x"]}, "need --enable-lora"),
        ({"allow_runtime_lora_updating": True}, "need --enable-lora"),
        ({"enable_lora": True, "lora_modules": ["a=/x", "a=/y"]}, "duplicate adapter names a"),
        ({"enable_lora": True, "lora_modules": ["a b"]}, "expected 'name=path'"),
        ({"enable_lora": True, "lora_modules": ["{oops"]}, "invalid JSON"),
        ({"enable_lora": True, "lora_modules": ["base=/x"]}, "reserved"),
        ({"enable_lora": True, "lora_modules": ["sp ace=/x"]}, "expected 'name=path'"),
        ({"enable_lora": True, "lora_modules": ["bad!=/x"]}, "invalid adapter name"),
        ({"enable_lora": True, "lora_modules": ["a="]}, "--lora-modules"),
        ({"enable_lora": True, "max_lora_rank": 12}, "--max-lora-rank"),
        ({"enable_lora": True, "max_loras": 4, "max_cpu_loras": 2}, "max_cpu_loras (2)"),
        ({"enable_lora": True, "lora_modules": ["a=/x", "b=/y"], "max_cpu_loras": 1}, "(1)"),
    ],
)
def test_bad_settings_are_refused(values, says):
    with pytest.raises(ConfigError) as e:
        build_settings({"lora": values}, env={})
    assert says in str(e.value)


def test_cli_rank_choices_are_numbers():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--max-lora-rank", "12"])


def test_resolve_sizes_the_adapter_memory():
    def held(**values) -> int | None:
        s = build_settings({"lora": {"enable_lora": True, **values}}, env={})
        return resolve(s, gpu=False).lora.max_cpu_loras

    assert held() == 1  # vLLM's: --max-loras
    assert held(lora_modules=["a=/a", "b=/b", "c=/c"]) == 3
    assert held(lora_modules=["a=/a"], max_loras=2, allow_runtime_lora_updating=True) == 3
    assert held(max_cpu_loras=8) == 8
    s = build_settings({"lora": {"enable_lora": True}}, env={})
    once = resolve(s, gpu=False)
    assert resolve(once.settings, gpu=False) == once  # idempotent


def test_resolve_refuses_names_and_modes_that_cannot_work():
    def resolved(lora: dict, mode: str = "standalone", **engine):
        s = build_settings({"lora": {"enable_lora": True, **lora}, "engine": engine}, env={})
        return resolve(s, gpu=False, mode=mode)  # type: ignore[arg-type]

    with pytest.raises(ConfigError, match="base model's served name"):
        resolved({"lora_modules": ["codellama-serve-demo=/x"]})
    with pytest.raises(ConfigError, match="names base model 'other'"):
        resolved({"lora_modules": [{"name": "a", "path": "/x", "base_model_name": "other"}]})
    with pytest.raises(ConfigError, match="standalone only"):
        resolved({"allow_runtime_lora_updating": True}, mode="ray")
    ray = resolved({"lora_modules": ["a=/x"]}, mode="ray")
    assert [m.name for m in ray.lora.lora_modules] == ["a"]


def test_engine_args_enable_lora_only_when_asked():
    from engine.llm import engine_args

    s = build_settings({"lora": {"enable_lora": True, "max_loras": 2, "max_lora_rank": 8}}, env={})
    args = engine_args(resolve(s, gpu=False), "/m")
    assert (args.enable_lora, args.max_loras, args.max_lora_rank, args.max_cpu_loras) == (
        True, 2, 8, 2,
    )  # fmt: skip
    assert engine_args(resolve(build_settings(env={}), gpu=False), "/m").enable_lora is False


# --- keys file --------------------------------------------------------------------------


def keys(text: str) -> KeyStore:
    return KeyStore.from_config(AuthConfig(api_keys=text))


def test_keys_carry_admin_and_adapter_lists(tmp_path):
    f = tmp_path / "keys"
    f.write_text("sk-ops name=ops admin\nsk-a name=a adapters=sql,docs\nsk-b adapters=\nsk-c\n")
    store = KeyStore.from_config(AuthConfig(api_keys_file=str(f)))
    ops, a, b, c = (store.lookup(k) for k in ("sk-ops", "sk-a", "sk-b", "sk-c"))
    assert ops and a and b and c
    assert ops.admin and not a.admin and not c.admin
    assert a.may_use("sql") and a.may_use("docs") and not a.may_use("other")
    assert not b.may_use("sql")  # an empty list: the base model only
    assert c.may_use("anything") and ops.may_use("anything")  # no list: every adapter


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ("sk-x admin=yes", "unknown option 'admin'"),
        ("sk-x adapters=bad!", "adapters=: invalid adapter name"),
        ("sk-x adapter=sql", "unknown option 'adapter'"),
    ],
)
def test_bad_key_options(entry, says):
    with pytest.raises(KeyFileError, match=says):
        keys(entry)


# --- the registry -----------------------------------------------------------------------


def loaded(registry: AdapterRegistry, name: str, path: str = "/a") -> None:
    registry.finish_load(registry.begin_load(name, path, dynamic=True))


def test_registry_names_slots_and_ids():
    r = AdapterRegistry(parent="base-model", capacity=2)
    loaded(r, "a")
    with pytest.raises(AdapterError, match="already loaded"):
        r.begin_load("a", "/b", dynamic=True)
    for bad in ("base-model", "base", "other", "", "a b", "x" * 129):
        with pytest.raises(AdapterError):
            r.begin_load(bad, "/b", dynamic=True)
    pending = r.begin_load("b", "/b", dynamic=True)
    with pytest.raises(AdapterError, match="being loaded"):
        r.begin_load("b", "/b", dynamic=True)
    assert r.get("b") is None  # not servable until loaded
    with pytest.raises(AdapterError, match="at most 2") as full:
        r.begin_load("c", "/c", dynamic=True)
    assert full.value.code == "adapter_limit"
    r.abort_load(pending)
    loaded(r, "c")
    assert [a.name for a in r.all()] == ["a", "c"] and len(r) == 2
    a_id = r.get("a").id  # type: ignore[union-attr]
    replaced = r.begin_load("a", "/new", dynamic=True, replace=True)  # in place: no new slot
    r.finish_load(replaced)
    assert (replaced.id, r.get("a").path, len(r)) == (a_id, "/new", 2)  # type: ignore[union-attr]


def test_registry_frees_a_slot_after_the_last_request():
    r = AdapterRegistry(parent="p", capacity=1)
    loaded(r, "a")
    first, second = r.acquire("a"), r.acquire("a")
    adapter, idle = r.retire("a")
    assert not idle and r.get("a") is None and len(r) == 1  # held: requests run on
    with pytest.raises(AdapterNotFoundError):
        r.acquire("a")
    with pytest.raises(AdapterNotFoundError):
        r.retire("a")
    assert r.release(first) is False
    assert r.release(second) is True  # the engine may remove it now
    r.removed(adapter)
    assert len(r) == 0
    loaded(r, "a")
    assert r.get("a").id != adapter.id  # type: ignore[union-attr]  # ids are never reused


# --- metrics ----------------------------------------------------------------------------


def test_adapter_labels_are_bounded():
    lora = LoRAConfig(enable_lora=True, lora_modules=["s1=/a", "s2=/b", "s3=/c"], max_loras=2)
    m = LoRAMetrics(CollectorRegistry(), lora, loaded=lambda: 3)
    assert [m.label(n) for n in (None, "s1", "s2", "s3", "dyn")] == [
        "base", "s1", "s2", "other", "other",
    ]  # fmt: skip
    lora = LoRAConfig(enable_lora=True, max_loras=2)
    registry = CollectorRegistry()
    m = LoRAMetrics(registry, lora, loaded=lambda: 0)
    for i in range(50):
        m.observe(f"dyn-{i}", 200, 5, 3, 0.01, 0.002)
    m.observe(None, 200, 5, 3, None, None)
    m.observe("dyn-0", 404, 0, 0, None, None)
    text = generate_latest(registry).decode()
    labels = {line.split('adapter="')[1].split('"')[0] for line in text.splitlines()
              if line.startswith("codellama_serve_lora_requests_total")}  # fmt: skip
    assert labels == {"base", "dyn-0", "dyn-1", "other"}
    assert 'codellama_serve_lora_requests_total{adapter="other",status="200"} 48.0' in text
    assert 'codellama_serve_lora_generation_tokens_total{adapter="dyn-0"} 3.0' in text


# --- the demo adapter -------------------------------------------------------------------


def _digests(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_demo_adapter_is_deterministic_peft(tmp_path, demo_model_dir):
    spec = DemoLoraSpec(train_steps=3)  # the recipe, shortened: determinism, not quality
    build_demo_lora(tmp_path / "a", demo_model_dir, spec)
    build_demo_lora(tmp_path / "b", demo_model_dir, spec)
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    build_demo_lora(tmp_path / "c", demo_model_dir, DemoLoraSpec(train_steps=3, seed=1))
    assert _digests(tmp_path / "c") != _digests(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["bias"] == "none"
    from safetensors import safe_open

    with safe_open(tmp_path / "a" / "adapter_model.safetensors", framework="pt") as f:
        shapes = {k: tuple(f.get_tensor(k).shape) for k in f.keys()}  # noqa: SIM118
    assert shapes["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] == (8, 128)
    assert shapes["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"] == (128, 8)
    assert len(shapes) == 2 * 7 * 2  # layers x target modules x (A, B)


def test_demo_adapter_cache_key_covers_base_and_recipe(demo_model_dir, tmp_path):
    corpus = lora_corpus_text()
    key = lora_cache_key(DemoLoraSpec(), demo_model_dir, corpus)
    assert key != lora_cache_key(DemoLoraSpec(seed=1), demo_model_dir, corpus)
    assert key != lora_cache_key(DemoLoraSpec(), tmp_path / "demo-model-other", corpus)
    assert key != lora_cache_key(DemoLoraSpec(), demo_model_dir, corpus + " ")


def test_demo_adapter_learned_its_corpus(demo_model_dir):
    """The built adapter lowers the loss on its own (unittest) corpus, the measurable
    change that makes its outputs differ."""
    import sentencepiece as spm
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    from engine.demo_lora import _documents, ensure_demo_lora

    adapter = ensure_demo_lora()
    config = json.loads((adapter / "adapter_config.json").read_text())
    sp = spm.SentencePieceProcessor(model_file=str(demo_model_dir / "tokenizer.model"))
    model = LlamaForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32).eval()
    ids = torch.tensor(_documents(sp, lora_corpus_text()))
    starts = torch.randint(0, len(ids) - 96, (16,), generator=torch.Generator().manual_seed(1))
    batch = torch.stack([ids[s : s + 96] for s in starts.tolist()])

    def loss() -> float:
        with torch.no_grad():
            return model(input_ids=batch, labels=batch).loss.item()

    base = loss()
    weights = load_file(adapter / "adapter_model.safetensors")
    state = model.state_dict()
    for name, a in weights.items():
        if name.endswith("lora_A.weight"):
            b = weights[name.replace("lora_A", "lora_B")]
            module = name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            state[module + ".weight"] += b @ a * (config["lora_alpha"] / config["r"])
    model.load_state_dict(state)
    adapted = loss()
    print(f"loss on the adapter's corpus: base {base:.3f}, with the adapter {adapted:.3f}")
    assert adapted < base - 0.2
