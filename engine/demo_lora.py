"""A tiny LoRA adapter for the demo model, in PEFT's format, built from local text.

The demo model learned Python from a few standard-library modules; this adapter is
its "team fine-tune": a short, seeded training pass of rank-8 LoRA matrices on every
projection of both layers, over `unittest`'s own source, with the base weights frozen.
Written as PEFT writes it (`adapter_config.json` + `adapter_model.safetensors`,
tensors named `base_model.model.<module>.lora_A/B.weight`) without PEFT itself.
Cached beside the demo model under a key made of everything that went into it,
the base model's key included; the same inputs give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from engine.demo_model import (
    DemoModelSpec,
    _single_threaded_torch,
    build_in_place,
    corpus_text,
    default_cache_root,
    demo_model_path,
    ensure_demo_model,
)

log = logging.getLogger(__name__)

LORA_BUILD_FORMAT = 1  # bump when the recipe changes
DEMO_LORA_NAME = "demo-lora"  # the name README and tests serve it under
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# Test-framework code: what the adapter makes the model write more like.
LORA_CORPUS_MODULES = ("unittest.case", "unittest.result", "unittest.util")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class DemoLoraSpec:
    """Everything, besides the base model and the corpus, that decides the adapter's bytes."""

    seed: int = 0
    rank: int = 8
    alpha: int = 16
    train_steps: int = 150
    train_batch: int = 8
    train_seq_len: int = 96
    learning_rate: float = 1e-2


def lora_corpus_text() -> str:
    return corpus_text(LORA_CORPUS_MODULES)


def lora_cache_key(spec: DemoLoraSpec, base_dir: Path, corpus: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"format": LORA_BUILD_FORMAT, **asdict(spec)}, sort_keys=True).encode())
    h.update(base_dir.name.encode())  # the base model's own cache key
    h.update(corpus.encode("utf-8"))
    return h.hexdigest()[:16]


def demo_lora_path(
    spec: DemoLoraSpec | None = None,
    base_spec: DemoModelSpec | None = None,
    cache_root: Path | None = None,
) -> Path:
    """Where the demo adapter for these specs lives (built or not)."""
    spec = spec or DemoLoraSpec()
    root = cache_root or default_cache_root()
    base_dir = demo_model_path(base_spec, root)
    return root / f"demo-lora-{lora_cache_key(spec, base_dir, lora_corpus_text())}"


def ensure_demo_lora(
    spec: DemoLoraSpec | None = None,
    base_spec: DemoModelSpec | None = None,
    cache_root: Path | None = None,
) -> Path:
    """The cached demo adapter's directory, building it (and the demo model) if missing."""
    spec = spec or DemoLoraSpec()
    target = demo_lora_path(spec, base_spec, cache_root)
    if _complete(target):
        return target
    base_dir = ensure_demo_model(base_spec, cache_root)
    build_in_place(target, lambda out: build_demo_lora(out, base_dir, spec), _complete)
    return target


def _complete(path: Path) -> bool:
    return all((path / name).is_file() for name in ADAPTER_FILES)


def build_demo_lora(out_dir: Path, base_dir: Path, spec: DemoLoraSpec) -> None:
    import sentencepiece as spm
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("building the demo LoRA adapter in %s", out_dir)
    sp = spm.SentencePieceProcessor(model_file=str(base_dir / "tokenizer.model"))
    with _single_threaded_torch() as torch:
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        model.requires_grad_(False)
        layers = _add_lora(model, spec, torch)
        ids = _documents(sp, lora_corpus_text())
        _train(model, layers, ids, spec, torch)
        tensors = {
            f"base_model.model.{name}.lora_{ab}.weight": getattr(layer, ab).detach().contiguous()
            for name, layer in layers.items()
            for ab in ("A", "B")
        }
    save_file(tensors, out_dir / "adapter_model.safetensors")
    (out_dir / "adapter_config.json").write_text(
        json.dumps(_peft_config(spec, base_dir), indent=2, sort_keys=True), encoding="utf-8"
    )


def _peft_config(spec: DemoLoraSpec, base_dir: Path) -> dict[str, Any]:
    # The fields PEFT's LoraConfig writes that decide how the weights apply.
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_dir.name,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(ATTENTION + MLP),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def _add_lora(model: Any, spec: DemoLoraSpec, torch: Any) -> dict[str, Any]:
    """Wrap each target projection so that it adds B·A·x·alpha/r (PEFT's LoRA);
    the wrappers by their module names."""

    class LoRALinear(torch.nn.Module):
        def __init__(self, base: Any) -> None:
            super().__init__()
            self.base = base
            # PEFT's default init: A Kaiming-uniform, B zero (the adapter starts as a no-op).
            self.A = torch.nn.Parameter(torch.empty(spec.rank, base.in_features))
            torch.nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
            self.B = torch.nn.Parameter(torch.zeros(base.out_features, spec.rank))
            self.scale = spec.alpha / spec.rank

        def forward(self, x: Any) -> Any:
            return self.base(x) + (x @ self.A.T @ self.B.T) * self.scale

    layers: dict[str, Any] = {}
    for i, layer in enumerate(model.model.layers):
        for group, names in (("self_attn", ATTENTION), ("mlp", MLP)):
            parent = getattr(layer, group)
            for name in names:
                wrapped = LoRALinear(getattr(parent, name))
                setattr(parent, name, wrapped)
                layers[f"model.layers.{i}.{group}.{name}"] = wrapped
    return layers


def _documents(sp: Any, corpus: str) -> list[int]:
    # As the demo model was trained: each top-level block is BOS text EOS.
    ids: list[int] = []
    for block in corpus.split("\n\n\n"):
        if block.strip():
            ids += [sp.bos_id(), *sp.encode(block), sp.eos_id()]
    return ids


def _train(
    model: Any, layers: dict[str, Any], ids: list[int], spec: DemoLoraSpec, torch: Any
) -> None:
    data = torch.tensor(ids, dtype=torch.long)
    gen = torch.Generator().manual_seed(spec.seed)
    params = [p for layer in layers.values() for p in (layer.A, layer.B)]
    opt = torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=0.0)
    model.train()
    span = spec.train_seq_len
    for step in range(spec.train_steps):
        starts = torch.randint(0, len(data) - span, (spec.train_batch,), generator=gen)
        batch = torch.stack([data[s : s + span] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == spec.train_steps - 1:
            log.info("demo LoRA training step %d loss %.3f", step, loss.item())
    model.eval()
