"""A run as JSON: vLLM's `bench serve --save-result` summary keys at the top level, then
the steps, server and client views, warnings and settings (NaN and numpy made JSON-safe)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import metrics as m
from benchmarks.harness.results import RunResult


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN/inf become null, numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def run_to_json(
    result: RunResult,
    *,
    with_requests: bool = False,
    with_text: bool = False,
    command: Sequence[str] | None = None,
) -> dict[str, Any]:
    p = result.profile
    s = result.summary
    out: dict[str, Any] = {
        "date": result.started,
        "backend": "openai-chat" if p.endpoint == "chat" else "openai",
        "base_url": result.target.root,
        "label": result.target.label,
        "model_id": result.model,
        "endpoint": f"/v1/{'chat/completions' if p.endpoint == 'chat' else 'completions'}",
        "profile": p.name,
        "command": list(command) if command else None,
    }
    # The vLLM `bench serve --save-result` summary, same keys, at the top level.
    for k in m.vllm_keys(p.percentiles):
        out[k] = s.get(k)
    out["max_concurrency"] = s["load"].get("concurrency") or s["load"].get("max_concurrency")
    out["request_rate"] = s["load"].get("offered_rate")
    out["burstiness"] = s["load"].get("burstiness")
    out["summary"] = s
    out["steps"] = [
        {
            "index": st.index,
            "label": st.label,
            "offered": st.offered,
            "window": st.window,
            **st.summary,
            "server": st.server,
        }
        for st in result.steps
    ]
    out["sweep"] = result.sweep
    out["server"] = result.server
    out["client"] = result.client
    out["prompts"] = result.prompts
    out["prefix_cache_reset"] = result.cache_reset
    out |= result.sections
    out["warmup"] = result.warmup
    out["warnings"] = result.warnings
    out["settings"] = p.model_dump(mode="json")
    if with_requests:
        out["requests"] = [r.to_dict(with_text=with_text) for r in result.records]
    return _clean(out)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
