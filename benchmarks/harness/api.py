"""The harness from Python: a profile (a Profile, a dict, or a YAML name/path) and a Target
in, a RunResult out — what the project's own experiments build on.

    from benchmarks.harness.api import Target, run_workload, run_workloads, report, shares

    editor = {"load": {"type": "sessions", "sessions": 16}, "duration_s": 60,
              "dataset": {"type": "editor", "editor": {"repos": 4}}}
    result = await run_workload(editor, Target("http://127.0.0.1:8000", api_key=KEY_A,
                                               api_key_label="interactive"))
    report(result)["editor"]["shown_latency_ms"]           # the report's JSON, as a dict
    shares(result.records, by="replica")                     # per-replica request shares

    # Two workloads at once against one server (e.g. editors on one key, a flood on another):
    ed, flood = await run_workloads([(editor, target_a), ("closed-loop", target_b)])

Every record carries `target` (the target's label), `api_key` (the key's label, never the
key), `replica` (the X-Codellama-Replica response header) and `session`, so one run's
requests split by any of them. Workloads run together share the server: each one's
server-side deltas (`server`, `prefix_cache_hit_rate`, wasted tokens) count all the traffic.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.harness.client import Target
from benchmarks.harness.profile.files import deep_merge, load_profile
from benchmarks.harness.profile.schema import Profile
from benchmarks.harness.records import RequestRecord
from benchmarks.harness.report.as_json import run_to_json
from benchmarks.harness.results import RunResult
from benchmarks.harness.runner import Runner

__all__ = ["Target", "as_profile", "report", "run_workload", "run_workloads", "shares", "split"]

ProfileLike = Profile | Mapping[str, Any] | str | Path
SPLIT_KEYS = ("replica", "api_key", "target", "session", "step", "status")


def as_profile(profile: ProfileLike, overrides: Mapping[str, Any] | None = None) -> Profile:
    """A validated Profile from a Profile, a dict (the YAML's shape) or a bundled name / path."""
    over = dict(overrides or {})
    if isinstance(profile, Profile):
        return Profile.model_validate(deep_merge(profile.model_dump(), over)) if over else profile
    if isinstance(profile, Mapping):
        return Profile.model_validate(deep_merge(dict(profile), over))
    return load_profile(str(profile), over)


async def run_workload(
    profile: ProfileLike,
    target: Target,
    *,
    overrides: Mapping[str, Any] | None = None,
    **runner_kwargs: Any,
) -> RunResult:
    """Run one profile against one target (Runner keyword arguments pass through)."""
    return await Runner(as_profile(profile, overrides), target, **runner_kwargs).run()


async def run_workloads(
    runs: Sequence[tuple[ProfileLike, Target]], **runner_kwargs: Any
) -> list[RunResult]:
    """Several profiles at the same time (each with its own target / key), in order."""
    return list(await asyncio.gather(*(run_workload(p, t, **runner_kwargs) for p, t in runs)))


def report(
    result: RunResult, *, with_requests: bool = True, with_text: bool = False
) -> dict[str, Any]:
    """The run's JSON report as a dict: the summary keys, `editor`/`quality` sections, records."""
    return run_to_json(result, with_requests=with_requests, with_text=with_text)


def split(records: Sequence[RequestRecord], by: str = "replica") -> dict[Any, list[RequestRecord]]:
    """Records grouped by one of their fields (replica, api_key, target, session, …)."""
    if by not in SPLIT_KEYS:
        raise ValueError(f"split by one of {', '.join(SPLIT_KEYS)}, not {by!r}")
    out: dict[Any, list[RequestRecord]] = {}
    for r in records:
        out.setdefault(getattr(r, by), []).append(r)
    return out


def shares(records: Sequence[RequestRecord], by: str = "replica") -> dict[str, dict[str, Any]]:
    """Per value of `by`: requests, their share of the whole, and how many were ok."""
    groups = split(records, by)
    total = len(records)
    ok = Counter({k: sum(1 for r in v if r.ok) for k, v in groups.items()})
    return {
        str(k): {"requests": len(v), "share": len(v) / total if total else None, "ok": ok[k]}
        for k, v in sorted(groups.items(), key=lambda kv: str(kv[0]))
    }
