"""The embedded demo model: a tiny Code Llama built from local text, no network.

It has the real architecture (`LlamaForCausalLM`, Code Llama's rope theta) and a
real SentencePiece BPE tokenizer that carries Code Llama's infill pieces
(`▁<PRE>`, `▁<SUF>`, `▁<MID>`, `▁<EOT>`) at the top of the vocabulary, as the
real tokenizer does. Its weights get a short, seeded training pass on Python
source so that what it generates looks like code. The same seed and corpus give
the same bytes; the result is cached in the user cache dir under a key made of
everything that went into it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import platformdirs

log = logging.getLogger(__name__)

INFILL_PIECES = ("▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>")  # Code Llama's order
BUILD_FORMAT = 1  # bump when the build recipe changes

# Standard-library modules whose source is the training text: plain, stable
# Python present in every CPython install.
CORPUS_MODULES = (
    "textwrap", "heapq", "bisect", "functools", "string", "json.encoder",
    "json.decoder", "collections", "argparse", "dataclasses", "fractions",
    "shlex", "glob", "fnmatch", "csv", "calendar", "difflib", "statistics",
)  # fmt: skip


@dataclass(frozen=True)
class DemoModelSpec:
    """Everything that decides the bytes of the built model."""

    seed: int = 0
    vocab_size: int = 2000
    hidden_size: int = 128
    intermediate_size: int = 352
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    max_position_embeddings: int = 16384
    rope_theta: float = 1_000_000.0
    train_steps: int = 250
    train_batch: int = 8
    train_seq_len: int = 96
    learning_rate: float = 3e-3


def corpus_text(modules: tuple[str, ...] = CORPUS_MODULES) -> str:
    parts = []
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise RuntimeError(f"demo model corpus module {name!r} has no source file")
        parts.append(Path(spec.origin).read_text(encoding="utf-8"))
    return "\n".join(parts)


def cache_key(spec: DemoModelSpec, corpus: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"format": BUILD_FORMAT, **asdict(spec)}, sort_keys=True).encode())
    h.update(corpus.encode("utf-8"))
    return h.hexdigest()[:16]


def default_cache_root() -> Path:
    env = os.environ.get("CODELLAMA_SERVE_CACHE_DIR")
    return Path(env) if env else Path(platformdirs.user_cache_dir("codellama-serve"))


def demo_model_path(spec: DemoModelSpec | None = None, cache_root: Path | None = None) -> Path:
    """Where the demo model for `spec` lives (built or not)."""
    spec = spec or DemoModelSpec()
    root = cache_root or default_cache_root()
    return root / f"demo-model-{cache_key(spec, corpus_text())}"


def ensure_demo_model(spec: DemoModelSpec | None = None, cache_root: Path | None = None) -> Path:
    """Return the cached demo model directory, building it first if missing."""
    spec = spec or DemoModelSpec()
    target = demo_model_path(spec, cache_root)
    if not _model_complete(target):
        build_in_place(target, lambda out: build_demo_model(out, spec), _model_complete)
    return target


def _model_complete(path: Path) -> bool:
    return (path / "model.safetensors").is_file()


def build_in_place(
    target: Path, build: Callable[[Path], None], complete: Callable[[Path], bool]
) -> None:
    """Build into a fresh directory beside `target`, then rename it into place: a crashed
    or concurrent build never leaves a half-written model where a server would load it
    (if another build got there first, its result stands)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".building-{target.name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_demo_model(out_dir: Path, spec: DemoModelSpec) -> None:
    corpus = corpus_text()
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("building the demo model in %s", out_dir)
    sp_bytes = _train_tokenizer(corpus, spec)
    (out_dir / "tokenizer.model").write_bytes(sp_bytes)
    (out_dir / "tokenizer_config.json").write_text(_tokenizer_config(spec), encoding="utf-8")
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2),
        encoding="utf-8",
    )
    _build_weights(out_dir, corpus, spec, sp_bytes)


def _train_tokenizer(corpus: str, spec: DemoModelSpec) -> bytes:
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    buf = io.BytesIO()
    # Llama's trainer settings: BPE, byte fallback, digits split, whitespace
    # kept as-is (code indentation becomes pieces like "▁▁▁▁").
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus.splitlines()),
        model_writer=buf,
        vocab_size=spec.vocab_size - len(INFILL_PIECES),
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        max_sentence_length=1 << 16,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(buf.getvalue())
    # Code Llama keeps its infill pieces at the top of the vocabulary.
    for piece in INFILL_PIECES:
        new = proto.pieces.add()
        new.piece = piece
        new.score = 0.0
        new.type = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    proto.trainer_spec.vocab_size = len(proto.pieces)
    return proto.SerializeToString(deterministic=True)


def _tokenizer_config(spec: DemoModelSpec) -> str:
    # The infill pieces are special, so `skip_special_tokens` keeps them out of
    # generated text, as in Code Llama's own tokenizer config.
    return json.dumps(
        {
            "tokenizer_class": "LlamaTokenizer",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "pad_token": None,
            "add_bos_token": True,
            "add_eos_token": False,
            "legacy": True,
            "clean_up_tokenization_spaces": False,
            "model_max_length": spec.max_position_embeddings,
            "additional_special_tokens": list(INFILL_PIECES),
        },
        indent=2,
    )


@contextlib.contextmanager
def _single_threaded_torch():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same float ops in the same order on every machine
    try:
        yield torch
    finally:
        torch.set_num_threads(threads)


def _build_weights(out_dir: Path, corpus: str, spec: DemoModelSpec, sp_bytes: bytes) -> None:
    import sentencepiece as spm
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    sp = spm.SentencePieceProcessor(model_proto=sp_bytes)
    with _single_threaded_torch() as torch:
        torch.manual_seed(spec.seed)
        config = LlamaConfig(
            vocab_size=sp.get_piece_size(),
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_hidden_layers,
            num_attention_heads=spec.num_attention_heads,
            num_key_value_heads=spec.num_attention_heads,
            max_position_embeddings=spec.max_position_embeddings,
            rope_theta=spec.rope_theta,
            rms_norm_eps=1e-5,
            bos_token_id=sp.bos_id(),
            eos_token_id=sp.eos_id(),
            tie_word_embeddings=False,
            # float32: oneDNN has no bf16 matmul on CPUs without AMX, and
            # vLLM then falls back to a path ~3x slower for this model.
            torch_dtype="float32",
        )
        model = LlamaForCausalLM(config)
        _train(model, sp, corpus, spec, torch)
        model.generation_config = GenerationConfig(
            bos_token_id=sp.bos_id(), eos_token_id=sp.eos_id()
        )
        model.save_pretrained(out_dir, safe_serialization=True)


def _train(model: Any, sp: Any, corpus: str, spec: DemoModelSpec, torch: Any) -> None:
    """A short next-token training pass so generations look like Python."""
    # Each top-level block is a document: BOS text EOS, so the model also
    # learns to stop.
    ids: list[int] = []
    for block in corpus.split("\n\n\n"):
        if block.strip():
            ids += [sp.bos_id(), *sp.encode(block), sp.eos_id()]
    data = torch.tensor(ids, dtype=torch.long)
    gen = torch.Generator().manual_seed(spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=0.0)
    model.train()
    span = spec.train_seq_len
    for step in range(spec.train_steps):
        starts = torch.randint(0, len(data) - span, (spec.train_batch,), generator=gen)
        batch = torch.stack([data[s : s + span] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss  # the model shifts labels itself
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == spec.train_steps - 1:
            log.info("demo model training step %d loss %.3f", step, loss.item())
    model.eval()
