"""A run's report in a folder: report.json, report.md and the PNGs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from benchmarks.harness.report.as_json import run_to_json, write_json
from benchmarks.harness.report.as_markdown import run_markdown
from benchmarks.harness.report.plots import plot_cdfs, plot_load_curve, plot_timeline
from benchmarks.harness.results import RunResult


def write_run_report(
    result: RunResult,
    out_dir: Path,
    *,
    with_requests: bool = False,
    with_text: bool = False,
    command: Sequence[str] | None = None,
    plots: bool = True,
) -> dict[str, Path]:
    """report.json, report.md and the PNGs in `out_dir`; their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    if plots and result.records:
        groups = (
            {st.label: [r for r in result.records if r.step == st.index] for st in result.steps}
            if 1 < len(result.steps) <= 10
            else {result.target.label: result.records}
        )
        paths["latency_cdf"] = plot_cdfs(
            groups, out_dir / "latency_cdf.png", f"{result.profile.name} · {result.target.label}"
        )
        paths["timeline"] = plot_timeline(result, out_dir / "timeline.png")
        if len(result.steps) > 1:
            paths["load_curve"] = plot_load_curve(result, out_dir / "load_curve.png")
    data = run_to_json(result, with_requests=with_requests, with_text=with_text, command=command)
    paths["json"] = out_dir / "report.json"
    write_json(paths["json"], data)
    paths["markdown"] = out_dir / "report.md"
    pngs = [str(v) for k, v in paths.items() if v.suffix == ".png"]
    paths["markdown"].write_text(run_markdown(result, pngs), encoding="utf-8")
    return paths
