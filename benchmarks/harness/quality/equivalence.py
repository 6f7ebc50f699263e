"""Temperature-0 equivalence: is what a prompt got under load what it gets alone?

With greedy decoding a correct server gives the same tokens whatever else is in
the batch; batch-variant kernels, preemption and recompute, or a cache bug show
up here as outputs that differ. After the run, each of up to N prompts that
completed under load is sent again alone (one request at a time) and compared.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from benchmarks.harness.client import OpenAIClient
from benchmarks.harness.datasets import RequestItem
from benchmarks.harness.records import RequestRecord

ItemOf = Callable[[RequestRecord], RequestItem | None]


def _first_difference(a: str, b: str) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


async def equivalence(
    client: OpenAIClient,
    records: Sequence[RequestRecord],
    item_of: ItemOf,
    max_prompts: int,
) -> dict[str, Any]:
    if client.opts.temperature != 0:
        return {
            "applicable": False,
            "reason": f"request.temperature is {client.opts.temperature}, not 0",
        }
    loaded: dict[str, list[RequestRecord]] = {}
    items: dict[str, RequestItem] = {}
    for r in records:
        it = item_of(r) if r.ok else None
        if it is None or (it.id not in loaded and len(loaded) >= max_prompts):
            continue
        loaded.setdefault(it.id, []).append(r)
        items[it.id] = it
    compared = identical = alone_failed = 0
    mismatches: list[dict[str, Any]] = []
    for key, recs in loaded.items():
        alone = RequestRecord(-1, key)
        await client.send(items[key], alone)
        if not alone.ok:
            alone_failed += 1
            continue
        for r in recs:
            compared += 1
            if r.text == alone.text:
                identical += 1
            elif len(mismatches) < 5:
                mismatches.append(
                    {"item": key, "first_difference_at": _first_difference(r.text, alone.text)}
                )
    return {
        "applicable": True,
        "prompts": len(loaded),
        "compared": compared,
        "identical": identical,
        "fraction": identical / compared if compared else None,
        "alone_failed": alone_failed,
        "mismatches": mismatches,
    }
