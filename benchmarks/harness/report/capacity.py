"""A capacity search as a report: capacity.json, capacity.md and the curve (capacity.png)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from benchmarks.harness.report.as_json import write_json
from benchmarks.harness.report.as_markdown import f


def capacity_markdown(data: dict[str, Any], title: str) -> str:
    unit = data["unit"]
    cap = data["capacity"]
    lines = [
        f"# Capacity: {title}",
        "",
        f"Objectives: {', '.join(f'`{o}`' for o in data['objectives'])}.",
        "",
        (
            f"**Capacity: {cap:g} {unit}** — the highest load probed that met every objective."
            if cap is not None
            else "**No load probed met the objectives.**"
        ),
        "",
    ]
    if data.get("note"):
        lines += [f"Note: {data['note']}.", ""]
    objs = data["objectives"]
    lines += [
        f"| {unit} | meets | " + " | ".join(f"{o} (ms)" for o in objs) + " | req/s | out tok/s "
        "| failed | why |",
        "|" + "---|" * (6 + len(objs)),
    ]
    for p in data["probes"]:
        vals = " | ".join(f(p["values"].get(o)) for o in objs)
        lines.append(
            f"| {p['load']:g} | {'✓' if p['meets'] else '✗'} | {vals} "
            f"| {f(p['request_throughput'], 2)} | {f(p['output_throughput'])} | {p['failed']} "
            f"| {p['reason']}{' (client fell behind)' if p['client_fell_behind'] else ''} |"
        )
    lines += ["", f"Probe order: {', '.join(f'{x:g}' for x in data['order'])}."]
    return "\n".join(lines) + "\n"


def plot_capacity(data: dict[str, Any], path: Path, title: str) -> Path:
    """Each objective's percentile against load, its limit, and the capacity found."""
    probes = data["probes"]
    objs: Sequence[str] = data["objectives"]
    fig, axes = plt.subplots(1, len(objs) + 1, figsize=(5 * (len(objs) + 1), 4.2))
    x = [p["load"] for p in probes]
    for ax, o in zip(axes, objs, strict=False):
        y = [p["values"].get(o) for p in probes]
        ax.plot(x, [v if v is not None else float("nan") for v in y], "o-", label=o)
        limit = float(o.split("<=")[1].removesuffix("ms"))
        ax.axhline(limit, color="red", ls="--", lw=1, label="limit")
        for p, v in zip(probes, y, strict=True):
            if v is not None:
                ax.annotate("✓" if p["meets"] else "✗", (p["load"], v), fontsize=8)
        ax.set_ylabel("ms")
        ax.set_yscale("log")
        ax.set_title(o)
    ax = axes[-1]
    ax.plot(x, [p["request_throughput"] for p in probes], "o-", label="completed req/s")
    ax.set_ylabel("req/s")
    ax.set_title("throughput")
    for ax in axes:
        ax.set_xlabel(data["unit"])
        ax.grid(alpha=0.3)
        if data["capacity"] is not None:
            ax.axvline(data["capacity"], color="green", ls=":", lw=1.5, label="capacity")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_capacity(data: dict[str, Any], out_dir: Path, title: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "capacity.json", "markdown": out_dir / "capacity.md"}
    write_json(paths["json"], data)
    paths["plot"] = plot_capacity(data, out_dir / "capacity.png", title)
    paths["markdown"].write_text(
        capacity_markdown(data, title) + "\n![capacity](capacity.png)\n", encoding="utf-8"
    )
    return paths
