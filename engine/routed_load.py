"""How many requests each replica holds, as one router knows it when it decides.

Pure (no Ray): `engine.ray_router` feeds it the replicas' queue-length probes and
its own assignments. Behind HAProxy, Ray's ingress request router only picks a
replica (`choose_replica(..., _reserve=False)`); HAProxy forwards the request
afterwards, so nothing in Ray counts it until it reaches the replica. A probe
therefore cannot hold what was routed after it was sent (nor what was still on
its way when it was answered), and several decisions routinely run at once, each
awaiting its own probe.

So a replica's load is its newest probe (by the time it was sent) plus every
request this router sent it that the probe cannot have counted: those routed
after the probe was sent, or less than `arrival_s` before. A probe answered late
never replaces a newer one, and never erases the requests routed while it was in
flight (the fault of the first version: every answer reset the count, so a burst
of concurrent decisions all saw the same empty replica).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

# How long a routed request may take to reach its replica and be counted there
# (HAProxy forwards it as soon as the router answers). A request that finishes
# sooner than this counts once too often for the rest of it: keep it short.
DEFAULT_ARRIVAL_S = 0.05


@dataclass(slots=True)
class _Replica:
    probe_sent: float | None = None  # when the newest answered probe was sent
    queue_len: int = 0  # what it said
    routed: deque[float] = field(default_factory=deque)  # own assignments not yet in it


class RoutedLoad:
    """Per replica: the newest queue-length probe and the requests routed since."""

    def __init__(self, arrival_s: float = DEFAULT_ARRIVAL_S) -> None:
        self.arrival_s = arrival_s
        self._replicas: dict[str, _Replica] = {}

    def probe_due(self, replica_id: str, now: float, interval_s: float) -> bool:
        """No probe answered yet, or the newest was sent more than `interval_s` ago."""
        sent = self._get(replica_id).probe_sent
        return sent is None or now - sent > interval_s

    def probed(self, replica_id: str, sent_at: float, queue_len: int) -> None:
        """A probe sent at `sent_at` answered `queue_len`."""
        r = self._get(replica_id)
        if r.probe_sent is not None and sent_at < r.probe_sent:
            return  # a newer probe has answered already
        r.probe_sent, r.queue_len = sent_at, queue_len
        counted_before = sent_at - self.arrival_s
        while r.routed and r.routed[0] < counted_before:
            r.routed.popleft()

    def routed(self, replica_id: str, at: float) -> None:
        """This router just sent a request there (`at`: a monotonic time, in order)."""
        self._get(replica_id).routed.append(at)

    def ongoing(self, replica_id: str) -> int:
        r = self._get(replica_id)
        return r.queue_len + len(r.routed)

    def keep(self, replica_ids: set[str]) -> None:
        """Forget replicas that left the deployment."""
        for gone in set(self._replicas) - replica_ids:
            del self._replicas[gone]

    def _get(self, replica_id: str) -> _Replica:
        return self._replicas.setdefault(replica_id, _Replica())
