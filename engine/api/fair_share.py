"""Admission by priority class: headroom for the classes above, a weighted fair share per key.

Pure arithmetic on counts of admitted sequences (the caller passes the time),
so every rule here is unit-tested exactly. Two rules, checked in this order:

**Headroom** (trunk reservation, as telephone exchanges keep lines for
priority calls): class `c` is admitted only while the sequences admitted in
*all* classes stay within its bound

    bound(c) = max_num_seqs + floor(queue_share(c) * max_waiting_requests)

The highest class has `queue_share = 1` (the whole queue); a lower class's
requests are refused (429 `queue_full_<class>`) once the queue is filled to its
share, so the rest is always left for the classes above it.

**Fair share** (weighted max-min over the keys that want more): within class
`c`, the keys *competing* for it are the requesting key and every key refused
for this class in the last `window_s` seconds (they are still asking); the
others are *satisfied* and keep what they hold. The competing keys split what
the class can hold minus what the satisfied ones hold, by weight:

    capacity(c) = bound(c) - (admitted sequences of the other classes)
    level(k)    = weight(k) / sum(weight of competing keys)
                  * (capacity(c) - sum(held by satisfied keys of c))

A key is admitted only if it holds nothing yet or `held(k) + n <= level(k)`;
otherwise it gets 429 `fair_share_<class>` even while room remains, and that
room is left to the keys under their level.

What this guarantees: (1) no admission ever takes a key above
`max(level(k), n)` at the moment it is made, so a key can only be over its
level because its level fell (another key started competing), and then it is
refused until its own requests finish; (2) a key alone in its class (no other
key competing) has `level = capacity - satisfied`, so the fair-share rule
refuses nothing the bound would admit: it costs nothing until keys compete;
(3) a key that holds nothing is never refused for fair share, however small
its level, so no key is locked out; room is left idle only for keys refused in
the last `window_s` seconds; (4) with every competing key asking faster than
its requests finish, holdings converge to the levels, i.e. to shares
proportional to the weights, whatever each key's request rate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from engine.config import PriorityClassSpec

QUEUE_FULL, FAIR_SHARE = "queue_full", "fair_share"
_EPSILON = 1e-9  # levels are fractions; a key exactly at its level is within it


@dataclass(slots=True)
class _Wanting:
    refused_at: float
    weight: float


class ClassLedger:
    """Admitted sequences by class and by (class, key name), and who is competing."""

    def __init__(
        self,
        classes: Sequence[PriorityClassSpec],
        max_num_seqs: int,
        max_waiting: int,
        window_s: float,
    ) -> None:
        self.bounds = {
            c.name: max_num_seqs + math.floor(c.queue_share * max_waiting) for c in classes
        }
        self.window_s = window_s
        self.total = 0
        self.admitted = {c.name: 0 for c in classes}  # sequences admitted, per class
        self.waiting = {c.name: 0 for c in classes}  # of them, with no first token yet
        self.held: dict[str, dict[str, int]] = {c.name: {} for c in classes}
        self._wanting: dict[str, dict[str, _Wanting]] = {c.name: {} for c in classes}

    # -- the two rules

    def check(self, cls: str, key: str, weight: float, sequences: int, now: float) -> str | None:
        """Why `sequences` more for `key` in `cls` would be refused (None: admit)."""
        if self.total + sequences > self.bounds[cls]:
            return QUEUE_FULL
        held = self.held[cls].get(key, 0)
        if held and held + sequences > self.level(cls, key, weight, now) + _EPSILON:
            return FAIR_SHARE
        return None

    def capacity(self, cls: str) -> int:
        """Sequences class `cls` could hold now: its bound less what the other classes hold."""
        return self.bounds[cls] - (self.total - self.admitted[cls])

    def level(self, cls: str, key: str, weight: float, now: float) -> float:
        """`key`'s fair share of `cls` now, in sequences (see the module's docstring)."""
        competing = self._competing(cls, now)
        total_weight = weight + sum(w.weight for k, w in competing.items() if k != key)
        satisfied = sum(n for k, n in self.held[cls].items() if k != key and k not in competing)
        return weight / total_weight * (self.capacity(cls) - satisfied)

    def _competing(self, cls: str, now: float) -> dict[str, _Wanting]:
        wanting = self._wanting[cls]
        for k in [k for k, w in wanting.items() if now - w.refused_at > self.window_s]:
            del wanting[k]
        return wanting

    # -- bookkeeping

    def refused(self, cls: str, key: str, weight: float, now: float) -> None:
        """`key` was refused for `cls`: it competes for the class for the next `window_s`."""
        self._wanting[cls][key] = _Wanting(now, weight)

    def add(self, cls: str, key: str, sequences: int) -> None:
        self.total += sequences
        self.admitted[cls] += sequences
        self.waiting[cls] += sequences
        held = self.held[cls]
        held[key] = held.get(key, 0) + sequences

    def started(self, cls: str, sequences: int) -> None:
        """A request's first token: its sequences no longer wait."""
        self.waiting[cls] -= sequences

    def remove(self, cls: str, key: str, sequences: int) -> None:
        self.total -= sequences
        self.admitted[cls] -= sequences
        held = self.held[cls]
        left = held.get(key, 0) - sequences
        if left > 0:
            held[key] = left
        else:
            held.pop(key, None)
