"""Prefix-cache and session affinity, weighed against load: the routing policy.

Pure (no Ray): `engine.ray_router` feeds it what Ray knows of each replica and
sends the request where it says. One decision, in this order:

1. **Eligible replicas**: not saturated (engine queue or KV cache over the
   autoscaling thresholds, or Ray's per-replica request limit reached), and
   within the **imbalance bound**: at most `max(max_imbalance, (ratio - 1) x
   least)` requests above the least loaded replica. Affinity only ever picks an
   eligible replica, so a hot prefix or a busy session cannot pile traffic on
   one replica; when it points at an ineligible one that is a load-guard
   override (counted).
2. **Session**: a session key (X-Session-Id header, else the OpenAI `user`
   field) stays on the replica it was last sent to.
3. **Prefix**: the replica holding the longest run of the prompt's leading
   blocks (the chain hashes of `engine.routing_key.block_hashes`), the less
   loaded one among equals.
4. **Balance**: otherwise the least loaded replica; ties go by rendezvous
   hashing of the prompt's first block (so routers on several nodes agree).

What each replica holds is modelled, not asked: the blocks of every prompt sent
to it, least recently used first out once they exceed the replica's KV-cache
size in blocks (vLLM evicts the least recently used free blocks too). A replica
that restarts its engine (a new `epoch` in its stats) or leaves the deployment
is forgotten.
"""

from __future__ import annotations

import random
import zlib
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

# Tracked blocks per replica until it reports its KV-cache size.
DEFAULT_CAPACITY_BLOCKS = 65_536
MAX_SESSIONS = 100_000


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    max_imbalance: int = 4
    max_imbalance_ratio: float = 1.25
    session_affinity: bool = True


@dataclass(frozen=True, slots=True)
class ReplicaState:
    """What the router knows of one replica when it decides."""

    replica_id: str
    ongoing: int  # requests in the replica, plus those routed there it has not counted yet
    saturated: bool = False


@dataclass(frozen=True, slots=True)
class Decision:
    replica_id: str
    reason: str  # "session" | "prefix" | "balance"
    matched_blocks: int = 0
    # When the load guard overrode affinity: which ("session" or "prefix") and the
    # replica it pointed at.
    guard: str | None = None
    overridden: str | None = None


class BlockLRU:
    """The prompt blocks a replica is believed to hold, least recently used first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def matched(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of the chain are held."""
        n = 0
        for h in hashes:
            if h not in self._blocks:
                break
            n += 1
        return n

    def touch(self, hashes: Iterable[int]) -> None:
        for h in hashes:
            self._blocks[h] = None
            self._blocks.move_to_end(h)
        self._evict()

    def resize(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._evict()

    def _evict(self) -> None:
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)


class PrefixAffinity:
    """The policy's state: blocks per replica, sessions, and decision counts."""

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        self._blocks: dict[str, BlockLRU] = {}
        self._epochs: dict[str, float] = {}
        self._sessions: OrderedDict[str, str] = OrderedDict()
        self.decisions: Counter[str] = Counter()  # by reason
        self.overrides: Counter[str] = Counter()  # load-guard overrides, by what was overridden

    # -- what the replicas are

    def sync(self, replicas: Mapping[str, tuple[int, float]]) -> None:
        """The deployment's replicas now: id -> (KV-cache blocks, engine epoch).
        Forgets replicas that left and those whose engine restarted."""
        for gone in set(self._blocks) - set(replicas):
            self.forget(gone)
        for rid, (capacity, epoch) in replicas.items():
            cap = capacity or DEFAULT_CAPACITY_BLOCKS
            if rid in self._epochs and self._epochs[rid] != epoch:
                self.forget(rid)
            self._epochs[rid] = epoch
            if rid not in self._blocks:
                self._blocks[rid] = BlockLRU(cap)
            elif self._blocks[rid].capacity != cap:
                self._blocks[rid].resize(cap)

    def forget(self, replica_id: str) -> None:
        self._blocks.pop(replica_id, None)
        self._epochs.pop(replica_id, None)
        for session in [s for s, r in self._sessions.items() if r == replica_id]:
            del self._sessions[session]

    def held_blocks(self, replica_id: str) -> int:
        lru = self._blocks.get(replica_id)
        return len(lru) if lru is not None else 0

    def session_replica(self, session: str) -> str | None:
        return self._sessions.get(session)

    # -- deciding

    def choose(
        self, replicas: Sequence[ReplicaState], blocks: Sequence[int], session: str | None
    ) -> Decision:
        """Where the request goes (`replicas` must not be empty)."""
        eligible = self._eligible(replicas)
        affinity = self._affinity(replicas, eligible, blocks, session)
        if affinity.reason != "balance":
            return affinity
        target = min(eligible, key=lambda r: (r.ongoing, -_rendezvous(blocks, session, r)))
        return Decision(
            target.replica_id, "balance", self._matched(target, blocks),
            affinity.guard, affinity.overridden,
        )  # fmt: skip

    def record(self, decision: Decision, blocks: Sequence[int], session: str | None) -> None:
        """Remember where it went (the replica now holds its blocks; the session lives there)."""
        self.decisions[decision.reason] += 1
        if decision.guard is not None:
            self.overrides[decision.guard] += 1
        lru = self._blocks.get(decision.replica_id)
        if lru is not None and blocks:
            lru.touch(blocks)
        if session and self.config.session_affinity:
            self._sessions[session] = decision.replica_id
            self._sessions.move_to_end(session)
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)

    def _eligible(self, replicas: Sequence[ReplicaState]) -> list[ReplicaState]:
        free = [r for r in replicas if not r.saturated] or list(replicas)
        least = min(r.ongoing for r in free)
        bound = max(self.config.max_imbalance, (self.config.max_imbalance_ratio - 1) * least)
        return [r for r in free if r.ongoing - least <= bound]

    def _affinity(
        self,
        replicas: Sequence[ReplicaState],
        eligible: list[ReplicaState],
        blocks: Sequence[int],
        session: str | None,
    ) -> Decision:
        ok = {r.replica_id for r in eligible}
        known = {r.replica_id for r in replicas}
        if session and self.config.session_affinity:
            home = self._sessions.get(session)
            if home in ok:
                return Decision(home, "session", self._matched_id(home, blocks))
            if home in known:
                return Decision("", "balance", guard="session", overridden=home)
        if not blocks:
            return Decision("", "balance")
        ranked = sorted(replicas, key=lambda r: (-self._matched(r, blocks), r.ongoing))
        best = ranked[0]
        best_match = self._matched(best, blocks)
        if best_match == 0:
            return Decision("", "balance")
        for r in ranked:
            match = self._matched(r, blocks)
            if match == 0:
                break
            if r.replica_id in ok:
                if match == best_match:
                    return Decision(r.replica_id, "prefix", match)
                return Decision(r.replica_id, "prefix", match, "prefix", best.replica_id)
        return Decision("", "balance", guard="prefix", overridden=best.replica_id)

    def _matched(self, replica: ReplicaState, blocks: Sequence[int]) -> int:
        return self._matched_id(replica.replica_id, blocks)

    def _matched_id(self, replica_id: str, blocks: Sequence[int]) -> int:
        lru = self._blocks.get(replica_id)
        return lru.matched(blocks) if lru is not None and blocks else 0


def _rendezvous(blocks: Sequence[int], session: str | None, replica: ReplicaState) -> int:
    """Highest-random-weight score of a replica for this key (random without a key)."""
    if blocks:
        seed = str(blocks[0])
    elif session:
        seed = session
    else:
        return random.getrandbits(32)
    return zlib.crc32(f"{seed}/{replica.replica_id}".encode())
