"""Traces: recorded request arrivals (and lengths) to replay, from JSONL."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True)
class TraceEntry:
    timestamp: float
    prompt: str | None
    input_tokens: int | None
    output_tokens: int | None


def read_trace(path: Path) -> list[TraceEntry]:
    """A JSONL of {timestamp, prompt | input_tokens, output_tokens}; times in seconds."""
    out = []
    with Path(path).open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                ts = float(row["timestamp"])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: needs a numeric `timestamp` ({e})") from None
            if row.get("prompt") is None and row.get("input_tokens") is None:
                raise ValueError(f"{path}:{n}: needs `prompt` or `input_tokens`")
            out.append(
                TraceEntry(
                    ts,
                    row.get("prompt"),
                    _opt_int(row.get("input_tokens")),
                    _opt_int(row.get("output_tokens")),
                )
            )
    if not out:
        raise ValueError(f"{path}: empty trace")
    out.sort(key=lambda e: e.timestamp)
    return out


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


def trace_schedule(entries: list[TraceEntry], time_scale: float) -> np.ndarray:
    t = np.array([e.timestamp for e in entries], dtype=float)
    return (t - t[0]) * time_scale
