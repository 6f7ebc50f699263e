"""The demo model: deterministic, self-contained, Code Llama-shaped."""

from __future__ import annotations

import hashlib
import json

import pytest

from engine.demo_model import (
    INFILL_PIECES,
    DemoModelSpec,
    build_demo_model,
    build_in_place,
    cache_key,
    corpus_text,
)


def _digests(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_same_seed_same_bytes(tmp_path):
    spec = DemoModelSpec(train_steps=3)  # the recipe, shortened: determinism, not quality
    build_demo_model(tmp_path / "a", spec)
    build_demo_model(tmp_path / "b", spec)
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    build_demo_model(tmp_path / "c", DemoModelSpec(train_steps=3, seed=1))
    assert (
        _digests(tmp_path / "c")["model.safetensors"]
        != _digests(tmp_path / "a")["model.safetensors"]
    )


def test_cache_key_covers_the_recipe():
    corpus = corpus_text()
    assert cache_key(DemoModelSpec(), corpus) != cache_key(DemoModelSpec(seed=1), corpus)
    assert cache_key(DemoModelSpec(), corpus) != cache_key(DemoModelSpec(), corpus + " ")


def test_the_cached_model_is_a_tiny_llama(demo_model_dir, demo_tokenizer):
    config = json.loads((demo_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    theta = config.get("rope_theta") or config["rope_parameters"]["rope_theta"]
    assert theta == 1_000_000.0  # Code Llama's
    size = sum(p.stat().st_size for p in demo_model_dir.iterdir())
    assert size < 8 * 1024 * 1024
    vocab = demo_tokenizer.get_vocab()
    assert [vocab[p] for p in INFILL_PIECES] == list(range(len(vocab) - 4, len(vocab)))
    assert demo_tokenizer.bos_token_id == 1 and demo_tokenizer.eos_token_id == 2


def test_a_build_lands_whole_or_not_at_all(tmp_path):
    target = tmp_path / "cache" / "model"

    def complete(path):
        return (path / "weights").is_file()

    def crash(out):
        (out / "half").write_text("x")
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError):
        build_in_place(target, crash, complete)
    assert not target.exists() and list(target.parent.iterdir()) == []  # nothing half-made

    def build(out):
        (out / "weights").write_text("ours")

    build_in_place(target, build, complete)
    assert (target / "weights").read_text() == "ours"

    def concurrent(out):  # another build got there first: its result stands
        (out / "weights").write_text("theirs")

    build_in_place(target, concurrent, complete)
    assert (target / "weights").read_text() == "ours"
    assert [p.name for p in target.parent.iterdir()] == ["model"]
