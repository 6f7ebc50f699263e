"""What the harness sends: HumanEval, infilling, chat, synthetic lengths, JSONL."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.harness.datasets import (
    build_items,
    cycle,
    humaneval_problems,
    infill_split,
    jsonl_items,
    synthetic_items,
    trace_items,
)
from benchmarks.harness.profile.schema import DatasetSpec, LengthDist
from benchmarks.harness.profile.traces import TraceEntry


def no_tokenizer() -> None:
    raise AssertionError("this dataset must not need a tokenizer")


def test_humaneval_ships_164_problems_offline() -> None:
    items = build_items(DatasetSpec(type="humaneval", shuffle=False), 0, no_tokenizer)
    assert len(items) == 164
    assert items[0].id == "HumanEval/0" and items[0].prompt.startswith("from typing import List")


def test_chat_items_wrap_the_prompt_in_an_instruction() -> None:
    items = build_items(
        DatasetSpec(type="chat", shuffle=False, system="Be brief."), 0, no_tokenizer
    )
    msgs = items[0].messages
    assert msgs[0] == {"role": "system", "content": "Be brief."}
    assert msgs[1]["role"] == "user"
    assert msgs[1]["content"].startswith("Complete this Python function:\n\n```python\nfrom typing")


def test_infill_splits_rebuild_the_solution_exactly() -> None:
    rng = np.random.default_rng(0)
    problems = humaneval_problems()
    sizes = set()
    for p in problems:
        prefix, middle, suffix = infill_split(p["prompt"], p["canonical_solution"], rng)
        assert prefix + middle + suffix == p["prompt"] + p["canonical_solution"]
        assert prefix.startswith(p["prompt"]) and middle.strip()
        sizes.add(middle.count("\n"))
    assert sizes <= {1, 2, 3} and len(sizes) > 1
    items = build_items(DatasetSpec(type="infill", shuffle=False), 0, no_tokenizer)
    assert all(it.suffix is not None and it.reference for it in items)


def test_datasets_are_seeded() -> None:
    a = build_items(DatasetSpec(type="infill"), 1, no_tokenizer)
    b = build_items(DatasetSpec(type="infill"), 1, no_tokenizer)
    c = build_items(DatasetSpec(type="infill"), 2, no_tokenizer)
    assert a == b and [x.id for x in a] != [x.id for x in c]


def test_output_length_distribution_sets_per_request_max_tokens() -> None:
    spec = DatasetSpec(
        type="humaneval", output_tokens=LengthDist(dist="uniform", mean=64, range_ratio=0.5)
    )
    items = build_items(spec, 0, no_tokenizer)
    lens = [it.max_tokens for it in items]
    assert min(lens) >= 32 and max(lens) <= 96 and len(set(lens)) > 10


def test_synthetic_prompts_have_the_drawn_token_counts(demo_tokenizer) -> None:
    spec = DatasetSpec(
        type="synthetic",
        size=12,
        input_tokens=LengthDist(dist="uniform", mean=128, range_ratio=0.5),
    )
    rng = np.random.default_rng(3)
    drawn = spec.input_tokens.sample(np.random.default_rng(3), 12)
    items = synthetic_items(spec, demo_tokenizer, rng)
    for it, n in zip(items, drawn, strict=True):
        # As the server counts them: the text plus BOS.
        assert len(demo_tokenizer(it.prompt).input_ids) == n == it.input_tokens
    spec = DatasetSpec(type="synthetic", text="code", size=20, input_tokens=64)
    code = synthetic_items(spec, demo_tokenizer, rng)
    counts = [len(demo_tokenizer(it.prompt).input_ids) for it in code]
    assert counts == [it.input_tokens for it in code]  # the record tells the truth
    assert sum(c == 64 for c in counts) >= 18  # merges at the edges may cost a token


def test_jsonl_rows(tmp_path: Path) -> None:
    p = tmp_path / "u.jsonl"
    rows = [
        {"prompt": "def f():", "max_tokens": 5, "id": "one"},
        {"messages": [{"role": "user", "content": "hi"}], "output_tokens": 7},
        {"prompt": "x = ", "suffix": "\nprint(x)"},
    ]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    items = jsonl_items(p)
    assert items[0].id == "one" and items[0].max_tokens == 5
    assert items[1].is_chat and items[1].max_tokens == 7
    assert items[2].suffix == "\nprint(x)"
    p.write_text('{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match="prompt"):
        jsonl_items(p)


def test_trace_items_keep_trace_order_and_lengths() -> None:
    entries = [TraceEntry(0.0, "a", None, 4), TraceEntry(1.0, "b", None, None)]
    items = trace_items(entries, no_tokenizer, np.random.default_rng())
    assert [(it.prompt, it.max_tokens) for it in items] == [("a", 4), ("b", None)]


def test_cycle_repeats() -> None:
    items = build_items(DatasetSpec(type="humaneval", limit=3), 0, no_tokenizer)
    it = cycle(items)
    assert [next(it) for _ in range(7)] == items * 2 + items[:1]
