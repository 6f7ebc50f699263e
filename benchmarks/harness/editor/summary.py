"""The report's `editor` section: what developers saw, and what it cost the server.

Every request the sessions sent is exactly one of: *shown* (it finished, and
before the next keystroke), *cancelled* (the next keystroke closed it first) or
*failed* (an error). Shown latency runs from the debounce expiring (when the
developer paused long enough) to the last token of the completion.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks.harness.metrics import MS, error_summary, pct_key
from benchmarks.harness.records import RequestRecord
from benchmarks.harness.server_metrics import prefix_cache_hit_rate

CLIENT_DISCONNECT = "reason=client_disconnect"


def stats_ms(values_s: Sequence[float], percentiles: Sequence[float]) -> dict[str, Any]:
    """count, mean and pN in milliseconds (None when empty)."""
    v = np.asarray(values_s, dtype=float) * MS
    out: dict[str, Any] = {"count": int(v.size), "mean": float(v.mean()) if v.size else None}
    for p in percentiles:
        out[f"p{pct_key(p)}"] = float(np.percentile(v, p)) if v.size else None
    return out


def shown_latency(r: RequestRecord) -> float | None:
    """Debounce expiry (scheduled) to the completion's last token (its end if it had none)."""
    if not r.ok or r.scheduled is None:
        return None
    end = r.token_times[-1] if r.token_times else r.finished
    return None if end is None else end - r.scheduled


def first_token(r: RequestRecord) -> float | None:
    """TTFT of any request that got a token, cancelled or not."""
    if r.error is not None or not r.token_times or r.sent is None:
        return None
    return r.token_times[0] - r.sent


def wasted_tokens(cancelled: Sequence[RequestRecord], server: dict[str, Any]) -> dict[str, Any]:
    """Tokens generated for cancelled requests: the server's count where it keeps one.

    The client's own figure counts the token-carrying chunks its cancelled streams
    had received: a lower bound (the server was generating more when the client left),
    but for a cancel that raced the stream's last token, which the server counts as
    finished rather than aborted.
    """
    client = sum(len(r.token_times) for r in cancelled)
    by_reason = (server.get("counters") or {}).get("aborted_generation_tokens_by_label")
    out: dict[str, Any] = {"client_partial_streams": client}
    if by_reason is not None:
        server_count = by_reason.get(CLIENT_DISCONNECT, 0.0)
        out |= {"value": server_count, "source": "server", "server": server_count}
    else:
        out |= {"value": client, "source": "client"}
    return out


def _server_completed(counters: dict[str, Any], shown: int) -> float | None:
    by_status = counters.get("requests_by_label")
    if by_status is None or "status=200" not in by_status:
        return None
    return max(0.0, by_status["status=200"] - shown)


def editor_summary(
    records: Sequence[RequestRecord],
    server: dict[str, Any],
    *,
    sessions: int,
    percentiles: Sequence[float] = (50, 90, 99),
) -> dict[str, Any]:
    shown = [r for r in records if r.ok]
    cancelled = [r for r in records if r.cancelled]
    failed = [r for r in records if not r.ok and not r.cancelled]
    sent = len(records)
    assert len(shown) + len(cancelled) + len(failed) == sent  # a partition, by definition
    counters = server.get("counters") or {}
    aborted = counters.get("aborted_by_label")
    return {
        "sessions": sessions,
        "requests_sent": sent,
        "requests_cancelled": len(cancelled),
        "requests_failed": len(failed),
        "completions_shown": len(shown),
        "completions_empty": sum(1 for r in shown if not r.text),
        "shown_ratio": len(shown) / sent if sent else None,
        "shown_latency_ms": stats_ms(
            [x for r in shown if (x := shown_latency(r)) is not None], percentiles
        ),
        "ttft_ms": stats_ms([x for r in records if (x := first_token(r)) is not None], percentiles),
        "cancelled_before_first_token": sum(1 for r in cancelled if not r.token_times),
        # The client was late: the debounce and the next keystroke came in one go.
        "cancelled_before_sent": sum(1 for r in cancelled if r.sent is None),
        # The server finished them, but the keystroke came before the client had all.
        "server_completed_but_cancelled": _server_completed(counters, len(shown)),
        "wasted_output_tokens": wasted_tokens(cancelled, server),
        "server_aborted_client_disconnect": None
        if aborted is None
        else aborted.get(CLIENT_DISCONNECT, 0.0),
        "prefix_cache_hit_rate": prefix_cache_hit_rate(server),
        "errors": error_summary(failed),
    }
