"""Which session workload a profile runs, and the report sections its dataset adds."""

from __future__ import annotations

from typing import Any

from benchmarks.harness.profile.schema import Profile
from benchmarks.harness.results import RunResult
from benchmarks.harness.server_metrics import prefix_cache_hit_rate
from benchmarks.harness.session_phase import SessionWorkload
from benchmarks.harness.shared_prefix import group_of


def build_session_workload(profile: Profile, tokenizer: Any, keep_items: bool) -> SessionWorkload:
    """The users of a `sessions` load: editor developers or chat users."""
    if profile.dataset.type == "editor":
        from benchmarks.harness.editor.workload import EditorWorkload

        return EditorWorkload(profile, tokenizer, keep_items=keep_items)
    from benchmarks.harness.chat_sessions import ChatSessionsWorkload

    return ChatSessionsWorkload(profile, tokenizer)


def workload_sections(result: RunResult, workload: SessionWorkload | None) -> dict[str, Any]:
    out = workload.sections(result) if workload is not None else {}
    spec = result.profile.dataset
    if spec.type == "shared-prefix" and spec.shared_prefix is not None:
        sp = spec.shared_prefix
        groups: dict[str, int] = {}
        for r in result.records:
            if (g := group_of(r.item_id)) is not None:
                groups[g] = groups.get(g, 0) + 1
        # What a cache that missed only each group's first request would hit.
        share = (sp.requests_per_group - 1) / sp.requests_per_group
        out["shared_prefix"] = {
            "groups": sp.groups,
            "prefix_tokens": sp.prefix_tokens,
            "tail_tokens": sp.tail_tokens,
            "chat": sp.chat,
            "requests_by_group": dict(sorted(groups.items())),
            "prefix_cache_hit_rate": prefix_cache_hit_rate(result.server),
            "shareable_prompt_fraction": share
            * sp.prefix_tokens
            / (sp.prefix_tokens + sp.tail_tokens),
        }
    return out
