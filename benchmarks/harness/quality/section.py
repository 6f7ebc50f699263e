"""The report's `quality` section: whichever scores the profile asks for."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from benchmarks.harness.client import OpenAIClient
from benchmarks.harness.profile.schema import Profile
from benchmarks.harness.quality.equivalence import ItemOf, equivalence
from benchmarks.harness.quality.sandbox import Sandbox
from benchmarks.harness.quality.scoring import fim_exact_match, humaneval_pass_at_k
from benchmarks.harness.records import RequestRecord


async def quality_section(
    client: OpenAIClient,
    records: Sequence[RequestRecord],
    item_of: ItemOf,
    profile: Profile,
    log: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any]:
    q = profile.quality
    assert q is not None
    out: dict[str, Any] = {}
    if q.fim_exact_match:
        out["fim_exact_match"] = fim_exact_match(records, item_of)
    if q.pass_at_k:
        log("running HumanEval tests in the sandbox")
        sandbox = Sandbox(q.timeout_s, q.memory_mb, q.workers)
        he = out["humaneval"] = await humaneval_pass_at_k(records, item_of, q.pass_at_k, sandbox)
        out["pass_at_1"], out["pass_at_k"] = he["pass_at_1"], he["pass_at_k"]
    if q.equivalence:
        log(f"resending up to {q.equivalence_max_prompts} prompts alone (equivalence)")
        out["equivalence"] = await equivalence(client, records, item_of, q.equivalence_max_prompts)
    return out
