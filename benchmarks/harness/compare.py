"""Compare mode: one profile against several endpoints, interleaved, the order rotated.

Interleaving trials (rather than all of A, then all of B) makes slow drift of
the machine (thermal, noisy neighbours, caches) land on every target alike, and
rotating the order each round (A B, B A, …) keeps "always second" from being a
bias of its own. The table reports each target's median over trials and its
spread, and per target the median of its trial-by-trial ratio to the first
target (the baseline) with a bootstrap 95 % interval: an interval that contains
1 is "no significant difference".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness.client import Target
from benchmarks.harness.profile.schema import Profile
from benchmarks.harness.report.as_json import run_to_json, write_json
from benchmarks.harness.report.as_markdown import f
from benchmarks.harness.report.plots import plot_cdfs
from benchmarks.harness.report.write import write_run_report
from benchmarks.harness.results import RunResult
from benchmarks.harness.runner import Runner
from benchmarks.harness.stats import paired_ratio

# (key, label, higher is better)
COMPARE_METRICS: tuple[tuple[str, str, bool], ...] = (
    ("request_throughput", "Request/s", True),
    ("output_throughput", "Output tok/s", True),
    ("request_goodput", "Goodput req/s", True),
    ("mean_ttft_ms", "TTFT mean (ms)", False),
    ("median_ttft_ms", "TTFT median (ms)", False),
    ("p99_ttft_ms", "TTFT P99 (ms)", False),
    ("median_tpot_ms", "TPOT median (ms)", False),
    ("p99_tpot_ms", "TPOT P99 (ms)", False),
    ("median_itl_ms", "ITL median (ms)", False),
    ("p99_itl_ms", "ITL P99 (ms)", False),
    ("median_e2el_ms", "E2E median (ms)", False),
    ("p99_e2el_ms", "E2E P99 (ms)", False),
)


@dataclass
class Comparison:
    profile: Profile
    targets: list[Target]
    trials: int
    order: list[str] = field(default_factory=list)  # labels in the order they ran
    results: dict[str, list[RunResult]] = field(default_factory=dict)

    def table(self) -> list[dict[str, Any]]:
        base = self.targets[0].label
        rows = []
        for key, label, higher in COMPARE_METRICS:
            row: dict[str, Any] = {"metric": key, "label": label, "higher_is_better": higher}
            per_trial = {
                t.label: [r.summary.get(key) for r in self.results.get(t.label, [])]
                for t in self.targets
            }
            for t in self.targets:
                vals = [v for v in per_trial[t.label] if v is not None]
                row[t.label] = {
                    "median": float(np.median(vals)) if vals else None,
                    "mean": float(np.mean(vals)) if vals else None,
                    "min": min(vals) if vals else None,
                    "max": max(vals) if vals else None,
                    "trials": per_trial[t.label],
                }
                if t.label == base:
                    row[t.label]["ratio_to_baseline"] = 1.0 if vals else None
                else:
                    ratio = paired_ratio(per_trial[base], per_trial[t.label])
                    row[t.label]["ratio_to_baseline"] = ratio["median"]
                    row[t.label]["ratio"] = ratio
            rows.append(row)
        return rows


async def compare(
    profile: Profile,
    targets: Sequence[Target],
    trials: int = 3,
    *,
    runner_kwargs: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> Comparison:
    log = log or (lambda _m: None)
    labels = [t.label for t in targets]
    if len(set(labels)) != len(labels):
        raise ValueError(f"target names must differ: {labels}")
    cmp = Comparison(profile, list(targets), trials, results={t.label: [] for t in targets})
    for trial in range(trials):
        k = trial % len(targets)
        for t in [*targets[k:], *targets[:k]]:  # A B, B A, … (three: A B C, B C A, C A B)
            log(f"trial {trial + 1}/{trials}: {t.label}")
            res = await Runner(profile, t, log=log, **(runner_kwargs or {})).run()
            cmp.results[t.label].append(res)
            cmp.order.append(t.label)
    return cmp


def comparison_markdown(cmp: Comparison) -> str:
    base = cmp.targets[0].label
    names = [t.label for t in cmp.targets]
    lines = [
        f"# Comparison `{cmp.profile.name}`: {' vs '.join(names)}",
        "",
        f"{cmp.trials} interleaved trials per target, the order rotated each round "
        f"({', '.join(cmp.order)}). Median over trials [min–max]; ratio = target / {base}, "
        "trial by trial: their median and bootstrap 95 % interval (an interval that contains "
        "1 is no significant difference).",
        "",
        "| Metric | "
        + " | ".join(names)
        + " | "
        + " | ".join(f"{n} / {base}" for n in names[1:])
        + " |",
        "|---|" + "---|" * (2 * len(names) - 1),
    ]
    for row in cmp.table():
        cells = []
        for n in names:
            c = row[n]
            cells.append(f"{f(c['median'], 2)} [{f(c['min'], 2)}–{f(c['max'], 2)}]")
        ratios = [ratio_cell(row[n].get("ratio"), row["higher_is_better"]) for n in names[1:]]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    flagged = [
        f"{label} trial {i + 1}"
        for label, runs in cmp.results.items()
        for i, r in enumerate(runs)
        if any(st.summary["load"].get("coordinated_omission") for st in r.steps)
        or r.client["loop_lag"].get("overloaded")
    ]
    if flagged:
        lines += [
            "",
            f"**Warning**: client fell behind or was overloaded in: {', '.join(flagged)}.",
        ]
    failed = {label: sum(r.summary["failed"] for r in runs) for label, runs in cmp.results.items()}
    if any(failed.values()):
        lines += ["", "Failed requests: " + ", ".join(f"{k}: {v}" for k, v in failed.items())]
    return "\n".join(lines) + "\n"


def ratio_cell(ratio: dict[str, Any] | None, higher_is_better: bool) -> str:
    """`1.042 [0.98–1.11] no significant difference`, or with ✓ where the target is better."""
    if not ratio or ratio.get("median") is None:
        return "–"
    r, (lo, hi) = ratio["median"], ratio["ci95"]
    text = f"{r:.3f} [{lo:.3f}–{hi:.3f}]"
    if not ratio["significant"]:
        return text + " no significant difference"
    better = (r > 1) == higher_is_better
    return text + (" ✓ better" if better else " worse")


def write_comparison(
    cmp: Comparison,
    out_dir: Path,
    *,
    command: Sequence[str] | None = None,
    with_requests: bool = False,
) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    groups = {
        label: [r for run in runs for r in run.records] for label, runs in cmp.results.items()
    }
    paths["latency_cdf"] = plot_cdfs(
        groups, out_dir / "compare_cdf.png", f"{cmp.profile.name}: {' vs '.join(groups)}"
    )
    data = {
        "profile": cmp.profile.name,
        "command": list(command) if command else None,
        "trials": cmp.trials,
        "order": cmp.order,
        "baseline": cmp.targets[0].label,
        "table": cmp.table(),
        "runs": {
            label: [run_to_json(r, with_requests=with_requests) for r in runs]
            for label, runs in cmp.results.items()
        },
    }
    paths["json"] = out_dir / "compare.json"
    write_json(paths["json"], data)
    paths["markdown"] = out_dir / "compare.md"
    paths["markdown"].write_text(
        comparison_markdown(cmp) + f"\n![compare_cdf]({paths['latency_cdf'].name})\n",
        encoding="utf-8",
    )
    # Each target's last trial as a full report too, for the details.
    for label, runs in cmp.results.items():
        if runs:
            safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)
            write_run_report(runs[-1], out_dir / safe, plots=False)
    return paths
